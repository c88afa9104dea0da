//! Redis store. OWNER: store helper.
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
//! | `keygate:{acme}:key:<sha256 hex>` | HASH | `id`, `prefix`, `name`, `created_by`, `created_at`, `expires_at`, `last_used_at`, `revoked_at` (timestamps RFC 3339 UTC with nanoseconds; absent = empty string) |
//! | `keygate:{acme}:id:<id>` | STRING | the key's SHA-256 hex (id index, for revoke) |
//! | `keygate:{acme}:live` | ZSET | ids of live keys, scored by `created_at` (ms); newest first for listing, `ZCARD` for the mint ceiling |
//! | `keygate:{acme}:expiry` | ZSET | ids of live keys that have an `expires_at`, scored by it (ms); the mint script prunes expired ids from both sets before counting |
//! | `keygate:{acme}:audit` | STREAM | one entry per mint/revoke (`XADD MAXLEN ~ 100000`), fields `time`, `actor`, `action`, `key_id`, `prefix`, `name`, `client`, `user_agent` |
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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::redis as rds;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use rds::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use rds::cluster::ClusterClient;
use rds::cluster_async::ClusterConnection;
use rds::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use rds::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, Pipeline, PushKind, RedisError, RedisFuture, RedisResult, Script,
    ServerErrorKind, ToRedisArgs, Value,
};
use tokio::sync::{mpsc, Mutex};

use super::{AuditEntry, FeedEvent, KeyRecord, MintOutcome, StoreError};
use crate::auth::token::KeyHash;
use crate::config::{RedisTarget, Secret};

/// Cap on the audit stream (`XADD MAXLEN ~`).
const AUDIT_MAXLEN: u32 = 100_000;
/// Records per `touch` script invocation.
const TOUCH_BATCH: usize = 256;
/// Feed reconnect back-off.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle feed checks that its connection is alive.
const FEED_PING_EVERY: Duration = Duration::from_secs(1);
/// Lower bound on feed connect/ping waits (a short `store.timeout` would
/// otherwise turn a briefly busy Redis into a feed loss).
const FEED_MIN_WAIT: Duration = Duration::from_secs(1);
/// `audit(since)` reads stream ids from this long before `since` and filters
/// on the `time` field, so clock skew between keygate and Redis loses nothing.
const AUDIT_SKEW: i64 = 60_000;

const MINT_LUA: &str = r#"
-- KEYS: 1 record, 2 id index, 3 live zset, 4 expiry zset, 5 audit stream
-- ARGV: 1 hash hex, 2 ceiling ('' = none), 3 now ms, 4 created_at ms,
--       5 expires_at ms ('' = never), 6 audit maxlen,
--       7..14 id prefix name created_by created_at expires_at last_used_at revoked_at,
--       15..22 audit time actor action key_id prefix name client user_agent
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('KEYGATE duplicate key id or hash')
end
local now = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
local live = redis.call('ZCARD', KEYS[3])
if ARGV[2] ~= '' and live >= tonumber(ARGV[2]) then
  return {0, live}
end
redis.call('HSET', KEYS[1], 'id', ARGV[7], 'prefix', ARGV[8], 'name', ARGV[9],
  'created_by', ARGV[10], 'created_at', ARGV[11], 'expires_at', ARGV[12],
  'last_used_at', ARGV[13], 'revoked_at', ARGV[14])
redis.call('SET', KEYS[2], ARGV[1])
if ARGV[14] == '' and (ARGV[5] == '' or tonumber(ARGV[5]) > now) then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[7])
  if ARGV[5] ~= '' then
    redis.call('ZADD', KEYS[4], ARGV[5], ARGV[7])
  end
  live = live + 1
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*',
  'time', ARGV[15], 'actor', ARGV[16], 'action', ARGV[17], 'key_id', ARGV[18],
  'prefix', ARGV[19], 'name', ARGV[20], 'client', ARGV[21], 'user_agent', ARGV[22])
return {1, live}
"#;

