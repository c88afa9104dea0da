//! The request path, in the contract's order (§3):
//!
//! 1–3. [`request::Gate`]: target, Host, path — refusals never reach the app;
//! 4.   credential: org keys validated by [`auth::Authenticator`];
//! 5.   `/org/tokens` answered by [`keys_api`];
//! 6.   [`forward`] to the app.
//!
//! [`handle`] is the outer function: it turns any [`Rejection`] into the JSON
//! answer, records the metric and writes the access log line. The inner
//! [`decide`] only uses `?`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::app::App;
use crate::auth::credential::{self, Credential};
use crate::auth::{token, AuthError};
use crate::config::ForwardPolicy;
use crate::error::{Outcome, Rejection};
use crate::forward::{self, ConnInfo, Identity, ProxyBody, X_REQUEST_ID};
use crate::keys_api;

/// One access-log line, completed when the response body is done (so it can
/// carry the bytes sent and the full duration), then written by
/// [`AccessRecord::emit`]. Never holds a credential: only the key id.
pub struct AccessRecord {
    request_id: HeaderValue,
    client: std::net::IpAddr,
    method: http::Method,
    path: String,
    status: u16,
    outcome: Outcome,
    started: Instant,
    key_id: Option<crate::auth::Principal>,
    upstream_status: Option<u16>,
    bytes_in: Arc<AtomicU64>,
    log: Arc<crate::logging::AccessLog>,
}

impl AccessRecord {
    pub fn emit(&self, bytes_out: u64) {
        self.log.write(&crate::logging::AccessLine {
            request_id: self.request_id.to_str().unwrap_or(""),
            client: self.client,
            method: self.method.as_str(),
            path: &self.path,
            status: self.status,
            outcome: self.outcome.label(),
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            key_id: self.key_id.as_ref().map(|p| p.key_id()),
            upstream_status: self.upstream_status,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
        });
    }
}

/// Answer one request: the stages in [`decide`], any refusal turned into its
/// JSON answer here, the metric recorded, and (when `log.access` is on) the
/// access record handed back for the listener to emit at body end.
pub async fn handle(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
    refused: Option<Rejection>,
) -> (Response<ProxyBody>, Option<Box<AccessRecord>>) {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let mut record = app.access_log.as_ref().map(|log| {
        Box::new(AccessRecord {
            log: log.clone(),
            request_id: request_id.clone(),
            client: conn.peer.ip().to_canonical(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: 0,
            outcome: Outcome::Forwarded,
            started,
            key_id: None,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
        })
    });
    let client_upgrade =
        if forward::is_websocket_upgrade(req.method(), req.version(), req.headers()) {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
    let decided = decide(
        &app,
        &conn,
        req,
        &request_id,
        client_upgrade,
        record.as_deref_mut(),
        refused,
    )
    .await;
    let (outcome, response) = match decided {
        Ok((outcome, resp)) => (outcome, resp),
        Err(rejection) => (rejection.outcome(), app.reject(rejection, &request_id)),
    };
    app.metrics.record_outcome(outcome);
    app.metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    if let Some(r) = record.as_deref_mut() {
        r.status = response.status().as_u16();
        r.outcome = outcome;
        if outcome == Outcome::Forwarded {
            r.upstream_status = Some(r.status);
        }
    }
    (response, record)
}

async fn decide(
    app: &App,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut record: Option<&mut AccessRecord>,
    scanned: Option<Rejection>,
) -> Result<(Outcome, Response<ProxyBody>), Rejection> {
    let (parts, body) = req.into_parts();

    // What the byte-level head scan saw that parsing hides (head_scan.rs):
    // target and framing problems are step 1; a key followed by whitespace
    // is a failed key, decided at step 4 below.
    let key_malformed = match scanned {
        Some(Rejection::Unauthorized) => true,
        Some(rejection) => return Err(rejection),
        None => false,
    };

    // Steps 1–3: target, Host, path. Pure; nothing reaches the app on refusal.
    let admitted = app.gate.check(&parts)?;

    // Step 4: the credential.
    let prefix = app.config.auth.key_prefix.as_str();
    let credential = credential::parse(&parts.headers, prefix)?;
    if key_malformed {
        return Err(Rejection::Unauthorized);
    }
    let identity = match credential {
        Credential::OrgKey(tok) => {
            if !token::check_format(tok, prefix) {
                return Err(Rejection::Unauthorized);
            }
            match app.auth.authenticate(tok).await {
                Ok(principal) => {
                    if let Some(r) = record.as_deref_mut() {
                        r.key_id = Some(principal.clone());
                    }
                    Identity::OrgKey(principal)
                }
                Err(AuthError::Invalid) => return Err(Rejection::Unauthorized),
                Err(AuthError::StoreUnavailable) => return Err(Rejection::StoreUnavailable),
            }
        }
        Credential::MalformedKey => return Err(Rejection::Unauthorized),
        Credential::OtherBearer | Credential::OtherScheme => match app.config.auth.other_bearer {
            ForwardPolicy::Forward => Identity::Passthrough,
            ForwardPolicy::Reject => return Err(Rejection::Unauthorized),
        },
        Credential::Missing => match (app.config.auth.anonymous, &admitted.keys_route) {
            // The keys API decides for itself (browser sessions).
            (_, Some(_)) => Identity::Passthrough,
            (ForwardPolicy::Forward, None) => Identity::Passthrough,
            (ForwardPolicy::Reject, None) => return Err(Rejection::Unauthorized),
        },
    };

    // Step 5: key management is answered here, never forwarded.
    if let Some(route) = &admitted.keys_route {
        // Boxed: a rare path with a large future (see `handle`'s note on size).
        let resp = Box::pin(keys_api::handle(
            app, conn, route, parts, body, identity, request_id,
        ))
        .await?;
        return Ok((Outcome::Answered, resp));
    }

    // Step 6: forward.
    let out = forward::Outbound {
        parts,
        body,
        identity,
        request_id,
        upgrade: client_upgrade,
        bytes_in: record.map(|r| r.bytes_in.clone()),
        host: admitted.host,
    };
    let resp = app
        .forwarder
        .forward(out, conn, &app.tunnels, &app.metrics)
        .await?;
    Ok((Outcome::Forwarded, resp))
}

/// The client's `X-Request-Id` when it is one sane value, else a new one.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
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

fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::random();
    let mut id = [0u8; 32];
    for (i, c) in id.iter_mut().enumerate() {
        *c = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Builds keygate's own JSON answers.
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
