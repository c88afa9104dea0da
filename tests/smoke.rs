//! End-to-end smoke tests: a key minted in the memory store is accepted and
//! the app sees the principal; a refused request never reaches the app; and
//! `keygate demo` does what it prints.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::bin::Proc;
use common::kg::{self, get, raw, RawResponse};
use common::upstream::Upstream;
use keygate::auth::store::Store;

#[tokio::test]
async fn key_is_forwarded_with_principal_and_admin_prefix_is_refused() {
    let up = Upstream::start().await;
    let kg = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let minted = kg::mint_key(&kg, None).await;
    let auth = format!("Authorization: Bearer {}\r\n", minted.token);

    let r = raw(kg.public_addr, &get("/cp/admin", &auth)).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error(), "forbidden");
    assert_eq!(up.count(), 0, "a refused request reached the app");

    let r = raw(kg.public_addr, &get("/api/x?y=1", &auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.wait_for(1).await;
    assert_eq!(
        seen[0].headers["x-molecule-principal"],
        format!("org-key:{}", minted.id).as_str()
    );
    assert!(seen[0].headers.get("authorization").is_none());
    assert_eq!(seen[0].uri.to_string(), "/api/x?y=1");
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// keygate demo
// ---------------------------------------------------------------------------

/// What the demo wrote to stdout so far.
fn demo_stdout(demo: &Proc) -> String {
    std::fs::read_to_string(demo.dir().join("stdout.log")).unwrap_or_default()
}

/// Poll the demo's stdout (bounded: 20 s) until `done` holds for it.
async fn wait_stdout(demo: &mut Proc, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        demo.assert_running();
        let out = demo_stdout(demo);
        if done(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within 20 s:\n{}",
            demo.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The word after `marker` in `text` (an id the banner names).
fn word_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"))
        + marker.len();
    text[at..].split_whitespace().next().unwrap()
}

/// One printed `curl` line: `curl -s[i] [-X METHOD] URL -H 'Name: value'`.
struct Curl {
    method: String,
    authority: String,
    target: String,
    header: String,
}

fn parse_curl(line: &str) -> Curl {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], "curl", "{line}");
    let method = words
        .iter()
        .position(|w| *w == "-X")
        .map_or("GET", |i| words[i + 1]);
    let url = words
        .iter()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no http:// URL in {line}"));
    let (authority, path) = url.split_at(url.find('/').unwrap_or(url.len()));
    let header = line
        .split_once(" -H '")
        .and_then(|(_, h)| h.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no -H '...' in {line}"));
    Curl {
        method: method.into(),
        authority: authority.into(),
        target: path.into(),
        header: header.into(),
    }
}

/// Send what a curl line asks for, over a fresh connection.
async fn run_curl(c: &Curl) -> RawResponse {
    let addr: SocketAddr = c.authority.parse().unwrap();
    let req = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n{}\r\nConnection: close\r\n\r\n",
        c.method, c.target, c.authority, c.header
    );
    raw(addr, req.as_bytes()).await
}

/// `keygate demo` (the built binary, on a free port): an admin and a reader
/// key; every curl line it prints does what its comment says (the reader's
/// POST gets §8's 403); keygate's access lines, in text format, follow on
/// stdout, one per request, naming the key and never a token; Ctrl-C stops it.
#[tokio::test]
async fn demo_lines_work_and_its_access_log_follows() {
    let mut demo = Proc::spawn(&["demo", "--port", "0"]);
    let banner = wait_stdout(&mut demo, "demo banner", |o| {
        o.contains("access log follows") && o.contains("X-Request-Id.")
    })
    .await;
    let admin_id = word_after(&banner, "minted org API key ");
    let reader_id = word_after(&banner, "and a reader key ");
    let tokens: Vec<&str> = banner
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.starts_with("mok_"))
        .collect();
    assert_eq!(
        tokens.len(),
        2,
        "two tokens, each on its own line:\n{banner}"
    );
    let (admin_token, reader_token) = (tokens[0], tokens[1]);
    assert!(
        banner.contains("GET, HEAD and OPTIONS only"),
        "the reader key's scope is not stated:\n{banner}"
    );

    let curls: Vec<Curl> = banner
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("curl "))
        .map(parse_curl)
        .collect();
    assert_eq!(curls.len(), 7, "{banner}");
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let echoed = |r: &RawResponse, name: &str| r.json()["headers"][name].clone();
    let mut request_ids = Vec::new();
    let mut answered = |r: RawResponse| {
        request_ids.push(r.header("x-request-id").expect("X-Request-Id"));
        r
    };

    // 1. the admin key: forwarded with its principal.
    assert_eq!(curls[0].header, bearer(admin_token));
    let r = answered(run_curl(&curls[0]).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        echoed(&r, "x-molecule-principal"),
        format!("org-key:{admin_id}")
    );
    assert_eq!(echoed(&r, "x-molecule-key-role"), "admin");
    // 2. a wrong key: 401.
    assert!(!curls[1].header.contains(admin_token) && !curls[1].header.contains(reader_token));
    let r = answered(run_curl(&curls[1]).await);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.error(), "invalid or revoked org API key");
    // 3. the deny prefix: 403 even with the admin key.
    assert!(
        curls[2].target.starts_with("/cp/admin"),
        "{}",
        curls[2].target
    );
    let r = answered(run_curl(&curls[2]).await);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.error(), "forbidden");
    // 4. the reader key: its GET is forwarded as a reader, its POST is out of scope.
    assert_eq!(
        (curls[3].method.as_str(), curls[3].header.as_str()),
        ("GET", bearer(reader_token).as_str())
    );
    let r = answered(run_curl(&curls[3]).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(echoed(&r, "x-molecule-key-role"), "reader");
    assert_eq!(
        echoed(&r, "x-molecule-principal"),
        format!("org-key:{reader_id}")
    );
    assert_eq!(
        (curls[4].method.as_str(), curls[4].header.as_str()),
        ("POST", bearer(reader_token).as_str())
    );
    let r = answered(run_curl(&curls[4]).await);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.error(), "forbidden: outside this key's scope");
    // 5. list (both keys), then revoke the admin key; 1 again: 401.
    let r = answered(run_curl(&curls[5]).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["count"], 2, "{r:?}");
    assert_eq!(curls[6].method, "DELETE");
    let r = answered(run_curl(&curls[6]).await);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["revoked"], admin_id);
    let r = answered(run_curl(&curls[0]).await);
    assert_eq!(r.status, 401, "{r:?}");

    // The access log: one text line per request above, found by its X-Request-Id.
    let out = wait_stdout(&mut demo, "access lines", |o| {
        request_ids
            .iter()
            .all(|id| o.contains(&format!(" request_id={id} ")))
    })
    .await;
    let access: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("keygate::access"))
        .collect();
    assert_eq!(access.len(), request_ids.len(), "{out}");
    let want = [
        ("status=200", "outcome=forwarded", admin_id),
        ("status=401", "outcome=unauthorized", "-"),
        ("status=403", "outcome=forbidden", "-"),
        ("status=200", "outcome=forwarded", reader_id),
        ("status=403", "outcome=out_of_scope", reader_id),
        ("status=200", "outcome=answered", admin_id),
        ("status=200", "outcome=answered", admin_id),
        ("status=401", "outcome=unauthorized", admin_id),
    ];
    for (id, (status, outcome, key)) in request_ids.iter().zip(want) {
        let line = access
            .iter()
            .find(|l| l.contains(&format!(" request_id={id} ")))
            .unwrap();
        assert!(
            line.contains(" INFO keygate::access: ") && !line.starts_with('{'),
            "not a text line: {line}"
        );
        let key = format!("key_id={key}");
        for field in [status, outcome, key.as_str()] {
            assert!(
                line.contains(&format!(" {field} ")),
                "{field} not in {line}"
            );
        }
    }
    assert!(access[1].contains(" refusal=unknown"), "{}", access[1]);
    assert!(access[7].contains(" refusal=revoked"), "{}", access[7]);
    let logged = &out[banner.len()..];
    for token in [admin_token, reader_token] {
        assert!(!logged.contains(token), "a token in the log:\n{logged}");
    }

    demo.signal("-INT");
    let status = demo.exit_within(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}\n{}", demo.output());
    // keygate's own events go to stderr at warn: none here, only the goodbye.
    let stderr = std::fs::read_to_string(demo.dir().join("stderr.log")).unwrap();
    assert_eq!(stderr, "stopping\n", "{}", demo.output());
}
