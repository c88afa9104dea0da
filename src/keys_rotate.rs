//! `POST /org/tokens/{id}/rotate` (contract §9) and
//! `GET /org/tokens/{id}/usage[?since=]` (§10), called from
//! [`crate::keys_api::handle`] once the caller is known and §8 allows the
//! call (step 4½, [`crate::keys_api::key_may_call`]).

use chrono::{DateTime, Utc};
use http::header::HeaderValue;
use http::request::Parts;
use http::Response;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::app::App;
use crate::auth::store::UsageHour;
use crate::auth::usage::hour_start;
use crate::auth::{OpContext, RotateRequest, Rotated, UsageReport, MAX_GRACE};
use crate::error::Rejection;
use crate::exchange::ProxyBody;
use crate::keys_api::{minted_json, ok_json, read_body, rfc3339};

pub async fn rotate(
    app: &App,
    id: &str,
    body: Incoming,
    ctx: &OpContext,
    request_id: &HeaderValue,
) -> Result<Response<ProxyBody>, Rejection> {
    let bytes = read_body(body).await?;
    let req = parse_rotate_request(&bytes, Utc::now())?;
    match app.auth.keys().rotate(id, req, ctx).await {
        Ok(Some(rotated)) => Ok(ok_json(&rotated_json(&rotated), request_id)),
        Ok(None) => Err(Rejection::TokenNotFound),
        Err(e) => {
            tracing::warn!(error = %e, "key store call failed on rotate");
            Err(Rejection::StoreUnavailable)
        }
    }
}

pub async fn usage(
    app: &App,
    id: &str,
    parts: &Parts,
    request_id: &HeaderValue,
) -> Result<Response<ProxyBody>, Rejection> {
    let since = parse_since(parts.uri.query())?;
    match app.auth.keys().usage(id, since).await {
        Ok(Some(report)) => Ok(ok_json(&usage_json(&report), request_id)),
        Ok(None) => Err(Rejection::NotFound),
        Err(e) => {
            tracing::warn!(error = %e, "key store call failed on usage");
            Err(Rejection::StoreUnavailable)
        }
    }
}

/// The rotate answer (also `keygate keys rotate --json`): the mint object
/// plus `rotated_from` and `old_expires_at`.
pub fn rotated_json(r: &Rotated) -> Value {
    let mut v = minted_json(&r.minted);
    if let Value::Object(o) = &mut v {
        o.insert("rotated_from".into(), Value::String(r.rotated_from.clone()));
        o.insert(
            "old_expires_at".into(),
            Value::String(rfc3339(&r.old_expires_at)),
        );
    }
    v
}

/// The usage answer (also `keygate keys usage --json`).
pub fn usage_json(r: &UsageReport) -> Value {
    let hours: Vec<Value> = r.hours.iter().map(hour_json).collect();
    json!({
        "id": r.id,
        "requests": r.hours.iter().map(|h| h.requests).sum::<u64>(),
        "refused": r.hours.iter().map(|h| h.refused).sum::<u64>(),
        "hours": hours,
    })
}

fn hour_json(h: &UsageHour) -> Value {
    json!({
        "hour": rfc3339(&hour_start(h.hour)),
        "requests": h.requests,
        "refused": h.refused,
    })
}

/// `{"grace": "DUR", "expires_at": "RFC 3339"}`, both optional; empty body allowed.
pub fn parse_rotate_request(bytes: &[u8], now: DateTime<Utc>) -> Result<RotateRequest, Rejection> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(RotateRequest::default());
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|_| Rejection::BadRequest("bad request: invalid JSON"))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::BadRequest(
            "bad request: body must be a JSON object",
        ));
    };
    const BAD_GRACE: &str = "bad request: grace must be a duration of at most 30d (e.g. \"24h\")";
    let grace = match obj.get("grace") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_grace(s).ok_or(Rejection::BadRequest(BAD_GRACE))?),
        Some(_) => return Err(Rejection::BadRequest(BAD_GRACE)),
    };
    const BAD_EXPIRY: &str = "bad request: expires_at must be an RFC 3339 timestamp";
    let expires_at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|_| Rejection::BadRequest(BAD_EXPIRY))?
                .with_timezone(&Utc);
            if t <= now {
                return Err(Rejection::BadRequest(
                    "bad request: expires_at is in the past",
                ));
            }
            Some(t)
        }
        Some(_) => return Err(Rejection::BadRequest(BAD_EXPIRY)),
    };
    Ok(RotateRequest { grace, expires_at })
}

/// A grace duration (`config::parse_duration` syntax), at most 30 days.
pub fn parse_grace(s: &str) -> Option<std::time::Duration> {
    crate::config::parse_duration(s)
        .ok()
        .filter(|d| *d <= MAX_GRACE)
}

/// `since=RFC3339` from the query string (percent-decoded), if present.
fn parse_since(query: Option<&str>) -> Result<Option<DateTime<Utc>>, Rejection> {
    const BAD: &str = "bad request: since must be an RFC 3339 timestamp";
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("since="))
    else {
        return Ok(None);
    };
    let decoded = percent_decode(raw).ok_or(Rejection::BadRequest(BAD))?;
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc));
    // A `+` offset sent unencoded may arrive form-decoded as a space.
    parse(&decoded)
        .or_else(|_| parse(&decoded.replace(' ', "+")))
        .map(Some)
        .map_err(|_| Rejection::BadRequest(BAD))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
    fn rotate_body_rules() {
        let parse = |b: &str| parse_rotate_request(b.as_bytes(), now());
        assert!(parse("").unwrap().grace.is_none());
        assert_eq!(
            parse(r#"{"grace":"0s"}"#).unwrap().grace,
            Some(std::time::Duration::ZERO)
        );
        assert!(parse(r#"{"grace":"30d"}"#).is_ok());
        assert!(parse(r#"{"expires_at":"2027-01-01T00:00:00Z","grace":null}"#).is_ok());
        for bad in [
            "{",
            "[]",
            r#"{"grace":"31d"}"#,
            r#"{"grace":"5"}"#,
            r#"{"grace":5}"#,
            r#"{"grace":"-1s"}"#,
            r#"{"expires_at":"2025-01-01T00:00:00Z"}"#,
            r#"{"expires_at":"soon"}"#,
        ] {
            assert!(matches!(parse(bad), Err(Rejection::BadRequest(_))), "{bad}");
        }
    }

    #[test]
    fn since_is_read_from_the_query() {
        assert_eq!(parse_since(None), Ok(None));
        assert_eq!(parse_since(Some("x=1")), Ok(None));
        let t = parse_since(Some("since=2026-12-03T15:30:00Z"))
            .unwrap()
            .unwrap();
        assert_eq!(rfc3339(&t), "2026-12-03T15:30:00Z");
        let t = parse_since(Some("a=b&since=2026-12-03T16%3A30%3A00%2B01%3A00"))
            .unwrap()
            .unwrap();
        assert_eq!(rfc3339(&t), "2026-12-03T15:30:00Z");
        assert!(parse_since(Some("since=yesterday")).is_err());
    }
}
