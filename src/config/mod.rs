//! Configuration: a TOML document (contract §2) is validated once into the
//! typed [`Config`] the rest of keygate uses.
//!
//! The document is parsed into a `toml::Table` and walked by hand against the
//! schema (rather than through serde derive) so that validation gathers every
//! problem — syntax (keyed `config`, with line and column), unknown keys at any
//! level, wrong types, bad values, missing `env:` variables — each naming its
//! dotted key (`listen.tls.cert`, `store.cluster[1]`), and `keygate check` can
//! report them all at once (exit 2) before any port is bound.
//!
//! Secrets (`upstream.authorization`, `store.url`, `store.cluster[i]`,
//! `store.sentinel.nodes[i]`) may be `"env:NAME"`; they live in [`Secret`] and
//! never appear in a problem message, in `Debug`, or in
//! [`Config::to_redacted_toml`].
//!
//! Layout: this file holds the typed structs (the interface the rest of the
//! crate uses); `table` walks the TOML tables and gathers problems,
//! `checks` validates single values, `values` holds value syntaxes
//! (durations), `defaults` writes every default once (`impl Default` per
//! section), `parse` maps each section onto its struct and `render` prints
//! the redacted effective configuration.
//!
//! The typed structs below are the interface the rest of the crate uses.

mod checks;
mod defaults;
mod parse;
mod render;
mod table;
#[cfg(test)]
mod testing;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

pub use values::{parse_duration, RateLimit, RateUnit};

use parse::parse_config;
use render::render_redacted;
use table::{syntax_message, Problems};

/// A secret config value (`upstream.authorization`, a Redis URL with a password).
/// Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub tenant: TenantConfig,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub scopes: ScopesConfig,
    pub session: Option<SessionConfig>,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// The header names as the document spelled them, for `keygate check`
    /// only (the typed `HeaderName` fields are lower-case).
    spellings: render::HeaderSpellings,
}

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    pub trusted_proxies: Vec<IpNet>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// Bound on the wait between two reads of a client's request body (§12).
    pub body_timeout: Duration,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Bound on the TLS handshake (default 10s).
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port` (no path, query or userinfo).
    pub url: http::Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Bound on the wait between two reads of the app's response body (§12).
    pub read_timeout: Duration,
    /// An idle keep-alive connection to the app is closed after this.
    pub idle_timeout: Duration,
    /// How many client connections may each keep a keep-alive connection to
    /// the app of their own (the fastest path); beyond that, requests share
    /// the pool. 0 = every request uses the shared pool.
    pub own_links: usize,
    /// Idle keep-alive connections to the app kept in the shared pool (>= 1).
    pub max_idle: usize,
    /// Replaces `Authorization` on key-authenticated requests (`Bearer <value>`).
    pub authorization: Option<Secret>,
    /// Extra CA bundle (PEM) trusted for an `https://` upstream.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub slug: String,
    pub domain: String,
    pub extra_hosts: Vec<String>,
}

