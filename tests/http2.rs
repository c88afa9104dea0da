//! HTTP/2 with prior knowledge over cleartext (contract §3): every refusal
//! keygate answers carries the same status and the same JSON body as over
//! HTTP/1.1; requests RFC 9113 §8.1.1 calls malformed may instead be reset,
//! but are never answered 2xx and never reach the app. Allowed requests reach
//! the app as HTTP/1.1 with `host` = `:authority`, the principal header, no
//! Authorization, joined cookies and the request id.
//!
//! Requests hyper's client will not send (connection-specific headers,
//! arbitrary `:path` bytes) go through [`raw_h2`], a minimal frame writer.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::kg::{self, h2_client, h2_send, raw, Key, HOST};
use common::upstream::Upstream;
use http::{Method, Request};
use http_body_util::Full;
use keygate::auth::store::Store;
use keygate::RunHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PRINCIPAL: &str = "x-molecule-principal";

async fn start() -> (Upstream, RunHandle) {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    (up, kg)
}

/// An HTTP/2 request: `uri` is absolute (it gives `:scheme` and `:authority`)
/// or authority-form for CONNECT.
fn h2_req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("valid test request")
}

/// Send one HTTP/2 request on a fresh connection.
async fn h2(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let mut send = h2_client(addr).await;
    h2_send(&mut send, req).await
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"))
}

/// One refusal, expressed for both protocols.
struct Case {
    name: &'static str,
    h1: Vec<u8>,
    h2: Request<Full<Bytes>>,
    status: u16,
    /// RFC 9113 §8.1.1 malformed: a stream reset is an acceptable answer over HTTP/2.
    reset_ok: bool,
}

fn url(path: &str) -> String {
    format!("http://{HOST}{path}")
}

