//! Stage 6: forward to the app. Header hygiene happens here, in one pass over
//! the request headers: hop-by-hop and `Connection`-named headers go, client
//! copies of identity headers go (in every spelling an app framework may fold
//! into the same name), then keygate's own headers are added — the
//! principal header last, and only from a [`Principal`], so no code path can
//! forward an org-key request without a successful check.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;

use crate::auth::Principal;
use crate::config::Config;
use crate::error::Rejection;
use crate::link::{self, Link, LinkBody};
use crate::metrics::Metrics;
use crate::shutdown::Tracker;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who the forwarded request is from, as far as the app is told.
pub enum Identity {
    /// A valid org key: the principal header is set, Authorization removed or replaced.
    OrgKey(Principal),
    /// Anonymous or a credential keygate does not own: forwarded untouched.
    Passthrough,
}

/// Per-connection facts the forwarder needs (computed once per connection).
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer address as a header value (X-Forwarded-For).
    pub peer_header: HeaderValue,
    /// Whether the peer is in `listen.trusted_proxies`.
    pub trusted: bool,
    pub tls: bool,
    /// This client connection's own keep-alive connection to the app, idle
    /// between requests (HTTP/1 clients send one request at a time, so one
    /// link serves them with no pool, no contention and no checkout).
    upstream: link::Home,
}

/// Most client connections that hold their own link to the app at once;
/// beyond it requests share the pooled client (so 10k idle clients do not
/// mean 10k idle connections to the app).
pub const MAX_OWN_LINKS: usize = 1024;

impl ConnInfo {
    /// The connection is parked: its idle link keeps its socket, not its buffer.
    pub fn release_idle_buffers(&self) {
        if let Some(link) = self.upstream.lock().ok().as_mut().and_then(|s| s.as_mut()) {
            link.release_buffer();
        }
    }

    pub fn new(peer: SocketAddr, trusted_proxies: &[IpNet], tls: bool) -> ConnInfo {
        let ip = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_header,
            trusted: trusted_proxies.iter().any(|net| net.contains(&ip)),
            tls,
            upstream: link::Home::default(),
        }
    }
}

/// The body keygate sends back: its own small JSON, or the app's streamed
/// body (from a connection's own link, or from the pooled client).
pub enum ProxyBody {
    Full(Option<Bytes>),
    Link(LinkBody),
    Upstream(Incoming),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
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
            ProxyBody::Link(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Upstream(inc) => Pin::new(inc)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Link(body) => body.is_end_stream(),
            ProxyBody::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Link(body) => body.size_hint(),
            ProxyBody::Upstream(inc) => inc.size_hint(),
        }
    }
}

/// The client's request body on its way to the app: streamed as is, trailers
/// dropped, bytes counted for the access log when it is on.
pub struct RequestBody {
    inner: Incoming,
    counter: Option<Arc<AtomicU64>>,
}

impl Body for RequestBody {
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request headers never forwarded: hop-by-hop (RFC 9110 §7.6.1 and the legacy
/// ones), and `Expect` (keygate already answered `100-continue` when it read the body).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Headers whose client copies are always dropped because keygate sets them or
/// because apps trust them for routing/identity.
const IDENTITY_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-uri",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
];

/// `a_b.C` → `a-b-c`: the spellings app frameworks fold into one header name
/// (CGI/WSGI/Rack turn `-` and `_` into the same variable; some also `.`).
fn folds_to(name: &[u8], target: &[u8]) -> bool {
    name.len() == target.len()
        && name.iter().zip(target).all(|(&a, &b)| {
            let a = match a {
                b'_' | b'.' => b'-',
                c => c.to_ascii_lowercase(),
            };
            a == b
        })
}

/// One admitted request on its way to the app.
pub struct Outbound<'a> {
    pub parts: Parts,
    pub body: Incoming,
    pub identity: Identity,
    pub request_id: &'a HeaderValue,
    /// The client side of a WebSocket upgrade, when the request asks for one.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Counts request body bytes (access log).
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// The Host to send, as the gate established it ([`crate::request::Admitted::host`]):
    /// as received over HTTP/1.1, `:authority` over HTTP/2.
    pub host: HeaderValue,
}

