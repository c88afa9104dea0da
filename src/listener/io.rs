//! Client connection I/O with keygate's bounds and its head scan:
//!
//! - a request head in progress (from its first byte, as the scan sees it,
//!   on every head of every connection — pipelined ones too) must complete
//!   within `listen.header_timeout` (slowloris, a stalled HTTP/2 preface);
//! - with nothing in flight and no head started, the connection may idle
//!   for `listen.idle_timeout`, then it is closed (keep-alive limit, idle
//!   HTTP/2 connections and WebSocket tunnels: bytes either way count);
//! - on HTTP/1, every byte read goes through [`HeadScanner`] before hyper
//!   sees it, and the verdicts wait in [`ConnState`] for their requests.
//!
//! The timer is lazy: it is only re-armed when it fires early.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::scan::{parsed_fingerprint, HeadScanner, Verdict};
use crate::error::Rejection;

/// Most verdicts kept ahead of their requests (pipelined heads hyper has
/// not reached yet); beyond, the scan counts as lost.
const MAX_VERDICTS: usize = 4096;

/// `head_started_ms` when no head is in progress.
const NONE: u64 = u64::MAX;

/// Per-connection activity shared by [`ConnIo`] and the service.
pub struct ConnState {
    born: Instant,
    /// Milliseconds after `born` of the last byte read or written.
    last_activity_ms: AtomicU64,
    /// When the current request head began ([`NONE`]: none in progress).
    head_started_ms: AtomicU64,
    /// While set, [`ConnIo`] does not shut the socket down: hyper is ending
    /// an idle connection that is being parked, not closed.
    pub(super) parking: AtomicBool,
    inflight: AtomicUsize,
    /// Set once a request was answered with 101: from then on only the idle
    /// rule applies, and nothing more is scanned.
    upgraded: AtomicBool,
    /// The scan's verdicts, in head order, until their requests arrive;
    /// [`Entry::Lost`] where the scan lost track of the stream.
    verdicts: Mutex<VecDeque<Entry>>,
    /// The scan lost track of the stream: every later head is unjudged.
    lost: AtomicBool,
    /// The read side's waker while a request is in flight, so the idle timer
    /// is armed as soon as the last response is done.
    read_waker: Mutex<Option<Waker>>,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Verdict(Verdict),
    /// The scan lost track here: nothing after is judged.
    Lost,
}

/// What the connection knows about a parsed request's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Judged by the scan (HTTP/2: by the protocol itself); with the refusal
    /// the bytes earned, if any.
    Yes(Option<Rejection>),
    /// No verdict matches it: never served, and the connection closes.
    No,
}

impl ConnState {
    pub fn new() -> ConnState {
        ConnState {
            born: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            // A new connection is "a request head in progress" from the start.
            head_started_ms: AtomicU64::new(0),
            parking: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            verdicts: Mutex::new(VecDeque::new()),
            lost: AtomicBool::new(false),
            read_waker: Mutex::new(None),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.born).as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    fn touch(&self, now: Instant) {
        self.last_activity_ms.store(self.ms(now), Ordering::Relaxed);
    }

    pub fn last_activity(&self) -> Instant {
        self.at(self.last_activity_ms.load(Ordering::Relaxed))
    }

    fn head_started(&self) -> Option<Instant> {
        match self.head_started_ms.load(Ordering::Acquire) {
            NONE => None,
            ms => Some(self.at(ms)),
        }
    }

    /// Nothing in flight, no request head started, not a tunnel.
    pub fn is_idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0
            && !self.upgraded.load(Ordering::Acquire)
            && self.head_started_ms.load(Ordering::Acquire) == NONE
    }

    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// The verdict for the next parsed request (the oldest one, when its
    /// fingerprint is this request's; else the request is unjudged), and
    /// whether the connection must close after its response: the scan
    /// cannot tell where the head after it begins.
    pub fn take_verdict(&self, method: &http::Method, uri: &http::Uri) -> (Judged, bool) {
        let mut q = lock(&self.verdicts);
        match q.pop_front() {
            Some(Entry::Verdict(v)) if v.fingerprint == parsed_fingerprint(method, uri) => {
                let last = matches!(q.front(), Some(Entry::Lost));
                (Judged::Yes(v.refusal), last)
            }
            Some(Entry::Verdict(_)) => {
                // Out of step with the parser: nothing after this is trusted.
                self.lost.store(true, Ordering::Release);
                q.clear();
                q.push_back(Entry::Lost);
                (Judged::No, true)
            }
            Some(Entry::Lost) => {
                q.push_front(Entry::Lost);
                (Judged::No, true)
            }
            None => (Judged::No, true),
        }
    }

