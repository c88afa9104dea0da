//! The Redis key store against a real `redis-server` (one per test, on a free
//! port): records, hashes only, listing, revoke + feed, ceiling, outage and
//! recovery, audit, last-used write-behind, tenant isolation.
//!
//! Run: `cargo test --test store_redis` (needs `redis-server` and `redis-cli`
//! on PATH: `apt-get install -y redis-server`).

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use common::redis::{redis_cli, RedisCluster, RedisSentinel, RedisServer};
use keygate::auth::scope::Role;
use keygate::auth::store::{AuditEntry, FeedEvent, KeyRecord, MintOutcome, Store, StoreError};
use keygate::auth::token::KeyHash;
use keygate::config::{RateLimit, RedisTarget, Secret, StoreBackend, StoreConfig};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const TIMEOUT: Duration = Duration::from_millis(250);
/// Allowance on top of `store.timeout` for a failing call on a busy machine.
const MARGIN: Duration = Duration::from_millis(750);
/// Upper bound on waiting for a feed event.
const FEED_DEADLINE: Duration = Duration::from_secs(10);

fn store(server: &RedisServer, slug: &str) -> Store {
    store_at(&server.url(), slug)
}

fn store_at(url: &str, slug: &str) -> Store {
    let config = StoreConfig {
        backend: StoreBackend::Redis(RedisTarget::Url(Secret::new(url))),
        timeout: TIMEOUT,
    };
    Store::from_config(&config, slug).expect("store from config")
}

/// A token-shaped secret (the store never sees it; only its hash).
struct NewKey {
    token: String,
    hash: KeyHash,
    record: KeyRecord,
}

fn new_key(name: &str, created_at: DateTime<Utc>, expires_at: Option<DateTime<Utc>>) -> NewKey {
    let token = format!("mok_{}", Alphanumeric.sample_string(&mut rand::rng(), 49));
    let hash = KeyHash(Sha256::digest(token.as_bytes()).into());
    let record = KeyRecord {
        id: Alphanumeric.sample_string(&mut rand::rng(), 16),
        prefix: token[..12].to_string(),
        name: Some(name.to_string()),
        created_by: "org-key:mok_abcdefgh".into(),
        created_at,
        expires_at,
        last_used_at: None,
        revoked_at: None,
        role: Role::Admin,
        workspaces: Vec::new(),
        rate_limit: None,
    };
    NewKey {
        token,
        hash,
        record,
    }
}

fn audit(action: &str, key: &NewKey) -> AuditEntry {
    AuditEntry {
        time: Utc::now(),
        actor: "session:user_42".into(),
        action: action.into(),
        key_id: key.record.id.clone(),
        prefix: key.record.prefix.clone(),
        name: key.record.name.clone(),
        client: Some("203.0.113.7".into()),
        user_agent: Some("curl/8.5".into()),
        role: (action == "mint").then_some(key.record.role),
        workspaces: key.record.workspaces.clone(),
        new_key_id: None,
    }
}

async fn mint(store: &Store, key: &NewKey) {
    let out = store
        .mint(&key.hash, &key.record, None, &audit("mint", key))
        .await
        .expect("mint");
    assert!(matches!(out, MintOutcome::Minted { .. }), "{out:?}");
}

fn hex(hash: &KeyHash) -> String {
    hash.0.iter().map(|b| format!("{b:02x}")).collect()
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<FeedEvent>) -> FeedEvent {
    tokio::time::timeout(FEED_DEADLINE, rx.recv())
        .await
        .expect("no feed event within the deadline")
        .expect("feed channel closed")
}

/// Start a feed and wait until it is subscribed.
async fn connected_feed(store: &Store) -> mpsc::UnboundedReceiver<FeedEvent> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    store.spawn_revocation_feed(tx);
    assert_eq!(next_event(&mut rx).await, FeedEvent::Connected);
    rx
}

