//! The public listener: an accept loop that never dies on an accept error,
//! one task per connection, HTTP/1.1 and HTTP/2 (prior knowledge on
//! cleartext, ALPN over TLS: the first bytes decide), and the limits:
//! `max_connections`, header and idle timeouts (enforced by [`ConnIo`], which
//! also covers the HTTP/2 preface and idle HTTP/2 connections), header count
//! and size. An HTTP/1 connection idle for [`PARK_AFTER`] is parked: hyper's
//! state and buffers are dropped until the client sends again.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use crate::app::App;
use crate::error::Rejection;
use crate::forward::{ConnInfo, ProxyBody};
use crate::head_scan::{fingerprint_matches, Flagged, HeadScanner};
use crate::metrics::ConnectionGuard;
use crate::proxy::AccessRecord;
use crate::shutdown::{Signal, Tracker};
use crate::tls::TlsAcceptor;

use crate::request::{MAX_HEADERS, MAX_HEAD_BYTES};

pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<TlsAcceptor>>,
    mut shutdown: Signal,
) {
    let limits = Arc::new(Semaphore::new(app.config.listen.max_connections));
    let connections = Tracker::default();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    if let Some(tls) = &tls {
        spawn_reload_on_sighup(tls.clone(), shutdown.clone());
    }
    let mut backoff = Duration::from_millis(5);
    loop {
        // Hold a connection slot before accepting: at the limit, new clients
        // wait in the kernel backlog instead of being accepted and dropped.
        let permit = tokio::select! {
            p = limits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.recv() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.recv() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(err) => {
                // EMFILE/ENFILE/ECONNABORTED…: log, back off, keep serving.
                app.metrics.accept_errors.inc();
                tracing::error!(error = %err, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let guard = connections.track();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            let _open = ConnectionGuard::new(&app.metrics.open_connections);
            let info = Arc::new(ConnInfo::new(
                peer,
                &app.config.listen.trusted_proxies,
                tls.is_some(),
            ));
            match tls {
                None => serve_connection(stream, app, info, drain).await,
                // Boxed: the TLS handshake and stream are several KiB that a
                // plain connection's task should not reserve.
                Some(tls) => {
                    Box::pin(async move {
                        match tls.accept(stream).await {
                            Ok(stream) => serve_connection(stream, app, info, drain).await,
                            Err(err) => {
                                tracing::debug!(%peer, error = %err, "TLS handshake failed")
                            }
                        }
                    })
                    .await
                }
            }
        });
    }
    drop(listener);
    // Drain: in-flight requests and tunnels get `shutdown_grace` to finish.
    let _ = drain_tx.send(true);
    let grace = app.config.listen.shutdown_grace;
    let tunnels = app.tunnels.clone();
    let drained = tokio::time::timeout(grace, async {
        connections.wait_idle().await;
        tunnels.wait_idle().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.count(),
            tunnels = app.tunnels.count(),
            "shutdown grace elapsed; closing remaining connections"
        );
    }
}

fn spawn_reload_on_sighup(tls: Arc<TlsAcceptor>, mut shutdown: Signal) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install SIGHUP handler; TLS reload disabled");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
                },
                _ = shutdown.recv() => return,
            }
        }
    });
}

