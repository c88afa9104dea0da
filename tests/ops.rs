//! Operating keygate (contract §1 `check`, §6 admin listener, §7 signals):
//! `/healthz`, `/readyz`, `/metrics` counters moving with the right outcome
//! labels, admin paths absent from the public listener; and, with the BUILT
//! binary, graceful shutdown on SIGTERM, a second SIGTERM exiting at once,
//! log output free of tokens, and `keygate check` exit codes and messages.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bin::{Serve, Served, BIN};
use common::kg::{self, get, raw, Key, RawResponse, HOST};
use common::upstream::Upstream;
use keygate::auth::store::Store;
use keygate::RunHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- admin listener (in-process) -------------------------------------------------

async fn admin_get(kg: &RunHandle, path: &str) -> RawResponse {
    let addr = kg.admin_addr.expect("admin listener");
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

async fn metrics(kg: &RunHandle) -> String {
    let r = admin_get(kg, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        r.head
    );
    r.body
}

/// The value of one sample, e.g. `keygate_requests_total{outcome="forwarded"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

fn outcome(label: &str) -> String {
    format!("keygate_requests_total{{outcome=\"{label}\"}}")
}

/// Every string value in a JSON document, by key, at any depth.
fn flatten(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            match v {
                serde_json::Value::String(s) => out.push((k.clone(), s.clone())),
                other => flatten(other, out),
            }
        }
    }
}

#[tokio::test]
async fn healthz_and_readyz_report_each_component() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;

    let r = admin_get(&kg, "/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");

    // The revocation feed may take a moment to come up: poll (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = admin_get(&kg, "/readyz").await;
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status, 200, "{r:?}");
    let mut states = Vec::new();
    flatten(&r.json(), &mut states);
    assert!(
        states.iter().any(|(k, v)| k == "store" && v == "ok"),
        "store state missing: {}",
        r.body
    );
    assert!(
        states
            .iter()
            .any(|(k, v)| k.contains("feed") && v == "live"),
        "revocation feed state missing: {}",
        r.body
    );
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn request_counters_move_by_exactly_one_per_outcome() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let labels = [
        "forwarded",
        "forbidden",
        "misdirected",
        "unauthorized",
        "bad_request",
        "store_unavailable",
        "upstream_error",
    ];
    let before = metrics(&kg).await;
    for l in labels {
        sample(&before, &outcome(l)); // present before any request
    }
    let count_before = sample(&before, "keygate_request_duration_seconds_count");

    let p = kg.public_addr;
    assert_eq!(raw(p, &get("/allowed", "")).await.status, 200);
    assert_eq!(raw(p, &get("/cp/admin", "")).await.status, 403);
    let foreign = b"GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    assert_eq!(raw(p, foreign).await.status, 421);
    let bad_key = "Authorization: Bearer mok_notavalidkey\r\n";
    assert_eq!(raw(p, &get("/api", bad_key)).await.status, 401);
    assert_eq!(raw(p, &get("/x/../cp/admin", "")).await.status, 400);

    let after = metrics(&kg).await;
    for (label, want) in [
        ("forwarded", 1.0),
        ("forbidden", 1.0),
        ("misdirected", 1.0),
        ("unauthorized", 1.0),
        ("bad_request", 1.0),
        ("store_unavailable", 0.0),
        ("upstream_error", 0.0),
    ] {
        let delta = sample(&after, &outcome(label)) - sample(&before, &outcome(label));
        assert_eq!(delta, want, "keygate_requests_total{{outcome=\"{label}\"}}");
    }
    assert_eq!(
        sample(&after, "keygate_request_duration_seconds_count") - count_before,
        5.0,
        "one duration observation per request"
    );
    assert!(after.contains("# TYPE keygate_request_duration_seconds histogram"));
    assert!(after.contains("keygate_request_duration_seconds_bucket{le=\"+Inf\"}"));
    assert_eq!(up.count(), 1);
    kg.stop().await;
}