#[tokio::test]
async fn mint_then_lookup_returns_the_record() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("ci", Utc::now(), Some(Utc::now() + TimeDelta::days(30)));
    let out = s
        .mint(&k.hash, &k.record, Some(10), &audit("mint", &k))
        .await
        .unwrap();
    assert_eq!(out, MintOutcome::Minted { live: 1 });
    assert_eq!(s.lookup(&k.hash).await.unwrap(), Some(k.record.clone()));
    let unknown = new_key("other", Utc::now(), None);
    assert_eq!(s.lookup(&unknown.hash).await.unwrap(), None);
    s.ping().await.unwrap();
}

#[tokio::test]
async fn scope_and_rate_limit_round_trip_and_reach_the_audit_trail() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let mut k = new_key("bound", Utc::now(), None);
    k.record.role = Role::Reader;
    k.record.workspaces = vec!["ws_2".into(), "ws_1".into()];
    k.record.rate_limit = Some(RateLimit::parse("40/min").unwrap());
    mint(&s, &k).await;
    assert_eq!(s.lookup(&k.hash).await.unwrap(), Some(k.record.clone()));
    assert_eq!(s.list_live().await.unwrap(), vec![k.record.clone()]);
    // What Redis holds: the fields by name, ids in mint order.
    let record = format!("keygate:{{acme}}:key:{}", hex(&k.hash));
    let field = |f: &str| redis_cli(server.port(), &["HGET", &record, f]);
    assert_eq!(field("role").trim(), "reader");
    assert_eq!(field("workspaces").trim(), "ws_2,ws_1");
    assert_eq!(field("rate_limit").trim(), "40/min");
    let audit = s.audit(None).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].role, Some(Role::Reader));
    assert_eq!(audit[0].workspaces, ["ws_2", "ws_1"]);
}

#[tokio::test]
async fn a_record_from_before_scopes_reads_as_an_unbound_admin_without_limit() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("old", Utc::now(), None);
    // Written field by field as the first release's mint script did.
    let record = format!("keygate:{{acme}}:key:{}", hex(&k.hash));
    let created = k
        .record
        .created_at
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    redis_cli(
        server.port(),
        &[
            "HSET",
            &record,
            "id",
            &k.record.id,
            "prefix",
            &k.record.prefix,
            "name",
            "old",
            "created_by",
            "cli:ops",
            "created_at",
            &created,
            "expires_at",
            "",
            "last_used_at",
            "",
            "revoked_at",
            "",
        ],
    );
    let got = s.lookup(&k.hash).await.unwrap().expect("old record found");
    assert_eq!(got.role, Role::Admin);
    assert!(got.workspaces.is_empty());
    assert_eq!(got.rate_limit, None);
    assert_eq!(got.id, k.record.id);
}

#[tokio::test]
async fn redis_holds_only_hashes_never_the_token() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("ci", Utc::now(), None);
    mint(&s, &k).await;
    s.touch(&[(k.hash, Utc::now())]).await.unwrap();
    s.revoke(&k.record.id, Utc::now(), &audit("revoke", &k))
        .await
        .unwrap();

    let mut dump = String::new();
    let keys = redis_cli(server.port(), &["--scan"]);
    for key in keys.lines().filter(|l| !l.is_empty()) {
        dump.push_str(key);
        dump.push('\n');
        let kind = redis_cli(server.port(), &["TYPE", key]);
        let args: Vec<&str> = match kind.trim() {
            "hash" => vec!["HGETALL", key],
            "string" => vec!["GET", key],
            "zset" => vec!["ZRANGE", key, "0", "-1", "WITHSCORES"],
            "stream" => vec!["XRANGE", key, "-", "+"],
            other => panic!("unexpected redis type {other} for {key}"),
        };
        dump.push_str(&redis_cli(server.port(), &args));
    }
    // The dump really contains the key's data (so the negative check means something)...
    assert!(dump.contains(&hex(&k.hash)), "{dump}");
    assert!(dump.contains(&k.record.id));
    // ...but never the token, nor its secret part.
    assert!(!dump.contains(&k.token));
    assert!(!dump.contains(&k.token[12..]));
    assert!(!dump.contains(&k.token[20..40]));
    // Every key carries the tenant's hash tag.
    assert!(keys
        .lines()
        .filter(|l| !l.is_empty())
        .all(|l| l.starts_with("keygate:{acme}:")));
}

