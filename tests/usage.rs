//! Per-key usage (contract §10) on real Redis: counts from two instances add
//! up, a failed flush is retried without double counting, no Redis write per
//! request, the usage route and its 404, Redis Cluster keys in the tenant's
//! slot (with a rotation), and the memory a bucket takes.
mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::keys::{bearer, delete, get_with, send};
use common::kg::{self, bootstrap_key, RawResponse};
use common::redis::{redis_cli, RedisCluster, RedisServer};
use common::upstream::Upstream;
use keygate::auth::store::{Store, UsageDelta};
use keygate::auth::usage::hour_of;
use keygate::RunHandle;

async fn usage(kg: &RunHandle, token: &str, id: &str, query: &str) -> RawResponse {
    get_with(
        kg.public_addr,
        &format!("/org/tokens/{id}/usage{query}"),
        token,
    )
    .await
}

fn commandstat(port: u16, cmd: &str) -> u64 {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn writes(port: u16) -> u64 {
    ["evalsha", "eval", "hincrby", "hset", "set", "expireat"]
        .iter()
        .map(|c| commandstat(port, c))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_add_up_and_the_route_reads_them() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.keys.usage_flush = Duration::from_secs(3600); // flushed by hand below
    let a = kg::start_live(&config).await;
    let b = kg::start_live(&config).await;
    let admin = bootstrap_key(&a).await;
    let k = kg::mint_key(&a, Some("counted")).await;
    let (na, nb) = (23, 17);
    for _ in 0..na {
        assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    }
    for _ in 0..nb {
        assert_eq!(get_with(b.public_addr, "/x", &k.token).await.status, 200);
    }
    // keygate's own answers to the key count too (it reads its own usage: 1 more).
    a.app.auth.flush_usage().await.unwrap();
    b.app.auth.flush_usage().await.unwrap();
    let r = usage(&a, &k.token, &k.id, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["id"], k.id.as_str());
    assert_eq!(v["requests"], na + nb);
    assert_eq!(v["refused"], 0);
    let hours = v["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 1, "{v}");
    let hour = DateTime::parse_from_rfc3339(hours[0]["hour"].as_str().unwrap()).unwrap();
    assert_eq!(hour.timestamp() % 3600, 0);
    assert_eq!(hour.timestamp() / 3600, hour_of(Utc::now()));
    assert_eq!(hours[0]["requests"], na + nb);

    // The usage call itself was counted (and flushed now): 41 with an admin read.
    a.app.auth.flush_usage().await.unwrap();
    let v = usage(&a, &admin, &k.id, "").await.json();
    assert_eq!(v["requests"], na + nb + 1);
    // since: the hour containing it is included; a later hour has nothing.
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let v = usage(&a, &admin, &k.id, &format!("?since={now}"))
        .await
        .json();
    assert_eq!(v["requests"], na + nb + 1);
    let later = (Utc::now() + chrono::Duration::hours(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let v = usage(&a, &admin, &k.id, &format!("?since={later}"))
        .await
        .json();
    assert_eq!(
        (v["requests"].as_u64(), v["hours"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
    assert_eq!(
        usage(&a, &admin, &k.id, "?since=yesterday").await.status,
        400
    );

    // Unknown id 404; a revoked key keeps its usage; another key may not read it.
    let r = usage(&a, &admin, "nosuchkey", "").await;
    assert_eq!(r.status, 404);
    let other = kg::mint_key(&a, None).await;
    let editor = kg::mint_request(
        &a,
        keygate::auth::MintRequest {
            role: keygate::auth::scope::Role::Editor,
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(usage(&a, &editor.token, &k.id, "").await.status, 403);
    assert_eq!(delete(a.public_addr, &admin, &k.id).await.status, 200);
    let v = usage(&a, &other.token, &k.id, "").await.json();
    assert_eq!(v["requests"], na + nb + 1, "revoked keys keep their usage");
    // Wrong method.
    let r = send(
        a.public_addr,
        "POST",
        &format!("/org/tokens/{}/usage", k.id),
        &[("Authorization", &bearer(&admin))],
        None,
    )
    .await;
    assert_eq!(r.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redis_write_per_request() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.keys.usage_flush = Duration::from_secs(3600);
    let a = kg::start_live(&config).await;
    let k = kg::mint_key(&a, None).await;
    assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    let before = writes(redis.port());
    let n = 300;
    for _ in 0..n {
        assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    }
    let after = writes(redis.port());
    eprintln!(
        "redis write commands during {n} requests: {}",
        after - before
    );
    // (Commands run inside scripts count too.) At most the last_used_at
    // write-behind (one script every 5 s).
    assert!(
        after - before <= 2,
        "{} writes for {n} requests",
        after - before
    );
    let scripts = || commandstat(redis.port(), "evalsha") + commandstat(redis.port(), "eval");
    let before_flush = scripts();
    a.app.auth.flush_usage().await.unwrap();
    // One script call: EVALSHA (and EVAL the first time this server sees it).
    assert!(scripts() - before_flush <= 2, "one script call per flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_is_retried_after_redis_returns_without_double_counting() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.keys.usage_flush = Duration::from_secs(3600);
    let a = kg::start_live(&config).await;
    let k = kg::mint_key(&a, None).await;
    for _ in 0..10 {
        assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    }
    redis.kill();
    assert!(a.app.auth.flush_usage().await.is_err());
    assert!(a.app.auth.flush_usage().await.is_err());
    assert_eq!(a.app.auth.usage().unflushed(), 10, "kept until written");
    redis.restart();
    // The retry goes through once Redis is back (poll: the client reconnects).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.app.auth.flush_usage().await.is_err() {
        assert!(Instant::now() < deadline, "flush never succeeded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.app.auth.flush_usage().await.unwrap();
    let store = Store::from_config(&config.store, "acme").unwrap();
    let h = hour_of(Utc::now());
    let got = store.usage(&k.id, h - 1, h).await.unwrap();
    assert_eq!(got.iter().map(|u| u.requests).sum::<u64>(), 10, "{got:?}");
    assert_eq!(a.app.auth.usage().unflushed(), 0);

    // A batch re-sent after a lost reply is added once.
    let d = [UsageDelta {
        key_id: "k2".into(),
        hour: h,
        requests: 5,
        refused: 1,
    }];
    let ret = Duration::from_secs(3600);
    store.add_usage("batch-1", &d, ret).await.unwrap();
    store.add_usage("batch-1", &d, ret).await.unwrap();
    let got = store.usage("k2", h, h).await.unwrap();
    assert_eq!((got[0].requests, got[0].refused), (5, 1));
    // Buckets expire usage_retention after their hour ends.
    let ttl: i64 = redis_cli(
        redis.port(),
        &["TTL", &format!("keygate:{{acme}}:usage:k2:{h}")],
    )
    .trim()
    .parse()
    .unwrap();
    let end = (h + 1) * 3600 + 3600 - Utc::now().timestamp();
    assert!((ttl - end).abs() <= 2, "ttl {ttl}, expected about {end}");
    let mem = redis_cli(
        redis.port(),
        &[
            "MEMORY",
            "USAGE",
            &format!("keygate:{{acme}}:usage:{}:{h}", k.id),
        ],
    );
    eprintln!(
        "MEMORY USAGE of one usage bucket (key id {} chars): {} bytes",
        k.id.len(),
        mem.trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_flushed_on_shutdown_and_by_the_timer() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.keys.usage_flush = Duration::from_secs(1);
    let a = kg::start_live(&config).await;
    let k = kg::mint_key(&a, None).await;
    for _ in 0..4 {
        assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    }
    let store = Store::from_config(&config.store, "acme").unwrap();
    let h = hour_of(Utc::now());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: u64 = store
            .usage(&k.id, h - 1, h)
            .await
            .unwrap()
            .iter()
            .map(|u| u.requests)
            .sum();
        if n == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "timer flush: {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Shutdown writes what is left.
    let mut config2 = config.clone();
    config2.keys.usage_flush = Duration::from_secs(3600);
    let b = kg::start_live(&config2).await;
    for _ in 0..3 {
        assert_eq!(get_with(b.public_addr, "/x", &k.token).await.status, 200);
    }
    b.stop().await;
    let n: u64 = store
        .usage(&k.id, h - 1, h)
        .await
        .unwrap()
        .iter()
        .map(|u| u.requests)
        .sum();
    assert_eq!(n, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rotation_and_usage_keys_live_in_the_tenant_slot() {
    let cluster = RedisCluster::start(3);
    let up = Upstream::start().await;
    let mut config = kg::cluster_config(&up, &cluster);
    config.keys.usage_flush = Duration::from_secs(3600);
    let a = kg::start_live(&config).await;
    let b = kg::start_live(&config).await;
    let admin = bootstrap_key(&a).await;
    let k = kg::mint_key(&a, None).await;
    assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 200);
    assert_eq!(get_with(b.public_addr, "/x", &k.token).await.status, 200);
    let r = send(
        a.public_addr,
        "POST",
        &format!("/org/tokens/{}/rotate", k.id),
        &[("Authorization", &bearer(&admin))],
        Some(r#"{"grace":"0s"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let succ = r.json()["auth_token"].as_str().unwrap().to_string();
    let succ_id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(get_with(a.public_addr, "/x", &k.token).await.status, 401);
    let deadline = Instant::now() + Duration::from_secs(2);
    while get_with(b.public_addr, "/x", &k.token).await.status != 401 {
        assert!(
            Instant::now() < deadline,
            "second instance still accepts the old key"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for kg in [&a, &b] {
        for _ in 0..5 {
            assert_eq!(get_with(kg.public_addr, "/x", &succ).await.status, 200);
        }
        kg.app.auth.flush_usage().await.unwrap();
    }
    let v = get_with(
        a.public_addr,
        &format!("/org/tokens/{succ_id}/usage"),
        &succ,
    )
    .await
    .json();
    assert_eq!(v["requests"], 10, "{v}");

    // Every key of the tenant (records, usage buckets, batch markers) in one slot.
    let slot = cluster.keyslot("keygate:{acme}:live");
    let mut seen_usage = false;
    for port in cluster.live_ports() {
        let keys = redis_cli(port, &["--scan", "--pattern", "keygate:{acme}:*"]);
        for key in keys.lines().filter(|l| !l.is_empty()) {
            assert_eq!(cluster.keyslot(key), slot, "{key}");
            seen_usage |= key.contains(":usage:");
        }
    }
    assert!(seen_usage, "usage buckets were written");
}
