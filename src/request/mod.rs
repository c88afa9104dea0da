//! The gate's first three stages (contract §3 steps 1–3), as pure functions
//! over the request parts: request target, Host / `:authority`, path.
//! No I/O here; every refusal is a typed [`Rejection`].
//!
//! [`Gate::check`] runs, in this order (the first refusal wins):
//!
//! 0. `CONNECT` → 405; message framing (`Content-Length` with
//!    `Transfer-Encoding`, a `Transfer-Encoding` other than one `chunked`,
//!    any `Transfer-Encoding` in HTTP/1.0 or HTTP/2, a `Connection` header
//!    naming `Content-Length`, `Transfer-Encoding` or `Host`) → 400; a
//!    target (path + query) over [`MAX_TARGET_LEN`] → 414;
//! 1. [`target`]: origin-form, or HTTP/1.1 absolute-form naming the Host → 400;
//! 2. [`host`]: exactly one Host / a consistent `:authority` → 400; served → 421;
//! 3. [`path`]: strict rules → 400; deny prefixes on the matching view → 403;
//!    and recognises the `/org/tokens` routes.
//!
//! The common request (origin-form, one served Host, canonical path)
//! allocates nothing here.

pub mod host;
#[cfg(test)]
mod norms;
pub mod path;
pub mod scope;
pub mod target;

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderValue, Method, Version};

use crate::config::Config;
use crate::error::Rejection;

pub use path::{matching_view, KeysRoute};

/// Longest request target (path + query) keygate accepts: 8 KiB → 414 beyond.
pub const MAX_TARGET_LEN: usize = 8 * 1024;

/// What the gate established about an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The request arrived in absolute-form (HTTP/1.1) or with
    /// `:scheme`/`:authority` (HTTP/2): the forwarder sends `uri.path()` +
    /// query in origin-form and sets `Host` to [`Admitted::host`].
    pub rewrite_to_origin_form: bool,
    /// The authority to forward as `Host` (and `X-Forwarded-Host`): HTTP/1.x
    /// the `Host` header as received; HTTP/2 `:authority` (or a lone `host`).
    pub host: HeaderValue,
    /// `Some` when the matching view is a key management route: answered by
    /// keygate itself, never forwarded.
    pub keys_route: Option<KeysRoute>,
}

/// Steps 1–3, configured once from [`Config`].
#[derive(Debug, Clone)]
pub struct Gate {
    served_hosts: Vec<String>,
    deny_prefixes: Vec<String>,
}

impl Gate {
    pub fn new(config: &Config) -> Gate {
        Gate::with_rules(
            config.tenant.served_hosts().iter().map(String::as_str),
            config.policy.deny_prefixes.iter().map(String::as_str),
        )
    }

    /// A gate from served hosts and deny prefixes directly (tests, the demo).
    /// Hosts are brought into [`host::served_form`]; deny prefixes into their
    /// matching view (lower-case, repeated slashes merged), so a prefix can
    /// only ever be compared with views.
    pub fn with_rules<'a>(
        served_hosts: impl IntoIterator<Item = &'a str>,
        deny_prefixes: impl IntoIterator<Item = &'a str>,
    ) -> Gate {
        Gate {
            served_hosts: served_hosts.into_iter().map(host::served_form).collect(),
            deny_prefixes: deny_prefixes
                .into_iter()
                .map(|p| match matching_view(p) {
                    Ok(v) => v.into_owned(),
                    Err(_) => p.to_ascii_lowercase(),
                })
                .collect(),
        }
    }

    /// Framing, length, target (step 1), Host (step 2), path (step 3), in that order.
    pub fn check(&self, parts: &Parts) -> Result<Admitted, Rejection> {
        if parts.method == Method::CONNECT {
            return Err(Rejection::MethodNotAllowed);
        }
        check_framing(parts)?;
        check_connection(parts)?;
        check_head_size(parts)?;
        let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > MAX_TARGET_LEN {
            return Err(Rejection::UriTooLong);
        }
        let rewrite_to_origin_form = target::check(parts)?;
        let host = host::check(parts, &self.served_hosts)?;
        let keys_route = path::check(parts.uri.path(), &self.deny_prefixes)?;
        Ok(Admitted {
            rewrite_to_origin_form,
            host,
            keys_route,
        })
    }

    /// Served hosts, normalised (lower-case, no port, IPv6 in brackets).
    pub fn served_hosts(&self) -> &[String] {
        &self.served_hosts
    }

    /// Deny prefixes as matched (their matching views).
    pub fn deny_prefixes(&self) -> &[String] {
        &self.deny_prefixes
    }

    /// `authority` (e.g. an `Origin`'s host[:port]) is served, by step 2's rules.
    pub fn is_served(&self, authority: &str) -> bool {
        host::is_served(authority.as_bytes(), &self.served_hosts)
    }
}

