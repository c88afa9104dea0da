//! The request path, in the contract's order (§3):
//!
//! 1–3. [`request::Gate`]: target, Host, path — refusals never reach the app;
//! 4.   credential: org keys validated by [`auth::Authenticator`];
//! 4½.  a key's scope (§8): [`crate::request::scope`];
//! 5.   `/org/tokens` answered by [`keys_api`];
//! 6.   [`forward`] to the app.
//!
//! [`handle`] is the outer function: it turns any [`Rejection`] into the JSON
//! answer ([`reject`]), records the metric, hands the access record back for
//! the listener to write at body end, and starts an accepted WebSocket
//! tunnel. The inner [`decide`] only uses `?`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::app::App;
use crate::auth::credential::{self, Credential};
use crate::auth::{token, AuthError, Refusal, Refused};
use crate::config::ForwardPolicy;
use crate::error::{Outcome, Rejection};
use crate::exchange::{json_response, ConnInfo, ProxyBody};
use crate::forward::{self, Identity, Tunnel};
use crate::keys_api;
use crate::listener::io::Judged;

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
    /// A refused org key: why, its display prefix, and its id when known.
    refused: Option<RefusedKey>,
    upstream_status: Option<u16>,
    bytes_in: Arc<AtomicU64>,
    /// Set for a WebSocket tunnel, whose line is written when it closes.
    tunnel_end: Option<&'static str>,
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
            key_id: match (&self.key_id, &self.refused) {
                (Some(p), _) => Some(p.key_id()),
                (None, Some(r)) => r.key_id.as_deref(),
                (None, None) => None,
            },
            refusal: self.refused.as_ref().map(|r| r.reason.label()),
            prefix: self.refused.as_ref().and_then(|r| r.prefix.as_deref()),
            upstream_status: self.upstream_status,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            tunnel_end: self.tunnel_end,
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
    judged: Judged,
) -> (Response<ProxyBody>, Option<Box<AccessRecord>>) {
    let started = Instant::now();
    let request_id = crate::exchange::request_id(req.headers());
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
            refused: None,
            upstream_status: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            tunnel_end: None,
        })
    });
    let client_upgrade =
        if forward::is_websocket_upgrade(req.method(), req.version(), req.headers()) {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
    // The key that authenticated the request, once it did (usage, expiry notice).
    let mut key = None;
    let mut rate = None;
    let decided = decide(
        &app,
        &conn,
        req,
        &request_id,
        client_upgrade,
        record.as_deref_mut(),
        judged,
        &mut key,
        &mut rate,
    )
    .await;
    let (outcome, mut response, tunnel) = match decided {
        Ok(d) => (d.outcome, d.response, d.tunnel),
        Err(rejection) => (
            rejection.outcome(),
            reject(&app, rejection, &request_id),
            None,
        ),
    };
    crate::key_notice::finish(&app, key.as_ref(), outcome, response.headers_mut());
    // §11: every response to a rate-limited key, let through or not.
    if let Some(rate) = rate {
        rate.apply(response.headers_mut());
    }
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
    if let Some(tunnel) = tunnel {
        // The tunnel's access line is written when it closes.
        start_tunnel(&app, tunnel, record.take());
    }
    (response, record)
}

/// Relays an accepted WebSocket upgrade once hyper hands over the client's
/// side, until either side closes, it idles for `listen.idle_timeout`, or the
/// key that opened it is revoked or expires (on any keygate sharing the store).
fn start_tunnel(app: &Arc<App>, tunnel: Tunnel, record: Option<Box<AccessRecord>>) {
    let Tunnel {
        client,
        app: upstream,
        key,
    } = tunnel;
    let guard = app.tunnels.track();
    let idle = app.config.listen.idle_timeout;
    let ends: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match &key {
        Some(p) => Box::pin(app.auth.key_ends(p)),
        None => Box::pin(std::future::pending()),
    };
    tokio::spawn(async move {
        let _guard = guard;
        let client = match client.await {
            Ok(client) => hyper_util::rt::TokioIo::new(client),
            Err(err) => {
                tracing::debug!(error = %err, "websocket upgrade failed");
                return;
            }
        };
        let relayed = crate::upstream::tunnel::relay(client, upstream, idle, ends).await;
        if let Some(mut record) = record {
            record
                .bytes_in
                .store(relayed.client_to_app, Ordering::Relaxed);
            record.tunnel_end = Some(relayed.end.label());
            record.emit(relayed.app_to_client);
        }
    });
}