pub struct Forwarder {
    /// Pooled client: chunked uploads, HTTP/2 clients (multiplexed streams),
    /// upgrades, an `https` app, and clients past [`MAX_OWN_LINKS`].
    client: Client<Connector, RequestBody>,
    /// What own links dial: the app over plain HTTP (`None` for `https`).
    target: Option<link::Target>,
    /// Own links in existence (see [`MAX_OWN_LINKS`]).
    links: Arc<AtomicUsize>,
    scheme: Scheme,
    authority: Authority,
    timeout: Duration,
    principal_header: HeaderName,
    /// `Bearer <upstream.authorization>`, marked sensitive.
    authorization: Option<HeaderValue>,
}

impl Forwarder {
    pub fn new(config: &Config) -> Result<Forwarder, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.upstream.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::tls::upstream_client_config(config.upstream.ca_file.as_deref())
            .map_err(|e| format!("upstream.ca_file: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        let url = &config.upstream.url;
        let authorization = match &config.upstream.authorization {
            Some(secret) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
                    .map_err(|_| "upstream.authorization: not a valid header value".to_string())?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let authority = url
            .authority()
            .cloned()
            .ok_or_else(|| "upstream.url: missing host".to_string())?;
        let scheme = url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let target = (scheme == Scheme::HTTP).then(|| link::Target {
            addr: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            connect_timeout: config.upstream.connect_timeout,
        });
        Ok(Forwarder {
            client,
            target,
            links: Arc::default(),
            scheme,
            authority,
            timeout: config.upstream.timeout,
            principal_header: config.auth.principal_header.clone(),
            authorization,
        })
    }

    /// Forward one admitted request; returns the app's response (hop-by-hop
    /// headers removed) or the rejection to answer with.
    pub async fn forward(
        &self,
        out: Outbound<'_>,
        conn: &ConnInfo,
        tunnels: &Tracker,
        metrics: &Metrics,
    ) -> Result<Response<ProxyBody>, Rejection> {
        let Outbound {
            parts,
            body,
            identity,
            request_id,
            upgrade: client_upgrade,
            bytes_in,
            host,
        } = out;
        let websocket = client_upgrade.is_some();
        let client_h2 = parts.version == Version::HTTP_2;
        let own_headers = OwnHeaders {
            host: &host,
            request_id,
            websocket,
            identity: &identity,
        };

        // Origin-form towards the app; an absolute-form target with an empty
        // path (`http://host?q`) becomes `/?q`.
        let path_and_query = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            Some(pq) => PathAndQuery::try_from(format!("/{}", pq.as_str()))
                .map_err(|_| Rejection::BadTarget)?,
            None => PathAndQuery::from_static("/"),
        };

        let started = Instant::now();
        // An HTTP/1 client's request without a body or with a
        // Content-Length goes over the connection's own link (link.rs);
        // chunked uploads, HTTP/2, upgrades and an https app over the pool.
        let bodyless = body.is_end_stream();
        let sized = bodyless || body.size_hint().exact().is_some();
        let own = match &self.target {
            Some(target) if !websocket && !client_h2 && sized => {
                self.lease_link(conn).map(|l| (l, target))
            }
            _ => None,
        };
        let result = match own {
            Some((lease, target)) => {
                let head = self.request_head(
                    &parts.method,
                    &path_and_query,
                    &parts.headers,
                    conn,
                    &own_headers,
                );
                let req = link::Request {
                    head: &head,
                    head_method: parts.method == Method::HEAD,
                    idempotent: parts.method.is_idempotent(),
                    body: (!bodyless).then_some(RequestBody {
                        inner: body,
                        counter: bytes_in,
                    }),
                };
                tokio::time::timeout(self.timeout, link::send(lease, target, &conn.upstream, req))
                    .await
                    .map(|r| {
                        r.map(|resp| resp.map(ProxyBody::Link))
                            .map_err(BoxError::from)
                    })
            }
            None => {
                let Ok(uri) = Uri::builder()
                    .scheme(self.scheme.clone())
                    .authority(self.authority.clone())
                    .path_and_query(path_and_query)
                    .build()
                else {
                    return Err(Rejection::BadTarget);
                };
                let mut headers = HeaderMap::with_capacity(parts.headers.len() + 8);
                self.forwarded_headers(&parts.headers, conn, &own_headers, |name, value| {
                    headers.append(name.clone(), value.clone());
                });
                let mut req = Request::new(RequestBody {
                    inner: body,
                    counter: bytes_in,
                });
                *req.method_mut() = parts.method;
                *req.uri_mut() = uri;
                *req.version_mut() = Version::HTTP_11;
                *req.headers_mut() = headers;
                tokio::time::timeout(self.timeout, async {
                    self.client.request(req).await.map_err(BoxError::from)
                })
                .await
                .map(|r| r.map(|resp| resp.map(ProxyBody::Upstream)))
            }
        };
        metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
        let mut resp = match result {
            Ok(Ok(resp)) => resp,
            Ok(Err(err)) => {
                tracing::warn!(error = %ErrorChain(err.as_ref()), "upstream request failed");
                return Err(Rejection::UpstreamUnreachable);
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "upstream response head timed out");
                return Err(Rejection::UpstreamTimeout);
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let (Some(client_upgrade), ProxyBody::Upstream(_)) = (client_upgrade, resp.body()) {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let guard = tunnels.track();
                tokio::spawn(async move {
                    let _guard = guard;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            let mut client = TokioIo::new(client);
                            let mut upstream = TokioIo::new(upstream);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(err) => tracing::debug!(error = %err, "websocket upgrade failed"),
                    }
                });
                let (mut parts, body) = resp.into_parts();
                clean_response_headers(&mut parts.headers, true);
                parts
                    .headers
                    .insert(X_REQUEST_ID.clone(), request_id.clone());
                return Ok(Response::from_parts(parts, body));
            }
            // A 101 to a request that did not ask for a WebSocket: never tunnel.
            tracing::warn!("upstream answered 101 to a request without an allowed upgrade");
            return Err(Rejection::UpstreamUnreachable);
        }

        let headers = resp.headers_mut();
        clean_response_headers(headers, false);
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        Ok(resp)
    }

