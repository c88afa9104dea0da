//! Stage 4: the credential. [`credential`] parses `Authorization` (pure),
//! [`token`] checks a token's format and checksum (pure, no store look-up for a
//! mistyped token), [`Authenticator`] validates well-formed org keys against
//! the local cache and the store, and yields a [`Principal`] — the proof that
//! `forward` requires for a key-authenticated request.
//!
//! OWNER: store helper (this file, cache.rs, store/, principal.rs);
//! gate helper (credential.rs, token.rs).

pub mod cache;
pub mod credential;
pub mod principal;
pub mod store;
pub mod token;

use std::sync::Arc;

use chrono::{DateTime, Utc};

pub use principal::Principal;
use store::{AuditEntry, KeyRecord, Store, StoreError};
use token::Token;

use crate::config::Config;
use crate::metrics::Metrics;

/// Why a well-formed org key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown, revoked, expired, or another tenant's: the client gets the same 401.
    Invalid,
    /// The store could not answer in time and the cache may not be used.
    StoreUnavailable,
}

/// Validates org keys: cache first, store on a miss (single-flight), revocation
/// feed keeps the cache honest.
pub struct Authenticator {
    _private: (),
}

impl Authenticator {
    /// Build the authenticator and start its background tasks (revocation feed,
    /// last-used write-behind) on the current runtime.
    pub fn start(_config: &Config, _store: Store, _metrics: Arc<Metrics>) -> Arc<Authenticator> {
        todo!("store helper")
    }

    /// Validate a token whose format and checksum already passed
    /// ([`token::check_format`]).
    pub async fn authenticate(&self, _token: &str) -> Result<Principal, AuthError> {
        todo!("store helper")
    }

    /// The key management operations (API and CLI) share the cache so that a
    /// revoke served here is effective for the very next request.
    pub fn keys(&self) -> &KeyService {
        todo!("store helper")
    }

    /// Readiness: `(store_ok, feed_live)`.
    pub async fn readiness(&self) -> (bool, bool) {
        todo!("store helper")
    }
}

/// Who performs a key operation: `org-key:<prefix>`, `session:<user_id>`, `cli:<os user>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Context of a key operation for the audit trail.
#[derive(Debug, Clone)]
pub struct OpContext {
    pub actor: Actor,
    pub client: Option<String>,
    pub user_agent: Option<String>,
}

pub struct MintRequest {
    pub name: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
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

/// Mint, list, revoke, audit — for `/org/tokens` and `keygate keys …`.
pub struct KeyService {
    _private: (),
}

impl KeyService {
    pub async fn mint(&self, _req: MintRequest, _ctx: &OpContext) -> Result<Minted, MintError> {
        todo!("store helper")
    }
    /// Live keys, newest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, StoreError> {
        todo!("store helper")
    }
    /// `Ok(false)`: no live key with that id.
    pub async fn revoke(&self, _id: &str, _ctx: &OpContext) -> Result<bool, StoreError> {
        todo!("store helper")
    }
    pub async fn audit(&self, _since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>, StoreError> {
        todo!("store helper")
    }
}
