//! Bodies stream both ways without being held whole in memory (contract §3
//! step 6): a 1 GiB upload and a 1 GiB download pass through the BUILT
//! binary (`keygate serve`, memory store), and keygate's resident memory
//! grows by less than 64 MiB while they do (the 16 MiB goal is a benchmark,
//! not a test). The client generates and the app counts the bytes chunk by
//! chunk; nothing in this file holds a whole body either.
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::kg::{read_response, HOST};
use common::upstream::Upstream;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// keygate's RSS may grow by less than this while a body passes through.
const RSS_LIMIT: u64 = 64 * MIB;

// ---- the built binary ------------------------------------------------------------

/// `keygate serve` as a child process, killed when dropped.
struct Keygate {
    child: Child,
    public: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local addr")
}

impl Keygate {
    async fn start(upstream: SocketAddr) -> Keygate {
        let dir = tempfile::tempdir().expect("temp dir");
        let (public, admin) = (free_addr(), free_addr());
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            format!(
                "[listen]\naddr = \"{public}\"\n\n[admin]\naddr = \"{admin}\"\n\n\
                 [upstream]\nurl = \"http://{upstream}\"\n\n[tenant]\nslug = \"acme\"\n\n\
                 [store]\nbackend = \"memory\"\n\n[log]\nlevel = \"warn\"\n"
            ),
        )
        .expect("write config");
        let child = spawn(&path);
        let mut kg = Keygate {
            child,
            public,
            admin,
            _dir: dir,
        };
        kg.wait_healthy().await;
        kg
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                panic!("keygate exited during start-up: {status}");
            }
            if let Ok(mut s) = TcpStream::connect(self.admin).await {
                let req = "GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
                if s.write_all(req.as_bytes()).await.is_ok()
                    && read_response(&mut s).await.status == 200
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "keygate not healthy within 20s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// (VmRSS, VmHWM) in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} missing in /proc status"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keygate")
}

// ---- a generated body ------------------------------------------------------------

/// `len` bytes, produced 256 KiB at a time from one shared buffer.
struct Generated {
    left: u64,
    chunk: Bytes,
    /// Bytes handed to hyper so far (shared with the test).
    produced: Arc<AtomicU64>,
}

impl Generated {
    fn new(len: u64, produced: Arc<AtomicU64>) -> Generated {
        Generated {
            left: len,
            chunk: Bytes::from(vec![b'k'; 256 * 1024]),
            produced,
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        self.produced.fetch_add(n, Ordering::Relaxed);
        let data = self.chunk.slice(..n as usize);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

/// An app that answers `GET /big/<n>` with `n` generated bytes, chunked (no
/// Content-Length, so keygate cannot size anything up front). Returns the
/// address and the count of body bytes the app has produced.
async fn big_app() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let counter = produced.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let n = req
                            .uri()
                            .path()
                            .strip_prefix("/big/")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0u64);
                        Ok::<_, Infallible>(http::Response::new(Generated::new(n, counter)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, produced)
}

// ---- tests -----------------------------------------------------------------------

/// Warm keygate up (connection pool, buffers) so the baseline is fair.
async fn warm_up(kg: &Keygate, path: &str) {
    let mut s = TcpStream::connect(kg.public).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_bounded_memory() {
    let up = Upstream::start().await;
    let kg = Keygate::start(up.addr).await;
    warm_up(&kg, "/warm").await;
    let (rss_before, _) = kg.memory();

    let started = Instant::now();
    let mut s = TcpStream::connect(kg.public).await.unwrap();
    let head = format!(
        "PUT /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {GIB}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'u'; 256 * 1024];
    let mut sent = 0u64;
    while sent < GIB {
        let n = (GIB - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])
            .await
            .expect("keygate keeps reading");
        sent += n as u64;
    }
    let resp = read_response(&mut s).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 200, "{resp:?}");

    let seen = up.wait_for(2).await;
    let upload = &seen[1];
    assert_eq!(upload.uri.path(), "/upload");
    assert_eq!(upload.body_len as u64, GIB, "the app received every byte");

    let (rss_after, hwm) = kg.memory();
    let growth = hwm.max(rss_after).saturating_sub(rss_before);
    eprintln!(
        "upload 1 GiB in {elapsed:?}: RSS before {} MiB, after {} MiB, peak {} MiB, growth {} MiB",
        rss_before / MIB,
        rss_after / MIB,
        hwm / MIB,
        growth / MIB
    );
    assert!(
        growth < RSS_LIMIT,
        "keygate's RSS grew by {} MiB during a 1 GiB upload",
        growth / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_streams_with_bounded_memory() {
    let (app, _) = big_app().await;
    let kg = Keygate::start(app).await;
    warm_up(&kg, "/big/10").await;
    let (rss_before, _) = kg.memory();

    let started = Instant::now();
    let stream = TcpStream::connect(kg.public).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("/big/{GIB}"))
        .header("host", HOST)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("content-length").is_none(),
        "keygate invented a length"
    );
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body streams to the end");
        if let Some(d) = frame.data_ref() {
            received += d.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(received, GIB, "the client received every byte");

    let (rss_after, hwm) = kg.memory();
    let growth = hwm.max(rss_after).saturating_sub(rss_before);
    eprintln!(
        "download 1 GiB in {elapsed:?}: RSS before {} MiB, after {} MiB, peak {} MiB, growth {} MiB",
        rss_before / MIB,
        rss_after / MIB,
        hwm / MIB,
        growth / MIB
    );
    assert!(
        growth < RSS_LIMIT,
        "keygate's RSS grew by {} MiB during a 1 GiB download",
        growth / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_pushes_back_on_the_app() {
    // The client reads the response head and then nothing: keygate must stop
    // reading from the app (backpressure) instead of buffering the body.
    let (app, produced) = big_app().await;
    let kg = Keygate::start(app).await;
    warm_up(&kg, "/big/10").await;
    let (rss_before, _) = kg.memory();
    let warm = produced.load(Ordering::Relaxed);

    let mut s = TcpStream::connect(kg.public).await.unwrap();
    let req = format!("GET /big/{GIB} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Wait (bounded) until the app's output stops growing for 500 ms: the
    // pipe from app to client is full.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = produced.load(Ordering::Relaxed);
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = produced.load(Ordering::Relaxed);
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app kept sending for 15s to a client that reads nothing ({} MiB)",
            (now - warm) / MIB
        );
    }
    let in_flight = last - warm;
    let (rss_after, hwm) = kg.memory();
    let growth = hwm.max(rss_after).saturating_sub(rss_before);
    eprintln!(
        "stalled client: app produced {} MiB before backpressure, keygate RSS growth {} MiB",
        in_flight / MIB,
        growth / MIB
    );
    // Socket buffers on both sides hold some; keygate must not hold more.
    assert!(
        in_flight < RSS_LIMIT,
        "the app sent {} MiB to a stalled client",
        in_flight / MIB
    );
    assert!(in_flight > 0, "the download never started");
    assert!(
        growth < RSS_LIMIT,
        "keygate's RSS grew by {} MiB",
        growth / MIB
    );
    drop(s);
}
