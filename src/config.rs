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
//! OWNER: config helper. The typed structs below are the interface the rest of
//! the crate uses; fields may be added, not renamed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

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
    pub session: Option<SessionConfig>,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    pub trusted_proxies: Vec<IpNet>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
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

    /// A configuration for tests and the demo: memory store, tenant `slug`,
    /// every other value at its default; addresses are 127.0.0.1:0.
    pub fn for_tests(slug: &str, upstream: http::Uri) -> Config {
        Config {
            listen: ListenConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                trusted_proxies: vec![],
                header_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_connections: 10_000,
                shutdown_grace: Duration::from_secs(30),
                tls: None,
            },
            admin: AdminConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
            },
            upstream: UpstreamConfig {
                url: upstream,
                connect_timeout: Duration::from_secs(2),
                timeout: Duration::from_secs(60),
                authorization: None,
                ca_file: None,
            },
            tenant: TenantConfig {
                slug: slug.to_string(),
                domain: "moleculesai.app".into(),
                extra_hosts: vec![],
            },
            auth: AuthConfig {
                key_prefix: "mok_".into(),
                principal_header: HeaderName::from_static("x-molecule-principal"),
                other_bearer: ForwardPolicy::Forward,
                anonymous: ForwardPolicy::Forward,
                on_store_unavailable: OutagePolicy::Reject,
                max_stale: Duration::from_secs(30),
                cache_ttl: Duration::from_secs(60),
                cache_capacity: 100_000,
                negative_ttl: Duration::from_secs(5),
            },
            policy: PolicyConfig {
                deny_prefixes: vec!["/cp/admin".into()],
            },
            store: StoreConfig {
                backend: StoreBackend::Memory,
                timeout: Duration::from_millis(250),
            },
            keys: KeysConfig { max_live: 100 },
            session: None,
            log: LogConfig {
                format: LogFormat::Json,
                level: "info".into(),
                access: true,
            },
            runtime: RuntimeConfig { worker_threads: 0 },
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing and validation: the TOML document is walked by hand against the
// schema so that every problem (type, value, unknown key) is gathered, each
// under its dotted key, instead of stopping at the first serde error.
// ---------------------------------------------------------------------------

const REDACTED: &str = "[redacted]";

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|q| q.key == key)
    }

    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = text.get(..start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("invalid TOML at line {line}, column {col}: {msg}")
        }
        None => format!("invalid TOML: {msg}"),
    }
}

/// A TOML table being consumed: every `take_*` removes its key, and
/// [`Section::finish`] reports whatever is left as an unknown key.
struct Section {
    path: String,
    table: toml::Table,
}

impl Section {
    fn new(path: &str, table: toml::Table) -> Self {
        Section {
            path: path.to_string(),
            table,
        }
    }

    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    fn has(&self, k: &str) -> bool {
        self.table.contains_key(k)
    }

    fn take(&mut self, k: &str) -> Option<toml::Value> {
        self.table.remove(k)
    }

    /// A sub-table; `Ok(None)` when absent, `Err(())` (problem recorded) when not a table.
    fn sub(&mut self, k: &str, p: &mut Problems) -> Result<Option<Section>, ()> {
        let key = self.key(k);
        match self.take(k) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(Section::new(&key, t))),
            Some(other) => {
                p.push(key, expected("a table", &other));
                Err(())
            }
        }
    }

    /// A sub-table, or an empty one when absent or invalid.
    fn sub_or_empty(&mut self, k: &str, p: &mut Problems) -> Section {
        let key = self.key(k);
        match self.sub(k, p) {
            Ok(Some(s)) => s,
            _ => Section::new(&key, toml::Table::new()),
        }
    }

    fn string(&mut self, k: &str, p: &mut Problems) -> Option<String> {
        match self.take(k)? {
            toml::Value::String(s) => Some(s),
            other => {
                p.push(self.key(k), expected("a string", &other));
                None
            }
        }
    }

    fn integer(&mut self, k: &str, p: &mut Problems) -> Option<i64> {
        match self.take(k)? {
            toml::Value::Integer(i) => Some(i),
            other => {
                p.push(self.key(k), expected("an integer", &other));
                None
            }
        }
    }

    fn boolean(&mut self, k: &str, p: &mut Problems) -> Option<bool> {
        match self.take(k)? {
            toml::Value::Boolean(b) => Some(b),
            other => {
                p.push(self.key(k), expected("true or false", &other));
                None
            }
        }
    }

    /// An array of strings, each with its element key (`key[i]`). Elements of
    /// the wrong type are reported and skipped.
    fn strings(&mut self, k: &str, p: &mut Problems) -> Option<Vec<(String, String)>> {
        let key = self.key(k);
        match self.take(k)? {
            toml::Value::Array(items) => Some(
                items
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, v)| {
                        let ekey = format!("{key}[{i}]");
                        match v {
                            toml::Value::String(s) => Some((ekey, s)),
                            other => {
                                p.push(ekey, expected("a string", &other));
                                None
                            }
                        }
                    })
                    .collect(),
            ),
            other => {
                p.push(key, expected("an array of strings", &other));
                None
            }
        }
    }

    /// Report every key not consumed as unknown (nested tables included).
    fn finish(self, p: &mut Problems) {
        for k in self.table.keys() {
            p.push(self.key(k), "unknown key");
        }
    }

    // --- typed helpers with defaults -------------------------------------

    fn duration(
        &mut self,
        k: &str,
        default: Duration,
        zero_ok: bool,
        p: &mut Problems,
    ) -> Duration {
        let key = self.key(k);
        match self.take(k) {
            None => default,
            Some(toml::Value::String(s)) => match parse_duration(&s) {
                Some(d) if d.is_zero() && !zero_ok => {
                    p.push(key, "must be greater than zero");
                    default
                }
                Some(d) => d,
                None => {
                    p.push(
                        key,
                        format!(
                            "{} is not a duration (expected e.g. \"250ms\", \"5s\", \"1m\", \"1h\")",
                            quote(&s)
                        ),
                    );
                    default
                }
            },
            Some(other) => {
                p.push(key, expected("a duration string like \"5s\"", &other));
                default
            }
        }
    }

    fn socket_addr(&mut self, k: &str, default: &str, p: &mut Problems) -> SocketAddr {
        let fallback = default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        match self.string(k, p) {
            None => fallback,
            Some(s) => match s.parse() {
                Ok(a) => a,
                Err(_) => {
                    p.push(
                        self.key(k),
                        format!(
                            "{} is not a socket address (expected ip:port, e.g. \"{default}\")",
                            quote(&s)
                        ),
                    );
                    fallback
                }
            },
        }
    }

    fn int_range(&mut self, k: &str, default: i64, min: i64, max: i64, p: &mut Problems) -> i64 {
        match self.integer(k, p) {
            None => default,
            Some(i) if (min..=max).contains(&i) => i,
            Some(_) => {
                let msg = if max == i64::MAX {
                    format!("must be at least {min}")
                } else {
                    format!("must be between {min} and {max}")
                };
                p.push(self.key(k), msg);
                default
            }
        }
    }

    /// A string that must be one of `choices`; returns the index of the match.
    fn choice(&mut self, k: &str, choices: &[&str], default: usize, p: &mut Problems) -> usize {
        match self.string(k, p) {
            None => default,
            Some(s) => match choices.iter().position(|c| *c == s) {
                Some(i) => i,
                None => {
                    let list: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
                    p.push(
                        self.key(k),
                        format!("{} is not one of {}", quote(&s), list.join(", ")),
                    );
                    default
                }
            },
        }
    }

    /// A path to a file that must be readable now.
    fn readable_file(&mut self, k: &str, p: &mut Problems) -> Option<PathBuf> {
        let s = self.string(k, p)?;
        let key = self.key(k);
        if s.is_empty() {
            p.push(key, "must not be empty");
            return None;
        }
        let path = PathBuf::from(s);
        match std::fs::File::open(&path).and_then(|f| {
            if f.metadata()?.is_dir() {
                Err(std::io::Error::other("is a directory"))
            } else {
                Ok(())
            }
        }) {
            Ok(()) => Some(path),
            Err(e) => {
                p.push(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    /// A secret: a literal, or `env:NAME` resolved through `env`. Problems
    /// never include the value.
    fn secret(
        &mut self,
        k: &str,
        env: &dyn Fn(&str) -> Option<String>,
        p: &mut Problems,
    ) -> Option<Secret> {
        let s = self.string(k, p)?;
        resolve_secret(&self.key(k), s, env, p)
    }
}

fn resolve_secret(
    key: &str,
    value: String,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<Secret> {
    let Some(name) = value.strip_prefix("env:") else {
        if value.is_empty() {
            p.push(key, "must not be empty");
            return None;
        }
        return Some(Secret::new(value));
    };
    let valid_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        p.push(
            key,
            format!("{} is not a valid environment variable name", quote(name)),
        );
        return None;
    }
    match env(name) {
        None => {
            p.push(key, format!("environment variable {name} is not set"));
            None
        }
        Some(v) if v.is_empty() => {
            p.push(key, format!("environment variable {name} is empty"));
            None
        }
        Some(v) => Some(Secret::new(v)),
    }
}

fn expected(what: &str, found: &toml::Value) -> String {
    format!("expected {what}, found {}", found.type_str())
}

/// A value echoed in a problem message (never used for secrets).
fn quote(s: &str) -> String {
    toml_string(s)
}

/// `"250ms"`, `"5s"`, `"1m"`, `"1h"`: a non-negative integer and a unit.
fn parse_duration(s: &str) -> Option<Duration> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() || num.len() > 12 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }?;
    Some(Duration::from_millis(ms))
}

/// The shortest exact spelling, except that a minute or less stays in
/// seconds (`"60s"`, `"90s"`, `"2m"`, `"1h"`, `"250ms"`).
fn format_duration(d: Duration) -> String {
    // sub-millisecond remainders (never produced by the parser) round up
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    if ms % 1_000 != 0 {
        return format!("{ms}ms");
    }
    let secs = ms / 1_000;
    if secs != 0 && secs % 3_600 == 0 {
        format!("{}h", secs / 3_600)
    } else if secs > 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// A TOML basic string literal.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// --- value checks (pure; messages never echo secrets) -----------------------

/// A DNS name or (for `allow_ip`) an IP literal, no scheme, port or path.
/// Returned lower-case, without a trailing dot; IPv6 in the bracketed form
/// it has in a Host header (`[::1]`).
fn check_host(s: &str, allow_ip: bool) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains("://") {
        return Err(format!(
            "{} must be a bare host name, without a scheme",
            quote(s)
        ));
    }
    if s.contains(['/', '?', '#', '@']) {
        return Err(format!("{} must be a bare host name", quote(s)));
    }
    let ip = if let Some(inner) = s.strip_prefix('[') {
        match inner.strip_suffix(']') {
            Some(inner) => match inner.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => Some(std::net::IpAddr::V6(v6)),
                Err(_) => return Err(format!("{} is not an IPv6 literal", quote(s))),
            },
            None => {
                return Err(format!(
                    "{} must not include a port (or is not a bracketed IPv6 literal)",
                    quote(s)
                ))
            }
        }
    } else {
        s.parse::<std::net::IpAddr>().ok()
    };
    if let Some(ip) = ip {
        if !allow_ip {
            return Err(format!(
                "{} must be a DNS name, not an IP address",
                quote(s)
            ));
        }
        return Ok(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    if s.contains(':') {
        return Err(format!("{} must not include a port", quote(s)));
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{} is not a valid DNS name", quote(s)));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let last_numeric = labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    if !labels.iter().all(label_ok) || last_numeric {
        return Err(format!("{} is not a valid DNS name", quote(s)));
    }
    Ok(name.to_ascii_lowercase())
}

fn check_slug(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err("must be at most 63 characters (it is a DNS label)".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("{} may contain only a-z, 0-9 and '-'", quote(s)));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{} must not start or end with '-'", quote(s)));
    }
    Ok(())
}

/// An http(s) URL. `origin_only`: no path (other than `/`) and no query.
/// Userinfo is always refused. Messages do not echo the URL.
fn check_http_url(s: &str, origin_only: bool) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|_| {
        "not a valid URL (expected http://host[:port] or https://host[:port])".to_string()
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("must include a host".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not contain userinfo (user:password@)".into());
    }
    if authority.host().is_empty() {
        return Err("must include a host".into());
    }
    // `http::Uri` accepts any digits as a port (`port()` is then `None`): check it here.
    let after_host = authority
        .as_str()
        .get(authority.host().len()..)
        .unwrap_or("");
    if !after_host.is_empty() {
        let valid = after_host
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !valid {
            return Err("has an invalid port".into());
        }
    }
    if origin_only {
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        if !matches!(uri.path(), "" | "/") {
            return Err("must not have a path (the request path is forwarded as received)".into());
        }
        // `http://host?` parses with an empty query; refuse the stray `?` too.
        if s.ends_with('?') {
            return Err("must not have a query string".into());
        }
    }
    Ok(uri)
}

/// `redis://` or `rediss://` with a host; checked with the redis client's own
/// parser. Messages do not echo the URL (it may hold a password).
fn check_redis_url(s: &str) -> Result<(), &'static str> {
    use redis::IntoConnectionInfo as _;
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("must be a redis:// or rediss:// URL");
    }
    let Some(url) = redis::parse_redis_url(s) else {
        return Err("not a valid redis:// or rediss:// URL");
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must include a host");
    }
    if url.query().is_some() {
        return Err("must not have a query string");
    }
    match url.into_connection_info() {
        Ok(_) => Ok(()),
        Err(_) => Err("not a valid redis:// or rediss:// URL (host, port, /db number)"),
    }
}