/// How long an HTTP/1 connection sits idle (nothing in flight, no request
/// head started) before it is parked: hyper's connection state and its two
/// 8 KiB buffers are dropped, and the socket waits with no buffer at all
/// until the client sends again (nginx frees its request buffers on
/// keep-alive the same way). Busy connections never reach it.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn serve_connection<IO>(
    io: IO,
    app: Arc<App>,
    info: Arc<ConnInfo>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let listen = &app.config.listen;
    let state = Arc::new(ConnState::new());
    let mut io = ConnIo::new(
        io,
        state.clone(),
        listen.header_timeout,
        listen.idle_timeout,
        &app.config.auth.key_prefix,
    );

    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // ConnIo enforces header and idle timeouts for both protocols. The
        // parser's buffer is a coarse bound; the gate enforces the exact
        // head limit (request::MAX_HEAD_BYTES) with a JSON 431.
        .header_read_timeout(None)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES.max(8192) + 1024)
        .keep_alive(true);

    let svc_state = state.clone();
    let parked = app.metrics.parked_connections.clone();
    let conn_info = info.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let info = info.clone();
        let guard = InflightGuard::new(svc_state.clone());
        let refused = svc_state.take_flagged(req.method(), req.uri());
        let fut = async move {
            let (resp, record) = crate::proxy::handle(app, info, req, refused).await;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                guard.state.upgraded.store(true, Ordering::Release);
            }
            let (parts, body) = resp.into_parts();
            Ok::<_, std::convert::Infallible>(Response::from_parts(
                parts,
                ConnBody {
                    inner: body,
                    _guard: guard,
                    record,
                    bytes_out: 0,
                },
            ))
        };
        // Boxed per request: hyper keeps the service future inline in every
        // connection's state (a few KiB, idle connections included) and
        // moves it there on each request.
        Box::pin(fut)
    });

    // The first bytes decide the protocol: the HTTP/2 preface (prior
    // knowledge, or after ALPN h2), else HTTP/1.
    let mut prefix = BytesMut::new();
    loop {
        match next_bytes(&mut io, &mut prefix, &mut drain).await {
            Some(()) => {}
            None => return,
        }
        let n = prefix.len().min(H2_PREFACE.len());
        if prefix[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            break;
        }
    }
    if prefix.starts_with(H2_PREFACE) {
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size((MAX_HEAD_BYTES + MAX_HEADERS * 32 + 1024) as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn =
            http2.serve_connection(TokioIo::new(Prefixed::new(prefix.freeze(), io)), service);
        let mut conn = Box::pin(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(err) = res {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|d| *d) => {}
        }
        conn.as_mut().graceful_shutdown();
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, "connection ended with an error during drain");
        }
        return;
    }

    let mut service = service;
    loop {
        let conn = http1
            .serve_connection(
                TokioIo::new(Prefixed::new(prefix.split().freeze(), io)),
                service,
            )
            .with_upgrades();
        let mut conn = Box::pin(conn);
        let draining = tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(err) = res {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|d| *d) => true,
            _ = idle_for(&state, PARK_AFTER) => false,
        };
        if draining {
            conn.as_mut().graceful_shutdown();
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "connection ended with an error during drain");
            }
            return;
        }

        // Park: hyper closes the idle connection without shutting the
        // socket down (ConnIo ignores the shutdown while parking) and hands
        // the socket back.
        state.parking.store(true, Ordering::Release);
        conn.as_mut().graceful_shutdown();
        let ended = conn.as_mut().await;
        state.parking.store(false, Ordering::Release);
        if let Err(err) = ended {
            tracing::debug!(error = %err, "connection ended with an error while parking");
            return;
        }
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return; // upgraded
        };
        let (rest, inner) = parts.io.into_inner().into_parts();
        io = inner;
        service = parts.service;
        prefix = BytesMut::from(&rest[..]);
        prefix.extend_from_slice(&parts.read_buf);
        // hyper's read buffer goes now, not at the end of this iteration.
        drop(parts.read_buf);
        if !prefix.is_empty() {
            continue;
        }
        conn_info.release_idle_buffers();
        let _parked = ConnectionGuard::new(&parked);
        if next_bytes(&mut io, &mut prefix, &mut drain).await.is_none() {
            return;
        }
    }
}

/// Reads more bytes into `buf` (through [`ConnIo`]: its timeouts apply);
/// `None` when the client closed, timed out or keygate is draining.
async fn next_bytes<IO>(
    io: &mut ConnIo<IO>,
    buf: &mut BytesMut,
    drain: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<()>
where
    IO: AsyncRead + Unpin,
{
    // Read into a stack buffer during the poll only: a parked connection
    // waiting here holds no buffer.
    let read = std::future::poll_fn(|cx| {
        let mut tmp = [0u8; 2048];
        let mut rb = ReadBuf::new(&mut tmp);
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(rb.filled());
                Poll::Ready(!rb.filled().is_empty())
            }
            Poll::Ready(Err(_)) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    });
    tokio::select! {
        got = read => got.then_some(()),
        _ = drain.wait_for(|d| *d) => None,
    }
}

