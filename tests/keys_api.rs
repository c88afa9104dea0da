//! `/org/tokens` and org keys end to end, over real sockets against a real
//! `redis-server`: response shapes, revocation (same instance, two instances,
//! racing requests), expiry, Redis outages under both policies, a flood of
//! random tokens, last_used_at write-behind and the mint ceiling.
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use common::keys::{bearer, delete, get_with, list, mint, mint_ok, send, LIST_FIELDS, MINT_FIELDS};
use common::kg::{self, bootstrap_key, RawResponse, HOST};
use common::redis::{redis_cli, RedisServer};
use common::upstream::Upstream;
use common::verify::Verify;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use keygate::config::{Config, OutagePolicy, SessionConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const INVALID_KEY: &str = "invalid or revoked org API key";

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// An RFC 3339 UTC string (`...Z`), parsed.
fn utc(v: &Value, what: &str) -> DateTime<Utc> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    assert!(s.ends_with('Z'), "{what} is not UTC: {s}");
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{what} is not RFC 3339 ({e}): {s}"))
        .with_timezone(&Utc)
}

fn assert_invalid_key(r: &RawResponse) {
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.error(), INVALID_KEY);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Bearer realm="acme", error="invalid_token""#),
        "{r:?}"
    );
}

fn assert_store_unavailable(r: &RawResponse) {
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.error(), "key store unavailable");
    assert!(r.header("retry-after").is_some(), "no Retry-After: {r:?}");
}

/// The tokens listed by GET, by id.
fn listed(r: &RawResponse) -> Vec<Value> {
    r.json()["tokens"].as_array().expect("tokens array").clone()
}

fn find<'a>(tokens: &'a [Value], id: &str) -> Option<&'a Value> {
    tokens.iter().find(|t| t["id"] == id)
}

// ---------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn post_shapes_and_the_new_token_works_at_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let caller_prefix = &caller[..12];
    let addr = kg.public_addr;

    let mut minted: Vec<(String, String)> = Vec::new();
    for (body, name, expires) in [
        ("", Value::Null, Value::Null),
        ("{}", Value::Null, Value::Null),
        (
            r#"{"name":"ci deploy"}"#,
            Value::from("ci deploy"),
            Value::Null,
        ),
        (
            r#"{"name":"later","expires_at":"2099-01-01T01:00:00+01:00"}"#,
            Value::from("later"),
            Value::from("2099-01-01T00:00:00Z"),
        ),
    ] {
        let r = mint(addr, &caller, body).await;
        assert_eq!(r.status, 200, "body {body:?}: {r:?}");
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{r:?}"
        );
        let v = r.json();
        assert_eq!(fields(&v), set(&MINT_FIELDS), "body {body:?}: {v}");
        assert_eq!(v["name"], name, "{v}");
        if expires.is_null() {
            assert_eq!(v["expires_at"], Value::Null, "{v}");
        } else {
            assert_eq!(
                utc(&v["expires_at"], "expires_at"),
                utc(&expires, "expected")
            );
        }
        let token = v["auth_token"].as_str().unwrap().to_string();
        assert!(token.starts_with("mok_"), "{token}");
        assert_eq!(v["prefix"], &token[..12]);
        assert!(v["warning"].as_str().is_some_and(|w| !w.is_empty()), "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)),
            "id not URL-safe: {id}"
        );
        assert!(!token.contains(&id), "id derived from the token");

        // The new token works for the very next request.
        let before = up.count();
        let r = get_with(addr, "/api/new", &token).await;
        assert_eq!(r.status, 200, "fresh token refused: {r:?}");
        let seen = up.wait_for(before + 1).await;
        assert_eq!(
            seen[before].headers["x-molecule-principal"],
            format!("org-key:{id}").as_str()
        );
        minted.push((id, token));
    }

    let r = list(addr, &caller).await;
    let v = r.json();
    assert_eq!(fields(&v), set(&["tokens", "count"]), "{v}");
    let tokens = listed(&r);
    assert_eq!(v["count"], tokens.len());
    assert_eq!(tokens.len(), minted.len() + 1, "{v}");
    // Newest first: the API mints in order, the bootstrap key is oldest.
    let order: Vec<&str> = tokens.iter().map(|t| t["id"].as_str().unwrap()).collect();
    let expected: Vec<&str> = minted.iter().rev().map(|(id, _)| id.as_str()).collect();
    assert_eq!(&order[..minted.len()], &expected[..], "not newest first");
    for t in &tokens {
        assert_eq!(fields(t), set(&LIST_FIELDS), "{t}");
        utc(&t["created_at"], "created_at");
        for k in ["last_used_at", "expires_at"] {
            if !t[k].is_null() {
                utc(&t[k], k);
            }
        }
    }
    let created = tokens
        .iter()
        .map(|t| utc(&t["created_at"], "created_at"))
        .collect::<Vec<_>>();
    let sorted = {
        let mut s = created.clone();
        s.sort_by(|a, b| b.cmp(a));
        s
    };
    assert_eq!(created, sorted, "created_at not descending");
    for (id, _) in &minted {
        let t = find(&tokens, id).expect("minted key listed");
        assert_eq!(t["created_by"], format!("org-key:{caller_prefix}").as_str());
    }
    let later = find(&tokens, &minted[3].0).unwrap();
    assert_eq!(
        utc(&later["expires_at"], "expires_at"),
        utc(&Value::from("2099-01-01T00:00:00Z"), "x")
    );
    assert_eq!(
        find(&tokens, &minted[0].0).unwrap()["expires_at"],
        Value::Null
    );
    // Never a token, never a hash.
    assert!(!r.body.contains("auth_token"), "{}", r.body);
    for t in minted
        .iter()
        .map(|(_, t)| t.as_str())
        .chain([caller.as_str()])
    {
        assert!(!r.body.contains(t), "a token is listed");
        assert!(
            !r.body.contains(&t[12..]),
            "a token's secret part is listed"
        );
        let hex = keygate::auth::token::hash(t).to_hex();
        assert!(!r.body.to_lowercase().contains(&hex), "a hash is listed");
    }
    kg.stop().await;
}

