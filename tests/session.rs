//! Browser sessions on `/org/tokens` (contract §5, issue 5) against a fake
//! verify endpoint (a real HTTP server on 127.0.0.1:0 that counts its calls)
//! and a real `redis-server`.
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::bin::Serve;
use common::keys::{self, send};
use common::kg::{self, bootstrap_key};
use common::redis::RedisServer;
use common::upstream::{closed_port, Upstream};
use common::verify::Verify;
use keygate::auth::store::Store;
use keygate::config::{Config, SessionConfig};
use keygate::RunHandle;
use serde_json::Value;
use tokio::net::TcpListener;

const GOOD: &str = "good";
const ORIGIN: &str = "https://acme.moleculesai.app";
const SESSION_TIMEOUT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------
// The fake verify endpoint
// ---------------------------------------------------------------------------

/// A server that accepts connections and never answers.
async fn hanging_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

// ---------------------------------------------------------------------------
// keygate
// ---------------------------------------------------------------------------

fn config(up: &Upstream, redis: &RedisServer, verify_url: &str) -> Config {
    let mut c = kg::redis_config(up, redis);
    c.session = Some(SessionConfig {
        verify_url: verify_url.parse().unwrap(),
        cookie: "wos-session".into(),
        timeout: SESSION_TIMEOUT,
        cache_ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(5),
    });
    c
}

async fn start(c: &Config) -> RunHandle {
    kg::start(c.clone(), Store::from_config(&c.store, "acme").unwrap()).await
}

fn cookie(value: &str) -> String {
    format!("theme=dark; wos-session={value}; other=1")
}

async fn list_by_key(addr: SocketAddr, key: &str) -> Vec<Value> {
    let r = keys::list(addr, key).await;
    r.json()["tokens"].as_array().unwrap().clone()
}

