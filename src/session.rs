//! Browser sessions for the keys API (contract §5): the canvas UI calls
//! `/org/tokens` with its session cookie instead of a key, and keygate asks
//! `session.verify_url` whether that cookie belongs to a member of the tenant.
//!
//! - Only the configured cookie is sent (`Cookie: <name>=<value>`), nothing
//!   else from the browser's request.
//! - `200` + `{"user_id": "..."}` is a member, `401`/`403` is not; anything
//!   else, or no answer within `session.timeout`, is a [`SessionError`]
//!   (the caller answers 503).
//! - Verdicts are cached by the SHA-256 of the cookie value, positives for
//!   `session.cache_ttl`, negatives for `session.negative_ttl`; errors never.
//!   The cookie value itself is never stored, logged or shown by `Debug`.
//!
//! [`origin_allowed`] is the cross-site guard for cookie-authenticated
//! `POST`/`DELETE`: the `Origin` must name a served host (contract §3 step 2).

use crate::error::ErrorChain;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, COOKIE, ORIGIN, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};

use crate::config::SessionConfig;
use crate::tls::{upstream_client_config, TlsError};

/// Upper bound on cached verdicts; when full, expired entries go first, then
/// the entry closest to expiry.
pub const CACHE_CAPACITY: usize = 10_000;

/// Largest verify response body read.
const MAX_BODY: usize = 64 * 1024;

/// Longest `user_id` accepted (it ends up in `created_by` and the audit trail).
const MAX_USER_ID: usize = 256;

const USER_AGENT_VALUE: &str = concat!("keygate/", env!("CARGO_PKG_VERSION"));

/// What the verify endpoint said about a cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A verified member of the tenant (`created_by` = `session:<user_id>`).
    Member { user_id: String },
    /// The endpoint refused the session (401/403).
    NotMember,
}

/// The verify endpoint could not give a verdict: the caller answers 503.
/// Messages never contain the cookie.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session verify endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("session verify request failed: {0}")]
    Request(String),
    #[error("session verify endpoint answered {0}")]
    Status(StatusCode),
    #[error("session verify endpoint sent a bad response: {0}")]
    BadResponse(String),
}

struct CacheEntry {
    verdict: Verdict,
    expires: Instant,
}

/// Verifies browser session cookies against `session.verify_url`, with a
/// pooled client and a bounded verdict cache.
pub struct SessionVerifier {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    verify_url: Uri,
    cookie: String,
    timeout: Duration,
    cache_ttl: Duration,
    negative_ttl: Duration,
    capacity: usize,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
}

impl fmt::Debug for SessionVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionVerifier")
            .field("verify_url", &self.verify_url)
            .field("cookie", &self.cookie)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("cached", &self.cached_len())
            .finish()
    }
}

impl SessionVerifier {
    /// A verifier whose `https://` verify URL is checked against the webpki roots.
    pub fn new(cfg: &SessionConfig) -> Result<Self, TlsError> {
        Ok(Self::with_client_config(cfg, upstream_client_config(None)?))
    }