/// Redis URL for display: the password (or a lone username, which might be a
/// mistyped password) is replaced; scheme, host, port and db are kept.
fn redact_redis_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return REDACTED.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    match authority.rfind('@') {
        None => s.to_string(),
        Some(at) => {
            let userinfo = &authority[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}"),
                None => REDACTED.to_string(),
            };
            format!(
                "{}{shown}{}",
                &s[..scheme_end + 3],
                &s[scheme_end + 3 + at..]
            )
        }
    }
}

/// Header names a principal header must never be (after folding `_`/`.` to `-`):
/// hop-by-hop, framing, routing and credential headers keygate itself manages.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "www-authenticate",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "content-encoding",
    "expect",
    "cookie",
    "set-cookie",
    "forwarded",
    "via",
    "x-real-ip",
    "x-request-id",
    "x-original-url",
    "x-rewrite-url",
    "origin",
];

fn check_principal_header(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("{} is not a valid header name", quote(s)))?;
    let folded = name.as_str().replace(['_', '.'], "-");
    if RESERVED_HEADERS.contains(&folded.as_str()) || folded.starts_with("x-forwarded-") {
        return Err(format!(
            "{} is reserved (hop-by-hop, framing, routing or credential header)",
            quote(s)
        ));
    }
    Ok(name)
}

fn check_key_prefix(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 16 {
        return Err("must be at most 16 characters".into());
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{} may contain only A-Z, a-z, 0-9 and '_'",
            quote(s)
        ));
    }
    Ok(())
}

/// RFC 6265 cookie-name: an RFC 2616 token.
fn check_cookie_name(s: &str) -> Result<(), String> {
    const SEPARATORS: &str = "()<>@,;:\\\"/[]?={} \t";
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_graphic() && !SEPARATORS.contains(c))
    {
        return Err(format!("{} is not a valid cookie name", quote(s)));
    }
    Ok(())
}

fn check_deny_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("{} must start with '/'", quote(s)));
    }
    if s.contains(|c: char| c.is_control() || c.is_whitespace() || c == '?' || c == '#') {
        return Err(format!(
            "{} must be a plain path (no whitespace, control characters, '?' or '#')",
            quote(s)
        ));
    }
    Ok(s.to_ascii_lowercase())
}

fn parse_trusted_proxy(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

// --- the schema walk ---------------------------------------------------------

const PLACEHOLDER_URI: &str = "http://invalid.invalid/";

fn parse_config(
    table: toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Config {
    let mut root = Section::new("", table);
    let listen = parse_listen(root.sub_or_empty("listen", p), p);
    let admin = parse_admin(root.sub_or_empty("admin", p), p);
    if admin.addr == listen.addr && admin.addr.port() != 0 {
        p.push("admin.addr", "must differ from listen.addr");
    }
    let upstream = parse_upstream(root.sub("upstream", p), env, p);
    let tenant = parse_tenant(root.sub("tenant", p), p);
    let auth = parse_auth(root.sub_or_empty("auth", p), p);
    let policy = parse_policy(root.sub_or_empty("policy", p), p);
    let store = parse_store(root.sub_or_empty("store", p), env, p);
    let keys = parse_keys(root.sub_or_empty("keys", p), p);
    let session = match root.sub("session", p) {
        Ok(Some(s)) => parse_session(s, p),
        _ => None,
    };
    let log = parse_log(root.sub_or_empty("log", p), p);
    let runtime = parse_runtime(root.sub_or_empty("runtime", p), p);
    root.finish(p);
    Config {
        listen,
        admin,
        upstream,
        tenant,
        auth,
        policy,
        store,
        keys,
        session,
        log,
        runtime,
    }
}

fn parse_listen(mut s: Section, p: &mut Problems) -> ListenConfig {
    let addr = s.socket_addr("addr", "0.0.0.0:8443", p);
    let trusted_proxies = s
        .strings("trusted_proxies", p)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, v)| match parse_trusted_proxy(&v) {
            Some(net) => Some(net),
            None => {
                p.push(key, format!("{} is not a CIDR or IP address", quote(&v)));
                None
            }
        })
        .collect();
    let header_timeout = s.duration("header_timeout", Duration::from_secs(10), false, p);
    let idle_timeout = s.duration("idle_timeout", Duration::from_secs(60), false, p);
    let max_connections = s.int_range("max_connections", 10_000, 1, i64::MAX, p);
    let shutdown_grace = s.duration("shutdown_grace", Duration::from_secs(30), true, p);
    let tls = match s.sub("tls", p) {
        Ok(Some(t)) => parse_tls(t, p),
        _ => None,
    };
    s.finish(p);
    ListenConfig {
        addr,
        trusted_proxies,
        header_timeout,
        idle_timeout,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        shutdown_grace,
        tls,
    }
}