fn h1_get(path: &str, host: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

fn refusal_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (name, host) in [
        ("foreign authority", "evil.example"),
        ("suffix look-alike", "acme.moleculesai.app.evil.example"),
        ("prefix look-alike", "xacme.moleculesai.app"),
        ("other tenant", "globex.moleculesai.app"),
    ] {
        cases.push(Case {
            name,
            h1: h1_get("/api", host, ""),
            h2: h2_req(Method::GET, &format!("http://{host}/api"), &[]),
            status: 421,
            reset_ok: false,
        });
    }
    for path in [
        "/cp/admin",
        "/cp/admin/x",
        "//CP/Admin",
        "/cp/%61dmin",
        "/cp/admin.json",
        "/cp/administrator",
        "/CP//ADMIN?x=1",
    ] {
        cases.push(Case {
            name: "deny prefix",
            h1: h1_get(path, HOST, ""),
            h2: h2_req(Method::GET, &url(path), &[]),
            status: 403,
            reset_ok: false,
        });
    }
    // With a credential and another method: still 403.
    cases.push(Case {
        name: "deny prefix, POST with a bearer",
        h1: format!(
            "POST /cp/admin HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer app-token\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
        h2: h2_req(
            Method::POST,
            &url("/cp/admin"),
            &[("authorization", "Bearer app-token")],
        ),
        status: 403,
        reset_ok: false,
    });
    for path in [
        "/x/../cp/admin",
        "/x/%2e%2e/cp/admin",
        "/cp/./admin",
        "/cp%2fadmin",
        "/cp%2Fadmin",
        "/cp%5cadmin",
        "/cp/admin;x=1",
        "/cp;/admin",
        "/cp/%2561dmin",
        "/caf%C3%A9",
    ] {
        cases.push(Case {
            name: "ambiguous path",
            h1: h1_get(path, HOST, ""),
            h2: h2_req(Method::GET, &url(path), &[]),
            status: 400,
            reset_ok: true,
        });
    }
    for (name, auth) in [
        (
            "bad key checksum",
            "Bearer mok_notarealkeyatall0000000000000000000000000000000000",
        ),
        ("truncated key", "Bearer mok_abc"),
        ("key with another scheme", "Basic mok_abc"),
        ("key with two spaces", "Bearer  mok_abc"),
        ("key with trailing text", "Bearer mok_abc extra"),
    ] {
        let header = format!("Authorization: {auth}\r\n");
        cases.push(Case {
            name,
            h1: h1_get("/api", HOST, &header),
            h2: h2_req(Method::GET, &url("/api"), &[("authorization", auth)]),
            status: 401,
            reset_ok: false,
        });
    }
    // A well-formed key the store does not know.
    let unknown = keygate::auth::token::mint("mok_");
    let bearer = format!("Bearer {}", unknown.expose());
    cases.push(Case {
        name: "unknown well-formed key",
        h1: h1_get("/api", HOST, &format!("Authorization: {bearer}\r\n")),
        h2: h2_req(Method::GET, &url("/api"), &[("authorization", &bearer)]),
        status: 401,
        reset_ok: false,
    });
    let mut two_auth = h2_req(Method::GET, &url("/api"), &[]);
    two_auth
        .headers_mut()
        .append("authorization", "Bearer a".parse().unwrap());
    two_auth
        .headers_mut()
        .append("authorization", "Bearer b".parse().unwrap());
    cases.push(Case {
        name: "two authorization headers",
        h1: h1_get(
            "/api",
            HOST,
            "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
        ),
        h2: two_auth,
        status: 400,
        reset_ok: false,
    });
    cases.push(Case {
        name: "CONNECT",
        h1: format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").into_bytes(),
        h2: h2_req(Method::CONNECT, &format!("{HOST}:443"), &[]),
        status: 405,
        reset_ok: true,
    });
    cases
}

#[tokio::test]
async fn every_refusal_has_the_same_status_and_body_as_http1() {
    let (up, kg) = start().await;
    for case in refusal_cases() {
        let one = raw(kg.public_addr, &case.h1).await;
        assert_eq!(one.status, case.status, "{}: HTTP/1.1 {one:?}", case.name);
        let one_body = one.json();
        let one_id = one.header("x-request-id");
        assert!(
            one_id.is_some(),
            "{}: HTTP/1.1 without X-Request-Id",
            case.name
        );

        let uri = case.h2.uri().clone();
        match h2(kg.public_addr, case.h2).await {
            Ok((status, headers, body)) => {
                assert_eq!(
                    status, case.status,
                    "{} {uri}: HTTP/2 body {body:?}",
                    case.name
                );
                assert_eq!(json(&body), one_body, "{} {uri}: bodies differ", case.name);
                assert_eq!(
                    headers.get("content-type").map(|v| v.as_bytes()),
                    Some(&b"application/json"[..]),
                    "{} {uri}",
                    case.name
                );
                assert!(
                    headers.contains_key("x-request-id"),
                    "{} {uri}: HTTP/2 without X-Request-Id",
                    case.name
                );
                assert_eq!(
                    headers
                        .get("www-authenticate")
                        .map(|v| v.to_str().unwrap().to_string()),
                    one.header("www-authenticate"),
                    "{} {uri}: WWW-Authenticate differs",
                    case.name
                );
            }
            Err(e) => assert!(
                case.reset_ok,
                "{} {uri}: HTTP/2 stream failed ({e}) where a {} was due",
                case.name, case.status
            ),
        }
        assert_eq!(
            up.count(),
            0,
            "{} {uri}: the app saw a refused request",
            case.name
        );
    }
    kg.stop().await;
}

#[tokio::test]
async fn bad_key_gets_401_with_www_authenticate() {
    let (up, kg) = start().await;
    let (status, headers, body) = h2(
        kg.public_addr,
        h2_req(
            Method::GET,
            &url("/api"),
            &[("authorization", "bearer mok_wrong")],
        ),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 401);
    assert_eq!(
        json(&body),
        serde_json::json!({"error": "invalid or revoked org API key"})
    );
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"acme\", error=\"invalid_token\""
    );
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

/// HEAD answers keygate writes itself (refusals, the key API) carry GET's
/// status and fields, `Content-Length` included, and no DATA: content on a
/// HEAD response is a stream error for an HTTP/2 client (RFC 9113 §8.1.1).
/// HTTP/1.1 the same, on the wire.
#[tokio::test]
async fn head_answers_carry_no_content_on_both_protocols() {
    let (up, kg) = start().await;
    let key = kg::mint_key(&kg, None).await;
    let auth = format!("Bearer {}", key.token);
    let cases: [(&str, &str, u16); 4] = [
        ("/cp/admin/x", "", 403),
        ("/api", "Bearer mok_wrong", 401),
        ("/org/tokens", &auth, 200),
        ("/api/x", &auth, 200),
    ];
    for (path, authorization, status) in cases {
        let mut headers = vec![];
        if !authorization.is_empty() {
            headers.push(("authorization", authorization));
        }
        let get = h2(kg.public_addr, h2_req(Method::GET, &url(path), &headers))
            .await
            .expect("GET answer");
        let (got, fields, body) = h2(kg.public_addr, h2_req(Method::HEAD, &url(path), &headers))
            .await
            .unwrap_or_else(|e| panic!("HEAD {path} over HTTP/2: {e}"));
        assert_eq!((got, get.0), (status, status), "HEAD {path}");
        assert_eq!(body, "", "HEAD {path}");
        if path != "/api/x" {
            // keygate's own answers: GET's length, announced, not sent.
            assert_eq!(
                fields.get("content-length").and_then(|v| v.to_str().ok()),
                Some(get.2.len().to_string().as_str()),
                "HEAD {path}: {fields:?}"
            );
        }

        let extra = if authorization.is_empty() {
            String::new()
        } else {
            format!("Authorization: {authorization}\r\n")
        };
        let req =
            format!("HEAD {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n");
        let mut s = TcpStream::connect(kg.public_addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .expect("HTTP/1.1 answer within 10s")
            .unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text:?}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "HEAD {path} sent content: {text:?}"
        );
    }
    // Only the /api/x requests (GET and HEAD over HTTP/2, HEAD over HTTP/1.1) reached the app.
    assert_eq!(up.wait_for(3).await.len(), 3);
    kg.stop().await;
}

