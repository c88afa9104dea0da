//! The commands behind `keygate …` (contract §1). Each returns a [`Failure`]
//! that `main` maps to the exit code: configuration and usage problems are 2,
//! failed operations (store unreachable, key not found) are 1.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::auth::scope::{check_workspaces, Role};
use crate::auth::store::{AuditEntry, Store};
use crate::auth::{Actor, KeyService, MintError, MintRequest, OpContext};
use crate::config::{Config, RateLimit, StoreBackend};
use crate::keys_api::{list_json, minted_json, rfc3339};
use crate::logging::{self, Sink};
use crate::metrics::Metrics;

pub use crate::failure::Failure;

fn load(path: &Path) -> Result<Config, Failure> {
    let config = Config::load(path)
        .map_err(|e| Failure::Config(e.problems.iter().map(|p| p.to_string()).collect()))?;
    if let Some(tls) = &config.listen.tls {
        crate::tls::TlsAcceptor::new(tls)
            .map_err(|e| Failure::Config(vec![format!("listen.tls: {e}")]))?;
    }
    Ok(config)
}

/// `workers == 1`: a current-thread runtime (no cross-thread scheduling at
/// all, the cheapest for a sidecar pinned to one core); otherwise a
/// multi-thread runtime with that many workers. `0` sizes the runtime from
/// the CPUs this process may actually use ([`usable_cpus`]), so a sidecar
/// started under a 1-CPU limit or pinned to one core gets the current-thread
/// runtime without any `[runtime]` setting.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, Failure> {
    let workers = if workers == 0 { usable_cpus() } else { workers };
    let mut b = if workers == 1 {
        let mut b = tokio::runtime::Builder::new_current_thread();
        // Look for I/O events every 8 task polls instead of tokio's 61: under
        // load a request's next step waits behind fewer other connections.
        // Same-run A/B (benches/load/run.sh, 64 connections, one core): p99
        // 1.50–1.55 ms instead of 1.73–1.75 ms, req/s unchanged.
        b.event_interval(8);
        b
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    b.enable_all()
        .build()
        .map_err(|e| Failure::Operation(format!("cannot start the runtime: {e}")))
}

/// CPUs this process may run on: the affinity mask (`taskset`, cpusets)
/// and the cgroup CPU quota (`cpu.max`, e.g. a container's `cpus: 1`),
/// rounded up — what [`std::thread::available_parallelism`] reports on Linux.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn check(path: &Path) -> Result<(), Failure> {
    let config = load(path)?;
    print!("{}", config.to_redacted_toml());
    Ok(())
}

pub fn serve(path: &Path) -> Result<(), Failure> {
    let config = load(path)?;
    logging::init(&config.log, Sink::Stdout);
    let rt = runtime(config.runtime.worker_threads)?;
    rt.block_on(async move {
        if matches!(config.store.backend, StoreBackend::Memory) {
            tracing::warn!(
                "store.backend = \"memory\": keys live in this process only (demo and tests)"
            );
        }
        let store = Store::from_config(&config.store, &config.tenant.slug)
            .map_err(|e| Failure::Config(vec![format!("store: {e}")]))?;
        let listeners = crate::Listeners::bind(&config)
            .await
            .map_err(|e| Failure::Operation(e.to_string()))?;
        let (trigger, signal) = crate::shutdown::channel();
        spawn_signal_handler(trigger);
        let (scheme, protocols) = listener_protocols(&config);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen = %config.listen.addr,
            scheme,
            protocols,
            admin = %config.admin.addr,
            upstream = %config.upstream.url,
            store = %store_address(&config.store.backend),
            tenant = %config.tenant.slug,
            hosts = %config.tenant.served_hosts().join(","),
            "keygate serving"
        );
        crate::run(config, store, listeners, signal)
            .await
            .map_err(|e| Failure::Operation(e.to_string()))?;
        tracing::info!("keygate stopped");
        Ok(())
    })
}

/// The public listener's scheme and HTTP versions, for the start-up line.
fn listener_protocols(config: &Config) -> (&'static str, &'static str) {
    match config.listen.tls {
        Some(_) => ("https", "h2 and http/1.1 (ALPN)"),
        None => ("http", "http/1.1 and h2c (prior knowledge)"),
    }
}