fn parse_tls(mut s: Section, p: &mut Problems) -> Option<TlsConfig> {
    let required = |s: &Section, k: &str, p: &mut Problems| {
        if !s.has(k) {
            p.push(s.key(k), "required when [listen.tls] is present");
        }
    };
    required(&s, "cert", p);
    required(&s, "key", p);
    let cert = s.readable_file("cert", p);
    let key = s.readable_file("key", p);
    let handshake_timeout = s.duration("handshake_timeout", Duration::from_secs(10), false, p);
    s.finish(p);
    Some(TlsConfig {
        cert: cert?,
        key: key?,
        handshake_timeout,
    })
}

fn parse_admin(mut s: Section, p: &mut Problems) -> AdminConfig {
    let addr = s.socket_addr("addr", "127.0.0.1:9090", p);
    s.finish(p);
    AdminConfig { addr }
}

fn parse_upstream(
    section: Result<Option<Section>, ()>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> UpstreamConfig {
    let (mut s, report_missing) = match section {
        Ok(Some(s)) => (s, true),
        Ok(None) => (Section::new("upstream", toml::Table::new()), true),
        Err(()) => (Section::new("upstream", toml::Table::new()), false),
    };
    let url_key = s.key("url");
    let url = match s.string("url", p) {
        None => {
            if report_missing && !p.has(&url_key) {
                p.push(
                    url_key,
                    "required (the tenant app, e.g. \"http://127.0.0.1:8080\")",
                );
            }
            None
        }
        Some(v) => match check_http_url(&v, true) {
            Ok(u) => Some(u),
            Err(m) => {
                p.push(url_key, m);
                None
            }
        },
    };
    let connect_timeout = s.duration("connect_timeout", Duration::from_secs(2), false, p);
    let timeout = s.duration("timeout", Duration::from_secs(60), false, p);
    let authorization = s.secret("authorization", env, p).and_then(|secret| {
        let ok = !secret.expose().starts_with(char::is_whitespace)
            && !secret.expose().ends_with(char::is_whitespace)
            && http::HeaderValue::from_str(&format!("Bearer {}", secret.expose())).is_ok();
        if ok {
            Some(secret)
        } else {
            p.push(
                s.key("authorization"),
                "not usable in an Authorization header (control characters or surrounding whitespace; value not shown)",
            );
            None
        }
    });
    let ca_file = s.readable_file("ca_file", p);
    s.finish(p);
    UpstreamConfig {
        url: url.unwrap_or(http::Uri::from_static(PLACEHOLDER_URI)),
        connect_timeout,
        timeout,
        authorization,
        ca_file,
    }
}

fn parse_tenant(section: Result<Option<Section>, ()>, p: &mut Problems) -> TenantConfig {
    let mut s = match section {
        Ok(Some(s)) => s,
        Ok(None) => Section::new("tenant", toml::Table::new()),
        Err(()) => {
            // wrong type already reported; do not also report the slug missing
            return TenantConfig {
                slug: String::new(),
                domain: "moleculesai.app".into(),
                extra_hosts: vec![],
            };
        }
    };
    let slug = match s.string("slug", p) {
        None => {
            if !p.has("tenant.slug") {
                p.push("tenant.slug", "required (the tenant's name, e.g. \"acme\")");
            }
            String::new()
        }
        Some(v) => match check_slug(&v) {
            Ok(()) => v,
            Err(m) => {
                p.push("tenant.slug", m);
                String::new()
            }
        },
    };
    let domain = match s.string("domain", p) {
        None => "moleculesai.app".to_string(),
        Some(v) => match check_host(&v, false) {
            Ok(d) => d,
            Err(m) => {
                p.push("tenant.domain", m);
                "moleculesai.app".to_string()
            }
        },
    };
    let extra_hosts = s
        .strings("extra_hosts", p)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, v)| match check_host(&v, true) {
            Ok(h) => Some(h),
            Err(m) => {
                p.push(key, m);
                None
            }
        })
        .collect();
    s.finish(p);
    TenantConfig {
        slug,
        domain,
        extra_hosts,
    }
}

fn parse_forward_policy(s: &mut Section, k: &str, p: &mut Problems) -> ForwardPolicy {
    match s.choice(k, &["forward", "reject"], 0, p) {
        1 => ForwardPolicy::Reject,
        _ => ForwardPolicy::Forward,
    }
}

fn parse_auth(mut s: Section, p: &mut Problems) -> AuthConfig {
    let key_prefix = match s.string("key_prefix", p) {
        None => "mok_".to_string(),
        Some(v) => match check_key_prefix(&v) {
            Ok(()) => v,
            Err(m) => {
                p.push(s.key("key_prefix"), m);
                "mok_".to_string()
            }
        },
    };
    let default_header = HeaderName::from_static("x-molecule-principal");
    let principal_header = match s.string("principal_header", p) {
        None => default_header,
        Some(v) => match check_principal_header(&v) {
            Ok(h) => h,
            Err(m) => {
                p.push(s.key("principal_header"), m);
                default_header
            }
        },
    };
    let other_bearer = parse_forward_policy(&mut s, "other_bearer", p);
    let anonymous = parse_forward_policy(&mut s, "anonymous", p);
    let on_store_unavailable =
        match s.choice("on_store_unavailable", &["reject", "serve_cached"], 0, p) {
            1 => OutagePolicy::ServeCached,
            _ => OutagePolicy::Reject,
        };
    let max_stale = s.duration("max_stale", Duration::from_secs(30), true, p);
    let cache_ttl = s.duration("cache_ttl", Duration::from_secs(60), true, p);
    let cache_capacity = s.int_range("cache_capacity", 100_000, 1, i64::MAX, p);
    let negative_ttl = s.duration("negative_ttl", Duration::from_secs(5), true, p);
    s.finish(p);
    AuthConfig {
        key_prefix,
        principal_header,
        other_bearer,
        anonymous,
        on_store_unavailable,
        max_stale,
        cache_ttl,
        cache_capacity: usize::try_from(cache_capacity).unwrap_or(usize::MAX),
        negative_ttl,
    }
}

fn parse_policy(mut s: Section, p: &mut Problems) -> PolicyConfig {
    let deny_prefixes = match s.strings("deny_prefixes", p) {
        None => vec!["/cp/admin".to_string()],
        Some(items) => items
            .into_iter()
            .filter_map(|(key, v)| match check_deny_prefix(&v) {
                Ok(d) => Some(d),
                Err(m) => {
                    p.push(key, m);
                    None
                }
            })
            .collect(),
    };
    s.finish(p);
    PolicyConfig { deny_prefixes }
}