/// Most request header fields keygate accepts (contract §3 step 6): 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// Largest request head (request line + header fields) keygate accepts: 431 beyond.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The parser's own limits are approximate (hyper's read buffer may take in a
/// larger head in one read, and HTTP/2 counts differently); this is the exact
/// contract limit, measured on the head as HTTP/1.1 would carry it.
fn check_head_size(parts: &Parts) -> Result<(), Rejection> {
    if parts.headers.len() > MAX_HEADERS {
        return Err(Rejection::HeadersTooLarge);
    }
    // "METHOD SP target SP HTTP/1.1 CRLF" + "name: value CRLF" each + CRLF.
    let mut size = parts.method.as_str().len()
        + parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + 13
        + 2;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    if size > MAX_HEAD_BYTES {
        return Err(Rejection::HeadersTooLarge);
    }
    Ok(())
}

/// A `Connection` header naming `Content-Length`, `Transfer-Encoding` or
/// `Host` → 400: those fields frame and route the message; no client may
/// declare them hop-by-hop (the smuggling hole of naming `Content-Length`).
fn check_connection(parts: &Parts) -> Result<(), Rejection> {
    for value in parts.headers.get_all(http::header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"content-length")
                || token.eq_ignore_ascii_case(b"transfer-encoding")
                || token.eq_ignore_ascii_case(b"host")
            {
                return Err(Rejection::FramingInConnection);
            }
        }
    }
    Ok(())
}

