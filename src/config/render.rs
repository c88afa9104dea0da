//! The redacted rendering behind `keygate check` ([`Config::to_redacted_toml`]).

use std::time::Duration;

use super::table::toml_string;
use super::values::format_duration;
use super::*;

const REDACTED: &str = "[redacted]";

/// How the document spelled each header name key (`auth.principal_header =
/// "X-Org-Principal"`): `keygate check` prints names as configured, while the
/// typed fields hold the http crate's lower-case `HeaderName`.
#[derive(Debug, Clone, Default)]
pub(super) struct HeaderSpellings(Vec<(String, HeaderName, String)>);

impl HeaderSpellings {
    pub(super) fn record(&mut self, key: String, name: &HeaderName, spelled: String) {
        self.0.push((key, name.clone(), spelled));
    }

    /// The spelling recorded for `key` while it still names `name` (a field
    /// changed in code falls back), else the name in title case
    /// (`X-Molecule-Principal`), as the contract writes the defaults.
    pub(super) fn show(&self, key: &str, name: &HeaderName) -> String {
        if let Some((_, _, spelled)) = self.0.iter().find(|(k, n, _)| k == key && n == name) {
            return spelled.clone();
        }
        let mut out = String::with_capacity(name.as_str().len());
        let mut upper = true;
        for c in name.as_str().chars() {
            out.push(if upper { c.to_ascii_uppercase() } else { c });
            upper = c == '-';
        }
        out
    }
}

