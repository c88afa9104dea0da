//! Stage 6: forward to the app. Header hygiene happens here, in one pass over
//! the request headers: hop-by-hop and `Connection`-named headers go, client
//! copies of identity headers go (in every spelling an app framework may fold
//! into the same name), then keygate's own headers are *inserted* — the
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
use crate::metrics::Metrics;
use crate::shutdown::Tracker;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type Sender = hyper::client::conn::http1::SendRequest<RequestBody>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    /// This client connection's own keep-alive connection to the app (HTTP/1
    /// clients send one request at a time, so one upstream link serves them
    /// with no pool, no lock contention and no checkout).
    upstream: std::sync::Mutex<Option<Link>>,
}

/// Most client connections that hold their own link to the app at once;
/// beyond it requests share the pooled client (so 10k idle clients do not
/// mean 10k idle connections to the app).
pub const MAX_OWN_LINKS: usize = 1024;

/// A client connection's own upstream link, counted against [`MAX_OWN_LINKS`]
/// for as long as it exists.
struct Link {
    sender: Option<Sender>,
    count: Arc<AtomicUsize>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, trusted_proxies: &[IpNet], tls: bool) -> ConnInfo {
        let ip = peer.ip().to_canonical();
        let peer_header =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_header,
            trusted: trusted_proxies.iter().any(|net| net.contains(&ip)),
            tls,
            upstream: std::sync::Mutex::new(None),
        }
    }
}

