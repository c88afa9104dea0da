//! Step 1: the request target (contract §3 step 1). Pure, no allocation.
//!
//! Accepted:
//! - origin-form `/path?query` (HTTP/1.x and the HTTP/2 `:path`);
//! - for HTTP/1.1 only, absolute-form `http(s)://authority/path?query` whose
//!   authority names the same host as the (single) `Host` header, normalised
//!   as in step 2. The forwarder rewrites it to origin-form.
//!
//! Refused (400): `*` (also for `OPTIONS`), authority-form, absolute-form in
//! HTTP/1.0, a scheme other than http/https, userinfo (`@` in the authority),
//! an absolute-form authority that differs from `Host`.
//!
//! HTTP/2: the URI carries `:scheme` and `:authority`; that is not
//! absolute-form but the authority source for step 2 (userinfo still refused).
//! `:path` must be origin-form.
//!
//! Fragments: the `http` crate truncates a `#fragment` when it parses a
//! request target (`PathAndQuery::from_shared` in http 1.x cuts at the first
//! `#`), so hyper hands us `/a` for `GET /a#x`; the fragment is never
//! forwarded, but it cannot be seen in [`Parts`] to be refused. A `#` that
//! does reach us (a hand-built URI) is refused.

use http::header::HOST;
use http::request::Parts;
use http::uri::Scheme;
use http::Version;

use super::host::{eq_host, is_h2};
use crate::error::Rejection;

/// Step 1. `Ok(true)`: the target must be rewritten to origin-form (absolute-form
/// HTTP/1.1, or an HTTP/2 URI carrying `:scheme`/`:authority`).
pub fn check(parts: &Parts) -> Result<bool, Rejection> {
    let uri = &parts.uri;
    // `Uri::path` is "" without a path (authority-form), "*" for `*`, and "/"
    // for an absolute URI whose path is empty (`http://h?q`).
    let origin_form = uri.path().starts_with('/')
        && uri
            .path_and_query()
            .is_some_and(|pq| !pq.as_str().contains('#'));
    if !origin_form {
        // `*`, authority-form (no path at all), an empty path.
        return Err(Rejection::BadTarget);
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(Rejection::BadTarget);
        }
    }
    if let Some(scheme) = uri.scheme() {
        if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
            return Err(Rejection::BadTarget);
        }
    }
    if is_h2(parts.version) {
        return Ok(uri.scheme().is_some() || uri.authority().is_some());
    }
    match (uri.scheme(), uri.authority()) {
        (None, None) => Ok(false),
        (Some(_), Some(authority)) if parts.version == Version::HTTP_11 => {
            let mut hosts = parts.headers.get_all(HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(host), None) => {
                    let a = authority.as_str().as_bytes();
                    if eq_host(a, host.as_bytes()) && port_of(a) == port_of(host.as_bytes()) {
                        Ok(true)
                    } else {
                        Err(Rejection::BadTarget)
                    }
                }
                // Missing or duplicated Host: step 2 answers that (400).
                _ => Ok(true),
            }
        }
        _ => Err(Rejection::BadTarget),
    }
}

