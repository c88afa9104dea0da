//! Key store: where key records live (Redis in production, memory for unit
//! tests and the demo). Only SHA-256 hashes of tokens are ever stored.
//!
//! The API below is what `auth::cache` / `Authenticator` and the key
//! lifecycle (`auth::keys`) use.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::scope::Role;
use super::token::KeyHash;
use crate::config::{RateLimit, StoreBackend, StoreConfig};

/// One key's metadata, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub prefix: String,
    pub name: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// §8; `Admin` for a record minted before roles existed.
    pub role: Role,
    /// §8: empty = the whole org; ids in mint order.
    pub workspaces: Vec<String>,
    /// §11; `None` = no limit.
    pub rate_limit: Option<RateLimit>,
}

impl KeyRecord {
    /// Not revoked and not expired at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: DateTime<Utc>,
    /// `org-key:<prefix>`, `session:<user_id>` or `cli:<os user>`.
    pub actor: String,
    /// `mint`, `revoke` or `rotate`.
    pub action: String,
    pub key_id: String,
    pub prefix: String,
    pub name: Option<String>,
    pub client: Option<String>,
    pub user_agent: Option<String>,
    /// The minted key's scope (`mint` and `rotate` entries; `None` otherwise).
    pub role: Option<Role>,
    pub workspaces: Vec<String>,
    /// `rotate`: the successor's id.
    pub new_key_id: Option<String>,
}

/// A store failure; the text is for logs only, never for clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Unavailable(String),
    #[error("key store call timed out after {0:?}")]
    Timeout(std::time::Duration),
}

/// Result of an atomic mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintOutcome {
    Minted {
        /// Live keys after this mint.
        live: u64,
    },
    /// `ceiling` was given and the tenant already has that many live keys.
    CeilingReached,
}

/// What the revocation feed tells the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// The feed (re)connected: from now on revocations are delivered.
    Connected,
    /// A key was revoked (by any keygate sharing the store).
    Revoked(KeyHash),
    /// A key's `expires_at` changed (a rotation, §9): re-check it now.
    Changed(KeyHash),
    /// The feed lost its connection: revocations may be missed until `Connected`.
    Lost,
}

/// One key's window in a rate-limit coordination call (contract §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateSync {
    pub key_id: String,
    /// The window's start, unix seconds (part of the counter's name).
    pub window_start_s: u64,
    pub limit: u64,
    /// Let through by this instance without a reservation (store was
    /// unreachable): added whatever the total.
    pub add: u64,
    /// Further requests this instance wants to reserve; granted only up to
    /// what is left of `limit`.
    pub ask: u64,
    /// Counter lifetime from now (the window's end plus a margin).
    pub ttl_ms: u64,
}

/// The store's answer for one [`RateSync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    /// Reserved for this instance by this call (≤ `ask`).
    pub granted: u64,
    /// Reserved by every instance in the window, after this call.
    pub total: u64,
}

/// The configured store (enum dispatch: no boxing on the hot path).
#[derive(Clone)]
pub enum Store {
    Memory(Arc<memory::MemoryStore>),
    Redis(Arc<redis::RedisStore>),
}

mod lifecycle;
pub mod memory;
pub mod redis;

pub use lifecycle::{KeyState, RotateOp, UsageDelta, UsageHour};

impl Store {
    /// A fresh in-memory store for tenant `slug`.
    pub fn memory(slug: &str) -> Store {
        Store::Memory(Arc::new(memory::MemoryStore::new(slug)))
    }

    /// Build the configured store for tenant `slug`. Does not fail when the
    /// server is down (keygate must start and recover by itself); it fails only
    /// for an unusable configuration. Use [`Store::ping`] to check reachability.
    pub fn from_config(config: &StoreConfig, slug: &str) -> Result<Store, StoreError> {
        match &config.backend {
            StoreBackend::Memory => Ok(Store::memory(slug)),
            StoreBackend::Redis(target) => Ok(Store::Redis(Arc::new(redis::RedisStore::new(
                target,
                slug,
                config.timeout,
            )?))),
        }
    }

    /// `"memory"` or `"redis"` (for logs and readiness bodies).
    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// Look a key up by token hash (the record even if revoked/expired, or None).
    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.lookup(hash)),
            Store::Redis(r) => r.lookup(hash).await,
        }
    }

    /// Atomically store a new key (and its audit entry); with `ceiling`, refuse
    /// when the tenant already has that many live keys.
    pub async fn mint(
        &self,
        hash: &KeyHash,
        record: &KeyRecord,
        ceiling: Option<u32>,
        audit: &AuditEntry,
    ) -> Result<MintOutcome, StoreError> {
        match self {
            Store::Memory(m) => m.mint(hash, record, ceiling, audit),
            Store::Redis(r) => r.mint(hash, record, ceiling, audit).await,
        }
    }

    /// Live keys (unrevoked, unexpired), newest first.
    pub async fn list_live(&self) -> Result<Vec<KeyRecord>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.list_live()),
            Store::Redis(r) => r.list_live().await,
        }
    }

    /// Atomically mark the live key `id` revoked, append the audit entry and
    /// publish the revocation on the feed. `Ok(None)`: no live key with that id
    /// (unknown, already revoked, or expired).
    ///
    /// `Ok(Some(_))` means the revocation is committed, even when its
    /// publication failed: that failure is logged, not returned (an error
    /// would report a failure for a revoked key, and a retry would get
    /// `Ok(None)`). Other instances then refuse the key when they next
    /// re-check it against the store (within a second while their feed is
    /// down, else after `auth.cache_ttl`), not within the feed's bound.
    pub async fn revoke(
        &self,
        id: &str,
        at: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> Result<Option<KeyHash>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.revoke(id, at, audit)),
            Store::Redis(r) => r.revoke(id, at, audit).await,
        }
    }

    /// Write-behind of `last_used_at` (batched; best effort). Unknown hashes
    /// are skipped; a stored value is only ever moved forward.
    pub async fn touch(&self, updates: &[(KeyHash, DateTime<Utc>)]) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.touch(updates);
                Ok(())
            }
            Store::Redis(r) => r.touch(updates).await,
        }
    }

    /// Audit entries, oldest first, at or after `since`.
    pub async fn audit(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.audit(since)),
            Store::Redis(r) => r.audit(since).await,
        }
    }

    /// Rate-limit coordination (§11): for each item, add `add`, reserve up
    /// to `ask` of what is left of `limit`, and read the window's total;
    /// one round trip (per 512 keys) on Redis.
    pub async fn rate_sync(&self, items: &[RateSync]) -> Result<Vec<RateGrant>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.rate_sync(items)),
            Store::Redis(r) => r.rate_sync(items).await,
        }
    }

    /// Round-trip to the store (readiness, CLI pre-flight).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.ping().await,
        }
    }

    /// Start the revocation feed task: it sends `Connected` once subscribed,
    /// `Revoked` per revocation, `Lost` when the subscription drops, and keeps
    /// reconnecting (with back-off) until `events` is closed.
    ///
    /// Must be called inside a tokio runtime.
    pub fn spawn_revocation_feed(&self, events: mpsc::UnboundedSender<FeedEvent>) {
        match self {
            Store::Memory(m) => m.spawn_revocation_feed(events),
            Store::Redis(r) => r.spawn_revocation_feed(events),
        }
    }
}
