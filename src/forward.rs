//! Stage 6: forward to the app. Header hygiene happens here, in one pass
//! over the request headers: hop-by-hop and `Connection`-named fields go,
//! framing fields go (keygate computes the framing from the body it
//! forwards: [`crate::h1::Framing`]), client copies of identity headers go
//! (in every spelling an app framework may fold into the same name), then
//! keygate's own fields are added — the principal header and the key's
//! scope (role and workspaces headers, §8) last, and only from a
//! [`Principal`], so no code path can forward an org-key request without a
//! successful check, nor set its scope from anything a client sent. The transport is [`crate::upstream`].

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, Version};
use http_body::Body;
use hyper::body::Incoming;

use crate::auth::scope::Role;
use crate::auth::Principal;
use crate::config::Config;
use crate::error::{ErrorChain, Rejection};
use crate::exchange::{ClientBody, ConnInfo, ProxyBody, X_REQUEST_ID};
use crate::h1::{Asked, Framing, RequestHead};
use crate::metrics::Metrics;
use crate::upstream::{Answer, AppConn, Exchange, Outbound as Sent, Upstream};

/// Who the forwarded request is from, as far as the app is told.
pub enum Identity {
    /// A valid org key: the principal header is set, Authorization removed or replaced.
    OrgKey(Principal),
    /// Anonymous or a credential keygate does not own: forwarded untouched.
    Passthrough,
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

/// What the app answered.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// A WebSocket upgrade the app accepted: relay it once the client's side
    /// is handed over (the caller does, so it can log the tunnel's end).
    pub tunnel: Option<Tunnel>,
}

/// Both sides of an accepted WebSocket upgrade.
pub struct Tunnel {
    pub client: hyper::upgrade::OnUpgrade,
    pub app: AppConn,
    /// The key that opened it: the tunnel closes when the key ends.
    pub key: Option<Principal>,
}

pub struct Forwarder {
    upstream: Upstream,
    principal_header: HeaderName,
    /// `auth.role_header` and `auth.workspaces_header` (§8): set or stripped
    /// exactly like the principal header.
    role_header: HeaderName,
    workspaces_header: HeaderName,
    /// `Bearer <upstream.authorization>`, marked sensitive.
    authorization: Option<HeaderValue>,
}

impl Forwarder {
    pub fn new(config: &Config) -> Result<Forwarder, String> {
        let authorization = match &config.upstream.authorization {
            Some(secret) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
                    .map_err(|_| "upstream.authorization: not a valid header value".to_string())?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Forwarder {
            upstream: Upstream::new(config)?,
            principal_header: config.auth.principal_header.clone(),
            role_header: config.auth.role_header.clone(),
            workspaces_header: config.auth.workspaces_header.clone(),
            authorization,
        })
    }

    /// The transport (for a new connection's home, and metrics).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Forward one admitted request; returns the app's response (hop-by-hop
    /// headers removed) or the rejection to answer with.
    pub async fn forward(
        &self,
        out: Outbound<'_>,
        conn: &ConnInfo,
        metrics: &Metrics,
    ) -> Result<Forwarded, Rejection> {
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

        // The framing is computed from the body keygate forwards, never
        // taken from a client field.
        let framing = if body.is_end_stream() {
            match parts.method {
                Method::POST | Method::PUT | Method::PATCH => Framing::Length(0),
                _ => Framing::Empty,
            }
        } else {
            match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        };
        if websocket && framing != Framing::Empty {
            // After a 101 the connection is a tunnel: a body would be in it.
            return Err(Rejection::BadRequest(
                "bad request: an upgrade request has a body",
            ));
        }

        // Origin-form towards the app; an absolute-form target with an
        // empty path (`http://host?q`) becomes `/?q`.
        let target = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => std::borrow::Cow::Borrowed(pq.as_str()),
            Some(pq) => std::borrow::Cow::Owned(format!("/{}", pq.as_str())),
            None => std::borrow::Cow::Borrowed("/"),
        };
        let mut head = RequestHead::new(&parts.method, &target);
        let own = OwnHeaders {
            host: &host,
            request_id,
            websocket,
            identity: &identity,
        };
        let mut refused = None;
        self.forwarded_headers(&parts.headers, conn, &own, |name, value| {
            if let Err(e) = head.header(name, value) {
                refused.get_or_insert(e);
            }
        });
        if let Some(e) = refused {
            // forwarded_headers never yields a framing field: a bug, not a client error.
            tracing::error!(error = %e, "refusing to forward a request head");
            return Err(Rejection::UpstreamUnreachable);
        }
        let exchange = Exchange {
            head: head.finish(framing),
            framing,
            body: (framing != Framing::Empty && framing != Framing::Length(0))
                .then(|| ClientBody::new(body, bytes_in)),
            asked: Asked {
                head: parts.method == Method::HEAD,
                upgrade: websocket,
            },
        };
        let sent = Sent {
            exchange,
            idempotent: parts.method.is_idempotent(),
            // HTTP/2 streams are concurrent, a tunnel never comes back: both
            // use the shared pool. HTTP/1 requests use the connection's link.
            home: (!websocket && parts.version != Version::HTTP_2).then(|| conn.home.clone()),
        };