    fn push_verdict(&self, v: Verdict) {
        let mut q = lock(&self.verdicts);
        if self.lost.load(Ordering::Acquire) {
            return;
        }
        if q.len() >= MAX_VERDICTS {
            q.push_back(Entry::Lost);
            self.lost.store(true, Ordering::Release);
            return;
        }
        q.push_back(Entry::Verdict(v));
    }

    /// The scan lost track of the stream after the verdicts pushed so far.
    fn push_lost(&self) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            lock(&self.verdicts).push_back(Entry::Lost);
        }
    }
}

impl Default for ConnState {
    fn default() -> Self {
        ConnState::new()
    }
}

/// Held from the moment a request head is parsed until its response body is done.
pub struct InflightGuard {
    state: Arc<ConnState>,
}

impl InflightGuard {
    pub fn new(state: Arc<ConnState>) -> InflightGuard {
        state.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard { state }
    }

    pub fn state(&self) -> &ConnState {
        &self.state
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.state.inflight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.state.upgraded.load(Ordering::Acquire)
        {
            // Idle now: let the read side arm the idle timer. (Only HTTP/2
            // and tunnels need it: an idle HTTP/1 connection parks and its
            // parked read arms the timer; waking would cost every request
            // one more poll of the connection.)
            if let Some(w) = lock(&self.state.read_waker).take() {
                w.wake();
            }
        }
    }
}

/// The connection's bytes, with the bounds and the scan described above.
pub struct ConnIo<T> {
    inner: T,
    state: Arc<ConnState>,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// HTTP/1 only, from [`ConnIo::begin_http1`] on.
    scan: Option<HeadScanner>,
}

impl<T> ConnIo<T> {
    pub fn new(
        inner: T,
        state: Arc<ConnState>,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        ConnIo {
            inner,
            state,
            header_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(now + header_timeout)),
            scan: None,
        }
    }

    /// The connection speaks HTTP/1: scan every head from here on, starting
    /// with `prefix` (the bytes the protocol decision read).
    pub fn begin_http1(&mut self, key_prefix: &str, prefix: &[u8]) {
        self.scan = Some(HeadScanner::new(key_prefix));
        self.scanned(prefix, Instant::now());
    }

    /// The connection speaks HTTP/2 (preface complete): requests are
    /// multiplexed frames, only the idle rule applies between them.
    pub fn begin_http2(&mut self) {
        self.state.head_started_ms.store(NONE, Ordering::Release);
    }

    /// Feeds the scan and tracks whether a head is in progress.
    fn scanned(&mut self, bytes: &[u8], now: Instant) {
        let Some(scan) = &mut self.scan else { return };
        if self.state.upgraded.load(Ordering::Acquire) {
            scan.stop();
        }
        let state = &self.state;
        let was = scan.in_head();
        scan.feed(bytes, &mut |v| state.push_verdict(v));
        if scan.is_lost() {
            state.push_lost();
        }
        let is = scan.in_head();
        if is && (!was || state.head_started_ms.load(Ordering::Acquire) == NONE) {
            state
                .head_started_ms
                .store(state.ms(now), Ordering::Release);
        } else if !is {
            state.head_started_ms.store(NONE, Ordering::Release);
        }
    }

    /// `Some(deadline)` when a deadline applies now.
    fn deadline(&self) -> Option<Instant> {
        if let Some(started) = self.state.head_started() {
            return Some(started + self.header_timeout);
        }
        if self.state.inflight.load(Ordering::Acquire) > 0 {
            return None;
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
                    this.scanned(&buf.filled()[before..], now);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.state.inflight.load(Ordering::Acquire) > 0 {
                    let mut w = lock(&this.state.read_waker);
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
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
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch(Instant::now());
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch(Instant::now());
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

/// Bytes already read from the client, served before the rest of the stream
/// (the protocol decision's, or what a parked connection read first).
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    /// The prefix bytes not yet read, and the stream.
    pub fn into_parts(self) -> (Bytes, T) {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
