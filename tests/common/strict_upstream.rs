//! A strict recording app on 127.0.0.1:0, over raw tokio TCP (no hyper, so
//! it shares no parser with keygate): every byte keygate sends it is parsed
//! by [`super::wire`] (RFC 9112, nothing guessed). Each request is recorded
//! — method, target, fields in order, the exact decoded body, the connection
//! it came on — and answered with a small 200 whose `x-oracle-target` field
//! and body name it (`x-oracle-seq` gives its global sequence number).
//! Keep-alive and pipelining are supported: every complete request already
//! buffered is parsed and recorded before any of them is answered, so a
//! request hidden in another's body is on record before the client sees the
//! carrier's answer.
//!
//! Bytes it cannot parse are a [`Failure`] (recorded with the bytes), and the
//! connection is closed: a strict app never guesses where a message ends.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::wire::{self, Field, Framing, Parsed};

/// One request as the app parsed it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Arrival order over all connections, from 0.
    pub seq: u64,
    /// Which connection (numbered from 0 in accept order).
    pub conn: u64,
    pub method: String,
    pub target: String,
    pub fields: Vec<Field>,
    pub framing: Framing,
    pub body: Vec<u8>,
    pub trailers: Vec<Field>,
}

impl Recorded {
    pub fn values(&self, name: &str) -> Vec<String> {
        wire::values(&self.fields, name)
            .into_iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Bytes the app could not parse (the connection was closed).
#[derive(Debug, Clone)]
pub struct Failure {
    pub conn: u64,
    pub reason: String,
    /// The unparsed bytes, from where the bad message starts (at most 2 KiB).
    pub bytes: Vec<u8>,
    /// The sequence number of the last good request on that connection.
    pub after: Option<u64>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "app connection {} (after request seq {:?}): {} at {}",
            self.conn,
            self.after,
            self.reason,
            wire::show(&self.bytes, 600)
        )
    }
}

#[derive(Default)]
struct Log {
    records: Vec<Recorded>,
    failures: Vec<Failure>,
    /// Connections that ended with part of a request unparsed (keygate
    /// aborted a request mid-way): not a parse failure.
    incomplete: Vec<(u64, Vec<u8>)>,
}

struct Inner {
    log: Mutex<Log>,
    changed: Notify,
    connections: AtomicU64,
    /// Connections not known to be idle (bytes buffered, being parsed or
    /// answered, or woken by the socket and not yet looked).
    busy: AtomicUsize,
    closed: AtomicU64,
}