/// Resolves once the connection has been idle for `after`: no request in
/// flight, no head started, not upgraded, nothing read or written.
async fn idle_for(state: &ConnState, after: Duration) {
    loop {
        let now = Instant::now();
        let due = state.last_activity() + after;
        if now >= due && state.is_idle() {
            return;
        }
        tokio::time::sleep_until(if now >= due { now + after } else { due }).await;
    }
}

/// Bytes already read from the client, served before the rest of the stream
/// (the protocol sniff, or what a parked connection read first).
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    /// The prefix bytes not yet read, and the stream.
    fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new(); // let go of the allocation
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Per-connection activity shared by [`ConnIo`] and the service.
pub struct ConnState {
    born: Instant,
    /// Milliseconds after `born` of the last byte read or written.
    last_activity_ms: AtomicU64,
    /// While set, [`ConnIo`] does not shut the socket down: hyper is ending
    /// an idle connection that is being parked, not closed.
    parking: AtomicBool,
    inflight: AtomicUsize,
    /// Set once a request was answered with 101, or the connection speaks
    /// HTTP/2: from then on only the idle rule applies.
    upgraded: AtomicBool,
    /// When the first byte of a not-yet-complete request head arrived.
    head_started: Mutex<Option<Instant>>,
    /// Heads the byte-level scan refused (see [`crate::head_scan`]), in order,
    /// until their parsed request arrives.
    flagged: Mutex<VecDeque<Flagged>>,
    has_flagged: AtomicBool,
    /// The read side's waker while a request is in flight, so the idle timer
    /// is armed as soon as the last response is done.
    read_waker: Mutex<Option<Waker>>,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            born: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            head_started: Mutex::new(None),
            flagged: Mutex::new(VecDeque::new()),
            has_flagged: AtomicBool::new(false),
            read_waker: Mutex::new(None),
        }
    }

    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.born).as_millis();
        self.last_activity_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.born + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Nothing in flight, no request head started, not a tunnel or HTTP/2.
    fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
            && !self.upgraded.load(Ordering::Acquire)
            && self.head_started.lock().is_ok_and(|h| h.is_none())
    }

    /// The refusal the head scan recorded for this request, if any.
    fn take_flagged(&self, method: &http::Method, uri: &http::Uri) -> Option<Rejection> {
        if !self.has_flagged.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.flagged.lock().ok()?;
        let hit = q
            .front()
            .is_some_and(|f| fingerprint_matches(&f.fingerprint, method, uri));
        let rejection = if hit {
            q.pop_front().map(|f| f.rejection)
        } else {
            None
        };
        self.has_flagged.store(!q.is_empty(), Ordering::Release);
        rejection
    }

    fn push_flagged(&self, f: Flagged) {
        if let Ok(mut q) = self.flagged.lock() {
            if q.len() >= 32 {
                q.pop_front();
            }
            q.push_back(f);
            self.has_flagged.store(true, Ordering::Release);
        }
    }
}

/// Held from the moment a request head is complete until its response body is done.
struct InflightGuard {
    state: Arc<ConnState>,
}

impl InflightGuard {
    fn new(state: Arc<ConnState>) -> InflightGuard {
        state.inflight.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut h) = state.head_started.lock() {
            *h = None;
        }
        InflightGuard { state }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.state.inflight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.state.upgraded.load(Ordering::Acquire)
        {
            // Idle now: let the read side arm the idle timer. (Only HTTP/2
            // and tunnels need it: an idle HTTP/1 connection parks after
            // PARK_AFTER, and its parked read arms the timer; waking would
            // cost every request one more poll of the connection.)
            if let Some(w) = self.state.read_waker.lock().ok().and_then(|mut w| w.take()) {
                w.wake();
            }
        }
    }
}

