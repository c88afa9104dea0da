//! The schema walk: each section of the document into its typed struct.
//!
//! Every section starts from its defaults (`defaults.rs`) and overwrites
//! what the document gives; a bad value is a problem under its key and
//! leaves the default in place, so the walk always goes on to the end.

use super::checks::*;
use super::render::HeaderSpellings;
use super::table::{quote, resolve_secret, Problems, Section};
use super::*;

pub(super) const PLACEHOLDER_URI: &str = "http://invalid.invalid/";

const FORWARD_POLICIES: [(&str, ForwardPolicy); 2] = [
    ("forward", ForwardPolicy::Forward),
    ("reject", ForwardPolicy::Reject),
];
const OUTAGE_POLICIES: [(&str, OutagePolicy); 2] = [
    ("reject", OutagePolicy::Reject),
    ("serve_cached", OutagePolicy::ServeCached),
];
const LOG_FORMATS: [(&str, LogFormat); 2] = [("json", LogFormat::Json), ("text", LogFormat::Text)];
const LOG_LEVELS: [(&str, &str); 5] = [
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    ("warn", "warn"),
    ("error", "error"),
];

pub(super) fn parse_config(
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
    let mut spellings = HeaderSpellings::default();
    let auth = parse_auth(root.sub_or_empty("auth", p), &mut spellings, p);
    let policy = parse_policy(root.sub_or_empty("policy", p), p);
    let store = parse_store(root.sub_or_empty("store", p), env, p);
    let keys = parse_keys(root.sub_or_empty("keys", p), &mut spellings, p);
    let scopes = parse_scopes(root.sub_or_empty("scopes", p), p);
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
        scopes,
        session,
        log,
        runtime,
        spellings,
    }
}

/// A header name at `k` through `check`, its spelling kept for rendering.
fn header(
    s: &mut Section,
    k: &str,
    default: HeaderName,
    check: fn(&str) -> Result<HeaderName, String>,
    spellings: &mut HeaderSpellings,
    p: &mut Problems,
) -> HeaderName {
    match s.checked(k, p, |v| check(v).map(|h| (h, v.to_string()))) {
        Some((name, spelled)) => {
            spellings.record(s.key(k), &name, spelled);
            name
        }
        None => default,
    }
}

fn parse_listen(mut s: Section, p: &mut Problems) -> ListenConfig {
    let mut c = ListenConfig::default();
    c.addr = s.socket_addr("addr", c.addr, p);
    c.trusted_proxies = s
        .checked_list("trusted_proxies", p, |v| {
            parse_trusted_proxy(v)
                .ok_or_else(|| format!("{} is not a CIDR or IP address", quote(v)))
        })
        .unwrap_or(c.trusted_proxies);
    c.header_timeout = s.duration("header_timeout", c.header_timeout, false, p);
    c.idle_timeout = s.duration("idle_timeout", c.idle_timeout, false, p);
    c.max_connections = s.count("max_connections", c.max_connections, 1, usize::MAX, p);
    c.shutdown_grace = s.duration("shutdown_grace", c.shutdown_grace, true, p);
    c.body_timeout = s.duration("body_timeout", c.body_timeout, false, p);
    c.tls = match s.sub("tls", p) {
        Ok(Some(t)) => parse_tls(t, p),
        _ => None,
    };
    s.finish(p);
    c
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
    let complete = cert.is_some() && key.is_some();
    let mut c = TlsConfig::new(cert.unwrap_or_default(), key.unwrap_or_default());
    c.handshake_timeout = s.duration("handshake_timeout", c.handshake_timeout, false, p);
    s.finish(p);
    complete.then_some(c)
}

