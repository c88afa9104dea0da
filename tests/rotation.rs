//! Key rotation and the expiry notice (contract §9), over real sockets
//! against a real `redis-server`: the successor works at once, the old key
//! until its new expiry (here and on a second keygate sharing Redis), `0s`
//! grace behaves as a revoke, 404s, the mint ceiling, a key rotating itself,
//! concurrent rotations, scope, the audit entry, the expiry header.
mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use common::keys::{bearer, delete, get_with, mint, send};
use common::kg::{self, bootstrap_key, mint_request, RawResponse};
use common::redis::{redis_cli, RedisServer};
use common::upstream::Upstream;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keygate::auth::scope::Role;
use keygate::auth::MintRequest;
use keygate::config::Config;
use keygate::RunHandle;

async fn rotate(kg: &RunHandle, token: &str, id: &str, body: Option<&str>) -> RawResponse {
    send(
        kg.public_addr,
        "POST",
        &format!("/org/tokens/{id}/rotate"),
        &[
            ("Authorization", &bearer(token)),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
}

/// The status of a GET inside workspace `ws_1`: a path every key of these
/// tests may reach (the bound ones are bound to `ws_1`, §8).
async fn status(kg: &RunHandle, token: &str) -> u16 {
    get_with(kg.public_addr, "/workspaces/ws_1/app", token)
        .await
        .status
}

/// Poll (5 ms) until `token` gets `want` on `kg`; the time it took.
async fn wait_status(kg: &RunHandle, token: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = status(kg, token).await;
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "still {got}, not {want}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn time(v: &serde_json::Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp"))
        .unwrap()
        .with_timezone(&Utc)
}