fn ids(tokens: &[Value]) -> BTreeSet<String> {
    tokens
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_verified_session_lists_mints_and_revokes() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD, "u_123").await;
    let kg = start(&config(&up, &redis, &verify.url())).await;
    let addr = kg.public_addr;
    let good = cookie(GOOD);

    let r = send(addr, "GET", "/org/tokens", &[("Cookie", &good)], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["count"], 0);
    assert_eq!(verify.calls(), 1);
    // keygate sends only the configured cookie.
    assert_eq!(verify.cookies(), vec![format!("wos-session={GOOD}")]);

    let r = send(
        addr,
        "POST",
        "/org/tokens",
        &[("Cookie", &good), ("Origin", ORIGIN)],
        Some(r#"{"name":"from the canvas"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let minted = r.json();
    let fields: BTreeSet<&str> = minted
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(fields, BTreeSet::from(keys::MINT_FIELDS));
    let id = minted["id"].as_str().unwrap().to_string();
    let token = minted["auth_token"].as_str().unwrap().to_string();
    // The verdict was cached: no second call.
    assert_eq!(verify.calls(), 1, "same cookie verified twice");

    let tokens = list_by_key(addr, &token).await;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["created_by"], "session:u_123");
    assert_eq!(tokens[0]["name"], "from the canvas");

    let r = send(
        addr,
        "DELETE",
        &format!("/org/tokens/{id}"),
        &[("Cookie", &good), ("Origin", ORIGIN)],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({ "revoked": id }));
    let r = send(
        addr,
        "GET",
        "/api/x",
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = send(
        addr,
        "DELETE",
        &format!("/org/tokens/{id}"),
        &[("Cookie", &good), ("Origin", ORIGIN)],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(verify.calls(), 1, "cache hit expected for every request");
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn cookie_writes_need_an_origin_that_is_a_served_host() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD, "u_123").await;
    let kg = start(&config(&up, &redis, &verify.url())).await;
    let addr = kg.public_addr;
    let good = cookie(GOOD);
    let key = bootstrap_key(&kg).await;
    let victim = {
        let r = send(
            addr,
            "POST",
            "/org/tokens",
            &[("Authorization", &format!("Bearer {key}"))],
            Some("{}"),
        )
        .await;
        assert_eq!(r.status, 200, "a key mint needs no Origin: {r:?}");
        r.json()["id"].as_str().unwrap().to_string()
    };

    let bad_origins: [Option<&str>; 7] = [
        None,
        Some("https://evil.com"),
        Some("https://acme.moleculesai.app.evil.com"),
        Some("https://evil-acme.moleculesai.app"),
        Some("https://moleculesai.app"),
        Some("null"),
        Some("https://other.moleculesai.app"),
    ];
    for origin in bad_origins {
        let mut headers = vec![("Cookie", good.as_str())];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let r = send(addr, "POST", "/org/tokens", &headers, Some("{}")).await;
        assert_eq!(r.status, 403, "POST with Origin {origin:?}: {r:?}");
        assert!(!r.error().is_empty());
        assert!(!r.body.contains("auth_token"));
        let r = send(
            addr,
            "DELETE",
            &format!("/org/tokens/{victim}"),
            &headers,
            None,
        )
        .await;
        assert_eq!(r.status, 403, "DELETE with Origin {origin:?}: {r:?}");
        // Reading stays allowed: GET is not a write.
        let r = send(addr, "GET", "/org/tokens", &headers, None).await;
        assert_eq!(r.status, 200, "GET with Origin {origin:?}: {r:?}");
    }
    let tokens = list_by_key(addr, &key).await;
    assert_eq!(tokens.len(), 2, "a cross-site request minted or revoked");
    assert!(ids(&tokens).contains(&victim));

    // The served host in any case, with a port: allowed.
    for origin in [
        "https://ACME.moleculesai.app:443",
        "http://acme.moleculesai.app:8443",
    ] {
        let r = send(
            addr,
            "POST",
            "/org/tokens",
            &[("Cookie", &good), ("Origin", origin)],
            Some("{}"),
        )
        .await;
        assert_eq!(r.status, 200, "Origin {origin}: {r:?}");
    }
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn a_refused_or_missing_session_is_401() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD, "u_123").await;
    let kg = start(&config(&up, &redis, &verify.url())).await;
    let addr = kg.public_addr;
    let bad = cookie("bad");

    for (method, target, body) in [
        ("GET", "/org/tokens", None),
        ("POST", "/org/tokens", Some("{}")),
        ("DELETE", "/org/tokens/someid", None),
    ] {
        for headers in [
            vec![("Cookie", bad.as_str()), ("Origin", ORIGIN)],
            vec![("Cookie", "other-session=good"), ("Origin", ORIGIN)],
            vec![("Cookie", "wos-session="), ("Origin", ORIGIN)],
            vec![("Origin", ORIGIN)],
        ] {
            let r = send(addr, method, target, &headers, body).await;
            assert_eq!(r.status, 401, "{method} {target} {headers:?}: {r:?}");
            // "Otherwise 401 as above" (contract §5 -> §3 step 4).
            assert_eq!(r.error(), "invalid or revoked org API key");
            assert_eq!(
                r.header("www-authenticate").as_deref(),
                Some(r#"Bearer realm="acme", error="invalid_token""#)
            );
        }
    }
    // Only the refused `wos-session=bad` reached the endpoint, once (negative cache).
    assert_eq!(verify.calls(), 1);
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn verify_endpoint_down_or_hanging_is_503() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let down = format!("http://{}/verify", closed_port().await);
    let hanging = format!("http://{}/verify", hanging_server().await);
    for url in [down, hanging] {
        let kg = start(&config(&up, &redis, &url)).await;
        let addr = kg.public_addr;
        let good = cookie(GOOD);
        for (method, body) in [("GET", None), ("POST", Some("{}"))] {
            let started = Instant::now();
            let r = send(
                addr,
                method,
                "/org/tokens",
                &[("Cookie", &good), ("Origin", ORIGIN)],
                body,
            )
            .await;
            let took = started.elapsed();
            assert_eq!(r.status, 503, "{method} with verify at {url}: {r:?}");
            assert!(!r.error().is_empty());
            assert!(r.header("retry-after").is_some(), "{r:?}");
            assert!(
                took < SESSION_TIMEOUT + Duration::from_secs(2),
                "answered after {took:?} (session.timeout {SESSION_TIMEOUT:?})"
            );
        }
        kg.stop().await;
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn with_authorization_the_cookie_is_ignored() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD, "u_123").await;
    let kg = start(&config(&up, &redis, &verify.url())).await;
    let addr = kg.public_addr;
    let good = cookie(GOOD);
    let key = bootstrap_key(&kg).await;
    let unknown = keygate::auth::token::mint("mok_");

    for auth in [
        format!("Bearer {}", unknown.expose()),
        "Bearer not-an-org-key".to_string(),
        "Basic dXNlcjpwYXNz".to_string(),
    ] {
        for (method, body) in [("GET", None), ("POST", Some("{}"))] {
            let r = send(
                addr,
                method,
                "/org/tokens",
                &[
                    ("Cookie", &good),
                    ("Origin", ORIGIN),
                    ("Authorization", &auth),
                ],
                body,
            )
            .await;
            assert_eq!(
                r.status, 401,
                "{method} with {auth:?} and a good cookie: {r:?}"
            );
        }
    }
    // A valid key with the cookie: the key decides (no Origin needed), and is the actor.
    let r = send(
        addr,
        "POST",
        "/org/tokens",
        &[
            ("Cookie", &good),
            ("Authorization", &format!("Bearer {key}")),
        ],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.json()["id"].as_str().unwrap().to_string();
    let tokens = list_by_key(addr, &key).await;
    let t = tokens.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(t["created_by"], format!("org-key:{}", &key[..12]).as_str());
    assert_eq!(
        verify.calls(),
        0,
        "the verify endpoint was asked despite Authorization"
    );
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn other_paths_with_a_cookie_are_forwarded_without_a_principal() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD, "u_123").await;
    let kg = start(&config(&up, &redis, &verify.url())).await;
    let addr = kg.public_addr;
    let good = cookie(GOOD);

    let r = send(
        addr,
        "GET",
        "/api/me",
        &[
            ("Cookie", &good),
            ("X-Molecule-Principal", "org-key:forged"),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        addr,
        "POST",
        "/api/settings",
        &[("Cookie", &good), ("Origin", "https://evil.com")],
        Some("{}"),
    )
    .await;
    assert_eq!(
        r.status, 200,
        "the app decides about its own cross-site posts: {r:?}"
    );
    let seen = up.wait_for(2).await;
    for s in &seen {
        assert!(s.headers.get("x-molecule-principal").is_none(), "{s:?}");
        assert_eq!(
            s.headers["cookie"],
            good.as_str(),
            "cookie not forwarded as is"
        );
    }
    assert_eq!(seen[0].uri.path(), "/api/me");
    assert_eq!(seen[1].uri.path(), "/api/settings");
    assert_eq!(verify.calls(), 0, "a forwarded request was verified");
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// The built binary: the cookie never reaches the logs
// ---------------------------------------------------------------------------

/// The Redis store, a session section, and every log line (access too) in `format`.
fn serve_config(up: &Upstream, redis: &str, verify: &str, format: &str) -> Serve {
    Serve::new(up.url().to_string().trim_end_matches('/'))
        .store(&format!("url = \"{redis}\""))
        .rest(&format!(
            r#"
[session]
verify_url = "{verify}"
cookie = "wos-session"
timeout = "2s"

[log]
format = "{format}"
level = "trace"
access = true
"#
        ))
}

#[tokio::test]
async fn the_cookie_value_never_appears_in_the_logs() {
    const GOOD_SECRET: &str = "gOOdSess10nC00kieValue4f9a8b7c";
    const BAD_SECRET: &str = "bAdSess10nC00kieValue1e2d3c4b";
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let verify = Verify::start(GOOD_SECRET, "u_123").await;

    for format in ["json", "text"] {
        let mut kg = serve_config(&up, &redis.url(), &verify.url(), format)
            .start()
            .await;
        let listen = kg.public;

        let good = cookie(GOOD_SECRET);
        let bad = cookie(BAD_SECRET);
        let r = send(listen, "GET", "/org/tokens", &[("Cookie", &good)], None).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = send(
            listen,
            "POST",
            "/org/tokens",
            &[("Cookie", &good), ("Origin", ORIGIN)],
            Some(r#"{"name":"log test"}"#),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let token = r.json()["auth_token"].as_str().unwrap().to_string();
        let r = send(
            listen,
            "POST",
            "/org/tokens",
            &[("Cookie", &good), ("Origin", "https://evil.com")],
            Some("{}"),
        )
        .await;
        assert_eq!(r.status, 403, "{r:?}");
        let r = send(listen, "GET", "/org/tokens", &[("Cookie", &bad)], None).await;
        assert_eq!(r.status, 401, "{r:?}");
        let r = send(listen, "GET", "/api/x", &[("Cookie", &good)], None).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = send(
            listen,
            "GET",
            "/api/x",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Cookie", &bad),
            ],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");

        kg.signal_term();
        let exit = kg.exit_within(Duration::from_secs(20)).await;
        assert!(exit.success(), "{exit}");
        let lines = kg.lines();
        println!(
            "{format}: {} log lines captured at level trace",
            lines.len()
        );
        let output = lines.join("\n");
        assert!(
            output.contains("/org/tokens") && output.contains("/api/x"),
            "{format}: the access log was not captured:\n{output}"
        );
        for secret in [GOOD_SECRET, BAD_SECRET, token.as_str(), &token[12..]] {
            assert!(
                !output.contains(secret),
                "{format}: a secret appears in the logs (level trace)"
            );
        }
    }
}