fn parse_admin(mut s: Section, p: &mut Problems) -> AdminConfig {
    let mut c = AdminConfig::default();
    c.addr = s.socket_addr("addr", c.addr, p);
    s.finish(p);
    c
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
    if report_missing {
        s.require(
            "url",
            "required (the tenant app, e.g. \"http://127.0.0.1:8080\")",
            p,
        );
    }
    let url = s.checked("url", p, |v| check_http_url(v, true));
    let mut c = UpstreamConfig::new(url.unwrap_or(http::Uri::from_static(PLACEHOLDER_URI)));
    c.connect_timeout = s.duration("connect_timeout", c.connect_timeout, false, p);
    c.timeout = s.duration("timeout", c.timeout, false, p);
    c.read_timeout = s.duration("read_timeout", c.read_timeout, false, p);
    c.idle_timeout = s.duration("idle_timeout", c.idle_timeout, false, p);
    c.own_links = s.count("own_links", c.own_links, 0, usize::MAX, p);
    c.max_idle = s.count("max_idle", c.max_idle, 1, usize::MAX, p);
    c.authorization = s.secret("authorization", env, p).and_then(|secret| {
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
    c.ca_file = s.readable_file("ca_file", p);
    s.finish(p);
    c
}

fn parse_tenant(section: Result<Option<Section>, ()>, p: &mut Problems) -> TenantConfig {
    let mut s = match section {
        Ok(Some(s)) => s,
        Ok(None) => Section::new("tenant", toml::Table::new()),
        // wrong type already reported; do not also report the slug missing
        Err(()) => return TenantConfig::new(""),
    };
    s.require("slug", "required (the tenant's name, e.g. \"acme\")", p);
    let slug = s.checked("slug", p, |v| check_slug(v).map(|()| v.to_string()));
    let mut c = TenantConfig::new(slug.unwrap_or_default());
    c.domain = s
        .checked("domain", p, |v| check_host(v, false))
        .unwrap_or(c.domain);
    c.extra_hosts = s
        .checked_list("extra_hosts", p, |v| check_host(v, true))
        .unwrap_or(c.extra_hosts);
    s.finish(p);
    c
}

fn parse_auth(mut s: Section, spell: &mut HeaderSpellings, p: &mut Problems) -> AuthConfig {
    let mut c = AuthConfig::default();
    c.key_prefix = s
        .checked("key_prefix", p, |v| {
            check_key_prefix(v).map(|()| v.to_string())
        })
        .unwrap_or(c.key_prefix);
    let check = check_header_name;
    c.principal_header = header(
        &mut s,
        "principal_header",
        c.principal_header,
        check,
        spell,
        p,
    );
    let role_given = s.has("role_header");
    c.role_header = header(&mut s, "role_header", c.role_header, check, spell, p);
    let workspaces_given = s.has("workspaces_header");
    c.workspaces_header = header(
        &mut s,
        "workspaces_header",
        c.workspaces_header,
        check,
        spell,
        p,
    );
    // Three distinct headers, as keygate strips them (`_` and `.` read as `-`).
    // The problem goes to the later key, or to the one the document sets.
    let identity = [
        ("auth.principal_header", &c.principal_header, true),
        ("auth.role_header", &c.role_header, role_given),
        (
            "auth.workspaces_header",
            &c.workspaces_header,
            workspaces_given,
        ),
    ];
    for (i, (a_key, a, _)) in identity.iter().enumerate() {
        for (b_key, b, b_given) in &identity[i + 1..] {
            if folded_header(a) != folded_header(b) {
                continue;
            }
            let (key, other) = if *b_given {
                (b_key, a_key)
            } else {
                (a_key, b_key)
            };
            if !p.has(key) {
                p.push(
                    *key,
                    format!(
                        "must differ from {other} (both are {})",
                        quote(&folded_header(a))
                    ),
                );
            }
        }
    }
    c.other_bearer = s.choice("other_bearer", &FORWARD_POLICIES, c.other_bearer, p);
    c.anonymous = s.choice("anonymous", &FORWARD_POLICIES, c.anonymous, p);
    c.on_store_unavailable = s.choice(
        "on_store_unavailable",
        &OUTAGE_POLICIES,
        c.on_store_unavailable,
        p,
    );
    c.max_stale = s.duration("max_stale", c.max_stale, true, p);
    c.cache_ttl = s.duration("cache_ttl", c.cache_ttl, true, p);
    c.cache_capacity = s.count("cache_capacity", c.cache_capacity, 1, usize::MAX, p);
    c.negative_ttl = s.duration("negative_ttl", c.negative_ttl, true, p);
    s.finish(p);
    c
}

fn parse_policy(mut s: Section, p: &mut Problems) -> PolicyConfig {
    let mut c = PolicyConfig::default();
    c.deny_prefixes = s
        .checked_list("deny_prefixes", p, check_deny_prefix)
        .unwrap_or(c.deny_prefixes);
    s.finish(p);
    c
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

fn parse_store(
    mut s: Section,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> StoreConfig {
    let mut c = StoreConfig::default();
    let memory = s.choice("backend", &[("redis", false), ("memory", true)], false, p);
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
    c.timeout = s.duration("timeout", c.timeout, false, p);
    s.finish(p);
    if memory {
        c.backend = StoreBackend::Memory;
    } else if let Some(u) = url {
        c.backend = StoreBackend::Redis(RedisTarget::Url(u));
    } else if let Some(nodes) = cluster {
        c.backend = StoreBackend::Redis(RedisTarget::Cluster(nodes));
    } else if let Some((master, nodes)) = sentinel {
        c.backend = StoreBackend::Redis(RedisTarget::Sentinel { master, nodes });
    } else if !targets.is_empty() {
        // Only reached with a problem recorded above.
        c.backend = StoreBackend::Memory;
    }
    // else: no target given, the default (a Redis on the same host) stays.
    c
}

fn parse_keys(mut s: Section, spell: &mut HeaderSpellings, p: &mut Problems) -> KeysConfig {
    let mut c = KeysConfig::default();
    let max_live = s.int_range("max_live", i64::from(c.max_live), 1, i64::from(u32::MAX), p);
    c.max_live = u32::try_from(max_live).unwrap_or(c.max_live);
    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3_600);
    c.rotate_grace =
        s.duration_between("rotate_grace", c.rotate_grace, Duration::ZERO, 30 * DAY, p);
    c.expiry_notice = s.duration("expiry_notice", c.expiry_notice, true, p);
    let check = check_response_header_name;
    c.expiry_header = header(&mut s, "expiry_header", c.expiry_header, check, spell, p);
    c.usage_flush = s.duration("usage_flush", c.usage_flush, false, p);
    c.usage_retention =
        s.duration_between("usage_retention", c.usage_retention, HOUR, Duration::MAX, p);
    c.default_rate_limit = s.checked("default_rate_limit", p, RateLimit::parse);
    s.finish(p);
    c
}

fn parse_scopes(mut s: Section, p: &mut Problems) -> ScopesConfig {
    let mut c = ScopesConfig::default();
    c.workspace_prefix = s
        .checked("workspace_prefix", p, check_workspace_prefix)
        .unwrap_or(c.workspace_prefix);
    c.admin_only = s
        .checked_list("admin_only", p, check_admin_only)
        .unwrap_or(c.admin_only);
    s.finish(p);
    c
}

fn parse_session(mut s: Section, p: &mut Problems) -> Option<SessionConfig> {
    const REQUIRED: &str = "required when [session] is present";
    s.require("verify_url", REQUIRED, p);
    let verify_url = s.checked("verify_url", p, |v| check_http_url(v, false));
    s.require("cookie", REQUIRED, p);
    let cookie = s.checked("cookie", p, |v| {
        check_cookie_name(v).map(|()| v.to_string())
    });
    let complete = verify_url.is_some() && cookie.is_some();
    let mut c = SessionConfig::new(
        verify_url.unwrap_or(http::Uri::from_static(PLACEHOLDER_URI)),
        cookie.unwrap_or_default(),
    );
    c.timeout = s.duration("timeout", c.timeout, false, p);
    c.cache_ttl = s.duration("cache_ttl", c.cache_ttl, true, p);
    c.negative_ttl = s.duration("negative_ttl", c.negative_ttl, true, p);
    s.finish(p);
    complete.then_some(c)
}

fn parse_log(mut s: Section, p: &mut Problems) -> LogConfig {
    let mut c = LogConfig::default();
    c.format = s.choice("format", &LOG_FORMATS, c.format, p);
    c.level = s
        .choice("level", &LOG_LEVELS, c.level.as_str(), p)
        .to_string();
    c.access = s.boolean("access", p).unwrap_or(c.access);
    s.finish(p);
    c
}

fn parse_runtime(mut s: Section, p: &mut Problems) -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    c.worker_threads = s.count("worker_threads", c.worker_threads, 0, 1024, p);
    s.finish(p);
    c
}

#[cfg(test)]
mod tests {
    use super::super::table::toml_string;
    use super::super::testing::*;
    use super::super::*;
    use std::time::Duration;

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = ok(MINIMAL);
        assert_eq!(c.listen.addr, "0.0.0.0:8443".parse().unwrap());
        assert!(c.listen.trusted_proxies.is_empty());
        assert_eq!(c.listen.header_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.listen.max_connections, 10_000);
        assert_eq!(c.listen.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.listen.body_timeout, Duration::from_secs(60));
        assert!(c.listen.tls.is_none());
        assert_eq!(c.admin.addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.upstream.url, "http://127.0.0.1:8080");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.timeout, Duration::from_secs(60));
        assert_eq!(c.upstream.read_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.upstream.own_links, 1024);
        assert_eq!(c.upstream.max_idle, 1024);
        assert!(c.upstream.authorization.is_none());
        assert!(c.upstream.ca_file.is_none());
        assert_eq!(c.tenant.slug, "acme");
        assert_eq!(c.tenant.domain, "moleculesai.app");
        assert!(c.tenant.extra_hosts.is_empty());
        assert_eq!(c.tenant.served_hosts(), vec!["acme.moleculesai.app"]);
        assert_eq!(c.auth.key_prefix, "mok_");
        assert_eq!(c.auth.principal_header.as_str(), "x-molecule-principal");
        assert_eq!(c.auth.role_header.as_str(), "x-molecule-key-role");
        assert_eq!(
            c.auth.workspaces_header.as_str(),
            "x-molecule-key-workspaces"
        );
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
        assert_eq!(c.keys.rotate_grace, Duration::from_secs(24 * 3600));
        assert_eq!(c.keys.expiry_notice, Duration::from_secs(7 * 86_400));
        assert_eq!(c.keys.expiry_header.as_str(), "x-molecule-key-expires");
        assert_eq!(c.keys.usage_flush, Duration::from_secs(10));
        assert_eq!(c.keys.usage_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.keys.default_rate_limit, None);
        assert_eq!(c.scopes.workspace_prefix, "/workspaces/");
        assert!(c.scopes.admin_only.is_empty());
        assert!(c.session.is_none());
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info");
        assert!(c.log.access);
        assert_eq!(c.runtime.worker_threads, 0);
    }

    #[test]
    fn defaults_match_config_new() {
        // Config::new documents itself as "every other value at its real default".
        let parsed = ok(MINIMAL);
        let t = Config::new("acme", "http://127.0.0.1:8080".parse().unwrap());
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

    #[test]
    fn body_read_and_idle_bounds() {
        let c = ok(&with("[listen]\nbody_timeout = \"5s\"").replace(
            "[upstream]\n",
            "[upstream]\nread_timeout = \"250ms\"\nidle_timeout = \"2m\"\nown_links = 0\nmax_idle = 1\n",
        ));
        assert_eq!(c.listen.body_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.read_timeout, Duration::from_millis(250));
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.upstream.own_links, 0);
        assert_eq!(c.upstream.max_idle, 1);
        // every wait has a bound: zero is refused
        let m = one_problem(
            &with("[listen]\nbody_timeout = \"0s\""),
            "listen.body_timeout",
        );
        assert_eq!(m, "must be greater than zero");
        one_problem(
            &in_section("upstream", "read_timeout = \"0ms\""),
            "upstream.read_timeout",
        );
        one_problem(
            &in_section("upstream", "idle_timeout = \"0s\""),
            "upstream.idle_timeout",
        );
        let m = one_problem(&in_section("upstream", "max_idle = 0"), "upstream.max_idle");
        assert_eq!(m, "must be at least 1");
        one_problem(
            &in_section("upstream", "own_links = -1"),
            "upstream.own_links",
        );
        one_problem(
            &in_section("upstream", "own_links = \"many\""),
            "upstream.own_links",
        );
        // all gathered at once
        assert_eq!(
            keys(&with("[listen]\nbody_timeout = \"x\"").replace(
                "[upstream]\n",
                "[upstream]\nread_timeout = 5\nidle_timeout = \"0s\"\nmax_idle = 0\n",
            )),
            vec![
                "listen.body_timeout",
                "upstream.read_timeout",
                "upstream.idle_timeout",
                "upstream.max_idle"
            ]
        );
    }

    fn auth(body: &str) -> String {
        with(&format!("[auth]\n{body}"))
    }

    #[test]
    fn identity_headers_are_valid_distinct_and_unreserved() {
        let c = ok(&auth(
            "role_header = \"X-Org-Role\"\nworkspaces_header = \"X-Org-Workspaces\"",
        ));
        assert_eq!(c.auth.role_header.as_str(), "x-org-role");
        assert_eq!(c.auth.workspaces_header.as_str(), "x-org-workspaces");
        // reserved names, for either key, as for principal_header
        for bad in [
            "",
            "X Role",
            "Host",
            "Content-Length",
            "Transfer-Encoding",
            "connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Proxy-Connection",
            "Authorization",
            "Cookie",
            "X-Request-Id",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "X_Forwarded_Host",
            "Forwarded",
            "keep.alive",
        ] {
            for key in ["role_header", "workspaces_header"] {
                let m = one_problem(
                    &auth(&format!("{key} = {}", toml_string(bad))),
                    &format!("auth.{key}"),
                );
                assert!(
                    m.contains("reserved") || m.contains("not a valid header name"),
                    "{key} = {bad:?}: {m}"
                );
            }
        }
        // three distinct names, as keygate strips them ('_' and '.' read as '-');
        // the key the document sets is named
        let m = one_problem(
            &auth("role_header = \"X-Molecule-Principal\""),
            "auth.role_header",
        );
        assert_eq!(
            m,
            "must differ from auth.principal_header (both are \"x-molecule-principal\")"
        );
        one_problem(
            &auth("workspaces_header = \"x_molecule_key.role\""),
            "auth.workspaces_header",
        );
        one_problem(
            &auth("principal_header = \"X-Molecule-Key-Workspaces\""),
            "auth.principal_header",
        );
        one_problem(
            &auth("principal_header = \"X-A\"\nrole_header = \"x-a\""),
            "auth.role_header",
        );
        assert_eq!(
            keys(&auth(
                "principal_header = \"X-A\"\nrole_header = \"X-A\"\nworkspaces_header = \"X-A\""
            )),
            vec!["auth.role_header", "auth.workspaces_header"]
        );
        // an invalid name is one problem, not also a collision
        one_problem(&auth("role_header = \"Host\""), "auth.role_header");
    }

    fn keys_section(body: &str) -> String {
        with(&format!("[keys]\n{body}"))
    }

    #[test]
    fn keys_rotation_expiry_usage_and_rate_limit() {
        let c = ok(&keys_section(
            "rotate_grace = \"30d\"\nexpiry_notice = \"0s\"\nexpiry_header = \"X-Key-Expires\"\n\
             usage_flush = \"250ms\"\nusage_retention = \"1h\"\ndefault_rate_limit = \"600/min\"",
        ));
        assert_eq!(c.keys.rotate_grace, Duration::from_secs(30 * 86_400));
        assert_eq!(c.keys.expiry_notice, Duration::ZERO);
        assert_eq!(c.keys.expiry_header.as_str(), "x-key-expires");
        assert_eq!(c.keys.usage_flush, Duration::from_millis(250));
        assert_eq!(c.keys.usage_retention, Duration::from_secs(3600));
        let r = c.keys.default_rate_limit.expect("rate limit");
        assert_eq!((r.limit.get(), r.per), (600, RateUnit::Minute));
        assert_eq!(
            ok(&keys_section("rotate_grace = \"0s\"")).keys.rotate_grace,
            Duration::ZERO
        );

        let m = one_problem(&keys_section("rotate_grace = \"31d\""), "keys.rotate_grace");
        assert_eq!(m, "must be at most \"30d\"");
        one_problem(&keys_section("rotate_grace = \"5w\""), "keys.rotate_grace");
        let m = one_problem(&keys_section("usage_flush = \"0s\""), "keys.usage_flush");
        assert_eq!(m, "must be greater than zero");
        let m = one_problem(
            &keys_section("usage_retention = \"59m\""),
            "keys.usage_retention",
        );
        assert_eq!(m, "must be at least \"1h\"");
        for bad in ["0/s", "5/sec", "-1/min", "+5/s", "5 /s", "", "4294967296/h"] {
            one_problem(
                &keys_section(&format!("default_rate_limit = {}", toml_string(bad))),
                "keys.default_rate_limit",
            );
        }
        one_problem(
            &keys_section("default_rate_limit = 600"),
            "keys.default_rate_limit",
        );
        // the expiry header: a valid, unreserved name, nor one keygate sets itself
        for bad in [
            "X Expires",
            "Connection",
            "Content-Length",
            "Transfer-Encoding",
            "X-Forwarded-For",
            "Forwarded",
            "Cookie",
            "Retry-After",
            "RateLimit-Remaining",
            "ratelimit_reset",
        ] {
            one_problem(
                &keys_section(&format!("expiry_header = {}", toml_string(bad))),
                "keys.expiry_header",
            );
        }
        // all gathered
        assert_eq!(
            keys(&keys_section(
                "rotate_grace = \"1y\"\nusage_flush = \"0s\"\nusage_retention = \"1s\"\ndefault_rate_limit = \"x\"\nexpiry_header = \"te\""
            )),
            vec![
                "keys.rotate_grace",
                "keys.expiry_header",
                "keys.usage_flush",
                "keys.usage_retention",
                "keys.default_rate_limit"
            ]
        );
    }
}
