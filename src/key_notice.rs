//! What the end of every request does for the key that made it: count it
//! for usage (§10) and, when the key expires within `keys.expiry_notice`,
//! tell the client with `keys.expiry_header` (§9). A copy of that header in
//! the app's response is always removed first.

use chrono::{SecondsFormat, Utc};
use http::header::HeaderValue;
use http::HeaderMap;

use crate::app::App;
use crate::auth::Principal;
use crate::error::Outcome;

/// Refusals that count as `refused` (§10): out of scope (§8) and rate
/// limited (§11).
pub fn refused(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::OutOfScope | Outcome::RateLimited)
}

/// Called once per answered request, with the key that authenticated it.
pub fn finish(app: &App, key: Option<&Principal>, outcome: Outcome, headers: &mut HeaderMap) {
    let name = &app.config.keys.expiry_header;
    headers.remove(name);
    let Some(p) = key else { return };
    app.auth.usage().count(p, refused(outcome));
    if let Some(at) = p.expires_at() {
        let notice = chrono::Duration::from_std(app.config.keys.expiry_notice)
            .unwrap_or(chrono::Duration::MAX);
        if at - Utc::now() <= notice {
            if let Ok(v) = HeaderValue::from_str(&at.to_rfc3339_opts(SecondsFormat::Secs, true)) {
                headers.insert(name.clone(), v);
            }
        }
    }
}