#[tokio::test]
async fn list_is_newest_first_and_only_live() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let now = Utc::now();
    let old = new_key("old", now - TimeDelta::minutes(3), None);
    let mid = new_key("mid", now - TimeDelta::minutes(2), None);
    let new = new_key("new", now - TimeDelta::minutes(1), None);
    let revoked = new_key("revoked", now - TimeDelta::seconds(30), None);
    let expired = new_key(
        "expired",
        now - TimeDelta::seconds(20),
        Some(now - TimeDelta::seconds(1)),
    );
    // Expires while stored: listed now, not once past its expiry.
    let expiring = new_key(
        "expiring",
        now - TimeDelta::seconds(10),
        Some(now + TimeDelta::milliseconds(300)),
    );
    for k in [&mid, &old, &new, &revoked, &expired, &expiring] {
        mint(&s, k).await;
    }
    s.revoke(&revoked.record.id, now, &audit("revoke", &revoked))
        .await
        .unwrap()
        .expect("revoked");

    let names = |list: Vec<KeyRecord>| -> Vec<String> {
        list.into_iter()
            .map(|r| r.name.unwrap_or_default())
            .collect()
    };
    assert_eq!(
        names(s.list_live().await.unwrap()),
        ["expiring", "new", "mid", "old"]
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = names(s.list_live().await.unwrap());
        if list == ["new", "mid", "old"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired key still listed: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Lookup still returns revoked and expired records (the caller decides).
    let r = s.lookup(&revoked.hash).await.unwrap().unwrap();
    assert!(r.revoked_at.is_some());
    assert!(!s
        .lookup(&expired.hash)
        .await
        .unwrap()
        .unwrap()
        .is_live(Utc::now()));
}

#[tokio::test]
async fn revoke_succeeds_once() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("ci", Utc::now(), None);
    mint(&s, &k).await;
    let at = Utc::now();
    assert_eq!(
        s.revoke(&k.record.id, at, &audit("revoke", &k))
            .await
            .unwrap(),
        Some(k.hash)
    );
    assert_eq!(
        s.revoke(&k.record.id, at, &audit("revoke", &k))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.revoke("no-such-id", at, &audit("revoke", &k))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.lookup(&k.hash).await.unwrap().unwrap().revoked_at,
        Some(at)
    );
    // An expired key is not live, so it cannot be revoked either.
    let e = new_key(
        "expired",
        Utc::now(),
        Some(Utc::now() - TimeDelta::seconds(1)),
    );
    mint(&s, &e).await;
    assert_eq!(
        s.revoke(&e.record.id, at, &audit("revoke", &e))
            .await
            .unwrap(),
        None
    );
    // Only the successful revoke is audited.
    let actions: Vec<String> = s
        .audit(None)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["mint", "revoke", "mint"]);
}

