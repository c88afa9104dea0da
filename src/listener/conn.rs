//! One client connection: its protocol decided once, from its first bytes
//! (the full 24-byte HTTP/2 preface on cleartext, else ALPN over TLS), then
//! served by hyper — HTTP/2, or HTTP/1 with every head judged by the scan
//! ([`super::scan`]) and the connection parked while idle ([`super::park`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::io::{ConnIo, ConnState, InflightGuard, Judged, Prefixed};
use super::park;
use crate::app::App;
use crate::error::BoxError;
use crate::exchange::{ConnInfo, ProxyBody};
use crate::proxy::AccessRecord;
use crate::request::{MAX_HEADERS, MAX_HEAD_BYTES};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, decided once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// What TLS negotiated (`None`: cleartext, or no ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
}

/// Serves one connection until it closes, times out, or keygate drains.
pub async fn serve<IO>(
    io: IO,
    app: Arc<App>,
    info: Arc<ConnInfo>,
    alpn: Option<Alpn>,
    drain: watch::Receiver<bool>,
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
    );
    let mut drain = drain;
    let mut prefix = BytesMut::new();
    let Some(protocol) = decide(&mut io, &mut prefix, alpn, &mut drain).await else {
        return;
    };
    let service = {
        let app = app.clone();
        let info = info.clone();
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let info = info.clone();
            let guard = InflightGuard::new(state.clone());
            let head = req.method() == http::Method::HEAD;
            let (judged, last) = match protocol {
                Protocol::Http2 => (Judged::Yes(None), false),
                Protocol::Http1 => guard.state().take_verdict(req.method(), req.uri()),
            };
            // Boxed per request: hyper keeps the service future inline in
            // every connection's state (idle connections included) and moves
            // it there on each request.
            Box::pin(async move {
                let (mut resp, record) = crate::proxy::handle(app, info, req, judged).await;
                if head {
                    without_content(&mut resp);
                }
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    guard.state().mark_upgraded();
                } else if last {
                    // The scan cannot tell where the next head begins.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let (parts, body) = resp.into_parts();
                Ok::<_, Infallible>(Response::from_parts(
                    parts,
                    ConnBody {
                        inner: body,
                        _guard: guard,
                        record,
                        bytes_out: 0,
                    },
                ))
            })
        })
    };
    match protocol {
        Protocol::Http2 => {
            io.begin_http2();
            serve_http2(io, prefix.freeze(), service, drain).await
        }
        Protocol::Http1 => {
            io.begin_http1(&app.config.auth.key_prefix, &prefix);
            park::serve_http1(io, prefix, service, state, info, &app, drain).await
        }
    }
}

/// A HEAD answer keygate wrote itself (a refusal, the key API) keeps the
/// fields GET's would have, `Content-Length` included, and sends no content
/// (RFC 9110 §9.3.2): hyper leaves the body out on HTTP/1.1, but on HTTP/2
/// it would send it as DATA, a stream error for the client (RFC 9113
/// §8.1.1). The app's answers to HEAD already have no body.
fn without_content(resp: &mut Response<ProxyBody>) {
    if let ProxyBody::Full(Some(bytes)) = resp.body() {
        let len = bytes.len();
        resp.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
        *resp.body_mut() = ProxyBody::empty();
    }
}

/// Reads the first bytes (bounded by the header timeout) and decides the
/// protocol; `None` when the client left, timed out, or keygate drains.
async fn decide<IO>(
    io: &mut ConnIo<IO>,
    prefix: &mut BytesMut,
    alpn: Option<Alpn>,
    drain: &mut watch::Receiver<bool>,
) -> Option<Protocol>
where
    IO: AsyncRead + Unpin,
{
    match alpn {
        Some(Alpn::H2) => return Some(Protocol::Http2),
        Some(Alpn::Http1) => return Some(Protocol::Http1),
        None => {}
    }
    loop {
        next_bytes(io, prefix, drain).await?;
        let n = prefix.len().min(H2_PREFACE.len());
        if prefix[..n] != H2_PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
    }
}

async fn serve_http2<IO, S>(
    io: ConnIo<IO>,
    prefix: Bytes,
    service: S,
    mut drain: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ConnBody> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size((MAX_HEAD_BYTES + MAX_HEADERS * 32 + 1024) as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = http2.serve_connection(TokioIo::new(Prefixed::new(prefix, io)), service);
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
}

/// Reads more bytes into `buf` (through [`ConnIo`]: its bounds apply);
/// `None` when the client closed, timed out or keygate is draining.
pub(super) async fn next_bytes<IO>(
    io: &mut ConnIo<IO>,
    buf: &mut BytesMut,
    drain: &mut watch::Receiver<bool>,
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

/// The response body as sent to the client; keeps the request counted as in
/// flight until the body is finished (or dropped), then writes its access line.
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
    type Error = BoxError;

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
