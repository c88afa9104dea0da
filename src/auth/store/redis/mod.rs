//! Redis store.
//!
//! # Data layout
//!
//! Every key name carries the tenant's hash tag `{<slug>}`, so all records of
//! one tenant live in one Redis Cluster slot: mint and revoke stay atomic on a
//! cluster, and one shard's failure only affects the tenants whose slot it
//! holds. Many tenants can share one Redis (or one cluster). For tenant `acme`:
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `keygate:{acme}:key:<sha256 hex>` | HASH | `id`, `prefix`, `name`, `created_by`, `created_at`, `expires_at`, `last_used_at`, `revoked_at` (timestamps RFC 3339 UTC with nanoseconds; absent = empty string), `role`, `workspaces` (ids joined by `,`), `rate_limit` (`N/unit`); a record without the last three (minted before them) reads as `admin`, no workspaces, no limit |
//! | `keygate:{acme}:id:<id>` | STRING | the key's SHA-256 hex (id index, for revoke) |
//! | `keygate:{acme}:live` | ZSET | ids of live keys, scored by `created_at` (ms); newest first for listing, `ZCARD` for the mint ceiling |
//! | `keygate:{acme}:expiry` | ZSET | ids of live keys that have an `expires_at`, scored by it (ms); the mint script prunes expired ids from both sets before counting |
//! | `keygate:{acme}:audit` | STREAM | one entry per mint/revoke (`XADD MAXLEN ~ 100000`), fields `time`, `actor`, `action`, `key_id`, `prefix`, `name`, `client`, `user_agent`, and on mint/rotate entries `role`, `workspaces` (and `new_key_id` on a rotation) |
//! | `keygate:{acme}:rl:<id>:<window start s>` | STRING | §11: requests of key `<id>` reserved by every instance in that window (`INCRBY` from a script, `PEXPIRE` to the window's end + 10 s) |
//! | `keygate:{acme}:revoked` | pub/sub channel | message = SHA-256 hex of each revoked key (`PUBLISH`; `SPUBLISH` on a cluster) |
//!
//! Only SHA-256 hashes of tokens reach Redis, never a plaintext token.
//!
//! Mint is one Lua script (prune expired ids, ceiling check, `HSET` record,
//! `SET` id index, `ZADD` live/expiry, `XADD` audit). Revoke is one Lua script
//! (check the key is live, set `revoked_at`, `ZREM` live/expiry, `XADD` audit,
//! publish the hash), so a revocation and its publication are atomic: no
//! other keygate can observe the key revoked in Redis without the message
//! having been published. The publication comes last and is `redis.pcall`ed:
//! if Redis refuses it (e.g. an ACL without channel rights), the revocation
//! stays committed and `revoke` still succeeds, with an error in the log (the
//! script reports it). Other instances then learn of the revocation only from
//! the store: within a second if their feed is down (it is when channel
//! rights are missing, since the subscription is refused too), otherwise at
//! their next re-check of the key (`auth.cache_ttl`). `touch` is a script that
//! only moves `last_used_at` forward on records that exist.
//!
//! # Scripts and routing
//!
//! Every script runs through `RedisStore::eval`: `EVALSHA`, and on
//! `NOSCRIPT` `EVAL` with the body (see `LuaCall::invoke` for why not the
//! redis crate's `SCRIPT LOAD` fallback). Redis neither persists nor
//! replicates its script cache, so every restart of the tenant's master and
//! every promotion of a replica empties it; a new script needs nothing more
//! than to be a `Lua` to survive that.
//!
//! Every command names a key of the tenant (the first key of a script, the
//! key of a plain command), so a cluster client sends it to the tenant's
//! shard alone and follows `MOVED`/`ASK` and waits out `TRYAGAIN`,
//! `CLUSTERDOWN`, `LOADING` and `MASTERDOWN` by itself (redis 1.x retries
//! those within its response timeout, which is `store.timeout`). Do not add
//! a command without a key (`SCRIPT LOAD`, `PING`, `INFO`...) on a cluster:
//! the cluster client fans it out to every node, which ties the tenant to
//! other shards and, in redis 1.8, can leave the fan-out waiting for an
//! unrelated wake-up of the connection.
//!
//! # Connections
//!
//! Nothing connects at construction: keygate starts while Redis is down and
//! recovers by itself. Standalone uses [`ConnectionManager`] (lazy, one
//! shared connect attempt at a time, reconnect after an I/O error). Cluster
//! and Sentinel keep one connection in a slot filled on the first successful
//! connect (the slot's lock makes at most one connect attempt in flight); the
//! Sentinel slot is emptied on a connection or `READONLY` error, so the next
//! call asks the sentinels for the current master. Every call is bounded by
//! `store.timeout`.
//!
//! # Revocation feed: why pub/sub
//!
//! The feed is a dedicated pub/sub connection (sharded pub/sub on a cluster).
//! Pub/sub is fire-and-forget: a message published while a subscriber is
//! disconnected is lost. That is acceptable here because the feed reports its
//! own loss (`FeedEvent::Lost`, on connection end or a failed liveness ping
//! every second) and the cache then distrusts every entry validated before
//! the loss, re-checking the store (contract §4). Against the alternatives:
//! a Stream would let a subscriber replay missed revocations, but needs a
//! per-instance read position and trimming, and the cache must re-check on a
//! reconnect anyway (the stream may have been trimmed or the master failed
//! over without replicating the tail); RESP3 client-side caching invalidation
//! tracks keys read on *that* connection, ties the cache to the redis crate's
//! connection life cycle and is not available through Sentinel/Cluster in the
//! same way. Pub/sub delivers in well under a millisecond on a LAN, needs no
//! state in Redis, and works identically on standalone, Sentinel and Cluster.
//!
//! On a cluster the feed uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`,
//! Redis ≥ 7): the channel carries the tenant's hash tag, so it lives on the
//! shard that holds the tenant's data; a message is not broadcast to every
//! node (plain `PUBLISH` on a cluster is, which costs every node's bandwidth
//! for every tenant), and a failover of that shard drops the subscription,
//! which the feed reports as `Lost`.

