//! A raw-TCP app that answers `/case…` requests with scripted bytes, in
//! steps the test controls, and every other request (`/next/<n>`) with a
//! plain `200` whose body is `next-<n>`. Requests are read head only (the
//! tests send body-less GETs).
//!
//! A script is a list of [`Step`]s run for each `/case…` request:
//! [`Step::Write`] sends bytes (each in one `write`), [`Step::WaitRelease`]
//! blocks until the test calls [`ScriptedApp::release`] (a permit, so a
//! release that comes first is not lost), [`Step::Close`] closes the
//! connection, [`Step::Stall`] keeps it open and silent forever.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub enum Step {
    Write(Vec<u8>),
    WaitRelease,
    Close,
    Stall,
}

pub fn write(bytes: impl AsRef<[u8]>) -> Step {
    Step::Write(bytes.as_ref().to_vec())
}

#[derive(Clone)]
pub struct ScriptedApp {
    pub addr: SocketAddr,
    release: Arc<Notify>,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl ScriptedApp {
    pub async fn start(script: Vec<Step>) -> ScriptedApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = ScriptedApp {
            addr: listener.local_addr().unwrap(),
            release: Arc::new(Notify::new()),
            connections: Arc::default(),
            heads: Arc::default(),
        };
        let a = app.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                a.connections.fetch_add(1, Ordering::SeqCst);
                let (a, script) = (a.clone(), script.clone());
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
                        let head = String::from_utf8_lossy(&head).into_owned();
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        a.heads.lock().unwrap().push(head);
                        if let Some(n) = path.strip_prefix("/next/") {
                            let body = format!("next-{n}");
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        for step in script.iter() {
                            match step {
                                Step::Write(b) => {
                                    if s.write_all(b).await.is_err() {
                                        return;
                                    }
                                }
                                Step::WaitRelease => a.release.notified().await,
                                Step::Close => return,
                                Step::Stall => std::future::pending::<()>().await,
                            }
                        }
                    }
                });
            }
        });
        app
    }

    pub fn url(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    /// Lets a script waiting at [`Step::WaitRelease`] go on.
    pub fn release(&self) {
        self.release.notify_one();
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}