async fn pair(config: &Config) -> (RunHandle, RunHandle) {
    (kg::start_live(config).await, kg::start_live(config).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successor_at_once_old_key_until_grace_end_on_both_instances() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let config = kg::redis_config(&up, &redis);
    let (a, b) = pair(&config).await;
    let old = mint_request(
        &a,
        MintRequest {
            name: Some("ci".into()),
            role: Role::Editor,
            workspaces: vec!["ws_1".into()],
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status(&a, &old.token).await, 200);
    assert_eq!(status(&b, &old.token).await, 200);

    // The key rotates itself, with a 2 s grace.
    let asked = Utc::now();
    let r = rotate(&a, &old.token, &old.id, Some(r#"{"grace":"2s"}"#)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["rotated_from"], old.id.as_str());
    assert_eq!(v["name"], "ci");
    assert_eq!(v["role"], "editor");
    assert_eq!(v["workspaces"], serde_json::json!(["ws_1"]));
    assert!(v["expires_at"].is_null());
    let new_token = v["auth_token"].as_str().unwrap().to_string();
    let new_id = v["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, old.id);
    let old_end = time(&v["old_expires_at"]);
    assert!(old_end <= asked + chrono::Duration::seconds(3) && old_end >= asked);

    // Successor at once, on both; the old key still works, with the notice.
    assert_eq!(status(&a, &new_token).await, 200);
    assert_eq!(status(&b, &new_token).await, 200);
    for kg in [&a, &b] {
        let r = get_with(kg.public_addr, "/workspaces/ws_1/app", &old.token).await;
        if Utc::now() < old_end {
            assert_eq!(r.status, 200);
            assert_eq!(
                r.header("x-molecule-key-expires").as_deref(),
                Some(old_end.to_rfc3339_opts(SecondsFormat::Secs, true).as_str())
            );
        }
    }

    // Then 401 on both, measured against the old key's new expires_at.
    wait_status(&a, &old.token, 401, Duration::from_secs(10)).await;
    let lag_a = Utc::now() - old_end;
    wait_status(&b, &old.token, 401, Duration::from_secs(10)).await;
    let lag_b = Utc::now() - old_end;
    eprintln!("old key refused after its expires_at: here +{lag_a}, second instance +{lag_b}");
    assert!(lag_b < chrono::Duration::milliseconds(500), "{lag_b}");
    assert_eq!(status(&a, &new_token).await, 200);
    assert_eq!(status(&b, &new_token).await, 200);

    // The audit entry.
    let audit = a.app.auth.keys().audit(None).await.unwrap();
    let e = audit
        .iter()
        .find(|e| e.action == "rotate")
        .expect("rotate entry");
    assert_eq!(e.key_id, old.id);
    assert_eq!(e.new_key_id.as_deref(), Some(new_id.as_str()));
    assert_eq!(e.role, Some(Role::Editor));
    assert_eq!(e.workspaces, ["ws_1"]);
    assert!(e.actor.starts_with("org-key:"), "{}", e.actor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_grace_is_a_revoke_here_at_once_and_elsewhere_within_100ms() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let (a, b) = pair(&kg::redis_config(&up, &redis)).await;
    let admin = bootstrap_key(&a).await;
    let mut lags = Vec::new();
    for _ in 0..5 {
        let k = kg::mint_key(&a, Some("x")).await;
        assert_eq!(status(&a, &k.token).await, 200);
        assert_eq!(status(&b, &k.token).await, 200);
        let r = rotate(&a, &admin, &k.id, Some(r#"{"grace":"0s"}"#)).await;
        assert_eq!(r.status, 200, "{r:?}");
        let done = Instant::now();
        assert_eq!(status(&a, &k.token).await, 401, "refused at once here");
        wait_status(&b, &k.token, 401, Duration::from_secs(2)).await;
        lags.push(done.elapsed());
        let succ = r.json()["auth_token"].as_str().unwrap().to_string();
        assert_eq!(status(&b, &succ).await, 200);
    }
    lags.sort();
    eprintln!("0s rotation: refused on the second instance after {lags:?}");
    assert!(
        lags[lags.len() - 1] < Duration::from_millis(100),
        "{lags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_revoked_expired_keys_are_404_and_scope_is_checked() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let a = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let admin = bootstrap_key(&a).await;
    const NOT_FOUND: &str = "token not found or already revoked";

    let r = rotate(&a, &admin, "nosuchkey", None).await;
    assert_eq!((r.status, r.error()), (404, NOT_FOUND.to_string()));

    let revoked = kg::mint_key(&a, None).await;
    assert_eq!(delete(a.public_addr, &admin, &revoked.id).await.status, 200);
    let r = rotate(&a, &admin, &revoked.id, None).await;
    assert_eq!((r.status, r.error()), (404, NOT_FOUND.to_string()));

    let expiring = mint_request(
        &a,
        MintRequest {
            expires_at: Some(Utc::now() + chrono::Duration::milliseconds(300)),
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    wait_status(&a, &expiring.token, 401, Duration::from_secs(5)).await;
    let r = rotate(&a, &admin, &expiring.id, None).await;
    assert_eq!((r.status, r.error()), (404, NOT_FOUND.to_string()));

    // Bad bodies.
    let k = kg::mint_key(&a, None).await;
    for body in [
        "{",
        r#"{"grace":"31d"}"#,
        r#"{"grace":"soon"}"#,
        r#"{"expires_at":"2020-01-01T00:00:00Z"}"#,
    ] {
        let r = rotate(&a, &admin, &k.id, Some(body)).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }
    // Wrong method.
    let r = get_with(
        a.public_addr,
        &format!("/org/tokens/{}/rotate", k.id),
        &admin,
    )
    .await;
    assert_eq!(r.status, 405);

    // An editor may rotate itself, not another key; a bound admin neither.
    let editor = mint_request(
        &a,
        MintRequest {
            role: Role::Editor,
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    let r = rotate(&a, &editor.token, &k.id, None).await;
    assert_eq!(
        (r.status, r.error()),
        (403, "forbidden: outside this key's scope".to_string())
    );
    let bound = mint_request(
        &a,
        MintRequest {
            workspaces: vec!["ws_1".into()],
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rotate(&a, &bound.token, &k.id, None).await.status, 403);
    let r = rotate(&a, &editor.token, &editor.id, Some(r#"{"grace":"1h"}"#)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["role"], "editor");
    // The successor's expires_at as given.
    let until = (Utc::now() + chrono::Duration::days(2)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let r = rotate(
        &a,
        &admin,
        &k.id,
        Some(&format!(r#"{{"expires_at":"{until}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["expires_at"], until.as_str());
    // A key in its grace period may be rotated again; its expiry only shortens.
    let first_end = time(&r.json()["old_expires_at"]);
    let r2 = rotate(&a, &admin, &k.id, Some(r#"{"grace":"30d"}"#)).await;
    assert_eq!(r2.status, 200, "{r2:?}");
    assert_eq!(time(&r2.json()["old_expires_at"]), first_end);
    let r3 = rotate(&a, &admin, &k.id, Some(r#"{"grace":"1h"}"#)).await;
    assert_eq!(r3.status, 200, "{r3:?}");
    assert!(time(&r3.json()["old_expires_at"]) < first_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_allowed_at_the_ceiling() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.keys.max_live = 2;
    let a = kg::start_live(&config).await;
    let k1 = kg::mint_key(&a, Some("one")).await;
    let _k2 = kg::mint_key(&a, Some("two")).await;
    let r = mint(a.public_addr, &k1.token, "{}").await;
    assert_eq!(r.status, 429, "{r:?}");
    let r = rotate(&a, &k1.token, &k1.id, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let succ = r.json()["auth_token"].as_str().unwrap().to_string();
    assert_eq!(status(&a, &succ).await, 200);
    assert_eq!(status(&a, &k1.token).await, 200, "old key in its 24h grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_of_one_key_yield_one_successor() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let (a, b) = pair(&kg::redis_config(&up, &redis)).await;
    let admin = bootstrap_key(&a).await;
    assert_eq!(status(&b, &admin).await, 200);
    for round in 0..6 {
        let k = kg::mint_key(&a, None).await;
        // Same instance, then one on each instance.
        let (x, y) = if round % 2 == 0 { (&a, &a) } else { (&a, &b) };
        // Redis holds writes (scripts) for 150 ms (under store.timeout), so
        // both rotations surely read the key before either commits: the
        // script's compare-and-set settles them. Rounds 2 and 4 race freely
        // on one instance (its in-flight guard settles them). A rotation
        // that starts after another one committed is a second rotation
        // (§9: a key in its grace period may be rotated again).
        if round != 2 && round != 4 {
            redis_cli(redis.port(), &["CLIENT", "PAUSE", "150", "WRITE"]);
        }
        let (r1, r2) = tokio::join!(
            rotate(x, &admin, &k.id, None),
            rotate(y, &admin, &k.id, None)
        );
        let mut statuses = [r1.status, r2.status];
        statuses.sort();
        assert_eq!(statuses, [200, 404], "round {round}: {r1:?} {r2:?}");
        let live = a.app.auth.keys().list().await.unwrap();
        let successors = live
            .iter()
            .filter(|r| {
                r.created_by.starts_with("org-key:")
                    && r.created_at > Utc::now() - chrono::Duration::seconds(30)
            })
            .count();
        assert_eq!(successors, round + 1, "one successor per round");
    }
}

/// An app that always sends its own copy of the expiry header.
async fn app_with_expiry_header() -> http::Uri {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("X-Molecule-Key-Expires", "from-the-app")
                            .header("x-molecule-key-EXPIRES", "again")
                            .body(Full::new(Bytes::from_static(b"ok")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_header_around_expiry_notice_and_app_copies_stripped() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut config = kg::redis_config(&up, &redis);
    config.upstream.url = app_with_expiry_header().await;
    config.keys.expiry_notice = Duration::from_secs(3600);
    let a = kg::start_live(&config).await;
    let at = |mins: i64| {
        let t = Utc::now() + chrono::Duration::minutes(mins);
        DateTime::from_timestamp(t.timestamp(), 0).unwrap()
    };
    let soon_at = at(30);
    let soon = mint_request(
        &a,
        MintRequest {
            expires_at: Some(soon_at),
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    let later = mint_request(
        &a,
        MintRequest {
            expires_at: Some(at(120)),
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    let never = kg::mint_key(&a, None).await;

    let values = |r: &RawResponse, name: &str| -> Vec<String> {
        r.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    };
    let r = get_with(a.public_addr, "/x", &soon.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        values(&r, "x-molecule-key-expires"),
        [soon_at.to_rfc3339_opts(SecondsFormat::Secs, true)]
    );
    for token in [&later.token, &never.token] {
        let r = get_with(a.public_addr, "/x", token).await;
        assert_eq!(r.status, 200);
        assert!(values(&r, "x-molecule-key-expires").is_empty(), "{r:?}");
    }
    // Not key-authenticated: the app's copies are removed all the same.
    let r = send(a.public_addr, "GET", "/x", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(values(&r, "x-molecule-key-expires").is_empty(), "{r:?}");
    // keygate's own answers to the key carry it too.
    let r = get_with(a.public_addr, "/org/tokens", &soon.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(values(&r, "x-molecule-key-expires").len(), 1);
}