pub(super) fn redact_redis_url(s: &str) -> String {
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

pub(super) fn render_redacted(c: &Config) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let strs = |items: &mut dyn Iterator<Item = String>| -> String {
        let v: Vec<String> = items.map(|s| toml_string(&s)).collect();
        format!("[{}]", v.join(", "))
    };
    let d = |d: Duration| toml_string(&format_duration(d));
    let path = |p: &std::path::Path| toml_string(&p.to_string_lossy());
    let redis = |s: &Secret| toml_string(&redact_redis_url(s.expose()));
    let header = |key: &str, name: &HeaderName| toml_string(&c.spellings.show(key, name));

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
    let _ = writeln!(o, "body_timeout = {}", d(l.body_timeout));
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
    let _ = writeln!(o, "read_timeout = {}", d(u.read_timeout));
    let _ = writeln!(o, "idle_timeout = {}", d(u.idle_timeout));
    let _ = writeln!(o, "own_links = {}", u.own_links);
    let _ = writeln!(o, "max_idle = {}", u.max_idle);
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
        header("auth.principal_header", &a.principal_header)
    );
    let _ = writeln!(
        o,
        "role_header = {}",
        header("auth.role_header", &a.role_header)
    );
    let _ = writeln!(
        o,
        "workspaces_header = {}",
        header("auth.workspaces_header", &a.workspaces_header)
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
    let k = &c.keys;
    let _ = writeln!(o, "max_live = {}", k.max_live);
    let _ = writeln!(o, "rotate_grace = {}", d(k.rotate_grace));
    let _ = writeln!(o, "expiry_notice = {}", d(k.expiry_notice));
    let _ = writeln!(
        o,
        "expiry_header = {}",
        header("keys.expiry_header", &k.expiry_header)
    );
    let _ = writeln!(o, "usage_flush = {}", d(k.usage_flush));
    let _ = writeln!(o, "usage_retention = {}", d(k.usage_retention));
    if let Some(r) = &k.default_rate_limit {
        let _ = writeln!(o, "default_rate_limit = {}", toml_string(&r.to_string()));
    }

    let _ = writeln!(o, "\n[scopes]");
    let _ = writeln!(
        o,
        "workspace_prefix = {}",
        toml_string(&c.scopes.workspace_prefix)
    );
    let _ = writeln!(
        o,
        "admin_only = {}",
        strs(&mut c.scopes.admin_only.iter().map(|r| r.to_string()))
    );

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
    use super::super::table::toml_string;
    use super::super::testing::*;
    use super::*;
    use std::time::Duration;

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
body_timeout = "3s"
[listen.tls]
cert = {fp}
key = {fp}
handshake_timeout = "1h"
[admin]
addr = "127.0.0.1:9999"
[upstream]
url = "https://app.internal:8443/"
ca_file = {fp}
read_timeout = "2d"
idle_timeout = "1w"
own_links = 0
max_idle = 1
[tenant]
slug = "acme-2"
domain = "Example.com."
extra_hosts = ["localhost", "::1", "weird\"quote.example"]
[auth]
key_prefix = "org_"
principal_header = "X-Org-Principal"
role_header = "X-Org-Role"
workspaces_header = "X-Org-Workspaces"
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
rotate_grace = "0s"
expiry_notice = "36h"
expiry_header = "X-Key-Expires"
usage_flush = "1500ms"
usage_retention = "1h"
default_rate_limit = "5/s"
[scopes]
workspace_prefix = "/WS"
admin_only = ["POST /org/import", "/Bundles//import", "M-SEARCH /x"]
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
            .replace("# negative_ttl = ", "negative_ttl = ")
            .replace("# default_rate_limit = ", "default_rate_limit = ");
        let c = Config::from_toml_str(&on, &env).unwrap_or_else(|e| panic!("{e}\n{on}"));
        assert_eq!(c.upstream.authorization.unwrap().expose(), SECRET);
        let s = c.session.expect("session");
        assert_eq!(s.cookie, "wos-session");
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.cache_ttl, Duration::from_secs(30));
        assert_eq!(s.negative_ttl, Duration::from_secs(5));
        assert_eq!(
            c.keys.default_rate_limit.map(|r| r.to_string()).as_deref(),
            Some("600/min")
        );
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
        .replace("[upstream]\n", &format!("[upstream]\nauthorization = \"t\"\nca_file = {fp}\n"))
        .replace("[tenant]\n", "[keys]\ndefault_rate_limit = \"1/h\"\n[tenant]\n");
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
        for section in ["[listen.tls]", "[session]", "[runtime]", "[scopes]"] {
            assert!(EXAMPLE.contains(section), "{section}");
        }
    }

    #[test]
    fn header_names_are_printed_as_configured() {
        // defaults: as the contract writes them
        let out = ok(MINIMAL).to_redacted_toml();
        for line in [
            "principal_header = \"X-Molecule-Principal\"",
            "role_header = \"X-Molecule-Key-Role\"",
            "workspaces_header = \"X-Molecule-Key-Workspaces\"",
            "expiry_header = \"X-Molecule-Key-Expires\"",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        // configured: the operator's spelling, while the typed field is lower-case
        let c = ok(&with(
            "[auth]\nprincipal_header = \"X-ORG-principal\"\nrole_header = \"x-org-role\"\n\
             workspaces_header = \"X_Org_Workspaces\"\n[keys]\nexpiry_header = \"X-Key-EXPIRES\"",
        ));
        assert_eq!(c.auth.principal_header.as_str(), "x-org-principal");
        assert_eq!(c.auth.workspaces_header.as_str(), "x_org_workspaces");
        assert_eq!(c.keys.expiry_header.as_str(), "x-key-expires");
        let out = c.to_redacted_toml();
        for line in [
            "principal_header = \"X-ORG-principal\"",
            "role_header = \"x-org-role\"",
            "workspaces_header = \"X_Org_Workspaces\"",
            "expiry_header = \"X-Key-EXPIRES\"",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        assert!(!out.contains("x-org-principal"), "{out}");
        // and it parses back to the same config and the same text
        assert_round_trip(&out, &no_env, &[]);
        // a field changed in code is printed from its value, not a stale spelling
        let mut c = c;
        c.auth.principal_header = http::HeaderName::from_static("x-test-principal");
        let out = c.to_redacted_toml();
        assert!(
            out.contains("principal_header = \"X-Test-Principal\""),
            "{out}"
        );
        assert!(out.contains("role_header = \"x-org-role\""), "{out}");
    }

    #[test]
    fn default_config_renders_parses_back_and_renders_the_same() {
        let c = Config::new("acme", http::Uri::from_static("http://127.0.0.1:8080"));
        let text = c.to_redacted_toml();
        let back = Config::from_toml_str(&text, &no_env)
            .unwrap_or_else(|e| panic!("the default rendering does not parse:\n{e}\n---\n{text}"));
        assert_eq!(back.to_redacted_toml(), text);
        // the very same values, section by section (secrets: none by default)
        let sections = |c: &Config| {
            format!(
                "{:?}",
                (
                    &c.listen,
                    &c.admin,
                    &c.upstream,
                    &c.tenant,
                    &c.auth,
                    &c.policy,
                    &c.store,
                    &c.keys,
                    &c.scopes,
                    &c.session,
                    &c.log,
                    &c.runtime
                )
            )
        };
        assert_eq!(sections(&back), sections(&c));
        // the contract's defaults (a Redis store) likewise
        let minimal = ok(MINIMAL);
        let text = minimal.to_redacted_toml();
        assert_eq!(ok(&text).to_redacted_toml(), text);
        assert_eq!(sections(&ok(&text)), sections(&minimal));
    }

    /// `line` (without its `# `) sets a key or opens a table: `name = …`, `[name]`.
    fn is_key_line(rest: &str) -> bool {
        let ident = |c: char| c.is_ascii_lowercase() || c == '_' || c == '.';
        if let Some(r) = rest.strip_prefix('[') {
            return r
                .split_once(']')
                .is_some_and(|(name, _)| !name.is_empty() && name.chars().all(ident));
        }
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        end > 0 && rest[end..].trim_start().starts_with('=')
    }

    #[test]
    fn example_with_every_optional_line_uncommented_parses() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let f = dir.path().join(name);
            std::fs::write(&f, "x").unwrap();
            f.display().to_string()
        };
        let (cert, key, ca) = (file("tls.crt"), file("tls.key"), file("ca.pem"));
        // uncommented: every `# key = …` and `# [table]` line
        let mut uncommented = 0;
        let mut on = String::new();
        for line in EXAMPLE.lines() {
            match line.strip_prefix("# ") {
                Some(rest) if is_key_line(rest) => {
                    uncommented += 1;
                    on.push_str(rest);
                }
                _ => on.push_str(line),
            }
            on.push('\n');
        }
        assert!(uncommented >= 15, "{uncommented} optional lines");
        let on = on
            .replace("/etc/keygate/tls.crt", &cert)
            .replace("/etc/keygate/tls.key", &key)
            .replace("/etc/keygate/upstream-ca.pem", &ca);
        // store: exactly one of url / cluster / sentinel at a time
        for target in ["url", "cluster", "sentinel"] {
            let mut text = String::new();
            let mut section = String::new();
            for line in on.lines() {
                if line.starts_with('[') {
                    section = line.split(']').next().unwrap_or("").to_string();
                }
                let other_target = ["url", "cluster", "sentinel"]
                    .iter()
                    .any(|t| *t != target && line.starts_with(&format!("{t} = ")));
                if section == "[store" && other_target {
                    continue;
                }
                text.push_str(line);
                text.push('\n');
            }
            let c = Config::from_toml_str(&text, &test_env)
                .unwrap_or_else(|e| panic!("{target}: {e}\n---\n{text}"));
            let tls = c.listen.tls.as_ref().expect("listen.tls");
            assert_eq!(tls.cert.display().to_string(), cert);
            assert!(c.upstream.authorization.is_some() && c.upstream.ca_file.is_some());
            assert!(c.session.is_some());
            assert!(c.keys.default_rate_limit.is_some());
            let kind = match &c.store.backend {
                StoreBackend::Redis(RedisTarget::Url(_)) => "url",
                StoreBackend::Redis(RedisTarget::Cluster(_)) => "cluster",
                StoreBackend::Redis(RedisTarget::Sentinel { .. }) => "sentinel",
                StoreBackend::Memory => "memory",
            };
            assert_eq!(kind, target);
            // every key the example sets is one keygate prints back
            let rendered = c.to_redacted_toml();
            for line in text
                .lines()
                .filter(|l| is_key_line(l) && !l.starts_with('['))
            {
                let k = line.split([' ', '=']).next().unwrap();
                assert!(
                    rendered.lines().any(|l| l.starts_with(&format!("{k} = "))),
                    "{k} is not rendered:\n{rendered}"
                );
            }
            assert_round_trip(
                &text,
                &test_env,
                &[(
                    "authorization = \"[redacted]\"",
                    &format!("authorization = \"{SECRET}\""),
                )],
            );
        }
    }
}
