//! Contract §3 over HTTP/1.1, with raw bytes on real sockets: request target,
//! framing, Host, path, credential (steps 1–4) and forwarding hygiene (step 6).
//!
//! Every refused request is checked for its status, its JSON `error` where the
//! contract fixes the text, `content-type: application/json`, an
//! `X-Request-Id`, and that the app saw nothing (the upstream's count right
//! after the answer, then one final allowed request that must arrive alone).
//! Where the HTTP parser itself may answer ("the bare 400/414/431 the HTTP
//! parser sends for a request it cannot parse at all"), only the status and
//! the app seeing nothing are required; a JSON answer, when keygate gives one,
//! is still checked in full.
mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::kg::{self, raw, read_response, Key, RawResponse, HOST};
use common::upstream::{closed_port, Seen, Upstream};
use keygate::auth::store::Store;
use keygate::auth::MintRequest;
use keygate::config::{Config, ForwardPolicy};
use keygate::RunHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const AMBIGUOUS: &str = "bad request: ambiguous path";
const FORBIDDEN: &str = "forbidden";
const MISDIRECTED: &str = "misdirected request: host not served by this tenant";
const INVALID_KEY: &str = "invalid or revoked org API key";
const WWW_AUTHENTICATE: &str = r#"Bearer realm="acme", error="invalid_token""#;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// One recording upstream and one keygate in front of it.
struct Env {
    up: Upstream,
    kg: RunHandle,
}

impl Env {
    async fn start() -> Env {
        Env::with(|_| {}).await
    }

    async fn with(f: impl FnOnce(&mut Config)) -> Env {
        let up = Upstream::start().await;
        let mut config = kg::config(up.url());
        f(&mut config);
        let kg = kg::start(config, Store::memory("acme")).await;
        Env { up, kg }
    }

    async fn send(&self, bytes: &[u8]) -> RawResponse {
        raw(self.kg.public_addr, bytes).await
    }

    async fn mint(&self) -> Key {
        self.mint_expiring(None).await
    }

    async fn mint_expiring(&self, expires_at: Option<DateTime<Utc>>) -> Key {
        let req = MintRequest {
            name: Some("http1-test".into()),
            expires_at,
            enforce_ceiling: true,
            ..Default::default()
        };
        kg::mint_request(&self.kg, req).await
    }

    async fn revoke(&self, key: &Key) {
        let done = self
            .kg
            .app
            .auth
            .keys()
            .revoke(&key.id, &kg::op_ctx())
            .await
            .expect("revoke");
        assert!(done, "revoke found the key");
    }

    /// Send an allowed request; it must answer `200` and reach the app.
    /// Returns the response and what the app saw.
    async fn forwarded(&self, bytes: &[u8]) -> (RawResponse, Seen) {
        let before = self.up.count();
        let r = self.send(bytes).await;
        assert_eq!(
            r.status,
            200,
            "allowed request was not forwarded: {}\n-> {r:?}",
            show(bytes)
        );
        let seen = self.up.wait_for(before + 1).await;
        assert_eq!(
            seen.len(),
            before + 1,
            "one request, one upstream request: {}",
            show(bytes)
        );
        (r, seen[before].clone())
    }

    /// The app saw exactly `before` requests; then one final allowed request
    /// arrives, alone.
    async fn assert_nothing_forwarded(&self, before: usize, what: &str) {
        assert_eq!(
            self.up.count(),
            before,
            "a refused request reached the app: {what}"
        );
        let r = self.send(&kg::get("/final-probe", "")).await;
        assert_eq!(r.status, 200, "final probe after {what}: {r:?}");
        let seen = self.up.wait_for(before + 1).await;
        assert_eq!(
            seen.len(),
            before + 1,
            "the app saw more than the final probe after {what}"
        );
        assert_eq!(seen[before].uri.path(), "/final-probe");
    }

