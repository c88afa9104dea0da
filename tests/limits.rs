//! `listen.max_connections`: at the limit, a new client waits (in the kernel
//! backlog, not accepted) until a connection closes; then it is served.
mod common;

use std::time::Duration;

use common::kg::{self, read_response, HOST};
use common::upstream::Upstream;
use keygate::auth::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn keep_alive_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn a_client_past_max_connections_waits_for_a_free_slot() {
    let up = Upstream::start().await;
    let mut c = kg::config(up.url());
    c.listen.max_connections = 2;
    let gate = kg::start(c, Store::memory("acme")).await;

    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(gate.public_addr).await.unwrap();
        s.write_all(&keep_alive_get(&format!("/held{i}")))
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.status, 200);
        held.push(s);
    }

    // The third client is not served while both slots are taken.
    let mut third = TcpStream::connect(gate.public_addr).await.unwrap();
    third.write_all(&keep_alive_get("/third")).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(early.is_err(), "served past max_connections: {early:?}");
    assert_eq!(up.count(), 2);

    // A slot frees: the waiting client is accepted and served.
    drop(held.pop());
    let r = read_response(&mut third).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.wait_for(3).await[2].uri.path(), "/third");
    gate.stop().await;
}