        let started = Instant::now();
        let answer = self.upstream.send(sent).await;
        metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                let rejection = err.rejection();
                match rejection {
                    Rejection::BadBody | Rejection::BodyTimeout => {
                        tracing::info!(error = %ErrorChain(&err), "client request body failed")
                    }
                    _ => tracing::warn!(error = %ErrorChain(&err), "upstream request failed"),
                }
                return Err(rejection);
            }
        };
        match answer {
            Answer::Response(resp) => {
                let (mut parts, body) = resp.into_parts();
                // keygate answers in its own protocol version (RFC 9110
                // §6.2), never the app's: HTTP/1.1 (hyper answers an
                // HTTP/1.0 client in 1.0, an HTTP/2 one in frames).
                parts.version = Version::HTTP_11;
                clean_response_headers(&mut parts.headers, false);
                parts
                    .headers
                    .insert(X_REQUEST_ID.clone(), request_id.clone());
                Ok(Forwarded {
                    response: Response::from_parts(parts, ProxyBody::Upstream(body)),
                    tunnel: None,
                })
            }
            Answer::Upgrade(mut parts, app) => {
                let Some(client) = client_upgrade else {
                    // The codec refuses a 101 nobody asked for; never tunnel.
                    return Err(Rejection::UpstreamUnreachable);
                };
                clean_response_headers(&mut parts.headers, true);
                parts
                    .headers
                    .insert(X_REQUEST_ID.clone(), request_id.clone());
                let key = match identity {
                    Identity::OrgKey(p) => Some(p),
                    Identity::Passthrough => None,
                };
                Ok(Forwarded {
                    response: Response::from_parts(parts, ProxyBody::empty()),
                    tunnel: Some(Tunnel { client, app, key }),
                })
            }
        }
    }

    /// The request fields the app receives, in one pass and without
    /// touching the client's map: the client's fields minus hop-by-hop and
    /// `Connection`-named ones, framing fields, client copies of identity
    /// headers (in every spelling an app framework may fold into the same
    /// name) and the fields keygate replaces; then keygate's own, the
    /// principal header last and only from a [`Principal`].
    fn forwarded_headers(
        &self,
        headers: &HeaderMap,
        conn: &ConnInfo,
        own: &OwnHeaders<'_>,
        mut emit: impl FnMut(&HeaderName, &HeaderValue),
    ) {
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1);
        // the gate refused a Connection naming a framing field or Host.
        let listed: Vec<&[u8]> = if headers.contains_key(header::CONNECTION) {
            connection_tokens(headers).collect()
        } else {
            Vec::new()
        };
        let org_key = matches!(own.identity, Identity::OrgKey(_));
        let principal = self.principal_header.as_str().as_bytes();
        let role = self.role_header.as_str().as_bytes();
        let workspaces = self.workspaces_header.as_str().as_bytes();
        let mut cookies_done = false;
        for (name, value) in headers {
            let s = name.as_str();
            if is_hop_by_hop(s)
                || matches!(
                    s,
                    "content-length" | "transfer-encoding" | "expect" | "host" | "x-request-id"
                )
                || (org_key && s == "authorization")
            {
                continue;
            }
            let b = s.as_bytes();
            if folds_to(b, principal)
                || folds_to(b, role)
                || folds_to(b, workspaces)
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
            // The scope, from the proof only (§8).
            emit(&self.role_header, role_value(principal.role()));
            if let Some(ids) = principal.workspaces_header() {
                emit(&self.workspaces_header, ids);
            }
        }
    }
}

/// The value of `auth.role_header` for a key's role.
fn role_value(role: Role) -> &'static HeaderValue {
    static ADMIN: HeaderValue = HeaderValue::from_static("admin");
    static EDITOR: HeaderValue = HeaderValue::from_static("editor");
    static READER: HeaderValue = HeaderValue::from_static("reader");
    match role {
        Role::Admin => &ADMIN,
        Role::Editor => &EDITOR,
        Role::Reader => &READER,
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Fields never forwarded as received: hop-by-hop (RFC 9110 §7.6.1 and the
/// legacy ones).
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

/// Fields whose client copies are always dropped because keygate sets them
/// or because apps trust them for routing/identity.
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

/// Remove hop-by-hop fields from the app's response (keeping Upgrade and
/// Connection on a 101 that keygate tunnels). Framing fields are already
/// gone (the codec took them: the framing towards the client is computed).
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
pub fn is_websocket_upgrade(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    if method != Method::GET || version != Version::HTTP_11 {
        return false;
    }
    let upgrade_ws = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let conn_upgrade = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    upgrade_ws && conn_upgrade
}
