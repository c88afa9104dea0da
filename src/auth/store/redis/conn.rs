//! Connections of every topology (standalone, Cluster, Sentinel), how a call
//! is bounded, and how a Redis error becomes an operator's message.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use ::redis as rds;
use rds::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use rds::cluster::ClusterClient;
use rds::cluster_async::ClusterConnection;
use rds::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use rds::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, RedisResult, Value,
};
use tokio::sync::Mutex;

use super::lua::{self, Lua, LuaCall};
use super::records::Keys;
use super::{RedisStore, StoreError};
use crate::config::{RedisTarget, Secret};

/// One live connection of any topology.
#[derive(Clone)]
pub(super) enum Conn {
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

pub(super) enum Target {
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
            mint: Lua::new(lua::MINT),
            revoke: Lua::new(lua::REVOKE),
            touch: Lua::new(lua::TOUCH),
            rotate: Lua::new(lua::ROTATE),
            usage_add: Lua::new(lua::USAGE_ADD),
            ratelimit: Lua::new(lua::RATELIMIT),
        })
    }

    /// Where this store connects (`host:port`, no credentials), for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub(super) fn publish_command(&self) -> &'static str {
        match self.target {
            Target::Cluster { .. } => "SPUBLISH",
            Target::Standalone { .. } | Target::Sentinel { .. } => "PUBLISH",
        }
    }

    /// A connection, connecting if there is none (bounded by the caller).
    pub(super) async fn conn(&self) -> RedisResult<Conn> {
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
    pub(super) async fn forget_connection(&self, err: Option<&RedisError>) {
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
    pub(super) fn describe(&self, e: &RedisError) -> StoreError {
        self.describe_with(e, None)
    }

    /// [`Self::describe`]; `auth_reply` is Redis's own answer to AUTH when
    /// [`Self::auth_reply`] could learn it (redis-rs drops it).
    fn describe_with(&self, e: &RedisError, auth_reply: Option<String>) -> StoreError {
        let mut cause = if e.is_connection_refusal() {
            "connection refused".to_string()
        } else if e.kind() == rds::ErrorKind::AuthenticationFailed {
            match auth_reply {
                Some(reply) => format!("refused the password ({reply})"),
                None => "refused the password".to_string(),
            }
        } else if let Some(code) = e.code() {
            // A server error: Redis's own reply, e.g. `NOAUTH Authentication required.`
            let reply = match e.detail() {
                Some(detail) => format!("{code} {detail}"),
                None => code.to_string(),
            };
            if code == "NOAUTH" {
                format!("wants a password, store.url has none ({reply})")
            } else {
                format!("answered {reply}")
            }
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
    pub(super) async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
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
                let reply = if e.kind() == rds::ErrorKind::AuthenticationFailed {
                    tokio::time::timeout(self.timeout, self.auth_reply())
                        .await
                        .ok()
                        .flatten()
                } else {
                    None
                };
                Err(self.describe_with(&e, reply))
            }
            Err(_) => {
                self.forget_connection(None).await;
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    /// Redis's own answer to the configured AUTH (`WRONGPASS invalid
    /// username-password pair or user is disabled.`), asked on a connection
    /// without credentials: redis-rs reports a refused AUTH without it.
    /// Standalone only; the reply never contains the password.
    async fn auth_reply(&self) -> Option<String> {
        let Target::Standalone { client, .. } = &self.target else {
            return None;
        };
        let info = client.get_connection_info();
        let settings = info.redis_settings();
        let password = settings.password()?.to_string();
        let mut auth = rds::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        let bare = info
            .clone()
            .set_redis_settings(rds::RedisConnectionInfo::default());
        let mut conn = rds::Client::open(bare)
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let e = auth.query_async::<Value>(&mut conn).await.err()?;
        let code = e.code()?;
        let mut reply = match e.detail() {
            Some(detail) => format!("{code} {detail}"),
            None => code.to_string(),
        };
        for s in &self.secrets {
            reply = reply.replace(s.as_str(), "[redacted]");
        }
        Some(reply)
    }

    /// Run a script call (see [`LuaCall::invoke`]), bounded like any call.
    pub(super) async fn eval<T: FromRedisValue>(&self, inv: LuaCall<'_>) -> Result<T, StoreError> {
        self.call(|mut c| async move { inv.invoke(&mut c).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
