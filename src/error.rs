//! Every refusal keygate answers itself, in one place: status, the fixed
//! client message, the metric label, whether the connection closes. The
//! outer handler (`proxy::handle`) turns a [`Rejection`] into the JSON
//! response, the log line and the metric; inner stages only return
//! `Err(Rejection::…)`. Also the two error helpers every module shares:
//! [`BoxError`] and [`ErrorChain`] (logs only, never a client).

use http::StatusCode;

/// A boxed error that can cross tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// Why keygate answered a request itself instead of forwarding it.
///
/// Client messages are fixed strings: internal detail (store errors, upstream
/// error chains) goes to the log, never to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Request target not origin-form (or an acceptable absolute-form), fragment, userinfo.
    BadTarget,
    /// Host header missing or duplicated.
    BadHost,
    /// HTTP/2: `:authority` and a `host` header name different hosts.
    AuthorityMismatch,
    /// `Content-Length` with `Transfer-Encoding`, or a `Transfer-Encoding` other than one `chunked`.
    BadFraming,
    /// More than one `Authorization` header.
    DuplicateAuthorization,
    /// Any other malformed request keygate itself detects (bad JSON on the keys API, …).
    BadRequest(&'static str),
    /// A path the strict path rules refuse (contract §3 step 3).
    AmbiguousPath,
    /// Request target longer than the 8 KiB limit.
    UriTooLong,
    /// Too many or too large request headers.
    HeadersTooLarge,
    /// `CONNECT` (and any other method keygate never proxies).
    MethodNotAllowed,
    /// The Host is not one this tenant serves.
    Misdirected,
    /// The path is under a `policy.deny_prefixes` entry.
    Forbidden,
    /// Outside the calling key's scope (contract §8): its role, its
    /// workspaces, or a key-management call it may not make.
    OutOfScope,
    /// A cookie-authenticated `POST`/`DELETE` on the keys API without a served `Origin`.
    CrossSiteOrigin,
    /// A `Connection` header that names `Content-Length`, `Transfer-Encoding`
    /// or `Host` (framing and routing are never hop-by-hop).
    FramingInConnection,
    /// A request head the byte-level scan could not judge (it lost track of
    /// where messages begin): never served, the connection closes.
    Unjudged,
    /// The client's request body broke (malformed chunk, closed early).
    BadBody,
    /// The client's request body stopped arriving for `listen.body_timeout`.
    BodyTimeout,
    /// An org key that is malformed, unknown, revoked, expired or another tenant's;
    /// or (with the `reject` policies) a missing/foreign credential.
    Unauthorized,
    /// The key store could not answer in time and the key is not usable from cache.
    StoreUnavailable,
    /// The session verifier could not answer (keys API, cookie sessions).
    SessionVerifierUnavailable,
    /// `DELETE /org/tokens/{id}` for an unknown or revoked key.
    TokenNotFound,
    /// Keys API route that does not exist.
    NotFound,
    /// Keys API method that does not exist on the route.
    KeysMethodNotAllowed,
    /// `POST /org/tokens` past `keys.max_live`.
    MintCeiling,
    /// Keys API request body over the size limit.
    PayloadTooLarge,
    /// The app could not be reached (connect refused, connect timeout, reset before a response).
    UpstreamUnreachable,
    /// The app did not send its response head within `upstream.timeout`.
    UpstreamTimeout,
    /// §11: the key's rate limit is used up for this window (the
    /// `RateLimit-*` headers and `Retry-After` are added by `proxy::handle`).
    RateLimited,
}

