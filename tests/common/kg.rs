//! Start keygate in-process through `keygate::spawn` on 127.0.0.1:0, and
//! talk to it with raw bytes (HTTP/1.1) or hyper's HTTP/2 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::auth::store::Store;
use keygate::auth::{Actor, MintRequest, OpContext};
use keygate::config::{Config, RedisTarget, Secret, StoreBackend};
use keygate::{Listeners, RunHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::redis::{RedisCluster, RedisServer};
use super::upstream::Upstream;

pub const HOST: &str = "acme.moleculesai.app";

/// A test config for tenant `acme` in front of `upstream`.
/// The access log is off: in-process it would write straight to the test
/// binary's stdout (the built-binary tests in ops.rs/session.rs cover it).
pub fn config(upstream: http::Uri) -> Config {
    let mut c = Config::new("acme", upstream);
    c.log.access = false;
    c
}

/// [`config`] on the Redis store of `redis`.
pub fn redis_config(up: &Upstream, redis: &RedisServer) -> Config {
    let mut c = config(up.url());
    c.store.backend = StoreBackend::Redis(RedisTarget::Url(Secret::new(redis.url())));
    c
}

/// [`config`] on `cluster`, seeded with two of its nodes; a store timeout
/// that allows for a redirect between them.
pub fn cluster_config(up: &Upstream, cluster: &RedisCluster) -> Config {
    let mut c = config(up.url());
    let seeds = cluster
        .urls()
        .into_iter()
        .take(2)
        .map(Secret::new)
        .collect();
    c.store.backend = StoreBackend::Redis(RedisTarget::Cluster(seeds));
    c.store.timeout = Duration::from_secs(2);
    c
}

/// Start keygate on the store `c` names and wait (bounded: 10 s) until its
/// revocation feed is live.
pub async fn start_live(c: &Config) -> RunHandle {
    let kg = start(c.clone(), Store::from_config(&c.store, "acme").unwrap()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !kg.app.auth.feed_live() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the revocation feed to connect"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kg
}

pub async fn start(config: Config, store: Store) -> RunHandle {
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    keygate::spawn(
        config,
        store,
        Listeners {
            public,
            admin: Some(admin),
        },
    )
    .await
    .expect("keygate starts")
}

/// The operator context the tests mint and revoke with (actor `cli:test`).
pub fn op_ctx() -> OpContext {
    OpContext {
        actor: Actor("cli:test".into()),
        client: None,
        user_agent: None,
    }
}

/// A key minted directly through the key service.
#[derive(Debug, Clone)]
pub struct Key {
    pub token: String,
    pub id: String,
}

/// Mint `req` through the running keygate's key service.
pub async fn mint_request(kg: &RunHandle, req: MintRequest) -> Key {
    let minted = kg.app.auth.keys().mint(req, &op_ctx()).await.expect("mint");
    Key {
        token: minted.token.expose().to_string(),
        id: minted.record.id.clone(),
    }
}

/// Mint a key named `name` that never expires (the ceiling enforced).
pub async fn mint_key(kg: &RunHandle, name: Option<&str>) -> Key {
    let req = MintRequest {
        name: name.map(Into::into),
        expires_at: None,
        enforce_ceiling: true,
        ..Default::default()
    };
    mint_request(kg, req).await
}

/// A key minted as ops would bootstrap one (named `bootstrap`, past the
/// ceiling); it is not the subject of the test that uses it. Its token.
pub async fn bootstrap_key(kg: &RunHandle) -> String {
    let req = MintRequest {
        name: Some("bootstrap".into()),
        expires_at: None,
        enforce_ceiling: false,
        ..Default::default()
    };
    mint_request(kg, req).await.token
}

/// A parsed HTTP/1.1 response read from a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Send raw bytes on a fresh connection and read one response (bounded).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s).await
}

/// Read one HTTP/1.1 response (head + Content-Length or chunked body, or until close).
pub async fn read_response(s: &mut TcpStream) -> RawResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
            .await
            .expect("response within 10s")
            .unwrap_or(0);
        if n == 0 {
            panic!(
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut resp = RawResponse {
        status,
        head,
        body: String::new(),
    };
    let mut body = buf[head_end..].to_vec();
    if status == 101 || status == 204 || status == 304 || (100..200).contains(&status) {
        return resp;
    }
    if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        while body.len() < len {
            let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
                .await
                .expect("body within 10s")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..n]);
        }
        body.truncate(len);
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            if find(&body, b"0\r\n\r\n").is_some() {
                break;
            }
            let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
                .await
                .expect("body within 10s")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..n]);
        }
        body = dechunk(&body);
    } else {
        loop {
            let n = tokio::time::timeout_at(deadline, s.read(&mut tmp))
                .await
                .expect("body within 10s")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..n]);
        }
    }
    resp.body = String::from_utf8_lossy(&body).to_string();
    resp
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..i])
                .unwrap_or("0")
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = i + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// `GET <target>` with Host acme and extra header lines.
pub fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

/// An HTTP/2 (prior knowledge) client connection to keygate.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Send one HTTP/2 request; returns (status, headers, body) or the stream error text.
pub async fn h2_send(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).to_string()))
}