/// The body keygate sends back: its own small JSON, or the app's streamed body.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream(inc) => Pin::new(inc).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
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
    /// Pooled client: HTTP/2 clients (multiplexed streams) and upgrades.
    client: Client<Connector, RequestBody>,
    /// Connector for the per-connection links of HTTP/1 clients.
    connector: Connector,
    /// `scheme://authority/` of the app, what the connector dials.
    base: Uri,
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
        let pooled = connector.clone();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(pooled);
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
        let base = Uri::builder()
            .scheme(url.scheme().cloned().unwrap_or(Scheme::HTTP))
            .authority(
                url.authority()
                    .cloned()
                    .ok_or_else(|| "upstream.url: missing host".to_string())?,
            )
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream.url: {e}"))?;
        Ok(Forwarder {
            client,
            connector,
            base,
            links: Arc::default(),
            scheme: url.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: url
                .authority()
                .cloned()
                .ok_or_else(|| "upstream.url: missing host".to_string())?,
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
            mut parts,
            body,
            identity,
            request_id,
            upgrade: client_upgrade,
            bytes_in,
            host,
        } = out;
        let websocket = client_upgrade.is_some();
        let client_h2 = parts.version == Version::HTTP_2;
        self.clean_request_headers(&mut parts.headers, conn);
        let headers = &mut parts.headers;
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        headers.insert(header::HOST, host);
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if websocket {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if let Identity::OrgKey(principal) = &identity {
            headers.remove(header::AUTHORIZATION);
            if let Some(auth) = &self.authorization {
                headers.insert(header::AUTHORIZATION, auth.clone());
            }
            // Last, with insert: nothing before can have removed or duplicated it.
            headers.insert(
                self.principal_header.clone(),
                principal.header_value().clone(),
            );
        }

        // Origin-form towards the app; an absolute-form target with an empty
        // path (`http://host?q`) becomes `/?q`.
        let path_and_query = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            Some(pq) => PathAndQuery::try_from(format!("/{}", pq.as_str()))
                .map_err(|_| Rejection::BadTarget)?,
            None => PathAndQuery::from_static("/"),
        };
        let Ok(uri) = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
        else {
            return Err(Rejection::BadTarget);
        };
        let mut req = Request::new(RequestBody {
            inner: body,
            counter: bytes_in,
        });
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = parts.headers;

        let started = Instant::now();
        let link = if websocket || client_h2 {
            None
        } else {
            self.lease_link(conn)
        };
        let result = match link {
            Some(link) => {
                tokio::time::timeout(self.timeout, self.send_on_own_link(conn, link, req)).await
            }
            None => {
                tokio::time::timeout(self.timeout, async {
                    self.client.request(req).await.map_err(BoxError::from)
                })
                .await
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
            if let Some(client_upgrade) = client_upgrade {
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
                return Ok(Response::from_parts(parts, ProxyBody::Upstream(body)));
            }
            // A 101 to a request that did not ask for a WebSocket: never tunnel.
            tracing::warn!("upstream answered 101 to a request without an allowed upgrade");
            return Err(Rejection::UpstreamUnreachable);
        }

        let (mut parts, body) = resp.into_parts();
        clean_response_headers(&mut parts.headers, false);
        parts
            .headers
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        Ok(Response::from_parts(parts, ProxyBody::Upstream(body)))
    }

    /// Send on this client connection's own upstream link, (re)connecting when
    /// there is none or it was closed; a request the link did not take (the
    /// app closed it between requests) is retried once on a fresh link.
    /// This connection's idle link, or a new (not yet connected) one while
    /// fewer than [`MAX_OWN_LINKS`] exist; `None`: use the pooled client.
    fn lease_link(&self, conn: &ConnInfo) -> Option<Link> {
        let parked = conn.upstream.lock().ok().and_then(|mut slot| slot.take());
        if let Some(mut link) = parked {
            // Busy or closed (e.g. concurrent streams, the app hung up): reconnect.
            if !link.sender.as_ref().is_some_and(|s| s.is_ready()) {
                link.sender = None;
            }
            return Some(link);
        }
        if self.links.fetch_add(1, Ordering::AcqRel) < MAX_OWN_LINKS {
            Some(Link {
                sender: None,
                count: self.links.clone(),
            })
        } else {
            self.links.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    async fn send_on_own_link(
        &self,
        conn: &ConnInfo,
        mut link: Link,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        // A bare connection writes the target as given: origin-form.
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
        let (mut sender, reused) = match link.sender.take() {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        let result = sender.try_send_request(req).await;
        let result = match result {
            Err(mut e) if reused && e.message().is_some() => {
                // Never written: safe to send again on a new link.
                let req = e.take_message().ok_or("request lost")?;
                sender = self.connect().await?;
                sender.try_send_request(req).await
            }
            other => other,
        };
        // The link serves this connection's next request once the response
        // body is done (`is_ready` tells).
        link.sender = Some(sender);
        if let Ok(mut slot) = conn.upstream.lock() {
            *slot = Some(link);
        }
        result.map_err(|e| BoxError::from(e.into_error()))
    }

    async fn connect(&self) -> Result<Sender, BoxError> {
        use tower_service::Service;
        let io = self.connector.clone().call(self.base.clone()).await?;
        let (sender, link) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(err) = link.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// One pass over the client's headers: collect what must go, then remove it.
    fn clean_request_headers(&self, headers: &mut HeaderMap, conn: &ConnInfo) {
        let mut doomed: Vec<HeaderName> = Vec::new();
        let principal = self.principal_header.as_str().as_bytes();
        for name in headers.keys() {
            let s = name.as_str();
            if is_hop_by_hop(s) || s == "expect" {
                doomed.push(name.clone());
                continue;
            }
            let b = s.as_bytes();
            if folds_to(b, principal) || IDENTITY_HEADERS.iter().any(|t| folds_to(b, t.as_bytes()))
            {
                doomed.push(name.clone());
            }
        }
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        doomed.extend(connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t).ok()));
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
        for name in doomed {
            headers.remove(&name);
        }
        // HTTP/2 may split cookies over several fields; an HTTP/1.1 app expects one.
        if headers.get_all(header::COOKIE).iter().nth(1).is_some() {
            let joined = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join("; ");
            if let Ok(v) = HeaderValue::from_str(&joined) {
                headers.insert(header::COOKIE, v);
            }
        }
        headers.insert(X_FORWARDED_FOR.clone(), xff);
    }
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
