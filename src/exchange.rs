//! The floor every stage stands on: what one client connection is
//! ([`ConnInfo`]), the bodies that cross keygate ([`ClientBody`] in,
//! [`ProxyBody`] out), request ids, and keygate's own JSON answers. It
//! depends on no stage above it, so the listener, the gate, the keys API
//! and the forwarder all import it and none imports another's internals.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::error::BoxError;
use crate::upstream::{Home, UpstreamBody};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Per-connection facts (computed once per connection).
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer address as a header value (X-Forwarded-For).
    pub peer_header: HeaderValue,
    /// Whether the peer is in `listen.trusted_proxies`.
    pub trusted: bool,
    pub tls: bool,
    /// This client connection's own link to the app, between requests.
    pub home: Arc<Home>,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        trusted_proxies: &[IpNet],
        tls: bool,
        home: Arc<Home>,
    ) -> ConnInfo {
        let ip = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_header,
            trusted: trusted_proxies.iter().any(|net| net.contains(&ip)),
            tls,
            home,
        }
    }
}

/// The body keygate sends back: its own small JSON, or the app's, streamed.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(body) => body.size_hint(),
        }
    }
}

/// The client's request body as keygate reads it: trailers dropped, bytes
/// counted for the access log. (Each reader bounds its waits with
/// `listen.body_timeout`: the upstream link between frames, the keys API
/// around its bounded read.)
pub struct ClientBody {
    inner: Incoming,
    counter: Option<Arc<AtomicU64>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, counter: Option<Arc<AtomicU64>>) -> ClientBody {
        ClientBody { inner, counter }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            // Trailers are always the last frame: dropping them ends the body.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Poll::Ready(None),
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(c), Some(d)) = (&self.counter, frame.data_ref()) {
                    c.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's `X-Request-Id` when it is one sane value, else a new one.
pub fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    let mut all = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (all.next(), all.next()) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@".contains(c))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// 32 random hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::random();
    let mut id = [0u8; 32];
    for (i, c) in id.iter_mut().enumerate() {
        *c = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// One of keygate's own JSON answers.
pub fn json_response(
    status: http::StatusCode,
    body: Bytes,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    resp
}