/// The store for the start-up line: its kind and where, never a password
/// (the userinfo of every URL is left out).
fn store_address(backend: &StoreBackend) -> String {
    use crate::config::RedisTarget;
    fn bare(url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
        // Everything up to the last `@` is userinfo (a password may hold `/` or `@`).
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{host}")
    }
    match backend {
        StoreBackend::Memory => "memory".into(),
        StoreBackend::Redis(RedisTarget::Url(u)) => format!("redis {}", bare(u.expose())),
        StoreBackend::Redis(RedisTarget::Cluster(nodes)) => {
            let nodes: Vec<String> = nodes.iter().map(|n| bare(n.expose())).collect();
            format!("redis cluster {}", nodes.join(","))
        }
        StoreBackend::Redis(RedisTarget::Sentinel { master, nodes }) => {
            let nodes: Vec<String> = nodes.iter().map(|n| bare(n.expose())).collect();
            format!("redis sentinel {master} via {}", nodes.join(","))
        }
    }
}

/// SIGTERM/SIGINT: graceful drain; a second one exits at once.
fn spawn_signal_handler(trigger: crate::shutdown::Trigger) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown requested; draining in-flight requests");
        trigger.fire();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(0);
    });
}

fn cli_context() -> OpContext {
    OpContext {
        actor: Actor::cli(),
        client: Some("cli".into()),
        user_agent: Some(concat!("keygate-cli/", env!("CARGO_PKG_VERSION")).into()),
    }
}

/// Run `f` against the configured store (pinged first, so an unreachable
/// store is one clear line and exit 1).
fn with_keys<T>(
    path: &Path,
    f: impl AsyncFnOnce(&Config, &KeyService) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let config = load(path)?;
    logging::init(&config.log, Sink::Stderr);
    let rt = runtime(1)?;
    rt.block_on(async {
        if matches!(config.store.backend, StoreBackend::Memory) {
            return Err(Failure::Operation(
                "store.backend is \"memory\": keys would vanish with this process; configure redis"
                    .into(),
            ));
        }
        let store = Store::from_config(&config.store, &config.tenant.slug)
            .map_err(|e| Failure::Config(vec![format!("store: {e}")]))?;
        store
            .ping()
            .await
            .map_err(|e| Failure::Operation(e.to_string()))?;
        // No background tasks (revocation feed, write-behind): one operation and exit.
        let keys = KeyService::standalone(&config, store, std::sync::Arc::new(Metrics::new()));
        f(&config, &keys).await
    })
}

/// A `--expires-in`/`--grace` value: the config's duration syntax
/// ([`crate::config::parse_duration`]: ms s m h d w), more than zero.
pub fn parse_cli_duration(flag: &str, s: &str) -> Result<Duration, Failure> {
    match crate::config::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(Failure::Usage(format!("{flag}: must be more than zero"))),
        Err(e) => Err(Failure::Usage(format!("{flag}: {e}"))),
    }
}

/// A `--since` value, for every command that takes one: an RFC 3339 time
/// (`2026-12-03T08:00:00Z`), a date (`2026-12-03` = that midnight, UTC), or
/// a duration back from `now` in the config's syntax (`24h`, `7d`, `90m`).
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, Failure> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(midnight) = d.and_hms_opt(0, 0, 0) {
            return Ok(midnight.and_utc());
        }
    }
    if let Ok(back) = crate::config::parse_duration(s) {
        return chrono::Duration::from_std(back)
            .ok()
            .and_then(|b| now.checked_sub_signed(b))
            .ok_or_else(|| Failure::Usage(format!("--since: '{s}' is too far back")));
    }
    Err(Failure::Usage(format!(
        "--since: '{s}' is not a time: use RFC 3339 (2026-12-03T08:00:00Z), a date (2026-12-03, midnight UTC) or a duration back from now (24h, 7d)"
    )))
}

/// `keygate keys mint` flags, as given.
pub struct MintArgs {
    pub name: Option<String>,
    pub expires_in: Option<String>,
    pub role: Option<String>,
    pub workspaces: Vec<String>,
    pub rate_limit: Option<String>,
}