#[tokio::test]
async fn authority_disagreeing_with_host_is_400_and_agreeing_is_served() {
    let (up, kg) = start().await;
    for host in [
        "evil.example",
        "globex.moleculesai.app",
        "acme.moleculesai.app.evil",
    ] {
        let r = h2(
            kg.public_addr,
            h2_req(Method::GET, &url("/api"), &[("host", host)]),
        )
        .await;
        match r {
            Ok((status, headers, body)) => {
                assert_eq!(status, 400, "host {host}: {body:?}");
                let err = json(&body)["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(err.starts_with("bad request"), "host {host}: {err:?}");
                assert!(headers.contains_key("x-request-id"));
            }
            Err(e) => panic!("host {host}: a 400 was due, got a stream error: {e}"),
        }
    }
    // A served :authority with a served but different host is still a disagreement.
    assert_eq!(up.count(), 0, "a disagreeing host reached the app");

    // `host` equal to `:authority` (case and trailing dot aside) is fine.
    let (status, _, body) = h2(
        kg.public_addr,
        h2_req(Method::GET, &url("/same"), &[("host", HOST)]),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 200, "{body:?}");
    let seen = up.wait_for(1).await;
    assert_eq!(seen[0].headers.get_all("host").iter().count(), 1);
    assert_eq!(seen[0].headers["host"], HOST);
    kg.stop().await;
}

#[tokio::test]
async fn valid_key_is_forwarded_as_http1_with_principal_and_without_authorization() {
    let (up, kg) = start().await;
    let Key { token, id } = kg::mint_key(&kg, Some("http2")).await;
    let bearer = format!("Bearer {token}");
    let mut req = h2_req(
        Method::GET,
        &url("/api/x?y=1&z=%2F"),
        &[
            ("authorization", &bearer),
            ("x-molecule-principal", "org-key:forged"),
            ("X-Molecule-Principal", "org-key:forged2"),
            ("x_molecule_principal", "org-key:forged3"),
            ("x.molecule.principal", "org-key:forged4"),
            ("X_MOLECULE-principal", "org-key:forged5"),
        ],
    );
    req.headers_mut()
        .append("x-molecule-principal", "org-key:forged6".parse().unwrap());
    let (status, headers, body) = h2(kg.public_addr, req).await.expect("HTTP/2 answer");
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, "ok");
    assert_eq!(headers["x-upstream"], "yes");

    let seen = up.wait_for(1).await;
    let s = &seen[0];
    assert_eq!(s.version, http::Version::HTTP_11, "the app speaks HTTP/1.1");
    assert_eq!(
        s.uri.to_string(),
        "/api/x?y=1&z=%2F",
        "origin-form, byte for byte"
    );
    assert_eq!(s.headers.get_all("host").iter().count(), 1);
    assert_eq!(s.headers["host"], HOST, "host = :authority");
    assert_eq!(s.headers["x-forwarded-host"], HOST);
    assert_eq!(s.headers["x-forwarded-proto"], "http");
    assert!(s.headers.get("authorization").is_none(), "{:?}", s.headers);
    let principals: Vec<_> = s.headers.get_all(PRINCIPAL).iter().collect();
    assert_eq!(principals, vec![format!("org-key:{id}").as_str()]);
    for (name, _) in s.headers.iter() {
        let folded = name.as_str().replace(['_', '.'], "-");
        if folded == PRINCIPAL {
            assert_eq!(
                name.as_str(),
                PRINCIPAL,
                "a spoofed spelling survived: {name}"
            );
        }
    }
    kg.stop().await;
}

