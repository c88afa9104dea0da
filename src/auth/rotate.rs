//! Rotation (contract §9) and usage reads (§10) for `/org/tokens/{id}/…`
//! and `keygate keys rotate|usage`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::keys::{KeyService, Minted, OpContext};
use super::store::{AuditEntry, KeyRecord, RotateOp, StoreError, UsageHour};
use super::token;
use super::usage::hour_of;

/// The longest grace a rotation may give (§9).
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);
/// The most hours a usage read covers (longer retentions are read up to this).
const MAX_USAGE_HOURS: i64 = 24 * 400;

/// A validated rotation: grace at most [`MAX_GRACE`], expiry in the future.
#[derive(Debug, Clone, Default)]
pub struct RotateRequest {
    /// `None`: `keys.rotate_grace`.
    pub grace: Option<Duration>,
    /// The successor's `expires_at`; `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
}

pub struct Rotated {
    pub minted: Minted,
    pub rotated_from: String,
    /// The old key's `expires_at` after the rotation.
    pub old_expires_at: DateTime<Utc>,
}

/// A key's usage over the hours asked for.
pub struct UsageReport {
    pub id: String,
    pub hours: Vec<UsageHour>,
}

/// Ids being rotated by this instance right now: a second rotation of the
/// same key while one is in flight is refused at once (the script's
/// compare-and-set settles rotations from different instances).
#[derive(Default)]
pub(super) struct InFlight(Mutex<HashSet<String>>);

struct InFlightGuard<'a>(&'a InFlight, String);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl InFlight {
    fn enter(&self, id: &str) -> Option<InFlightGuard<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(id.to_string())
            .then(|| InFlightGuard(self, id.to_string()))
    }
}

impl KeyService {
    /// Rotate the live key `id`. `Ok(None)`: no live key with that id (or a
    /// concurrent rotation of it won). On `Ok(Some(_))` this instance already
    /// sees the old key's new expiry (its cache entry is dropped).
    pub async fn rotate(
        &self,
        id: &str,
        req: RotateRequest,
        ctx: &OpContext,
    ) -> Result<Option<Rotated>, StoreError> {
        let inner = &self.inner;
        let Some(_guard) = inner.rotating.enter(id) else {
            return Ok(None);
        };
        let Some(old) = inner.timed("lookup", inner.store.lookup_id(id)).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        if !old.record.is_live(now) {
            return Ok(None);
        }
        let grace = req.grace.unwrap_or(inner.rotate_grace).min(MAX_GRACE);
        // Whole seconds, so the `expires_at` every answer and the expiry
        // header show (RFC 3339, seconds) is the exact moment: rounded up,
        // so the old key never stops before the grace it was given, except
        // `"0s"`, which stops it now (rounded down).
        let grace_end = now + chrono::Duration::from_std(grace).unwrap_or_default();
        let whole = grace_end.timestamp();
        let up = grace > Duration::ZERO && grace_end.timestamp_subsec_nanos() > 0;
        let grace_end = DateTime::from_timestamp(whole + i64::from(up), 0).unwrap_or(grace_end);
        let token = token::mint(&inner.key_prefix);
        let new_hash = token::hash(token.expose());
        let record = KeyRecord {
            id: token::new_key_id(),
            prefix: token::display_prefix(token.expose()).to_string(),
            name: old.record.name.clone(),
            created_by: ctx.actor.0.clone(),
            created_at: now,
            expires_at: req.expires_at,
            last_used_at: None,
            revoked_at: None,
            role: old.record.role,
            workspaces: old.record.workspaces.clone(),
            rate_limit: old.record.rate_limit,
        };
        let audit = AuditEntry {
            role: Some(record.role),
            workspaces: record.workspaces.clone(),
            new_key_id: Some(record.id.clone()),
            ..ctx.audit(now, "rotate", &old.record)
        };
        let op = RotateOp {
            old_id: id,
            old_hash: old.hash,
            expect_rotated_to: &old.rotated_to,
            grace_end,
            new_hash,
            new_record: &record,
            audit: &audit,
        };
        let Some(old_expires_at) = inner.timed("rotate", inner.store.rotate(&op)).await? else {
            return Ok(None);
        };
        inner.apply_expiry_change(&old.hash);
        inner.cache.forget_negative(&new_hash);
        Ok(Some(Rotated {
            minted: Minted {
                record,
                token,
                over_ceiling: false,
            },
            rotated_from: id.to_string(),
            old_expires_at,
        }))
    }

    /// The stored usage of key `id` (live or not) from the hour that contains
    /// `since` (default: as far back as `keys.usage_retention`), or `None` for
    /// an unknown id. Counts this instance has not flushed yet are not included.
    pub async fn usage(
        &self,
        id: &str,
        since: Option<DateTime<Utc>>,
    ) -> Result<Option<UsageReport>, StoreError> {
        let inner = &self.inner;
        let Some(key) = inner.timed("lookup", inner.store.lookup_id(id)).await? else {
            return Ok(None);
        };
        let now = Utc::now();
        let to = hour_of(now);
        let retention_hours =
            i64::try_from(inner.usage_retention.as_secs() / 3600).unwrap_or(i64::MAX);
        let mut from = to
            .saturating_sub(retention_hours)
            .max(hour_of(key.record.created_at))
            .max(to.saturating_sub(MAX_USAGE_HOURS));
        if let Some(s) = since {
            from = from.max(hour_of(s));
        }
        let hours = if from > to {
            Vec::new()
        } else {
            inner
                .timed("usage", inner.store.usage(id, from, to))
                .await?
        };
        Ok(Some(UsageReport {
            id: key.record.id,
            hours,
        }))
    }
}