/// A Redis whose script cache was emptied (a restart, a promoted replica,
/// `SCRIPT FLUSH`) answers `NOSCRIPT` to each script's first `EVALSHA`: every
/// script (mint with its ceiling count, revoke, touch) still works at once.
#[tokio::test]
async fn every_script_works_after_the_script_cache_is_emptied() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("before", Utc::now(), None);
    mint(&s, &k).await;
    s.touch(&[(k.hash, Utc::now())]).await.unwrap();
    assert_eq!(redis_cli(server.port(), &["SCRIPT", "FLUSH"]).trim(), "OK");

    let fresh = new_key("after", Utc::now(), None);
    let out = s
        .mint(&fresh.hash, &fresh.record, Some(10), &audit("mint", &fresh))
        .await
        .expect("mint after SCRIPT FLUSH");
    assert_eq!(out, MintOutcome::Minted { live: 2 });
    redis_cli(server.port(), &["SCRIPT", "FLUSH"]);
    let at = Utc::now();
    assert_eq!(
        s.revoke(&k.record.id, at, &audit("revoke", &k))
            .await
            .expect("revoke after SCRIPT FLUSH"),
        Some(k.hash)
    );
    redis_cli(server.port(), &["SCRIPT", "FLUSH"]);
    let used = Utc::now();
    s.touch(&[(fresh.hash, used)])
        .await
        .expect("touch after SCRIPT FLUSH");
    assert_eq!(
        s.lookup(&fresh.hash).await.unwrap().unwrap().last_used_at,
        Some(used)
    );
    assert_eq!(
        s.lookup(&k.hash).await.unwrap().unwrap().revoked_at,
        Some(at)
    );
}

