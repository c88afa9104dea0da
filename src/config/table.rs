//! The TOML table walker: a [`Section`] is consumed key by key and every
//! problem is gathered in [`Problems`] under its dotted key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::values::{format_duration, parse_duration};
use super::{ConfigProblem, Secret};

// ---------------------------------------------------------------------------
// Parsing and validation: the TOML document is walked by hand against the
// schema so that every problem (type, value, unknown key) is gathered, each
// under its dotted key, instead of stopping at the first serde error.
// ---------------------------------------------------------------------------

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<ConfigProblem>);

impl Problems {
    pub(super) fn has(&self, key: &str) -> bool {
        self.0.iter().any(|q| q.key == key)
    }

    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }
}

pub(super) fn syntax_message(text: &str, e: &toml::de::Error) -> String {
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
pub(super) struct Section {
    path: String,
    table: toml::Table,
}

impl Section {
    pub(super) fn new(path: &str, table: toml::Table) -> Self {
        Section {
            path: path.to_string(),
            table,
        }
    }

    pub(super) fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    pub(super) fn has(&self, k: &str) -> bool {
        self.table.contains_key(k)
    }

    pub(super) fn take(&mut self, k: &str) -> Option<toml::Value> {
        self.table.remove(k)
    }

    /// A sub-table; `Ok(None)` when absent, `Err(())` (problem recorded) when not a table.
    pub(super) fn sub(&mut self, k: &str, p: &mut Problems) -> Result<Option<Section>, ()> {
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
    pub(super) fn sub_or_empty(&mut self, k: &str, p: &mut Problems) -> Section {
        let key = self.key(k);
        match self.sub(k, p) {
            Ok(Some(s)) => s,
            _ => Section::new(&key, toml::Table::new()),
        }
    }

    pub(super) fn string(&mut self, k: &str, p: &mut Problems) -> Option<String> {
        match self.take(k)? {
            toml::Value::String(s) => Some(s),
            other => {
                p.push(self.key(k), expected("a string", &other));
                None
            }
        }
    }

    pub(super) fn integer(&mut self, k: &str, p: &mut Problems) -> Option<i64> {
        match self.take(k)? {
            toml::Value::Integer(i) => Some(i),
            other => {
                p.push(self.key(k), expected("an integer", &other));
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, k: &str, p: &mut Problems) -> Option<bool> {
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
    pub(super) fn strings(&mut self, k: &str, p: &mut Problems) -> Option<Vec<(String, String)>> {
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

    /// Record `message` under `k` when the key is absent.
    pub(super) fn require(&mut self, k: &str, message: &str, p: &mut Problems) {
        if !self.has(k) {
            p.push(self.key(k), message);
        }
    }

    /// A string run through `check`; `None` when absent, of the wrong type or
    /// refused by `check` (each reported under the key).
    pub(super) fn checked<T>(
        &mut self,
        k: &str,
        p: &mut Problems,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.string(k, p)?;
        match check(&v) {
            Ok(t) => Some(t),
            Err(m) => {
                p.push(self.key(k), m);
                None
            }
        }
    }

    /// An array of strings, each run through `check` and reported under its
    /// element key (`key[i]`); refused elements are skipped. `None` when
    /// absent or not an array.
    pub(super) fn checked_list<T>(
        &mut self,
        k: &str,
        p: &mut Problems,
        mut check: impl FnMut(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let items = self.strings(k, p)?;
        Some(
            items
                .into_iter()
                .filter_map(|(key, v)| match check(&v) {
                    Ok(t) => Some(t),
                    Err(m) => {
                        p.push(key, m);
                        None
                    }
                })
                .collect(),
        )
    }

    /// Report every key not consumed as unknown (nested tables included).
    pub(super) fn finish(self, p: &mut Problems) {
        for k in self.table.keys() {
            p.push(self.key(k), "unknown key");
        }
    }

    // --- typed helpers with defaults -------------------------------------

    /// A duration (`"5s"`); zero refused unless `zero_ok`.
    pub(super) fn duration(
        &mut self,
        k: &str,
        default: Duration,
        zero_ok: bool,
        p: &mut Problems,
    ) -> Duration {
        let min = if zero_ok {
            Duration::ZERO
        } else {
            Duration::from_millis(1)
        };
        self.duration_between(k, default, min, Duration::MAX, p)
    }

    /// A duration in `min..=max` (`min` of 1ms reads "greater than zero").
    pub(super) fn duration_between(
        &mut self,
        k: &str,
        default: Duration,
        min: Duration,
        max: Duration,
        p: &mut Problems,
    ) -> Duration {
        let key = self.key(k);
        match self.take(k) {
            None => default,
            Some(toml::Value::String(s)) => match parse_duration(&s) {
                Ok(d) if d < min => {
                    let msg = if min == Duration::from_millis(1) {
                        "must be greater than zero".to_string()
                    } else {
                        format!("must be at least {}", quote(&format_duration(min)))
                    };
                    p.push(key, msg);
                    default
                }
                Ok(d) if d > max => {
                    p.push(
                        key,
                        format!("must be at most {}", quote(&format_duration(max))),
                    );
                    default
                }
                Ok(d) => d,
                Err(m) => {
                    p.push(key, m);
                    default
                }
            },
            Some(other) => {
                p.push(key, expected("a duration string like \"5s\"", &other));
                default
            }
        }
    }

    pub(super) fn socket_addr(
        &mut self,
        k: &str,
        default: SocketAddr,
        p: &mut Problems,
    ) -> SocketAddr {
        match self.string(k, p) {
            None => default,
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
                    default
                }
            },
        }
    }

    pub(super) fn int_range(
        &mut self,
        k: &str,
        default: i64,
        min: i64,
        max: i64,
        p: &mut Problems,
    ) -> i64 {
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

    /// An integer in `min..=max` read into a `usize` (a count or a capacity).
    pub(super) fn count(
        &mut self,
        k: &str,
        default: usize,
        min: usize,
        max: usize,
        p: &mut Problems,
    ) -> usize {
        let wide = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let v = self.int_range(k, wide(default), wide(min), wide(max), p);
        usize::try_from(v).unwrap_or(default)
    }

    /// A string that must name one of `choices`; returns the value it names.
    pub(super) fn choice<T: Copy>(
        &mut self,
        k: &str,
        choices: &[(&str, T)],
        default: T,
        p: &mut Problems,
    ) -> T {
        match self.string(k, p) {
            None => default,
            Some(s) => match choices.iter().find(|(name, _)| *name == s) {
                Some((_, v)) => *v,
                None => {
                    let list: Vec<String> =
                        choices.iter().map(|(c, _)| format!("\"{c}\"")).collect();
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
    pub(super) fn readable_file(&mut self, k: &str, p: &mut Problems) -> Option<PathBuf> {
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
    pub(super) fn secret(
        &mut self,
        k: &str,
        env: &dyn Fn(&str) -> Option<String>,
        p: &mut Problems,
    ) -> Option<Secret> {
        let s = self.string(k, p)?;
        resolve_secret(&self.key(k), s, env, p)
    }
}

pub(super) fn resolve_secret(
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

pub(super) fn expected(what: &str, found: &toml::Value) -> String {
    format!("expected {what}, found {}", found.type_str())
}

/// A value echoed in a problem message (never used for secrets).
pub(super) fn quote(s: &str) -> String {
    toml_string(s)
}

/// A TOML basic string literal.
pub(super) fn toml_string(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;

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
}