pub fn keys_mint(path: &Path, args: MintArgs, json: bool) -> Result<(), Failure> {
    let MintArgs {
        name,
        expires_in,
        role,
        workspaces,
        rate_limit,
    } = args;
    let role = match role {
        None => Role::Admin,
        Some(r) => Role::parse(&r).ok_or_else(|| {
            Failure::Usage(format!(
                "--role: '{r}' is not a role: use admin, editor or reader"
            ))
        })?,
    };
    check_workspaces(&workspaces).map_err(|e| Failure::Usage(format!("--workspace: {e}")))?;
    let rate_limit = match rate_limit {
        None => None,
        Some(r) => {
            Some(RateLimit::parse(&r).map_err(|e| Failure::Usage(format!("--rate-limit: {e}")))?)
        }
    };
    let expires_at = match expires_in {
        None => None,
        Some(s) => {
            let d = parse_cli_duration("--expires-in", &s)?;
            Some(
                Utc::now()
                    + chrono::Duration::from_std(d)
                        .map_err(|_| Failure::Usage("--expires-in: too large".into()))?,
            )
        }
    };
    if let Some(n) = &name {
        if n.chars().count() > crate::keys_api::MAX_NAME_CHARS {
            return Err(Failure::Usage("--name: longer than 100 characters".into()));
        }
    }
    with_keys(path, async |config, keys| {
        let req = MintRequest {
            name,
            expires_at,
            role,
            workspaces,
            rate_limit,
            enforce_ceiling: false,
        };
        let minted = match keys.mint(req, &cli_context()).await {
            Ok(m) => m,
            Err(MintError::Store(e)) => return Err(Failure::Operation(e.to_string())),
            Err(MintError::CeilingReached) => {
                return Err(Failure::Operation(
                    "org api token mint ceiling exceeded".into(),
                ))
            }
        };
        if minted.over_ceiling {
            eprintln!(
                "warning: tenant now has more than keys.max_live = {} live keys (CLI break-glass)",
                config.keys.max_live
            );
        }
        if json {
            println!("{}", minted_json(&minted));
        } else {
            println!("{}", minted.token.expose());
            let r = &minted.record;
            eprintln!("id:         {}", r.id);
            eprintln!("prefix:     {}", r.prefix);
            eprintln!("name:       {}", r.name.as_deref().unwrap_or("-"));
            eprintln!("created_by: {}", r.created_by);
            eprintln!("role:       {}", r.role);
            eprintln!(
                "workspaces: {}",
                if r.workspaces.is_empty() {
                    "- (whole org)".to_string()
                } else {
                    r.workspaces.join(",")
                }
            );
            eprintln!(
                "rate_limit: {}",
                r.rate_limit
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "none".into())
            );
            eprintln!(
                "expires_at: {}",
                r.expires_at
                    .as_ref()
                    .map(rfc3339)
                    .unwrap_or_else(|| "never".into())
            );
            eprintln!("{}", crate::keys_api::MINT_WARNING);
        }
        Ok(())
    })
}

pub fn keys_list(path: &Path, json: bool) -> Result<(), Failure> {
    with_keys(path, async |_, keys| {
        let records = keys
            .list()
            .await
            .map_err(|e| Failure::Operation(e.to_string()))?;
        if json {
            println!("{}", list_json(&records));
            return Ok(());
        }
        let rows: Vec<[String; 10]> = records
            .iter()
            .map(|r| {
                [
                    r.id.clone(),
                    r.prefix.clone(),
                    r.name.clone().unwrap_or_else(|| "-".into()),
                    r.role.to_string(),
                    if r.workspaces.is_empty() {
                        "-".into()
                    } else {
                        r.workspaces.join(",")
                    },
                    r.rate_limit
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "-".into()),
                    r.created_by.clone(),
                    rfc3339(&r.created_at),
                    r.last_used_at
                        .as_ref()
                        .map(rfc3339)
                        .unwrap_or_else(|| "-".into()),
                    r.expires_at
                        .as_ref()
                        .map(rfc3339)
                        .unwrap_or_else(|| "never".into()),
                ]
            })
            .collect();
        print_table(
            &[
                "ID",
                "PREFIX",
                "NAME",
                "ROLE",
                "WORKSPACES",
                "RATE_LIMIT",
                "CREATED_BY",
                "CREATED_AT",
                "LAST_USED_AT",
                "EXPIRES_AT",
            ],
            &rows,
        );
        Ok(())
    })
}