mod conn;
mod feed;
mod lifecycle;
mod lua;
mod ratelimit;
mod records;

use std::collections::HashMap;
use std::time::Duration;

use ::redis as rds;
use chrono::{DateTime, Utc};

use super::{AuditEntry, FeedEvent, KeyRecord, MintOutcome, StoreError};
use crate::auth::token::KeyHash;
use conn::{Conn, Target};
use lua::Lua;
use records::{audit_fields, opt_rfc3339, parse_audit, parse_record, record_fields, rfc3339, Keys};

/// Cap on the audit stream (`XADD MAXLEN ~`).
pub(super) const AUDIT_MAXLEN: u32 = 100_000;
/// Records per `touch` script invocation.
const TOUCH_BATCH: usize = 256;
/// `audit(since)` reads stream ids from this long before `since` and filters
/// on the `time` field, so clock skew between keygate and Redis loses nothing.
const AUDIT_SKEW: i64 = 60_000;

/// The Redis-backed key store of one tenant. See the module docs for the layout.
pub struct RedisStore {
    keys: Keys,
    timeout: Duration,
    target: Target,
    /// `host:port` (or a list) for error texts; never a URL or a password.
    location: String,
    /// Passwords from the configured URLs, scrubbed from any error text.
    secrets: Vec<String>,
    mint: Lua,
    revoke: Lua,
    touch: Lua,
    rotate: Lua,
    usage_add: Lua,
    ratelimit: Lua,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("tenant_keys", &self.keys.base)
            .field("location", &self.location)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let key = self.keys.record(hash);
        let map: HashMap<String, String> = self
            .call(|mut c| async move { rds::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        parse_record(&map).map(Some)
    }

    pub async fn mint(
        &self,
        hash: &KeyHash,
        record: &KeyRecord,
        ceiling: Option<u32>,
        audit: &AuditEntry,
    ) -> Result<MintOutcome, StoreError> {
        let hex = hash.to_hex();
        let now_ms = Utc::now().timestamp_millis();
        let mut inv = self.mint.prepare();
        inv.key(self.keys.record_hex(&hex))
            .key(self.keys.id(&record.id))
            .key(self.keys.live())
            .key(self.keys.expiry())
            .key(self.keys.audit())
            .arg(&hex)
            .arg(ceiling.map(|c| c.to_string()).unwrap_or_default())
            .arg(now_ms)
            .arg(record.created_at.timestamp_millis())
            .arg(
                record
                    .expires_at
                    .map(|e| e.timestamp_millis().to_string())
                    .unwrap_or_default(),
            )
            .arg(AUDIT_MAXLEN)
            .arg(&record.id)
            .arg(opt_rfc3339(&record.revoked_at));
        let fields = record_fields(record);
        inv.arg(fields.len() * 2);
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        for (f, v) in audit_fields(audit) {
            inv.arg(f).arg(v);
        }
        let (minted, live): (i64, u64) = self.eval(inv).await?;
        Ok(if minted == 1 {
            MintOutcome::Minted { live }
        } else {
            MintOutcome::CeilingReached
        })
    }

    pub async fn list_live(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let live = self.keys.live();
        let records: Vec<HashMap<String, String>> = self
            .call(|mut c| async move {
                let ids: Vec<String> = rds::cmd("ZREVRANGE")
                    .arg(&live)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let id_keys: Vec<String> = ids.iter().map(|id| self.keys.id(id)).collect();
                let hashes: Vec<Option<String>> =
                    rds::cmd("MGET").arg(&id_keys).query_async(&mut c).await?;
                let mut pipe = rds::pipe();
                for h in hashes.iter().flatten() {
                    pipe.cmd("HGETALL").arg(self.keys.record_hex(h));
                }
                pipe.query_async(&mut c).await
            })
            .await?;
        let now = Utc::now();
        let mut out = Vec::with_capacity(records.len());
        for map in records.iter().filter(|m| !m.is_empty()) {
            let r = parse_record(map)?;
            if r.is_live(now) {
                out.push(r);
            }
        }
        // ZREVRANGE already orders by created_at; keep ties deterministic.
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    pub async fn revoke(
        &self,
        id: &str,
        at: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> Result<Option<KeyHash>, StoreError> {
        let id_key = self.keys.id(id);
        let hex: Option<String> = {
            let id_key = id_key.clone();
            self.call(|mut c| async move { rds::cmd("GET").arg(&id_key).query_async(&mut c).await })
                .await?
        };
        let Some(hex) = hex else {
            return Ok(None);
        };
        let Some(hash) = KeyHash::from_hex(&hex) else {
            return Err(StoreError::Unavailable(
                "corrupt id index in redis: not a hash".into(),
            ));
        };
        let mut inv = self.revoke.prepare();
        inv.key(id_key)
            .key(self.keys.record_hex(&hex))
            .key(self.keys.live())
            .key(self.keys.expiry())
            .key(self.keys.audit())
            .key(self.keys.channel())
            .arg(id)
            .arg(&hex)
            .arg(rfc3339(&at))
            .arg(Utc::now().timestamp_millis())
            .arg(AUDIT_MAXLEN)
            .arg(self.publish_command());
        for (f, v) in audit_fields(audit) {
            inv.arg(f).arg(v);
        }
        let revoked: Option<(String, i64, String)> = self.eval(inv).await?;
        let Some((_, published, why)) = revoked else {
            return Ok(None);
        };
        if published != 1 {
            tracing::error!(
                redis = %self.location,
                error = %why,
                "key revoked, but the revocation could not be published to other instances"
            );
        }
        Ok(Some(hash))
    }

    pub async fn touch(&self, updates: &[(KeyHash, DateTime<Utc>)]) -> Result<(), StoreError> {
        for chunk in updates.chunks(TOUCH_BATCH) {
            let mut inv = self.touch.prepare();
            for (hash, at) in chunk {
                inv.key(self.keys.record(hash)).arg(rfc3339(at));
            }
            let _: i64 = self.eval(inv).await?;
        }
        Ok(())
    }

    pub async fn audit(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>, StoreError> {
        let start = match since {
            Some(s) => (s.timestamp_millis() - AUDIT_SKEW).max(0).to_string(),
            None => "-".to_string(),
        };
        let key = self.keys.audit();
        let entries: Vec<(String, HashMap<String, String>)> = self
            .call(|mut c| async move {
                rds::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (_, fields) in &entries {
            let e = parse_audit(fields)?;
            if since.is_none_or(|s| e.time >= s) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self
            .call(|mut c| async move {
                match c {
                    // PING without a key has no slot; ask the tenant's shard.
                    Conn::Cluster(_) => {
                        rds::cmd("EXISTS")
                            .arg(self.keys.live())
                            .query_async::<i64>(&mut c)
                            .await?;
                        Ok("PONG".to_string())
                    }
                    Conn::Manager(_) | Conn::Single(_) => {
                        rds::cmd("PING").query_async(&mut c).await
                    }
                }
            })
            .await?;
        Ok(())
    }
}
