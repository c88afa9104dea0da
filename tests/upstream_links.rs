//! keygate's connections to the app: a client connection's requests reuse
//! one keep-alive link; a link the app closed between requests is replaced
//! without the client noticing; a link that dies mid-request is a 502; every
//! response framing the app may use arrives intact, and anything malformed
//! is a 502 (head) or an aborted response (body), never a reused link.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::kg::{self, read_response, HOST};
use common::upstream::Upstream;
use keygate::auth::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn keep_alive_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn one_client_connection_reuses_one_upstream_link() {
    let up = Upstream::start().await;
    let gate = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    for i in 0..20 {
        client
            .write_all(&keep_alive_get(&format!("/r{i}")))
            .await
            .unwrap();
        let r = read_response(&mut client).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    assert_eq!(up.count(), 20);
    assert_eq!(
        up.connections(),
        1,
        "20 sequential requests, one link to the app"
    );
    gate.stop().await;
}

/// An app that answers one request per connection and then closes it
/// without saying so (no `Connection: close`).
async fn one_shot_app() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Closed silently once the response is out.
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn a_link_the_app_closed_between_requests_is_replaced() {
    let (addr, served) = one_shot_app().await;
    let gate = kg::start(
        kg::config(format!("http://{addr}").parse().unwrap()),
        Store::memory("acme"),
    )
    .await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    for i in 0..5 {
        client.write_all(&keep_alive_get("/again")).await.unwrap();
        let r = read_response(&mut client).await;
        assert_eq!(
            r.status, 200,
            "request {i} on a reused client connection: {r:?}"
        );
        assert_eq!(r.body, "ok");
    }
    assert_eq!(served.load(Ordering::SeqCst), 5);
    gate.stop().await;
}

#[tokio::test]
async fn a_link_that_dies_before_answering_is_502() {
    // Accepts, reads the request, closes without a response.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let mut tmp = [0u8; 4096];
            let _ = s.read(&mut tmp).await;
        }
    });
    let gate = kg::start(
        kg::config(format!("http://{addr}").parse().unwrap()),
        Store::memory("acme"),
    )
    .await;
    let r = kg::raw(gate.public_addr, &kg::get("/x", "")).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.error().starts_with("bad gateway"), "{r:?}");
    gate.stop().await;
}