pub fn keys_revoke(path: &Path, id: &str) -> Result<(), Failure> {
    with_keys(path, async |_, keys| {
        match keys.revoke(id, &cli_context()).await {
            Ok(true) => {
                println!("revoked {id}");
                Ok(())
            }
            Ok(false) => Err(Failure::Operation("not found or already revoked".into())),
            Err(e) => Err(Failure::Operation(e.to_string())),
        }
    })
}

/// `keygate keys rotate` (§9): the successor's token alone on stdout's first line.
pub fn keys_rotate(
    path: &Path,
    id: &str,
    grace: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    let grace = match grace {
        None => None,
        Some(g) => Some(crate::keys_rotate::parse_grace(&g).ok_or_else(|| {
            Failure::Usage(format!(
                "--grace: '{g}' is not a duration of at most 30d (e.g. 24h, 90m, 0s)"
            ))
        })?),
    };
    with_keys(path, async |_, keys| {
        let req = crate::auth::RotateRequest {
            grace,
            expires_at: None,
        };
        match keys.rotate(id, req, &cli_context()).await {
            Ok(Some(r)) => {
                if json {
                    println!("{}", crate::keys_rotate::rotated_json(&r));
                } else {
                    println!("{}", r.minted.token.expose());
                    eprintln!("id: {} (rotated from {id})", r.minted.record.id);
                    eprintln!("old key expires_at: {}", rfc3339(&r.old_expires_at));
                    eprintln!("{}", crate::keys_api::MINT_WARNING);
                }
                Ok(())
            }
            Ok(None) => Err(Failure::Operation("not found or already revoked".into())),
            Err(e) => Err(Failure::Operation(e.to_string())),
        }
    })
}

/// `keygate keys usage` (§10): a table of hours, or `--json` the usage route's object.
pub fn keys_usage(path: &Path, id: &str, since: Option<String>, json: bool) -> Result<(), Failure> {
    let since = match since {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(&s)
                .map_err(|_| Failure::Usage(format!("--since: '{s}' is not an RFC 3339 time")))?
                .with_timezone(&Utc),
        ),
    };
    with_keys(path, async |_, keys| {
        let report = match keys.usage(id, since).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Failure::Operation("not found".into())),
            Err(e) => return Err(Failure::Operation(e.to_string())),
        };
        if json {
            println!("{}", crate::keys_rotate::usage_json(&report));
            return Ok(());
        }
        let rows: Vec<[String; 3]> = report
            .hours
            .iter()
            .map(|h| {
                [
                    rfc3339(&crate::auth::usage::hour_start(h.hour)),
                    h.requests.to_string(),
                    h.refused.to_string(),
                ]
            })
            .collect();
        print_table(&["HOUR", "REQUESTS", "REFUSED"], &rows);
        Ok(())
    })
}