#[tokio::test]
async fn cache_and_revocation_metrics_move() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let Key { token, id } = kg::mint_key(&kg, Some("ops")).await;
    let auth = format!("Authorization: Bearer {token}\r\n");

    let before = metrics(&kg).await;
    let hits0 = sample(&before, "keygate_auth_cache_hits_total");
    let misses0 = sample(&before, "keygate_auth_cache_misses_total");
    let revoked0 = sample(&before, "keygate_revocations_total");

    assert_eq!(raw(kg.public_addr, &get("/one", &auth)).await.status, 200);
    assert_eq!(raw(kg.public_addr, &get("/two", &auth)).await.status, 200);
    let mid = metrics(&kg).await;
    let hits = sample(&mid, "keygate_auth_cache_hits_total") - hits0;
    let misses = sample(&mid, "keygate_auth_cache_misses_total") - misses0;
    assert_eq!(hits + misses, 2.0, "one cache look-up per key request");
    assert!(hits >= 1.0, "the second request must be a cache hit");

    // A key may revoke itself through the keys API.
    let del = format!(
        "DELETE /org/tokens/{id} HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let r = raw(kg.public_addr, del.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["revoked"], id.as_str());

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = sample(&metrics(&kg).await, "keygate_revocations_total");
        if now > revoked0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keygate_revocations_total did not move after a revoke"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = raw(kg.public_addr, &get("/three", &auth)).await;
    assert_eq!(r.status, 401, "a revoked key still works: {r:?}");
    assert_eq!(up.count(), 2);
    kg.stop().await;
}

#[tokio::test]
async fn admin_paths_are_not_served_on_the_public_listener() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = raw(kg.public_addr, &get(path, "")).await;
        assert!(
            !r.body.contains("keygate_requests_total"),
            "{path} on the public listener served metrics"
        );
        // Forwarded to the app (it answers "ok") or refused — never keygate's own answer.
        if r.status == 200 {
            assert_eq!(
                r.header("x-upstream").as_deref(),
                Some("yes"),
                "{path}: {r:?}"
            );
            assert_eq!(r.body, "ok");
        } else {
            assert!(r.status >= 400, "{path}: {r:?}");
        }
    }
    let forwarded = up.count();
    // And the admin listener does not proxy anything.
    let r = admin_get(&kg, "/api/x").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(up.count(), forwarded);
    kg.stop().await;
}

// ---- the built binary ------------------------------------------------------------

/// `keygate serve` with the memory store and `shutdown_grace = <grace>`;
/// `extra` goes on under `[upstream]`.
async fn serve(upstream: SocketAddr, grace: &str, extra: &str, env: &[(&str, &str)]) -> Served {
    let mut serve = Serve::at(upstream)
        .listen(&format!("shutdown_grace = \"{grace}\"\n"))
        .rest(extra);
    for (k, v) in env {
        serve = serve.env(k, v);
    }
    serve.start().await
}