/// An app that answers the n-th request it receives (over any connection)
/// with `script[n]` verbatim, closing the connection after it when the entry
/// says so; records each request head and counts connections.
struct ScriptedApp {
    addr: std::net::SocketAddr,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

async fn scripted_app(script: Vec<(&'static [u8], bool)>) -> ScriptedApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h, c) = (heads.clone(), connections.clone());
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (h, script) = (h.clone(), script.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head: Vec<u8> = buf.drain(..end + 4).collect();
                    let n = {
                        let mut heads = h.lock().unwrap();
                        heads.push(String::from_utf8_lossy(&head).into_owned());
                        heads.len() - 1
                    };
                    let Some(&(answer, close)) = script.get(n) else {
                        return;
                    };
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    ScriptedApp {
        addr,
        heads,
        connections,
    }
}

async fn gate_for(app: &ScriptedApp) -> keygate::RunHandle {
    kg::start(
        kg::config(format!("http://{}", app.addr).parse().unwrap()),
        Store::memory("acme"),
    )
    .await
}

#[tokio::test]
async fn every_response_framing_reaches_the_client_intact_over_one_link() {
    let app = scripted_app(vec![
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        (b"HTTP/1.1 204 No Content\r\nX-Empty: 1\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
        (b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", false),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the app closes", true),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew", false),
    ])
    .await;
    let gate = gate_for(&app).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    let mut expect = Vec::new();
    for (method, body) in [
        ("GET", "hello"),
        ("GET", "abcde"),
        ("GET", "ok"),
        ("GET", ""),
        ("HEAD", ""),
        ("POST", ""),
        ("GET", "until the app closes"),
        ("GET", "new"),
    ] {
        let req = format!("{method} /f HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        client.write_all(req.as_bytes()).await.unwrap();
        let r = if method == "HEAD" {
            read_head_only(&mut client).await
        } else {
            read_response(&mut client).await
        };
        expect.push((method, r.status, r.body.clone()));
        assert_eq!(r.body, body, "{method}: {r:?}");
        if method == "HEAD" {
            assert_eq!(r.header("content-length").as_deref(), Some("5"), "{r:?}");
        }
        assert!(r.header("x-request-id").is_some(), "{r:?}");
        assert!(r.header("x-trailer").is_none(), "{r:?}");
    }
    let statuses: Vec<u16> = expect.iter().map(|e| e.1).collect();
    assert_eq!(statuses, [200, 200, 200, 204, 200, 201, 200, 200]);
    // A body-less POST is framed for the app.
    let heads = app.heads.lock().unwrap().clone();
    assert!(
        heads[5]
            .to_ascii_lowercase()
            .contains("content-length: 0\r\n"),
        "{:?}",
        heads[5]
    );
    // Seven requests on the first link; the close-delimited body ended it.
    assert_eq!(app.connections.load(Ordering::SeqCst), 2);
    gate.stop().await;
}

#[tokio::test]
async fn malformed_app_response_heads_are_502() {
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ] {
        let app = scripted_app(vec![(bad, false)]).await;
        let gate = gate_for(&app).await;
        let r = kg::raw(gate.public_addr, &kg::get("/x", "")).await;
        assert_eq!(r.status, 502, "{:?} -> {r:?}", String::from_utf8_lossy(bad));
        assert!(r.error().starts_with("bad gateway"), "{r:?}");
        gate.stop().await;
    }
}

/// Reads one response head (a `HEAD` answer: no body whatever it announces).
async fn read_head_only(client: &mut TcpStream) -> kg::RawResponse {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut byte))
            .await
            .expect("a response head within 10s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    kg::RawResponse {
        status,
        head,
        body: String::new(),
    }
}

/// Reads whatever keygate sends until it closes the connection.
async fn read_to_close(client: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.read_to_end(&mut all),
    )
    .await
    .expect("keygate closes the connection")
    .unwrap_or_default();
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn a_body_that_breaks_mid_stream_aborts_the_client_response() {
    for (bad, sent) in [
        // Shorter than its Content-Length, then the app closes.
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"[..],
            true,
        ),
        // A chunk size that is not hex.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n",
            false,
        ),
        // Chunk data longer than its size.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        // Bare LF after a chunk size.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
            false,
        ),
    ] {
        let app = scripted_app(vec![(bad, sent)]).await;
        let gate = gate_for(&app).await;
        let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
        client.write_all(&keep_alive_get("/broken")).await.unwrap();
        let what = String::from_utf8_lossy(bad);
        let mut seen = String::new();
        if !sent {
            // A malformed chunk that arrives with the head is a 502 before
            // any byte of the response (contract §3 step 6); one that
            // arrives later (the kernel may split the app's write) aborts.
            let head = read_head_only(&mut client).await;
            if head.status == 502 {
                assert!(
                    head.head.to_ascii_lowercase().contains("application/json"),
                    "{what:?} -> {head:?}"
                );
                gate.stop().await;
                continue;
            }
            assert_eq!(head.status, 200, "{what:?} -> {head:?}");
            seen = head.head;
        }
        seen.push_str(&read_to_close(&mut client).await);
        // keygate closes the connection; whatever part of the response got
        // out, the client can tell it is incomplete: no final chunk, or
        // fewer bytes than announced.
        assert!(
            seen.is_empty() || seen.starts_with("HTTP/1.1 200 OK\r\n"),
            "{what:?} -> {seen:?}"
        );
        assert!(!seen.ends_with("0\r\n\r\n"), "{what:?} -> {seen:?}");
        if let Some((head, body)) = seen.split_once("\r\n\r\n") {
            if head.to_ascii_lowercase().contains("content-length: 10") {
                assert!(body.len() < 10, "{what:?} -> {seen:?}");
            }
        }
        // The next client is served on a fresh link.
        let r = kg::raw(gate.public_addr, &kg::get("/after", "")).await;
        assert_eq!(r.status, 502, "the script has no second answer: {r:?}");
        assert_eq!(app.connections.load(Ordering::SeqCst), 2, "{what:?}");
        gate.stop().await;
    }
}

