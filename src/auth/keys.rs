//! The key lifecycle: mint, list, revoke, audit — for `/org/tokens` and
//! `keygate keys …`. Every operation is one store call (an atomic script on
//! Redis) plus the audit entry that goes with it, and a revoke is applied to
//! this instance's cache before the call returns.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::scope::Role;
use super::store::{AuditEntry, KeyRecord, MintOutcome, Store, StoreError};
use super::token::{self, Token};
use super::Inner;
use crate::config::{Config, RateLimit};
use crate::metrics::Metrics;

/// Who performs a key operation: `org-key:<prefix>`, `session:<user_id>`, `cli:<os user>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    /// `cli:<os user>`: the CLI (and the demo, which mints as the CLI would).
    pub fn cli() -> Actor {
        Actor(format!("cli:{}", os_user()))
    }
}

/// `cli:<os user>`.
fn os_user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let (Some(uid), Ok(passwd)) = (uid, std::fs::read_to_string("/etc/passwd")) {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 2 && f[2] == uid.to_string() {
                return f[0].to_string();
            }
        }
    }
    uid.map(|u| format!("uid{u}"))
        .unwrap_or_else(|| "unknown".into())
}

/// Context of a key operation for the audit trail.
#[derive(Debug, Clone)]
pub struct OpContext {
    pub actor: Actor,
    pub client: Option<String>,
    pub user_agent: Option<String>,
}

impl OpContext {
    /// The audit entry of `action` on `record` by this actor (no scope, no
    /// successor: mint and rotate add theirs).
    pub(super) fn audit(&self, at: DateTime<Utc>, action: &str, record: &KeyRecord) -> AuditEntry {
        AuditEntry {
            time: at,
            actor: self.actor.0.clone(),
            action: action.into(),
            key_id: record.id.clone(),
            prefix: record.prefix.clone(),
            name: record.name.clone(),
            client: self.client.clone(),
            user_agent: self.user_agent.clone(),
            role: None,
            workspaces: Vec::new(),
            new_key_id: None,
        }
    }
}

/// A validated mint: every field checked by the caller (API body or CLI
/// flags); whether the caller may mint this scope is the caller's check too.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    pub name: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub role: Role,
    /// Validated with [`crate::auth::scope::check_workspaces`].
    pub workspaces: Vec<String>,
    /// `None`: `keys.default_rate_limit` applies.
    pub rate_limit: Option<RateLimit>,
    /// `false` for the CLI (ops break-glass may exceed `keys.max_live`).
    pub enforce_ceiling: bool,
}

pub struct Minted {
    pub record: KeyRecord,
    pub token: Token,
    /// Live keys after this mint exceed `keys.max_live` (CLI only; the API refuses instead).
    pub over_ceiling: bool,
}

#[derive(Debug)]
pub enum MintError {
    CeilingReached,
    Store(StoreError),
}

impl std::fmt::Display for MintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MintError::CeilingReached => f.write_str("org api token mint ceiling exceeded"),
            MintError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MintError {}

/// Mint, list, revoke, audit — for `/org/tokens` and `keygate keys …`.
pub struct KeyService {
    pub(super) inner: Arc<Inner>,
}

impl KeyService {
    /// Key operations without the request path (the `keygate keys` CLI): no
    /// background task, no revocation feed; store calls bounded by `store.timeout`.
    pub fn standalone(config: &Config, store: Store, metrics: Arc<Metrics>) -> KeyService {
        KeyService {
            inner: Arc::new(Inner::new(config, store, metrics)),
        }
    }

    /// Mint a key. Name and expiry are validated by the caller.
    pub async fn mint(&self, req: MintRequest, ctx: &OpContext) -> Result<Minted, MintError> {
        let inner = &self.inner;
        let token = token::mint(&inner.key_prefix);
        let hash = token::hash(token.expose());
        let now = Utc::now();
        let record = KeyRecord {
            id: token::new_key_id(),
            prefix: token::display_prefix(token.expose()).to_string(),
            name: req.name,
            created_by: ctx.actor.0.clone(),
            created_at: now,
            expires_at: req.expires_at,
            last_used_at: None,
            revoked_at: None,
            role: req.role,
            workspaces: req.workspaces,
            rate_limit: req.rate_limit.or(inner.default_rate_limit),
        };
        let audit = AuditEntry {
            role: Some(record.role),
            workspaces: record.workspaces.clone(),
            ..ctx.audit(now, "mint", &record)
        };
        let ceiling = req.enforce_ceiling.then_some(inner.max_live);
        let outcome = inner
            .timed("mint", inner.store.mint(&hash, &record, ceiling, &audit))
            .await
            .map_err(MintError::Store)?;
        match outcome {
            MintOutcome::Minted { live } => {
                inner.cache.forget_negative(&hash);
                Ok(Minted {
                    record,
                    token,
                    over_ceiling: live > u64::from(inner.max_live),
                })
            }
            MintOutcome::CeilingReached => Err(MintError::CeilingReached),
        }
    }

    /// Live keys, newest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = &self.inner;
        inner.timed("list", inner.store.list_live()).await
    }

    /// `Ok(false)`: no live key with that id. On `Ok(true)` the key is already
    /// refused by this instance (cache entry dropped, generation bumped).
    pub async fn revoke(&self, id: &str, ctx: &OpContext) -> Result<bool, StoreError> {
        let inner = &self.inner;
        // The audit entry names the key's prefix and name: read them first
        // (the one record, not the whole live list).
        let at = Utc::now();
        let record = match inner.timed("lookup", inner.store.lookup_id(id)).await? {
            Some(key) if key.record.is_live(at) => key.record,
            _ => return Ok(false),
        };
        let audit = ctx.audit(at, "revoke", &record);
        match inner
            .timed("revoke", inner.store.revoke(id, at, &audit))
            .await?
        {
            Some(hash) => {
                inner.apply_revocation(&hash);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Audit entries, oldest first, at or after `since`.
    pub async fn audit(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>, StoreError> {
        let inner = &self.inner;
        inner.timed("audit", inner.store.audit(since)).await
    }
}
