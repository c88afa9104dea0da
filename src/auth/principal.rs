//! The proof of a successful key check. Only `auth` can make one; `forward`
//! requires one to inject the principal header.
//!
//! OWNER: cache helper. One `Arc` inside: cloning a `Principal` out of the
//! cache on every hit is a single atomic increment, never an allocation.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::HeaderValue;

use super::token::KeyHash;

#[derive(Clone)]
pub struct Principal(Arc<Inner>);

struct Inner {
    hash: KeyHash,
    key_id: Box<str>,
    prefix: Box<str>,
    expires_at: Option<DateTime<Utc>>,
    header: HeaderValue,
}

impl Principal {
    #[cfg(test)]
    pub(crate) fn new(key_id: &str, prefix: &str) -> Principal {
        Principal::of(KeyHash([0; 32]), key_id, prefix, None)
    }

    /// The proof for the key whose token hashes to `hash`.
    pub(crate) fn of(
        hash: KeyHash,
        key_id: &str,
        prefix: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Principal {
        let header = HeaderValue::from_str(&format!("org-key:{key_id}"))
            .unwrap_or_else(|_| HeaderValue::from_static("org-key:invalid"));
        Principal(Arc::new(Inner {
            hash,
            key_id: key_id.into(),
            prefix: prefix.into(),
            expires_at,
            header,
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
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.key_id())
            .field("prefix", &self.prefix())
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
