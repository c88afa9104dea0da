//! Stage 5: `/org/tokens` (contract §5), answered by keygate itself, never
//! forwarded. Callers are a valid org key, or — with `[session]` configured
//! and no Authorization header — a browser session that `verify_url` confirms.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::app::App;
use crate::auth::scope::{check_workspaces, key_call_allowed, KeyCall, Role};
use crate::auth::store::KeyRecord;
use crate::auth::{Actor, MintError, MintRequest, Minted, OpContext, Principal};
use crate::config::RateLimit;
use crate::error::Rejection;
use crate::exchange::{json_response, ConnInfo, ProxyBody};
use crate::forward::Identity;
use crate::request::KeysRoute;
use crate::session::{self, Verdict};

/// Largest `POST /org/tokens` body keygate reads.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

pub const MINT_WARNING: &str =
    "Store this token now: it is shown only once and cannot be recovered.";

/// Answer a key-management call. A key's call has passed
/// [`key_may_call`] at step 4½ (before its rate limit); the one part of the
/// §8 rule that needs the body, a mint no wider than the key, is checked
/// here.
pub async fn handle(
    app: &App,
    conn: &ConnInfo,
    route: &KeysRoute,
    parts: Parts,
    body: Incoming,
    identity: Identity,
    request_id: &HeaderValue,
) -> Result<Response<ProxyBody>, Rejection> {
    // Who is asking: a key, or a verified browser session.
    let (actor, by_session, key) = match identity {
        Identity::OrgKey(p) => (Actor(format!("org-key:{}", p.prefix())), false, Some(p)),
        Identity::Passthrough => {
            let user_id = session_user(app, &parts).await?;
            (Actor(format!("session:{user_id}")), true, None)
        }
    };
    if by_session
        && (parts.method == Method::POST || parts.method == Method::DELETE)
        && !session::origin_allowed(&parts.headers, app.gate.served_hosts())
    {
        return Err(Rejection::CrossSiteOrigin);
    }
    let ctx = OpContext {
        actor,
        client: Some(conn.peer.ip().to_canonical().to_string()),
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let keys = app.auth.keys();
    match (route, &parts.method) {
        // HEAD wherever GET (RFC 9110 §9.3.2): the same answer, its body
        // left unsent by the HTTP layer.
        (KeysRoute::Collection, &Method::GET | &Method::HEAD) => {
            let records = keys.list().await.map_err(store_down)?;
            Ok(ok_json(&list_json(&records), request_id))
        }
        (KeysRoute::Collection, &Method::POST) => {
            let req = read_mint_request(body).await?;
            // §8's mint rule needs the body: no key mints wider than itself
            // (sessions mint any scope).
            if let Some(p) = &key {
                let call = KeyCall::Mint {
                    workspaces: &req.workspaces,
                };
                if !key_call_allowed(p.role(), p.workspaces(), p.key_id(), call) {
                    return Err(Rejection::OutOfScope);
                }
            }
            match keys.mint(req, &ctx).await {
                Ok(minted) => Ok(ok_json(&minted_json(&minted), request_id)),
                Err(MintError::CeilingReached) => Err(Rejection::MintCeiling),
                Err(MintError::Store(e)) => Err(store_down(e)),
            }
        }
        (KeysRoute::Item(id), &Method::DELETE) => {
            match keys.revoke(id, &ctx).await.map_err(store_down)? {
                true => Ok(ok_json(&json!({ "revoked": id }), request_id)),
                false => Err(Rejection::TokenNotFound),
            }
        }
        (KeysRoute::Rotate(id), &Method::POST) => {
            crate::keys_rotate::rotate(app, id, body, &ctx, request_id).await
        }
        (KeysRoute::Usage(id), &Method::GET | &Method::HEAD) => {
            crate::keys_rotate::usage(app, id, &parts, request_id).await
        }
        (KeysRoute::Rotate(_), _) | (KeysRoute::Usage(_), _) => {
            Err(Rejection::KeysMethodNotAllowed)
        }
        (KeysRoute::Item(_), _) | (KeysRoute::Collection, _) => {
            Err(Rejection::KeysMethodNotAllowed)
        }
        (KeysRoute::Unknown, _) => Err(Rejection::NotFound),
    }
}

/// The §8 rule as far as the route and method decide it, for step 4½: a
/// key-management call the key may not make is refused before the key's
/// rate limit (§11), so it never consumes budget. The mint's subset rule
/// needs the body and is `handle`'s; a method the route does not answer is
/// left to `handle`'s 405.
pub fn key_may_call(p: &Principal, route: &KeysRoute, method: &Method) -> Result<(), Rejection> {
    let call = match (route, method) {
        (KeysRoute::Collection, &Method::GET | &Method::HEAD) => KeyCall::List,
        // Whether this key may mint at all; the subset rule needs the body.
        (KeysRoute::Collection, &Method::POST) => {
            return (p.role() == Role::Admin)
                .then_some(())
                .ok_or(Rejection::OutOfScope)
        }
        (KeysRoute::Item(id), &Method::DELETE)
        | (KeysRoute::Rotate(id), &Method::POST)
        | (KeysRoute::Usage(id), &Method::GET | &Method::HEAD) => KeyCall::OnKey { id },
        _ => return Ok(()),
    };
    key_call_allowed(p.role(), p.workspaces(), p.key_id(), call)
        .then_some(())
        .ok_or(Rejection::OutOfScope)
}

/// The `Allow` header of a route's 405: the methods [`handle`] answers there.
pub fn allowed_methods(route: &KeysRoute) -> &'static str {
    match route {
        KeysRoute::Collection => "GET, HEAD, POST",
        KeysRoute::Item(_) => "DELETE",
        KeysRoute::Rotate(_) => "POST",
        KeysRoute::Usage(_) => "GET, HEAD",
        KeysRoute::Unknown => "",
    }
}

