//! Rotation (§9) and usage buckets (§10) in Redis.
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `keygate:{acme}:key:<sha256 hex>` field `rotated_to` | HASH field | the successor's id once the key was rotated (the rotation script's compare-and-set) |
//! | `keygate:{acme}:usage:<id>:<hour>` | HASH | `requests`, `refused` of key `<id>` in UTC hour `<hour>` (hours since the epoch); `EXPIREAT` the hour's end + `keys.usage_retention` |
//! | `keygate:{acme}:usage-batch:<marker>` | STRING | a usage batch already added (`EX` one day), so a retried flush is not counted twice |
//!
//! The "expiry changed" message on the revocation channel is
//! `expiry:<sha256 hex>` (a revocation is the bare hex).

use std::collections::HashMap;
use std::time::Duration;

use ::redis as rds;
use chrono::{DateTime, Utc};

use super::records::{audit_fields, parse_record, record_fields, rfc3339, Keys};
use super::{RedisStore, AUDIT_MAXLEN};
use crate::auth::store::{KeyState, RotateOp, StoreError, UsageDelta, UsageHour};
use crate::auth::token::KeyHash;

/// Prefix of an "expiry changed" message on the revocation channel.
pub(super) const CHANGED_PREFIX: &str = "expiry:";
/// Buckets per usage script call.
const USAGE_BATCH: usize = 256;
/// How long a usage batch marker is kept (a retry later than this would add twice).
const MARKER_TTL_SECS: u64 = 86_400;
/// Hours read per pipeline by `usage`.
const USAGE_READ_BATCH: usize = 1000;

impl Keys {
    pub(super) fn usage(&self, id: &str, hour: i64) -> String {
        format!("{}usage:{id}:{hour}", self.base)
    }
    pub(super) fn usage_marker(&self, marker: &str) -> String {
        format!("{}usage-batch:{marker}", self.base)
    }
}

impl RedisStore {
    pub async fn lookup_id(&self, id: &str) -> Result<Option<KeyState>, StoreError> {
        let id_key = self.keys.id(id);
        let hex: Option<String> = self
            .call(|mut c| async move { rds::cmd("GET").arg(&id_key).query_async(&mut c).await })
            .await?;
        let Some(hex) = hex else {
            return Ok(None);
        };
        let Some(hash) = KeyHash::from_hex(&hex) else {
            return Err(StoreError::Unavailable(
                "corrupt id index in redis: not a hash".into(),
            ));
        };
        let key = self.keys.record_hex(&hex);
        let map: HashMap<String, String> = self
            .call(|mut c| async move { rds::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        let record = parse_record(&map)?;
        Ok(Some(KeyState {
            hash,
            record,
            rotated_to: map.get("rotated_to").cloned().unwrap_or_default(),
        }))
    }

    pub async fn rotate(&self, op: &RotateOp<'_>) -> Result<Option<DateTime<Utc>>, StoreError> {
        let old_hex = op.old_hash.to_hex();
        let new_hex = op.new_hash.to_hex();
        let r = op.new_record;
        let mut inv = self.rotate.prepare();
        inv.key(self.keys.id(op.old_id))
            .key(self.keys.record_hex(&old_hex))
            .key(self.keys.live())
            .key(self.keys.expiry())
            .key(self.keys.record_hex(&new_hex))
            .key(self.keys.id(&r.id))
            .key(self.keys.audit())
            .key(self.keys.channel())
            .arg(op.old_id)
            .arg(&old_hex)
            .arg(Utc::now().timestamp_millis())
            .arg(op.grace_end.timestamp_millis())
            .arg(rfc3339(&op.grace_end))
            .arg(op.expect_rotated_to)
            .arg(&r.id)
            .arg(&new_hex)
            .arg(r.created_at.timestamp_millis())
            .arg(
                r.expires_at
                    .map(|e| e.timestamp_millis().to_string())
                    .unwrap_or_default(),
            )
            .arg(AUDIT_MAXLEN)
            .arg(self.publish_command())
            .arg(format!("{CHANGED_PREFIX}{old_hex}"));
        let fields = record_fields(r);
        inv.arg(fields.len() * 2);
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        for (f, v) in audit_fields(op.audit) {
            inv.arg(f).arg(v);
        }
        let rotated: Option<(String, i64, String)> = self.eval(inv).await?;
        let Some((old_expires, published, why)) = rotated else {
            return Ok(None);
        };
        if published != 1 {
            tracing::error!(
                redis = %self.location,
                error = %why,
                "key rotated, but the expiry change could not be published to other instances"
            );
        }
        let t = DateTime::parse_from_rfc3339(&old_expires)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                StoreError::Unavailable("corrupt record in redis: bad expires_at".into())
            })?;
        Ok(Some(t))
    }

    pub async fn add_usage(
        &self,
        marker: &str,
        deltas: &[UsageDelta],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 4);
        for (i, chunk) in deltas.chunks(USAGE_BATCH).enumerate() {
            let mut inv = self.usage_add.prepare();
            inv.key(self.keys.usage_marker(&format!("{marker}:{i}")))
                .arg(MARKER_TTL_SECS);
            for d in chunk {
                let end = d.hour.saturating_add(1).saturating_mul(3600);
                inv.key(self.keys.usage(&d.key_id, d.hour))
                    .arg(d.requests)
                    .arg(d.refused)
                    .arg(end.saturating_add(retention).min(i64::MAX / 2));
            }
            let _: i64 = self.eval(inv).await?;
        }
        Ok(())
    }

    pub async fn usage(&self, id: &str, from: i64, to: i64) -> Result<Vec<UsageHour>, StoreError> {
        let hours: Vec<i64> = (from..=to).collect();
        let mut out = Vec::new();
        for chunk in hours.chunks(USAGE_READ_BATCH) {
            let values: Vec<(Option<u64>, Option<u64>)> = self
                .call(|mut c| async move {
                    let mut pipe = rds::pipe();
                    for h in chunk {
                        pipe.cmd("HMGET")
                            .arg(self.keys.usage(id, *h))
                            .arg("requests")
                            .arg("refused");
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            for (h, (req, refused)) in chunk.iter().zip(values) {
                let (req, refused) = (req.unwrap_or(0), refused.unwrap_or(0));
                if req > 0 || refused > 0 {
                    out.push(UsageHour {
                        hour: *h,
                        requests: req,
                        refused,
                    });
                }
            }
        }
        Ok(out)
    }
}