pub fn audit(path: &Path, since: Option<String>, json: bool) -> Result<(), Failure> {
    let since = match since {
        None => None,
        Some(s) => Some(parse_since(&s, Utc::now())?),
    };
    with_keys(path, async |_, keys| {
        let entries = keys
            .audit(since)
            .await
            .map_err(|e| Failure::Operation(e.to_string()))?;
        if json {
            for e in &entries {
                println!("{}", audit_json(e));
            }
            return Ok(());
        }
        let rows: Vec<[String; 8]> = entries
            .iter()
            .map(|e| {
                [
                    rfc3339(&e.time),
                    e.actor.clone(),
                    e.action.clone(),
                    e.key_id.clone(),
                    e.prefix.clone(),
                    e.name.clone().unwrap_or_else(|| "-".into()),
                    e.client.clone().unwrap_or_else(|| "-".into()),
                    e.user_agent.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        print_table(
            &[
                "TIME",
                "ACTOR",
                "ACTION",
                "KEY_ID",
                "PREFIX",
                "NAME",
                "CLIENT",
                "USER_AGENT",
            ],
            &rows,
        );
        Ok(())
    })
}

pub fn audit_json(e: &AuditEntry) -> serde_json::Value {
    let mut v = serde_json::json!({
        "time": rfc3339(&e.time),
        "actor": e.actor,
        "action": e.action,
        "key_id": e.key_id,
        "prefix": e.prefix,
        "name": e.name,
        "client": e.client,
        "user_agent": e.user_agent,
    });
    if let Some(role) = e.role {
        v["role"] = role.as_str().into();
        v["workspaces"] = e.workspaces.clone().into();
    }
    if let Some(id) = &e.new_key_id {
        v["new_key_id"] = id.clone().into();
    }
    v
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn demo(port: u16) -> Result<(), Failure> {
    let rt = runtime(0)?;
    rt.block_on(crate::demo::run(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(r: Result<impl std::fmt::Debug, Failure>) -> String {
        match r {
            Err(Failure::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn since_takes_rfc3339_a_date_or_a_duration_back() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T13:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| rfc3339(&parse_since(s, now).unwrap());
        assert_eq!(at("2026-12-03T08:30:00Z"), "2026-12-03T08:30:00Z");
        assert_eq!(at("2026-12-03T08:30:00+01:00"), "2026-12-03T07:30:00Z");
        assert_eq!(at("2026-12-03"), "2026-12-03T00:00:00Z");
        assert_eq!(at("24h"), "2026-12-03T13:00:00Z");
        assert_eq!(at("7d"), "2026-11-27T13:00:00Z");
        assert_eq!(at("90m"), "2026-12-04T11:30:00Z");
        assert_eq!(at(" 1w "), "2026-11-27T13:00:00Z");
        for bad in ["yesterday", "2026-13-01", "24", "h", "", "-1h"] {
            let m = usage(parse_since(bad, now));
            assert!(m.starts_with("--since: "), "{bad}: {m}");
            assert!(m.contains("RFC 3339") && m.contains("24h"), "{bad}: {m}");
        }
    }

    #[test]
    fn cli_durations_use_the_config_syntax() {
        let d = |s: &str| parse_cli_duration("--expires-in", s).unwrap();
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("45s"), Duration::from_secs(45));
        assert_eq!(d("90m"), Duration::from_secs(5400));
        assert_eq!(d("12h"), Duration::from_secs(43_200));
        assert_eq!(d("30d"), Duration::from_secs(30 * 86_400));
        assert_eq!(d("2w"), Duration::from_secs(14 * 86_400));
        assert!(usage(parse_cli_duration("--expires-in", "0s")).contains("more than zero"));
        let m = usage(parse_cli_duration("--expires-in", "soon"));
        assert!(
            m.starts_with("--expires-in: ") && m.contains("ms, s, m, h, d or w"),
            "{m}"
        );
    }

    #[test]
    fn store_address_never_shows_userinfo() {
        use crate::config::{RedisTarget, Secret};
        let url = |u: &str| StoreBackend::Redis(RedisTarget::Url(Secret::new(u)));
        assert_eq!(store_address(&StoreBackend::Memory), "memory");
        assert_eq!(
            store_address(&url("redis://:pa/ss@h:1/0")),
            "redis redis://h:1/0"
        );
        assert_eq!(
            store_address(&url("redis://:pw@10.0.0.1:6379/3")),
            "redis redis://10.0.0.1:6379/3"
        );
        assert_eq!(
            store_address(&url("rediss://user:p@ss@cache:6380")),
            "redis rediss://cache:6380"
        );
        let cluster = StoreBackend::Redis(RedisTarget::Cluster(vec![
            Secret::new("redis://:pw@a:1"),
            Secret::new("redis://b:2"),
        ]));
        assert_eq!(
            store_address(&cluster),
            "redis cluster redis://a:1,redis://b:2"
        );
        let sentinel = StoreBackend::Redis(RedisTarget::Sentinel {
            master: "kg".into(),
            nodes: vec![Secret::new("redis://:pw@s:26379")],
        });
        assert_eq!(
            store_address(&sentinel),
            "redis sentinel kg via redis://s:26379"
        );
    }
}