    /// This connection's idle link, or a new (not yet connected) one while
    /// fewer than [`MAX_OWN_LINKS`] exist; `None`: use the pooled client.
    fn lease_link(&self, conn: &ConnInfo) -> Option<Link> {
        let parked = conn.upstream.lock().ok().and_then(|mut slot| slot.take());
        match parked {
            Some(mut link) => {
                link.check_idle();
                Some(link)
            }
            None => Link::lease(&self.links, MAX_OWN_LINKS),
        }
    }

    /// The request headers the app receives, in one pass and without
    /// touching the client's map: the client's fields minus hop-by-hop and
    /// `Connection`-named ones, client copies of identity headers (in every
    /// spelling an app framework may fold into the same name) and the fields
    /// keygate replaces; then keygate's own, the principal header last and
    /// only from a [`Principal`].
    fn forwarded_headers(
        &self,
        headers: &HeaderMap,
        conn: &ConnInfo,
        own: &OwnHeaders<'_>,
        mut emit: impl FnMut(&HeaderName, &HeaderValue),
    ) {
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        let listed: Vec<&[u8]> = if headers.contains_key(header::CONNECTION) {
            connection_tokens(headers).collect()
        } else {
            Vec::new()
        };
        let org_key = matches!(own.identity, Identity::OrgKey(_));
        let principal = self.principal_header.as_str().as_bytes();
        let mut cookies_done = false;
        for (name, value) in headers {
            let s = name.as_str();
            if is_hop_by_hop(s)
                || matches!(s, "expect" | "host" | "x-request-id")
                || (org_key && s == "authorization")
            {
                continue;
            }
            let b = s.as_bytes();
            if folds_to(b, principal)
                || IDENTITY_HEADERS.iter().any(|t| folds_to(b, t.as_bytes()))
                || listed.iter().any(|t| t.eq_ignore_ascii_case(b))
            {
                continue;
            }
            if name == header::COOKIE {
                // HTTP/2 may split cookies over several fields; an HTTP/1.1
                // app expects one.
                if cookies_done {
                    continue;
                }
                cookies_done = true;
                if let Some(joined) = joined_cookies(headers) {
                    emit(name, &joined);
                    continue;
                }
                for v in headers.get_all(header::COOKIE) {
                    emit(name, v);
                }
                continue;
            }
            emit(name, value);
        }

        // Keep the client's X-Forwarded-For only from a trusted proxy.
        let xff = if conn.trusted {
            let mut joined = String::new();
            for v in headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(v) = v.to_str() {
                    if !joined.is_empty() {
                        joined.push_str(", ");
                    }
                    joined.push_str(v);
                }
            }
            if joined.is_empty() {
                conn.peer_header.clone()
            } else {
                joined.push_str(", ");
                joined.push_str(conn.peer_header.to_str().unwrap_or("unknown"));
                HeaderValue::from_str(&joined).unwrap_or_else(|_| conn.peer_header.clone())
            }
        } else {
            conn.peer_header.clone()
        };
        static HTTPS: HeaderValue = HeaderValue::from_static("https");
        static HTTP: HeaderValue = HeaderValue::from_static("http");
        static UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");
        static WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");
        emit(&header::HOST, own.host);
        emit(&X_FORWARDED_FOR, &xff);
        emit(&X_FORWARDED_HOST, own.host);
        emit(&X_FORWARDED_PROTO, if conn.tls { &HTTPS } else { &HTTP });
        emit(&X_REQUEST_ID, own.request_id);
        if own.websocket {
            emit(&header::CONNECTION, &UPGRADE);
            emit(&header::UPGRADE, &WEBSOCKET);
        }
        if let Identity::OrgKey(principal) = own.identity {
            if let Some(auth) = &self.authorization {
                emit(&header::AUTHORIZATION, auth);
            }
            emit(&self.principal_header, principal.header_value());
        }
    }

    /// The request head as written to an own link: origin-form target, the
    /// forwarded headers, `Content-Length: 0` where a body-less request of a
    /// method that carries one would otherwise have no framing at all.
    fn request_head(
        &self,
        method: &Method,
        target: &PathAndQuery,
        headers: &HeaderMap,
        conn: &ConnInfo,
        own: &OwnHeaders<'_>,
    ) -> Vec<u8> {
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_str().as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_length = false;
        self.forwarded_headers(headers, conn, own, |name, value| {
            has_length |= name == header::CONTENT_LENGTH;
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        });
        if !has_length && matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            head.extend_from_slice(b"content-length: 0\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    }
}

/// What keygate adds to every forwarded request.
struct OwnHeaders<'a> {
    host: &'a HeaderValue,
    request_id: &'a HeaderValue,
    websocket: bool,
    identity: &'a Identity,
}