    /// Send `bytes`; keygate must refuse with `status` as JSON (and `error`
    /// when given), and the app must see nothing. Panics on a mismatch.
    async fn refused(&self, bytes: &[u8], status: u16, error: Option<&str>) -> RawResponse {
        self.check(bytes, status, error, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Table form of [`Env::refused`]: a mismatch is pushed to `failures`.
    async fn expect_refused(
        &self,
        failures: &mut Vec<String>,
        bytes: &[u8],
        status: u16,
        error: Option<&str>,
    ) -> Option<RawResponse> {
        self.check(bytes, status, error, false)
            .await
            .map_err(|e| failures.push(e))
            .ok()
    }

    /// Table form of [`Env::refused_maybe_bare`].
    async fn expect_bare(
        &self,
        failures: &mut Vec<String>,
        bytes: &[u8],
        status: u16,
        error: Option<&str>,
    ) -> Option<RawResponse> {
        self.check(bytes, status, error, true)
            .await
            .map_err(|e| failures.push(e))
            .ok()
    }

    /// Table form of [`Env::forwarded`]: `None` (and a pushed failure) when
    /// the request was not answered 200 by the app.
    async fn expect_forwarded(
        &self,
        failures: &mut Vec<String>,
        bytes: &[u8],
    ) -> Option<(RawResponse, Seen)> {
        let before = self.up.count();
        let r = self.send(bytes).await;
        if r.status != 200 {
            failures.push(format!(
                "{}\n    expected 200 from the app, got {:?} {:?}",
                show(bytes),
                r.head.lines().next().unwrap_or(""),
                r.body
            ));
            return None;
        }
        let seen = self.up.wait_for(before + 1).await;
        Some((r, seen[before].clone()))
    }

    /// The check behind [`Env::refused`]; `Err` describes the mismatch (for
    /// tables that report every failing case at once).
    async fn check(
        &self,
        bytes: &[u8],
        status: u16,
        error: Option<&str>,
        bare_ok: bool,
    ) -> Result<RawResponse, String> {
        let before = self.up.count();
        let r = self.send(bytes).await;
        let what = show(bytes);
        let problem = if bare_ok {
            bare_problem(&r, status, error)
        } else {
            refusal_problem(&r, status, error)
        };
        if let Some(p) = problem {
            return Err(format!(
                "{what}\n    expected {status}{}{}: {p}; got {:?} {:?}",
                if bare_ok { "" } else { " JSON" },
                error.map(|e| format!(" {e:?}")).unwrap_or_default(),
                r.head.lines().next().unwrap_or(""),
                r.body
            ));
        }
        // a refused request that was forwarded anyway shows up here, or in
        // the final probe of `assert_nothing_forwarded`
        let after = self.up.count();
        if after != before {
            return Err(format!("{what}\n    answered {status} but the app saw it"));
        }
        Ok(r)
    }
}

/// Panics listing every failed case of a table.
fn report(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.len() > 300 {
        format!(
            "{:?}… ({} bytes)",
            &s[..s.floor_char_boundary_compat(300)],
            s.len()
        )
    } else {
        format!("{s:?}")
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// What is wrong with `r` as keygate's JSON refusal, if anything.
fn refusal_problem(r: &RawResponse, status: u16, error: Option<&str>) -> Option<String> {
    if r.status != status {
        return Some(format!("status {} instead of {status}", r.status));
    }
    if r.header("content-type").as_deref() != Some("application/json") {
        return Some(format!(
            "content-type {:?} instead of application/json",
            r.header("content-type")
        ));
    }
    if r.header("x-request-id").is_none_or(|v| v.is_empty()) {
        return Some("no x-request-id".into());
    }
    let json: serde_json::Value = match serde_json::from_str(&r.body) {
        Ok(j) => j,
        Err(e) => return Some(format!("body is not JSON ({e})")),
    };
    let Some(got) = json["error"].as_str() else {
        return Some("no \"error\" string in the body".into());
    };
    match error {
        Some(e) if got != e => Some(format!("error {got:?} instead of {e:?}")),
        _ => None,
    }
}

/// Like [`refusal_problem`], but a bare (non-JSON) answer of the right status
/// from the HTTP parser is fine.
fn bare_problem(r: &RawResponse, status: u16, error: Option<&str>) -> Option<String> {
    if r.status != status {
        return Some(format!("status {} instead of {status}", r.status));
    }
    if r.header("content-type").as_deref() == Some("application/json") {
        return refusal_problem(r, status, error);
    }
    None
}

fn assert_json_refusal(r: &RawResponse, status: u16, error: Option<&str>, what: &str) {
    if let Some(p) = refusal_problem(r, status, error) {
        panic!("{what}: {p}\n{r:?}");
    }
}

/// A request line + Host + extra header lines, `Connection: close`.
fn req(method: &str, target: &str, extra: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// Header names that an app framework may fold into the principal header.
fn is_principal_spelling(name: &str) -> bool {
    name.to_ascii_lowercase().replace(['_', '.'], "-") == "x-molecule-principal"
}

fn principal_values(seen: &Seen) -> Vec<(String, String)> {
    seen.headers
        .iter()
        .filter(|(n, _)| is_principal_spelling(n.as_str()))
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect()
}

fn header_all(seen: &Seen, name: &str) -> Vec<String> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
        .collect()
}

/// One response with a `Content-Length` body (or none) from `s`, reading no
/// further than its end; `None` when the connection closes or 5 s pass first.
async fn try_read_response(s: &mut TcpStream) -> Option<RawResponse> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut r = RawResponse {
        status,
        head,
        body: String::new(),
    };
    let len: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout_at(deadline, s.read_exact(&mut body))
        .await
        .ok()?
        .ok()?;
    r.body = String::from_utf8_lossy(&body).to_string();
    Some(r)
}

/// Read until EOF or error (`true`) or until `deadline` (`false`); any bytes
/// that arrive meanwhile (a 408, say) are discarded.
async fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

// ---------------------------------------------------------------------------
// Step 1: request target
// ---------------------------------------------------------------------------

#[tokio::test]
async fn origin_form_is_forwarded() {
    let env = Env::start().await;
    let (r, seen) = env.forwarded(&req("GET", "/api/x?y=1&z", "")).await;
    assert_eq!(r.body, "ok");
    assert_eq!(seen.uri.to_string(), "/api/x?y=1&z");
    assert_eq!(seen.method, "GET");
    env.kg.stop().await;
}

#[tokio::test]
async fn absolute_form_naming_the_host_is_forwarded_as_origin_form() {
    let env = Env::start().await;
    let cases: &[(&str, &str, &str)] = &[
        ("http://acme.moleculesai.app/path?q", HOST, "/path?q"),
        (
            "http://acme.moleculesai.app/a/b?x=1&y=%2e",
            HOST,
            "/a/b?x=1&y=%2e",
        ),
        (
            "http://acme.moleculesai.app:8443/p",
            "acme.moleculesai.app:8443",
            "/p",
        ),
    ];
    for (target, host, expect) in cases {
        let bytes = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (_, seen) = env.forwarded(bytes.as_bytes()).await;
        assert_eq!(
            seen.uri.to_string(),
            *expect,
            "upstream target for {target}"
        );
        assert_eq!(header_all(&seen, "host"), vec![host.to_string()]);
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn bad_targets_are_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    let cases: &[&str] = &[
        // absolute-form naming another authority than Host
        "GET http://evil.com/path HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://acme.moleculesai.app.evil.com/ HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://evilacme.moleculesai.app/ HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://other.moleculesai.app/cp/x HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://acme.moleculesai.app/x HTTP/1.1\r\nHost: evil.com\r\n",
        // asterisk-form
        "OPTIONS * HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET * HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        // authority-form outside CONNECT
        "GET acme.moleculesai.app:443 HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "POST acme.moleculesai.app:80 HTTP/1.1\r\nHost: acme.moleculesai.app\r\nContent-Length: 0\r\n",
        // userinfo
        "GET http://u@acme.moleculesai.app/ HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://u:p@acme.moleculesai.app/x HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://acme.moleculesai.app@evil.com/ HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
    ];
    for head in cases {
        let bytes = format!("{head}Connection: close\r\n\r\n");
        env.expect_bare(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "bad targets").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn absolute_form_authority_must_equal_host_including_port() {
    // RFC 9112 §3.2.2: the app uses the target's authority, not Host; the
    // contract requires them to be equal, so a different port is a 400.
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for (target, host) in [
        (
            "http://acme.moleculesai.app:9999/x",
            "acme.moleculesai.app:8443",
        ),
        ("http://acme.moleculesai.app:9999/x", "acme.moleculesai.app"),
        ("http://acme.moleculesai.app/x", "acme.moleculesai.app:8443"),
    ] {
        let bytes = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        env.expect_refused(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "absolute-form port mismatch")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn bad_targets_are_answered_by_keygate_as_json() {
    // The parser accepts these; keygate must answer them itself.
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    let cases: &[&str] = &[
        "GET http://evil.com/path HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://acme.moleculesai.app/x HTTP/1.1\r\nHost: evil.com\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET acme.moleculesai.app:443 HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
        "GET http://u@acme.moleculesai.app/ HTTP/1.1\r\nHost: acme.moleculesai.app\r\n",
    ];
    for head in cases {
        let bytes = format!("{head}Connection: close\r\n\r\n");
        env.expect_refused(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "bad targets (json)")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn fragment_in_target_is_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for target in [
        "/api#frag",
        "/cp/admin#x",
        "/x?y=1#z",
        "http://acme.moleculesai.app/x#f",
        "/x#",
        "/#/cp/admin",
        "/x?#",
    ] {
        env.expect_refused(&mut failures, &req("GET", target, ""), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "fragments").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn connect_is_405() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for target in ["acme.moleculesai.app:443", "evil.com:443", "127.0.0.1:22"] {
        env.expect_refused(&mut failures, &req("CONNECT", target, ""), 405, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "CONNECT").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn target_over_8_kib_is_414() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    // exactly 8 KiB: allowed
    let at_limit = format!("/{}", "a".repeat(8191));
    assert_eq!(at_limit.len(), 8192);
    let (_, seen) = env.forwarded(&req("GET", &at_limit, "")).await;
    assert_eq!(seen.uri.to_string(), at_limit);
    let with_query = format!("/q?{}", "b".repeat(8189));
    assert_eq!(with_query.len(), 8192);
    env.forwarded(&req("GET", &with_query, "")).await;

    let before = env.up.count();
    for target in [
        format!("/{}", "a".repeat(8192)),
        format!("/q?{}", "b".repeat(8190)),
        format!("/{}", "a".repeat(20_000)),
        format!("/cp/admin/{}", "a".repeat(9000)),
    ] {
        env.expect_bare(&mut failures, &req("GET", &target, ""), 414, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "long targets").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn absolute_form_in_http_1_0_is_400() {
    let env = Env::start().await;
    let before = env.up.count();
    env.refused(
        format!("GET http://{HOST}/x HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        400,
        None,
    )
    .await;
    env.assert_nothing_forwarded(before, "HTTP/1.0 absolute-form")
        .await;
    env.kg.stop().await;
}

type Pipeline = (Vec<(String, String)>, Vec<u16>);

/// Send each pipeline in one write on a fresh connection; compare the
/// statuses (keygate may close after a refusal) and what reached the app.
async fn run_pipelines(env: &Env, cases: Vec<Pipeline>, failures: &mut Vec<String>) {
    for (requests, statuses) in cases {
        let targets: Vec<String> = requests.iter().map(|(t, _)| t.clone()).collect();
        let before = env.up.count();
        let mut bytes = String::new();
        for (t, extra) in &requests {
            bytes.push_str(&format!("GET {t} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n"));
        }
        let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        s.write_all(bytes.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        for _ in &targets {
            let Some(r) = try_read_response(&mut s).await else {
                failures.push(format!(
                    "pipelined {:?}: no answer {} (connection closed or 5s passed)",
                    targets
                        .iter()
                        .map(|t| &t[..t.len().min(12)])
                        .collect::<Vec<_>>(),
                    got.len() + 1
                ));
                break;
            };
            if r.status == 400 {
                assert_json_refusal(&r, 400, None, &format!("pipelined {targets:?}"));
            }
            got.push(r.status);
            // after a refusal keygate may close the connection
            if r.status >= 400 && r.header("connection").as_deref() == Some("close") {
                break;
            }
        }
        let short: Vec<_> = targets.iter().map(|t| &t[..t.len().min(12)]).collect();
        if got != statuses[..got.len()] {
            failures.push(format!(
                "pipelined {short:?}: statuses {got:?}, expected {statuses:?}"
            ));
        }
        let forwarded = got.iter().filter(|&&st| st == 200).count();
        let seen = env.up.wait_for(before + forwarded).await;
        if seen.len() != before + forwarded || env.up.count() != before + forwarded {
            failures.push(format!(
                "pipelined {short:?}: the app saw {:?}",
                seen[before..]
                    .iter()
                    .map(|s| s.uri.path().to_string())
                    .collect::<Vec<_>>()
            ));
        }
    }
}

fn plain(t: &str) -> (String, String) {
    (t.to_string(), String::new())
}

/// Requests pipelined in one write: each answer belongs to its own request
/// (a fragment or an oversized head flags only the request that has it).
#[tokio::test]
async fn pipelined_requests_are_judged_one_by_one() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let big = "a".repeat(60 * 1024);
    let huge = "a".repeat(65 * 1024);
    let big_header = format!("X-Big: {big}\r\n");
    let cases: Vec<Pipeline> = vec![
        (vec![plain("/b#x"), plain("/a")], vec![400, 200]),
        (
            vec![plain("/a"), plain("/cp/admin"), plain("/c")],
            vec![200, 403, 200],
        ),
        (
            vec![plain("/a"), plain("/x/../cp/admin"), plain("/c")],
            vec![200, 400, 200],
        ),
        (
            vec![plain("/a"), ("/big".into(), big_header.clone())],
            vec![200, 200],
        ),
        (
            vec![("/big".into(), big_header.clone()), plain("/a")],
            vec![200, 200],
        ),
        (
            vec![
                ("/big".into(), big_header.clone()),
                ("/big2".into(), big_header.clone()),
            ],
            vec![200, 200],
        ),
    ];
    run_pipelines(&env, cases, &mut failures).await;
    // an oversized head in a pipeline is refused, the small one before it is not
    let before = env.up.count();
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    s.write_all(
        format!(
            "GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /huge HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {huge}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = try_read_response(&mut s).await;
    assert_eq!(r.map(|r| r.status), Some(200));
    let r = try_read_response(&mut s).await;
    if r.as_ref().map(|r| r.status) != Some(431) {
        failures.push(format!(
            "pipelined /a + 65 KiB head: second answer {:?}",
            r.map(|r| r.head)
        ));
    }
    report(&failures);
    env.up.wait_for(before + 1).await;
    env.assert_nothing_forwarded(before + 1, "pipelined huge head")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn pipelined_fragment_is_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let cases: Vec<Pipeline> = vec![
        (
            vec![plain("/a"), plain("/b#x"), plain("/c")],
            vec![200, 400, 200],
        ),
        (
            vec![plain("/a"), plain("/c"), plain("/cp/admin#x")],
            vec![200, 200, 400],
        ),
    ];
    run_pipelines(&env, cases, &mut failures).await;
    report(&failures);
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 1: framing
// ---------------------------------------------------------------------------

const CHUNKED_BODY: &str = "5\r\nhello\r\n0\r\n\r\n";

#[tokio::test]
async fn valid_framing_is_forwarded() {
    let env = Env::start().await;
    let bytes = format!(
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{CHUNKED_BODY}"
    );
    let (_, seen) = env.forwarded(bytes.as_bytes()).await;
    assert_eq!(seen.body_len, 5);
    let bytes = format!(
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let (_, seen) = env.forwarded(bytes.as_bytes()).await;
    assert_eq!(seen.body_len, 5);
    env.kg.stop().await;
}

#[tokio::test]
async fn smuggling_shapes_are_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    let cases: &[&str] = &[
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: identity, chunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunkedx\r\n",
        "Transfer-Encoding: chunked;x=1\r\n",
        "Transfer-Encoding: \"chunked\"\r\n",
        "Transfer-Encoding : chunked\r\n",
        "Transfer-Encoding:\r\n",
        " Transfer-Encoding: chunked\r\n",
        "X-Pad: 1\r\n Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding:\x0bchunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 5a\r\n",
    ];
    for extra in cases {
        let bytes = format!(
            "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n{CHUNKED_BODY}"
        );
        env.expect_bare(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "smuggling shapes")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn transfer_codings_the_parser_accepts_get_keygate_json() {
    // hyper reads these bodies as chunked; keygate itself must refuse.
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for extra in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: identity, chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let bytes = format!(
            "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n{CHUNKED_BODY}"
        );
        env.expect_refused(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "transfer codings")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for extra in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 25\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let bytes = format!(
            "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n{CHUNKED_BODY}"
        );
        env.expect_bare(&mut failures, bytes.as_bytes(), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "CL + TE").await;
    env.kg.stop().await;
}

/// A refused request whose body is itself a request: after the refusal, the
/// body must never be read as a next request on the connection.
#[tokio::test]
async fn body_of_a_refused_request_is_not_a_second_request() {
    let env = Env::start().await;
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let chunked = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    let cases = [
        (
            "/cp/admin",
            String::new(),
            format!("Content-Length: {}\r\n", smuggled.len()),
            smuggled.clone(),
        ),
        (
            "/x",
            bearer("mok_bad"),
            format!("Content-Length: {}\r\n", smuggled.len()),
            smuggled.clone(),
        ),
        (
            "/cp/%2e%2e/x",
            String::new(),
            format!("Content-Length: {}\r\n", smuggled.len()),
            smuggled.clone(),
        ),
        (
            "/cp/admin",
            String::new(),
            "Transfer-Encoding: chunked\r\n".to_string(),
            chunked.clone(),
        ),
        (
            "/x",
            bearer("mok_bad"),
            "Transfer-Encoding: chunked\r\n".to_string(),
            chunked.clone(),
        ),
    ];
    for (path, cred, framing, body) in cases {
        let before = env.up.count();
        let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        let bytes = format!("POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{cred}{framing}\r\n{body}");
        s.write_all(bytes.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert!(
            r.status == 403 || r.status == 401 || r.status == 400,
            "{}: {r:?}",
            show(bytes.as_bytes())
        );
        // the next request on the connection (if it is still open)
        let after = format!("GET /after HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        if s.write_all(after.as_bytes()).await.is_ok() {
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            let rest = String::from_utf8_lossy(&rest);
            assert!(
                rest.matches("HTTP/1.1 ").count() <= 1,
                "more than one response after the refusal: {rest:?}"
            );
        }
        let seen = env.up.seen();
        assert!(
            seen[before..].iter().all(|s| s.uri.path() != "/smuggled"),
            "the refused request's body reached the app as a request: {}",
            show(bytes.as_bytes())
        );
    }
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 2: Host
// ---------------------------------------------------------------------------

fn with_host(host_lines: &str, target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn served_host_in_any_case_with_port_and_one_trailing_dot() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    for host in [
        "acme.moleculesai.app",
        "ACME.MOLECULESAI.APP",
        "Acme.MoleculesAI.App",
        "acme.moleculesai.app:8443",
        "acme.moleculesai.app:443",
        "acme.moleculesai.app:1",
        "acme.moleculesai.app.",
        "ACME.moleculesai.app.:8443",
    ] {
        let bytes = with_host(&format!("Host: {host}\r\n"), "/h");
        if let Some((_, seen)) = env.expect_forwarded(&mut failures, &bytes).await {
            // forwarded as received
            if header_all(&seen, "host") != vec![host.to_string()] {
                failures.push(format!(
                    "Host {host:?} reached the app as {:?}",
                    header_all(&seen, "host")
                ));
            }
        }
    }
    report(&failures);
    env.kg.stop().await;
}

#[tokio::test]
async fn missing_or_duplicated_host_is_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for lines in [
        "",
        "X-Host: acme.moleculesai.app\r\n",
        "Host: acme.moleculesai.app\r\nHost: acme.moleculesai.app\r\n",
        "Host: acme.moleculesai.app\r\nHost: evil.com\r\n",
        "Host: evil.com\r\nHost: acme.moleculesai.app\r\n",
        "host: acme.moleculesai.app\r\nHOST: acme.moleculesai.app\r\n",
    ] {
        env.expect_refused(&mut failures, &with_host(lines, "/x"), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "missing/duplicated Host")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn foreign_or_malformed_host_is_421() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for host in [
        "evil.com",
        "moleculesai.app",
        "other.moleculesai.app",
        "evilacme.moleculesai.app",
        "x.acme.moleculesai.app",
        ".acme.moleculesai.app",
        "acme.moleculesai.app.evil.com",
        "acme.moleculesai.app..",
        "acme.moleculesai.app..:443",
        "acme-moleculesai.app",
        "acme.moleculesai.appx",
        "acme.moleculesai.ap",
        "u@acme.moleculesai.app",
        "u:p@acme.moleculesai.app",
        "acme.moleculesai.app@evil.com",
        "acme.moleculesai.app:abc",
        "acme.moleculesai.app:80:80",
        "acme.moleculesai.app:-1",
        "acme.moleculesai.app/",
        "acme.moleculesai.app/x",
        "acme.moleculesai.app evil.com",
        "acme.moleculesai.app, evil.com",
        "",
        "localhost",
        "127.0.0.1",
        "[::1]",
        "[::1]:8443",
        "acme.moleculesai.app:443:",
        "acme.moleculesai.app%2e",
        "\u{0430}cme.moleculesai.app",
        "acme.moleculesai.app\u{3002}",
        "acme%2emoleculesai.app",
    ] {
        env.expect_refused(
            &mut failures,
            &with_host(&format!("Host: {host}\r\n"), "/x"),
            421,
            Some(MISDIRECTED),
        )
        .await;
    }
    // the Host check holds for every path, deny prefixes included
    env.expect_refused(
        &mut failures,
        &with_host("Host: evil.com\r\n", "/cp/admin"),
        421,
        Some(MISDIRECTED),
    )
    .await;
    report(&failures);
    env.assert_nothing_forwarded(before, "foreign hosts").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn extra_hosts_are_served_and_nothing_else() {
    let env = Env::with(|c| {
        c.tenant.extra_hosts = vec!["localhost".into(), "api.example.com".into()];
    })
    .await;
    let mut failures: Vec<String> = Vec::new();
    for host in [
        "acme.moleculesai.app",
        "localhost",
        "LOCALHOST:8080",
        "api.example.com",
        "API.Example.COM.",
        "api.example.com:443",
    ] {
        env.expect_forwarded(
            &mut failures,
            &with_host(&format!("Host: {host}\r\n"), "/x"),
        )
        .await;
    }
    let before = env.up.count();
    for host in [
        "example.com",
        "xapi.example.com",
        "api.example.com.evil.com",
        "localhost.evil.com",
        "evillocalhost",
        "127.0.0.1",
    ] {
        env.expect_refused(
            &mut failures,
            &with_host(&format!("Host: {host}\r\n"), "/x"),
            421,
            Some(MISDIRECTED),
        )
        .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "hosts beside extra_hosts")
        .await;
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 3: path
// ---------------------------------------------------------------------------

/// Paths refused 400 `bad request: ambiguous path`.
const AMBIGUOUS_PATHS: &[&str] = &[
    "/x/../cp/admin",
    "/./cp/admin",
    "/cp/./admin",
    "/cp/admin/..",
    "/cp/admin/.",
    "/..",
    "/.",
    "/a/./b",
    "/a/../b",
    "/cp/%2e%2e/admin",
    "/cp/%2E%2E/admin",
    "/cp/%2e/admin",
    "/a/%2e/b",
    "/a/.%2e/b",
    "/a/%2e./b",
    "/cp%2fadmin",
    "/cp%2Fadmin",
    "/cp%5cadmin",
    "/cp%5Cadmin",
    "/cp\\admin",
    "/cp;/admin",
    "/cp/admin;x",
    "/cp;x/admin",
    "/a;b",
    "/cp/%3badmin",
    "/cp/%252e",
    "/cp/%2561dmin",
    "/cp/admin%25",
    "/cp/admin%00",
    "/cp/admin%0a",
    "/cp/admin%0d%0a",
    "/cp/admin%7f",
    "/cp/admin%1f",
    "/cp/%C3%A9",
    "/cp/%c3%a9",
    "/cp/admin%80",
    "/cp/admin%ff",
    "/x%zz",
    "/x%2",
    "/x%",
    "/x%g0",
    "/cp/admin%23",
    "/cp/admin%3f",
    "/cp/admin%3F",
    "/x%2e",
    "/x.%2e",
    "/%2e%2e/cp/admin",
    "/a/%2e%2e%2fcp/admin",
];

/// Paths refused 403 `forbidden` (deny prefix `/cp/admin`).
const FORBIDDEN_PATHS: &[&str] = &[
    "/cp/admin",
    "/cp/admin/",
    "/cp/admin/x",
    "/cp/admin/x/y?z=1",
    "//cp/admin",
    "///cp//admin",
    "/cp//admin",
    "/CP/Admin",
    "/CP/ADMIN",
    "/cp/%61dmin",
    "/cp/%41dmin",
    "/%63p/admin",
    "/%63%70/%61%64%6d%69%6e",
    "/cp/admin.json",
    "/cp/administrator",
    "/cp/admin?x=1",
    "/cp/admin?",
    "/cp/admin-x",
    "/cp/admin~",
    "/cp/admin_",
    "/cp/admin%7e",
    "/cp/admin%2d",
];

/// Paths forwarded, byte for byte as sent.
const ALLOWED_PATHS: &[&str] = &[
    "/",
    "/cp/adm",
    "/cp/admi",
    "/cpx/admin",
    "/cp/xadmin",
    "/api/cp/admin",
    "/x/cp/admin",
    "/a%20b",
    "/a-b_c~d",
    "/org/tokensx",
    "/org/tokens-x",
    "/A//B/%41?q=%2e",
    "/x?y=../cp/admin",
    "/x?y=%2f%2e%2e%00%zz",
    "/x?/cp/admin",
    "/a%41b",
    "/a%7eb",
    "/a...b",
    "/...",
    "/a/.b/c.",
    "/.well-known/x",
    "/a:b@c!$&'()*+,=",
];

#[tokio::test]
async fn ambiguous_paths_are_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let key = env.mint().await;
    let before = env.up.count();
    for target in [
        "http://acme.moleculesai.app/cp/%2e%2e/admin",
        "http://acme.moleculesai.app/x/../cp/admin",
        "http://acme.moleculesai.app/cp%2fadmin",
    ] {
        env.expect_refused(&mut failures, &req("GET", target, ""), 400, Some(AMBIGUOUS))
            .await;
    }
    for path in AMBIGUOUS_PATHS {
        env.expect_refused(&mut failures, &req("GET", path, ""), 400, Some(AMBIGUOUS))
            .await;
        // whatever the credential
        env.expect_refused(
            &mut failures,
            &req("GET", path, &bearer(&key.token)),
            400,
            Some(AMBIGUOUS),
        )
        .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "ambiguous paths")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn raw_bytes_in_paths_are_400() {
    // Raw backslash and raw non-ASCII: keygate answers 400 `ambiguous path`;
    // the parser may refuse some of them first (bare 400).
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    let cases: Vec<Vec<u8>> = vec![
        b"/cp\\admin".to_vec(),
        b"/cp/\\admin".to_vec(),
        b"/\\cp\\admin".to_vec(),
        "/cp/é".as_bytes().to_vec(),
        "/cp/admin\u{00e9}".as_bytes().to_vec(),
        b"/cp/\xffadmin".to_vec(),
        b"/a\x80".to_vec(),
    ];
    for path in cases {
        let mut bytes = b"GET ".to_vec();
        bytes.extend_from_slice(&path);
        bytes.extend_from_slice(
            format!(" HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        env.expect_bare(&mut failures, &bytes, 400, Some(AMBIGUOUS))
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "raw bytes in paths")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn raw_backslash_is_answered_by_keygate() {
    // The contract lists a raw `\` among the ambiguous paths; it is a byte
    // the HTTP/1.1 parser accepts, so the answer is keygate's JSON.
    let env = Env::start().await;
    let before = env.up.count();
    env.refused(&req("GET", "/cp\\admin", ""), 400, Some(AMBIGUOUS))
        .await;
    env.assert_nothing_forwarded(before, "raw backslash").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn deny_prefix_paths_are_403() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for path in FORBIDDEN_PATHS {
        env.expect_refused(&mut failures, &req("GET", path, ""), 403, Some(FORBIDDEN))
            .await;
    }
    // absolute-form and HTTP/1.0 too
    env.expect_refused(
        &mut failures,
        &req("GET", "http://acme.moleculesai.app/cp/admin", ""),
        403,
        Some(FORBIDDEN),
    )
    .await;
    env.expect_refused(
        &mut failures,
        format!("GET /cp/admin HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        403,
        Some(FORBIDDEN),
    )
    .await;
    report(&failures);
    env.assert_nothing_forwarded(before, "deny-prefix paths")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn allowed_paths_reach_the_app_byte_for_byte() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    for path in ALLOWED_PATHS {
        if let Some((_, seen)) = env
            .expect_forwarded(&mut failures, &req("GET", path, ""))
            .await
        {
            if seen.uri != *path {
                failures.push(format!(
                    "{path:?} reached the app as {:?}",
                    seen.uri.to_string()
                ));
            }
        }
    }
    report(&failures);
    env.kg.stop().await;
}

#[tokio::test]
async fn deny_prefix_holds_for_every_method_and_credential() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let key = env.mint().await;
    let before = env.up.count();
    let credentials = [
        String::new(),
        bearer(&key.token),
        format!("Authorization: bearer {}\r\n", key.token),
        bearer("mok_notarealkey"),
        bearer("some-other-token"),
        "Authorization: Basic dXNlcjpwYXNz\r\n".to_string(),
        "Cookie: wos-session=abc\r\n".to_string(),
    ];
    for method in [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "get", "PROPFIND", "FOO",
    ] {
        for cred in &credentials {
            for path in ["/cp/admin", "/CP/admin/x", "//cp/%61dmin?x=1"] {
                let extra = format!("{cred}Content-Length: 0\r\n");
                let bytes = req(method, path, &extra);
                if method == "HEAD" {
                    let r = env.send(&bytes).await;
                    assert_eq!(r.status, 403, "{}: {r:?}", show(&bytes));
                    assert_eq!(
                        r.header("content-type").as_deref(),
                        Some("application/json")
                    );
                    assert!(r.header("x-request-id").is_some());
                    assert_eq!(env.up.count(), before, "{}", show(&bytes));
                } else {
                    env.expect_refused(&mut failures, &bytes, 403, Some(FORBIDDEN))
                        .await;
                }
            }
        }
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "deny prefix × methods × credentials")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn configured_deny_prefixes_use_the_matching_view() {
    let env = Env::with(|c| {
        c.policy.deny_prefixes = vec!["/cp/admin".into(), "/Internal/".into(), "/metrics".into()];
    })
    .await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for path in [
        "/internal/x",
        "/INTERNAL/",
        "//internal//x",
        "/%69nternal/x",
        "/metrics",
        "/Metrics?x",
        "/metricsx",
        "/cp/admin",
    ] {
        env.expect_refused(&mut failures, &req("GET", path, ""), 403, Some(FORBIDDEN))
            .await;
    }
    env.expect_refused(
        &mut failures,
        &req("GET", "/internal%2fx", ""),
        400,
        Some(AMBIGUOUS),
    )
    .await;
    report(&failures);
    env.assert_nothing_forwarded(before, "configured deny prefixes")
        .await;
    for path in ["/internal", "/internalx/y", "/x/internal/y", "/metric"] {
        env.expect_forwarded(&mut failures, &req("GET", path, ""))
            .await;
    }
    report(&failures);
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 4: credentials
// ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_key_is_forwarded_with_principal_and_without_authorization() {
    let env = Env::start().await;
    let key = env.mint().await;
    let principal = format!("org-key:{}", key.id);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (r, seen) = env
            .forwarded(&req(
                "GET",
                "/api/me",
                &format!("Authorization: {scheme} {}\r\n", key.token),
            ))
            .await;
        assert_eq!(r.body, "ok");
        assert_eq!(
            principal_values(&seen),
            vec![("x-molecule-principal".to_string(), principal.clone())],
            "scheme {scheme}"
        );
        assert!(
            seen.headers.get("authorization").is_none(),
            "Authorization forwarded with scheme {scheme}"
        );
    }
    // the key on a POST with a body
    let bytes = format!(
        "POST /api/x HTTP/1.1\r\nHost: {HOST}\r\n{}Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        bearer(&key.token)
    );
    let (_, seen) = env.forwarded(bytes.as_bytes()).await;
    assert_eq!(seen.body_len, 5);
    assert_eq!(header_all(&seen, "x-molecule-principal"), vec![principal]);
    env.kg.stop().await;
}

#[tokio::test]
async fn upstream_authorization_replaces_the_key() {
    let env = Env::with(|c| {
        c.upstream.authorization = Some(keygate::config::Secret::new("tenant-admin-secret"));
    })
    .await;
    let key = env.mint().await;
    let (_, seen) = env.forwarded(&req("GET", "/x", &bearer(&key.token))).await;
    assert_eq!(
        header_all(&seen, "authorization"),
        vec!["Bearer tenant-admin-secret".to_string()]
    );
    assert_eq!(
        header_all(&seen, "x-molecule-principal"),
        vec![format!("org-key:{}", key.id)]
    );
    env.kg.stop().await;
}

#[tokio::test]
async fn two_authorization_headers_are_400() {
    let env = Env::start().await;
    let mut failures: Vec<String> = Vec::new();
    let key = env.mint().await;
    let before = env.up.count();
    let k = &key.token;
    for extra in [
        format!("Authorization: Bearer {k}\r\nAuthorization: Bearer {k}\r\n"),
        format!("Authorization: Bearer {k}\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"),
        format!("Authorization: Basic dXNlcjpwYXNz\r\nauthorization: Bearer {k}\r\n"),
        "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n".to_string(),
        "Authorization: Bearer a\r\nAuthorization: \r\n".to_string(),
    ] {
        env.expect_refused(&mut failures, &req("GET", "/x", &extra), 400, None)
            .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "two Authorization headers")
        .await;
    env.kg.stop().await;
}

/// Change one character of the token's random part or checksum.
fn flip(token: &str, at: usize) -> String {
    let mut b = token.as_bytes().to_vec();
    b[at] = if b[at] == b'a' { b'b' } else { b'a' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn every_failed_key_is_the_same_401() {
    let env = Env::start().await;
    let key = env.mint().await;
    let k = key.token.as_str();
    let other = keygate::auth::token::mint("mok_");
    let other = other.expose();
    let len = k.len();
    let mut headers: Vec<String> = vec![
        format!("Authorization: Bearer  {k}\r\n"),
        format!("Authorization: Bearer {k}x\r\n"),
        format!("Authorization: Bearer {k}0\r\n"),
        format!("Authorization: Bearer\t{k}\r\n"),
        format!("Authorization: Bearer {k} x\r\n"),
        format!("Authorization: Bearer {k},x\r\n"),
        format!("Authorization: Bearer x,{k}\r\n"),
        format!("Authorization: Bearer x {k}\r\n"),
        format!("Authorization: Basic {k}\r\n"),
        format!("Authorization: Token {k}\r\n"),
        format!("Authorization: {k}\r\n"),
        format!("Authorization: Bearer \"{k}\"\r\n"),
        format!("Authorization: Bearer={k}\r\n"),
        format!("Authorization: Bearer {}\r\n", flip(k, 10)),
        format!("Authorization: Bearer {}\r\n", flip(k, 30)),
        format!("Authorization: Bearer {}\r\n", flip(k, len - 1)),
        format!("Authorization: Bearer {}\r\n", flip(k, len - 3)),
        format!("Authorization: Bearer {}\r\n", &k[..len - 1]),
        format!("Authorization: Bearer {}\r\n", &k[..len - 10]),
        format!("Authorization: Bearer {}\r\n", &k[..20]),
        "Authorization: Bearer mok_\r\n".to_string(),
        "Authorization: Bearer mok_x\r\n".to_string(),
        format!("Authorization: Bearer {other}\r\n"),
        format!(
            "Authorization: Bearer {}\r\n",
            k.to_ascii_uppercase().replacen("MOK_", "mok_", 1)
        ),
    ];
    headers.dedup();
    let mut bodies = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for h in &headers {
        let bytes = req("GET", "/api/x", h);
        let Some(r) = env
            .expect_refused(&mut failures, &bytes, 401, Some(INVALID_KEY))
            .await
        else {
            continue;
        };
        if r.header("www-authenticate").as_deref() != Some(WWW_AUTHENTICATE) {
            failures.push(format!(
                "{}\n    www-authenticate {:?}",
                show(&bytes),
                r.header("www-authenticate")
            ));
        }
        bodies.push((h.clone(), r.body.clone()));
    }
    for (h, b) in &bodies {
        if b != &bodies[0].1 {
            failures.push(format!(
                "body for {h:?} differs: {b:?} vs {:?}",
                bodies[0].1
            ));
        }
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "failed keys").await;
    // the valid key itself still works after all that
    env.forwarded(&req("GET", "/x", &bearer(k))).await;
    env.kg.stop().await;
}

#[tokio::test]
async fn key_followed_by_whitespace_is_401() {
    let env = Env::start().await;
    let key = env.mint().await;
    let mut failures: Vec<String> = Vec::new();
    let before = env.up.count();
    for tail in [" ", "\t", "  ", " \t "] {
        let h = format!("Authorization: Bearer {}{tail}\r\n", key.token);
        if let Some(r) = env
            .expect_refused(&mut failures, &req("GET", "/x", &h), 401, Some(INVALID_KEY))
            .await
        {
            if r.header("www-authenticate").as_deref() != Some(WWW_AUTHENTICATE) {
                failures.push(format!(
                    "{h:?}: www-authenticate {:?}",
                    r.header("www-authenticate")
                ));
            }
        }
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "key + trailing whitespace")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn revoked_key_is_401() {
    let env = Env::start().await;
    let key = env.mint().await;
    let keep = env.mint().await;
    env.forwarded(&req("GET", "/x", &bearer(&key.token))).await;
    env.revoke(&key).await;
    let before = env.up.count();
    let r = env
        .refused(
            &req("GET", "/x", &bearer(&key.token)),
            401,
            Some(INVALID_KEY),
        )
        .await;
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(WWW_AUTHENTICATE)
    );
    env.assert_nothing_forwarded(before, "revoked key").await;
    // other keys unaffected
    env.forwarded(&req("GET", "/x", &bearer(&keep.token))).await;
    env.kg.stop().await;
}

#[tokio::test]
async fn expired_key_is_401() {
    let env = Env::start().await;
    let expires = Utc::now() + chrono::Duration::milliseconds(800);
    let key = env.mint_expiring(Some(expires)).await;
    let bytes = req("GET", "/x", &bearer(&key.token));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut accepted_before = 0;
    let mut refused_after = 0;
    // Poll with requests until three sent after expires_at were refused.
    while refused_after < 3 {
        assert!(Instant::now() < deadline, "key never expired");
        let sent_at = Utc::now();
        let before = env.up.count();
        let r = env.send(&bytes).await;
        if sent_at > expires {
            assert_json_refusal(&r, 401, Some(INVALID_KEY), "a key past its expires_at");
            assert_eq!(
                r.header("www-authenticate").as_deref(),
                Some(WWW_AUTHENTICATE)
            );
            assert_eq!(
                env.up.count(),
                before,
                "an expired key's request reached the app"
            );
            refused_after += 1;
        } else if r.status == 200 {
            accepted_before += 1;
            env.up.wait_for(before + 1).await;
        } else {
            // Allow a little slack: keygate's cache counts the expiry on a
            // monotonic clock from the moment of its store look-up.
            let early = (expires - Utc::now()).num_milliseconds();
            assert!(
                r.status == 401 && early <= 50,
                "a live key was refused {early}ms before its expires_at: {r:?}"
            );
        }
        tokio::task::yield_now().await;
    }
    assert!(
        accepted_before > 0,
        "the key never worked before it expired"
    );
    let before = env.up.count();
    env.assert_nothing_forwarded(before, "expired key").await;
    env.kg.stop().await;
}

#[tokio::test]
async fn other_credentials_are_forwarded_untouched_by_default() {
    let env = Env::start().await;
    for value in [
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
        "Bearer some-other-token",
        "bearer x",
        "Basic dXNlcjpwYXNz",
        "Digest username=\"u\"",
        "Bearer MOK_notours",
    ] {
        let (_, seen) = env
            .forwarded(&req("GET", "/x", &format!("Authorization: {value}\r\n")))
            .await;
        assert_eq!(header_all(&seen, "authorization"), vec![value.to_string()]);
        assert!(principal_values(&seen).is_empty());
    }
    // no Authorization: forwarded, none added
    let (_, seen) = env.forwarded(&req("GET", "/x", "Cookie: s=1\r\n")).await;
    assert!(seen.headers.get("authorization").is_none());
    assert!(principal_values(&seen).is_empty());
    assert_eq!(header_all(&seen, "cookie"), vec!["s=1".to_string()]);
    env.kg.stop().await;
}

#[tokio::test]
async fn other_credentials_are_401_with_other_bearer_reject() {
    let env = Env::with(|c| c.auth.other_bearer = ForwardPolicy::Reject).await;
    let mut failures: Vec<String> = Vec::new();
    let key = env.mint().await;
    let before = env.up.count();
    for value in [
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
        "Bearer some-other-token",
        "Basic dXNlcjpwYXNz",
    ] {
        env.expect_refused(
            &mut failures,
            &req("GET", "/x", &format!("Authorization: {value}\r\n")),
            401,
            None,
        )
        .await;
    }
    report(&failures);
    env.assert_nothing_forwarded(before, "other_bearer = reject")
        .await;
    // keys and anonymous requests still pass
    env.forwarded(&req("GET", "/x", &bearer(&key.token))).await;
    env.forwarded(&req("GET", "/x", "")).await;
    env.kg.stop().await;
}

#[tokio::test]
async fn anonymous_is_401_with_anonymous_reject() {
    let env = Env::with(|c| c.auth.anonymous = ForwardPolicy::Reject).await;
    let mut failures: Vec<String> = Vec::new();
    let key = env.mint().await;
    let before = env.up.count();
    for extra in ["", "Cookie: wos-session=abc\r\n"] {
        env.expect_refused(&mut failures, &req("GET", "/x", extra), 401, None)
            .await;
    }
    assert_eq!(env.up.count(), before);
    // a key passes, another bearer passes (other_bearer = forward)
    env.forwarded(&req("GET", "/x", &bearer(&key.token))).await;
    env.forwarded(&req("GET", "/x", &bearer("other"))).await;
    report(&failures);
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 6: principal spoofing
// ---------------------------------------------------------------------------

const SPOOFS: &[&str] = &[
    "X-Molecule-Principal: org-key:evil1\r\n",
    "x-molecule-principal: org-key:evil2\r\nx-molecule-principal: org-key:evil3\r\n",
    "X_Molecule_Principal: org-key:evil4\r\n",
    "X.Molecule.Principal: org-key:evil5\r\n",
    "x-MOLECULE-principal: org-key:evil6\r\n",
    "X-Molecule_Principal: org-key:evil7\r\n",
    "x.molecule-principal: org-key:evil8\r\n",
];

#[tokio::test]
async fn spoofed_principal_never_reaches_the_app() {
    let env = Env::start().await;
    let key = env.mint().await;
    let all: String = SPOOFS.concat();
    let mut cases: Vec<String> = SPOOFS.iter().map(|s| s.to_string()).collect();
    cases.push(all.clone());
    cases.push(format!("Connection: X-Molecule-Principal\r\n{all}"));
    for spoof in &cases {
        // anonymous
        let (_, seen) = env.forwarded(&req("GET", "/x", spoof)).await;
        assert!(
            principal_values(&seen).is_empty(),
            "anonymous request with {spoof:?}: app saw {:?}",
            principal_values(&seen)
        );
        // another bearer
        let (_, seen) = env
            .forwarded(&req("GET", "/x", &format!("{spoof}{}", bearer("other"))))
            .await;
        assert!(principal_values(&seen).is_empty(), "{spoof:?}");
        // a key: exactly one, keygate's
        for extra in [
            format!("{spoof}{}", bearer(&key.token)),
            format!("{}{spoof}", bearer(&key.token)),
        ] {
            let (_, seen) = env.forwarded(&req("GET", "/x", &extra)).await;
            assert_eq!(
                principal_values(&seen),
                vec![(
                    "x-molecule-principal".to_string(),
                    format!("org-key:{}", key.id)
                )],
                "{extra:?}"
            );
        }
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn configured_principal_header_is_stripped_in_every_spelling() {
    let env = Env::with(|c| {
        c.auth.principal_header = http::HeaderName::from_static("x-tenant-user");
    })
    .await;
    let key = env.mint().await;
    let spoof = "X-Tenant-User: evil\r\nx_tenant_user: evil\r\nX.Tenant.User: evil\r\n\
                 X-TENANT-USER: evil\r\nConnection: X-Tenant-User\r\n";
    let is_spelling = |n: &str| n.to_ascii_lowercase().replace(['_', '.'], "-") == "x-tenant-user";
    let (_, seen) = env.forwarded(&req("GET", "/x", spoof)).await;
    let got: Vec<_> = seen
        .headers
        .keys()
        .filter(|n| is_spelling(n.as_str()))
        .collect();
    assert!(got.is_empty(), "anonymous request kept {got:?}");
    let (_, seen) = env
        .forwarded(&req("GET", "/x", &format!("{spoof}{}", bearer(&key.token))))
        .await;
    let got: Vec<_> = seen
        .headers
        .iter()
        .filter(|(n, _)| is_spelling(n.as_str()))
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(
        got,
        vec![("x-tenant-user".to_string(), format!("org-key:{}", key.id))]
    );
    env.kg.stop().await;
}

#[tokio::test]
async fn connection_cannot_remove_the_injected_principal() {
    let env = Env::start().await;
    let key = env.mint().await;
    for conn in [
        "Connection: X-Molecule-Principal\r\n",
        "Connection: keep-alive, x-molecule-principal\r\n",
        "Connection: X_Molecule_Principal, X.Molecule.Principal\r\n",
    ] {
        // `req` adds its own `Connection: close`; this is a second field
        let (_, seen) = env
            .forwarded(&req("GET", "/x", &format!("{conn}{}", bearer(&key.token))))
            .await;
        assert_eq!(
            header_all(&seen, "x-molecule-principal"),
            vec![format!("org-key:{}", key.id)],
            "{conn:?}"
        );
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn request_trailers_are_dropped() {
    let env = Env::start().await;
    let key = env.mint().await;
    for cred in [String::new(), bearer(&key.token)] {
        let bytes = format!(
            "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{cred}Transfer-Encoding: chunked\r\n\
             Trailer: X-Molecule-Principal, X-Other\r\nTE: trailers\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Molecule-Principal: org-key:evil\r\nX-Other: 1\r\n\r\n"
        );
        let (_, seen) = env.forwarded(bytes.as_bytes()).await;
        assert_eq!(seen.body_len, 5);
        assert!(
            seen.trailers.as_ref().is_none_or(|t| t.is_empty()),
            "the app saw trailers: {:?}",
            seen.trailers
        );
        let expected: Vec<String> = if cred.is_empty() {
            vec![]
        } else {
            vec![format!("org-key:{}", key.id)]
        };
        assert_eq!(header_all(&seen, "x-molecule-principal"), expected);
    }
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 6: hop-by-hop headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let env = Env::start().await;
    let bytes = format!(
        "GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close, X-Foo\r\nX-Foo: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers, deflate\r\nProxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic eDp5\r\nX-Keep: yes\r\n\r\n"
    );
    let (_, seen) = env.forwarded(bytes.as_bytes()).await;
    for name in [
        "x-foo",
        "keep-alive",
        "te",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} was forwarded: {:?}",
            seen.headers
        );
    }
    if let Some(c) = seen.headers.get("connection") {
        let c = c.to_str().unwrap_or("").to_ascii_lowercase();
        assert!(!c.contains("x-foo"), "Connection forwarded as {c}");
    }
    assert_eq!(header_all(&seen, "x-keep"), vec!["yes".to_string()]);
    env.kg.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_not_forwarded_and_served_as_http1() {
    let env = Env::start().await;
    let bytes = format!(
        "GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let (r, seen) = env.forwarded(bytes.as_bytes()).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{r:?}");
    assert_eq!(r.body, "ok");
    for name in ["upgrade", "http2-settings"] {
        assert!(seen.headers.get(name).is_none(), "{name} forwarded");
    }
    // other upgrades likewise
    let bytes = format!(
        "GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, close\r\nUpgrade: foo/1\r\n\r\n"
    );
    let (r, seen) = env.forwarded(bytes.as_bytes()).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(seen.headers.get("upgrade").is_none());
    env.kg.stop().await;
}

#[tokio::test]
async fn connection_cannot_remove_headers_keygate_sets() {
    let env = Env::start().await;
    let key = env.mint().await;
    let bytes = req(
        "GET",
        "/x",
        &format!(
            "Connection: X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto, X-Request-Id\r\n\
             X-Request-Id: rid-7\r\n{}",
            bearer(&key.token)
        ),
    );
    let (r, seen) = env.forwarded(&bytes).await;
    assert_eq!(header_all(&seen, "host"), vec![HOST.to_string()]);
    assert_eq!(
        header_all(&seen, "x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
    assert_eq!(
        header_all(&seen, "x-forwarded-host"),
        vec![HOST.to_string()]
    );
    assert_eq!(
        header_all(&seen, "x-forwarded-proto"),
        vec!["http".to_string()]
    );
    assert_eq!(header_all(&seen, "x-request-id"), vec!["rid-7".to_string()]);
    assert_eq!(r.header("x-request-id").as_deref(), Some("rid-7"));
    assert_eq!(
        header_all(&seen, "x-molecule-principal"),
        vec![format!("org-key:{}", key.id)]
    );
    env.kg.stop().await;
}

/// Framing and routing are never hop-by-hop: a `Connection` header naming
/// `Content-Length`, `Transfer-Encoding` or `Host` is refused (the
/// smuggling hole of dropping a Content-Length named in Connection).
#[tokio::test]
async fn connection_naming_framing_or_host_is_refused() {
    let env = Env::start().await;
    let before = env.up.count();
    for named in [
        "content-length",
        "Content-Length",
        "keep-alive, CONTENT-LENGTH",
        "transfer-encoding",
        "Host",
        "close,host",
    ] {
        let body = "POST /cp/admin/delete-tenant HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
        let bytes = format!(
            "POST /harmless HTTP/1.1\r\nHost: {HOST}\r\nConnection: {named}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = env
            .refused(
                bytes.as_bytes(),
                400,
                Some("bad request: connection header names content-length, transfer-encoding or host"),
            )
            .await;
        assert_eq!(r.header("connection").as_deref(), Some("close"), "{named}");
    }
    assert_eq!(env.up.count(), before, "the app saw nothing");
    env.kg.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_on_other_methods_is_not_forwarded() {
    let env = Env::start().await;
    let bytes = format!(
        "POST /x HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n"
    );
    let (r, seen) = env.forwarded(bytes.as_bytes()).await;
    assert!(r.head.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(seen.headers.get("upgrade").is_none());
    env.kg.stop().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned() {
    let env = Env::start().await;
    let (r, _) = env.forwarded(&req("GET", "/hop", "")).await;
    assert_eq!(r.body, "hop");
    assert_eq!(r.header("x-app").as_deref(), Some("kept"));
    assert!(r.header("x-secret-hop").is_none(), "{r:?}");
    assert!(r.header("keep-alive").is_none(), "{r:?}");
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Step 6: X-Forwarded-*, X-Request-Id
// ---------------------------------------------------------------------------

#[tokio::test]
async fn x_forwarded_for_is_replaced_for_an_untrusted_peer() {
    let env = Env::start().await;
    for extra in [
        "",
        "X-Forwarded-For: 1.2.3.4\r\n",
        "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n",
        "x-forwarded-for: 1.2.3.4, 9.9.9.9\r\n",
        "X-Forwarded-For: 127.0.0.1\r\n",
        "X-Forwarded-For: garbage\r\n",
    ] {
        let (_, seen) = env.forwarded(&req("GET", "/x", extra)).await;
        assert_eq!(
            header_all(&seen, "x-forwarded-for"),
            vec!["127.0.0.1".to_string()],
            "{extra:?}"
        );
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_is_appended_for_a_trusted_peer() {
    let env = Env::with(|c| {
        c.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (_, seen) = env
        .forwarded(&req("GET", "/x", "X-Forwarded-For: 1.2.3.4\r\n"))
        .await;
    assert_eq!(
        header_all(&seen, "x-forwarded-for").join(", "),
        "1.2.3.4, 127.0.0.1"
    );
    let (_, seen) = env.forwarded(&req("GET", "/x", "")).await;
    assert_eq!(
        header_all(&seen, "x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
    let (_, seen) = env
        .forwarded(&req(
            "GET",
            "/x",
            "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8, 9.9.9.9\r\n",
        ))
        .await;
    assert_eq!(
        header_all(&seen, "x-forwarded-for").join(", "),
        "1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"
    );
    env.kg.stop().await;
}

#[tokio::test]
async fn forwarded_host_and_proto_are_set_by_keygate() {
    let env = Env::start().await;
    for host in ["acme.moleculesai.app", "ACME.moleculesai.app:8443"] {
        let bytes = format!(
            "GET /x HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Host: evil.com\r\n\
             X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
        );
        let (_, seen) = env.forwarded(bytes.as_bytes()).await;
        assert_eq!(header_all(&seen, "host"), vec![host.to_string()]);
        assert_eq!(
            header_all(&seen, "x-forwarded-host"),
            vec![host.to_string()]
        );
        assert_eq!(
            header_all(&seen, "x-forwarded-proto"),
            vec!["http".to_string()]
        );
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn routing_headers_from_the_client_are_dropped() {
    let env = Env::start().await;
    let bytes = req(
        "GET",
        "/x",
        "Forwarded: for=1.2.3.4;host=evil.com;proto=https\r\nX-Forwarded-Uri: /cp/admin\r\n\
         X-Forwarded-Prefix: /cp/admin\r\nX-Original-URL: /cp/admin\r\nX-Rewrite-URL: /cp/admin\r\n\
         x-original-url: /cp/admin/x\r\nX-Keep: yes\r\n",
    );
    let (_, seen) = env.forwarded(&bytes).await;
    for name in [
        "forwarded",
        "x-forwarded-uri",
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(header_all(&seen, "x-keep"), vec!["yes".to_string()]);
    env.kg.stop().await;
}

#[tokio::test]
async fn x_request_id_is_kept_or_generated_and_echoed() {
    let env = Env::start().await;
    let (r, seen) = env
        .forwarded(&req("GET", "/x", "X-Request-Id: abc-123\r\n"))
        .await;
    assert_eq!(r.header("x-request-id").as_deref(), Some("abc-123"));
    assert_eq!(
        header_all(&seen, "x-request-id"),
        vec!["abc-123".to_string()]
    );

    let (r, seen) = env.forwarded(&req("GET", "/x", "")).await;
    let generated = r.header("x-request-id").expect("generated x-request-id");
    assert!(!generated.is_empty());
    assert_eq!(header_all(&seen, "x-request-id"), vec![generated.clone()]);
    let (r2, _) = env.forwarded(&req("GET", "/x", "")).await;
    assert_ne!(r2.header("x-request-id"), Some(generated), "ids are unique");

    // refusals echo the client's id too
    let r = env
        .refused(
            &req("GET", "/cp/admin", "X-Request-Id: refused-1\r\n"),
            403,
            Some(FORBIDDEN),
        )
        .await;
    assert_eq!(r.header("x-request-id").as_deref(), Some("refused-1"));
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Expect: 100-continue
// ---------------------------------------------------------------------------

#[tokio::test]
async fn refusals_come_without_100_continue() {
    let env = Env::start().await;
    let key = env.mint().await;
    let _ = key;
    let before = env.up.count();
    let cases: Vec<(String, String, u16)> = vec![
        ("/cp/admin".into(), String::new(), 403),
        ("/x".into(), bearer("mok_bad"), 401),
        ("/x".into(), bearer(&flip(&key.token, 10)), 401),
        ("/cp/%2e%2e/x".into(), String::new(), 400),
    ];
    for (path, cred, status) in &cases {
        let bytes = format!(
            "POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{cred}Content-Length: 5\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        s.write_all(bytes.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await;
        assert_json_refusal(&r, *status, None, &show(bytes.as_bytes()));
        assert!(
            !r.head.starts_with("HTTP/1.1 100"),
            "100 Continue before the refusal"
        );
    }
    // misdirected, with Expect
    let bytes = "POST /x HTTP/1.1\r\nHost: evil.com\r\nContent-Length: 5\r\n\
                 Expect: 100-continue\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    s.write_all(bytes.as_bytes()).await.unwrap();
    let r = read_response(&mut s).await;
    assert_json_refusal(&r, 421, Some(MISDIRECTED), bytes);
    env.assert_nothing_forwarded(before, "Expect refusals")
        .await;
    env.kg.stop().await;
}

#[tokio::test]
async fn allowed_expect_gets_100_continue_before_the_body() {
    let env = Env::start().await;
    let key = env.mint().await;
    for cred in [String::new(), bearer(&key.token)] {
        let before = env.up.count();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {HOST}\r\n{cred}Content-Length: 5\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        // the interim response, before any body byte was sent
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !buf.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout_at(deadline, s.read(&mut byte))
                .await
                .expect("100 Continue within 10s")
                .unwrap();
            assert!(
                n > 0,
                "closed before 100 Continue: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.push(byte[0]);
        }
        let interim = String::from_utf8_lossy(&buf).to_string();
        assert!(interim.starts_with("HTTP/1.1 100"), "got {interim:?}");
        s.write_all(b"hello").await.unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = env.up.wait_for(before + 1).await;
        assert_eq!(seen[before].body_len, 5);
    }
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// Limits and upstream failures
// ---------------------------------------------------------------------------

/// A bare-bones upstream for heads the recording upstream's own parser would
/// refuse (it allows 100 header fields, and keygate adds four): it reads one
/// head, records it, answers 200 `ok` and closes.
struct RawUpstream {
    addr: std::net::SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let h = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 8192];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    h.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).to_string());
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        RawUpstream { addr, heads }
    }

    fn count(&self) -> usize {
        self.heads.lock().unwrap().len()
    }
}

fn with_headers(n_extra: usize, value: &str) -> Vec<u8> {
    let mut s = format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n");
    for i in 0..n_extra {
        s.push_str(&format!("X-H-{i}: {value}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

#[tokio::test]
async fn header_count_limit_is_100() {
    let up = RawUpstream::start().await;
    let config = kg::config(format!("http://{}", up.addr).parse().unwrap());
    let kg = kg::start(config, Store::memory("acme")).await;
    // Host + Connection + 98 = 100 fields: allowed
    let r = raw(kg.public_addr, &with_headers(98, "v")).await;
    assert_eq!(r.status, 200, "100 header fields: {r:?}");
    assert_eq!(up.count(), 1);
    assert!(up.heads.lock().unwrap()[0].contains("x-h-97: v"));
    let mut failures: Vec<String> = Vec::new();
    for n in [99, 150, 1000] {
        let bytes = with_headers(n, "v");
        let r = raw(kg.public_addr, &bytes).await;
        if let Some(p) = bare_problem(&r, 431, None) {
            failures.push(format!("{} header fields: {p}", n + 2));
        }
        if up.count() != 1 {
            failures.push(format!("{} header fields reached the app", n + 2));
        }
    }
    report(&failures);
    let r = raw(kg.public_addr, &with_headers(0, "v")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 2, "only the final probe arrived");
    kg.stop().await;
}

/// Send each head; each must get 431 (bare allowed) and none may reach the
/// raw upstream. Then a small request must arrive alone.
async fn heads_refused_431(heads: Vec<Vec<u8>>) {
    let up = RawUpstream::start().await;
    let config = kg::config(format!("http://{}", up.addr).parse().unwrap());
    let kg = kg::start(config, Store::memory("acme")).await;
    let mut failures: Vec<String> = Vec::new();
    for bytes in heads {
        let r = raw(kg.public_addr, &bytes).await;
        if let Some(p) = bare_problem(&r, 431, None) {
            failures.push(format!("a {}-byte head: {p}", bytes.len()));
        }
        if up.count() != 0 {
            failures.push(format!("a {}-byte head reached the app", bytes.len()));
            up.heads.lock().unwrap().clear();
        }
    }
    report(&failures);
    let r = raw(kg.public_addr, &with_headers(0, "v")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1, "only the final probe arrived");
    kg.stop().await;
}

#[tokio::test]
async fn head_of_60_kib_passes() {
    let env = Env::start().await;
    let (_, seen) = env
        .forwarded(&with_headers(1, &"a".repeat(60 * 1024)))
        .await;
    assert_eq!(header_all(&seen, "x-h-0")[0].len(), 60 * 1024);
    env.kg.stop().await;
}

#[tokio::test]
async fn head_far_over_64_kib_is_431() {
    heads_refused_431(vec![
        with_headers(1, &"a".repeat(200 * 1024)),
        with_headers(1, &"a".repeat(1024 * 1024)),
    ])
    .await;
}

#[tokio::test]
async fn head_over_64_kib_is_431() {
    let base = with_headers(1, "").len();
    let just_over = with_headers(1, &"a".repeat(64 * 1024 - base + 1));
    assert_eq!(just_over.len(), 64 * 1024 + 1);
    heads_refused_431(vec![
        just_over,
        with_headers(1, &"a".repeat(65 * 1024)),
        with_headers(2, &"a".repeat(33 * 1024)),
        with_headers(1, &"a".repeat(80 * 1024)),
        with_headers(4, &"a".repeat(30 * 1024)),
    ])
    .await;
}

#[tokio::test]
async fn upstream_down_is_502_json() {
    let down = closed_port().await;
    let config = kg::config(format!("http://{down}").parse().unwrap());
    let kg = kg::start(config, Store::memory("acme")).await;
    let r = raw(
        kg.public_addr,
        &req("GET", "/x", "X-Request-Id: down-1\r\n"),
    )
    .await;
    assert_json_refusal(&r, 502, None, "upstream down");
    assert_eq!(r.header("x-request-id").as_deref(), Some("down-1"));
    kg.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504_json() {
    let env = Env::with(|c| c.upstream.timeout = Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = env.send(&req("GET", "/slow/2000", "")).await;
    assert_json_refusal(&r, 504, None, "slow upstream");
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "504 came after {:?}",
        started.elapsed()
    );
    env.kg.stop().await;
}

#[tokio::test]
async fn slowloris_is_disconnected_after_header_timeout() {
    let env = Env::with(|c| c.listen.header_timeout = Duration::from_millis(300)).await;
    // (a) a partial head, then silence
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    let started = Instant::now();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        closed_by(&mut s, started + Duration::from_secs(5)).await,
        "a partial head kept the connection open for 5s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed too early ({:?}): not the header timeout",
        started.elapsed()
    );

    // (b) a head trickled one header line every 50 ms: the limit is for the
    // whole head, not per read
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    let started = Instant::now();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = started + Duration::from_secs(5);
    let mut buf = [0u8; 1024];
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let closed = loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue,
            },
            _ = ticker.tick() => {
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    break true;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break false,
        }
    };
    assert!(closed, "a trickled head kept the connection open for 5s");
    assert_eq!(env.up.count(), 0, "the partial requests reached the app");
    env.kg.stop().await;
}

/// A keep-alive connection that has served one request.
async fn served_keep_alive(env: &Env) -> TcpStream {
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "{r:?}");
    s
}

#[tokio::test]
async fn idle_keep_alive_outlives_header_timeout() {
    let env = Env::with(|c| {
        c.listen.header_timeout = Duration::from_millis(300);
        c.listen.idle_timeout = Duration::from_secs(5);
    })
    .await;
    let mut s = served_keep_alive(&env).await;
    // idle for more than twice header_timeout: still open
    let idle_from = Instant::now();
    assert!(
        !closed_by(&mut s, idle_from + Duration::from_millis(700)).await,
        "an idle keep-alive connection was closed after {:?} (header_timeout 300ms, idle_timeout 5s)",
        idle_from.elapsed()
    );
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "second request on the connection: {r:?}");
    assert_eq!(env.up.count(), 2);
    env.kg.stop().await;
}

#[tokio::test]
async fn slowloris_after_a_request_on_keep_alive_is_disconnected() {
    let env = Env::with(|c| {
        c.listen.header_timeout = Duration::from_millis(300);
        c.listen.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let mut s = served_keep_alive(&env).await;
    let started = Instant::now();
    s.write_all(format!("GET /y HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())
        .await
        .unwrap();
    assert!(
        closed_by(&mut s, started + Duration::from_secs(5)).await,
        "a partial second head kept the connection open for 5s"
    );
    assert_eq!(env.up.count(), 1);
    env.kg.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_is_closed_after_idle_timeout() {
    let env = Env::with(|c| {
        c.listen.header_timeout = Duration::from_millis(300);
        c.listen.idle_timeout = Duration::from_millis(1000);
    })
    .await;
    let mut s = served_keep_alive(&env).await;
    let idle_from = Instant::now();
    assert!(
        closed_by(&mut s, idle_from + Duration::from_secs(6)).await,
        "idle connection still open after 6s (idle_timeout 1s)"
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(800),
        "closed after {:?}, before idle_timeout",
        idle_from.elapsed()
    );
    env.kg.stop().await;
}

/// Waits (bounded) until keygate reports `n` parked connections.
async fn wait_parked(env: &Env, n: i64) {
    let gauge = &env.kg.app.metrics.parked_connections;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge.get() != n {
        assert!(
            Instant::now() < deadline,
            "parked connections: {} (waited for {n})",
            gauge.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_then_served_again() {
    let env = Env::start().await;
    let key = env.mint().await;
    let mut s = served_keep_alive(&env).await;
    wait_parked(&env, 1).await;
    // Parked: the socket is open, the next requests (two, pipelined, one
    // with a key) are served as on any keep-alive connection.
    let two = format!(
        "GET /p1 HTTP/1.1\r\nHost: {HOST}\r\n{}\r\nGET /p2 HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
        bearer(&key.token)
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let first = read_response(&mut s).await;
    let second = read_response(&mut s).await;
    assert_eq!(
        (first.status, second.status),
        (200, 200),
        "{first:?} {second:?}"
    );
    let seen = env.up.wait_for(3).await;
    assert_eq!(seen[1].uri.path(), "/p1");
    assert_eq!(
        header_all(&seen[1], "x-molecule-principal"),
        vec![format!("org-key:{}", key.id)]
    );
    assert_eq!(seen[2].uri.path(), "/p2");
    assert!(principal_values(&seen[2]).is_empty());
    // And it parks again once idle; closing it takes it off the gauge.
    wait_parked(&env, 1).await;
    drop(s);
    wait_parked(&env, 0).await;
    env.kg.stop().await;
}

#[tokio::test]
async fn a_parked_connection_can_upgrade_to_a_websocket() {
    let env = Env::start().await;
    let mut s = served_keep_alive(&env).await;
    wait_parked(&env, 1).await;
    s.write_all(&ws_upgrade("/ws", "")).await.unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 101, "{r:?}");
    assert_echoed(&mut s, b"after parking").await;
    drop(s); // ends the tunnel (stop waits for open tunnels)
    env.kg.stop().await;
}

#[tokio::test]
async fn a_request_head_in_progress_is_never_parked() {
    let env = Env::with(|c| {
        c.listen.header_timeout = Duration::from_secs(10);
    })
    .await;
    let mut s = served_keep_alive(&env).await;
    wait_parked(&env, 1).await;
    // Half a head wakes the connection; the rest arrives well after the park
    // delay (keygate's own header timeout is 10s) and is still one request.
    s.write_all(format!("GET /slow HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())
        .await
        .unwrap();
    wait_parked(&env, 0).await;
    // Time has to pass for this case: three park delays with a head open.
    tokio::time::sleep(keygate::listener::PARK_AFTER * 3).await;
    assert_eq!(env.kg.app.metrics.parked_connections.get(), 0);
    s.write_all(b"X-Late: 1\r\n\r\n").await.unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = env.up.wait_for(2).await;
    assert_eq!(seen[1].uri.path(), "/slow");
    assert_eq!(header_all(&seen[1], "x-late"), vec!["1".to_string()]);
    env.kg.stop().await;
}

#[tokio::test]
async fn idle_fresh_connection_is_closed() {
    // A connection that never sent a byte: closed by the header timeout.
    let env = Env::with(|c| {
        c.listen.header_timeout = Duration::from_millis(300);
        c.listen.idle_timeout = Duration::from_millis(1000);
    })
    .await;
    let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_by(&mut s, started + Duration::from_secs(5)).await,
        "a silent connection stayed open for 5s"
    );
    env.kg.stop().await;
}

// ---------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------

fn ws_upgrade(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Writes `msg` into a tunnel to the echoing app and reads it back.
async fn assert_echoed(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < msg.len() {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("echo within 10s")
            .unwrap();
        assert!(n > 0, "tunnel closed");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, msg);
}

#[tokio::test]
async fn websocket_is_tunnelled_after_the_apps_101() {
    let env = Env::start().await;
    let key = env.mint().await;
    for cred in [String::new(), bearer(&key.token)] {
        let before = env.up.count();
        let mut s = TcpStream::connect(env.kg.public_addr).await.unwrap();
        s.write_all(&ws_upgrade("/ws", &cred)).await.unwrap();
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 101, "{r:?}");
        assert!(r
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
        let seen = env.up.wait_for(before + 1).await;
        if cred.is_empty() {
            assert!(principal_values(&seen[before]).is_empty());
        } else {
            assert_eq!(
                header_all(&seen[before], "x-molecule-principal"),
                vec![format!("org-key:{}", key.id)]
            );
            assert!(seen[before].headers.get("authorization").is_none());
        }
        for msg in [&b"hello through the tunnel"[..], b"second"] {
            assert_echoed(&mut s, msg).await;
        }
    }
    env.kg.stop().await;
}

#[tokio::test]
async fn refused_websocket_upgrades_never_reach_the_app() {
    let env = Env::start().await;
    let before = env.up.count();
    env.refused(&ws_upgrade("/cp/admin", ""), 403, Some(FORBIDDEN))
        .await;
    env.refused(&ws_upgrade("/CP/%61dmin/ws", ""), 403, Some(FORBIDDEN))
        .await;
    env.refused(
        &ws_upgrade("/ws", &bearer("mok_bad")),
        401,
        Some(INVALID_KEY),
    )
    .await;
    env.refused(&ws_upgrade("/ws/../cp/admin", ""), 400, Some(AMBIGUOUS))
        .await;
    let mut bytes = ws_upgrade("/ws", "");
    let s = String::from_utf8(bytes.clone()).unwrap();
    bytes = s.replace(HOST, "evil.com").into_bytes();
    env.refused(&bytes, 421, Some(MISDIRECTED)).await;
    assert_eq!(env.up.connections(), 0, "the app got a connection");
    env.assert_nothing_forwarded(before, "refused upgrades")
        .await;
    env.kg.stop().await;
}
