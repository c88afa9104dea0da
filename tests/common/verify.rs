//! A fake session verify endpoint on 127.0.0.1:0.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// 200 `{"user_id":"<user>"}` for exactly one `Cookie: wos-session=<good>`,
/// 401 with an empty body for anything else; counts calls and records the
/// Cookie headers it got.
#[derive(Clone)]
pub struct Verify {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    cookies: Arc<Mutex<Vec<String>>>,
}

impl Verify {
    pub async fn start(good: &str, user: &str) -> Verify {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v = Verify {
            addr: l.local_addr().unwrap(),
            calls: Arc::default(),
            cookies: Arc::default(),
        };
        let want: Arc<str> = format!("wos-session={good}").into();
        let body = Bytes::from(format!(r#"{{"user_id":"{user}"}}"#));
        let v2 = v.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (v, want, body) = (v2.clone(), want.clone(), body.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (v, want, body) = (v.clone(), want.clone(), body.clone());
                            async move {
                                v.calls.fetch_add(1, Ordering::SeqCst);
                                let cookie: Vec<String> = req
                                    .headers()
                                    .get_all("cookie")
                                    .iter()
                                    .map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned())
                                    .collect();
                                let ok = cookie.len() == 1 && *cookie[0] == *want;
                                v.cookies.lock().unwrap().extend(cookie);
                                let mut resp = http::Response::new(Full::new(body));
                                if !ok {
                                    *resp.body_mut() = Full::new(Bytes::new());
                                    *resp.status_mut() = http::StatusCode::UNAUTHORIZED;
                                }
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        v
    }

    /// The verify URL keygate is configured with.
    pub fn url(&self) -> String {
        format!("http://{}/cp/auth/tenant-member?slug=acme", self.addr)
    }

    /// How many verify calls arrived.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Every Cookie header received, in order.
    pub fn cookies(&self) -> Vec<String> {
        self.cookies.lock().unwrap().clone()
    }
}