impl TenantConfig {
    /// `<slug>.<domain>` followed by `extra_hosts`, all lower-case, without a trailing dot.
    pub fn served_hosts(&self) -> Vec<String> {
        let mut hosts = vec![format!("{}.{}", self.slug, self.domain).to_ascii_lowercase()];
        for h in &self.extra_hosts {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        hosts
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPolicy {
    Forward,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutagePolicy {
    Reject,
    ServeCached,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_prefix: String,
    pub principal_header: HeaderName,
    /// Carries a key's role to the app (contract §8).
    pub role_header: HeaderName,
    /// Carries a bound key's workspace ids to the app (contract §8).
    pub workspaces_header: HeaderName,
    pub other_bearer: ForwardPolicy,
    pub anonymous: ForwardPolicy,
    pub on_store_unavailable: OutagePolicy,
    pub max_stale: Duration,
    pub cache_ttl: Duration,
    /// Upper bound on cached keys (positive entries).
    pub cache_capacity: usize,
    /// How long a well-formed unknown token is remembered as unknown.
    pub negative_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Lower-cased, each starting with `/`.
    pub deny_prefixes: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum StoreBackend {
    Memory,
    Redis(RedisTarget),
}

#[derive(Debug, Clone)]
pub enum RedisTarget {
    Url(Secret),
    Cluster(Vec<Secret>),
    Sentinel { master: String, nodes: Vec<Secret> },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub max_live: u32,
    /// How long a rotated key keeps working unless the rotation says (§9; <= 30d).
    pub rotate_grace: Duration,
    /// Responses carry `expiry_header` this long before the key's `expires_at` (§9).
    pub expiry_notice: Duration,
    /// The response header that announces a key's coming expiry (§9).
    pub expiry_header: HeaderName,
    /// At most one usage write per key per instance this often (§10; > 0).
    pub usage_flush: Duration,
    /// Usage buckets older than this are dropped (§10; >= 1h).
    pub usage_retention: Duration,
    /// Applied at mint to keys minted without a rate limit (§11); `None` = none.
    pub default_rate_limit: Option<RateLimit>,
}

/// Scoped keys (contract §8).
#[derive(Debug, Clone)]
pub struct ScopesConfig {
    /// Workspace paths: a matching view (lower-case, repeated slashes merged,
    /// unreserved escapes decoded) that starts and ends with `/`. A key bound
    /// to workspaces reaches only this prefix followed by one of its ids.
    pub workspace_prefix: String,
    /// Routes an `editor` key is refused.
    pub admin_only: Vec<AdminOnlyRule>,
}

/// One `scopes.admin_only` entry: `"METHOD /prefix"` or `"/prefix"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminOnlyRule {
    /// `None`: every method.
    pub method: Option<http::Method>,
    /// A matching view, compared byte-wise with the request's view like the
    /// deny prefixes (`/org/import` also covers `/org/imports`).
    pub prefix: String,
}

impl AdminOnlyRule {
    /// The rule covers a request with `method` whose matching view is `view`.
    pub fn matches(&self, method: &http::Method, view: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && view.starts_with(&self.prefix)
    }
}

impl std::fmt::Display for AdminOnlyRule {
    /// The entry as written in the config (`POST /org/import`, `/bundles`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.method {
            Some(m) => write!(f, "{m} {}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub verify_url: http::Uri,
    pub cookie: String,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// One of `trace`, `debug`, `info`, `warn`, `error` (lower-case).
    pub level: String,
    /// One log line per request (default true).
    pub access: bool,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 = one per core (default 0).
    pub worker_threads: usize,
}

/// One configuration problem, naming its key (`upstream.url: not an http(s) URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parse and validate a TOML document. `env` resolves `env:NAME` secrets
    /// (injected so tests need not touch the process environment).
    pub fn from_toml_str(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let table = match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![ConfigProblem {
                        key: "config".into(),
                        message: syntax_message(text, &e),
                    }],
                })
            }
        };
        let mut p = Problems::default();
        let config = parse_config(table, env, &mut p);
        if p.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems: p.0 })
        }
    }

    /// Read `path` and validate; a missing or unreadable file is a problem keyed `config`.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![ConfigProblem {
                key: "config".into(),
                message: format!("cannot read {}: {e}", path.display()),
            }],
        })?;
        Config::from_toml_str(&text, &|name| std::env::var(name).ok())
    }

    /// The effective configuration as TOML (every default filled in), in the
    /// section/key shape of the input. `upstream.authorization` is printed as
    /// `"[redacted]"`; Redis URLs (`store.url`, `store.cluster`,
    /// `store.sentinel.nodes`) keep scheme, host, port and db so an operator
    /// can see where keygate connects, with the userinfo replaced
    /// (`redis://user:[redacted]@host:6379/0`, `redis://[redacted]@host`).
    pub fn to_redacted_toml(&self) -> String {
        render_redacted(self)
    }
}

/// `store.url` when none of url / cluster / sentinel is given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reports_an_unreadable_file_under_config() {
        let err = Config::load(std::path::Path::new("/nonexistent/keygate.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "config");
    }
}
