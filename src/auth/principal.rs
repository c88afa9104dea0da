//! The proof of a successful key check. Only `auth` can make one; `forward`
//! requires one to inject the principal header.
//!
//! One `Arc` inside: cloning a `Principal` out of the cache on every hit is a
//! single atomic increment, never an allocation. It carries the key's scope
//! (§8) and rate limit (§11), so forwarding and the checks read them from the
//! proof itself, never from anything a client sent.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::HeaderValue;

use super::scope::{join_workspaces, Role};
use super::store::KeyRecord;
use super::token::KeyHash;
use crate::config::RateLimit;

#[derive(Clone)]
pub struct Principal(Arc<Inner>);

struct Inner {
    hash: KeyHash,
    key_id: Box<str>,
    prefix: Box<str>,
    expires_at: Option<DateTime<Utc>>,
    header: HeaderValue,
    role: Role,
    workspaces: Box<[Box<str>]>,
    /// `<id>,<id>` for a bound key (ids in mint order).
    workspaces_header: Option<HeaderValue>,
    rate_limit: Option<RateLimit>,
}

impl Principal {
    #[cfg(test)]
    pub(crate) fn new(key_id: &str, prefix: &str) -> Principal {
        Principal::with_scope(key_id, prefix, Role::Admin, &[])
    }

    /// A proof for tests of the scope check and forwarding.
    #[doc(hidden)]
    pub fn with_scope(key_id: &str, prefix: &str, role: Role, workspaces: &[&str]) -> Principal {
        let record = KeyRecord {
            id: key_id.into(),
            prefix: prefix.into(),
            name: None,
            created_by: String::new(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            expires_at: None,
            last_used_at: None,
            revoked_at: None,
            role,
            workspaces: workspaces.iter().map(|w| w.to_string()).collect(),
            rate_limit: None,
        };
        Principal::of(KeyHash([0; 32]), &record)
    }

    /// The proof for the key whose token hashes to `hash`.
    pub(crate) fn of(hash: KeyHash, record: &KeyRecord) -> Principal {
        let header = HeaderValue::from_str(&format!("org-key:{}", record.id))
            .unwrap_or_else(|_| HeaderValue::from_static("org-key:invalid"));
        // Ids are validated at mint ([A-Za-z0-9_-]), so the joined form is a
        // valid header value; a record that is not is refused when parsed.
        let workspaces_header = (!record.workspaces.is_empty())
            .then(|| HeaderValue::from_str(&join_workspaces(&record.workspaces)).ok())
            .flatten();
        Principal(Arc::new(Inner {
            hash,
            key_id: record.id.as_str().into(),
            prefix: record.prefix.as_str().into(),
            expires_at: record.expires_at,
            header,
            role: record.role,
            workspaces: record
                .workspaces
                .iter()
                .map(|w| w.as_str().into())
                .collect(),
            workspaces_header,
            rate_limit: record.rate_limit,
        }))
    }

    /// SHA-256 of the token (what revocations name).
    pub(crate) fn hash(&self) -> &KeyHash {
        &self.0.hash
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.0.expires_at
    }
    pub fn key_id(&self) -> &str {
        &self.0.key_id
    }
    /// The first 12 characters of the token (safe to show and log).
    pub fn prefix(&self) -> &str {
        &self.0.prefix
    }
    /// `org-key:<key id>`, the value of the principal header.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0.header
    }
    pub fn role(&self) -> Role {
        self.0.role
    }
    /// The workspaces the key is bound to; empty = the whole org.
    pub fn workspaces(&self) -> &[Box<str>] {
        &self.0.workspaces
    }
    /// The value of `auth.workspaces_header` (bound keys only).
    pub fn workspaces_header(&self) -> Option<&HeaderValue> {
        self.0.workspaces_header.as_ref()
    }
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.0.rate_limit
    }
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.key_id())
            .field("prefix", &self.prefix())
            .field("role", &self.role())
            .field("workspaces", &self.workspaces())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_debug() {
        let p = Principal::new("k_abc", "mok_12345678");
        assert_eq!(p.header_value(), "org-key:k_abc");
        assert_eq!(p.key_id(), "k_abc");
        assert_eq!(p.prefix(), "mok_12345678");
        let d = format!("{p:?}");
        assert!(d.contains("k_abc") && d.contains("mok_12345678"), "{d}");
    }

    #[test]
    fn unrepresentable_id_gets_a_placeholder_header() {
        let p = Principal::new("bad\nid", "mok_");
        assert_eq!(p.header_value(), "org-key:invalid");
    }
}
