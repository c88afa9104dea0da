//! Store operations for rotation (contract §9) and per-key usage (§10): the
//! types and the dispatch between the memory and Redis stores.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{AuditEntry, KeyRecord, Store, StoreError};
use crate::auth::token::KeyHash;

/// A key looked up by id, with the state a rotation compares against.
#[derive(Debug, Clone)]
pub struct KeyState {
    pub hash: KeyHash,
    pub record: KeyRecord,
    /// The successor's id if the key was rotated before, else empty.
    pub rotated_to: String,
}

/// One atomic rotation: mint `new_record` (hash `new_hash`) and shorten the
/// old key's expiry to `grace_end` unless it already ends sooner, with the
/// audit entry and an "expiry changed" message on the revocation feed.
pub struct RotateOp<'a> {
    pub old_id: &'a str,
    pub old_hash: KeyHash,
    /// The old key's `rotated_to` as read: a rotation committed since then
    /// makes this one fail (of two concurrent rotations, one wins).
    pub expect_rotated_to: &'a str,
    pub grace_end: DateTime<Utc>,
    pub new_hash: KeyHash,
    pub new_record: &'a KeyRecord,
    pub audit: &'a AuditEntry,
}

/// Counts to add to one key's bucket of one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: String,
    /// Hours since the Unix epoch (UTC).
    pub hour: i64,
    pub requests: u64,
    pub refused: u64,
}

/// One stored hour of a key's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageHour {
    /// Hours since the Unix epoch (UTC).
    pub hour: i64,
    pub requests: u64,
    pub refused: u64,
}

impl Store {
    /// The key with this id (live or not), or None.
    pub async fn lookup_id(&self, id: &str) -> Result<Option<KeyState>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.lookup_id(id)),
            Store::Redis(r) => r.lookup_id(id).await,
        }
    }

    /// Rotate atomically (see [`RotateOp`]). `Ok(None)`: the old key is not
    /// live, or was rotated since `expect_rotated_to` was read. `Ok(Some(t))`:
    /// committed; `t` is the old key's `expires_at` now.
    pub async fn rotate(&self, op: &RotateOp<'_>) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.rotate(op)),
            Store::Redis(r) => r.rotate(op).await,
        }
    }

    /// Add one batch of usage counts. `marker` names the batch: a batch that
    /// was already added (a retry after a lost reply) is not added again.
    /// Buckets expire `retention` after their hour ends.
    pub async fn add_usage(
        &self,
        marker: &str,
        deltas: &[UsageDelta],
        retention: Duration,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.add_usage(marker, deltas, retention);
                Ok(())
            }
            Store::Redis(r) => r.add_usage(marker, deltas, retention).await,
        }
    }

    /// A key's stored hours in `from..=to` (hours since the epoch), oldest
    /// first, hours without traffic omitted.
    pub async fn usage(&self, id: &str, from: i64, to: i64) -> Result<Vec<UsageHour>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.usage(id, from, to)),
            Store::Redis(r) => r.usage(id, from, to).await,
        }
    }
}
