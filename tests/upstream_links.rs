//! keygate's connections to the app: a client connection's requests reuse
//! one keep-alive link; a link the app closed between requests is replaced
//! without the client noticing; a link that dies mid-request is a 502.
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