/// Send `GET <path>` and read the whole answer on a task; (status, body).
fn request_in_background(
    addr: SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<Result<(u16, String), String>> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
            .await
            .map_err(|_| "no answer within 30s".to_string())?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Poll until a new connection to `addr` is refused (bounded).
async fn wait_refused(addr: SocketAddr, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Instant::now(),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "new connections still accepted {within:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "10s", "", &[]).await;
    let in_flight = request_in_background(kg.public, "/slow/1500");
    up.wait_for(1).await; // the app has the request
    let signalled = Instant::now();
    kg.signal_term();

    wait_refused(kg.public, Duration::from_secs(1)).await;
    assert!(
        !in_flight.is_finished(),
        "the slow request ended before the listener closed"
    );
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, "ok");
    let exit = kg.exit_within(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "{}", kg.output());
    assert!(signalled.elapsed() < Duration::from_secs(10));
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_an_in_flight_http2_stream() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "10s", "", &[]).await;
    let mut h2 = kg::h2_client(kg.public).await;
    let in_flight = tokio::spawn(async move {
        let req = http::Request::builder()
            .uri(format!("http://{HOST}/slow/1200"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        kg::h2_send(&mut h2, req).await
    });
    up.wait_for(1).await;
    kg.signal_term();
    wait_refused(kg.public, Duration::from_secs(1)).await;
    let (status, _, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight HTTP/2 stream completes");
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(body, "ok");
    let exit = kg.exit_within(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "{}", kg.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "10s", "", &[]).await;
    let in_flight = request_in_background(kg.public, "/slow/800");
    up.wait_for(1).await;
    kg.signal("-INT");
    wait_refused(kg.public, Duration::from_secs(1)).await;
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, 200, "{body:?}");
    let exit = kg.exit_within(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "{}", kg.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_bounds_the_drain() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "1s", "", &[]).await;
    let in_flight = request_in_background(kg.public, "/slow/20000");
    up.wait_for(1).await;
    let signalled = Instant::now();
    kg.signal_term();
    let exit = kg.exit_within(Duration::from_secs(6)).await;
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "{}", kg.output());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1s grace"
    );
    let cut = in_flight.await.unwrap();
    assert!(!matches!(cut, Ok((200, _))), "{cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_do_not_hold_up_the_exit() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "20s", "", &[]).await;
    // One HTTP/1.1 keep-alive connection and one HTTP/2 connection, both idle.
    let mut idle = TcpStream::connect(kg.public).await.unwrap();
    let req = format!("GET /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    idle.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(kg::read_response(&mut idle).await.status, 200);
    let mut h2 = kg::h2_client(kg.public).await;
    let req = http::Request::builder()
        .uri(format!("http://{HOST}/h2-first"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, _, _) = kg::h2_send(&mut h2, req).await.expect("HTTP/2 answer");
    assert_eq!(status, 200);

    let signalled = Instant::now();
    kg.signal_term();
    let exit = kg.exit_within(Duration::from_secs(5)).await;
    assert_eq!(exit.code(), Some(0), "{}", kg.output());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "idle connections kept keygate alive for {:?}",
        signalled.elapsed()
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let up = Upstream::start().await;
    let mut kg = serve(up.addr, "30s", "", &[]).await;
    let in_flight = request_in_background(kg.public, "/slow/8000");
    up.wait_for(1).await;
    kg.signal_term();
    // The first signal is handled once new connections are refused.
    wait_refused(kg.public, Duration::from_secs(1)).await;
    let second = Instant::now();
    kg.signal_term();
    kg.exit_within(Duration::from_secs(3)).await;
    assert!(second.elapsed() < Duration::from_secs(3));
    // The in-flight request was cut, not answered.
    let cut = in_flight.await.unwrap();
    assert!(!matches!(cut, Ok((200, _))), "{cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_tokens_or_secrets() {
    let up = Upstream::start().await;
    let upstream_secret = "UpstreamAdminSecret-7c1e5a";
    let mut kg = serve(
        up.addr,
        "5s",
        "authorization = \"env:KG_TEST_UPSTREAM_SECRET\"\n\n[log]\nlevel = \"trace\"\nformat = \"json\"\n",
        &[("KG_TEST_UPSTREAM_SECRET", upstream_secret)],
    )
    .await;
    let well_formed = keygate::auth::token::mint("mok_");
    let well_formed = well_formed.expose().to_string();
    let bad = "mok_ThisIsNotAValidKeyButStillASecret0123456789abcdefABCDEF";
    let app_bearer = "app-bearer-secret-4f9d2b";
    let cookie = "wos-session=cookie-secret-93ab1e";

    let cases = [
        (format!("Authorization: Bearer {well_formed}\r\n"), 401),
        (format!("Authorization: Bearer {bad}\r\n"), 401),
        (
            format!("Authorization: bearer {well_formed}\r\nX-Molecule-Principal: x\r\n"),
            401,
        ),
        (
            format!("Authorization: Bearer {app_bearer}\r\nCookie: {cookie}\r\n"),
            200,
        ),
        (format!("Cookie: {cookie}\r\n"), 200),
    ];
    for (i, (headers, want)) in cases.iter().enumerate() {
        let extra = format!("{headers}X-Request-Id: log-capture-{i}\r\n");
        let r = raw(kg.public, &get("/api/logged", &extra)).await;
        assert_eq!(r.status, *want, "case {i}: {r:?}");
    }
    // A token in a query string: the access log records the path without it.
    let r = raw(
        kg.public,
        &get(
            &format!("/api/q?access_token={well_formed}"),
            "X-Request-Id: log-capture-q\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    // The keys API with a bad key.
    let r = raw(
        kg.public,
        &get("/org/tokens", &format!("Authorization: Bearer {bad}\r\n")),
    )
    .await;
    assert_eq!(r.status, 401);

    kg.signal_term();
    kg.exit_within(Duration::from_secs(10)).await;
    let log = kg.output();
    // The capture is real: the access log recorded the requests.
    for i in 0..cases.len() {
        assert!(
            log.contains(&format!("log-capture-{i}")),
            "no access log line for request {i}:\n{log}"
        );
    }
    // The access log records the path without its query string.
    let q_line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["request_id"] == "log-capture-q")
        .unwrap_or_else(|| panic!("no JSON access line for log-capture-q:\n{log}"));
    assert_eq!(q_line["path"], "/api/q", "{q_line}");
    assert_eq!(q_line["status"], 200, "{q_line}");
    assert_eq!(q_line["outcome"], "forwarded", "{q_line}");
    for (what, secret) in [
        ("well-formed token", well_formed.as_str()),
        ("well-formed token's secret part", &well_formed[12..]),
        ("bad token", bad),
        ("bad token's tail", &bad[12..]),
        ("app bearer", app_bearer),
        ("cookie", "cookie-secret-93ab1e"),
        ("upstream.authorization", upstream_secret),
    ] {
        assert!(
            !log.contains(secret),
            "the {what} appears in the log:\n{log}"
        );
    }
}

// ---- keygate check ---------------------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn check(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("check").arg("--config").arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run keygate check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_reports_every_mistake_by_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        "[listen]\naddr = \"nowhere\"\n\n[upstream]\nurl = \"http://127.0.0.1:8080\"\ntimeout = \"soon\"\n\n\
         [tenant]\nslug = \"acme\"\ncolour = \"blue\"\n\n[store]\nbackend = \"memory\"\n",
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(2), "stdout {stdout:?} stderr {stderr:?}");
    let output = format!("{stdout}{stderr}");
    let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 3, "{output}");
    for key in ["listen.addr", "upstream.timeout", "tenant.colour"] {
        assert_eq!(
            errors.iter().filter(|l| l.contains(key)).count(),
            1,
            "no single error line names {key}: {errors:?}"
        );
    }
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "TenantAdminToken-d41d8cd98f";
    let path = write(
        dir.path(),
        "good.toml",
        "[upstream]\nurl = \"http://127.0.0.1:8080\"\nauthorization = \"env:KG_CHECK_SECRET\"\n\n\
         [tenant]\nslug = \"acme\"\n\n[store]\nbackend = \"memory\"\n",
    );
    let (code, stdout, stderr) = check(&path, &[("KG_CHECK_SECRET", secret)]);
    assert_eq!(code, Some(0), "stderr {stderr:?}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "the secret was printed"
    );
    let auth_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("authorization"))
        .unwrap_or_else(|| panic!("no upstream.authorization in:\n{stdout}"));
    assert!(auth_line.contains("[redacted]"), "{auth_line}");
    // The effective config: defaults filled in, and it is valid TOML.
    let parsed: toml::Table = stdout.parse().expect("check prints TOML");
    assert_eq!(parsed["tenant"]["slug"].as_str(), Some("acme"));
    assert_eq!(parsed["tenant"]["domain"].as_str(), Some("moleculesai.app"));
    assert_eq!(
        parsed["upstream"]["url"].as_str(),
        Some("http://127.0.0.1:8080")
    );
    assert!(parsed["listen"].get("shutdown_grace").is_some(), "{stdout}");

    // Without the variable: a config error naming the key, exit 2.
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("upstream.authorization")),
        "{stderr}"
    );
}

