//! Key store. OWNER: store helper.

use chrono::{DateTime, Utc};

/// One key's metadata, as stored (the hash is the record's key, not a field here).
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: DateTime<Utc>,
    pub actor: String,
    /// `mint` or `revoke`.
    pub action: String,
    pub key_id: String,
    pub prefix: String,
    pub name: Option<String>,
    pub client: Option<String>,
    pub user_agent: Option<String>,
}

/// A store failure; the text is for logs only, never for clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    #[error("key store call timed out")]
    Timeout,
}

/// The configured store (enum dispatch: no boxing on the hot path).
#[derive(Clone)]
pub enum Store {
    Memory,
}
