//! `/readyz` follows the key store and the revocation feed (contract §6):
//! 200 while Redis answers, 503 naming the failed components when it is
//! killed, 200 again when it returns — without restarting keygate.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::kg;
use common::redis::RedisServer;
use common::upstream::Upstream;
use keygate::auth::store::Store;
use keygate::config::{RedisTarget, Secret, StoreBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn readyz(admin: SocketAddr) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("readyz answers")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).expect("JSON body"))
}

/// Poll `/readyz` until it reports `want` (bounded).
async fn wait_ready(admin: SocketAddr, want: u16) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = readyz(admin).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed {status} {body}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readyz_follows_redis_down_and_back() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut c = kg::config(up.url());
    c.store.backend = StoreBackend::Redis(RedisTarget::Url(Secret::new(redis.url())));
    let kg = kg::start(c.clone(), Store::from_config(&c.store, "acme").unwrap()).await;
    let admin = kg.admin_addr.expect("admin listener");

    let body = wait_ready(admin, 200).await;
    assert_eq!(body["store"], "ok");
    assert_eq!(body["revocation_feed"], "live");

    redis.kill();
    let body = wait_ready(admin, 503).await;
    assert_eq!(body["ready"], false);
    assert_eq!(body["store"], "unavailable");

    // /healthz stays up: the process runs.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));

    redis.restart();
    let body = wait_ready(admin, 200).await;
    assert_eq!(body["store"], "ok");
    assert_eq!(body["revocation_feed"], "live");
    kg.stop().await;
}