#[test]
fn check_prints_header_names_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "headers.toml",
        "[upstream]\nurl = \"http://127.0.0.1:8080\"\n\n[tenant]\nslug = \"acme\"\n\n\
         [auth]\nprincipal_header = \"X-Acme-Principal\"\nrole_header = \"x-acme-ROLE\"\n\n\
         [store]\nbackend = \"memory\"\n",
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(0), "stderr {stderr:?}");
    for line in [
        // as the operator wrote them
        "principal_header = \"X-Acme-Principal\"",
        "role_header = \"x-acme-ROLE\"",
        // defaults: as the contract writes them
        "workspaces_header = \"X-Molecule-Key-Workspaces\"",
        "expiry_header = \"X-Molecule-Key-Expires\"",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "{line} in\n{stdout}"
        );
    }
}

#[test]
fn check_refuses_an_unreadable_tls_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let path = write(
        dir.path(),
        "tls.toml",
        &format!(
            "[listen.tls]\ncert = \"{c}\"\nkey = \"{c}\"\n\n[upstream]\nurl = \"http://127.0.0.1:8080\"\n\n\
             [tenant]\nslug = \"acme\"\n\n[store]\nbackend = \"memory\"\n",
            c = missing.display()
        ),
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("listen.tls")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A readable file that is not a certificate is refused the same way.
    let junk = write(dir.path(), "junk.pem", "not a certificate\n");
    let path = write(
        dir.path(),
        "tls2.toml",
        &format!(
            "[listen.tls]\ncert = \"{c}\"\nkey = \"{c}\"\n\n[upstream]\nurl = \"http://127.0.0.1:8080\"\n\n\
             [tenant]\nslug = \"acme\"\n\n[store]\nbackend = \"memory\"\n",
            c = junk.display()
        ),
    );
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("listen.tls")),
        "{stderr}"
    );
}