/// The revoke script publishes after it has committed the revocation; a
/// publication Redis refuses (here: an ACL user without channel rights) must
/// not turn a committed revoke into an error (the caller would report a
/// failure for a revoked key, and its retry would get "not found").
#[tokio::test]
async fn revoke_is_ok_when_its_publication_is_refused() {
    let server = RedisServer::start();
    let port = server.port();
    redis_cli(
        port,
        &[
            "ACL",
            "SETUSER",
            "kg",
            "on",
            ">pw",
            "~*",
            "resetchannels",
            "+@all",
        ],
    );
    let s = store_at(&format!("redis://kg:pw@127.0.0.1:{port}/0"), "acme");
    let k = new_key("ci", Utc::now(), None);
    mint(&s, &k).await;
    let at = Utc::now();
    assert_eq!(
        s.revoke(&k.record.id, at, &audit("revoke", &k))
            .await
            .expect("a committed revoke is Ok"),
        Some(k.hash)
    );
    assert_eq!(
        s.lookup(&k.hash).await.unwrap().unwrap().revoked_at,
        Some(at)
    );
    assert!(s.list_live().await.unwrap().is_empty());
    let actions: Vec<String> = s
        .audit(None)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["mint", "revoke"]);
    assert_eq!(
        s.revoke(&k.record.id, at, &audit("revoke", &k))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn revoke_reaches_another_instance_through_the_feed() {
    let server = RedisServer::start();
    let a = store(&server, "acme");
    let b = store(&server, "acme");
    let mut feed = connected_feed(&b).await;
    let k = new_key("ci", Utc::now(), None);
    mint(&a, &k).await;
    a.revoke(&k.record.id, Utc::now(), &audit("revoke", &k))
        .await
        .unwrap()
        .expect("revoked");
    assert_eq!(next_event(&mut feed).await, FeedEvent::Revoked(k.hash));
}

#[tokio::test]
async fn ceiling_admits_exactly_max_live_under_concurrency() {
    let server = RedisServer::start();
    // Two instances sharing the store, five concurrent mints each.
    let stores = [store(&server, "acme"), store(&server, "acme")];
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let k = new_key(&format!("k{i}"), Utc::now(), None);
            let out = s
                .mint(&k.hash, &k.record, Some(3), &audit("mint", &k))
                .await;
            (out, k.hash)
        }));
    }
    let mut minted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (out, hash) = t.await.unwrap();
        match out.unwrap() {
            MintOutcome::Minted { live } => minted.push((live, hash)),
            MintOutcome::CeilingReached => refused += 1,
        }
    }
    assert_eq!(minted.len(), 3, "{minted:?}");
    assert_eq!(refused, 7);
    let mut lives: Vec<u64> = minted.iter().map(|(l, _)| *l).collect();
    lives.sort_unstable();
    assert_eq!(lives, [1, 2, 3]);
    assert_eq!(stores[0].list_live().await.unwrap().len(), 3);
    // Refused mints left nothing behind.
    let audit_len = stores[0].audit(None).await.unwrap().len();
    assert_eq!(audit_len, 3);

    // Expired and revoked keys free their slot.
    let live = stores[0].list_live().await.unwrap();
    let id = live[0].id.clone();
    stores[0]
        .revoke(
            &id,
            Utc::now(),
            &audit("revoke", &new_key("x", Utc::now(), None)),
        )
        .await
        .unwrap()
        .expect("revoked");
    let k = new_key(
        "after-revoke",
        Utc::now(),
        Some(Utc::now() + TimeDelta::milliseconds(200)),
    );
    assert_eq!(
        stores[1]
            .mint(&k.hash, &k.record, Some(3), &audit("mint", &k))
            .await
            .unwrap(),
        MintOutcome::Minted { live: 3 }
    );
    let k2 = new_key("after-expiry", Utc::now(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = stores[1]
            .mint(&k2.hash, &k2.record, Some(3), &audit("mint", &k2))
            .await
            .unwrap();
        if out == (MintOutcome::Minted { live: 3 }) {
            break;
        }
        assert_eq!(out, MintOutcome::CeilingReached);
        assert!(Instant::now() < deadline, "expired key still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_outage(err: StoreError, port: u16, started: Instant) {
    let elapsed = started.elapsed();
    assert!(
        elapsed < TIMEOUT + MARGIN,
        "failing call took {elapsed:?} (timeout {TIMEOUT:?})"
    );
    match err {
        StoreError::Timeout(d) => assert_eq!(d, TIMEOUT),
        StoreError::Unavailable(text) => assert!(
            text.starts_with(&format!("cannot reach redis at 127.0.0.1:{port}: ")),
            "{text}"
        ),
    }
}

#[tokio::test]
async fn outage_fails_fast_and_recovers_without_rebuilding_the_store() {
    let mut server = RedisServer::start();
    let port = server.port();
    let s = store(&server, "acme");
    let mut feed = connected_feed(&s).await;
    let k = new_key("ci", Utc::now(), None);
    mint(&s, &k).await;

    server.kill();
    assert_eq!(next_event(&mut feed).await, FeedEvent::Lost);
    for _ in 0..3 {
        let started = Instant::now();
        let err = s.lookup(&k.hash).await.unwrap_err();
        assert_outage(err, port, started);
        let started = Instant::now();
        let err = s.ping().await.unwrap_err();
        assert_outage(err, port, started);
        let started = Instant::now();
        let err = s
            .mint(&k.hash, &k.record, None, &audit("mint", &k))
            .await
            .unwrap_err();
        assert_outage(err, port, started);
    }

    server.restart(); // same port, empty data (no persistence)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.ping().await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Lost was sent once; the next event is the reconnection.
    assert_eq!(next_event(&mut feed).await, FeedEvent::Connected);
    let k2 = new_key("after", Utc::now(), None);
    mint(&s, &k2).await;
    assert_eq!(s.lookup(&k2.hash).await.unwrap(), Some(k2.record.clone()));
    // ...and the renewed feed delivers revocations again.
    s.revoke(&k2.record.id, Utc::now(), &audit("revoke", &k2))
        .await
        .unwrap()
        .expect("revoked");
    assert_eq!(next_event(&mut feed).await, FeedEvent::Revoked(k2.hash));
}

#[tokio::test]
async fn store_builds_while_redis_is_down_and_names_the_cause() {
    let mut server = RedisServer::start();
    let port = server.port();
    server.kill();
    let s = store_at(&format!("redis://:hunter2@127.0.0.1:{port}/0"), "acme");
    let (tx, mut feed) = mpsc::unbounded_channel();
    s.spawn_revocation_feed(tx);
    assert_eq!(next_event(&mut feed).await, FeedEvent::Lost);
    match s.ping().await.unwrap_err() {
        StoreError::Unavailable(text) => {
            assert_eq!(
                text,
                format!("cannot reach redis at 127.0.0.1:{port}: connection refused")
            );
            assert!(!text.contains("hunter2"));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    server.restart();
    redis_cli(port, &["CONFIG", "SET", "requirepass", "hunter2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = s.ping().await {
        assert!(Instant::now() < deadline, "no recovery: {e}");
        assert!(!e.to_string().contains("hunter2"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(next_event(&mut feed).await, FeedEvent::Connected);
}

#[tokio::test]
async fn audit_records_mint_and_revoke_in_order() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let k = new_key("ci", Utc::now(), None);
    let minted = audit("mint", &k);
    s.mint(&k.hash, &k.record, None, &minted).await.unwrap();
    let mut revoked = audit("revoke", &k);
    revoked.actor = "cli:ops".into();
    revoked.client = None;
    revoked.user_agent = None;
    revoked.time = Utc::now() + TimeDelta::milliseconds(5);
    s.revoke(&k.record.id, revoked.time, &revoked)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        s.audit(None).await.unwrap(),
        vec![minted.clone(), revoked.clone()]
    );
    assert_eq!(
        s.audit(Some(revoked.time)).await.unwrap(),
        vec![revoked.clone()]
    );
    assert_eq!(
        s.audit(Some(revoked.time + TimeDelta::seconds(1)))
            .await
            .unwrap(),
        vec![]
    );
    // One stream entry per operation.
    let info = redis_cli(server.port(), &["XLEN", "keygate:{acme}:audit"]);
    assert_eq!(info.trim(), "2");
}

#[tokio::test]
async fn touch_moves_last_used_forward_on_existing_keys_only() {
    let server = RedisServer::start();
    let s = store(&server, "acme");
    let a = new_key("a", Utc::now(), None);
    let b = new_key("b", Utc::now(), None);
    let ghost = new_key("ghost", Utc::now(), None);
    mint(&s, &a).await;
    mint(&s, &b).await;
    let t1 = Utc::now() + TimeDelta::seconds(1);
    let t2 = t1 + TimeDelta::seconds(1);
    s.touch(&[(a.hash, t2), (b.hash, t1), (ghost.hash, t1)])
        .await
        .unwrap();
    // An older write (another instance's, delayed) does not move it back.
    s.touch(&[(a.hash, t1)]).await.unwrap();
    assert_eq!(
        s.lookup(&a.hash).await.unwrap().unwrap().last_used_at,
        Some(t2)
    );
    assert_eq!(
        s.lookup(&b.hash).await.unwrap().unwrap().last_used_at,
        Some(t1)
    );
    assert_eq!(s.lookup(&ghost.hash).await.unwrap(), None);
    let exists = redis_cli(
        server.port(),
        &[
            "EXISTS",
            &format!("keygate:{{acme}}:key:{}", hex(&ghost.hash)),
        ],
    );
    assert_eq!(exists.trim(), "0");
    // A large batch goes through in chunks.
    let many: Vec<(KeyHash, DateTime<Utc>)> = (0..600)
        .map(|i| (if i == 599 { b.hash } else { ghost.hash }, t2))
        .collect();
    s.touch(&many).await.unwrap();
    assert_eq!(
        s.lookup(&b.hash).await.unwrap().unwrap().last_used_at,
        Some(t2)
    );
}

#[tokio::test]
async fn tenants_sharing_one_redis_are_isolated() {
    let server = RedisServer::start();
    let acme = store(&server, "acme");
    let globex = store(&server, "globex");
    let mut globex_feed = connected_feed(&globex).await;
    let ka = new_key("acme key", Utc::now(), None);
    let kg = new_key("globex key", Utc::now(), None);
    mint(&acme, &ka).await;
    mint(&globex, &kg).await;

    assert_eq!(globex.lookup(&ka.hash).await.unwrap(), None);
    assert_eq!(acme.lookup(&kg.hash).await.unwrap(), None);
    let ids = |l: Vec<KeyRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(acme.list_live().await.unwrap()).as_slice(),
        std::slice::from_ref(&ka.record.id)
    );
    assert_eq!(
        ids(globex.list_live().await.unwrap()).as_slice(),
        std::slice::from_ref(&kg.record.id)
    );
    // Another tenant's id cannot be revoked.
    assert_eq!(
        globex
            .revoke(&ka.record.id, Utc::now(), &audit("revoke", &ka))
            .await
            .unwrap(),
        None
    );
    assert_eq!(globex.audit(None).await.unwrap().len(), 1);
    // The ceiling counts per tenant.
    let k2 = new_key("second", Utc::now(), None);
    assert_eq!(
        globex
            .mint(&k2.hash, &k2.record, Some(2), &audit("mint", &k2))
            .await
            .unwrap(),
        MintOutcome::Minted { live: 2 }
    );
    // acme's revocation is not on globex's feed: globex's own, published
    // after it, is the first event globex receives.
    acme.revoke(&ka.record.id, Utc::now(), &audit("revoke", &ka))
        .await
        .unwrap()
        .unwrap();
    globex
        .revoke(&kg.record.id, Utc::now(), &audit("revoke", &kg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next_event(&mut globex_feed).await,
        FeedEvent::Revoked(kg.hash)
    );
}

fn store_for(target: RedisTarget, slug: &str) -> Store {
    let config = StoreConfig {
        backend: StoreBackend::Redis(target),
        // Cluster and Sentinel calls may need a topology look-up first.
        timeout: Duration::from_secs(2),
    };
    Store::from_config(&config, slug).expect("store from config")
}

/// Mint, look up, list, revoke with the revocation on a second instance's
/// feed, and the ceiling, on any topology.
async fn exercise(a: &Store, b: &Store) {
    let mut feed = connected_feed(b).await;
    let k = new_key("ci", Utc::now(), None);
    assert_eq!(
        a.mint(&k.hash, &k.record, Some(1), &audit("mint", &k))
            .await
            .unwrap(),
        MintOutcome::Minted { live: 1 }
    );
    let k2 = new_key("over", Utc::now(), None);
    assert_eq!(
        b.mint(&k2.hash, &k2.record, Some(1), &audit("mint", &k2))
            .await
            .unwrap(),
        MintOutcome::CeilingReached
    );
    assert_eq!(b.lookup(&k.hash).await.unwrap(), Some(k.record.clone()));
    assert_eq!(b.list_live().await.unwrap(), vec![k.record.clone()]);
    b.touch(&[(k.hash, Utc::now())]).await.unwrap();
    assert_eq!(
        a.revoke(&k.record.id, Utc::now(), &audit("revoke", &k))
            .await
            .unwrap(),
        Some(k.hash)
    );
    assert_eq!(next_event(&mut feed).await, FeedEvent::Revoked(k.hash));
    assert_eq!(b.audit(None).await.unwrap().len(), 2);
    a.ping().await.unwrap();
}

#[tokio::test]
async fn cluster_store_works_and_feeds_revocations() {
    let cluster = RedisCluster::start(3);
    let seeds = || -> Vec<Secret> {
        // One seed is enough to discover the others.
        vec![Secret::new(cluster.urls()[1].clone())]
    };
    let a = store_for(RedisTarget::Cluster(seeds()), "acme");
    let b = store_for(RedisTarget::Cluster(seeds()), "acme");
    exercise(&a, &b).await;
    // A second tenant on the same cluster, likely on another shard.
    let c = store_for(RedisTarget::Cluster(seeds()), "globex");
    let d = store_for(RedisTarget::Cluster(seeds()), "globex");
    exercise(&c, &d).await;
}

#[tokio::test]
async fn sentinel_store_works_and_feeds_revocations() {
    let setup = RedisSentinel::start("keygate");
    let target = || RedisTarget::Sentinel {
        master: setup.master_name.clone(),
        nodes: vec![Secret::new(setup.sentinel_url())],
    };
    let a = store_for(target(), "acme");
    let b = store_for(target(), "acme");
    exercise(&a, &b).await;
}