    /// A verifier using `tls` for an `https://` verify URL (e.g. a config from
    /// [`upstream_client_config`] with an extra CA). `tls.alpn_protocols` must
    /// be empty (hyper-rustls sets it).
    pub fn with_client_config(cfg: &SessionConfig, tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(16)
            .build(connector);
        SessionVerifier {
            client,
            verify_url: cfg.verify_url.clone(),
            cookie: cfg.cookie.clone(),
            timeout: cfg.timeout,
            cache_ttl: cfg.cache_ttl,
            negative_ttl: cfg.negative_ttl,
            capacity: CACHE_CAPACITY,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The configured cookie name (`session.cookie`).
    pub fn cookie_name(&self) -> &str {
        &self.cookie
    }

    /// Number of cached verdicts (expired ones included until evicted).
    pub fn cached_len(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The verdict for a session cookie value: from the cache, or by asking
    /// the verify endpoint (bounded by `session.timeout`).
    pub async fn verify(&self, cookie_value: &str) -> Result<Verdict, SessionError> {
        let key: [u8; 32] = Sha256::digest(cookie_value.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return Ok(verdict);
        }
        let mut cookie = match HeaderValue::from_str(&format!("{}={cookie_value}", self.cookie)) {
            Ok(v) => v,
            // Not sendable as a header: cannot be anyone's session.
            Err(_) => return Ok(Verdict::NotMember),
        };
        cookie.set_sensitive(true);
        let verdict = match tokio::time::timeout(self.timeout, self.ask(cookie)).await {
            Ok(result) => result?,
            Err(_) => return Err(SessionError::Timeout(self.timeout)),
        };
        self.remember(key, &verdict);
        Ok(verdict)
    }

    async fn ask(&self, cookie: HeaderValue) -> Result<Verdict, SessionError> {
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = self.verify_url.clone();
        let headers = req.headers_mut();
        headers.insert(COOKIE, cookie);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));

        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| SessionError::Request(ErrorChain(&e).to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Ok(Verdict::NotMember),
            other => return Err(SessionError::Status(other)),
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| SessionError::BadResponse(format!("reading body: {}", ErrorChain(&*e))))?
            .to_bytes();
        parse_member(&body).map(|user_id| Verdict::Member { user_id })
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match cache.get(key) {
            Some(entry) if entry.expires > Instant::now() => Some(entry.verdict.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], verdict: &Verdict) {
        let ttl = match verdict {
            Verdict::Member { .. } => self.cache_ttl,
            Verdict::NotMember => self.negative_ttl,
        };
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.capacity && !cache.contains_key(&key) {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= self.capacity {
                let soonest = cache.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| *k);
                if let Some(k) = soonest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            CacheEntry {
                verdict: verdict.clone(),
                expires: now + ttl,
            },
        );
    }
}

/// `{"user_id": "<non-empty string>"}` (other fields ignored) → the user id.
fn parse_member(body: &[u8]) -> Result<String, SessionError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| SessionError::BadResponse(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(SessionError::BadResponse("not a JSON object".into()));
    };
    let user_id = match object.remove("user_id") {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(SessionError::BadResponse("user_id is not a string".into())),
        None => return Err(SessionError::BadResponse("no user_id".into())),
    };
    if user_id.is_empty() {
        return Err(SessionError::BadResponse("user_id is empty".into()));
    }
    if user_id.len() > MAX_USER_ID || user_id.chars().any(char::is_control) {
        return Err(SessionError::BadResponse(
            "user_id is too long or contains control characters".into(),
        ));
    }
    Ok(user_id)
}

/// The value of the cookie called `name` (exact, case-sensitive match) across
/// every `Cookie` header (`a=1; wos-session=xyz; b=2`); the first non-empty
/// one wins (browsers send the most specific path first).
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim_matches([' ', '\t']).split_once('='))
        .find(|(n, v)| *n == name && !v.trim_matches([' ', '\t']).is_empty())
        .map(|(_, v)| v.trim_matches([' ', '\t']))
}