/// The JSON answer for a refusal (status, fixed message, extra headers).
pub fn reject(app: &App, rejection: Rejection, request_id: &HeaderValue) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": rejection.message() }))
        .unwrap_or_default();
    let mut resp = json_response(rejection.status(), Bytes::from(body), request_id);
    let h = resp.headers_mut();
    if rejection.wants_www_authenticate() {
        h.insert(header::WWW_AUTHENTICATE, app.www_authenticate.clone());
    }
    if rejection.wants_retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if rejection.close_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(allow) = rejection.allow() {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

/// What [`decide`] made of an admitted request.
struct Decided {
    outcome: Outcome,
    response: Response<ProxyBody>,
    tunnel: Option<Tunnel>,
}

// `key` and `rate`: what `handle` needs after the answer (usage and the
// expiry notice, the §11 headers), whatever the answer is.
#[allow(clippy::too_many_arguments)]
async fn decide(
    app: &App,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut record: Option<&mut AccessRecord>,
    judged: Judged,
    key: &mut Option<crate::auth::Principal>,
    rate: &mut Option<crate::ratelimit::RateHeaders>,
) -> Result<Decided, Rejection> {
    let (parts, body) = req.into_parts();

    // What the byte-level head scan saw that parsing hides (listener::scan):
    // a head it could not judge is never served; target and framing
    // problems are step 1; a key followed by whitespace is a failed key,
    // decided at step 4 below.
    let key_malformed = match judged {
        Judged::No => return Err(Rejection::Unjudged),
        Judged::Yes(Some(Rejection::Unauthorized)) => true,
        Judged::Yes(Some(rejection)) => return Err(rejection),
        Judged::Yes(None) => false,
    };

    // Steps 1–3: target, Host, path. Pure; nothing reaches the app on refusal.
    let admitted = app.gate.check(&parts)?;

    // Step 4: the credential.
    let prefix = app.config.auth.key_prefix.as_str();
    let credential = credential::parse(&parts.headers, prefix)?;
    if key_malformed {
        let shown = match credential {
            Credential::OrgKey(tok) => Some(token::display_prefix(tok)),
            _ => None,
        };
        return Err(refuse_key(app, record, shown, Refused::malformed()));
    }
    let identity = match credential {
        Credential::OrgKey(tok) => {
            if let Err(reason) = token::check(tok, prefix) {
                let refused = Refused {
                    reason,
                    key_id: None,
                };
                return Err(refuse_key(
                    app,
                    record,
                    Some(token::display_prefix(tok)),
                    refused,
                ));
            }
            match app.auth.authenticate(tok).await {
                Ok(principal) => {
                    *key = Some(principal.clone());
                    if let Some(r) = record.as_deref_mut() {
                        r.key_id = Some(principal.clone());
                    }
                    Identity::OrgKey(principal)
                }
                Err(AuthError::Invalid(refused)) => {
                    let shown = Some(token::display_prefix(tok));
                    return Err(refuse_key(app, record, shown, refused));
                }
                Err(AuthError::StoreUnavailable) => return Err(Rejection::StoreUnavailable),
            }
        }
        Credential::MalformedKey => {
            let shown = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| malformed_prefix(v.as_bytes(), prefix));
            return Err(refuse_key(app, record, shown, Refused::malformed()));
        }
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

    // Step 4½: the key's scope (§8). Requests bound for the app by role and
    // binding; key-management calls by their own rule, as far as the route
    // and method decide it (the keys API checks a mint's body itself).
    if let Identity::OrgKey(principal) = &identity {
        let in_scope = match &admitted.keys_route {
            None => crate::request::scope::check(
                &app.config.scopes,
                principal.role(),
                principal.workspaces(),
                &parts.method,
                parts.uri.path(),
            ),
            Some(route) => keys_api::key_may_call(principal, route, &parts.method),
        };
        if let Err(rejection) = in_scope {
            // §11: every response to a rate-limited key carries its
            // headers; this one, refused before the limit, shows what is left.
            *rate = app.ratelimit.peek(principal);
            return Err(rejection);
        }
    }

    // Step 4¾ (§11): the key's rate limit, after the scope check; requests
    // refused before this point never consume budget. A 429 counts as
    // `refused` in usage (`key_notice::finish`, by its outcome).
    if let Identity::OrgKey(principal) = &identity {
        match app.ratelimit.admit(principal).await {
            Ok(headers) => *rate = headers,
            Err(headers) => {
                *rate = Some(headers);
                return Err(Rejection::RateLimited);
            }
        }
    }

    // Step 5: key management is answered here, never forwarded.
    if let Some(route) = &admitted.keys_route {
        // Boxed: a rare path with a large future (the common request's
        // future should not reserve its space).
        let answer = keys_api::handle(app, conn, route, parts, body, identity, request_id);
        let answered = match record {
            Some(r) => Box::pin(keys_api::BYTES_IN.scope(r.bytes_in.clone(), answer)).await,
            None => Box::pin(answer).await,
        };
        let resp = match answered {
            Ok(resp) => resp,
            // A 405 names the route's methods (RFC 9110 §15.5.6).
            Err(rejection @ Rejection::KeysMethodNotAllowed) => {
                let mut resp = reject(app, rejection, request_id);
                resp.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static(keys_api::allowed_methods(route)),
                );
                return Ok(Decided {
                    outcome: rejection.outcome(),
                    response: resp,
                    tunnel: None,
                });
            }
            Err(rejection) => return Err(rejection),
        };
        return Ok(Decided {
            outcome: Outcome::Answered,
            response: resp,
            tunnel: None,
        });
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
    let forwarded = app.forwarder.forward(out, conn, &app.metrics).await?;
    Ok(Decided {
        outcome: Outcome::Forwarded,
        response: forwarded.response,
        tunnel: forwarded.tunnel,
    })
}

/// What the access line says about a refused org key (never the token: only
/// its 12-character display prefix, which is stored and listed anyway).
struct RefusedKey {
    reason: Refusal,
    prefix: Option<Box<str>>,
    key_id: Option<Arc<str>>,
}

/// A refused org key: counted by reason, noted for the access line, and
/// answered with the one 401 every refusal gets (§3 step 4).
fn refuse_key(
    app: &App,
    record: Option<&mut AccessRecord>,
    shown: Option<&str>,
    refused: Refused,
) -> Rejection {
    app.metrics.record_refusal(refused.reason);
    if let Some(r) = record {
        r.refused = Some(RefusedKey {
            reason: refused.reason,
            prefix: shown.map(Box::from),
            key_id: refused.key_id,
        });
    }
    Rejection::Unauthorized
}

/// The display prefix of a key inside a malformed `Authorization` value: from
/// `key_prefix` on, letters, digits and `_` only, at most 12 characters.
fn malformed_prefix<'a>(value: &'a [u8], key_prefix: &str) -> Option<&'a str> {
    let p = key_prefix.as_bytes();
    if p.is_empty() {
        return None;
    }
    let start = value.windows(p.len()).position(|w| w == p)?;
    let rest = &value[start..];
    let mut end = p.len();
    while end < rest.len()
        && end < token::DISPLAY_PREFIX_LEN
        && (rest[end].is_ascii_alphanumeric() || rest[end] == b'_')
    {
        end += 1;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::malformed_prefix;

    #[test]
    fn malformed_prefix_shows_at_most_twelve_key_characters() {
        fn t(v: &str) -> Option<&str> {
            malformed_prefix(v.as_bytes(), "mok_")
        }
        assert_eq!(t("Bearer  mok_abcdefghijklmnop"), Some("mok_abcdefgh"));
        assert_eq!(t("Basic mok_ab cd"), Some("mok_ab"));
        assert_eq!(t("Bearer mok_ab\tcd"), Some("mok_ab"));
        assert_eq!(t("mok_"), Some("mok_"));
        assert_eq!(t("Bearer xyz"), None);
    }
}
