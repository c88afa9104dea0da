//! Why an org key was refused. The client always gets the same 401 (§3 step
//! 4); the reason and, when the store knows it, the key id go to the access
//! log and to `keygate_key_refusals_total{reason}` so an operator can tell a
//! revoked key still in use from a typo.

use std::sync::Arc;

/// The reason an org key was refused (the access log's `refusal` field and
/// the counter's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not `Bearer <token>` exactly, the wrong length or characters.
    Malformed,
    /// The right shape, but the checksum does not match (a typo, a truncation).
    BadChecksum,
    /// Well-formed; the store has no such key.
    Unknown,
    /// The store holds the key as revoked.
    Revoked,
    /// The key's `expires_at` has passed.
    Expired,
    /// The key belongs to another tenant. Each tenant's records live under
    /// its own names, so a store answers such a key as `Unknown` unless it
    /// can tell; the label exists so dashboards and alerts can name it.
    OtherTenant,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Malformed,
        Refusal::BadChecksum,
        Refusal::Unknown,
        Refusal::Revoked,
        Refusal::Expired,
        Refusal::OtherTenant,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::BadChecksum => "bad_checksum",
            Refusal::Unknown => "unknown",
            Refusal::Revoked => "revoked",
            Refusal::Expired => "expired",
            Refusal::OtherTenant => "other_tenant",
        }
    }

    /// Position in [`Refusal::ALL`] (the counter's index).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A store's (or the cache's) verdict on a well-formed key: why, and the key
/// id when the store holds a record of it. Cloning is a reference-count
/// increment, so a cached verdict answers without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub key_id: Option<Arc<str>>,
}

impl Refused {
    pub fn malformed() -> Refused {
        Refused {
            reason: Refusal::Malformed,
            key_id: None,
        }
    }

    pub fn unknown() -> Refused {
        Refused {
            reason: Refusal::Unknown,
            key_id: None,
        }
    }

    /// The verdict on a record the store returned that is not live.
    pub fn of(record: &crate::auth::store::KeyRecord) -> Refused {
        Refused {
            reason: if record.revoked_at.is_some() {
                Refusal::Revoked
            } else {
                Refusal::Expired
            },
            key_id: Some(Arc::from(record.id.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_indexes() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "bad_checksum",
                "unknown",
                "revoked",
                "expired",
                "other_tenant"
            ]
        );
    }
}
