//! A real upstream on 127.0.0.1:0 that records exactly what it receives.
//!
//! Behaviour by path:
//! - `/slow/<ms>`: waits `<ms>` before answering;
//! - `/ws`: answers a WebSocket upgrade with 101 and echoes bytes;
//! - `/status/<code>`: answers with that status;
//! - `/hop`: answers with hop-by-hop headers keygate must strip;
//! - anything else: 200 `ok` (reads and counts the whole body).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One request as the app saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: usize,
    pub trailers: Option<HeaderMap>,
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Upstream {
            addr,
            seen: Arc::default(),
            arrived: Arc::new(Notify::new()),
            connections: Arc::default(),
        };
        let u = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                u.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let u = u.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let u = u.clone();
                        async move { Ok::<_, Infallible>(u.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        up
    }

    pub fn url(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait (bounded) until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.arrived.notified();
            if self.count() >= n {
                return self.seen();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("upstream saw {} requests, expected {n}", self.count());
            }
        }
    }

    async fn answer(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let upgrade = if path == "/ws" {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let (parts, body) = req.into_parts();
        let mut body_len = 0;
        let mut trailers = None;
        let mut body = body;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        body_len += d.len();
                    } else if let Ok(t) = f.into_trailers() {
                        trailers = Some(t);
                    }
                }
                Err(_) => break,
            }
        }
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_len,
            trailers,
        });
        self.arrived.notify_waiters();

        if let Some(rest) = path.strip_prefix("/slow/") {
            let ms: u64 = rest.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(code) = path.strip_prefix("/status/") {
            let code: u16 = code.parse().unwrap_or(200);
            let mut r = Response::new(Full::new(Bytes::from_static(b"status")));
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            return r;
        }
        if path == "/hop" {
            return Response::builder()
                .header("connection", "close, x-secret-hop")
                .header("x-secret-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("x-app", "kept")
                .body(Full::new(Bytes::from_static(b"hop")))
                .unwrap();
        }
        if let Some(on_upgrade) = upgrade {
            tokio::spawn(async move {
                if let Ok(up) = on_upgrade.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            return Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
        r.headers_mut()
            .insert("x-upstream", http::HeaderValue::from_static("yes"));
        r
    }
}

/// An address where nothing listens (bound then dropped).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}