/// The port of an authority (`h:8443` → `8443`, `[::1]:80` → `80`), if any:
/// an absolute-form target must name the Host's port exactly, or the app
/// (RFC 9112 §3.2.2: the target's authority wins) could see another one.
fn port_of(authority: &[u8]) -> Option<&[u8]> {
    let host_end = match authority.iter().rposition(|&b| b == b']') {
        Some(i) => i + 1,
        None => 0,
    };
    let colon = authority[host_end..].iter().rposition(|&b| b == b':')?;
    Some(&authority[host_end + colon + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Uri};

    fn parts(version: Version, method: Method, uri: Uri, hosts: &[&str]) -> Parts {
        let mut b = http::Request::builder()
            .version(version)
            .method(method)
            .uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    const H: &[&str] = &["acme.moleculesai.app"];

    #[test]
    fn http1_table() {
        use Version as V;
        macro_rules! t {
            ($v:expr, $target:expr, $hosts:expr, $want:expr) => {{
                let uri: Uri = $target.parse().unwrap();
                let p = parts($v, Method::GET, uri, $hosts);
                assert_eq!(check(&p), $want, "{:?} {} {:?}", $v, $target, $hosts);
            }};
        }
        let bad = Err(Rejection::BadTarget);
        for v in [V::HTTP_10, V::HTTP_11] {
            for target in [
                "/", "/a", "/a?b", "/a?", "/?x=1", "//a", "/a//b", "/%2e%2e", "/a?b#c", "/a#",
                "/#x",
            ] {
                t!(v, target, H, Ok(false));
            }
            t!(v, "/x", &[] as &[&str], Ok(false));
            for target in [
                "*",
                "acme.moleculesai.app:443",
                "acme.moleculesai.app",
                "evil.com:443",
                "ftp://acme.moleculesai.app/x",
                "ws://acme.moleculesai.app/x",
                "file://acme.moleculesai.app/x",
                "https://user@acme.moleculesai.app/x",
                "http://user:pass@acme.moleculesai.app/x",
                "http://@acme.moleculesai.app/x",
                "http://evil.com@acme.moleculesai.app/x",
                "http://evil.com/x",
                "http://evilacme.moleculesai.app/x",
                "http://acme.moleculesai.app.evil.com/x",
                "http://acme.moleculesai.app../x",
            ] {
                t!(v, target, H, bad);
            }
        }
        // Absolute-form: HTTP/1.1 only, authority equal to Host (normalised).
        for target in [
            "http://acme.moleculesai.app/x",
            "https://acme.moleculesai.app/x",
            "HTTP://acme.moleculesai.app/x",
            "http://ACME.MoleculesAI.app/x?y",
            "http://acme.moleculesai.app./x",
            "http://acme.moleculesai.app:8443/x",
            "http://acme.moleculesai.app",
            "http://acme.moleculesai.app?q",
        ] {
            // Host in another case and with one trailing dot, same port.
            let port = target
                .strip_prefix("http://")
                .or_else(|| target.strip_prefix("https://"))
                .or_else(|| target.strip_prefix("HTTP://"))
                .and_then(|rest| rest.split(['/', '?']).next())
                .and_then(|auth| auth.split_once(':').map(|(_, p)| format!(":{p}")))
                .unwrap_or_default();
            let host = format!("ACME.moleculesai.app.{port}");
            t!(V::HTTP_11, target, &[host.as_str()], Ok(true));
            let plain = if port.is_empty() { Ok(true) } else { bad };
            t!(V::HTTP_11, target, H, plain);
            // A different port (or a port on one side only) is another authority.
            let other = if port.is_empty() {
                "acme.moleculesai.app:80".to_string()
            } else {
                "acme.moleculesai.app".to_string()
            };
            t!(V::HTTP_11, target, &[other.as_str()], bad);
            t!(V::HTTP_10, target, H, bad);
            t!(V::HTTP_11, target, &["evil.com"], bad);
            t!(V::HTTP_11, target, &["acme.moleculesai.app.."], bad);
            t!(V::HTTP_11, target, &["acme.moleculesai.app:"], bad);
            t!(V::HTTP_11, target, &["user@acme.moleculesai.app"], bad);
            // Missing / duplicated Host: left to step 2.
            t!(V::HTTP_11, target, &[] as &[&str], Ok(true));
            t!(V::HTTP_11, target, &["evil.com", "evil.com"], Ok(true));
        }
        t!(V::HTTP_11, "http://[::1]:8080/x", &["[::1]:8080"], Ok(true));
        t!(V::HTTP_11, "http://[::1]:8080/x", &["[::1]"], bad);
        t!(V::HTTP_11, "http://[::1]/x", &["[::1]"], Ok(true));
        t!(V::HTTP_11, "http://[::1]:8080/x", &["[::2]"], bad);
        t!(V::HTTP_11, "http://localhost/x", H, bad);
    }

    #[test]
    fn fragment_is_truncated_by_the_http_crate() {
        // Documented above: a fragment never reaches the gate.
        let uri: Uri = "/a#/../cp/admin".parse().unwrap();
        assert_eq!(uri.path(), "/a");
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/a");
        let uri: Uri = "/a?b#c".parse().unwrap();
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/a?b");
        // Non-UTF-8 and raw control characters do not parse at all (the HTTP
        // parser answers 400 before the gate); the path rules refuse them anyway.
        assert!(Uri::try_from(&b"/a\xff"[..]).is_err());
        assert!(Uri::try_from(&b"/a\x00"[..]).is_err());
        assert!(Uri::try_from(&b"/a b"[..]).is_err());
    }

    #[test]
    fn options_star_and_methods() {
        for m in [Method::OPTIONS, Method::GET, Method::POST] {
            let p = parts(Version::HTTP_11, m, Uri::from_static("*"), H);
            assert_eq!(check(&p), Err(Rejection::BadTarget));
        }
    }

    #[test]
    fn http2_table() {
        let v = Version::HTTP_2;
        macro_rules! t {
            ($target:expr, $want:expr) => {{
                let uri: Uri = $target.parse().unwrap();
                let p = parts(v, Method::GET, uri, &[]);
                assert_eq!(check(&p), $want, "{}", $target);
            }};
        }
        t!("https://acme.moleculesai.app/x", Ok(true));
        t!("http://acme.moleculesai.app/x?y", Ok(true));
        t!("https://evil.com/x", Ok(true)); // step 2 refuses the host
        t!("/x", Ok(false));
        t!("*", Err(Rejection::BadTarget));
        t!(
            "https://user@acme.moleculesai.app/x",
            Err(Rejection::BadTarget)
        );
        t!("ftp://acme.moleculesai.app/x", Err(Rejection::BadTarget));
        t!("acme.moleculesai.app:443", Err(Rejection::BadTarget));
        // An empty :path becomes "/" in the http crate for absolute URIs.
        t!("https://acme.moleculesai.app", Ok(true));
    }

    #[test]
    fn hand_built_uri_with_fragment_is_refused() {
        // `Uri::from_parts` does not re-scan; make sure the gate would still refuse.
        let mut p = parts(Version::HTTP_11, Method::GET, Uri::from_static("/a"), H);
        if let Ok(pq) = http::uri::PathAndQuery::try_from("/a#b") {
            let mut up = http::uri::Parts::default();
            up.path_and_query = Some(pq);
            p.uri = Uri::from_parts(up).unwrap();
        }
        // Either the crate already dropped the fragment or we refuse it.
        let s = p.uri.path_and_query().unwrap().as_str();
        assert_eq!(check(&p).is_ok(), !s.contains('#'));
    }
}
