//! Per-key rate limits (contract §11) on real Redis: one keygate, two
//! keygates sharing the store, the order of checks, `keys.default_rate_limit`,
//! and a Redis outage in the middle of a window.
//!
//! Run: `cargo test --test ratelimit` (needs `redis-server` and `redis-cli`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::keys::{bearer, get_with, mint, send};
use common::kg::{self, Key};
use common::redis::{redis_cli, RedisCluster, RedisServer};
use common::upstream::Upstream;
use keygate::auth::scope::Role;
use keygate::auth::MintRequest;
use keygate::config::{OutagePolicy, RateLimit};
use keygate::RunHandle;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Poll the clock (bounded by one window) until at least `need` ms are left
/// in the current window of `unit_ms`, and until at most `late` ms of it
/// have passed; returns the window's start (ms).
async fn align(unit_ms: u64, late: u64, need: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(unit_ms + 1000);
    loop {
        let now = now_ms();
        let into = now % unit_ms;
        if into <= late && unit_ms - into >= need {
            return now - into;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clock did not align"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn limited_key(kg: &RunHandle, limit: &str) -> Key {
    kg::mint_request(
        kg,
        MintRequest {
            name: Some("limited".into()),
            rate_limit: Some(RateLimit::parse(limit).unwrap()),
            ..Default::default()
        },
    )
    .await
}

/// `POST /org/tokens` with `admin`; the key object and its token.
async fn api_mint(
    addr: std::net::SocketAddr,
    admin: &str,
    body: &str,
) -> (serde_json::Value, String) {
    let r = mint(addr, admin, body).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let token = v["auth_token"].as_str().unwrap().to_string();
    (v, token)
}

/// `tasks` concurrent clients, spread over `addrs`, each sending `each`
/// requests with `token`: (let through, refused with 429). Any other
/// status fails the test.
async fn drive(addrs: &[SocketAddr], token: &str, tasks: usize, each: usize) -> (usize, usize) {
    let mut running = Vec::new();
    for t in 0..tasks {
        let token = token.to_string();
        let addr = addrs[t % addrs.len()];
        running.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for _ in 0..each {
                let r = get_with(addr, "/api/x", &token).await;
                match r.status {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("unexpected {other}: {r:?}"),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in running {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    (ok, refused)
}

/// The Redis key of key `id`'s counter for the window starting at
/// `window_start_s` (tenant acme).
fn counter_key(id: &str, window_start_s: u64) -> String {
    format!("keygate:{{acme}}:rl:{id}:{window_start_s}")
}

fn counter(redis: &RedisServer, id: &str, window_start_s: u64) -> String {
    redis_cli(redis.port(), &["GET", &counter_key(id, window_start_s)])
        .trim()
        .to_string()
}

/// Milliseconds the window counter has left to live.
fn counter_ttl(redis: &RedisServer, id: &str, window_start_s: u64) -> i64 {
    redis_cli(redis.port(), &["PTTL", &counter_key(id, window_start_s)])
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_per_second_then_429_with_headers_then_the_next_window() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let key = limited_key(&kg, "5/s").await;
    let addr = kg.public_addr;
    // A first request so the key is cached (its store look-up is not part
    // of the window under test).
    assert_eq!(get_with(addr, "/api/warm", &key.token).await.status, 200);

    let start = align(1000, 5, 800).await;
    let before = up.count();
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    while now_ms() < start + 800 {
        let r = get_with(addr, "/api/x", &key.token).await;
        if now_ms() >= start + 1000 {
            break; // answered in the next window: not counted
        }
        match r.status {
            200 => ok.push(r),
            429 => {
                refused.push(r);
                if refused.len() >= 3 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    println!("let through in the aligned second: {}", ok.len());
    assert!(
        (5..=6).contains(&ok.len()),
        "{} let through in one second of a 5/s key",
        ok.len()
    );
    for (i, r) in ok.iter().enumerate() {
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("5"), "{r:?}");
        assert_eq!(r.header("ratelimit-reset").as_deref(), Some("1"), "{r:?}");
        let rem: u64 = r.header("ratelimit-remaining").unwrap().parse().unwrap();
        assert!(
            rem <= 4 - i.min(4) as u64,
            "remaining {rem} after {} requests",
            i + 1
        );
        assert!(r.header("retry-after").is_none());
    }
    assert!(!refused.is_empty(), "no 429 in the window");
    for r in &refused {
        assert_eq!(r.error(), "rate limit exceeded");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{r:?}");
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("5"));
        assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
        assert_eq!(r.header("ratelimit-reset").as_deref(), Some("1"));
        assert!(r.header("x-request-id").is_some());
    }
    // 429s are never forwarded: the app saw exactly the let-through ones.
    let seen = up.wait_for(before + ok.len()).await;
    assert_eq!(seen.len(), before + ok.len());
    let metrics = kg.app.metrics.render();
    assert!(
        metrics.contains(&format!(
            "keygate_requests_total{{outcome=\"rate_limited\"}} {}",
            refused.len()
        )),
        "{metrics}"
    );

    // The next window: let through again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while now_ms() < start + 1000 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let next = align(1000, 300, 500).await;
    assert!(next > start);
    let r = get_with(addr, "/api/y", &key.token).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("ratelimit-limit").as_deref(), Some("5"));
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keygates_sharing_redis_hold_40_per_minute_together() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let c = kg::redis_config(&up, &redis);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let key = limited_key(&a, "40/min").await;
    // Both cache the key before the window under test.
    let warm_at = now_ms();
    for kg in [&a, &b] {
        let r = get_with(kg.public_addr, "/api/warm", &key.token).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let start = align(60_000, 60_000, 30_000).await;
    let warm = up.count();
    let (ok, refused) = drive(&[a.public_addr, b.public_addr], &key.token, 8, 15).await;
    assert!(now_ms() < start + 60_000, "the drive left the window");
    // The warm-up requests count in this window when it began before them.
    let warm_in_window = if warm_at >= start { 2 } else { 0 };
    println!("two instances, 40/min, 120 requests: {ok} let through, {refused} refused");
    assert!(ok + warm_in_window <= 42, "{ok} let through in one window");
    assert!(ok >= 30, "only {ok} of 40 let through");
    assert_eq!(ok + refused, 120);
    assert_eq!(up.wait_for(warm + ok).await.len(), warm + ok);
    // Redis holds the window's reservations, never more than N.
    let reserved: u64 = counter(&redis, &key.id, start / 1000).parse().unwrap();
    assert!(
        reserved <= 40 && reserved >= (ok + warm_in_window) as u64,
        "reserved {reserved}"
    );
    // It expires shortly after the window's end.
    let ttl = counter_ttl(&redis, &key.id, start / 1000);
    let to_end = (start + 60_000).saturating_sub(now_ms()) as i64;
    assert!(
        ttl > to_end && ttl <= to_end + 11_000,
        "ttl {ttl} ms, window ends in {to_end} ms"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_the_limit_never_consume_it() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let key = limited_key(&kg, "3/h").await;
    let addr = kg.public_addr;
    align(3_600_000, 3_600_000, 60_000).await;
    // Denied paths (403) and a bad path (400) come before the limit.
    for target in ["/cp/admin", "/cp/admin/x", "/api/%2e%2e/x"] {
        for _ in 0..3 {
            let r = get_with(addr, target, &key.token).await;
            assert!(r.status == 403 || r.status == 400, "{target}: {r:?}");
            assert!(r.header("ratelimit-limit").is_none(), "{r:?}");
        }
    }
    let before = up.count();
    for i in 0..3 {
        let r = get_with(addr, "/api/x", &key.token).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some((2 - i).to_string()),
            "{r:?}"
        );
    }
    let r = get_with(addr, "/api/x", &key.token).await;
    assert_eq!(r.status, 429, "{r:?}");
    // The keys API is behind the limit too (never answered past it).
    let r = get_with(addr, "/org/tokens", &key.token).await;
    assert_eq!(r.status, 429, "{r:?}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    assert_eq!(up.wait_for(before + 3).await.len(), before + 3);
    kg.stop().await;
}

/// §11 "the scope check comes first": a reader's writes, and key-management
/// calls its scope does not allow (another key's revoke, rotate and usage; a
/// mint), are refused 403 before the limit and leave its budget whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_scope_requests_never_consume_the_limit() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let addr = kg.public_addr;
    let other = kg::mint_key(&kg, Some("other")).await;
    let bound = kg::mint_request(
        &kg,
        MintRequest {
            name: Some("bound reader".into()),
            role: Role::Reader,
            workspaces: vec!["ws_1".into()],
            rate_limit: Some(RateLimit::parse("2/h").unwrap()),
            ..Default::default()
        },
    )
    .await;
    align(3_600_000, 3_600_000, 60_000).await;
    let auth = bearer(&bound.token);
    let refused: [(&str, String, Option<&str>); 7] = [
        ("POST", "/workspaces/ws_1/x".into(), Some("{}")),
        ("DELETE", "/workspaces/ws_1".into(), None),
        ("GET", "/workspaces/ws_2/x".into(), None),
        ("GET", "/org/tokens".into(), None),
        ("POST", "/org/tokens".into(), Some(r#"{"role":"reader"}"#)),
        ("DELETE", format!("/org/tokens/{}", other.id), None),
        (
            "POST",
            format!("/org/tokens/{}/rotate", other.id),
            Some("{}"),
        ),
    ];
    for (method, target, body) in &refused {
        for _ in 0..2 {
            let r = send(addr, method, target, &[("Authorization", &auth)], *body).await;
            assert_eq!(r.status, 403, "{method} {target}: {r:?}");
            assert_eq!(r.error(), "forbidden: outside this key's scope");
            // Every response to a limited key carries its headers: nothing taken.
            assert_eq!(r.header("ratelimit-limit").as_deref(), Some("2"), "{r:?}");
            assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("2"));
            assert!(r.header("retry-after").is_none(), "{r:?}");
        }
    }
    let r = get_with(
        addr,
        &format!("/org/tokens/{}/usage", other.id),
        &bound.token,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(up.count(), 0, "nothing out of scope was forwarded");
    // The whole budget is still there: two requests in scope, then the 429.
    for i in 0..2 {
        let r = get_with(addr, "/workspaces/ws_1/x", &bound.token).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("ratelimit-remaining"), Some((1 - i).to_string()));
    }
    let r = get_with(addr, "/workspaces/ws_1/x", &bound.token).await;
    assert_eq!(r.status, 429, "{r:?}");
    // A key-management call in scope (its own usage) is behind the limit.
    let r = get_with(
        addr,
        &format!("/org/tokens/{}/usage", bound.id),
        &bound.token,
    )
    .await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(up.wait_for(2).await.len(), 2);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_rate_limit_applies_at_mint() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut c = kg::redis_config(&up, &redis);
    c.keys.default_rate_limit = Some(RateLimit::parse("2/h").unwrap());
    let kg = kg::start_live(&c).await;
    let addr = kg.public_addr;
    let admin = kg::bootstrap_key(&kg).await;
    let (minted, token) = api_mint(addr, &admin, r#"{"name":"agent"}"#).await;
    assert_eq!(minted["rate_limit"], "2/h", "{minted}");
    let (explicit, _) = api_mint(addr, &admin, r#"{"rate_limit":"7/min"}"#).await;
    assert_eq!(explicit["rate_limit"], "7/min", "{explicit}");
    align(3_600_000, 3_600_000, 60_000).await;
    for _ in 0..2 {
        let r = get_with(addr, "/api/x", &token).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("2"));
    }
    let r = get_with(addr, "/api/x", &token).await;
    assert_eq!(r.status, 429, "{r:?}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_window_local_limits_hold_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_string();
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ]);
    let up = Upstream::start().await;
    let mut c = kg::redis_config(&up, &redis);
    c.auth.on_store_unavailable = OutagePolicy::ServeCached;
    c.auth.max_stale = Duration::from_secs(600);
    let kg = kg::start_live(&c).await;
    let key = limited_key(&kg, "100/h").await;
    let addr = kg.public_addr;
    let start = align(3_600_000, 3_600_000, 60_000).await;
    for _ in 0..4 {
        assert_eq!(get_with(addr, "/api/x", &key.token).await.status, 200);
    }
    redis.kill();
    let before = up.count();
    let mut ok = 4;
    let mut last = None;
    for _ in 0..200 {
        let r = get_with(addr, "/api/x", &key.token).await;
        match r.status {
            200 => ok += 1,
            429 => {
                last = Some(r);
                break;
            }
            other => panic!("unexpected {other} during the outage: {r:?}"),
        }
    }
    println!("let through in the window with Redis down: {ok}");
    assert_eq!(ok, 100, "the instance alone must hold N");
    let r = last.expect("a 429 once the local count reached N");
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    assert!(kg.app.metrics.ratelimit_store_errors.get() > 0);
    assert!(!kg.app.ratelimit.store_ok());
    assert_eq!(up.wait_for(before + 96).await.len(), before + 96);

    // Redis comes back (with its data): coordination resumes by itself and
    // the requests let through alone are added to the window's counter.
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = get_with(addr, "/api/x", &key.token).await;
        assert_eq!(r.status, 429, "{r:?}");
        if kg.app.ratelimit.store_ok() && counter(&redis, &key.id, start / 1000) == "100" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordination did not recover: counter {:?}",
            counter(&redis, &key.id, start / 1000)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fresh key works and is coordinated again.
    let fresh = limited_key(&kg, "1/h").await;
    assert_eq!(get_with(addr, "/api/x", &fresh.token).await.status, 200);
    assert_eq!(get_with(addr, "/api/x", &fresh.token).await.status, 429);
    assert_eq!(counter(&redis, &fresh.id, start / 1000), "1");
    kg.stop().await;
}

/// §11 on a Redis Cluster: two keygates hold one limit together, and the
/// window counters live in the tenant's hash slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_keygates_hold_one_limit_in_the_tenant_slot() {
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
    let up = Upstream::start().await;
    let c = kg::cluster_config(&up, &cluster);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let key = limited_key(&a, "30/h").await;
    let start = align(3_600_000, 3_600_000, 60_000).await;
    let (ok, refused) = drive(&[a.public_addr, b.public_addr], &key.token, 6, 10).await;
    assert!(now_ms() < start + 3_600_000, "the drive left the window");
    println!("cluster, two instances, 30/h, 60 requests: {ok} let through, {refused} refused");
    // N plus 5% of N rounded up, at most.
    assert!(ok <= 32, "{ok} let through in one window");
    assert!(ok >= 20, "only {ok} of 30 let through");
    assert_eq!(ok + refused, 60);
    assert_eq!(up.wait_for(ok).await.len(), ok);
    // The window's counter: in the tenant's slot, never more than N.
    let counter = counter_key(&key.id, start / 1000);
    let slot = cluster.keyslot("keygate:{acme}:live");
    assert_eq!(cluster.keyslot(&counter), slot);
    let reserved: Vec<u64> = cluster
        .live_ports()
        .into_iter()
        .filter_map(|p| redis_cli(p, &["GET", &counter]).trim().parse().ok())
        .collect();
    assert_eq!(
        reserved.len(),
        1,
        "one master holds {counter}: {reserved:?}"
    );
    assert!(
        reserved[0] <= 30 && reserved[0] >= ok as u64,
        "reserved {reserved:?}"
    );
    a.stop().await;
    b.stop().await;
}
