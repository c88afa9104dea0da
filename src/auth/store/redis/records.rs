//! Key names of one tenant and the encoding of records and audit entries in
//! Redis hashes and stream entries.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::time::rfc3339_nanos;

use super::{AuditEntry, KeyRecord, StoreError};
use crate::auth::scope::{check_workspaces, join_workspaces, split_workspaces, Role};
use crate::auth::token::KeyHash;
use crate::config::RateLimit;

/// Key names of one tenant.
pub(super) struct Keys {
    /// `keygate:{<slug>}:`
    pub(super) base: String,
}

impl Keys {
    pub(super) fn new(slug: &str) -> Keys {
        Keys {
            base: format!("keygate:{{{slug}}}:"),
        }
    }
    pub(super) fn record(&self, hash: &KeyHash) -> String {
        format!("{}key:{}", self.base, hash.to_hex())
    }
    pub(super) fn record_hex(&self, hex: &str) -> String {
        format!("{}key:{hex}", self.base)
    }
    pub(super) fn id(&self, id: &str) -> String {
        format!("{}id:{id}", self.base)
    }
    pub(super) fn live(&self) -> String {
        format!("{}live", self.base)
    }
    pub(super) fn expiry(&self) -> String {
        format!("{}expiry", self.base)
    }
    pub(super) fn audit(&self) -> String {
        format!("{}audit", self.base)
    }
    /// §11: the reservations of key `id` in the window starting at `start_s`.
    pub(super) fn rate(&self, id: &str, start_s: u64) -> String {
        format!("{}rl:{id}:{start_s}", self.base)
    }
    pub(super) fn channel(&self) -> String {
        format!("{}revoked", self.base)
    }
}

/// Timestamps are stored with nanoseconds (see [`crate::time`]).
pub(super) fn rfc3339(t: &DateTime<Utc>) -> String {
    rfc3339_nanos(t)
}

pub(super) fn opt_rfc3339(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map(rfc3339).unwrap_or_default()
}

pub(super) fn parse_time(field: &str, v: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Unavailable(format!("corrupt record in redis: bad {field}")))
}

pub(super) fn parse_opt_time(
    field: &str,
    v: Option<&String>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    match v.map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => parse_time(field, s).map(Some),
    }
}

fn non_empty(v: Option<&String>) -> Option<String> {
    v.filter(|s| !s.is_empty()).cloned()
}

/// A record's hash fields, as `HSET` writes them (mint, rotate). Fields
/// added after the first release (`role`, `workspaces`, `rate_limit`) are
/// read back with a default when absent, so older records need no migration.
pub(super) fn record_fields(r: &KeyRecord) -> Vec<(&'static str, String)> {
    vec![
        ("id", r.id.clone()),
        ("prefix", r.prefix.clone()),
        ("name", r.name.clone().unwrap_or_default()),
        ("created_by", r.created_by.clone()),
        ("created_at", rfc3339(&r.created_at)),
        ("expires_at", opt_rfc3339(&r.expires_at)),
        ("last_used_at", opt_rfc3339(&r.last_used_at)),
        ("revoked_at", opt_rfc3339(&r.revoked_at)),
        ("role", r.role.as_str().to_string()),
        ("workspaces", join_workspaces(&r.workspaces)),
        (
            "rate_limit",
            r.rate_limit.map(|l| l.to_string()).unwrap_or_default(),
        ),
    ]
}

pub(super) fn parse_record(map: &HashMap<String, String>) -> Result<KeyRecord, StoreError> {
    let get = |f: &str| {
        map.get(f)
            .cloned()
            .ok_or_else(|| StoreError::Unavailable(format!("corrupt record in redis: no {f}")))
    };
    let corrupt = |f: &str| StoreError::Unavailable(format!("corrupt record in redis: bad {f}"));
    let role = match map.get("role").map(String::as_str) {
        None | Some("") => Role::Admin,
        Some(s) => Role::parse(s).ok_or_else(|| corrupt("role"))?,
    };
    let workspaces = split_workspaces(map.get("workspaces").map_or("", String::as_str));
    check_workspaces(&workspaces).map_err(|_| corrupt("workspaces"))?;
    let rate_limit = match map.get("rate_limit").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(RateLimit::parse(s).map_err(|_| corrupt("rate_limit"))?),
    };
    Ok(KeyRecord {
        id: get("id")?,
        prefix: get("prefix")?,
        name: non_empty(map.get("name")),
        created_by: get("created_by")?,
        created_at: parse_time("created_at", &get("created_at")?)?,
        expires_at: parse_opt_time("expires_at", map.get("expires_at"))?,
        last_used_at: parse_opt_time("last_used_at", map.get("last_used_at"))?,
        revoked_at: parse_opt_time("revoked_at", map.get("revoked_at"))?,
        role,
        workspaces,
        rate_limit,
    })
}

pub(super) fn parse_audit(map: &HashMap<String, String>) -> Result<AuditEntry, StoreError> {
    let get = |f: &str| map.get(f).cloned().unwrap_or_default();
    Ok(AuditEntry {
        time: parse_time("audit time", &get("time"))?,
        actor: get("actor"),
        action: get("action"),
        key_id: get("key_id"),
        prefix: get("prefix"),
        name: non_empty(map.get("name")),
        client: non_empty(map.get("client")),
        user_agent: non_empty(map.get("user_agent")),
        role: map.get("role").and_then(|s| Role::parse(s)),
        workspaces: split_workspaces(map.get("workspaces").map_or("", String::as_str)),
        new_key_id: non_empty(map.get("new_key_id")),
    })
}

/// An audit entry's stream fields (`XADD`). `role`/`workspaces` only on
/// entries that carry a scope, `new_key_id` only on rotations.
pub(super) fn audit_fields(a: &AuditEntry) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("time", rfc3339(&a.time)),
        ("actor", a.actor.clone()),
        ("action", a.action.clone()),
        ("key_id", a.key_id.clone()),
        ("prefix", a.prefix.clone()),
        ("name", a.name.clone().unwrap_or_default()),
        ("client", a.client.clone().unwrap_or_default()),
        ("user_agent", a.user_agent.clone().unwrap_or_default()),
    ];
    if let Some(role) = a.role {
        f.push(("role", role.as_str().to_string()));
        f.push(("workspaces", join_workspaces(&a.workspaces)));
    }
    if let Some(id) = &a.new_key_id {
        f.push(("new_key_id", id.clone()));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_carry_the_tenant_hash_tag() {
        let k = Keys::new("acme");
        let h = KeyHash([0xab; 32]);
        assert_eq!(
            k.record(&h),
            format!("keygate:{{acme}}:key:{}", "ab".repeat(32))
        );
        assert_eq!(k.id("x1"), "keygate:{acme}:id:x1");
        assert_eq!(k.live(), "keygate:{acme}:live");
        assert_eq!(k.audit(), "keygate:{acme}:audit");
        assert_eq!(k.channel(), "keygate:{acme}:revoked");
    }

    #[test]
    fn timestamps_round_trip_and_sort_as_strings() {
        let a = Utc::now();
        let b = a + chrono::TimeDelta::nanoseconds(1);
        assert_eq!(parse_time("t", &rfc3339(&a)).unwrap(), a);
        assert!(rfc3339(&a) < rfc3339(&b));
    }
}