#[tokio::test]
async fn anonymous_request_loses_spoofed_principal_headers() {
    let (up, kg) = start().await;
    let (status, _, _) = h2(
        kg.public_addr,
        h2_req(
            Method::POST,
            &url("/anon"),
            &[
                ("x-molecule-principal", "org-key:forged"),
                ("x_molecule_principal", "org-key:forged"),
                ("x.Molecule.Principal", "org-key:forged"),
                ("authorization", "Bearer app-session-token"),
            ],
        ),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 200);
    let seen = up.wait_for(1).await;
    for (name, value) in seen[0].headers.iter() {
        assert_ne!(
            name.as_str().replace(['_', '.'], "-"),
            PRINCIPAL,
            "spoofed {name}: {value:?} reached the app"
        );
    }
    // A bearer without the key prefix is forwarded untouched (other_bearer = forward).
    assert_eq!(seen[0].headers["authorization"], "Bearer app-session-token");
    kg.stop().await;
}

#[tokio::test]
async fn multiple_cookie_headers_arrive_joined_into_one() {
    let (up, kg) = start().await;
    let mut req = h2_req(Method::GET, &url("/cookies"), &[]);
    for c in ["a=1", "b=2", "wos-session=xyz"] {
        req.headers_mut().append("cookie", c.parse().unwrap());
    }
    let (status, _, _) = h2(kg.public_addr, req).await.expect("HTTP/2 answer");
    assert_eq!(status, 200);
    let seen = up.wait_for(1).await;
    let cookies: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
    assert_eq!(
        cookies,
        vec!["a=1; b=2; wos-session=xyz"],
        "RFC 9113 §8.2.3"
    );
    kg.stop().await;
}

#[tokio::test]
async fn request_id_is_kept_and_echoed_or_generated() {
    let (up, kg) = start().await;
    let (status, headers, _) = h2(
        kg.public_addr,
        h2_req(Method::GET, &url("/rid"), &[("x-request-id", "req-h2-123")]),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], "req-h2-123");
    let seen = up.wait_for(1).await;
    assert_eq!(seen[0].headers["x-request-id"], "req-h2-123");

    let (status, headers, _) = h2(kg.public_addr, h2_req(Method::GET, &url("/rid2"), &[]))
        .await
        .expect("HTTP/2 answer");
    assert_eq!(status, 200);
    let generated = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    let seen = up.wait_for(2).await;
    assert_eq!(seen[1].headers["x-request-id"], generated.as_str());

    // Refusals carry it too, echoed when given.
    let (status, headers, _) = h2(
        kg.public_addr,
        h2_req(
            Method::GET,
            &url("/cp/admin"),
            &[("x-request-id", "req-h2-403")],
        ),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 403);
    assert_eq!(headers["x-request-id"], "req-h2-403");
    assert_eq!(up.count(), 2);
    kg.stop().await;
}

#[tokio::test]
async fn request_body_streams_to_the_app() {
    let (up, kg) = start().await;
    let token = kg::mint_key(&kg, Some("http2")).await.token;
    let body = Bytes::from(vec![b'x'; 300 * 1024]);
    let req = Request::builder()
        .method(Method::PUT)
        .uri(url("/upload"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(body))
        .unwrap();
    let (status, _, _) = h2(kg.public_addr, req).await.expect("HTTP/2 answer");
    assert_eq!(status, 200);
    let seen = up.wait_for(1).await;
    assert_eq!(seen[0].method, Method::PUT);
    assert_eq!(seen[0].body_len, 300 * 1024);
    kg.stop().await;
}

#[tokio::test]
async fn several_streams_on_one_connection() {
    let (up, kg) = start().await;
    let mut send = h2_client(kg.public_addr).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut s = send.clone();
        let path = if i % 2 == 0 {
            format!("/ok/{i}")
        } else {
            "/cp/admin".to_string()
        };
        tasks.push(tokio::spawn(async move {
            let r = h2_send(&mut s, h2_req(Method::GET, &url(&path), &[])).await;
            (path, r)
        }));
    }
    for t in tasks {
        let (path, r) = t.await.unwrap();
        let (status, _, _) = r.expect("answer");
        let want = if path == "/cp/admin" { 403 } else { 200 };
        assert_eq!(status, want, "{path}");
    }
    let seen = up.wait_for(4).await;
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.uri.path().starts_with("/ok/")));
    // The connection is still usable.
    let (status, _, _) = h2_send(&mut send, h2_req(Method::GET, &url("/after"), &[]))
        .await
        .expect("answer");
    assert_eq!(status, 200);
    kg.stop().await;
}