fn redis_secret(
    key: String,
    value: String,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<Secret> {
    let secret = resolve_secret(&key, value, env, p)?;
    match check_redis_url(secret.expose()) {
        Ok(()) => Some(secret),
        Err(m) => {
            p.push(key, m);
            None
        }
    }
}

fn redis_secrets(
    key: &str,
    items: Vec<(String, String)>,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<Vec<Secret>> {
    if items.is_empty() {
        p.push(key, "must list at least one node");
        return None;
    }
    let n = items.len();
    let nodes: Vec<Secret> = items
        .into_iter()
        .filter_map(|(k, v)| redis_secret(k, v, env, p))
        .collect();
    (nodes.len() == n).then_some(nodes)
}

/// `store.url` when none of url / cluster / sentinel is given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

fn parse_store(
    mut s: Section,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> StoreConfig {
    let memory = s.choice("backend", &["redis", "memory"], 0, p) == 1;
    let targets: Vec<&str> = ["url", "cluster", "sentinel"]
        .into_iter()
        .filter(|k| s.has(k))
        .collect();
    if memory {
        for k in &targets {
            p.push(s.key(k), "not used with backend = \"memory\"");
            s.take(k);
        }
    } else if targets.len() > 1 {
        p.push(
            "store",
            format!(
                "give exactly one of url, cluster or sentinel (found {})",
                targets.join(" and ")
            ),
        );
    }
    let url = s
        .string("url", p)
        .and_then(|v| redis_secret(s.key("url"), v, env, p));
    let cluster_key = s.key("cluster");
    let cluster = s
        .strings("cluster", p)
        .and_then(|items| redis_secrets(&cluster_key, items, env, p));
    let sentinel = match s.sub("sentinel", p) {
        Ok(Some(mut t)) => {
            let master = match t.string("master", p) {
                Some(m) if !m.is_empty() => Some(m),
                Some(_) => {
                    p.push(t.key("master"), "must not be empty");
                    None
                }
                None => {
                    if !p.has(&t.key("master")) {
                        p.push(t.key("master"), "required (the monitored master's name)");
                    }
                    None
                }
            };
            let nodes_key = t.key("nodes");
            let nodes = match t.strings("nodes", p) {
                Some(items) => redis_secrets(&nodes_key, items, env, p),
                None => {
                    if !p.has(&nodes_key) {
                        p.push(
                            nodes_key,
                            "required (sentinel addresses, redis://host:26379)",
                        );
                    }
                    None
                }
            };
            t.finish(p);
            master.zip(nodes)
        }
        _ => None,
    };
    let timeout = s.duration("timeout", Duration::from_millis(250), false, p);
    s.finish(p);
    let backend = if memory {
        StoreBackend::Memory
    } else if let Some(u) = url {
        StoreBackend::Redis(RedisTarget::Url(u))
    } else if let Some(c) = cluster {
        StoreBackend::Redis(RedisTarget::Cluster(c))
    } else if let Some((master, nodes)) = sentinel {
        StoreBackend::Redis(RedisTarget::Sentinel { master, nodes })
    } else if targets.is_empty() {
        // The contract's default: a Redis on the same host.
        StoreBackend::Redis(RedisTarget::Url(Secret::new(DEFAULT_REDIS_URL)))
    } else {
        // Only reached with a problem recorded above.
        StoreBackend::Memory
    };
    StoreConfig { backend, timeout }
}

fn parse_keys(mut s: Section, p: &mut Problems) -> KeysConfig {
    let max_live = s.int_range("max_live", 100, 1, i64::from(u32::MAX), p);
    s.finish(p);
    KeysConfig {
        max_live: u32::try_from(max_live).unwrap_or(100),
    }
}

fn parse_session(mut s: Section, p: &mut Problems) -> Option<SessionConfig> {
    let verify_url = match s.string("verify_url", p) {
        Some(v) => match check_http_url(&v, false) {
            Ok(u) => Some(u),
            Err(m) => {
                p.push(s.key("verify_url"), m);
                None
            }
        },
        None => {
            if !p.has("session.verify_url") {
                p.push("session.verify_url", "required when [session] is present");
            }
            None
        }
    };
    let cookie = match s.string("cookie", p) {
        Some(v) => match check_cookie_name(&v) {
            Ok(()) => Some(v),
            Err(m) => {
                p.push(s.key("cookie"), m);
                None
            }
        },
        None => {
            if !p.has("session.cookie") {
                p.push("session.cookie", "required when [session] is present");
            }
            None
        }
    };
    let timeout = s.duration("timeout", Duration::from_secs(2), false, p);
    let cache_ttl = s.duration("cache_ttl", Duration::from_secs(30), true, p);
    let negative_ttl = s.duration("negative_ttl", Duration::from_secs(5), true, p);
    s.finish(p);
    Some(SessionConfig {
        verify_url: verify_url?,
        cookie: cookie?,
        timeout,
        cache_ttl,
        negative_ttl,
    })
}

const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

fn parse_log(mut s: Section, p: &mut Problems) -> LogConfig {
    let format = match s.choice("format", &["json", "text"], 0, p) {
        1 => LogFormat::Text,
        _ => LogFormat::Json,
    };
    let level = LOG_LEVELS[s.choice("level", &LOG_LEVELS, 2, p)].to_string();
    let access = s.boolean("access", p).unwrap_or(true);
    s.finish(p);
    LogConfig {
        format,
        level,
        access,
    }
}

fn parse_runtime(mut s: Section, p: &mut Problems) -> RuntimeConfig {
    let worker_threads = s.int_range("worker_threads", 0, 0, 1024, p);
    s.finish(p);
    RuntimeConfig {
        worker_threads: usize::try_from(worker_threads).unwrap_or(0),
    }
}

// --- rendering ----------------------------------------------------------------

fn render_redacted(c: &Config) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let strs = |items: &mut dyn Iterator<Item = String>| -> String {
        let v: Vec<String> = items.map(|s| toml_string(&s)).collect();
        format!("[{}]", v.join(", "))
    };
    let d = |d: Duration| toml_string(&format_duration(d));
    let path = |p: &std::path::Path| toml_string(&p.to_string_lossy());
    let redis = |s: &Secret| toml_string(&redact_redis_url(s.expose()));

    let l = &c.listen;
    let _ = writeln!(o, "[listen]");
    let _ = writeln!(o, "addr = {}", toml_string(&l.addr.to_string()));
    let _ = writeln!(
        o,
        "trusted_proxies = {}",
        strs(&mut l.trusted_proxies.iter().map(|n| n.to_string()))
    );
    let _ = writeln!(o, "header_timeout = {}", d(l.header_timeout));
    let _ = writeln!(o, "idle_timeout = {}", d(l.idle_timeout));
    let _ = writeln!(o, "max_connections = {}", l.max_connections);
    let _ = writeln!(o, "shutdown_grace = {}", d(l.shutdown_grace));
    if let Some(t) = &l.tls {
        let _ = writeln!(o, "\n[listen.tls]");
        let _ = writeln!(o, "cert = {}", path(&t.cert));
        let _ = writeln!(o, "key = {}", path(&t.key));
        let _ = writeln!(o, "handshake_timeout = {}", d(t.handshake_timeout));
    }

    let _ = writeln!(o, "\n[admin]");
    let _ = writeln!(o, "addr = {}", toml_string(&c.admin.addr.to_string()));

    let u = &c.upstream;
    let _ = writeln!(o, "\n[upstream]");
    // origin only (validated): print it without the `/` that `Uri` adds
    let origin = match (u.url.scheme_str(), u.url.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => u.url.to_string(),
    };
    let _ = writeln!(o, "url = {}", toml_string(&origin));
    let _ = writeln!(o, "connect_timeout = {}", d(u.connect_timeout));
    let _ = writeln!(o, "timeout = {}", d(u.timeout));
    if u.authorization.is_some() {
        let _ = writeln!(o, "authorization = {}", toml_string(REDACTED));
    }
    if let Some(ca) = &u.ca_file {
        let _ = writeln!(o, "ca_file = {}", path(ca));
    }

    let t = &c.tenant;
    let _ = writeln!(o, "\n[tenant]");
    let _ = writeln!(o, "slug = {}", toml_string(&t.slug));
    let _ = writeln!(o, "domain = {}", toml_string(&t.domain));
    let _ = writeln!(
        o,
        "extra_hosts = {}",
        strs(&mut t.extra_hosts.iter().cloned())
    );

    let a = &c.auth;
    let fwd = |f: ForwardPolicy| match f {
        ForwardPolicy::Forward => "\"forward\"",
        ForwardPolicy::Reject => "\"reject\"",
    };
    let _ = writeln!(o, "\n[auth]");
    let _ = writeln!(o, "key_prefix = {}", toml_string(&a.key_prefix));
    let _ = writeln!(
        o,
        "principal_header = {}",
        toml_string(a.principal_header.as_str())
    );
    let _ = writeln!(o, "other_bearer = {}", fwd(a.other_bearer));
    let _ = writeln!(o, "anonymous = {}", fwd(a.anonymous));
    let outage = match a.on_store_unavailable {
        OutagePolicy::Reject => "\"reject\"",
        OutagePolicy::ServeCached => "\"serve_cached\"",
    };
    let _ = writeln!(o, "on_store_unavailable = {outage}");
    let _ = writeln!(o, "max_stale = {}", d(a.max_stale));
    let _ = writeln!(o, "cache_ttl = {}", d(a.cache_ttl));
    let _ = writeln!(o, "cache_capacity = {}", a.cache_capacity);
    let _ = writeln!(o, "negative_ttl = {}", d(a.negative_ttl));

    let _ = writeln!(o, "\n[policy]");
    let _ = writeln!(
        o,
        "deny_prefixes = {}",
        strs(&mut c.policy.deny_prefixes.iter().cloned())
    );

    let _ = writeln!(o, "\n[store]");
    match &c.store.backend {
        StoreBackend::Memory => {
            let _ = writeln!(o, "backend = \"memory\"");
        }
        StoreBackend::Redis(target) => {
            let _ = writeln!(o, "backend = \"redis\"");
            match target {
                RedisTarget::Url(u) => {
                    let _ = writeln!(o, "url = {}", redis(u));
                }
                RedisTarget::Cluster(nodes) => {
                    let v: Vec<String> = nodes.iter().map(redis).collect();
                    let _ = writeln!(o, "cluster = [{}]", v.join(", "));
                }
                RedisTarget::Sentinel { master, nodes } => {
                    let v: Vec<String> = nodes.iter().map(redis).collect();
                    let _ = writeln!(
                        o,
                        "sentinel = {{ master = {}, nodes = [{}] }}",
                        toml_string(master),
                        v.join(", ")
                    );
                }
            }
        }
    }
    let _ = writeln!(o, "timeout = {}", d(c.store.timeout));

    let _ = writeln!(o, "\n[keys]");
    let _ = writeln!(o, "max_live = {}", c.keys.max_live);

    if let Some(s) = &c.session {
        let _ = writeln!(o, "\n[session]");
        let _ = writeln!(o, "verify_url = {}", toml_string(&s.verify_url.to_string()));
        let _ = writeln!(o, "cookie = {}", toml_string(&s.cookie));
        let _ = writeln!(o, "timeout = {}", d(s.timeout));
        let _ = writeln!(o, "cache_ttl = {}", d(s.cache_ttl));
        let _ = writeln!(o, "negative_ttl = {}", d(s.negative_ttl));
    }

    let _ = writeln!(o, "\n[log]");
    let format = match c.log.format {
        LogFormat::Json => "\"json\"",
        LogFormat::Text => "\"text\"",
    };
    let _ = writeln!(o, "format = {format}");
    let _ = writeln!(o, "level = {}", toml_string(&c.log.level));
    let _ = writeln!(o, "access = {}", c.log.access);

    let _ = writeln!(o, "\n[runtime]");
    let _ = writeln!(o, "worker_threads = {}", c.runtime.worker_threads);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/keygate.example.toml");

    const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:8080"
[tenant]
slug = "acme"
[store]
url = "redis://127.0.0.1:6379/0"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &no_env)
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Ok(_) => panic!("expected problems, config was accepted:\n{text}"),
            Err(e) => e.problems,
        }
    }

    fn keys(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.key).collect()
    }

    /// MINIMAL plus `extra` (sections that MINIMAL does not have).
    fn with(extra: &str) -> String {
        format!("{MINIMAL}\n{extra}")
    }

    /// MINIMAL with `[section]`'s body extended by `body`.
    fn in_section(section: &str, body: &str) -> String {
        let header = format!("[{section}]\n");
        if MINIMAL.contains(&header) {
            MINIMAL.replace(&header, &format!("{header}{body}\n"))
        } else {
            format!("{MINIMAL}\n{header}{body}\n")
        }
    }

    /// The single problem of `text`, which must be keyed `key`.
    fn one_problem(text: &str, key: &str) -> String {
        let ps = problems(text);
        assert_eq!(ps.len(), 1, "expected one problem for {key}, got {ps:?}");
        assert_eq!(ps[0].key, key, "{ps:?}");
        ps[0].message.clone()
    }

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = ok(MINIMAL);
        assert_eq!(c.listen.addr, "0.0.0.0:8443".parse().unwrap());
        assert!(c.listen.trusted_proxies.is_empty());
        assert_eq!(c.listen.header_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.listen.max_connections, 10_000);
        assert_eq!(c.listen.shutdown_grace, Duration::from_secs(30));
        assert!(c.listen.tls.is_none());
        assert_eq!(c.admin.addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.upstream.url, "http://127.0.0.1:8080");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.timeout, Duration::from_secs(60));
        assert!(c.upstream.authorization.is_none());
        assert!(c.upstream.ca_file.is_none());
        assert_eq!(c.tenant.slug, "acme");
        assert_eq!(c.tenant.domain, "moleculesai.app");
        assert!(c.tenant.extra_hosts.is_empty());
        assert_eq!(c.tenant.served_hosts(), vec!["acme.moleculesai.app"]);
        assert_eq!(c.auth.key_prefix, "mok_");
        assert_eq!(c.auth.principal_header.as_str(), "x-molecule-principal");
        assert_eq!(c.auth.other_bearer, ForwardPolicy::Forward);
        assert_eq!(c.auth.anonymous, ForwardPolicy::Forward);
        assert_eq!(c.auth.on_store_unavailable, OutagePolicy::Reject);
        assert_eq!(c.auth.max_stale, Duration::from_secs(30));
        assert_eq!(c.auth.cache_ttl, Duration::from_secs(60));
        assert_eq!(c.auth.cache_capacity, 100_000);
        assert_eq!(c.auth.negative_ttl, Duration::from_secs(5));
        assert_eq!(c.policy.deny_prefixes, vec!["/cp/admin"]);
        match &c.store.backend {
            StoreBackend::Redis(RedisTarget::Url(u)) => {
                assert_eq!(u.expose(), "redis://127.0.0.1:6379/0")
            }
            other => panic!("unexpected backend {other:?}"),
        }
        assert_eq!(c.store.timeout, Duration::from_millis(250));
        assert_eq!(c.keys.max_live, 100);
        assert!(c.session.is_none());
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info");
        assert!(c.log.access);
        assert_eq!(c.runtime.worker_threads, 0);
    }

    #[test]
    fn defaults_match_for_tests() {
        // for_tests documents itself as "every other value at its default".
        let parsed = ok(MINIMAL);
        let t = Config::for_tests("acme", "http://127.0.0.1:8080".parse().unwrap());
        let strip = |s: String| {
            s.lines()
                .filter(|l| !l.starts_with("addr =") && !l.starts_with("url ="))
                .filter(|l| !l.starts_with("backend ="))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(parsed.to_redacted_toml()),
            strip(t.to_redacted_toml())
        );
    }

    #[test]
    fn empty_document_names_the_required_keys() {
        assert_eq!(keys(""), vec!["upstream.url", "tenant.slug"]);
    }

    #[test]
    fn syntax_error_is_one_problem_with_line_and_column() {
        let ps = problems("[listen]\naddr = \"0.0.0.0:1\"\nmax_connections = = 3\n");
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(ps[0].key, "config");
        assert!(ps[0].message.contains("line 3"), "{}", ps[0].message);
        assert!(ps[0].message.contains("column"), "{}", ps[0].message);
        assert!(!ps[0].message.contains('\n'));
        // duplicate keys are syntax errors too
        let ps = problems(&in_section("tenant", "slug = \"b\""));
        assert_eq!(ps[0].key, "config");
    }

    #[test]
    fn three_mistakes_give_exactly_three_problems() {
        let text = r#"
[listen]
adress = "0.0.0.0:8443"

[upstream]
url = "ftp://127.0.0.1:8080"

[tenant]
slug = "acme"

[policy]
deny_prefixes = ["cp/admin"]

[store]
url = "redis://127.0.0.1:6379/0"
"#;
        let err = parse(text).unwrap_err();
        let ks: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            ks,
            vec!["listen.adress", "upstream.url", "policy.deny_prefixes[0]"]
        );
        let shown = err.to_string();
        assert_eq!(shown.lines().count(), 3);
        assert!(shown.contains("listen.adress: unknown key"), "{shown}");
        assert!(shown.contains("upstream.url: must start with http:// or https://"));
        assert!(shown.contains("policy.deny_prefixes[0]: \"cp/admin\" must start with '/'"));
    }

    #[test]
    fn unknown_keys_at_every_level() {
        let tls = tempfile::NamedTempFile::new().unwrap();
        let p = tls.path().display();
        let text = format!(
            r#"
verbose = true
[listen]
adress = "x"
[listen.tls]
cert = "{p}"
key = "{p}"
ciphers = []
[listen.extra]
a = 1
[upstream]
url = "http://127.0.0.1:8080"
[tenant]
slug = "acme"
[store]
sentinel = {{ master = "m", nodes = ["redis://h:26379"], quorum = 2 }}
[session]
verify_url = "https://example.com/check"
cookie = "sid"
cookei = "x"
[metrics]
on = true
"#
        );
        let mut ks = keys(&text);
        ks.sort();
        assert_eq!(
            ks,
            vec![
                "listen.adress",
                "listen.extra",
                "listen.tls.ciphers",
                "metrics",
                "session.cookei",
                "store.sentinel.quorum",
                "verbose",
            ]
        );
        let msg = problems(&with("[metrics]\non = true"));
        assert_eq!(msg[0].to_string(), "metrics: unknown key");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let text = r#"
log = "json"
[listen]
max_connections = "10"
trusted_proxies = "10.0.0.0/8"
idle_timeout = 60
[upstream]
url = "http://127.0.0.1:8080"
[tenant]
slug = "acme"
extra_hosts = ["ok.example", 5]
[store]
url = "redis://127.0.0.1:6379/0"
[runtime]
worker_threads = 1.5
"#;
        let ps = problems(text);
        let got: Vec<(String, String)> = ps.into_iter().map(|p| (p.key, p.message)).collect();
        let expect = [
            (
                "listen.trusted_proxies",
                "expected an array of strings, found string",
            ),
            (
                "listen.idle_timeout",
                "expected a duration string like \"5s\", found integer",
            ),
            (
                "listen.max_connections",
                "expected an integer, found string",
            ),
            ("tenant.extra_hosts[1]", "expected a string, found integer"),
            ("log", "expected a table, found string"),
            ("runtime.worker_threads", "expected an integer, found float"),
        ];
        assert_eq!(got.len(), expect.len(), "{got:?}");
        for (k, m) in expect {
            assert!(
                got.iter().any(|(gk, gm)| gk == k && gm == m),
                "missing {k}: {m} in {got:?}"
            );
        }
        let text = format!(
            "upstream = 5\n{}",
            MINIMAL.replace("[upstream]\n", "[other]\n")
        );
        assert_eq!(keys(&text), vec!["upstream", "other"], "{text}");
    }

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("250ms", Some(250)),
            ("5s", Some(5_000)),
            ("1m", Some(60_000)),
            ("1h", Some(3_600_000)),
            ("0s", Some(0)),
            ("5", None),
            ("s", None),
            ("-5s", None),
            (" 5s", None),
            ("5 s", None),
            ("5S", None),
            ("1.5s", None),
            ("5d", None),
            ("", None),
            ("99999999999999h", None),
        ];
        for (s, ms) in cases {
            assert_eq!(
                parse_duration(s),
                ms.map(Duration::from_millis),
                "parse_duration({s:?})"
            );
        }
        let c = ok(&in_section("store", "timeout = \"1h\""));
        assert_eq!(c.store.timeout, Duration::from_secs(3600));
        let m = one_problem(&in_section("store", "timeout = \"5x\""), "store.timeout");
        assert!(m.contains("\"5x\" is not a duration"), "{m}");
        // zero: refused for timeouts, allowed where it means "none"
        let m = one_problem(
            &in_section("upstream", "timeout = \"0s\""),
            "upstream.timeout",
        );
        assert_eq!(m, "must be greater than zero");
        one_problem(
            &with("[listen]\nheader_timeout = \"0ms\""),
            "listen.header_timeout",
        );
        let c = ok(&with(
            "[listen]\nshutdown_grace = \"0s\"\n[auth]\nnegative_ttl = \"0s\"\ncache_ttl = \"0s\"",
        ));
        assert_eq!(c.listen.shutdown_grace, Duration::ZERO);
        assert_eq!(c.auth.negative_ttl, Duration::ZERO);
    }

    #[test]
    fn duration_rendering_round_trips() {
        for ms in [
            0u64, 1, 250, 1_000, 1_500, 60_000, 90_000, 3_600_000, 7_200_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Some(d), "{ms}ms");
        }
    }

    #[test]
    fn socket_addresses() {
        let c = ok(&with(
            "[listen]\naddr = \"[::]:443\"\n[admin]\naddr = \"127.0.0.1:1\"",
        ));
        assert_eq!(c.listen.addr, "[::]:443".parse().unwrap());
        let m = one_problem(&with("[listen]\naddr = \"0.0.0.0\""), "listen.addr");
        assert!(m.contains("is not a socket address"), "{m}");
        one_problem(&with("[admin]\naddr = \"localhost:9090\""), "admin.addr");
        one_problem(&with("[listen]\naddr = \"127.0.0.1:9090\""), "admin.addr");
        // port 0 (tests) may be shared
        ok(&with(
            "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"",
        ));
    }

    #[test]
    fn trusted_proxies_take_cidrs_and_bare_ips() {
        let c = ok(&with(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\", \"::1\"]",
        ));
        let got: Vec<String> = c
            .listen
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            got,
            vec!["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "::1/128"]
        );
        let ks = keys(&with(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/33\", \"ok\", \"10.0.0.1\"]",
        ));
        assert_eq!(
            ks,
            vec!["listen.trusted_proxies[0]", "listen.trusted_proxies[1]"]
        );
    }

    #[test]
    fn integer_ranges() {
        one_problem(
            &with("[listen]\nmax_connections = 0"),
            "listen.max_connections",
        );
        one_problem(
            &with("[listen]\nmax_connections = -5"),
            "listen.max_connections",
        );
        one_problem(&with("[keys]\nmax_live = 0"), "keys.max_live");
        one_problem(&with("[keys]\nmax_live = 4294967296"), "keys.max_live");
        one_problem(&with("[auth]\ncache_capacity = 0"), "auth.cache_capacity");
        one_problem(
            &with("[runtime]\nworker_threads = -1"),
            "runtime.worker_threads",
        );
        let c = ok(&with(
            "[listen]\nmax_connections = 1\n[keys]\nmax_live = 1\n[runtime]\nworker_threads = 4\n[auth]\ncache_capacity = 10",
        ));
        assert_eq!(c.listen.max_connections, 1);
        assert_eq!(c.keys.max_live, 1);
        assert_eq!(c.runtime.worker_threads, 4);
        assert_eq!(c.auth.cache_capacity, 10);
    }

    #[test]
    fn upstream_urls() {
        let good = [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "https://app.internal",
            "http://[::1]:3000",
            "HTTP://app:1",
        ];
        for u in good {
            ok(&MINIMAL.replace("http://127.0.0.1:8080", u));
        }
        let bad = [
            ("ftp://app", "must start with http:// or https://"),
            ("127.0.0.1:8080", "must start with http:// or https://"),
            ("/relative", "must start with http:// or https://"),
            ("http://user:pw@app:8080", "userinfo"),
            ("http://app:8080/base", "must not have a path"),
            ("http://app:8080/?x=1", "must not have a query string"),
            ("http://app?", "must not have a query string"),
            ("http://app:99999", ""),
            ("http://app:0", "invalid port"),
            ("http://", ""),
            ("not a url", ""),
            ("", ""),
        ];
        for (u, want) in bad {
            let m = one_problem(&MINIMAL.replace("http://127.0.0.1:8080", u), "upstream.url");
            assert!(m.contains(want), "{u}: {m}");
            if u.contains("pw") {
                assert!(!m.contains("pw"), "message echoes userinfo: {m}");
            }
        }
    }

    #[test]
    fn tenant_slug() {
        for s in ["acme", "a", "acme-2", "0day"] {
            assert_eq!(
                ok(&MINIMAL.replace("\"acme\"", &format!("\"{s}\"")))
                    .tenant
                    .slug,
                s
            );
        }
        for s in [
            "",
            "Acme",
            "-acme",
            "acme-",
            "ac_me",
            "ac.me",
            "acmé",
            &"a".repeat(64),
        ] {
            one_problem(
                &MINIMAL.replace("\"acme\"", &format!("\"{s}\"")),
                "tenant.slug",
            );
        }
    }

    #[test]
    fn tenant_domain_and_extra_hosts() {
        let c = ok(&in_section(
            "tenant",
            "domain = \"Example.COM.\"\nextra_hosts = [\"localhost\", \"127.0.0.1\", \"[::1]\", \"::2\", \"Api.Example.com\"]",
        ));
        assert_eq!(c.tenant.domain, "example.com");
        assert_eq!(
            c.tenant.extra_hosts,
            vec![
                "localhost",
                "127.0.0.1",
                "[::1]",
                "[::2]",
                "api.example.com"
            ]
        );
        assert_eq!(c.tenant.served_hosts()[0], "acme.example.com");
        for bad in [
            "https://example.com",
            "example.com:443",
            "example.com/x",
            "exa mple.com",
            "-bad.com",
            "bad-.com",
            "a..b",
            "",
            "1.2.3",
            "[::1]:80",
            "[zz]",
            "user@example.com",
            "ex_ample.com",
        ] {
            let text = in_section("tenant", &format!("extra_hosts = [{}]", toml_string(bad)));
            one_problem(&text, "tenant.extra_hosts[0]");
        }
        one_problem(
            &in_section("tenant", "domain = \"moleculesai.app:443\""),
            "tenant.domain",
        );
        one_problem(
            &in_section("tenant", "domain = \"10.0.0.1\""),
            "tenant.domain",
        );
        one_problem(&in_section("tenant", "domain = \"\""), "tenant.domain");
    }

    #[test]
    fn auth_key_prefix_and_principal_header() {
        assert_eq!(
            ok(&with("[auth]\nkey_prefix = \"Org_Key9\""))
                .auth
                .key_prefix,
            "Org_Key9"
        );
        for bad in ["", "mok-", "mok ", "a_very_long_prefix_", "ключ"] {
            one_problem(
                &with(&format!("[auth]\nkey_prefix = {}", toml_string(bad))),
                "auth.key_prefix",
            );
        }
        let c = ok(&with("[auth]\nprincipal_header = \"X-Org-Principal\""));
        assert_eq!(c.auth.principal_header.as_str(), "x-org-principal");
        for bad in [
            "",
            "X Principal",
            "X-Principal:",
            "Host",
            "authorization",
            "Connection",
            "Content-Length",
            "transfer_encoding",
            "Cookie",
            "X-Forwarded-For",
            "x_forwarded.user",
            "Forwarded",
            "Upgrade",
            "TE",
            "Proxy-Authorization",
            "X-Request-Id",
        ] {
            one_problem(
                &with(&format!("[auth]\nprincipal_header = {}", toml_string(bad))),
                "auth.principal_header",
            );
        }
    }

    #[test]
    fn auth_policies() {
        let c = ok(&with(
            "[auth]\nother_bearer = \"reject\"\nanonymous = \"reject\"\non_store_unavailable = \"serve_cached\"\nmax_stale = \"2m\"\ncache_ttl = \"10s\"\nnegative_ttl = \"1s\"",
        ));
        assert_eq!(c.auth.other_bearer, ForwardPolicy::Reject);
        assert_eq!(c.auth.anonymous, ForwardPolicy::Reject);
        assert_eq!(c.auth.on_store_unavailable, OutagePolicy::ServeCached);
        assert_eq!(c.auth.max_stale, Duration::from_secs(120));
        assert_eq!(c.auth.cache_ttl, Duration::from_secs(10));
        assert_eq!(c.auth.negative_ttl, Duration::from_secs(1));
        let ks = keys(&with(
            "[auth]\nother_bearer = \"Forward\"\nanonymous = \"allow\"\non_store_unavailable = \"forward\"",
        ));
        assert_eq!(
            ks,
            vec![
                "auth.other_bearer",
                "auth.anonymous",
                "auth.on_store_unavailable"
            ]
        );
        let m = one_problem(&with("[auth]\nanonymous = \"allow\""), "auth.anonymous");
        assert_eq!(m, "\"allow\" is not one of \"forward\", \"reject\"");
    }

    #[test]
    fn deny_prefixes_are_lower_cased_and_start_with_slash() {
        let c = ok(&with(
            "[policy]\ndeny_prefixes = [\"/CP/Admin\", \"/internal/\"]",
        ));
        assert_eq!(c.policy.deny_prefixes, vec!["/cp/admin", "/internal/"]);
        assert!(ok(&with("[policy]\ndeny_prefixes = []"))
            .policy
            .deny_prefixes
            .is_empty());
        let ks = keys(&with(
            "[policy]\ndeny_prefixes = [\"/ok\", \"cp/admin\", \"/a b\", \"/x?y\", \"\"]",
        ));
        assert_eq!(
            ks,
            vec![
                "policy.deny_prefixes[1]",
                "policy.deny_prefixes[2]",
                "policy.deny_prefixes[3]",
                "policy.deny_prefixes[4]",
            ]
        );
    }

    fn store(body: &str) -> String {
        let base = MINIMAL.replace("[store]\nurl = \"redis://127.0.0.1:6379/0\"\n", "");
        format!("{base}\n[store]\n{body}\n")
    }

    #[test]
    fn store_targets() {
        let c = ok(&store("backend = \"memory\""));
        assert!(matches!(c.store.backend, StoreBackend::Memory));
        let c = ok(&store(
            "cluster = [\"redis://10.0.0.1:6379\", \"rediss://10.0.0.2:6379\"]",
        ));
        match c.store.backend {
            StoreBackend::Redis(RedisTarget::Cluster(n)) => assert_eq!(n.len(), 2),
            other => panic!("{other:?}"),
        }
        let c = ok(&store(
            "sentinel = { master = \"keygate\", nodes = [\"redis://10.0.0.1:26379\"] }",
        ));
        match c.store.backend {
            StoreBackend::Redis(RedisTarget::Sentinel { master, nodes }) => {
                assert_eq!(master, "keygate");
                assert_eq!(nodes.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let c = ok(&store("url = \"rediss://:pw@cache.internal:6380/2\""));
        assert!(matches!(
            c.store.backend,
            StoreBackend::Redis(RedisTarget::Url(_))
        ));

        // no target: the contract's default URL; several: one problem naming `store`
        let c = ok(&store("timeout = \"1s\""));
        match c.store.backend {
            StoreBackend::Redis(RedisTarget::Url(u)) => assert_eq!(u.expose(), DEFAULT_REDIS_URL),
            other => panic!("{other:?}"),
        }
        let m = one_problem(
            &store("url = \"redis://a:6379\"\ncluster = [\"redis://b:6379\"]"),
            "store",
        );
        assert!(m.contains("url and cluster"), "{m}");
        // memory with a target: the target is named
        one_problem(
            &store("backend = \"memory\"\nurl = \"redis://a:6379\""),
            "store.url",
        );
        one_problem(
            &store("backend = \"etcd\"\nurl = \"redis://a:6379\""),
            "store.backend",
        );

        // URL rules
        for bad in [
            "http://a:6379",
            "redis://",
            "redis://a:6379/zero",
            "redis://a:6379/0?protocol=resp3",
            "unix:///tmp/redis.sock",
            "redis://0.0.0.0:6379",
            "",
        ] {
            one_problem(&store(&format!("url = {}", toml_string(bad))), "store.url");
        }
        one_problem(&store("cluster = []"), "store.cluster");
        one_problem(
            &store("cluster = [\"redis://a:1\", \"http://b:1\"]"),
            "store.cluster[1]",
        );
        one_problem(
            &store("sentinel = { master = \"\", nodes = [\"redis://a:1\"] }"),
            "store.sentinel.master",
        );
        one_problem(
            &store("sentinel = { nodes = [\"redis://a:1\"] }"),
            "store.sentinel.master",
        );
        one_problem(
            &store("sentinel = { master = \"m\" }"),
            "store.sentinel.nodes",
        );
        one_problem(
            &store("sentinel = { master = \"m\", nodes = [\"redis://a:1\", \"x\"] }"),
            "store.sentinel.nodes[1]",
        );
        one_problem(&store("sentinel = \"redis://a:1\""), "store.sentinel");
    }

    #[test]
    fn session_section() {
        let c = ok(&with(
            "[session]\nverify_url = \"https://api.moleculesai.app/cp/auth/tenant-member?slug=acme\"\ncookie = \"wos-session\"",
        ));
        let s = c.session.expect("session");
        assert_eq!(
            s.verify_url,
            "https://api.moleculesai.app/cp/auth/tenant-member?slug=acme"
        );
        assert_eq!(s.cookie, "wos-session");
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.cache_ttl, Duration::from_secs(30));
        assert_eq!(s.negative_ttl, Duration::from_secs(5));

        assert_eq!(
            keys(&with("[session]\ntimeout = \"1s\"")),
            vec!["session.verify_url", "session.cookie"]
        );
        one_problem(
            &with("[session]\nverify_url = \"ftp://x\"\ncookie = \"sid\""),
            "session.verify_url",
        );
        one_problem(
            &with("[session]\nverify_url = \"https://u:p@x/check\"\ncookie = \"sid\""),
            "session.verify_url",
        );
        for bad in ["", "a b", "a;b", "a=b", "sé"] {
            one_problem(
                &with(&format!(
                    "[session]\nverify_url = \"https://x/c\"\ncookie = {}",
                    toml_string(bad)
                )),
                "session.cookie",
            );
        }
        one_problem(
            &with("[session]\nverify_url = \"https://x/c\"\ncookie = \"s\"\ntimeout = \"0s\""),
            "session.timeout",
        );
    }

    #[test]
    fn log_and_runtime() {
        let c = ok(&with(
            "[log]\nformat = \"text\"\nlevel = \"debug\"\naccess = false",
        ));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "debug");
        assert!(!c.log.access);
        assert_eq!(
            keys(&with(
                "[log]\nformat = \"yaml\"\nlevel = \"verbose\"\naccess = \"yes\""
            )),
            vec!["log.format", "log.level", "log.access"]
        );
        one_problem(
            &with("[runtime]\nworker_threads = 100000"),
            "runtime.worker_threads",
        );
    }

    #[test]
    fn tls_files_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, "cert").unwrap();
        std::fs::write(&key, "key").unwrap();
        let tls = |c: &std::path::Path, k: &std::path::Path, extra: &str| {
            with(&format!(
                "[listen.tls]\ncert = {}\nkey = {}\n{extra}",
                toml_string(&c.display().to_string()),
                toml_string(&k.display().to_string())
            ))
        };
        let c = ok(&tls(&cert, &key, ""));
        let t = c.listen.tls.expect("tls");
        assert_eq!(t.cert, cert);
        assert_eq!(t.key, key);
        assert_eq!(t.handshake_timeout, Duration::from_secs(10));
        let c = ok(&tls(&cert, &key, "handshake_timeout = \"3s\""));
        assert_eq!(
            c.listen.tls.unwrap().handshake_timeout,
            Duration::from_secs(3)
        );

        let missing = dir.path().join("nope.key");
        let m = one_problem(&tls(&cert, &missing, ""), "listen.tls.key");
        assert!(m.starts_with("cannot read"), "{m}");
        one_problem(&tls(dir.path(), &key, ""), "listen.tls.cert");
        assert_eq!(
            keys(&with("[listen.tls]\nhandshake_timeout = \"1s\"")),
            vec!["listen.tls.cert", "listen.tls.key"]
        );
        // [listen.tls] given inline is the same table
        let inline = MINIMAL.to_string()
            + &format!(
                "[listen]\ntls = {{ cert = {}, key = {} }}\n",
                toml_string(&cert.display().to_string()),
                toml_string(&key.display().to_string())
            );
        assert!(ok(&inline).listen.tls.is_some());
    }

    #[test]
    fn upstream_ca_file() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let c = ok(&in_section(
            "upstream",
            &format!(
                "ca_file = {}",
                toml_string(&ca.path().display().to_string())
            ),
        ));
        assert_eq!(c.upstream.ca_file.as_deref(), Some(ca.path()));
        one_problem(
            &in_section("upstream", "ca_file = \"/nonexistent/keygate/ca.pem\""),
            "upstream.ca_file",
        );
    }

    const SECRET: &str = "s3cr3t-Admin-Token-7f9";
    const REDIS_PW: &str = "r3dis-Passw0rd-x1";

    fn test_env(name: &str) -> Option<String> {
        match name {
            "TENANT_ADMIN_TOKEN" => Some(SECRET.to_string()),
            "KEYGATE_REDIS_URL" => {
                Some(format!("redis://keygate:{REDIS_PW}@cache.internal:6379/3"))
            }
            "NODE_A" => Some(format!("redis://:{REDIS_PW}@10.0.0.1:6379")),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    const WITH_SECRETS: &str = r#"
[upstream]
url = "http://127.0.0.1:8080"
authorization = "env:TENANT_ADMIN_TOKEN"
[tenant]
slug = "acme"
[store]
url = "env:KEYGATE_REDIS_URL"
"#;

    #[test]
    fn env_secrets_are_resolved_through_the_callback() {
        let c = Config::from_toml_str(WITH_SECRETS, &test_env).unwrap();
        assert_eq!(c.upstream.authorization.as_ref().unwrap().expose(), SECRET);
        match &c.store.backend {
            StoreBackend::Redis(RedisTarget::Url(u)) => {
                assert_eq!(
                    u.expose(),
                    format!("redis://keygate:{REDIS_PW}@cache.internal:6379/3")
                )
            }
            other => panic!("{other:?}"),
        }
        // literal secrets work too
        let lit = WITH_SECRETS.replace("env:TENANT_ADMIN_TOKEN", "literal-token");
        let c = Config::from_toml_str(&lit, &test_env).unwrap();
        assert_eq!(c.upstream.authorization.unwrap().expose(), "literal-token");
        // cluster and sentinel entries
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            "cluster = [\"env:NODE_A\", \"redis://10.0.0.2:6379\"]",
        );
        assert!(Config::from_toml_str(&text, &test_env).is_ok());
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            "sentinel = { master = \"m\", nodes = [\"env:NODE_A\"] }",
        );
        assert!(Config::from_toml_str(&text, &test_env).is_ok());
    }

    #[test]
    fn missing_env_variables_are_named_problems() {
        let err = Config::from_toml_str(WITH_SECRETS, &no_env).unwrap_err();
        let shown = err.to_string();
        assert_eq!(
            shown,
            "upstream.authorization: environment variable TENANT_ADMIN_TOKEN is not set\n\
             store.url: environment variable KEYGATE_REDIS_URL is not set"
        );
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            "cluster = [\"redis://a:1\", \"env:NODE_B\"]\n",
        );
        let err = Config::from_toml_str(&text, &test_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "store.cluster[1]: environment variable NODE_B is not set"
        );
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            "sentinel = { master = \"m\", nodes = [\"env:NODE_C\"] }",
        );
        let err = Config::from_toml_str(&text, &test_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "store.sentinel.nodes[0]: environment variable NODE_C is not set"
        );
        let text = WITH_SECRETS.replace("env:TENANT_ADMIN_TOKEN", "env:EMPTY");
        let err = Config::from_toml_str(&text, &test_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "upstream.authorization: environment variable EMPTY is empty"
        );
        let text = WITH_SECRETS.replace("env:TENANT_ADMIN_TOKEN", "env:");
        let err = Config::from_toml_str(&text, &test_env).unwrap_err();
        assert_eq!(err.problems[0].key, "upstream.authorization");
    }

    #[test]
    fn secrets_never_appear_in_problems() {
        // an invalid redis URL from the environment, an unusable authorization value
        let env = |name: &str| match name {
            "BAD_URL" => Some(format!("http://:{REDIS_PW}@cache:6379")),
            "BAD_TOKEN" => Some(format!("{SECRET}\n")),
            _ => None,
        };
        let text = WITH_SECRETS
            .replace("env:TENANT_ADMIN_TOKEN", "env:BAD_TOKEN")
            .replace("env:KEYGATE_REDIS_URL", "env:BAD_URL");
        let err = Config::from_toml_str(&text, &env).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        let shown = format!("{err}\n{err:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains(REDIS_PW), "{shown}");
        // literal secrets that are invalid are not echoed either
        let text = MINIMAL.replace(
            "redis://127.0.0.1:6379/0",
            &format!("http://u:{REDIS_PW}@h:1"),
        );
        let shown = parse(&text).unwrap_err().to_string();
        assert!(!shown.contains(REDIS_PW), "{shown}");
    }

    #[test]
    fn redaction_hides_every_secret() {
        let c = Config::from_toml_str(WITH_SECRETS, &test_env).unwrap();
        let out = c.to_redacted_toml();
        let dbg = format!("{c:?}");
        for text in [&out, &dbg] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(!text.contains(REDIS_PW), "{text}");
        }
        assert!(out.contains("authorization = \"[redacted]\""), "{out}");
        assert!(
            out.contains("url = \"redis://keygate:[redacted]@cache.internal:6379/3\""),
            "{out}"
        );
        let text = MINIMAL.replace(
            "url = \"redis://127.0.0.1:6379/0\"",
            "sentinel = { master = \"m\", nodes = [\"env:NODE_A\"] }",
        );
        let c = Config::from_toml_str(&text, &test_env).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains(REDIS_PW) && !format!("{c:?}").contains(REDIS_PW));
        assert!(
            out.contains("nodes = [\"redis://:[redacted]@10.0.0.1:6379\"]"),
            "{out}"
        );
    }

    #[test]
    fn redis_url_redaction() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:pw@h:1/0", "redis://:[redacted]@h:1/0"),
            ("rediss://user:p@ss@h:1", "rediss://user:[redacted]@h:1"),
            ("redis://lonetoken@h", "redis://[redacted]@h"),
            (
                "rediss://u:pw@h#insecure",
                "rediss://u:[redacted]@h#insecure",
            ),
            ("garbage", "[redacted]"),
        ];
        for (input, shown) in cases {
            assert_eq!(redact_redis_url(input), shown, "{input}");
        }
    }

    /// Parse `text`, render, put the secrets back, parse again: same rendering.
    fn assert_round_trip(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        secrets: &[(&str, &str)],
    ) {
        let first = Config::from_toml_str(text, env).unwrap();
        let rendered = first.to_redacted_toml();
        let mut restored = rendered.clone();
        for (redacted, secret) in secrets {
            restored = restored.replace(redacted, secret);
        }
        let second = match Config::from_toml_str(&restored, &no_env) {
            Ok(c) => c,
            Err(e) => panic!("rendered config does not re-parse:\n{e}\n---\n{restored}"),
        };
        assert_eq!(second.to_redacted_toml(), rendered);
    }

    #[test]
    fn redacted_output_round_trips() {
        assert_round_trip(MINIMAL, &no_env, &[]);
        assert_round_trip(
            WITH_SECRETS,
            &test_env,
            &[
                (
                    "authorization = \"[redacted]\"",
                    &format!("authorization = \"{SECRET}\""),
                ),
                ("keygate:[redacted]@", &format!("keygate:{REDIS_PW}@")),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.pem");
        std::fs::write(&f, "x").unwrap();
        let fp = toml_string(&f.display().to_string());
        let everything = format!(
            r#"
[listen]
addr = "[::1]:8443"
trusted_proxies = ["10.0.0.0/8", "::1"]
header_timeout = "1500ms"
idle_timeout = "2m"
max_connections = 7
shutdown_grace = "0s"
[listen.tls]
cert = {fp}
key = {fp}
handshake_timeout = "1h"
[admin]
addr = "127.0.0.1:9999"
[upstream]
url = "https://app.internal:8443/"
ca_file = {fp}
[tenant]
slug = "acme-2"
domain = "Example.com."
extra_hosts = ["localhost", "::1", "weird\"quote.example"]
[auth]
key_prefix = "org_"
principal_header = "X-Org-Principal"
other_bearer = "reject"
anonymous = "reject"
on_store_unavailable = "serve_cached"
cache_capacity = 5
[policy]
deny_prefixes = ["/A", "/b/"]
[store]
sentinel = {{ master = "m\\x", nodes = ["redis://a:26379", "rediss://b:26379"] }}
timeout = "1s"
[keys]
max_live = 3
[session]
verify_url = "https://api.example.com/check?slug=acme-2"
cookie = "sid"
[log]
format = "text"
level = "warn"
access = false
[runtime]
worker_threads = 2
"#
        );
        // the quoted extra host is invalid: make sure that is what fails, then drop it
        assert_eq!(keys(&everything), vec!["tenant.extra_hosts[2]"]);
        let everything = everything.replace(", \"weird\\\"quote.example\"", "");
        assert_round_trip(&everything, &no_env, &[]);
    }

    #[test]
    fn example_file_is_valid_and_round_trips() {
        let env = |name: &str| test_env(name);
        let c = Config::from_toml_str(EXAMPLE, &env).unwrap_or_else(|e| panic!("{e}"));
        // the example documents the contract's defaults
        let minimal = ok(MINIMAL).to_redacted_toml();
        assert_eq!(c.to_redacted_toml(), minimal);
        assert_round_trip(EXAMPLE, &env, &[]);

        // with its optional keys switched on (except TLS, which needs files)
        let on = EXAMPLE
            .replace("# authorization = ", "authorization = ")
            .replace("# ca_file = \"/etc/keygate/upstream-ca.pem\"", "")
            .replace("# [session]", "[session]")
            .replace("# verify_url = ", "verify_url = ")
            .replace("# cookie = ", "cookie = ")
            .replace("# timeout = ", "timeout = ")
            .replace("# cache_ttl = ", "cache_ttl = ")
            .replace("# negative_ttl = ", "negative_ttl = ");
        let c = Config::from_toml_str(&on, &env).unwrap_or_else(|e| panic!("{e}\n{on}"));
        assert_eq!(c.upstream.authorization.unwrap().expose(), SECRET);
        let s = c.session.expect("session");
        assert_eq!(s.cookie, "wos-session");
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.cache_ttl, Duration::from_secs(30));
        assert_eq!(s.negative_ttl, Duration::from_secs(5));
        // and the scale-out alternatives
        let cluster = EXAMPLE
            .replace("url = \"redis://127.0.0.1:6379/0\"", "")
            .replace("# cluster = ", "cluster = ");
        assert!(Config::from_toml_str(&cluster, &env).is_ok());
        let sentinel = EXAMPLE
            .replace("url = \"redis://127.0.0.1:6379/0\"", "")
            .replace("# sentinel = ", "sentinel = ");
        assert!(Config::from_toml_str(&sentinel, &env).is_ok());
    }

    #[test]
    fn example_file_documents_every_key() {
        // every key the renderer prints (i.e. every key keygate knows) appears
        // in the example, set or commented out
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.pem");
        std::fs::write(&f, "x").unwrap();
        let fp = toml_string(&f.display().to_string());
        let full = with(&format!(
            "[listen.tls]\ncert = {fp}\nkey = {fp}\n[session]\nverify_url = \"https://x/c\"\ncookie = \"c\""
        ))
        .replace("[upstream]\n", &format!("[upstream]\nauthorization = \"t\"\nca_file = {fp}\n"));
        let rendered = ok(&full).to_redacted_toml();
        for line in rendered.lines() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            let documented = EXAMPLE.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{key} ")) || l.starts_with(&format!("{key}="))
            });
            assert!(documented, "{key} is not documented in the example");
        }
        for section in ["[listen.tls]", "[session]", "[runtime]"] {
            assert!(EXAMPLE.contains(section), "{section}");
        }
    }

    #[test]
    fn load_reports_an_unreadable_file_under_config() {
        let err = Config::load(std::path::Path::new("/nonexistent/keygate.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "config");
    }
}