/// `Content-Length` with `Transfer-Encoding`, more than one `Transfer-Encoding`
/// header, or any value but a single `chunked` → 400; `Transfer-Encoding` is
/// refused outright in HTTP/2 (connection-specific, RFC 9113 §8.2.2) and in
/// HTTP/1.0 (RFC 9112 §6.1: the framing cannot be trusted).
fn check_framing(parts: &Parts) -> Result<(), Rejection> {
    let mut te = parts.headers.get_all(TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else {
        return Ok(());
    };
    let single_chunked = te.next().is_none()
        && parts.version == Version::HTTP_11
        && !parts.headers.contains_key(CONTENT_LENGTH)
        && first.as_bytes().eq_ignore_ascii_case(b"chunked");
    if single_chunked {
        Ok(())
    } else {
        Err(Rejection::BadFraming)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Uri;

    const HOST: &str = "acme.moleculesai.app";

    fn gate() -> Gate {
        Gate::with_rules([HOST, "localhost", "::1"], ["/cp/admin"])
    }

    struct Req {
        version: Version,
        method: Method,
        uri: Uri,
        headers: Vec<(&'static str, HeaderValue)>,
    }

    fn get(uri: &str) -> Req {
        Req {
            version: Version::HTTP_11,
            method: Method::GET,
            uri: uri.parse().unwrap(),
            headers: vec![("host", HeaderValue::from_static(HOST))],
        }
    }

    impl Req {
        fn v(mut self, v: Version) -> Self {
            self.version = v;
            self
        }
        fn m(mut self, m: &str) -> Self {
            self.method = m.parse().unwrap();
            self
        }
        fn h(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.push((name, HeaderValue::from_static(value)));
            self
        }
        fn no_host(mut self) -> Self {
            self.headers.retain(|(n, _)| *n != "host");
            self
        }
        fn parts(&self) -> Parts {
            let mut b = http::Request::builder()
                .version(self.version)
                .method(self.method.clone())
                .uri(self.uri.clone());
            for (n, v) in &self.headers {
                b = b.header(*n, v.clone());
            }
            b.body(()).unwrap().into_parts().0
        }
        fn check(&self) -> Result<Admitted, Rejection> {
            gate().check(&self.parts())
        }
    }

    macro_rules! t {
        ($req:expr, Ok) => {{
            let r = $req;
            assert!(
                r.check().is_ok(),
                "{:?} {} -> {:?}",
                r.method,
                r.uri,
                r.check()
            );
        }};
        ($req:expr, $err:ident) => {{
            let r = $req;
            assert_eq!(
                r.check(),
                Err(Rejection::$err),
                "{:?} {} {:?}",
                r.method,
                r.uri,
                r.headers
            );
        }};
    }

    #[test]
    fn typical_request() {
        let a = get("/api/v1/things?x=1").check().unwrap();
        assert_eq!(
            a,
            Admitted {
                rewrite_to_origin_form: false,
                host: HeaderValue::from_static(HOST),
                keys_route: None,
            }
        );
    }

    #[test]
    fn from_config() {
        let mut c = Config::new("acme", Uri::from_static("http://127.0.0.1:1"));
        c.tenant.extra_hosts = vec!["localhost".into(), "::1".into()];
        c.policy.deny_prefixes = vec!["/cp/admin".into(), "/internal".into()];
        let g = Gate::new(&c);
        assert_eq!(g.served_hosts(), [HOST, "localhost", "[::1]"]);
        assert!(g.is_served("ACME.moleculesai.app:443"));
        assert!(g.is_served("[::1]:8080"));
        assert!(!g.is_served("evil.com"));
        let p = get("/internal/x").parts();
        assert_eq!(g.check(&p), Err(Rejection::Forbidden));
    }

    #[test]
    fn deny_prefixes_are_brought_into_view_form() {
        let g = Gate::with_rules([HOST], ["/CP//Admin", "/%41pi/x"]);
        assert_eq!(g.deny_prefixes(), ["/cp/admin", "/api/x"]);
        let p = get("/cp/admin").parts();
        assert_eq!(g.check(&p), Err(Rejection::Forbidden));
        let p = get("/API/x").parts();
        assert_eq!(g.check(&p), Err(Rejection::Forbidden));
    }

    #[test]
    fn order_of_checks() {
        // CONNECT beats everything.
        t!(get("/cp/admin").m("CONNECT").no_host(), MethodNotAllowed);
        t!(
            get("/x").m("CONNECT").h("transfer-encoding", "gzip"),
            MethodNotAllowed
        );
        // Framing beats length, target, host, path.
        t!(
            get("*")
                .h("content-length", "1")
                .h("transfer-encoding", "chunked"),
            BadFraming
        );
        t!(
            get("/cp/admin").no_host().h("transfer-encoding", "gzip"),
            BadFraming
        );
        // Length beats target and host.
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        let mut r = get(&long).no_host();
        t!(r, UriTooLong);
        r = get("/x");
        r.uri = format!("http://evil.com{long}").parse().unwrap();
        t!(r, UriTooLong);
        // Target beats host.
        t!(get("*").no_host(), BadTarget);
        t!(get("http://evil.com/x"), BadTarget);
        // Host beats path.
        t!(get("/cp/admin").no_host(), BadHost);
        t!(get("/../x").no_host().h("host", "evil.com"), Misdirected);
        // Path last.
        t!(get("/../x"), AmbiguousPath);
        t!(get("/cp/admin"), Forbidden);
    }

    #[test]
    fn framing_table() {
        t!(get("/x").h("content-length", "10"), Ok);
        t!(get("/x").h("transfer-encoding", "chunked"), Ok);
        t!(get("/x").h("transfer-encoding", "Chunked"), Ok);
        t!(get("/x").h("transfer-encoding", "CHUNKED"), Ok);
        t!(get("/x").m("POST").h("transfer-encoding", "chunked"), Ok);
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, chunked",
            "chunked,",
            ",chunked",
            "chunked;q=1",
            "chunked ,",
            "identity",
            "",
            "chunkedx",
            "xchunked",
            "chunk",
            "\"chunked\"",
            "chunked\t",
        ] {
            let r = get("/x").h("transfer-encoding", te);
            assert_eq!(r.check(), Err(Rejection::BadFraming), "{te:?}");
        }
        t!(
            get("/x")
                .h("transfer-encoding", "chunked")
                .h("transfer-encoding", "chunked"),
            BadFraming
        );
        t!(
            get("/x")
                .h("transfer-encoding", "gzip")
                .h("transfer-encoding", "chunked"),
            BadFraming
        );
        t!(
            get("/x")
                .h("content-length", "0")
                .h("transfer-encoding", "chunked"),
            BadFraming
        );
        t!(
            get("/x")
                .h("transfer-encoding", "chunked")
                .h("content-length", "5"),
            BadFraming
        );
        t!(
            get("/x")
                .h("transfer-encoding", "chunked")
                .v(Version::HTTP_10),
            BadFraming
        );
        t!(
            get("https://acme.moleculesai.app/x")
                .v(Version::HTTP_2)
                .h("transfer-encoding", "chunked"),
            BadFraming
        );
        t!(
            get("https://acme.moleculesai.app/x")
                .v(Version::HTTP_2)
                .h("content-length", "3"),
            Ok
        );
    }

    #[test]
    fn length_limit() {
        let at = format!("/{}", "a".repeat(MAX_TARGET_LEN - 1));
        t!(get(&at), Ok);
        let q = format!("/a?{}", "q".repeat(MAX_TARGET_LEN - 3));
        t!(get(&q), Ok);
        let over = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        t!(get(&over), UriTooLong);
        let q = format!("/a?{}", "q".repeat(MAX_TARGET_LEN - 2));
        t!(get(&q), UriTooLong);
        // The authority of an absolute-form target is not counted.
        let mut r = get("/x");
        r.uri = format!("http://{HOST}{at}").parse().unwrap();
        t!(r, Ok);
    }

    #[test]
    fn absolute_form_and_http2() {
        t!(get("http://acme.moleculesai.app:80/x"), BadTarget); // Host has no port
        let a = get("http://ACME.moleculesai.app/x?y").check().unwrap();
        assert!(a.rewrite_to_origin_form);
        assert_eq!(a.host, HOST); // the Host header, as received
        t!(get("http://evil.com/x"), BadTarget);
        t!(
            get("http://acme.moleculesai.app/x").v(Version::HTTP_10),
            BadTarget
        );
        t!(get("http://user@acme.moleculesai.app/x"), BadTarget);
        t!(get("http://acme.moleculesai.app/cp/admin"), Forbidden);

        let h2 = |uri: &str| get(uri).v(Version::HTTP_2).no_host();
        let a = h2("https://ACME.moleculesai.app/x").check().unwrap();
        assert!(a.rewrite_to_origin_form);
        assert_eq!(a.host, "ACME.moleculesai.app");
        let a = h2("/x")
            .h("host", "acme.moleculesai.app:8443")
            .check()
            .unwrap();
        assert!(!a.rewrite_to_origin_form);
        assert_eq!(a.host, "acme.moleculesai.app:8443");
        t!(h2("/x"), BadHost);
        t!(
            h2("https://acme.moleculesai.app/x").h("host", "evil.com"),
            AuthorityMismatch
        );
        t!(
            h2("https://evil.com/x").h("host", "acme.moleculesai.app"),
            AuthorityMismatch
        );
        t!(h2("https://evil.com/x"), Misdirected);
        t!(
            h2("https://acme.moleculesai.app/%2e%2e/cp/admin"),
            AmbiguousPath
        );
        t!(h2("https://acme.moleculesai.app//CP/admin"), Forbidden);
        t!(
            h2("https://acme.moleculesai.app/x").m("CONNECT"),
            MethodNotAllowed
        );
    }

    #[test]
    fn keys_route_and_query() {
        let route = |uri: &str| get(uri).check().unwrap().keys_route;
        assert_eq!(route("/org/tokens"), Some(KeysRoute::Collection));
        assert_eq!(route("/org/tokens?cp/admin"), Some(KeysRoute::Collection));
        assert_eq!(
            route("/org/tokens/AbC?x"),
            Some(KeysRoute::Item("AbC".into()))
        );
        assert_eq!(route("/org/tokens/a/b"), Some(KeysRoute::Unknown));
        assert_eq!(route("/org/tokensx"), None);
        // The query string never matters.
        t!(get("/x?/cp/admin"), Ok);
        t!(get("/x?../..%2f%00;\\"), Ok);
        t!(get("/cp/admin?x"), Forbidden);
        t!(get("/cp/adm?in"), Ok);
    }

    #[test]
    fn methods() {
        for m in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND",
        ] {
            t!(get("/x").m(m), Ok);
            t!(get("/cp/admin").m(m), Forbidden);
        }
    }

    #[test]
    fn canonical_request_allocates_nothing_visible() {
        // Borrowed view for the typical path; the gate itself never builds one.
        assert!(matches!(
            matching_view("/api/v1/things"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5000))]

            /// An accepted target is forwarded byte for byte: the gate does not
            /// rewrite it, and what hyper parsed is exactly what was sent.
            #[test]
            fn accepted_targets_round_trip(
                path in "(/[a-zA-Z0-9._~!$&'()*+,=:@%-]{0,12}){1,5}",
                query in proptest::option::of("[a-zA-Z0-9/?.%;=&-]{0,16}"),
            ) {
                let target = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                if let Ok(uri) = target.parse::<Uri>() {
                    let mut r = get("/");
                    r.uri = uri;
                    let before = r.parts();
                    if gate().check(&before).is_ok() {
                        prop_assert_eq!(before.uri.path_and_query().unwrap().as_str(), target.as_str());
                        prop_assert_eq!(before.uri.to_string(), target.clone());
                        prop_assert_eq!(before.uri.path(), path.as_str());
                    }
                }
            }
        }
    }
}
