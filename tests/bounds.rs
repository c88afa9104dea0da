//! Every wait has a bound (contract §12), tunnels end with their key (§4),
//! and the start/signal edges of §7: over real sockets, with real Redis
//! where keys must cross instances.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::bin::Serve;
use common::kg::{self, read_response, HOST};
use common::redis::RedisServer;
use common::upstream::Upstream;
use keygate::auth::MintRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

fn ws_upgrade(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Reads until the peer closes (or errors); panics if that takes longer than `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {limit:?}; read so far {:?}",
                String::from_utf8_lossy(&all)
            ),
        }
    }
}

/// Opens a WebSocket tunnel through `addr` to the echo app and checks it echoes.
async fn open_tunnel(addr: std::net::SocketAddr, extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&ws_upgrade("/ws", extra)).await.unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 101, "{r:?}");
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("echo within 10s")
        .unwrap();
    assert_eq!(&got, b"ping");
    s
}

#[tokio::test]
async fn revoking_a_key_closes_its_tunnels_here_and_on_every_instance() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let c = kg::redis_config(&up, &redis);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let key = kg::mint_key(&a, Some("tunnels")).await;
    let other = kg::mint_key(&a, Some("bystander")).await;
    let mut on_a = open_tunnel(a.public_addr, &bearer(&key.token)).await;
    let mut on_b = open_tunnel(b.public_addr, &bearer(&key.token)).await;
    let mut bystander = open_tunnel(b.public_addr, &bearer(&other.token)).await;
    let mut anonymous = open_tunnel(b.public_addr, "").await;

    let revoked = a
        .app
        .auth
        .keys()
        .revoke(&key.id, &kg::op_ctx())
        .await
        .expect("revoke");
    assert!(revoked);
    closed_within(&mut on_a, Duration::from_secs(5)).await;
    closed_within(&mut on_b, Duration::from_secs(5)).await;
    // Tunnels of other keys, and anonymous ones, keep working.
    for s in [&mut bystander, &mut anonymous] {
        s.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .expect("echo")
            .unwrap();
        assert_eq!(&got, b"still");
    }
    // (Open tunnels hold the drain for up to listen.shutdown_grace.)
    drop((bystander, anonymous));
    a.stop().await;
    b.stop().await;
}

/// A rotation shortens the old key's expiry to now + grace (§9): its open
/// tunnels, here and on another instance, end at that new expiry, not at
/// the one they opened with (here: never).
#[tokio::test]
async fn a_rotation_moves_the_end_of_the_old_keys_tunnels() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let c = kg::redis_config(&up, &redis);
    let a = kg::start_live(&c).await;
    let b = kg::start_live(&c).await;
    let key = kg::mint_key(&a, Some("rotated")).await;
    let other = kg::mint_key(&a, Some("bystander")).await;
    let mut on_a = open_tunnel(a.public_addr, &bearer(&key.token)).await;
    let mut on_b = open_tunnel(b.public_addr, &bearer(&key.token)).await;
    let mut bystander = open_tunnel(b.public_addr, &bearer(&other.token)).await;
    let grace = Duration::from_millis(1500);
    let rotated_at = Instant::now();
    a.app
        .auth
        .keys()
        .rotate(
            &key.id,
            keygate::auth::RotateRequest {
                grace: Some(grace),
                expires_at: None,
            },
            &kg::op_ctx(),
        )
        .await
        .expect("rotate");
    closed_within(&mut on_a, Duration::from_secs(10)).await;
    closed_within(&mut on_b, Duration::from_secs(10)).await;
    // Not before the grace (the key is valid until then); 50 ms of slack
    // for the expiry's whole-millisecond rounding in the store.
    assert!(
        rotated_at.elapsed() + Duration::from_millis(50) >= grace,
        "closed {:?} after the rotation, before the grace",
        rotated_at.elapsed()
    );
    bystander.write_all(b"still").await.unwrap();
    let mut got = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), bystander.read_exact(&mut got))
        .await
        .expect("echo")
        .unwrap();
    assert_eq!(&got, b"still");
    drop(bystander);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_tunnel_closes_when_its_key_expires() {
    let up = Upstream::start().await;
    let kg = kg::start(
        kg::config(up.url()),
        keygate::auth::store::Store::memory("acme"),
    )
    .await;
    let key = kg::mint_request(
        &kg,
        MintRequest {
            name: Some("short".into()),
            expires_at: Some(Utc::now() + chrono::Duration::milliseconds(1500)),
            enforce_ceiling: true,
            ..Default::default()
        },
    )
    .await;
    let mut s = open_tunnel(kg.public_addr, &bearer(&key.token)).await;
    let opened = Instant::now();
    closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(
        opened.elapsed() >= Duration::from_millis(500),
        "closed before the key expired"
    );
    kg.stop().await;
}

#[tokio::test]
async fn an_idle_tunnel_closes_after_listen_idle_timeout() {
    let up = Upstream::start().await;
    let mut c = kg::config(up.url());
    c.listen.idle_timeout = Duration::from_millis(400);
    let kg = kg::start(c, keygate::auth::store::Store::memory("acme")).await;
    let mut s = open_tunnel(kg.public_addr, "").await;
    closed_within(&mut s, Duration::from_secs(10)).await;
    kg.stop().await;
}

/// An app that answers each request head it reads with `answer` and then
/// reports (through the counter) when keygate closes its connection.
async fn counting_app(
    answer: &'static [u8],
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (acc, clo) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let clo = clo.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            break;
                        }
                    }
                }
                clo.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, closed)
}

#[tokio::test]
async fn idle_app_connections_close_after_upstream_idle_timeout() {
    let (addr, accepted, closed) =
        counting_app(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let mut c = kg::config(format!("http://{addr}").parse().unwrap());
    c.upstream.idle_timeout = Duration::from_millis(300);
    let kg = kg::start(c, keygate::auth::store::Store::memory("acme")).await;
    // A client that stays connected (its link parks into the pool, then expires).
    let mut client = TcpStream::connect(kg.public_addr).await.unwrap();
    client
        .write_all(format!("GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut client).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the idle app connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client is still served, on a new connection to the app.
    client
        .write_all(format!("GET /b HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut client).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    kg.stop().await;
}

#[tokio::test]
async fn a_parked_client_gives_its_app_connection_back_to_the_pool() {
    let (addr, accepted, _) = counting_app(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let kg = kg::start(
        kg::config(format!("http://{addr}").parse().unwrap()),
        keygate::auth::store::Store::memory("acme"),
    )
    .await;
    let mut first = TcpStream::connect(kg.public_addr).await.unwrap();
    first
        .write_all(format!("GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut first).await.status, 200);
    // Once the first client is parked, its link waits in the shared pool...
    let deadline = Instant::now() + Duration::from_secs(10);
    while kg.app.forwarder.upstream().idle_connections() == 0 {
        assert!(
            Instant::now() < deadline,
            "the parked client's link never reached the pool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... where another client's request reuses it.
    let r = kg::raw(kg.public_addr, &kg::get("/b", "")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection to the app served both"
    );
    kg.stop().await;
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_gets_408_and_nothing_half_sent_is_reused() {
    let (addr, accepted, closed) =
        counting_app(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let mut c = kg::config(format!("http://{addr}").parse().unwrap());
    c.listen.body_timeout = Duration::from_millis(300);
    let kg = kg::start(c, keygate::auth::store::Store::memory("acme")).await;
    let mut s = TcpStream::connect(kg.public_addr).await.unwrap();
    // Headers first, then a body that comes in two writes: the second never.
    s.write_all(
        format!("PUT /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    tokio::task::yield_now().await;
    s.write_all(b"only ten b").await.unwrap();
    let r = read_response(&mut s).await;
    // The app's scripted answer comes on the head alone; keygate refuses to
    // relay a half-sent request's answer only if the app waits — so either
    // the app answered (200, link not reused) or keygate timed out (408).
    if r.status == 408 {
        assert_eq!(
            r.error(),
            "request timeout: the request body stopped arriving"
        );
        assert_eq!(r.header("connection").as_deref(), Some("close"));
    } else {
        assert_eq!(r.status, 200, "{r:?}");
    }
    closed_within(&mut s, Duration::from_secs(10)).await;
    // The app's connection is never reused after a half-sent body.
    let deadline = Instant::now() + Duration::from_secs(10);
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the half-written app connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    kg.stop().await;
}

#[tokio::test]
async fn a_stalled_body_to_an_app_that_waits_for_it_gets_408() {
    // The recording upstream reads the whole body before answering.
    let up = Upstream::start().await;
    let mut c = kg::config(up.url());
    c.listen.body_timeout = Duration::from_millis(300);
    let kg = kg::start(c, keygate::auth::store::Store::memory("acme")).await;
    let mut s = TcpStream::connect(kg.public_addr).await.unwrap();
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\nabc")
            .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(
        r.error(),
        "request timeout: the request body stopped arriving"
    );
    assert_eq!(up.count(), 0, "the app never got a complete request");
    kg.stop().await;
}

/// A self-signed certificate for HOST in a temporary directory.
fn self_signed() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (dir, c, k)
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_clear_400() {
    let up = Upstream::start().await;
    let (_dir, cert, key) = self_signed();
    let mut c = kg::config(up.url());
    c.listen.tls = Some(keygate::config::TlsConfig::new(cert, key));
    let kg = kg::start(c, keygate::auth::store::Store::memory("acme")).await;
    let mut s = TcpStream::connect(kg.public_addr).await.unwrap();
    s.write_all(&kg::get("/", "")).await.unwrap();
    let all = closed_within(&mut s, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text:?}");
    assert!(text.contains("content-type: application/json"), "{text:?}");
    assert!(text.contains("x-request-id: "), "{text:?}");
    assert!(
        text.ends_with(r#"{"error":"plain HTTP request sent to the TLS port: use https://"}"#),
        "{text:?}"
    );
    assert_eq!(up.count(), 0);
    kg.stop().await;
}

#[tokio::test]
async fn a_tls_listener_that_cannot_load_is_a_start_error() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = kg::config(up.url());
    c.listen.tls = Some(keygate::config::TlsConfig::new(
        dir.path().join("missing.crt"),
        dir.path().join("missing.key"),
    ));
    let listeners = keygate::Listeners {
        public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: None,
    };
    let (_trigger, signal) = keygate::shutdown::channel();
    let err = keygate::run(
        c,
        keygate::auth::store::Store::memory("acme"),
        listeners,
        signal,
    )
    .await
    .expect_err("a TLS listener without its files cannot run");
    assert!(
        err.to_string().starts_with("listen.tls: cannot read "),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_without_tls_logs_and_keeps_serving() {
    let up = Upstream::start().await;
    let mut p = Serve::at(up.addr)
        .rest("\n[log]\nformat = \"json\"\nlevel = \"info\"\n")
        .start()
        .await;
    p.proc.sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.proc.output().contains("nothing to reload") {
        p.proc.assert_running();
        assert!(
            Instant::now() < deadline,
            "no log line about SIGHUP: {}",
            p.proc.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.proc.assert_running();
    let r = kg::raw(p.public, &kg::get("/still", "")).await;
    assert_eq!(r.status, 200, "{r:?}");
    p.proc.stop().await;
}
