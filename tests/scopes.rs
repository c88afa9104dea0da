//! Scoped keys (contract §8) through a running keygate on real Redis, over
//! raw HTTP/1.1 and HTTP/2: what the client gets, what the app receives
//! (nothing for a refusal; the exact role and workspaces headers otherwise,
//! every spoofed copy gone), the key-management rule, and two keygates on
//! one Redis agreeing on a key's scope.
//!
//! Run: `cargo test --test scopes` (needs `redis-server`).

mod common;

use bytes::Bytes;
use common::keys::{self as api, bearer};
use common::kg::{self, Key, RawResponse, HOST};
use common::redis::RedisServer;
use common::upstream::{Seen, Upstream};
use http_body_util::Full;
use keygate::auth::scope::Role;
use keygate::auth::MintRequest;
use keygate::config::{AdminOnlyRule, Config};
use keygate::RunHandle;

const OUT_OF_SCOPE: &str = "forbidden: outside this key's scope";
const ROLE: &str = "x-molecule-key-role";
const WORKSPACES: &str = "x-molecule-key-workspaces";
const PRINCIPAL: &str = "x-molecule-principal";

/// Client copies of the scope headers, in every spelling an app framework
/// may fold into the same name (HTTP/1.1 also names them in `Connection`).
const SPOOFS: &[(&str, &str)] = &[
    ("X-Molecule-Key-Role", "admin"),
    ("x-molecule-key-role", "admin"),
    ("X_Molecule_Key_Role", "admin"),
    ("x.molecule.key.role", "admin"),
    ("X-MOLECULE-KEY-WORKSPACES", "ws_9"),
    ("x_molecule_key_workspaces", "ws_9"),
    ("X.Molecule-Key_Workspaces", "ws_9"),
    ("X-Molecule-Principal", "org-key:spoof"),
];

fn config(up: &Upstream, redis: &RedisServer) -> Config {
    let mut c = kg::redis_config(up, redis);
    c.scopes.admin_only = vec![AdminOnlyRule {
        method: Some(http::Method::POST),
        prefix: "/org/import".into(),
    }];
    c
}

async fn mint(kg: &RunHandle, role: Role, workspaces: &[&str]) -> Key {
    kg::mint_request(
        kg,
        MintRequest {
            name: Some(format!("{role} {workspaces:?}")),
            role,
            workspaces: workspaces.iter().map(|w| w.to_string()).collect(),
            enforce_ceiling: false,
            ..Default::default()
        },
    )
    .await
}

/// Header names the app received that fold (any case, `_`/`.` for `-`) to `name`.
fn folded(seen: &Seen, name: &str) -> Vec<String> {
    seen.headers
        .iter()
        .filter(|(n, _)| {
            n.as_str().len() == name.len()
                && n.as_str()
                    .bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| matches!(a, b'_' | b'.') && b == b'-' || a == b)
        })
        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
        .collect()
}

/// What the app must have received for `key` (role `role`, ids `ids`).
fn assert_scope_headers(seen: &Seen, key: &Key, role: &str, ids: &str, what: &str) {
    assert_eq!(folded(seen, ROLE), [format!("{ROLE}: {role}")], "{what}");
    let want_ws: Vec<String> = if ids.is_empty() {
        vec![]
    } else {
        vec![format!("{WORKSPACES}: {ids}")]
    };
    assert_eq!(folded(seen, WORKSPACES), want_ws, "{what}");
    assert_eq!(
        folded(seen, PRINCIPAL),
        [format!("{PRINCIPAL}: org-key:{}", key.id)],
        "{what}"
    );
    assert!(seen.headers.get("authorization").is_none(), "{what}");
}

/// One HTTP/1.1 request with the key and every spoof (also named in `Connection`).
async fn h1(kg: &RunHandle, key: &Key, method: &str, path: &str) -> RawResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {}\r\n",
        bearer(&key.token)
    );
    for (n, v) in SPOOFS {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close, X-Molecule-Key-Role, x-molecule-key-workspaces\r\n");
    if matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str("Content-Length: 2\r\n\r\n{}");
    } else {
        req.push_str("\r\n");
    }
    kg::raw(kg.public_addr, req.as_bytes()).await
}

