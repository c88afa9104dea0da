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

use std::convert::Infallible;
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

/// What the access log records about the caller.
pub enum Caller {
    None,
    Key(crate::auth::Principal),
}

pub async fn handle(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let path_for_log = if app.access_log {
        Some(req.uri().path().to_owned())
    } else {
        None
    };
    let client_upgrade = if forward::is_websocket_upgrade(req.method(), req.version(), req.headers())
    {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let mut caller = Caller::None;
    let (outcome, response) =
        match decide(&app, &conn, req, &request_id, client_upgrade, &mut caller).await {
            Ok((outcome, resp)) => (outcome, resp),
            Err(rejection) => (rejection.outcome(), app.reject(rejection, &request_id)),
        };
    app.metrics.record_outcome(outcome);
    let elapsed = started.elapsed();
    app.metrics.request_duration.observe(elapsed.as_secs_f64());
    if let Some(path) = path_for_log {
        let key_id = match &caller {
            Caller::Key(p) => Some(p.key_id()),
            Caller::None => None,
        };
        tracing::info!(
            target: "keygate::access",
            request_id = request_id.to_str().unwrap_or(""),
            client = %conn.peer.ip(),
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            outcome = outcome.label(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            key_id = key_id,
        );
    }
    Ok(response)
}

async fn decide(
    app: &App,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    caller: &mut Caller,
) -> Result<(Outcome, Response<ProxyBody>), Rejection> {
    let (parts, body) = req.into_parts();

    // Steps 1–3: target, Host, path. Pure; nothing reaches the app on refusal.
    let admitted = app.gate.check(&parts)?;

    // Step 4: the credential.
    let prefix = app.config.auth.key_prefix.as_str();
    let identity = match credential::parse(&parts.headers, prefix)? {
        Credential::OrgKey(tok) => {
            if !token::check_format(tok, prefix) {
                return Err(Rejection::Unauthorized);
            }
            match app.auth.authenticate(tok).await {
                Ok(principal) => {
                    *caller = Caller::Key(principal.clone());
                    Identity::OrgKey(principal)
                }
                Err(AuthError::Invalid) => return Err(Rejection::Unauthorized),
                Err(AuthError::StoreUnavailable) => return Err(Rejection::StoreUnavailable),
            }
        }
        Credential::MalformedKey => return Err(Rejection::Unauthorized),
        Credential::OtherBearer | Credential::OtherScheme => {
            match app.config.auth.other_bearer {
                ForwardPolicy::Forward => Identity::Passthrough,
                ForwardPolicy::Reject => return Err(Rejection::Unauthorized),
            }
        }
        Credential::Missing => match (app.config.auth.anonymous, &admitted.keys_route) {
            // The keys API decides for itself (browser sessions).
            (_, Some(_)) => Identity::Passthrough,
            (ForwardPolicy::Forward, None) => Identity::Passthrough,
            (ForwardPolicy::Reject, None) => return Err(Rejection::Unauthorized),
        },
    };

    // Step 5: key management is answered here, never forwarded.
    if let Some(route) = &admitted.keys_route {
        let resp = keys_api::handle(app, conn, route, parts, body, identity, request_id).await?;
        return Ok((Outcome::Answered, resp));
    }

    // Step 6: forward.
    let resp = app
        .forwarder
        .forward(
            parts,
            body,
            identity,
            conn,
            request_id,
            client_upgrade,
            &app.tunnels,
            &app.metrics,
        )
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
            && b
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@".contains(c))
        {
            return v.clone();
        }
    }
    new_request_id()
}

fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let s = format!("{n:032x}");
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("0"))
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
