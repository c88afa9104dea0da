//! The proof of a successful key check. Only `auth` can make one; `forward`
//! requires one to inject the principal header.

use std::sync::Arc;

use http::HeaderValue;

#[derive(Clone)]
pub struct Principal {
    key_id: Arc<str>,
    prefix: Arc<str>,
    header: HeaderValue,
}

impl Principal {
    pub(crate) fn new(key_id: &str, prefix: &str) -> Principal {
        let header = HeaderValue::from_str(&format!("org-key:{key_id}"))
            .unwrap_or_else(|_| HeaderValue::from_static("org-key:invalid"));
        Principal {
            key_id: key_id.into(),
            prefix: prefix.into(),
            header,
        }
    }
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
    /// The first 12 characters of the token (safe to show and log).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `org-key:<key id>`, the value of the principal header.
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.key_id)
            .field("prefix", &self.prefix)
            .finish()
    }
}