/// The `outcome` label of `keygate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    Answered,
    Unauthorized,
    Forbidden,
    Misdirected,
    BadRequest,
    StoreUnavailable,
    UpstreamError,
    OutOfScope,
    RateLimited,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Forwarded,
        Outcome::Answered,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::Misdirected,
        Outcome::BadRequest,
        Outcome::StoreUnavailable,
        Outcome::UpstreamError,
        Outcome::OutOfScope,
        Outcome::RateLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Answered => "answered",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::Misdirected => "misdirected",
            Outcome::BadRequest => "bad_request",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::OutOfScope => "out_of_scope",
            Outcome::RateLimited => "rate_limited",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Rejection {
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::BadTarget
            | Rejection::BadHost
            | Rejection::AuthorityMismatch
            | Rejection::BadFraming
            | Rejection::DuplicateAuthorization
            | Rejection::BadRequest(_)
            | Rejection::FramingInConnection
            | Rejection::Unjudged
            | Rejection::BadBody
            | Rejection::AmbiguousPath => StatusCode::BAD_REQUEST,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::MethodNotAllowed | Rejection::KeysMethodNotAllowed => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Rejection::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Rejection::Forbidden | Rejection::CrossSiteOrigin | Rejection::OutOfScope => {
                StatusCode::FORBIDDEN
            }
            Rejection::Unauthorized => StatusCode::UNAUTHORIZED,
            Rejection::StoreUnavailable | Rejection::SessionVerifierUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::TokenNotFound | Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MintCeiling | Rejection::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Rejection::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Rejection::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The fixed text of the `"error"` field.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::BadTarget => "bad request: invalid request target",
            Rejection::BadHost => "bad request: missing or duplicated host",
            Rejection::AuthorityMismatch => {
                "bad request: :authority and host header name different hosts"
            }
            Rejection::BadFraming => "bad request: invalid message framing",
            Rejection::DuplicateAuthorization => "bad request: more than one authorization header",
            Rejection::BadRequest(msg) => msg,
            Rejection::AmbiguousPath => "bad request: ambiguous path",
            Rejection::UriTooLong => "request target too long",
            Rejection::HeadersTooLarge => "request header fields too large",
            Rejection::MethodNotAllowed => "method not allowed",
            Rejection::KeysMethodNotAllowed => "method not allowed",
            Rejection::Misdirected => "misdirected request: host not served by this tenant",
            Rejection::Forbidden => "forbidden",
            Rejection::CrossSiteOrigin => "forbidden: cross-site request",
            Rejection::OutOfScope => "forbidden: outside this key's scope",
            Rejection::FramingInConnection => {
                "bad request: connection header names content-length, transfer-encoding or host"
            }
            Rejection::Unjudged => "bad request: invalid message framing",
            Rejection::BadBody => "bad request: unreadable request body",
            Rejection::BodyTimeout => "request timeout: the request body stopped arriving",
            Rejection::Unauthorized => "invalid or revoked org API key",
            Rejection::StoreUnavailable => "key store unavailable",
            Rejection::SessionVerifierUnavailable => "session verifier unavailable",
            Rejection::TokenNotFound => "token not found or already revoked",
            Rejection::NotFound => "not found",
            Rejection::MintCeiling => "org api token mint ceiling exceeded",
            Rejection::PayloadTooLarge => "request body too large",
            Rejection::UpstreamUnreachable => "bad gateway: upstream unreachable",
            Rejection::UpstreamTimeout => "gateway timeout: upstream did not answer in time",
            Rejection::RateLimited => "rate limit exceeded",
        }
    }

    pub fn outcome(self) -> Outcome {
        match self {
            Rejection::BadTarget
            | Rejection::BadHost
            | Rejection::AuthorityMismatch
            | Rejection::BadFraming
            | Rejection::DuplicateAuthorization
            | Rejection::BadRequest(_)
            | Rejection::AmbiguousPath
            | Rejection::UriTooLong
            | Rejection::HeadersTooLarge
            | Rejection::MethodNotAllowed
            | Rejection::FramingInConnection
            | Rejection::Unjudged
            | Rejection::BadBody
            | Rejection::BodyTimeout
            | Rejection::PayloadTooLarge => Outcome::BadRequest,
            Rejection::Misdirected => Outcome::Misdirected,
            Rejection::Forbidden | Rejection::CrossSiteOrigin => Outcome::Forbidden,
            Rejection::OutOfScope => Outcome::OutOfScope,
            Rejection::Unauthorized => Outcome::Unauthorized,
            Rejection::StoreUnavailable => Outcome::StoreUnavailable,
            Rejection::SessionVerifierUnavailable
            | Rejection::TokenNotFound
            | Rejection::NotFound
            | Rejection::KeysMethodNotAllowed
            | Rejection::MintCeiling => Outcome::Answered,
            Rejection::UpstreamUnreachable | Rejection::UpstreamTimeout => Outcome::UpstreamError,
            Rejection::RateLimited => Outcome::RateLimited,
        }
    }

    /// Whether the client connection should be closed after this answer
    /// (framing errors: the rest of the stream cannot be trusted).
    pub fn close_connection(self) -> bool {
        matches!(
            self,
            Rejection::BadFraming
                | Rejection::HeadersTooLarge
                | Rejection::BadHost
                | Rejection::AuthorityMismatch
                | Rejection::FramingInConnection
                | Rejection::Unjudged
                | Rejection::BadBody
                | Rejection::BodyTimeout
                // CONNECT: what follows its head is not HTTP to keygate.
                | Rejection::MethodNotAllowed
        )
    }

    /// Extra header for 401 answers (`WWW-Authenticate`) and 503 (`Retry-After`) is
    /// added by the responder; this says which.
    pub fn wants_www_authenticate(self) -> bool {
        matches!(self, Rejection::Unauthorized)
    }

    /// The `Allow` header of a 405 (RFC 9110 §15.5.6). `CONNECT` is the one
    /// method keygate never proxies; the keys API's 405 names its route's
    /// methods (`keys_api::allowed_methods`, added where the route is known).
    pub fn allow(self) -> Option<&'static str> {
        match self {
            Rejection::MethodNotAllowed => Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            _ => None,
        }
    }

    pub fn wants_retry_after(self) -> bool {
        matches!(
            self,
            Rejection::StoreUnavailable | Rejection::SessionVerifierUnavailable
        )
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal keygate answers itself: status and the exact `"error"`
    /// text. The match below has no `_` arm, so a new variant fails to
    /// compile until it is listed here.
    fn table() -> Vec<(Rejection, u16, &'static str)> {
        use Rejection::*;
        let all =
            vec![
            (BadTarget, 400, "bad request: invalid request target"),
            (BadHost, 400, "bad request: missing or duplicated host"),
            (
                AuthorityMismatch,
                400,
                "bad request: :authority and host header name different hosts",
            ),
            (BadFraming, 400, "bad request: invalid message framing"),
            (
                DuplicateAuthorization,
                400,
                "bad request: more than one authorization header",
            ),
            (AmbiguousPath, 400, "bad request: ambiguous path"),
            (UriTooLong, 414, "request target too long"),
            (HeadersTooLarge, 431, "request header fields too large"),
            (MethodNotAllowed, 405, "method not allowed"),
            (KeysMethodNotAllowed, 405, "method not allowed"),
            (
                Misdirected,
                421,
                "misdirected request: host not served by this tenant",
            ),
            (Forbidden, 403, "forbidden"),
            (CrossSiteOrigin, 403, "forbidden: cross-site request"),
            (
                FramingInConnection,
                400,
                "bad request: connection header names content-length, transfer-encoding or host",
            ),
            (Unjudged, 400, "bad request: invalid message framing"),
            (BadBody, 400, "bad request: unreadable request body"),
            (
                BodyTimeout,
                408,
                "request timeout: the request body stopped arriving",
            ),
            (Unauthorized, 401, "invalid or revoked org API key"),
            (StoreUnavailable, 503, "key store unavailable"),
            (SessionVerifierUnavailable, 503, "session verifier unavailable"),
            (TokenNotFound, 404, "token not found or already revoked"),
            (NotFound, 404, "not found"),
            (MintCeiling, 429, "org api token mint ceiling exceeded"),
            (OutOfScope, 403, "forbidden: outside this key's scope"),
            (RateLimited, 429, "rate limit exceeded"),
            (PayloadTooLarge, 413, "request body too large"),
            (UpstreamUnreachable, 502, "bad gateway: upstream unreachable"),
            (
                UpstreamTimeout,
                504,
                "gateway timeout: upstream did not answer in time",
            ),
        ];
        for (r, _, _) in &all {
            match r {
                BadTarget
                | BadHost
                | AuthorityMismatch
                | BadFraming
                | DuplicateAuthorization
                | AmbiguousPath
                | UriTooLong
                | HeadersTooLarge
                | MethodNotAllowed
                | KeysMethodNotAllowed
                | Misdirected
                | Forbidden
                | CrossSiteOrigin
                | FramingInConnection
                | Unjudged
                | BadBody
                | BodyTimeout
                | Unauthorized
                | StoreUnavailable
                | SessionVerifierUnavailable
                | TokenNotFound
                | NotFound
                | MintCeiling
                | OutOfScope
                | RateLimited
                | PayloadTooLarge
                | UpstreamUnreachable
                | UpstreamTimeout => {}
                BadRequest(_) => unreachable!("listed from the sources below"),
            }
        }
        all
    }

    /// The `BadRequest("…")` texts in the sources that build them, and the
    /// literal `{"error":"…"}` bodies written outside [`Rejection`].
    fn texts_in_sources() -> (Vec<String>, Vec<String>) {
        let sources = [
            include_str!("keys_api.rs"),
            include_str!("forward.rs"),
            include_str!("auth/scope.rs"),
            include_str!("admin.rs"),
            include_str!("listener/accept.rs"),
            include_str!("session.rs"),
        ];
        let (mut bad_requests, mut literals) = (Vec::new(), Vec::new());
        for src in sources {
            // Every string literal that starts "bad request: ".
            for (i, _) in src.match_indices("\"bad request: ") {
                let rest = &src[i + 1..];
                let mut end = 0;
                let b = rest.as_bytes();
                while end < b.len() && !(b[end] == b'"' && (end == 0 || b[end - 1] != b'\\')) {
                    end += 1;
                }
                if end > "bad request: ".len() {
                    bad_requests.push(rest[..end].replace("\\\"", "\""));
                }
            }
            for (i, _) in src.match_indices("r#\"{\"error\":\"") {
                let rest = &src[i + 3..];
                let end = rest.find("\"#").unwrap();
                literals.push(rest[..end].to_string());
            }
        }
        (bad_requests, literals)
    }

    fn assert_plain(text: &str) {
        for bad in ["::", "Error", "{", "}", "Some(", "None", "\\n", "0x"] {
            assert!(!text.contains(bad), "{text:?} contains {bad:?}");
        }
        assert!(!text.is_empty() && text.len() < 120, "{text:?}");
        assert_eq!(text.trim(), text);
    }

    #[test]
    fn every_error_body_names_its_cause_in_plain_words() {
        for (r, status, text) in table() {
            assert_eq!(r.status().as_u16(), status, "{r:?}");
            assert_eq!(r.message(), text, "{r:?}");
            assert_eq!(r.to_string(), text);
            assert_plain(text);
        }
        let (bad_requests, literals) = texts_in_sources();
        assert!(bad_requests.len() >= 15, "{bad_requests:?}");
        for text in &bad_requests {
            assert_plain(text);
            let r = Rejection::BadRequest("x");
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            assert_eq!(r.outcome(), Outcome::BadRequest);
        }
        let bodies: Vec<serde_json::Value> = literals
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert!(
            literals
                .iter()
                .any(|l| l.contains("plain HTTP request sent to the TLS port: use https://")),
            "{literals:?}"
        );
        for b in &bodies {
            let obj = b.as_object().unwrap();
            assert_eq!(obj.len(), 1, "{b}");
            assert_plain(obj["error"].as_str().unwrap());
        }
    }

    #[test]
    fn method_not_allowed_names_what_is_allowed() {
        let allow = Rejection::MethodNotAllowed.allow().unwrap();
        assert!(!allow.contains("CONNECT") && allow.contains("GET"));
        for (r, _, _) in table() {
            assert_eq!(
                r.allow().is_some(),
                r == Rejection::MethodNotAllowed,
                "{r:?}"
            );
        }
    }

    #[test]
    fn an_authority_mismatch_is_its_own_400() {
        let r = Rejection::AuthorityMismatch;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_ne!(r.message(), Rejection::BadHost.message());
        assert!(r.message().contains(":authority") && r.message().contains("host"));
    }
}