const REVOKE_LUA: &str = r#"
-- KEYS: 1 id index, 2 record, 3 live zset, 4 expiry zset, 5 audit stream, 6 channel
-- ARGV: 1 id, 2 hash hex, 3 revoked_at, 4 now ms, 5 audit maxlen, 6 publish command,
--       7..14 audit time actor action key_id prefix name client user_agent
-- Returns false (no live key with that id) or {hash hex, published 1|0, publish error}.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return false end
local exp = redis.call('ZSCORE', KEYS[4], ARGV[1])
if exp and tonumber(exp) <= tonumber(ARGV[4]) then return false end
local revoked = redis.call('HGET', KEYS[2], 'revoked_at')
if not revoked or revoked ~= '' then return false end
redis.call('HSET', KEYS[2], 'revoked_at', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
  'time', ARGV[7], 'actor', ARGV[8], 'action', ARGV[9], 'key_id', ARGV[10],
  'prefix', ARGV[11], 'name', ARGV[12], 'client', ARGV[13], 'user_agent', ARGV[14])
-- The revocation is committed above; a failed publication must not turn it
-- into an error reply (the caller would report a failure for a revoked key,
-- and a retry would find it already revoked), so it is reported instead.
local published = redis.pcall(ARGV[6], KEYS[6], ARGV[2])
if type(published) == 'table' and published.err then
  return {ARGV[2], 0, published.err}
end
return {ARGV[2], 1, ''}
"#;

const TOUCH_LUA: &str = r#"
-- KEYS: records; ARGV: matching last_used_at values (fixed-width RFC 3339 UTC,
-- so string order is time order). Only existing records, only forward.
for i, k in ipairs(KEYS) do
  local cur = redis.call('HGET', k, 'last_used_at')
  if cur and (cur == '' or cur < ARGV[i]) then
    redis.call('HSET', k, 'last_used_at', ARGV[i])
  end
end
return #KEYS
"#;

/// One of the store's Lua scripts. Scripts run only through
/// [`RedisStore::eval`], which is where the rule for a node that does not
/// know the script lives, so a new script gets it by being a `Lua`.
struct Lua {
    body: &'static str,
    /// SHA-1 hex of `body`, the name `EVALSHA` uses.
    sha: String,
}

impl Lua {
    fn new(body: &'static str) -> Lua {
        Lua {
            body,
            sha: Script::new(body).get_hash().to_string(),
        }
    }

    /// A call of this script; add its keys and arguments in order.
    fn prepare(&self) -> LuaCall<'_> {
        LuaCall {
            lua: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// The keys and arguments of one script call.
struct LuaCall<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl LuaCall<'_> {
    fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// `EVALSHA <sha>`, or with `body` `EVAL <script>`, then the keys and
    /// arguments. Both are routed alike on a cluster: by the first key, so to
    /// the tenant's shard.
    fn command(&self, body: bool) -> Cmd {
        let mut cmd = if body {
            let mut c = rds::cmd("EVAL");
            c.arg(self.lua.body);
            c
        } else {
            let mut c = rds::cmd("EVALSHA");
            c.arg(&self.lua.sha);
            c
        };
        cmd.arg(self.keys.len())
            .arg(self.keys.as_slice())
            .arg(self.args.as_slice());
        cmd
    }

    /// `EVALSHA`; on `NOSCRIPT` (the node's script cache is empty: it
    /// restarted, it is a replica promoted by a failover — Redis does not
    /// replicate the script cache —, or `SCRIPT FLUSH`), `EVAL` with the
    /// body on the same route, which runs the script and caches it on that
    /// node. `NOSCRIPT` means nothing ran, so sending it again is safe.
    ///
    /// Not [`rds::Script::invoke_async`]: on `NOSCRIPT` it sends
    /// `SCRIPT LOAD` and then `EVALSHA` again. `SCRIPT LOAD` has no key, so
    /// the cluster client fans it out to every node it knows (all-nodes
    /// route, every answer awaited), and in redis 1.8 the legs of a fan-out
    /// are queued where the connection's task only looks when something else
    /// wakes it (`dispatch_pending` drains them with `try_recv`; no waker is
    /// registered). Right after a restart of the tenant's master that took
    /// 180–480 ms instead of about 1 ms; with the default 250 ms
    /// `store.timeout` the mint that paid it first got through, and the
    /// revoke that followed (a list, a `GET`, then its own script, paying
    /// it again) answered 503, as did the `last_used_at` write-behind.
    async fn invoke<T: FromRedisValue>(&self, conn: &mut Conn) -> RedisResult<T> {
        match self.command(false).query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command(true).query_async(conn).await
            }
            other => other,
        }
    }
}