/// The response body as sent to the client; keeps the request counted as in
/// flight until the body is finished (or dropped).
pub struct ConnBody {
    inner: ProxyBody,
    _guard: InflightGuard,
    /// Written when the body is done (or abandoned), with the bytes sent.
    record: Option<Box<AccessRecord>>,
    bytes_out: u64,
}

impl Drop for ConnBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.emit(self.bytes_out);
        }
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = crate::forward::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                self.bytes_out += d.len() as u64;
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Client connection I/O with keygate's timeouts:
/// - no request in flight and a request head started: it must complete within
///   `header_timeout` (slowloris, including a stalled HTTP/2 preface);
/// - no request in flight and nothing received: the connection may idle for
///   `idle_timeout` (keep-alive limit), then it is closed.
///
/// The timer is lazy: it is only re-armed when it fires early.
pub struct ConnIo<T> {
    inner: T,
    state: Arc<ConnState>,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// `None` until the first bytes arrive; `Some(true)` for HTTP/2 (prior
    /// knowledge or ALPN), where requests are multiplexed and only the idle
    /// rule applies once the preface is in.
    http2: Option<bool>,
    /// Byte-level look at HTTP/1 heads (fragments, CL+TE, key + whitespace).
    scan: HeadScanner,
}

impl<T> ConnIo<T> {
    fn new(
        inner: T,
        state: Arc<ConnState>,
        header_timeout: Duration,
        idle_timeout: Duration,
        key_prefix: &str,
    ) -> Self {
        let now = Instant::now();
        // A new connection is "a request head in progress" from the start.
        if let Ok(mut h) = state.head_started.lock() {
            *h = Some(now);
        }
        ConnIo {
            inner,
            state,
            header_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(now + header_timeout)),
            http2: None,
            scan: HeadScanner::new(key_prefix),
        }
    }

    /// `Some(deadline)` when a deadline applies now.
    fn deadline(&self) -> Option<Instant> {
        if self.state.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.state.upgraded.load(Ordering::Acquire) {
            if let Ok(h) = self.state.head_started.lock() {
                if let Some(started) = *h {
                    return Some(started + self.header_timeout);
                }
            }
        }
        Some(self.state.last_activity() + self.idle_timeout)
    }

    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(deadline) = self.deadline() else {
            return Ok(());
        };
        loop {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client timed out (header or idle timeout)",
                ));
            }
            if self.timer.deadline() > deadline || self.timer.is_elapsed() {
                self.timer.as_mut().reset(deadline);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(()) => continue,
            }
        }
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    this.state.touch(now);
                    if this.http2.is_none() {
                        let h2 = buf.filled()[before..].starts_with(b"PRI ");
                        this.http2 = Some(h2);
                        if h2 {
                            this.state.upgraded.store(true, Ordering::Release);
                        }
                    }
                    let idle = this.state.inflight.load(Ordering::Acquire) == 0;
                    if idle && !this.state.upgraded.load(Ordering::Acquire) {
                        if let Ok(mut h) = this.state.head_started.lock() {
                            if h.is_none() {
                                *h = Some(now);
                                // A new head on an idle connection: resume a scan
                                // that stopped at a body it could not follow.
                                if this.scan.is_off() {
                                    this.scan.restart();
                                }
                            }
                        }
                    }
                    if this.http2 == Some(true) || this.state.upgraded.load(Ordering::Acquire) {
                        this.scan.stop();
                    }
                    let state = &this.state;
                    this.scan
                        .feed(&buf.filled()[before..], &mut |f| state.push_flagged(f));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.state.inflight.load(Ordering::Acquire) > 0 {
                    if let Ok(mut w) = this.state.read_waker.lock() {
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                    }
                }
                match this.check_deadline(cx) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            if *n > 0 {
                self.state.touch(Instant::now());
            }
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            if *n > 0 {
                self.state.touch(Instant::now());
            }
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.parking.load(Ordering::Acquire) {
            // hyper ends a connection being parked: the socket stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