#[derive(Clone)]
pub struct StrictUpstream {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl StrictUpstream {
    pub async fn start() -> StrictUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            log: Mutex::default(),
            changed: Notify::new(),
            connections: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            closed: AtomicU64::new(0),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = i.connections.fetch_add(1, Ordering::SeqCst);
                i.busy.fetch_add(1, Ordering::SeqCst);
                let i = i.clone();
                tokio::spawn(async move {
                    let mut busy = Busy {
                        inner: i.clone(),
                        busy: true,
                    };
                    serve(&i, stream, conn, &mut busy).await;
                    i.closed.fetch_add(1, Ordering::SeqCst);
                    i.changed.notify_waiters();
                });
            }
        });
        StrictUpstream { addr, inner }
    }

    pub fn url(&self) -> http::Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    pub fn records(&self) -> Vec<Recorded> {
        self.inner.log.lock().unwrap().records.clone()
    }

    pub fn record_count(&self) -> usize {
        self.inner.log.lock().unwrap().records.len()
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.inner.log.lock().unwrap().failures.clone()
    }

    pub fn failure_count(&self) -> usize {
        self.inner.log.lock().unwrap().failures.len()
    }

    pub fn incomplete(&self) -> Vec<(u64, Vec<u8>)> {
        self.inner.log.lock().unwrap().incomplete.clone()
    }

    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Connections the app has seen end.
    pub fn closed_connections(&self) -> u64 {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Wait (bounded by `within`) until `done` holds for the records; the
    /// records either way.
    pub async fn wait_until(
        &self,
        within: Duration,
        done: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.inner.changed.notified();
            {
                let log = self.inner.log.lock().unwrap();
                if done(&log.records) {
                    return log.records.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.records();
            }
        }
    }

    /// Wait until every connection is idle (nothing buffered, blocked on an
    /// empty socket) or closed, seen on two polls in a row; at most `within`.
    /// Returns whether it settled.
    pub async fn settle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut quiet = 0;
        loop {
            if self.inner.busy.load(Ordering::SeqCst) == 0 {
                quiet += 1;
                if quiet >= 2 {
                    return true;
                }
            } else {
                quiet = 0;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Polling with a deadline: nothing to wait on in the kernel.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A connection's share of [`Inner::busy`].
struct Busy {
    inner: Arc<Inner>,
    busy: bool,
}

impl Busy {
    fn set(&mut self, busy: bool) {
        if busy != self.busy {
            self.busy = busy;
            if busy {
                self.inner.busy.fetch_add(1, Ordering::SeqCst);
            } else {
                self.inner.busy.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// One request from the start of `buf`: head, then its body by its framing.
fn parse_request(buf: &[u8]) -> Parsed<(wire::RequestHead, Framing, wire::Chunked)> {
    let (head, used) = match wire::parse_request_head(buf) {
        Parsed::Complete(h, u) => (h, u),
        Parsed::Partial => return Parsed::Partial,
        Parsed::Invalid(e) => return Parsed::Invalid(e),
    };
    let framing = match wire::request_framing(&head.fields) {
        Ok(f) => f,
        Err(e) => return Parsed::Invalid(format!("{e} in {} {}", head.method, head.target)),
    };
    match framing {
        Framing::None => Parsed::Complete((head, framing, wire::Chunked::default()), used),
        Framing::Length(n) => {
            let n = n as usize;
            if buf.len() < used + n {
                return Parsed::Partial;
            }
            let body = wire::Chunked {
                body: buf[used..used + n].to_vec(),
                ..Default::default()
            };
            Parsed::Complete((head, framing, body), used + n)
        }
        Framing::Chunked => match wire::decode_chunked(&buf[used..]) {
            Parsed::Complete(c, n) => Parsed::Complete((head, framing, c), used + n),
            Parsed::Partial => Parsed::Partial,
            Parsed::Invalid(e) => Parsed::Invalid(format!(
                "{e} in the body of {} {}",
                head.method, head.target
            )),
        },
        Framing::Close => unreachable!("requests are never close-delimited"),
    }
}

async fn serve(inner: &Inner, mut io: TcpStream, conn: u64, busy: &mut Busy) {
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut last: Option<u64> = None;
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        // Every complete request already here is recorded before any answer.
        let mut failed = false;
        loop {
            match parse_request(&buf) {
                Parsed::Complete((head, framing, body), used) => {
                    buf.drain(..used);
                    let head_request = head.method == "HEAD";
                    let target = head.target.clone();
                    let seq = {
                        let mut log = inner.log.lock().unwrap();
                        let seq = log.records.len() as u64;
                        log.records.push(Recorded {
                            seq,
                            conn,
                            method: head.method,
                            target: head.target,
                            fields: head.fields,
                            framing,
                            body: body.body,
                            trailers: body.trailers,
                        });
                        seq
                    };
                    last = Some(seq);
                    inner.changed.notify_waiters();
                    out.extend_from_slice(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-oracle-seq: {seq}\r\n\
                             x-oracle-target: {target}\r\ncontent-length: {}\r\n\r\n",
                            target.len()
                        )
                        .as_bytes(),
                    );
                    if !head_request {
                        out.extend_from_slice(target.as_bytes());
                    }
                }
                Parsed::Partial => break,
                Parsed::Invalid(reason) => {
                    let mut log = inner.log.lock().unwrap();
                    log.failures.push(Failure {
                        conn,
                        reason,
                        bytes: buf[..buf.len().min(2048)].to_vec(),
                        after: last,
                    });
                    drop(log);
                    inner.changed.notify_waiters();
                    failed = true;
                    break;
                }
            }
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if failed {
            return;
        }
        // Read more; idle only while the socket is empty and nothing is buffered.
        loop {
            match io.try_read(&mut tmp) {
                Ok(0) => {
                    if !buf.is_empty() {
                        inner.log.lock().unwrap().incomplete.push((conn, buf));
                    }
                    return;
                }
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if buf.is_empty() {
                        busy.set(false);
                    }
                    if io.readable().await.is_err() {
                        return;
                    }
                    busy.set(true);
                }
                Err(_) => return,
            }
        }
    }
}
