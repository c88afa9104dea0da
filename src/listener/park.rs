//! HTTP/1 connections served by hyper, parked while idle: once a
//! connection has been idle for [`PARK_AFTER`] (nothing in flight, no head
//! started), hyper's connection state and its buffers are dropped and the
//! socket waits with no buffer at all until the client sends again, when a
//! new hyper connection takes over with the bytes already read (nginx frees
//! its request buffers on keep-alive the same way). Its link to the app
//! goes back to the shared pool at the same moment.
//!
//! This uses hyper's documented way out of a connection:
//! `graceful_shutdown` on an idle connection, then `into_parts` for the
//! socket and the unread bytes (the socket is kept open: [`ConnIo`] ignores
//! the shutdown while `parking` is set).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use super::conn::{next_bytes, ConnBody};
use super::io::{ConnIo, ConnState, Prefixed};
use crate::app::App;
use crate::error::BoxError;
use crate::exchange::ConnInfo;
use crate::metrics::ConnectionGuard;
use crate::request::{MAX_HEADERS, MAX_HEAD_BYTES};

/// How long an HTTP/1 connection sits idle before it is parked. Busy
/// connections never reach it.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

pub(super) async fn serve_http1<IO, S>(
    mut io: ConnIo<IO>,
    mut prefix: BytesMut,
    mut service: S,
    state: Arc<ConnState>,
    info: Arc<ConnInfo>,
    app: &App,
    mut drain: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // ConnIo bounds every head (header_timeout) and idle time. The
        // parser's buffer is a coarse bound; the gate enforces the exact
        // head limit (request::MAX_HEAD_BYTES) with a JSON 431.
        .header_read_timeout(None)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES.max(8192) + 1024)
        .keep_alive(true);
    let parked = &app.metrics.parked_connections;
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
        // socket down and hands the socket back.
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
        info.home.release();
        let _parked = ConnectionGuard::new(parked);
        if next_bytes(&mut io, &mut prefix, &mut drain).await.is_none() {
            return;
        }
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