/// Whether the request carries exactly one `Origin` whose host (scheme
/// `http`/`https`, optional port) is one of `served_hosts`, compared like the
/// Host check: case-insensitive, port and one trailing dot removed, exact
/// equality (never a suffix). Missing, `null`, malformed or foreign → false.
/// `served_hosts` in the Gate's normalised form ([`crate::request::Gate::served_hosts`]).
pub fn origin_allowed(headers: &HeaderMap, served_hosts: &[String]) -> bool {
    let mut origins = headers.get_all(ORIGIN).iter();
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    // A serialized origin is `scheme://host[:port]`: no userinfo, path,
    // query or fragment. Its authority is judged by the Host rules (§3 step 2).
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        && crate::request::host::is_served(authority.as_bytes(), served_hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    const COOKIE_NAME: &str = "wos-session";
    const GOOD: &str = "good-session-value";
    const BAD: &str = "bad-session-value";

    type Reply = Pin<Box<dyn Future<Output = http::Response<Full<Bytes>>> + Send>>;

    /// A real HTTP verify endpoint on 127.0.0.1:0 counting its calls and
    /// recording every Cookie header it received.
    struct FakeVerify {
        url: Uri,
        calls: Arc<AtomicUsize>,
        cookies: Arc<Mutex<Vec<Vec<String>>>>,
    }

    impl FakeVerify {
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn cookies(&self) -> Vec<Vec<String>> {
            self.cookies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    fn json(status: u16, body: &str) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("response")
    }

    async fn fake_verify<F>(answer: F) -> FakeVerify
    where
        F: Fn(Option<String>) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let cookies = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let (c, k) = (calls.clone(), cookies.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (c, k, answer) = (c.clone(), k.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let (c, k, answer) = (c.clone(), k.clone(), answer.clone());
                        async move {
                            c.fetch_add(1, Ordering::SeqCst);
                            let received: Vec<String> = req
                                .headers()
                                .get_all(COOKIE)
                                .iter()
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                .collect();
                            k.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(received.clone());
                            let cookie = match received.as_slice() {
                                [one] => one
                                    .strip_prefix(&format!("{COOKIE_NAME}="))
                                    .map(str::to_string),
                                _ => None,
                            };
                            Ok::<_, Infallible>(answer(cookie).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        FakeVerify {
            url: format!("http://{addr}/cp/auth/tenant-member?slug=acme")
                .parse()
                .expect("uri"),
            calls,
            cookies,
        }
    }

    /// The usual endpoint: GOOD is member `user_123`, anything else 401.
    async fn member_endpoint() -> FakeVerify {
        fake_verify(|cookie| {
            Box::pin(async move {
                match cookie.as_deref() {
                    Some(GOOD) => json(200, r#"{"user_id":"user_123","email":"a@b.c"}"#),
                    Some("forbidden") => json(403, r#"{"error":"not a member"}"#),
                    _ => json(401, r#"{"error":"unauthenticated"}"#),
                }
            })
        })
        .await
    }

    fn config(url: Uri) -> SessionConfig {
        SessionConfig {
            verify_url: url,
            cookie: COOKIE_NAME.into(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
        }
    }

    fn verifier(cfg: &SessionConfig) -> SessionVerifier {
        SessionVerifier::new(cfg).expect("verifier")
    }

    #[tokio::test]
    async fn good_cookie_is_member_and_only_that_cookie_is_sent() {
        let fake = member_endpoint().await;
        let v = verifier(&config(fake.url.clone()));
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE_NAME}={GOOD}; csrf=zzz"))
                .expect("hv"),
        );
        headers.append(COOKIE, HeaderValue::from_static("other=1"));
        let value = cookie_value(&headers, COOKIE_NAME).expect("cookie present");
        assert_eq!(
            v.verify(value).await.expect("verdict"),
            Verdict::Member {
                user_id: "user_123".into()
            }
        );
        assert_eq!(fake.calls(), 1);
        assert_eq!(fake.cookies(), vec![vec![format!("{COOKIE_NAME}={GOOD}")]]);
    }

    #[tokio::test]
    async fn refused_cookie_is_not_member() {
        let fake = member_endpoint().await;
        let v = verifier(&config(fake.url.clone()));
        assert_eq!(v.verify(BAD).await.expect("verdict"), Verdict::NotMember);
        assert_eq!(
            v.verify("forbidden").await.expect("verdict"),
            Verdict::NotMember
        );
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test]
    async fn verdicts_are_cached_errors_are_not() {
        let fake = member_endpoint().await;
        let v = verifier(&config(fake.url.clone()));
        for _ in 0..3 {
            assert!(matches!(
                v.verify(GOOD).await.expect("verdict"),
                Verdict::Member { .. }
            ));
        }
        assert_eq!(fake.calls(), 1, "positive verdict reused");
        for _ in 0..3 {
            assert_eq!(v.verify(BAD).await.expect("verdict"), Verdict::NotMember);
        }
        assert_eq!(fake.calls(), 2, "negative verdict reused");

        let failing = fake_verify(|_| Box::pin(async { json(500, "{}") })).await;
        let v = verifier(&config(failing.url.clone()));
        for _ in 0..2 {
            let err = v.verify(GOOD).await.expect_err("500 is an error");
            assert!(matches!(err, SessionError::Status(s) if s == 500), "{err}");
        }
        assert_eq!(failing.calls(), 2, "errors are never cached");
    }

    #[tokio::test]
    async fn cache_never_holds_the_cookie_value() {
        let fake = member_endpoint().await;
        let v = verifier(&config(fake.url.clone()));
        v.verify(GOOD).await.expect("verdict");
        let shown = format!("{v:?}");
        assert!(!shown.contains(GOOD), "{shown}");
        let cache = v.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let expected: [u8; 32] = Sha256::digest(GOOD.as_bytes()).into();
        assert_eq!(cache.keys().copied().collect::<Vec<_>>(), vec![expected]);
    }

    #[tokio::test]
    async fn negative_verdict_expires() {
        let fake = member_endpoint().await;
        let mut cfg = config(fake.url.clone());
        cfg.negative_ttl = Duration::from_millis(100);
        let v = verifier(&cfg);
        assert_eq!(v.verify(BAD).await.expect("verdict"), Verdict::NotMember);
        assert_eq!(v.verify(BAD).await.expect("verdict"), Verdict::NotMember);
        assert_eq!(fake.calls(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.calls() < 2 {
            assert!(Instant::now() < deadline, "negative verdict never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(v.verify(BAD).await.expect("verdict"), Verdict::NotMember);
        }
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test]
    async fn bad_answers_are_errors() {
        let cases: Vec<(u16, &'static str)> = vec![
            (200, "not json"),
            (200, "{}"),
            (200, r#"{"user_id":""}"#),
            (200, r#"{"user_id":42}"#),
            (200, r#"{"user_id":null}"#),
            (200, r#"["user_id"]"#),
            (302, "{}"),
            (404, "{}"),
            (500, "{}"),
            (503, "{}"),
        ];
        for (status, body) in cases {
            let fake = fake_verify(move |_| Box::pin(async move { json(status, body) })).await;
            let v = verifier(&config(fake.url.clone()));
            let result = v.verify(GOOD).await;
            assert!(result.is_err(), "{status} {body}: {result:?}");
            let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!msg.contains(GOOD), "{msg}");
        }
    }

    #[tokio::test]
    async fn hanging_endpoint_times_out() {
        let fake =
            fake_verify(|_| Box::pin(std::future::pending::<http::Response<Full<Bytes>>>())).await;
        let mut cfg = config(fake.url.clone());
        cfg.timeout = Duration::from_millis(300);
        let v = verifier(&cfg);
        let started = Instant::now();
        let err = v.verify(GOOD).await.expect_err("hanging endpoint");
        let took = started.elapsed();
        assert!(matches!(err, SessionError::Timeout(_)), "{err}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test]
    async fn endpoint_down_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let url: Uri = format!("http://{addr}/verify").parse().expect("uri");
        let v = verifier(&config(url));
        let err = v.verify(GOOD).await.expect_err("closed port");
        assert!(matches!(err, SessionError::Request(_)), "{err}");
        assert!(!err.to_string().contains(GOOD));
    }

    #[tokio::test]
    async fn cache_is_bounded() {
        let fake = member_endpoint().await;
        let mut v = verifier(&config(fake.url.clone()));
        v.capacity = 3;
        for i in 0..10 {
            v.verify(&format!("other-{i}")).await.expect("verdict");
            assert!(v.cached_len() <= 3);
        }
        assert_eq!(v.cached_len(), 3);
    }

    #[tokio::test]
    async fn https_verify_url_is_verified_against_the_ca() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("verify.crt");
        let key = dir.path().join("verify.key");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write");
        let acceptor = crate::tls::TlsAcceptor::new(&crate::config::TlsConfig {
            cert: cert.clone(),
            key,
            handshake_timeout: Duration::from_secs(5),
        })
        .expect("acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, c) = (acceptor.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |_req: http::Request<Incoming>| {
                        c.fetch_add(1, Ordering::SeqCst);
                        async { Ok::<_, Infallible>(json(200, r#"{"user_id":"u_tls"}"#)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let url: Uri = format!("https://localhost:{port}/verify")
            .parse()
            .expect("uri");

        let trusting = SessionVerifier::with_client_config(
            &config(url.clone()),
            upstream_client_config(Some(&cert)).expect("client config"),
        );
        assert_eq!(
            trusting.verify(GOOD).await.expect("verdict"),
            Verdict::Member {
                user_id: "u_tls".into()
            }
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Webpki roots only: the self-signed endpoint is refused before any request.
        let strict = verifier(&config(url));
        let err = strict
            .verify(GOOD)
            .await
            .expect_err("untrusted certificate");
        assert!(matches!(err, SessionError::Request(_)), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn cookie_value_finds_exact_name() {
        fn headers(values: &[&'static str]) -> HeaderMap {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(COOKIE, HeaderValue::from_static(v));
            }
            h
        }
        let cases: &[(&[&'static str], Option<&str>)] = &[
            (&["wos-session=xyz"], Some("xyz")),
            (&["a=1; wos-session=xyz; b=2"], Some("xyz")),
            (&["a=1;wos-session=xyz;b=2"], Some("xyz")),
            (&["a=1", "wos-session=xyz"], Some("xyz")),
            (&["wos-session=first; wos-session=second"], Some("first")),
            (&["wos-session=; wos-session=later"], Some("later")),
            (&["wos-session=a=b"], Some("a=b")),
            (&["x-wos-session=xyz"], None),
            (&["wos-session-x=xyz"], None),
            (&["WOS-SESSION=xyz"], None),
            (&["wos-session"], None),
            (&["wos-session="], None),
            (&["a=1; b=2"], None),
            (&[], None),
        ];
        for (values, expected) in cases {
            assert_eq!(
                cookie_value(&headers(values), COOKIE_NAME),
                *expected,
                "{values:?}"
            );
        }
    }

    #[test]
    fn origin_allowed_table() {
        let served = vec![
            "acme.moleculesai.app".to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "[::1]".to_string(),
        ];
        let cases: &[(&[&'static str], bool)] = &[
            (&["https://acme.moleculesai.app"], true),
            (&["http://acme.moleculesai.app"], true),
            (&["https://ACME.MoleculesAI.app"], true),
            (&["HTTPS://acme.moleculesai.app"], true),
            (&["https://acme.moleculesai.app:8443"], true),
            (&["https://acme.moleculesai.app."], true),
            (&["https://acme.moleculesai.app.:443"], true),
            (&["http://localhost:8080"], true),
            (&["http://127.0.0.1:8080"], true),
            (&["http://[::1]:8080"], true),
            (&["http://[::1]"], true),
            (&[], false),
            (&["null"], false),
            (&[""], false),
            (&["https://evil.example"], false),
            (&["https://evilacme.moleculesai.app"], false),
            (&["https://acme.moleculesai.app.evil.example"], false),
            (&["https://x.acme.moleculesai.app"], false),
            (&["https://moleculesai.app"], false),
            (&["https://acme.moleculesai.app.."], false),
            (&["ftp://acme.moleculesai.app"], false),
            (&["acme.moleculesai.app"], false),
            (&["https://acme.moleculesai.app/"], false),
            (&["https://acme.moleculesai.app/path"], false),
            (&["https://user@acme.moleculesai.app"], false),
            (&["https://evil.example@acme.moleculesai.app"], false),
            (&["https://acme.moleculesai.app:"], false),
            (&["https://acme.moleculesai.app:abc"], false),
            (&["https://acme.moleculesai.app:443:443"], false),
            (&["https://acme.moleculesai.app?x"], false),
            (&["http://[::2]:8080"], false),
            (&["http://[::1"], false),
            (
                &[
                    "https://acme.moleculesai.app",
                    "https://acme.moleculesai.app",
                ],
                false,
            ),
            (
                &["https://acme.moleculesai.app", "https://evil.example"],
                false,
            ),
        ];
        for (values, expected) in cases {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append(ORIGIN, HeaderValue::from_static(v));
            }
            assert_eq!(origin_allowed(&h, &served), *expected, "{values:?}");
        }
    }
}