#[tokio::test]
async fn delete_revokes_at_once_and_a_second_delete_is_404() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;

    let (id, token) = mint_ok(addr, &caller, r#"{"name":"victim"}"#).await;
    let (other_id, other) = mint_ok(addr, &caller, "").await;
    assert_eq!(get_with(addr, "/api/a", &token).await.status, 200);
    assert_eq!(get_with(addr, "/api/a", &other).await.status, 200);

    let r = delete(addr, &caller, &id).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({ "revoked": id }));
    let forwarded = up.count();
    assert_invalid_key(&get_with(addr, "/api/a", &token).await);
    assert_invalid_key(&get_with(addr, "/org/tokens", &token).await);
    assert_eq!(up.count(), forwarded, "a revoked key was forwarded");
    // Others are unaffected.
    assert_eq!(get_with(addr, "/api/a", &other).await.status, 200);

    let r = delete(addr, &caller, &id).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({ "error": "token not found or already revoked" })
    );
    let r = delete(addr, &caller, "no-such-id").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.error(), "token not found or already revoked");

    let tokens = listed(&list(addr, &caller).await);
    assert!(find(&tokens, &id).is_none(), "revoked key still listed");
    assert!(find(&tokens, &other_id).is_some());

    // A key may revoke itself, and is refused right after.
    let r = delete(addr, &other, &other_id).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({ "revoked": other_id }));
    assert_invalid_key(&get_with(addr, "/api/a", &other).await);
    assert_invalid_key(&delete(addr, &other, &other_id).await);
    kg.stop().await;
}