// ---- refused keys in the log (issue 17) ---------------------------------------------

/// The JSON access line with `request_id`, from a finished process's output.
fn access_line(log: &str, request_id: &str) -> serde_json::Value {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "keygate::access" && v["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no access line for {request_id}:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_keys_are_logged_with_reason_prefix_and_key_id() {
    let redis = common::redis::RedisServer::start();
    let up = Upstream::start().await;
    let mut kg = Serve::at(up.addr)
        .store(&format!("url = \"{}\"", redis.url()))
        .rest("\n[log]\nformat = \"json\"\n")
        .start()
        .await;
    let cfg = kg.config.display().to_string();
    let mint = |extra: &'static [&'static str]| {
        let cfg = cfg.clone();
        async move {
            let mut args = vec!["keys", "mint", "--config", cfg.as_str(), "--json"];
            args.extend_from_slice(extra);
            let o = common::bin::run(&args, &[]).await;
            assert!(o.status.success(), "{o:?}");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            (
                v["auth_token"].as_str().unwrap().to_string(),
                v["id"].as_str().unwrap().to_string(),
            )
        }
    };
    let (revoked, revoked_id) = mint(&[]).await;
    let (expiring, expiring_id) = mint(&["--expires-in", "1s"]).await;
    let o = common::bin::run(&["keys", "revoke", "--config", &cfg, &revoked_id], &[]).await;
    assert!(o.status.success(), "{o:?}");

    let unknown = keygate::auth::token::mint("mok_").expose().to_string();
    let mut typo = unknown.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let cases: [(&str, String, &str, Option<&str>); 5] = [
        ("malformed", "Bearer mok_short".into(), "mok_short", None),
        ("bad_checksum", format!("Bearer {typo}"), &typo[..12], None),
        ("unknown", format!("Bearer {unknown}"), &unknown[..12], None),
        (
            "revoked",
            format!("Bearer {revoked}"),
            &revoked[..12],
            Some(&revoked_id),
        ),
        (
            "malformed",
            format!("Bearer  {unknown}"),
            &unknown[..12],
            None,
        ),
    ];
    for (i, (_, auth, _, _)) in cases.iter().enumerate() {
        let extra = format!("Authorization: {auth}\r\nX-Request-Id: refused-{i}\r\n");
        let r = raw(kg.public, &get("/api", &extra)).await;
        assert_eq!(r.status, 401, "case {i}: {r:?}");
        assert_eq!(r.json()["error"], "invalid or revoked org API key");
    }
    // The expiring key: poll (bounded) until its expiry refuses it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    let expired_rid = loop {
        n += 1;
        let rid = format!("expiring-{n}");
        let extra = format!("Authorization: Bearer {expiring}\r\nX-Request-Id: {rid}\r\n");
        let r = raw(kg.public, &get("/api", &extra)).await;
        if r.status == 401 {
            break rid;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "the 1s key still works after 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let metrics = raw(
        kg.admin,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .body;
    for (reason, want) in [
        ("malformed", 2.0),
        ("bad_checksum", 1.0),
        ("unknown", 1.0),
        ("revoked", 1.0),
        ("expired", 1.0),
        ("other_tenant", 0.0),
    ] {
        let series = format!("keygate_key_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), want, "{series}\n{metrics}");
    }

    kg.signal_term();
    kg.exit_within(Duration::from_secs(10)).await;
    let log = kg.output();
    for (i, (reason, _, prefix, key_id)) in cases.iter().enumerate() {
        let line = access_line(&log, &format!("refused-{i}"));
        assert_eq!(line["status"], 401, "{line}");
        assert_eq!(line["outcome"], "unauthorized", "{line}");
        assert_eq!(line["refusal"], *reason, "case {i}: {line}");
        assert_eq!(line["prefix"], *prefix, "case {i}: {line}");
        match key_id {
            Some(id) => assert_eq!(line["key_id"], *id, "case {i}: {line}"),
            None => assert!(line["key_id"].is_null(), "case {i}: {line}"),
        }
    }
    let line = access_line(&log, &expired_rid);
    assert_eq!(line["refusal"], "expired", "{line}");
    assert_eq!(line["prefix"], &expiring[..12], "{line}");
    assert_eq!(line["key_id"], expiring_id.as_str(), "{line}");
    // Never more of a token than its prefix.
    for t in [&unknown, &typo, &revoked, &expiring] {
        assert!(
            !log.contains(&t[12..]),
            "a token's secret part is in the log"
        );
    }
}

/// Poll `/readyz` on the admin listener until it answers `want` (bounded).
async fn wait_readyz(admin: SocketAddr, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = raw(
            admin,
            b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        if r.status == want {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz not {want}: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_line_feed_changes_once_and_key_api_bytes_in() {
    let mut redis = common::redis::RedisServer::start();
    let up = Upstream::start().await;
    let mut kg = Serve::at(up.addr)
        .store(&format!(
            "url = \"redis://:{}@127.0.0.1:{}/0\"",
            "", // no password: the URL form with userinfo is still redacted
            redis.port()
        ))
        .rest("\n[log]\nformat = \"json\"\n")
        .start()
        .await;
    let cfg = kg.config.display().to_string();
    let o = common::bin::run(&["keys", "mint", "--config", &cfg], &[]).await;
    assert!(o.status.success(), "{o:?}");
    let token = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();

    let body = r#"{"name":"counted-bytes"}"#;
    let post = format!(
        "POST /org/tokens HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: mint-post\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let r = raw(kg.public, post.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");

    wait_readyz(kg.admin, 200).await;
    redis.kill();
    wait_readyz(kg.admin, 503).await;
    redis.restart();
    wait_readyz(kg.admin, 200).await;

    kg.signal_term();
    kg.exit_within(Duration::from_secs(10)).await;
    let log = kg.output();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let message = |m: &str| {
        lines
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|s| s.starts_with(m)))
            .count()
    };
    assert_eq!(message("revocation feed connected"), 2, "{log}");
    assert_eq!(message("revocation feed lost"), 1, "{log}");

    let start = lines
        .iter()
        .find(|v| v["message"] == "keygate serving")
        .unwrap_or_else(|| panic!("no start-up line:\n{log}"));
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert_eq!(start["scheme"], "http", "{start}");
    assert!(
        start["protocols"].as_str().unwrap().contains("h2c"),
        "{start}"
    );
    assert_eq!(start["upstream"], format!("http://{}/", up.addr), "{start}");
    assert_eq!(
        start["store"],
        format!("redis redis://127.0.0.1:{}/0", redis.port()),
        "{start}"
    );
    assert_eq!(start["tenant"], "acme", "{start}");
    assert!(
        start["hosts"]
            .as_str()
            .unwrap()
            .contains("acme.moleculesai.app"),
        "{start}"
    );

    let post_line = access_line(&log, "mint-post");
    assert_eq!(post_line["status"], 200, "{post_line}");
    assert_eq!(post_line["bytes_in"], body.len(), "{post_line}");
}