/// Several `Cookie` fields joined into one (`None`: one or none, or not text).
fn joined_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let all = headers.get_all(header::COOKIE);
    all.iter().nth(1)?;
    let joined = all
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    HeaderValue::from_str(&joined).ok()
}

/// Remove hop-by-hop headers from the app's response (keeping Upgrade and
/// Connection on a 101 that keygate tunnels).
pub fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let s = name.as_str();
        if upgrade && (s == "upgrade" || s == "connection") {
            continue;
        }
        if is_hop_by_hop(s) {
            doomed.push(name.clone());
        }
    }
    if !upgrade {
        doomed.extend(connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t).ok()));
    }
    for name in doomed {
        headers.remove(&name);
    }
}

/// The comma-separated tokens of every `Connection` header, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Whether a request asks for a WebSocket upgrade keygate may tunnel
/// (HTTP/1.1 GET with `Upgrade: websocket` and `Connection: upgrade`).
pub fn is_websocket_upgrade(parts_method: &Method, version: Version, headers: &HeaderMap) -> bool {
    if parts_method != Method::GET || version != Version::HTTP_11 {
        return false;
    }
    let upgrade_ws = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let conn_upgrade = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    upgrade_ws && conn_upgrade
}

/// Formats an error with its source chain (for logs only).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