#[tokio::test]
async fn bytes_after_a_complete_response_retire_the_link() {
    let app = scripted_app(vec![
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge", false),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond", false),
    ])
    .await;
    let gate = gate_for(&app).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    client.write_all(&keep_alive_get("/one")).await.unwrap();
    let r = read_response(&mut client).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
    client.write_all(&keep_alive_get("/two")).await.unwrap();
    let r = read_response(&mut client).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "second"),
        "the unsolicited bytes never reach a client: {r:?}"
    );
    assert_eq!(app.connections.load(Ordering::SeqCst), 2);
    gate.stop().await;
}

#[tokio::test]
async fn connection_close_and_http10_answers_are_not_reused() {
    let app = scripted_app(vec![
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
            false,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb", false),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc", false),
    ])
    .await;
    let gate = gate_for(&app).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    for want in ["a", "b", "c"] {
        client.write_all(&keep_alive_get("/c")).await.unwrap();
        let r = read_response(&mut client).await;
        assert_eq!((r.status, r.body.as_str()), (200, want), "{r:?}");
        // keygate answers in its own version, whatever the app spoke.
        assert!(r.head.starts_with("HTTP/1.1 200 "), "{r:?}");
    }
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        3,
        "an app that said close (or spoke HTTP/1.0) gets a fresh connection"
    );
    gate.stop().await;
}

#[tokio::test]
async fn request_bodies_with_a_length_share_the_connections_link() {
    let up = Upstream::start().await;
    let gate = kg::start(kg::config(up.url()), Store::memory("acme")).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    let body = "x".repeat(100_000);
    for (i, (method, body)) in [
        ("POST", body.as_str()),
        ("GET", ""),
        ("PUT", "small"),
        ("PATCH", ""),
        ("DELETE", "d"),
    ]
    .into_iter()
    .enumerate()
    {
        let req = format!(
            "{method} /b{i} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut client).await;
        assert_eq!(r.status, 200, "{method}: {r:?}");
    }
    let seen = up.wait_for(5).await;
    let lens: Vec<usize> = seen.iter().map(|s| s.body_len).collect();
    assert_eq!(lens, [100_000, 0, 5, 0, 1]);
    assert_eq!(
        seen[0].headers.get("content-length").unwrap(),
        "100000",
        "{:?}",
        seen[0].headers
    );
    assert_eq!(
        up.connections(),
        1,
        "five requests, bodies or not, one link"
    );
    gate.stop().await;
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_reaches_the_client() {
    // The app answers 413 from the head alone and never reads the body.
    let app = scripted_app(vec![
        (
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!",
            false,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    ])
    .await;
    let gate = gate_for(&app).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    // 8 MiB: more than the socket buffers between keygate and the app hold.
    let len = 8 << 20;
    let head = format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = client.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..len / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.windows(8).any(|w| w == b"too big!") {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            other => panic!(
                "no answer while uploading ({other:?}): {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 413 "), "{seen:?}");
    upload.abort();
    // The link the app stopped reading is not reused.
    let r = kg::raw(gate.public_addr, &kg::get("/next", "")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
    assert_eq!(app.connections.load(Ordering::SeqCst), 2);
    gate.stop().await;
}

#[tokio::test]
async fn a_request_with_a_body_is_never_resent_on_a_new_link() {
    // The app closes the link on the second request instead of answering; a
    // GET would be sent again on a fresh link, a PUT with a body must not be
    // (its body is gone): the client gets a 502, the app never sees it twice.
    let app = scripted_app(vec![
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        (b"", true),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nresent!",
            false,
        ),
    ])
    .await;
    let gate = gate_for(&app).await;
    let mut client = TcpStream::connect(gate.public_addr).await.unwrap();
    client.write_all(&keep_alive_get("/first")).await.unwrap();
    assert_eq!(read_response(&mut client).await.status, 200);
    let put = format!("PUT /doc HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\r\nbody");
    client.write_all(put.as_bytes()).await.unwrap();
    let r = read_response(&mut client).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(app.heads.lock().unwrap().len(), 2, "the PUT was sent again");
    gate.stop().await;
}