fn store_down(err: crate::auth::store::StoreError) -> Rejection {
    tracing::warn!(error = %err, "key store call failed on /org/tokens");
    Rejection::StoreUnavailable
}

/// A browser session for a request without Authorization, or 401/503.
async fn session_user(app: &App, parts: &Parts) -> Result<String, Rejection> {
    let (Some(verifier), Some(cfg)) = (&app.sessions, &app.config.session) else {
        return Err(Rejection::Unauthorized);
    };
    if parts.headers.contains_key(header::AUTHORIZATION) {
        return Err(Rejection::Unauthorized);
    }
    let Some(cookie) = session::cookie_value(&parts.headers, &cfg.cookie) else {
        return Err(Rejection::Unauthorized);
    };
    match verifier.verify(cookie).await {
        Ok(Verdict::Member { user_id }) => Ok(user_id),
        Ok(Verdict::NotMember) => Err(Rejection::Unauthorized),
        Err(err) => {
            tracing::warn!(error = %err, "session verification failed");
            Err(Rejection::SessionVerifierUnavailable)
        }
    }
}

tokio::task_local! {
    /// The access record's `bytes_in` of the request being answered (set by
    /// `proxy` around [`handle`]): a body read here is counted there.
    pub static BYTES_IN: std::sync::Arc<std::sync::atomic::AtomicU64>;
}

async fn read_mint_request(body: Incoming) -> Result<MintRequest, Rejection> {
    let bytes = read_body(body).await?;
    parse_mint_request(&bytes, Utc::now())
}

/// A key-API request body, at most [`MAX_BODY`] bytes, counted as the
/// access line's `bytes_in`.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, Rejection> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => {
            let bytes = c.to_bytes();
            let _ = BYTES_IN
                .try_with(|n| n.store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed));
            Ok(bytes)
        }
        Err(err) => {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(Rejection::PayloadTooLarge);
            }
            Err(Rejection::BadRequest("bad request: unreadable body"))
        }
    }
}

/// `{"name", "expires_at", "role", "workspaces", "rate_limit"}`, all
/// optional; empty body allowed. Whether the caller may mint that scope is
/// checked by the caller of this function.
pub fn parse_mint_request(bytes: &[u8], now: DateTime<Utc>) -> Result<MintRequest, Rejection> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(MintRequest {
            enforce_ceiling: true,
            ..MintRequest::default()
        });
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|_| Rejection::BadRequest("bad request: invalid JSON"))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::BadRequest(
            "bad request: body must be a JSON object",
        ));
    };
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if s.chars().count() > MAX_NAME_CHARS {
                return Err(Rejection::BadRequest(
                    "bad request: name is longer than 100 characters",
                ));
            }
            if s.chars().any(|c| c.is_control()) {
                return Err(Rejection::BadRequest(
                    "bad request: name contains control characters",
                ));
            }
            Some(s.clone())
        }
        Some(_) => return Err(Rejection::BadRequest("bad request: name must be a string")),
    };
    let expires_at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    Rejection::BadRequest("bad request: expires_at must be an RFC 3339 timestamp")
                })?
                .with_timezone(&Utc);
            if t <= now {
                return Err(Rejection::BadRequest(
                    "bad request: expires_at is in the past",
                ));
            }
            Some(t)
        }
        Some(_) => {
            return Err(Rejection::BadRequest(
                "bad request: expires_at must be an RFC 3339 timestamp",
            ))
        }
    };
    let role = match obj.get("role") {
        None | Some(Value::Null) => Role::Admin,
        Some(Value::String(s)) => Role::parse(s).ok_or(Rejection::BadRequest(
            "bad request: role must be \"admin\", \"editor\" or \"reader\"",
        ))?,
        Some(_) => {
            return Err(Rejection::BadRequest(
                "bad request: role must be \"admin\", \"editor\" or \"reader\"",
            ))
        }
    };
    let workspaces = match obj.get("workspaces") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => ids.push(s.clone()),
                    _ => {
                        return Err(Rejection::BadRequest(
                            "bad request: workspaces must be an array of strings",
                        ))
                    }
                }
            }
            check_workspaces(&ids).map_err(|e| Rejection::BadRequest(e.message()))?;
            ids
        }
        Some(_) => {
            return Err(Rejection::BadRequest(
                "bad request: workspaces must be an array of strings",
            ))
        }
    };
    let rate_limit = match obj.get("rate_limit") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(RateLimit::parse(s).map_err(|_| {
            Rejection::BadRequest(
                "bad request: rate_limit must be \"N/s\", \"N/min\" or \"N/h\" with N >= 1",
            )
        })?),
        Some(_) => {
            return Err(Rejection::BadRequest(
                "bad request: rate_limit must be \"N/s\", \"N/min\" or \"N/h\" with N >= 1",
            ))
        }
    };
    Ok(MintRequest {
        name,
        expires_at,
        role,
        workspaces,
        rate_limit,
        enforce_ceiling: true,
    })
}