/// Key names of one tenant.
struct Keys {
    /// `keygate:{<slug>}:`
    base: String,
}

impl Keys {
    fn new(slug: &str) -> Keys {
        Keys {
            base: format!("keygate:{{{slug}}}:"),
        }
    }
    fn record(&self, hash: &KeyHash) -> String {
        format!("{}key:{}", self.base, hash.to_hex())
    }
    fn record_hex(&self, hex: &str) -> String {
        format!("{}key:{hex}", self.base)
    }
    fn id(&self, id: &str) -> String {
        format!("{}id:{id}", self.base)
    }
    fn live(&self) -> String {
        format!("{}live", self.base)
    }
    fn expiry(&self) -> String {
        format!("{}expiry", self.base)
    }
    fn audit(&self) -> String {
        format!("{}audit", self.base)
    }
    fn channel(&self) -> String {
        format!("{}revoked", self.base)
    }
}

/// One live connection of any topology.
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
    Single(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Single(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Single(c) => c.get_db(),
        }
    }
}

enum Target {
    Standalone {
        client: rds::Client,
        manager: OnceLock<ConnectionManager>,
    },
    Cluster {
        seeds: Vec<ConnectionInfo>,
        client: ClusterClient,
        conn: Mutex<Option<ClusterConnection>>,
    },
    Sentinel {
        sentinel: Mutex<SentinelClient>,
        conn: Mutex<Option<MultiplexedConnection>>,
    },
}

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

fn parse_url(secret: &Secret, key: &str) -> Result<ConnectionInfo, StoreError> {
    let url = secret.expose();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(StoreError::Unavailable(format!(
            "{key}: must be a redis:// or rediss:// URL"
        )));
    }
    url.into_connection_info().map_err(|e| {
        let mut text = e.to_string();
        if !url.is_empty() {
            text = text.replace(url, "[redacted]");
        }
        StoreError::Unavailable(format!("{key}: not a valid redis URL ({text})"))
    })
}

fn host_port(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".into(),
    }
}

fn password_of(info: &ConnectionInfo) -> Option<String> {
    info.redis_settings()
        .password()
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn opt_rfc3339(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map(rfc3339).unwrap_or_default()
}

fn parse_time(field: &str, v: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Unavailable(format!("corrupt record in redis: bad {field}")))
}

fn parse_opt_time(field: &str, v: Option<&String>) -> Result<Option<DateTime<Utc>>, StoreError> {
    match v.map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => parse_time(field, s).map(Some),
    }
}

fn non_empty(v: Option<&String>) -> Option<String> {
    v.filter(|s| !s.is_empty()).cloned()
}

fn parse_record(map: &HashMap<String, String>) -> Result<KeyRecord, StoreError> {
    let get = |f: &str| {
        map.get(f)
            .cloned()
            .ok_or_else(|| StoreError::Unavailable(format!("corrupt record in redis: no {f}")))
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
    })
}

fn parse_audit(map: &HashMap<String, String>) -> Result<AuditEntry, StoreError> {
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
    })
}

fn audit_args(a: &AuditEntry) -> [String; 8] {
    [
        rfc3339(&a.time),
        a.actor.clone(),
        a.action.clone(),
        a.key_id.clone(),
        a.prefix.clone(),
        a.name.clone().unwrap_or_default(),
        a.client.clone().unwrap_or_default(),
        a.user_agent.clone().unwrap_or_default(),
    ]
}

/// What a feed subscription reads from.
enum Subscription {
    /// `SUBSCRIBE` on a standalone server or the Sentinel master.
    Plain(rds::aio::PubSubSink, rds::aio::PubSubStream),
    /// `SSUBSCRIBE` through a RESP3 cluster connection.
    Sharded(ClusterConnection, mpsc::UnboundedReceiver<rds::PushInfo>),
}

/// Why a feed session ended.
enum FeedEnd {
    /// The consumer went away: stop the task.
    Closed,
    /// The subscription dropped (reason for the log).
    Lost(String),
}