// ---- requests hyper's client refuses to send: raw frames -------------------------

/// What the server answered on stream 1.
#[derive(Debug, PartialEq)]
enum RawAnswer {
    Status(u16, String),
    Reset(u32),
    GoAway(u32),
    Closed,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut n: usize) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// Literal header fields without indexing, new names, no Huffman.
fn hpack_literal(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

fn read_int(block: &[u8], i: &mut usize, prefix_bits: u8) -> usize {
    let max = (1usize << prefix_bits) - 1;
    let mut n = (block[*i] as usize) & max;
    *i += 1;
    if n == max {
        let mut shift = 0;
        loop {
            let b = block[*i];
            *i += 1;
            n += ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    n
}

/// Huffman-decode a string of ASCII digits (RFC 7541 Appendix B: 0–2 are
/// five bits, 3–9 six bits); enough for a `:status` value.
fn huffman_digits(bytes: &[u8]) -> String {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |from: usize, n: usize| -> u32 {
        bits[from..from + n]
            .iter()
            .fold(0u32, |acc, b| (acc << 1) | *b as u32)
    };
    let mut out = String::new();
    let mut i = 0;
    while bits.len() - i >= 5 {
        let five = take(i, 5);
        if five <= 2 {
            out.push(char::from(b'0' + five as u8));
            i += 5;
        } else if bits.len() - i >= 6 && (0x19..=0x1f).contains(&take(i, 6)) {
            out.push(char::from(b'0' + 3 + (take(i, 6) - 0x19) as u8));
            i += 6;
        } else {
            break; // padding (all ones)
        }
    }
    out
}

/// The `:status` of a response header block (always its first field).
fn decode_status(block: &[u8]) -> u16 {
    let mut i = 0;
    while block[i] & 0xe0 == 0x20 {
        read_int(block, &mut i, 5); // dynamic table size update
    }
    let b = block[i];
    if b & 0x80 != 0 {
        let idx = read_int(block, &mut i, 7);
        return match idx {
            8 => 200,
            9 => 204,
            10 => 206,
            11 => 304,
            12 => 400,
            13 => 404,
            14 => 500,
            other => panic!("unexpected first header index {other}"),
        };
    }
    let name_idx = if b & 0x40 != 0 {
        read_int(block, &mut i, 6)
    } else {
        read_int(block, &mut i, 4)
    };
    assert!((8..=14).contains(&name_idx), "first field is not :status");
    let huffman = block[i] & 0x80 != 0;
    let len = read_int(block, &mut i, 7);
    let value = &block[i..i + len];
    let text = if huffman {
        huffman_digits(value)
    } else {
        String::from_utf8_lossy(value).to_string()
    };
    text.parse()
        .unwrap_or_else(|_| panic!("bad :status {text:?}"))
}

/// Open a prior-knowledge connection, send one request (HEADERS with
/// END_STREAM) built from raw header fields, return what came back.
async fn raw_h2(addr: SocketAddr, headers: &[(&str, &[u8])]) -> RawAnswer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(1, 0x1 | 0x4, 1, &hpack_literal(headers)));
    s.write_all(&out).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let mut status = None;
    let mut body = Vec::new();
    loop {
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match (kind, stream) {
                (4, 0) if flags & 1 == 0 => {
                    s.write_all(&frame(4, 1, 0, &[])).await.unwrap();
                }
                (7, 0) => {
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    return match status {
                        Some(st) => RawAnswer::Status(st, String::from_utf8_lossy(&body).into()),
                        None => RawAnswer::GoAway(code),
                    };
                }
                (3, 1) => {
                    return RawAnswer::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                (1, 1) => {
                    let mut block = payload.as_slice();
                    if flags & 0x8 != 0 {
                        let pad = block[0] as usize;
                        block = &block[1..block.len() - pad];
                    }
                    if flags & 0x20 != 0 {
                        block = &block[5..];
                    }
                    if status.is_none() {
                        status = Some(decode_status(block));
                    }
                    if flags & 1 != 0 {
                        return RawAnswer::Status(
                            status.unwrap(),
                            String::from_utf8_lossy(&body).into(),
                        );
                    }
                }
                (0, 1) => {
                    let mut data = payload.as_slice();
                    if flags & 0x8 != 0 {
                        let pad = data[0] as usize;
                        data = &data[1..data.len() - pad];
                    }
                    body.extend_from_slice(data);
                    if flags & 1 != 0 {
                        return RawAnswer::Status(
                            status.expect("DATA before HEADERS"),
                            String::from_utf8_lossy(&body).into(),
                        );
                    }
                }
                _ => {}
            }
        }
        let mut tmp = [0u8; 16384];
        let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
            .await
            .expect("an HTTP/2 answer within 10s")
            .unwrap_or(0);
        if n == 0 {
            return match status {
                Some(st) => RawAnswer::Status(st, String::from_utf8_lossy(&body).into()),
                None => RawAnswer::Closed,
            };
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Raw header fields of one request.
type Fields = Vec<(&'static str, &'static [u8])>;

fn base(path: &'static [u8]) -> Fields {
    vec![
        (":method", b"GET"),
        (":scheme", b"http"),
        (":authority", HOST.as_bytes()),
        (":path", path),
    ]
}

#[test]
fn huffman_digits_decode() {
    // "421" and "200" as an HPACK encoder (h2) writes them.
    assert_eq!(huffman_digits(&[0x68, 0x41]), "421");
    assert_eq!(huffman_digits(&[0x10, 0x01]), "200");
}

#[tokio::test]
async fn raw_frames_reach_the_app_when_well_formed() {
    // The raw client itself works: a plain request gets 200 from the app.
    let (up, kg) = start().await;
    let answer = raw_h2(kg.public_addr, &base(b"/raw-ok")).await;
    assert_eq!(answer, RawAnswer::Status(200, "ok".into()));
    let seen = up.wait_for(1).await;
    assert_eq!(seen[0].uri.path(), "/raw-ok");
    // A foreign :authority decodes as 421 through the same client.
    let mut h = base(b"/x");
    h[2] = (":authority", b"evil.example");
    match raw_h2(kg.public_addr, &h).await {
        RawAnswer::Status(421, body) => assert_eq!(
            json(&body),
            serde_json::json!({"error": "misdirected request: host not served by this tenant"})
        ),
        other => panic!("expected 421, got {other:?}"),
    }
    assert_eq!(up.count(), 1);
    kg.stop().await;
}

#[tokio::test]
async fn connection_specific_headers_and_bad_paths_are_refused() {
    let (up, kg) = start().await;
    let with = |extra: (&'static str, &'static [u8])| {
        let mut h = base(b"/api");
        h.push(extra);
        h
    };
    let cases: Vec<(&str, Fields)> = vec![
        (
            "transfer-encoding chunked",
            with(("transfer-encoding", b"chunked")),
        ),
        (
            "transfer-encoding gzip",
            with(("transfer-encoding", b"gzip, chunked")),
        ),
        ("connection", with(("connection", b"keep-alive"))),
        ("keep-alive", with(("keep-alive", b"timeout=5"))),
        ("upgrade h2c", with(("upgrade", b"h2c"))),
        ("te gzip", with(("te", b"gzip"))),
        ("backslash path", base(b"/cp\\admin")),
        ("NUL in path", base(b"/cp/admin\0")),
        ("space in path", base(b"/cp/admin x")),
        ("fragment", base(b"/cp/admin#x")),
        ("asterisk path", base(b"*")),
        ("no leading slash", base(b"cp/admin")),
        ("non-ASCII path", base("/cp/ädmin".as_bytes())),
        ("dot segment", base(b"/x/../cp/admin")),
        ("encoded slash", base(b"/cp%2fadmin")),
    ];
    for (name, headers) in cases {
        match raw_h2(kg.public_addr, &headers).await {
            RawAnswer::Status(status, body) => {
                assert!(
                    (400..500).contains(&status),
                    "{name}: got {status} {body:?}, expected a 4xx or a reset"
                );
                assert!(
                    json(&body)["error"].is_string(),
                    "{name}: refusal without a JSON error: {body:?}"
                );
            }
            RawAnswer::Reset(_) | RawAnswer::GoAway(_) | RawAnswer::Closed => {}
        }
        assert_eq!(up.count(), 0, "{name}: reached the app");
    }
    kg.stop().await;
}

#[tokio::test]
#[ignore = "KNOWN LIMIT (README): over HTTP/2 the h2/http crates drop a `#fragment` from :path before keygate sees it; the request is judged and forwarded without it (deny prefixes still apply). HTTP/1.1 fragments are refused (tests/http1.rs)."]
async fn fragment_in_path_is_refused_not_forwarded() {
    // Contract §3 step 1: a fragment → 400 (over HTTP/2 a reset is also acceptable:
    // '#' is not allowed in :path). The app never sees it, truncated or not.
    let (up, kg) = start().await;
    for path in [&b"/api#frag"[..], b"/x#/../cp/admin", b"/api?q=1#f"] {
        let mut h = base(b"/");
        h[3] = (":path", path);
        let shown = String::from_utf8_lossy(path).to_string();
        match raw_h2(kg.public_addr, &h).await {
            RawAnswer::Status(status, body) => {
                assert_eq!(status, 400, "{shown}: {body:?}");
            }
            RawAnswer::Reset(_) | RawAnswer::GoAway(_) | RawAnswer::Closed => {}
        }
        assert_eq!(
            up.count(),
            0,
            "{shown} reached the app as {:?}",
            up.seen()[0].uri
        );
    }
    kg.stop().await;
}

#[tokio::test]
async fn authority_forms() {
    let (up, kg) = start().await;
    // Served, case and trailing dot and port aside; forwarded as received.
    for authority in [
        "ACME.moleculesai.app.",
        "acme.moleculesai.app:8443",
        "Acme.MoleculesAI.app",
    ] {
        let n = up.count();
        let (status, _, body) = h2(
            kg.public_addr,
            h2_req(Method::GET, &format!("http://{authority}/authz"), &[]),
        )
        .await
        .expect("HTTP/2 answer");
        assert_eq!(status, 200, "{authority}: {body:?}");
        let seen = up.wait_for(n + 1).await;
        assert_eq!(seen[n].headers["host"], authority);
        assert_eq!(seen[n].headers["x-forwarded-host"], authority);
    }
    let served = up.count();

    // A lone `host` (no :authority) is the authority.
    let mut h = base(b"/hostonly");
    h.remove(2);
    h.push(("host", HOST.as_bytes()));
    assert_eq!(
        raw_h2(kg.public_addr, &h).await,
        RawAnswer::Status(200, "ok".into())
    );
    let seen = up.wait_for(served + 1).await;
    assert_eq!(seen[served].headers["host"], HOST);
    let served = served + 1;

    // Neither :authority nor host; userinfo; a foreign lone host.
    let mut none = base(b"/noauth");
    none.remove(2);
    let mut userinfo = base(b"/userinfo");
    userinfo[2] = (":authority", b"user@acme.moleculesai.app");
    let mut foreign = base(b"/foreignhost");
    foreign.remove(2);
    foreign.push(("host", b"evil.example"));
    for (name, headers, want) in [
        ("no authority", none, 400),
        ("userinfo", userinfo, 400),
        ("foreign lone host", foreign, 421),
    ] {
        match raw_h2(kg.public_addr, &headers).await {
            RawAnswer::Status(status, body) => {
                assert_eq!(status, want, "{name}: {body:?}");
                assert!(json(&body)["error"].is_string(), "{name}: {body:?}");
            }
            other => assert_eq!(want, 400, "{name}: {other:?} where a {want} was due"),
        }
    }
    assert_eq!(up.count(), served, "a refused authority reached the app");
    kg.stop().await;
}

#[tokio::test]
async fn limits_match_http1() {
    let (up, kg) = start().await;
    let long = format!("/{}", "a".repeat(9000));
    let one = raw(kg.public_addr, &kg::get(&long, "")).await;
    assert_eq!(one.status, 414);
    let (status, _, body) = h2(kg.public_addr, h2_req(Method::GET, &url(&long), &[]))
        .await
        .expect("HTTP/2 answer");
    assert_eq!(status, 414);
    assert_eq!(json(&body), one.json());

    let mut lines = String::new();
    let mut req = h2_req(Method::GET, &url("/many"), &[]);
    for i in 0..101 {
        lines.push_str(&format!("x-h{i}: v\r\n"));
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            http::HeaderValue::from_static("v"),
        );
    }
    let one = raw(kg.public_addr, &kg::get("/many", &lines)).await;
    assert_eq!(one.status, 431, "HTTP/1.1: 101 headers");
    match h2(kg.public_addr, req).await {
        Ok((status, _, body)) => {
            assert_eq!(status, 431, "HTTP/2: 101 headers: {body:?}");
            // HTTP/1.1's 431 here is the parser's bare answer (allowed by the
            // contract for a request the parser refuses); over HTTP/2 the
            // request parses and keygate answers it with its JSON error.
            assert!(
                body == one.body || json(&body)["error"] == "request header fields too large",
                "HTTP/2 431 body: {body:?}"
            );
        }
        Err(e) => panic!("101 headers over HTTP/2: a 431 was due, got {e}"),
    }

    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn head_over_64_kib_is_431_on_both_protocols() {
    let (up, kg) = start().await;
    let mut req = h2_req(Method::GET, &url("/big-head"), &[]);
    let big = "a".repeat(70 * 1024);
    req.headers_mut()
        .insert("x-big", http::HeaderValue::from_str(&big).unwrap());
    let one = raw(
        kg.public_addr,
        &kg::get("/big-head", &format!("x-big: {big}\r\n")),
    )
    .await;
    assert_eq!(one.status, 431, "HTTP/1.1: 70 KiB head");
    match h2(kg.public_addr, req).await {
        Ok((status, _, body)) => assert_eq!(status, 431, "HTTP/2: 70 KiB head: {body:?}"),
        Err(e) => panic!("70 KiB head over HTTP/2: a 431 was due, got {e}"),
    }
    assert_eq!(up.count(), 0, "an oversized head reached the app");
    kg.stop().await;
}

#[tokio::test]
async fn upstream_failure_matches_http1() {
    let closed = common::upstream::closed_port().await;
    let kg = kg::start(
        kg::config(format!("http://{closed}").parse().unwrap()),
        Store::memory("acme"),
    )
    .await;
    let one = raw(kg.public_addr, &kg::get("/api", "")).await;
    assert_eq!(one.status, 502, "{one:?}");
    let (status, headers, body) = h2(kg.public_addr, h2_req(Method::GET, &url("/api"), &[]))
        .await
        .expect("HTTP/2 answer");
    assert_eq!(status, 502);
    assert_eq!(json(&body), one.json());
    assert!(headers.contains_key("x-request-id"));
    kg.stop().await;
}

#[tokio::test]
async fn request_trailers_are_dropped() {
    let (up, kg) = start().await;
    let stream = TcpStream::connect(kg.public_addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-molecule-principal", "org-key:forged".parse().unwrap());
    trailers.insert("x-trailer", "t".parse().unwrap());
    use http_body_util::BodyExt;
    let body = Full::new(Bytes::from_static(b"payload")).with_trailers(Box::pin(async move {
        Some(Ok::<_, std::convert::Infallible>(trailers))
    }));
    let req = Request::builder()
        .method(Method::POST)
        .uri(url("/trailers"))
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let seen = up.wait_for(1).await;
    assert_eq!(seen[0].body_len, 7);
    assert!(seen[0].trailers.is_none(), "{:?}", seen[0].trailers);
    assert!(!seen[0].headers.contains_key("x-molecule-principal"));
    assert!(!seen[0].headers.contains_key("x-trailer"));
    kg.stop().await;
}

#[tokio::test]
async fn forwarding_headers_are_set_by_keygate_not_the_client() {
    let (up, kg) = start().await;
    // `:scheme` https on a cleartext listener: X-Forwarded-Proto is the listener's.
    let (status, _, _) = h2(
        kg.public_addr,
        h2_req(
            Method::GET,
            &format!("https://{HOST}/proto"),
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-for", "1.2.3.4"),
                ("forwarded", "for=1.2.3.4;proto=https"),
                ("x-forwarded-uri", "/cp/admin"),
                ("x-forwarded-prefix", "/cp"),
                ("x-original-url", "/cp/admin"),
                ("x-rewrite-url", "/cp/admin"),
            ],
        ),
    )
    .await
    .expect("HTTP/2 answer");
    assert_eq!(status, 200);
    let seen = up.wait_for(1).await;
    let h = &seen[0].headers;
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], HOST);
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "untrusted peer: replaced"
    );
    for dropped in [
        "forwarded",
        "x-forwarded-uri",
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(!h.contains_key(dropped), "{dropped} reached the app: {h:?}");
    }
    kg.stop().await;
}