#[tokio::test]
async fn bad_mint_bodies_are_400_and_mint_nothing() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let past =
        (Utc::now() - chrono::Duration::seconds(5)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let a101 = "a".repeat(101);
    let e101 = "é".repeat(101);
    let bad = [
        "{".to_string(),
        "not json".to_string(),
        "[]".to_string(),
        "null".to_string(),
        r#""name""#.to_string(),
        r#"{"name":5}"#.to_string(),
        r#"{"name":["x"]}"#.to_string(),
        r#"{"name":true}"#.to_string(),
        r#"{"expires_at":5}"#.to_string(),
        r#"{"expires_at":"tomorrow"}"#.to_string(),
        r#"{"expires_at":"2099-01-01"}"#.to_string(),
        r#"{"expires_at":"2099-01-01 00:00:00"}"#.to_string(),
        format!(r#"{{"expires_at":"{past}"}}"#),
        r#"{"expires_at":"2001-01-01T00:00:00Z"}"#.to_string(),
        format!(r#"{{"name":"{a101}"}}"#),
        format!(r#"{{"name":"{e101}"}}"#),
    ];
    for body in &bad {
        let r = mint(addr, &caller, body).await;
        assert_eq!(r.status, 400, "body {body:?}: {r:?}");
        assert!(!r.error().is_empty(), "{r:?}");
        assert!(!r.body.contains("mok_"), "{r:?}");
    }
    assert_eq!(
        list(addr, &caller).await.json()["count"],
        1,
        "a bad body minted"
    );

    // 100 characters are fine, counted as characters (200 bytes of "é").
    for name in ["a".repeat(100), "é".repeat(100)] {
        let r = mint(addr, &caller, &format!(r#"{{"name":"{name}"}}"#)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["name"], name.as_str());
    }
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn without_a_valid_key_the_api_is_401() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let (id, _) = mint_ok(addr, &caller, "").await;
    let unknown = keygate::auth::token::mint("mok_");
    let mut truncated = caller.clone();
    truncated.pop();

    let credentials: Vec<Option<String>> = vec![
        None,
        Some(bearer(unknown.expose())),
        Some(bearer(&truncated)),
        Some(bearer("mok_garbage")),
        Some(format!("Basic {caller}")),
        Some(format!("Bearer  {caller}")),
        Some("Bearer some-other-token".into()),
    ];
    for cred in &credentials {
        let headers: Vec<(&str, &str)> = cred
            .as_deref()
            .map(|c| vec![("Authorization", c)])
            .unwrap_or_default();
        for (method, target, body) in [
            ("GET", "/org/tokens".to_string(), None),
            ("POST", "/org/tokens".to_string(), Some("{}")),
            ("DELETE", format!("/org/tokens/{id}"), None),
        ] {
            let r = send(addr, method, &target, &headers, body).await;
            assert_eq!(r.status, 401, "{method} {target} with {cred:?}: {r:?}");
            // "Otherwise 401 as above" (contract §5 -> §3 step 4).
            assert_invalid_key(&r);
        }
    }
    // Nothing was minted or revoked, nothing forwarded.
    let tokens = listed(&list(addr, &caller).await);
    assert_eq!(tokens.len(), 2);
    assert!(find(&tokens, &id).is_some());
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn keys_routes_are_never_forwarded() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let auth = bearer(&caller);

    for target in [
        "/org/tokens",
        "/org/tokens/",
        "/ORG/Tokens",
        "/org//tokens",
        "/org/tokens?x=1",
        "/org/%74okens",
    ] {
        let r = send(addr, "GET", target, &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 200, "GET {target}: {r:?}");
        assert_eq!(r.json()["count"], 1, "GET {target}: {r:?}");
        let r = send(addr, "GET", target, &[], None).await;
        assert_eq!(r.status, 401, "anonymous GET {target}: {r:?}");
    }
    // A leading `//` is never a keys route nor forwarded: 400 (contract §3 step 3).
    let r = send(
        addr,
        "GET",
        "//org/tokens",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 400, "GET //org/tokens: {r:?}");
    assert_eq!(r.error(), "bad request: ambiguous path");
    for target in ["/org/tokens/a/b", "/org/tokens/a/", "/ORG/TOKENS/a/b/c"] {
        let r = send(addr, "GET", target, &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 404, "GET {target}: {r:?}");
        assert!(!r.error().is_empty());
        let r = send(addr, "DELETE", target, &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 404, "DELETE {target}: {r:?}");
    }
    for (method, target) in [
        ("PUT", "/org/tokens"),
        ("PATCH", "/org/tokens"),
        ("DELETE", "/org/tokens"),
        ("POST", "/org/tokens/someid"),
        ("GET", "/org/tokens/someid"),
        ("PUT", "/org/tokens/someid"),
    ] {
        let r = send(
            addr,
            method,
            target,
            &[("Authorization", &auth)],
            Some("{}"),
        )
        .await;
        assert_eq!(r.status, 405, "{method} {target}: {r:?}");
        assert!(!r.error().is_empty());
        let allow = if target == "/org/tokens" {
            "GET, HEAD, POST"
        } else {
            "DELETE"
        };
        assert_eq!(
            r.header("allow").as_deref(),
            Some(allow),
            "{method} {target}"
        );
    }
    assert_eq!(up.count(), 0, "a keys route reached the app");
    // A lookalike path is the app's.
    let r = get_with(addr, "/org/tokensx", &caller).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.wait_for(1).await[0].uri.path(), "/org/tokensx");
    kg.stop().await;
}

/// HEAD is answered wherever GET is (RFC 9110 §9.3.2): `GET /org/tokens`'s
/// and the usage route's status and fields, no body; its scope is GET's.
#[tokio::test]
async fn head_is_answered_like_get_without_a_body() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let admin = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let (id, _) = mint_ok(addr, &admin, r#"{"name":"subject"}"#).await;
    let (_, bound) = mint_ok(addr, &admin, r#"{"role":"reader","workspaces":["ws_1"]}"#).await;
    let head = |target: String, token: String| async move {
        let req = format!(
            "HEAD {target} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .expect("answer within 10s")
            .unwrap();
        String::from_utf8(all).unwrap()
    };
    for target in ["/org/tokens".to_string(), format!("/org/tokens/{id}/usage")] {
        let got = head(target.clone(), admin.clone()).await;
        assert!(got.starts_with("HTTP/1.1 200 "), "HEAD {target}: {got:?}");
        assert!(
            got.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{got:?}"
        );
        assert!(
            got.ends_with("\r\n\r\n"),
            "HEAD {target} sent a body: {got:?}"
        );
    }
    // A bound key may not list (§8), by HEAD either.
    let got = head("/org/tokens".into(), bound).await;
    assert!(got.starts_with("HTTP/1.1 403 "), "{got:?}");
    assert!(got.ends_with("\r\n\r\n"), "{got:?}");
    assert_eq!(up.count(), 0, "a keys route reached the app");
    kg.stop().await;
}

/// Every 405 keygate answers names what the resource does allow (RFC 9110
/// §15.5.6), over HTTP/1.1 and HTTP/2: each keys route its methods, whatever
/// the caller's role; `CONNECT` (never proxied) the methods keygate forwards;
/// the admin listener `GET, HEAD`. None of them reaches the app or changes a key.
#[tokio::test]
async fn every_405_carries_allow() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let admin = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let (id, token) = mint_ok(addr, &admin, r#"{"name":"subject"}"#).await;
    let (_, reader) = mint_ok(addr, &admin, r#"{"role":"reader"}"#).await;

    let item = format!("/org/tokens/{id}");
    let rotate = format!("/org/tokens/{id}/rotate");
    let usage = format!("/org/tokens/{id}/usage");
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("PUT", "/org/tokens", "GET, HEAD, POST", &admin),
        ("DELETE", "/org/tokens", "GET, HEAD, POST", &admin),
        ("PUT", "/org/tokens", "GET, HEAD, POST", &reader),
        ("GET", &item, "DELETE", &admin),
        ("POST", &item, "DELETE", &token),
        ("PATCH", &item, "DELETE", &admin),
        ("GET", &rotate, "POST", &admin),
        ("DELETE", &rotate, "POST", &token),
        ("POST", &usage, "GET, HEAD", &admin),
        ("PUT", &usage, "GET, HEAD", &token),
    ];
    let mut h2 = kg::h2_client(addr).await;
    for (method, target, allow, caller) in &cases {
        let what = format!("{method} {target}");
        let r = send(
            addr,
            method,
            target,
            &[("Authorization", &bearer(caller))],
            None,
        )
        .await;
        assert_eq!(r.status, 405, "{what}: {r:?}");
        assert_eq!(r.error(), "method not allowed", "{what}");
        assert_eq!(r.header("allow").as_deref(), Some(*allow), "{what}");
        assert!(r.header("x-request-id").is_some(), "{what}: {r:?}");

        let req = http::Request::builder()
            .method(*method)
            .uri(format!("http://{HOST}{target}"))
            .header("authorization", bearer(caller))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, body) = kg::h2_send(&mut h2, req).await.expect(&what);
        assert_eq!(status, 405, "h2 {what}: {body}");
        assert_eq!(
            headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(*allow),
            "h2 {what}"
        );
    }
    // The subject key is untouched: not revoked, rotated or read.
    let r = list(addr, &token).await;
    assert!(find(&listed(&r), &id).is_some(), "{r:?}");

    // CONNECT: refused before any route or credential, over both protocols.
    let connect = format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n");
    let r = kg::raw(addr, connect.as_bytes()).await;
    assert_eq!(r.status, 405, "{r:?}");
    let allow = r
        .header("allow")
        .unwrap_or_else(|| panic!("CONNECT 405 without Allow: {r:?}"));
    let methods: Vec<&str> = allow.split(", ").collect();
    for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.contains(&m), "Allow: {allow}");
    }
    assert!(!methods.contains(&"CONNECT"), "Allow: {allow}");
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("{HOST}:443"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    // A well-formed HTTP/2 CONNECT (RFC 9113 §8.5: :method and :authority
    // only) is answered, not reset.
    let (status, headers, _) = kg::h2_send(&mut kg::h2_client(addr).await, req)
        .await
        .expect("h2 CONNECT answered");
    assert_eq!(status, 405, "h2 CONNECT");
    assert_eq!(
        headers.get("allow").and_then(|v| v.to_str().ok()),
        Some(allow.as_str()),
        "h2 CONNECT"
    );

    // The admin listener answers GET and HEAD only.
    let admin_addr = kg.admin_addr.unwrap();
    for (method, path) in [
        ("POST", "/metrics"),
        ("DELETE", "/healthz"),
        ("PUT", "/readyz"),
    ] {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let r = kg::raw(admin_addr, req.as_bytes()).await;
        assert_eq!(r.status, 405, "admin {method} {path}: {r:?}");
        assert_eq!(
            r.header("allow").as_deref(),
            Some("GET, HEAD"),
            "admin {method} {path}"
        );
    }
    assert_eq!(up.count(), 0, "a 405 reached the app");
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// What Redis holds
// ---------------------------------------------------------------------------

/// Every key of the Redis server and a dump of its value.
fn dump_redis(port: u16) -> Vec<(String, String)> {
    let keys = redis_cli(port, &["--scan"]);
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|k| {
            let ty = redis_cli(port, &["TYPE", k]);
            let value = match ty.trim() {
                "string" => redis_cli(port, &["GET", k]),
                "hash" => redis_cli(port, &["HGETALL", k]),
                "zset" => redis_cli(port, &["ZRANGE", k, "0", "-1", "WITHSCORES"]),
                "set" => redis_cli(port, &["SMEMBERS", k]),
                "list" => redis_cli(port, &["LRANGE", k, "0", "-1"]),
                "stream" => redis_cli(port, &["XRANGE", k, "-", "+"]),
                other => panic!("unexpected Redis type {other} for {k}"),
            };
            (k.to_string(), value)
        })
        .collect()
}

#[tokio::test]
async fn redis_holds_only_hashes_under_the_tenant_hash_tag() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let mut tokens = vec![caller.clone()];
    for body in ["", r#"{"name":"one","expires_at":"2099-01-01T00:00:00Z"}"#] {
        tokens.push(mint_ok(addr, &caller, body).await.1);
    }
    let (revoked_id, revoked) = mint_ok(addr, &caller, "").await;
    tokens.push(revoked.clone());
    assert_eq!(get_with(addr, "/api/x", &revoked).await.status, 200);
    assert_eq!(delete(addr, &caller, &revoked_id).await.status, 200);
    for t in &tokens {
        let _ = get_with(addr, "/api/x", t).await;
    }

    let dump = dump_redis(redis.port());
    assert!(!dump.is_empty(), "nothing stored");
    for (key, value) in &dump {
        assert!(
            key.starts_with("keygate:{acme}:"),
            "key outside the tenant tag: {key}"
        );
        for t in &tokens {
            for hay in [key, value] {
                assert!(
                    !hay.contains(t.as_str()),
                    "plaintext token in Redis at {key}"
                );
                assert!(
                    !hay.contains(&t[12..]),
                    "token secret part in Redis at {key}"
                );
            }
        }
    }
    // Each token's record is keyed by its SHA-256.
    let names: BTreeSet<&str> = dump.iter().map(|(k, _)| k.as_str()).collect();
    for t in &tokens {
        let hex = keygate::auth::token::hash(t).to_hex();
        assert!(
            names.iter().any(|k| k.contains(&hex)),
            "no record keyed by the token's SHA-256"
        );
    }
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// Revocation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_one_instance_is_honoured_by_another_within_the_bound() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let c = kg::redis_config(&up, &redis);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let caller = bootstrap_key(&a).await;

    let mut latencies = Vec::new();
    for round in 0..20 {
        let (id, token) = mint_ok(a.public_addr, &caller, "").await;
        // B validates the key and caches it.
        for _ in 0..2 {
            let r = get_with(b.public_addr, "/api/b", &token).await;
            assert_eq!(r.status, 200, "round {round}: {r:?}");
        }
        let r = delete(a.public_addr, &caller, &id).await;
        assert_eq!(r.status, 200, "{r:?}");
        let revoked = Instant::now();
        assert_invalid_key(&get_with(a.public_addr, "/api/a", &token).await);
        let deadline = revoked + Duration::from_secs(2);
        let latency = loop {
            let r = get_with(b.public_addr, "/api/b", &token).await;
            if r.status == 401 {
                assert_invalid_key(&r);
                break revoked.elapsed();
            }
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                Instant::now() < deadline,
                "round {round}: instance B still accepts a key revoked on A after 2 s"
            );
        };
        latencies.push(latency);
    }
    latencies.sort();
    println!(
        "revocation A -> B observed over HTTP (incl. one request round trip), {} rounds: \
         p50 {:?}, p95 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 95 / 100],
        latencies.last().unwrap()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_a_revoke_never_succeed_after_it_returned() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let (id, token) = mint_ok(addr, &caller, "").await;

    let results: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (results, stop, token) = (results.clone(), stop.clone(), token.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let r = get_with(addr, "/api/race", &token).await;
                    results.lock().unwrap().push((started, r.status));
                }
            })
        })
        .collect();
    let ok_count = |results: &Mutex<Vec<(Instant, u16)>>| {
        results
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == 200)
            .count()
    };
    let r2 = results.clone();
    wait_until(
        "requests to succeed before the revoke",
        Duration::from_secs(10),
        || ok_count(&r2) >= 20,
    )
    .await;

    let r = delete(addr, &caller, &id).await;
    assert_eq!(r.status, 200, "{r:?}");
    let returned = Instant::now();

    let r2 = results.clone();
    wait_until("requests after the revoke", Duration::from_secs(10), || {
        r2.lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t > returned)
            .count()
            >= 40
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut after = 0;
    for (started, status) in results.iter() {
        assert!(
            *status == 200 || *status == 401,
            "unexpected status {status}"
        );
        if *started > returned {
            after += 1;
            assert_eq!(
                *status,
                401,
                "a request started {:?} after the revoke returned succeeded",
                started.duration_since(returned)
            );
        }
    }
    let before_ok = results.iter().filter(|(_, s)| *s == 200).count();
    println!(
        "race: {} requests, {before_ok} succeeded (all before the revoke returned), {after} started after it (all 401)",
        results.len()
    );
    kg.stop().await;
}