impl RedisStore {
    /// Build the store for `target` without connecting. Fails only for an
    /// unusable configuration (e.g. a malformed URL).
    pub fn new(target: &RedisTarget, slug: &str, timeout: Duration) -> Result<Self, StoreError> {
        let mut secrets = Vec::new();
        let (target, location) = match target {
            RedisTarget::Url(url) => {
                let info = parse_url(url, "store.url")?;
                secrets.extend(password_of(&info));
                let location = host_port(&info);
                let client = rds::Client::open(info).map_err(|e| {
                    StoreError::Unavailable(format!("store.url: unusable redis URL ({e})"))
                })?;
                let target = Target::Standalone {
                    client,
                    manager: OnceLock::new(),
                };
                (target, location)
            }
            RedisTarget::Cluster(urls) => {
                let mut seeds = Vec::new();
                for (i, u) in urls.iter().enumerate() {
                    let info = parse_url(u, &format!("store.cluster[{i}]"))?;
                    secrets.extend(password_of(&info));
                    seeds.push(info);
                }
                if seeds.is_empty() {
                    return Err(StoreError::Unavailable(
                        "store.cluster: needs at least one seed node".into(),
                    ));
                }
                let location = format!(
                    "cluster {}",
                    seeds.iter().map(host_port).collect::<Vec<_>>().join(",")
                );
                let client = ClusterClient::builder(seeds.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| {
                        StoreError::Unavailable(format!("store.cluster: unusable seed nodes ({e})"))
                    })?;
                let target = Target::Cluster {
                    seeds,
                    client,
                    conn: Mutex::new(None),
                };
                (target, location)
            }
            RedisTarget::Sentinel { master, nodes } => {
                let mut infos = Vec::new();
                for (i, u) in nodes.iter().enumerate() {
                    let info = parse_url(u, &format!("store.sentinel.nodes[{i}]"))?;
                    secrets.extend(password_of(&info));
                    infos.push(info);
                }
                let Some(first) = infos.first() else {
                    return Err(StoreError::Unavailable(
                        "store.sentinel.nodes: needs at least one sentinel".into(),
                    ));
                };
                // Credentials and TLS of the sentinel URLs also apply to the master.
                let mut node_info = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone());
                if matches!(first.addr(), ConnectionAddr::TcpTls { .. }) {
                    node_info = node_info.set_tls_mode(rds::TlsMode::Secure);
                }
                let location = format!(
                    "sentinel master {master} via {}",
                    infos.iter().map(host_port).collect::<Vec<_>>().join(",")
                );
                let sentinel = SentinelClient::build(
                    infos,
                    master.as_str(),
                    Some(node_info),
                    SentinelServerType::Master,
                )
                .map_err(|e| {
                    StoreError::Unavailable(format!("store.sentinel: unusable configuration ({e})"))
                })?;
                let target = Target::Sentinel {
                    sentinel: Mutex::new(sentinel),
                    conn: Mutex::new(None),
                };
                (target, location)
            }
        };
        Ok(RedisStore {
            keys: Keys::new(slug),
            timeout,
            target,
            location,
            secrets,
            mint: Lua::new(MINT_LUA),
            revoke: Lua::new(REVOKE_LUA),
            touch: Lua::new(TOUCH_LUA),
        })
    }

    /// Where this store connects (`host:port`, no credentials), for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn publish_command(&self) -> &'static str {
        match self.target {
            Target::Cluster { .. } => "SPUBLISH",
            Target::Standalone { .. } | Target::Sentinel { .. } => "PUBLISH",
        }
    }

    /// A connection, connecting if there is none (bounded by the caller).
    async fn conn(&self) -> RedisResult<Conn> {
        match &self.target {
            Target::Standalone { client, manager } => {
                if let Some(m) = manager.get() {
                    return Ok(Conn::Manager(m.clone()));
                }
                // One connect attempt per call, no internal retries: a call
                // while Redis is down fails fast and the next call tries again.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(self.timeout));
                let m = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
                let _ = manager.set(m);
                let m = manager.get().cloned().ok_or_else(|| {
                    RedisError::from((rds::ErrorKind::Client, "connection manager not set"))
                })?;
                Ok(Conn::Manager(m))
            }
            Target::Cluster { client, conn, .. } => {
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await?;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
            Target::Sentinel { sentinel, conn } => {
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Single(c.clone()));
                }
                let client = sentinel.lock().await.async_get_client().await?;
                let config =
                    AsyncConnectionConfig::new().set_connection_timeout(Some(self.timeout));
                let c = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                *slot = Some(c.clone());
                Ok(Conn::Single(c))
            }
        }
    }

    /// Forget a Sentinel master connection that failed, so the next call asks
    /// the sentinels again (the master may have changed).
    async fn forget_connection(&self, err: Option<&RedisError>) {
        if let Target::Sentinel { conn, .. } = &self.target {
            let stale = match err {
                None => true,
                Some(e) => {
                    e.is_unrecoverable_error()
                        || e.is_io_error()
                        || e.is_connection_dropped()
                        || e.code() == Some("READONLY")
                }
            };
            if stale {
                *conn.lock().await = None;
            }
        }
    }

    /// An error text naming the cause, never a password or URL.
    fn describe(&self, e: &RedisError) -> StoreError {
        let mut cause = if e.is_connection_refusal() {
            "connection refused".to_string()
        } else {
            let text = e.to_string();
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            let mut chars = text.chars();
            match chars.next() {
                Some(c) => c.to_lowercase().chain(chars).collect(),
                None => "unknown error".into(),
            }
        };
        for s in &self.secrets {
            cause = cause.replace(s.as_str(), "[redacted]");
        }
        if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
            StoreError::Unavailable(format!("cannot reach redis at {}: {cause}", self.location))
        } else {
            StoreError::Unavailable(format!("redis at {}: {cause}", self.location))
        }
    }

    /// Run `op` on a connection, bounded by `store.timeout`.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let work = async {
            let conn = self.conn().await?;
            op(conn).await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget_connection(Some(&e)).await;
                Err(self.describe(&e))
            }
            Err(_) => {
                self.forget_connection(None).await;
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    /// Run a script call (see [`LuaCall::invoke`]), bounded like any call.
    async fn eval<T: FromRedisValue>(&self, inv: LuaCall<'_>) -> Result<T, StoreError> {
        self.call(|mut c| async move { inv.invoke(&mut c).await })
            .await
    }

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
            .arg(&record.prefix)
            .arg(record.name.clone().unwrap_or_default())
            .arg(&record.created_by)
            .arg(rfc3339(&record.created_at))
            .arg(opt_rfc3339(&record.expires_at))
            .arg(opt_rfc3339(&record.last_used_at))
            .arg(opt_rfc3339(&record.revoked_at));
        for a in audit_args(audit) {
            inv.arg(a);
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
        for a in audit_args(audit) {
            inv.arg(a);
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

    /// Start the revocation feed task (see the module docs).
    pub fn spawn_revocation_feed(self: &Arc<Self>, events: mpsc::UnboundedSender<FeedEvent>) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.feed_loop(events).await });
    }

    fn feed_wait(&self) -> Duration {
        self.timeout.max(FEED_MIN_WAIT)
    }

    async fn feed_loop(self: Arc<Self>, events: mpsc::UnboundedSender<FeedEvent>) {
        let mut backoff = FEED_BACKOFF_MIN;
        // Whether the consumer has been told the feed is down.
        let mut told_lost = false;
        loop {
            let attempt = tokio::select! {
                _ = events.closed() => return,
                r = tokio::time::timeout(self.feed_wait(), self.subscribe()) => r,
            };
            match attempt {
                Ok(Ok(sub)) => {
                    if events.send(FeedEvent::Connected).is_err() {
                        return;
                    }
                    tracing::info!(redis = %self.location, "revocation feed connected");
                    told_lost = false;
                    backoff = FEED_BACKOFF_MIN;
                    match self.pump(sub, &events).await {
                        FeedEnd::Closed => return,
                        FeedEnd::Lost(why) => {
                            tracing::warn!(redis = %self.location, reason = %why, "revocation feed lost");
                            // The master may be gone (Sentinel failover): drop the
                            // command connection too, so the next call asks the
                            // sentinels instead of failing once on a dead master.
                            self.forget_connection(None).await;
                        }
                    }
                }
                Ok(Err(e)) => {
                    let e = self.describe(&e);
                    tracing::warn!(error = %e, "revocation feed cannot subscribe");
                }
                Err(_) => {
                    tracing::warn!(redis = %self.location, "revocation feed subscribe timed out")
                }
            }
            if !told_lost {
                if events.send(FeedEvent::Lost).is_err() {
                    return;
                }
                told_lost = true;
            }
            tokio::select! {
                _ = events.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(FEED_BACKOFF_MAX);
        }
    }

    /// Connect a subscription to the tenant's revocation channel.
    async fn subscribe(&self) -> RedisResult<Subscription> {
        let channel = self.keys.channel();
        match &self.target {
            Target::Standalone { client, .. } => {
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                sink.subscribe(&channel).await?;
                Ok(Subscription::Plain(sink, stream))
            }
            Target::Sentinel { sentinel, .. } => {
                let client = sentinel.lock().await.async_get_client().await?;
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                sink.subscribe(&channel).await?;
                Ok(Subscription::Plain(sink, stream))
            }
            Target::Cluster { seeds, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let client = ClusterClient::builder(seeds.clone())
                    .use_protocol(rds::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .connection_timeout(self.feed_wait())
                    .response_timeout(self.feed_wait())
                    .build()?;
                let mut conn = client.get_async_connection().await?;
                conn.ssubscribe(&channel).await?;
                Ok(Subscription::Sharded(conn, rx))
            }
        }
    }

    /// Forward revocations until the subscription is lost or `events` closes.
    async fn pump(&self, sub: Subscription, events: &mpsc::UnboundedSender<FeedEvent>) -> FeedEnd {
        let mut tick = tokio::time::interval(FEED_PING_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        let wait = self.feed_wait();
        let forward = |payload: &[u8]| -> bool {
            match std::str::from_utf8(payload)
                .ok()
                .and_then(KeyHash::from_hex)
            {
                Some(hash) => events.send(FeedEvent::Revoked(hash)).is_ok(),
                None => {
                    tracing::warn!("revocation feed: ignoring a malformed message");
                    true
                }
            }
        };
        match sub {
            Subscription::Plain(mut sink, mut stream) => loop {
                tokio::select! {
                    _ = events.closed() => return FeedEnd::Closed,
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            if !forward(msg.get_payload_bytes()) {
                                return FeedEnd::Closed;
                            }
                        }
                        None => return FeedEnd::Lost("connection closed".into()),
                    },
                    _ = tick.tick() => {
                        match tokio::time::timeout(wait, sink.ping::<Value>()).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return FeedEnd::Lost(format!("ping failed: {}", self.describe(&e))),
                            Err(_) => return FeedEnd::Lost("ping timed out".into()),
                        }
                    }
                }
            },
            Subscription::Sharded(mut conn, mut pushes) => loop {
                tokio::select! {
                    _ = events.closed() => return FeedEnd::Closed,
                    push = pushes.recv() => match push {
                        Some(p) => match p.kind {
                            PushKind::SMessage | PushKind::Message => {
                                let payload = match p.data.get(1) {
                                    Some(Value::BulkString(b)) => b.as_slice(),
                                    _ => &[],
                                };
                                if !forward(payload) {
                                    return FeedEnd::Closed;
                                }
                            }
                            PushKind::Disconnection | PushKind::SUnsubscribe => {
                                return FeedEnd::Lost(format!("{:?}", p.kind));
                            }
                            _ => {}
                        },
                        None => return FeedEnd::Lost("connection closed".into()),
                    },
                    _ = tick.tick() => {
                        let mut probe_cmd = rds::cmd("EXISTS");
                        probe_cmd.arg(self.keys.live());
                        let probe = probe_cmd.query_async::<i64>(&mut conn);
                        match tokio::time::timeout(wait, probe).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return FeedEnd::Lost(format!("probe failed: {}", self.describe(&e))),
                            Err(_) => return FeedEnd::Lost("probe timed out".into()),
                        }
                    }
                }
            },
        }
    }
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
    fn bad_urls_are_config_errors_without_secrets() {
        let t = RedisTarget::Url(Secret::new("http://user:hunter2@h:1"));
        let e = RedisStore::new(&t, "acme", Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().starts_with("store.url:"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn location_is_host_port_only() {
        let t = RedisTarget::Url(Secret::new("redis://:hunter2@127.0.0.1:6390/0"));
        let s = RedisStore::new(&t, "acme", Duration::from_millis(100)).unwrap();
        assert_eq!(s.location(), "127.0.0.1:6390");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn timestamps_round_trip_and_sort_as_strings() {
        let a = Utc::now();
        let b = a + chrono::TimeDelta::nanoseconds(1);
        assert_eq!(parse_time("t", &rfc3339(&a)).unwrap(), a);
        assert!(rfc3339(&a) < rfc3339(&b));
    }
}