/// The same over HTTP/2 (no `Connection`: it is malformed there).
async fn h2(kg: &RunHandle, key: &Key, method: &str, path: &str) -> (u16, String) {
    let mut send = kg::h2_client(kg.public_addr).await;
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{HOST}{path}"))
        .header("authorization", bearer(&key.token));
    for (n, v) in SPOOFS {
        b = b.header(n.to_ascii_lowercase(), *v);
    }
    let body = if matches!(method, "POST" | "PUT" | "PATCH") {
        Full::new(Bytes::from_static(b"{}"))
    } else {
        Full::new(Bytes::new())
    };
    let (status, _, body) = kg::h2_send(&mut send, b.body(body).unwrap())
        .await
        .expect("h2 answer");
    (status, body)
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

struct Row {
    key: usize,
    method: &'static str,
    path: &'static str,
    forwarded: bool,
}

fn rows() -> Vec<Row> {
    // keys: 0 admin, 1 editor, 2 reader, 3 reader bound to ws_1,
    // 4 editor bound to ws_1 + WS-2, 5 admin bound to ws_1
    let r = |key, method, path, forwarded| Row {
        key,
        method,
        path,
        forwarded,
    };
    vec![
        r(0, "GET", "/api/things", true),
        r(0, "POST", "/org/import", true),
        r(0, "DELETE", "/workspaces/any", true),
        r(1, "POST", "/api/things", true),
        r(1, "DELETE", "/api/things/1", true),
        r(1, "POST", "/org/import", false),
        r(1, "POST", "/ORG//Import/x", false),
        r(1, "GET", "/org/import", true),
        r(2, "GET", "/api/things", true),
        r(2, "HEAD", "/api/things", true),
        r(2, "OPTIONS", "/api/things", true),
        r(2, "POST", "/api/things", false),
        r(2, "PUT", "/api/things", false),
        r(2, "PATCH", "/api/things", false),
        r(2, "DELETE", "/api/things", false),
        r(3, "GET", "/workspaces/ws_1", true),
        r(3, "GET", "/workspaces/ws%5F1/secrets", true),
        r(3, "GET", "/workspaces/ws_1/?q=/workspaces/ws_2", true),
        r(3, "GET", "/workspaces/WS_1", false),
        r(3, "GET", "/workspaces/ws_10", false),
        r(3, "GET", "/workspaces//ws_1", false),
        r(3, "GET", "/workspaces", false),
        r(3, "GET", "/org/templates", false),
        r(3, "GET", "/api/things?ws=ws_1", false),
        r(3, "POST", "/workspaces/ws_1", false),
        r(4, "POST", "/workspaces/WS-2/files", true),
        r(4, "PUT", "/workspaces/ws_1", true),
        r(4, "POST", "/workspaces/ws-2", false),
        r(4, "POST", "/org/import", false),
        r(5, "DELETE", "/workspaces/ws_1/x", true),
        r(5, "POST", "/org/import", false),
    ]
}

async fn setup() -> (
    RedisServer,
    Upstream,
    RunHandle,
    Vec<(Key, &'static str, &'static str)>,
) {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let kg = kg::start_live(&config(&up, &redis)).await;
    let keys = vec![
        (mint(&kg, Role::Admin, &[]).await, "admin", ""),
        (mint(&kg, Role::Editor, &[]).await, "editor", ""),
        (mint(&kg, Role::Reader, &[]).await, "reader", ""),
        (mint(&kg, Role::Reader, &["ws_1"]).await, "reader", "ws_1"),
        (
            mint(&kg, Role::Editor, &["ws_1", "WS-2"]).await,
            "editor",
            "ws_1,WS-2",
        ),
        (mint(&kg, Role::Admin, &["ws_1"]).await, "admin", "ws_1"),
    ];
    (redis, up, kg, keys)
}

#[tokio::test]
async fn each_role_over_http1() {
    let (_redis, up, kg, keys) = setup().await;
    let mut forwarded = 0;
    for row in rows() {
        let (key, role, ids) = &keys[row.key];
        let what = format!("HTTP/1.1 {role} [{ids}] {} {}", row.method, row.path);
        let r = h1(&kg, key, row.method, row.path).await;
        if row.forwarded {
            assert_eq!(r.status, 200, "{what}: {r:?}");
            forwarded += 1;
            let seen = up.wait_for(forwarded).await;
            let last = seen.last().unwrap();
            assert_eq!(last.method.as_str(), row.method, "{what}");
            assert_eq!(
                last.uri.path_and_query().unwrap().as_str(),
                row.path,
                "{what}"
            );
            assert_scope_headers(last, key, role, ids, &what);
        } else {
            assert_eq!(r.status, 403, "{what}: {r:?}");
            assert_eq!(r.error(), OUT_OF_SCOPE, "{what}");
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json")
            );
            assert_eq!(up.count(), forwarded, "{what}: a refusal reached the app");
        }
    }
    // Anonymous requests lose every spoof too and carry no scope.
    let mut req = format!("GET /anon HTTP/1.1\r\nHost: {HOST}\r\n");
    for (n, v) in SPOOFS {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    assert_eq!(kg::raw(kg.public_addr, req.as_bytes()).await.status, 200);
    let seen = up.wait_for(forwarded + 1).await;
    let anon = seen.last().unwrap();
    assert!(folded(anon, ROLE).is_empty(), "{:?}", anon.headers);
    assert!(folded(anon, WORKSPACES).is_empty(), "{:?}", anon.headers);
    assert!(folded(anon, PRINCIPAL).is_empty(), "{:?}", anon.headers);
    assert_eq!(up.count(), forwarded + 1);

    // The refusals are counted as out_of_scope.
    let admin = kg.admin_addr.unwrap();
    let m = kg::raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let refused = rows().iter().filter(|r| !r.forwarded).count();
    let line = format!("keygate_requests_total{{outcome=\"out_of_scope\"}} {refused}");
    assert!(m.body.lines().any(|l| l == line), "{line} in\n{}", m.body);
    kg.stop().await;
}

#[tokio::test]
async fn each_role_over_http2() {
    let (_redis, up, kg, keys) = setup().await;
    let mut forwarded = 0;
    for row in rows() {
        let (key, role, ids) = &keys[row.key];
        let what = format!("HTTP/2 {role} [{ids}] {} {}", row.method, row.path);
        let (status, body) = h2(&kg, key, row.method, row.path).await;
        if row.forwarded {
            assert_eq!(status, 200, "{what}: {body}");
            forwarded += 1;
            let seen = up.wait_for(forwarded).await;
            let last = seen.last().unwrap();
            assert_eq!(last.method.as_str(), row.method, "{what}");
            assert_eq!(
                last.uri.path_and_query().unwrap().as_str(),
                row.path,
                "{what}"
            );
            assert_scope_headers(last, key, role, ids, &what);
        } else {
            assert_eq!(status, 403, "{what}: {body}");
            assert_eq!(error_of(&body), OUT_OF_SCOPE, "{what}");
            assert_eq!(up.count(), forwarded, "{what}: a refusal reached the app");
        }
    }
    kg.stop().await;
}

#[tokio::test]
async fn key_management_follows_section_8() {
    let (_redis, up, kg, keys) = setup().await;
    let addr = kg.public_addr;
    let [admin, editor, reader, bound_reader, bound_editor, bound_admin] =
        [0, 1, 2, 3, 4, 5].map(|i| keys[i].0.clone());
    let live = |r: RawResponse| r.json()["count"].as_u64().unwrap();
    let before = live(api::list(addr, &admin.token).await);

    // Mint escalation attempts: 403, and nothing is minted.
    for (who, body) in [
        (&editor, r#"{}"#),
        (&editor, r#"{"role":"reader"}"#),
        (&reader, r#"{"role":"reader","workspaces":["ws_1"]}"#),
        (&bound_editor, r#"{"role":"reader","workspaces":["ws_1"]}"#),
        (&bound_reader, r#"{"workspaces":["ws_1"]}"#),
        (&bound_admin, r#"{}"#),
        (&bound_admin, r#"{"role":"reader"}"#),
        (&bound_admin, r#"{"workspaces":["ws_2"]}"#),
        (&bound_admin, r#"{"workspaces":["ws_1","ws_2"]}"#),
        (&bound_admin, r#"{"workspaces":["WS_1"]}"#),
    ] {
        let r = api::mint(addr, &who.token, body).await;
        assert_eq!(r.status, 403, "{body}: {r:?}");
        assert_eq!(r.error(), OUT_OF_SCOPE, "{body}");
    }
    assert_eq!(live(api::list(addr, &admin.token).await), before);

    // What may be minted, and the minted scope is what was asked.
    let r = api::mint(
        addr,
        &bound_admin.token,
        r#"{"role":"editor","workspaces":["ws_1"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["role"], "editor");
    assert_eq!(v["workspaces"], serde_json::json!(["ws_1"]));
    let r = api::mint(
        addr,
        &admin.token,
        r#"{"role":"reader","workspaces":["a","b"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["role"], "reader");

    // Listing: any unbound key; never a bound one.
    for k in [&admin, &editor, &reader] {
        api::list(addr, &k.token).await;
    }
    for k in [&bound_reader, &bound_editor, &bound_admin] {
        let r = api::get_with(addr, "/org/tokens", &k.token).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.error(), OUT_OF_SCOPE);
    }

    // Revoking another key: only an unbound admin.
    let victim = mint(&kg, Role::Reader, &[]).await;
    for k in [&editor, &reader, &bound_admin, &bound_reader] {
        let r = api::delete(addr, &k.token, &victim.id).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.error(), OUT_OF_SCOPE);
    }
    assert_eq!(api::get_with(addr, "/x", &victim.token).await.status, 200);
    let r = api::delete(addr, &admin.token, &victim.id).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api::get_with(addr, "/x", &victim.token).await.status, 401);

    // Revoking itself: any key.
    for k in [&reader, &bound_reader] {
        let r = api::delete(addr, &k.token, &k.id).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["revoked"], k.id.as_str());
        assert_eq!(api::get_with(addr, "/x", &k.token).await.status, 401);
    }
    // None of it reached the app except the one GET /x that was let in.
    assert_eq!(up.count(), 1);
    kg.stop().await;
}

#[tokio::test]
async fn two_keygates_on_one_redis_agree_on_a_scope() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let c = config(&up, &redis);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let admin = mint(&a, Role::Admin, &[]).await;

    let (id, token) = api::mint_ok(
        a.public_addr,
        &admin.token,
        r#"{"name":"zapier","role":"reader","workspaces":["ws_1"]}"#,
    )
    .await;
    let reader = Key { token, id };
    // On B: a reader bound to ws_1.
    let r = h1(&b, &reader, "GET", "/workspaces/ws_1/x").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.wait_for(1).await;
    assert_scope_headers(&seen[0], &reader, "reader", "ws_1", "on B");
    for (m, p) in [("POST", "/workspaces/ws_1/x"), ("GET", "/workspaces/ws_2")] {
        let r = h1(&b, &reader, m, p).await;
        assert_eq!(r.status, 403, "{m} {p}: {r:?}");
        assert_eq!(r.error(), OUT_OF_SCOPE);
    }
    // B lists it with its scope (through an unbound key).
    let listed = api::list(b.public_addr, &admin.token).await.json();
    let entry = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == reader.id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["role"], "reader");
    assert_eq!(entry["workspaces"], serde_json::json!(["ws_1"]));
    assert_eq!(up.count(), 1);
    a.stop().await;
    b.stop().await;
}