/// The key is accepted until `expires_at` and refused (401) from then on.
/// `early`: how long before `expires_at` a refusal is tolerated.
async fn expired_key_case(early: chrono::Duration) {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;

    // Whole milliseconds: the body carries millisecond precision, so this is
    // exactly the expires_at keygate stores.
    let expires_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let expires_at =
        chrono::DateTime::from_timestamp_millis(expires_at.timestamp_millis()).expect("valid time");
    let body = format!(
        r#"{{"name":"short","expires_at":"{}"}}"#,
        expires_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    );
    let (id, token) = mint_ok(addr, &caller, &body).await;
    let r = get_with(addr, "/api/x", &token).await;
    assert_eq!(r.status, 200, "{r:?}");

    // Requests sent before `expires_at - early` must pass, every request
    // sent after `expires_at` must be refused; poll until 5 of those.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused_after = 0;
    let mut first_refusal: Option<chrono::Duration> = None;
    while refused_after < 5 {
        let started = Utc::now();
        let r = get_with(addr, "/api/x", &token).await;
        if r.status == 401 {
            assert_invalid_key(&r);
            first_refusal.get_or_insert(Utc::now() - expires_at);
            assert!(
                started >= expires_at - early || Utc::now() >= expires_at - early,
                "refused {:?} before expires_at",
                (expires_at - Utc::now()).to_std().unwrap_or_default()
            );
        } else {
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                started < expires_at,
                "a request sent {:?} after expires_at was accepted",
                (started - expires_at).to_std().unwrap_or_default()
            );
            assert!(
                first_refusal.is_none() || early > chrono::Duration::zero(),
                "accepted again after a refusal"
            );
        }
        if started >= expires_at {
            refused_after += 1;
        }
        assert!(Instant::now() < deadline, "expired key still accepted");
        // Back-to-back requests around expires_at, a slower pace before.
        if expires_at - Utc::now() > chrono::Duration::milliseconds(100) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "first refusal {} ms relative to expires_at",
        first_refusal
            .map(|d| d.num_microseconds().unwrap_or(0) as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    );
    // No longer listed.
    assert!(find(&listed(&list(addr, &caller).await), &id).is_none());
    kg.stop().await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    // A loose variant of the strict test below (50 ms of slack), kept as a
    // guard against gross regressions of expiry handling.
    expired_key_case(chrono::Duration::milliseconds(50)).await;
}