pub use crate::time::rfc3339;

fn opt_time(t: &Option<DateTime<Utc>>) -> Value {
    t.as_ref()
        .map(|t| Value::String(rfc3339(t)))
        .unwrap_or(Value::Null)
}

/// The `GET /org/tokens` object (also `keygate keys list --json`).
pub fn list_json(records: &[KeyRecord]) -> Value {
    let tokens: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "prefix": r.prefix,
                "name": r.name,
                "created_by": r.created_by,
                "created_at": rfc3339(&r.created_at),
                "last_used_at": opt_time(&r.last_used_at),
                "expires_at": opt_time(&r.expires_at),
                "role": r.role.as_str(),
                "workspaces": r.workspaces,
                "rate_limit": r.rate_limit.map(|l| l.to_string()),
            })
        })
        .collect();
    json!({ "count": tokens.len(), "tokens": tokens })
}

/// The `POST /org/tokens` object (also `keygate keys mint --json`).
pub fn minted_json(m: &Minted) -> Value {
    json!({
        "id": m.record.id,
        "prefix": m.record.prefix,
        "name": m.record.name,
        "expires_at": opt_time(&m.record.expires_at),
        "role": m.record.role.as_str(),
        "workspaces": m.record.workspaces,
        "rate_limit": m.record.rate_limit.map(|l| l.to_string()),
        "auth_token": m.token.expose(),
        "warning": MINT_WARNING,
    })
}

pub(crate) fn ok_json(v: &Value, request_id: &HeaderValue) -> Response<ProxyBody> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    json_response(StatusCode::OK, Bytes::from(body), request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn mint_body_rules() {
        let ok = |b: &str| parse_mint_request(b.as_bytes(), now()).is_ok();
        assert!(ok(""));
        assert!(ok("  \n"));
        assert!(ok("{}"));
        assert!(ok(r#"{"name":"ci"}"#));
        assert!(ok(r#"{"name":null,"expires_at":null}"#));
        assert!(ok(r#"{"expires_at":"2027-01-01T00:00:00Z"}"#));
        assert!(ok(r#"{"expires_at":"2027-01-01T01:00:00+01:00"}"#));
        assert!(ok(&format!(r#"{{"name":"{}"}}"#, "é".repeat(100))));
        assert!(!ok(&format!(r#"{{"name":"{}"}}"#, "a".repeat(101))));
        assert!(!ok("{"));
        assert!(!ok("[]"));
        assert!(!ok("null"));
        assert!(!ok(r#""x""#));
        assert!(!ok(r#"{"name":5}"#));
        assert!(!ok(r#"{"name":["a"]}"#));
        assert!(!ok(r#"{"expires_at":5}"#));
        assert!(!ok(r#"{"expires_at":"tomorrow"}"#));
        assert!(!ok(r#"{"expires_at":"2027-01-01"}"#));
        assert!(!ok(r#"{"expires_at":"2025-01-01T00:00:00Z"}"#));
        assert!(!ok(r#"{"expires_at":"2026-01-01T00:00:00Z"}"#));
    }

    #[test]
    fn mint_body_scope_and_limit() {
        let parse = |b: &str| parse_mint_request(b.as_bytes(), now());
        let r =
            parse(r#"{"role":"reader","workspaces":["ws_1","ws-2"],"rate_limit":"5/s"}"#).unwrap();
        assert_eq!(r.role, Role::Reader);
        assert_eq!(r.workspaces, ["ws_1", "ws-2"]);
        assert_eq!(r.rate_limit.unwrap().to_string(), "5/s");
        let d = parse("{}").unwrap();
        assert_eq!(
            (d.role, d.workspaces.len(), d.rate_limit),
            (Role::Admin, 0, None)
        );
        for bad in [
            r#"{"role":"owner"}"#,
            r#"{"role":"Admin"}"#,
            r#"{"role":1}"#,
            r#"{"workspaces":"ws_1"}"#,
            r#"{"workspaces":[1]}"#,
            r#"{"workspaces":[""]}"#,
            r#"{"workspaces":["a b"]}"#,
            r#"{"workspaces":["a","a"]}"#,
            r#"{"rate_limit":"0/s"}"#,
            r#"{"rate_limit":"5/sec"}"#,
            r#"{"rate_limit":"-1/min"}"#,
            r#"{"rate_limit":5}"#,
        ] {
            assert!(matches!(parse(bad), Err(Rejection::BadRequest(_))), "{bad}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("\"w{i}\"")).collect();
        let body = format!(r#"{{"workspaces":[{}]}}"#, many.join(","));
        assert!(parse(&body).is_err());
    }
}