#[tokio::test]
async fn an_expired_key_is_refused_not_before_expires_at() {
    for _ in 0..5 {
        expired_key_case(chrono::Duration::zero()).await;
    }
}

// ---------------------------------------------------------------------------
// Redis outages
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redis_outage_with_the_reject_policy_and_recovery() {
    // Persistent (AOF, fsync always) so the keys survive the kill -9.
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().display().to_string();
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ]);
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let cached = bootstrap_key(&kg).await;
    let uncached = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    assert_eq!(get_with(addr, "/api/x", &cached).await.status, 200);

    redis.kill();
    let killed = Instant::now();
    assert_store_unavailable(&get_with(addr, "/api/x", &uncached).await);
    assert_store_unavailable(&get_with(addr, "/api/x", &uncached).await);
    // The cached key: the feed is gone, so the entry is not trusted any more.
    let deadline = killed + Duration::from_secs(3);
    loop {
        let r = get_with(addr, "/api/x", &cached).await;
        if r.status == 503 {
            assert_store_unavailable(&r);
            println!("cached key refused {:?} after the kill", killed.elapsed());
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "cached key still accepted 3 s into the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_store_unavailable(&get_with(addr, "/org/tokens", &cached).await);
    // Traffic that needs no key is not affected.
    let before = up.count();
    let r = send(addr, "GET", "/api/anon", &[], None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        addr,
        "GET",
        "/api/other",
        &[("Authorization", "Bearer not-an-org-key")],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.wait_for(before + 2).await;
    assert!(seen[before..]
        .iter()
        .all(|s| s.headers.get("x-molecule-principal").is_none()));

    // Redis comes back: keys work again, keygate not restarted.
    redis.restart();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    for token in [&cached, &uncached] {
        loop {
            let r = get_with(addr, "/api/x", token).await;
            if r.status == 200 {
                break;
            }
            assert!(
                r.status == 503,
                "after the restart: {r:?} (401 would mean a key the store could not check was refused)"
            );
            assert!(
                Instant::now() < deadline,
                "keys still refused 10 s after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("keys accepted again {:?} after the restart", back.elapsed());
    assert_eq!(list(addr, &cached).await.json()["count"], 2);
    kg.stop().await;
}

#[tokio::test]
async fn serve_cached_honours_max_stale() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut c = kg::redis_config(&up, &redis);
    let max_stale = Duration::from_millis(1500);
    c.auth.on_store_unavailable = OutagePolicy::ServeCached;
    c.auth.max_stale = max_stale;
    let kg = kg::start_live(&c).await;
    let seen = bootstrap_key(&kg).await;
    let never_seen = bootstrap_key(&kg).await;
    let addr = kg.public_addr;

    let check_started = Instant::now();
    assert_eq!(get_with(addr, "/api/x", &seen).await.status, 200);
    let checked = Instant::now();
    redis.kill();

    let r = get_with(addr, "/api/x", &seen).await;
    assert!(
        r.status == 200 || check_started.elapsed() > max_stale,
        "a key validated just before the kill was refused within max_stale: {r:?}"
    );
    assert_store_unavailable(&get_with(addr, "/api/x", &never_seen).await);

    let deadline = checked + max_stale + Duration::from_secs(5);
    loop {
        let sent = Instant::now();
        let r = get_with(addr, "/api/x", &seen).await;
        if r.status == 503 {
            assert_store_unavailable(&r);
            assert!(
                check_started.elapsed() >= max_stale,
                "stale key refused before max_stale"
            );
            println!(
                "stale key refused {:?} after its last check (max_stale {max_stale:?})",
                checked.elapsed()
            );
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            sent < checked + max_stale,
            "a request sent {:?} after the last check was served from a stale entry",
            sent.duration_since(checked)
        );
        assert!(Instant::now() < deadline, "stale key served past max_stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(addr, "GET", "/api/anon", &[], None).await.status, 200);
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// Flood of random tokens
// ---------------------------------------------------------------------------

/// `cmdstat_<name>` → calls, from `INFO commandstats`.
fn command_calls(port: u16) -> std::collections::BTreeMap<String, u64> {
    redis_cli(port, &["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

fn diff(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Send each token once, sequentially on one keep-alive connection; statuses.
async fn keepalive_statuses(addr: SocketAddr, tokens: Vec<String>) -> Vec<u16> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut sender = None;
    for t in tokens {
        if sender.is_none() {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>> =
            sender.as_mut().unwrap();
        s.ready().await.unwrap();
        let req = http::Request::get("/api/flood")
            .header("host", HOST)
            .header("authorization", bearer(&t))
            .body(Empty::new())
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let close = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        out.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
        if close {
            sender = None;
        }
    }
    out
}

async fn flood(addr: SocketAddr, tokens: &[String]) -> Vec<u16> {
    const CONNS: usize = 16;
    let chunk = tokens.len().div_ceil(CONNS);
    let tasks: Vec<_> = tokens
        .chunks(chunk)
        .map(|c| tokio::spawn(keepalive_statuses(addr, c.to_vec())))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_tokens_costs_a_bounded_number_of_redis_commands() {
    const N: usize = 10_000;
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut c = kg::redis_config(&up, &redis);
    // Long enough for the replay below to fall within it; store timeout
    // raised so a busy test machine cannot turn a look-up into a 503.
    c.auth.negative_ttl = Duration::from_secs(300);
    c.store.timeout = Duration::from_secs(2);
    let kg = kg::start_live(&c).await;
    let addr = kg.public_addr;
    let tokens: Vec<String> = (0..N)
        .map(|_| keygate::auth::token::mint("mok_").expose().to_string())
        .collect();

    let before = command_calls(redis.port());
    let started = Instant::now();
    let statuses = flood(addr, &tokens).await;
    let elapsed = started.elapsed();
    let after = command_calls(redis.port());
    assert_eq!(statuses.len(), N);
    let not_401: Vec<_> = statuses.iter().filter(|s| **s != 401).collect();
    assert!(
        not_401.is_empty(),
        "{} non-401 answers, e.g. {:?}",
        not_401.len(),
        &not_401[..not_401.len().min(5)]
    );
    let d = diff(&before, &after);
    let total: u64 = d.values().sum();
    let lookups = d.get("hgetall").copied().unwrap_or(0);
    println!("flood 1: {N} random tokens in {elapsed:?}: {total} Redis commands {d:?}");
    // One HGETALL per distinct unknown token at most (single-flight +
    // negative cache), plus the feed's liveness PING (1/s), our INFO, and a
    // few connection set-up commands.
    let per_second = 2 * (elapsed.as_secs() + 1);
    assert!(lookups <= N as u64, "{lookups} look-ups for {N} tokens");
    assert!(
        total <= N as u64 + per_second + 20,
        "{total} Redis commands for {N} random tokens in {elapsed:?}"
    );

    // The same tokens again, within negative_ttl: answered from the negative
    // cache (capacity 10 000), no look-ups.
    let before = command_calls(redis.port());
    let started = Instant::now();
    let statuses = flood(addr, &tokens).await;
    let elapsed = started.elapsed();
    let after = command_calls(redis.port());
    assert!(statuses.iter().all(|s| *s == 401));
    let d = diff(&before, &after);
    let total: u64 = d.values().sum();
    println!("flood 2 (replay): {N} tokens in {elapsed:?}: {total} Redis commands {d:?}");
    let per_second = 2 * (elapsed.as_secs() + 1);
    assert!(
        total <= per_second + 20,
        "{total} Redis commands replaying {N} negatively cached tokens"
    );
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// last_used_at
// ---------------------------------------------------------------------------

#[tokio::test]
async fn last_used_at_is_written_behind() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let caller = bootstrap_key(&kg).await;
    let addr = kg.public_addr;
    let (id, token) = mint_ok(addr, &caller, "").await;
    let (unused_id, _) = mint_ok(addr, &caller, "").await;
    let tokens = listed(&list(addr, &caller).await);
    assert_eq!(find(&tokens, &id).unwrap()["last_used_at"], Value::Null);

    let used = Utc::now();
    assert_eq!(get_with(addr, "/api/x", &token).await.status, 200);
    let started = Instant::now();
    // Flushed every auth::TOUCH_FLUSH_EVERY (5 s, not configurable).
    let deadline = started + keygate::auth::TOUCH_FLUSH_EVERY + Duration::from_secs(5);
    loop {
        let tokens = listed(&list(addr, &caller).await);
        let t = find(&tokens, &id).unwrap();
        if !t["last_used_at"].is_null() {
            let at = utc(&t["last_used_at"], "last_used_at");
            let created = utc(&t["created_at"], "created_at");
            assert!(at >= created, "last_used_at before created_at");
            assert!(
                at >= used - chrono::Duration::seconds(1) && at <= Utc::now(),
                "last_used_at {at} not the time of use {used}"
            );
            println!("last_used_at visible {:?} after use", started.elapsed());
            assert_eq!(
                find(&tokens, &unused_id).unwrap()["last_used_at"],
                Value::Null
            );
            break;
        }
        assert!(Instant::now() < deadline, "last_used_at never written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// Mint ceiling
// ---------------------------------------------------------------------------

async fn session_mint(addr: SocketAddr) -> RawResponse {
    send(
        addr,
        "POST",
        "/org/tokens",
        &[
            ("Cookie", "wos-session=ceiling"),
            ("Origin", "https://acme.moleculesai.app"),
        ],
        Some("{}"),
    )
    .await
}

fn ceiling_config(up: &Upstream, redis: &RedisServer, verify: SocketAddr) -> Config {
    let mut c = kg::redis_config(up, redis);
    c.keys.max_live = 3;
    c.session = Some(SessionConfig {
        verify_url: format!("http://{verify}/verify").parse().unwrap(),
        cookie: "wos-session".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(5),
    });
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_ceiling_admits_exactly_max_live() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // `wos-session=ceiling` mints without a key of its own taking a slot.
    let verify = Verify::start("ceiling", "u_ceiling").await.addr;
    let kg = kg::start_live(&ceiling_config(&up, &redis, verify)).await;
    let addr = kg.public_addr;

    let tasks: Vec<_> = (0..4).map(|_| tokio::spawn(session_mint(addr))).collect();
    let mut ok = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok.push(r.json()),
            429 => {
                assert_eq!(
                    r.json(),
                    serde_json::json!({ "error": "org api token mint ceiling exceeded" })
                );
                refused += 1;
            }
            _ => panic!("{r:?}"),
        }
    }
    assert_eq!(
        (ok.len(), refused),
        (3, 1),
        "max_live = 3, 4 concurrent mints"
    );
    let r = session_mint(addr).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.error(), "org api token mint ceiling exceeded");
    let key = ok[0]["auth_token"].as_str().unwrap().to_string();
    let r = mint(addr, &key, "{}").await;
    assert_eq!(r.status, 429, "a key mint past the ceiling: {r:?}");
    assert_eq!(list(addr, &key).await.json()["count"], 3);

    // Revoking frees a slot.
    let id = ok[1]["id"].as_str().unwrap();
    assert_eq!(delete(addr, &key, id).await.status, 200);
    assert_eq!(session_mint(addr).await.status, 200);
    assert_eq!(session_mint(addr).await.status, 429);
    assert_eq!(list(addr, &key).await.json()["count"], 3);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_for_the_last_slot_admit_one() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // `wos-session=ceiling` mints without a key of its own taking a slot.
    let verify = Verify::start("ceiling", "u_ceiling").await.addr;
    let c = ceiling_config(&up, &redis, verify);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let caller = bootstrap_key(&a).await; // one live key
    let (_, _) = mint_ok(a.public_addr, &caller, "").await; // two live keys

    for round in 0..3 {
        let barrier = Arc::new(tokio::sync::Barrier::new(10));
        let wins = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let addr = if i % 2 == 0 {
                    a.public_addr
                } else {
                    b.public_addr
                };
                let (caller, barrier, wins) = (caller.clone(), barrier.clone(), wins.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let r = mint(addr, &caller, "{}").await;
                    match r.status {
                        200 => {
                            wins.fetch_add(1, Ordering::SeqCst);
                            Some(r.json()["id"].as_str().unwrap().to_string())
                        }
                        429 => {
                            assert_eq!(r.error(), "org api token mint ceiling exceeded");
                            None
                        }
                        _ => panic!("{r:?}"),
                    }
                })
            })
            .collect();
        let mut winner = None;
        for t in tasks {
            if let Some(id) = t.await.unwrap() {
                winner = Some(id);
            }
        }
        assert_eq!(
            wins.load(Ordering::SeqCst),
            1,
            "round {round}: not exactly one winner"
        );
        assert_eq!(list(b.public_addr, &caller).await.json()["count"], 3);
        // Free the slot for the next round.
        let id = winner.unwrap();
        assert_eq!(delete(b.public_addr, &caller, &id).await.status, 200);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_expired_key_frees_its_slot() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // `wos-session=ceiling` mints without a key of its own taking a slot.
    let verify = Verify::start("ceiling", "u_ceiling").await.addr;
    let kg = kg::start_live(&ceiling_config(&up, &redis, verify)).await;
    let addr = kg.public_addr;
    assert_eq!(session_mint(addr).await.status, 200);
    assert_eq!(session_mint(addr).await.status, 200);
    // Whole milliseconds: the body carries millisecond precision, so this is
    // exactly the expires_at keygate stores.
    let expires_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let expires_at =
        chrono::DateTime::from_timestamp_millis(expires_at.timestamp_millis()).expect("valid time");
    let body = format!(
        r#"{{"expires_at":"{}"}}"#,
        expires_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    );
    let r = send(
        addr,
        "POST",
        "/org/tokens",
        &[
            ("Cookie", "wos-session=ceiling"),
            ("Origin", "https://acme.moleculesai.app"),
        ],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = session_mint(addr).await;
        if r.status == 200 {
            assert!(
                Utc::now() >= expires_at,
                "a fourth key minted before the third expired"
            );
            break;
        }
        assert_eq!(r.status, 429, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "the expired key still takes a slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(session_mint(addr).await.status, 429);
    kg.stop().await;
}
