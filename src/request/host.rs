//! Step 2: Host / `:authority` (contract §3 step 2). Pure, no allocation
//! except for the HTTP/2 `:authority` copied into a `HeaderValue`.
//!
//! The authority is normalised — `:port` removed (1–5 digits; an empty port
//! is malformed), ONE trailing dot removed, IPv6 literals kept in brackets —
//! and compared for ASCII case-insensitive EQUALITY with each served host.
//! Never a suffix match: `evilacme.moleculesai.app`,
//! `acme.moleculesai.app.evil.com` and `acme.moleculesai.app..` are foreign.
//!
//! HTTP/1.x: exactly one `Host` header, else 400 (RFC 9112 §3.2).
//! HTTP/2: `:authority` (the request URI's authority), which must agree with
//! any `host` header (400 otherwise); `host` alone is accepted; neither is 400.
//! Malformed or foreign → 421.

use http::header::HOST;
use http::request::Parts;
use http::{HeaderValue, Version};

use crate::error::Rejection;

/// The host part of an authority, normalised for comparison: without
/// `:port`, without one trailing dot, IPv6 literals with their brackets.
/// `None` when malformed: empty, a character that has no business in a host
/// (space, control, non-ASCII, `@ / \ % ? #` …), a bad port, bad brackets.
/// Case is kept: compare with [`eq_host`].
pub fn normalize(authority: &[u8]) -> Option<&[u8]> {
    if authority.is_empty() || !authority.iter().all(|&c| is_authority_char(c)) {
        return None;
    }
    let (host, port) = if authority[0] == b'[' {
        let close = authority.iter().position(|&c| c == b']')?;
        let inside = &authority[1..close];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return None;
        }
        let rest = &authority[close + 1..];
        let port = match rest.split_first() {
            None => None,
            Some((b':', port)) => Some(port),
            Some(_) => return None,
        };
        return match port {
            Some(p) if !valid_port(p) => None,
            _ => Some(&authority[..=close]),
        };
    } else {
        if authority.iter().any(|&c| c == b'[' || c == b']') {
            return None;
        }
        match authority.iter().position(|&c| c == b':') {
            None => (authority, None),
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
        }
    };
    if let Some(p) = port {
        if !valid_port(p) {
            return None;
        }
    }
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some(host)
}

/// reg-name, IP-literal and port characters: unreserved, sub-delims, `:[]`.
/// (`%`-encoding is refused: no served host needs it.)
fn is_authority_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'['
                | b']'
        )
}

fn valid_port(p: &[u8]) -> bool {
    (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit)
}

/// Two authorities name the same host (both well-formed, normalised equal).
pub fn eq_host(a: &[u8], b: &[u8]) -> bool {
    match (normalize(a), normalize(b)) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// `authority` is one of `served` (as prepared by [`served_form`]).
pub fn is_served(authority: &[u8], served: &[String]) -> bool {
    match normalize(authority) {
        Some(h) => served.iter().any(|s| s.as_bytes().eq_ignore_ascii_case(h)),
        None => false,
    }
}

/// A configured served host in the form [`is_served`] compares against:
/// lower-case, port and one trailing dot removed, IPv6 in brackets
/// (`::1` and `[::1]` both become `[::1]`). A value that is not a valid
/// host is kept lower-cased (and so never matches anything well-formed).
pub fn served_form(host: &str) -> String {
    let bracketed;
    let host = if host.contains(':') && !host.starts_with('[') && host.matches(':').count() > 1 {
        bracketed = format!("[{host}]");
        bracketed.as_str()
    } else {
        host
    };
    match normalize(host.as_bytes()) {
        Some(h) => String::from_utf8_lossy(h).to_ascii_lowercase(),
        None => host.to_ascii_lowercase(),
    }
}

/// Step 2. Returns the authority to forward as `Host`: for HTTP/1.x the `Host`
/// header as received, for HTTP/2 `:authority` (or `host` when it is alone).
pub fn check(parts: &Parts, served: &[String]) -> Result<HeaderValue, Rejection> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(Rejection::BadHost);
    }
    let value = if is_h2(parts.version) {
        match (parts.uri.authority(), first) {
            (Some(a), Some(h)) if !eq_host(a.as_str().as_bytes(), h.as_bytes()) => {
                return Err(Rejection::AuthorityMismatch)
            }
            (Some(a), _) => {
                HeaderValue::from_str(a.as_str()).map_err(|_| Rejection::Misdirected)?
            }
            (None, Some(h)) => h.clone(),
            (None, None) => return Err(Rejection::BadHost),
        }
    } else {
        first.ok_or(Rejection::BadHost)?.clone()
    };
    if is_served(value.as_bytes(), served) {
        Ok(value)
    } else {
        Err(Rejection::Misdirected)
    }
}

pub(crate) fn is_h2(v: Version) -> bool {
    v == Version::HTTP_2 || v == Version::HTTP_3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Vec<String> {
        ["acme.moleculesai.app", "localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|h| served_form(h))
            .collect()
    }

    #[test]
    fn normalize_table() {
        macro_rules! t {
            ($in:expr, None) => {
                assert_eq!(normalize($in.as_bytes()), None, "{:?}", $in);
            };
            ($in:expr, $out:expr) => {
                assert_eq!(
                    normalize($in.as_bytes()),
                    Some($out.as_bytes()),
                    "{:?}",
                    $in
                );
            };
        }
        t!("acme.moleculesai.app", "acme.moleculesai.app");
        t!("ACME.MoleculesAI.app", "ACME.MoleculesAI.app");
        t!("acme.moleculesai.app.", "acme.moleculesai.app");
        t!("acme.moleculesai.app..", "acme.moleculesai.app.");
        t!("acme.moleculesai.app:8443", "acme.moleculesai.app");
        t!("acme.moleculesai.app.:8443", "acme.moleculesai.app");
        t!("acme.moleculesai.app:0", "acme.moleculesai.app");
        t!("acme.moleculesai.app:65535", "acme.moleculesai.app");
        t!("acme.moleculesai.app:99999", "acme.moleculesai.app");
        t!("a:1", "a");
        t!("localhost", "localhost");
        t!("127.0.0.1:8080", "127.0.0.1");
        t!("[::1]", "[::1]");
        t!("[::1]:8080", "[::1]");
        t!("[2001:DB8::1]:443", "[2001:DB8::1]");
        t!("[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]");
        t!("x_y~z", "x_y~z");
        t!("a!$&'()*+,;=b", "a!$&'()*+,;=b");
        // Malformed.
        for bad in [
            "",
            ".",
            ":80",
            ".:80",
            "acme.moleculesai.app:",
            "acme.moleculesai.app.:",
            "acme.moleculesai.app:123456",
            "acme.moleculesai.app:-1",
            "acme.moleculesai.app:+80",
            "acme.moleculesai.app: 80",
            "acme.moleculesai.app:80:80",
            "acme.moleculesai.app:http",
            "acme.moleculesai.app:８０",
            "::1",
            "::1:8080",
            "[::1",
            "::1]",
            "[]",
            "[]:80",
            "[::1]:",
            "[::1]x",
            "[::1]:80:80",
            "[::1]]",
            "[[::1]]",
            "[::g]",
            "[::1%25eth0]",
            "[v1.fe]",
            "a[b]",
            "acme moleculesai.app",
            " acme.moleculesai.app",
            "acme.moleculesai.app ",
            "acme.moleculesai.app\t",
            "acme.moleculesai.app\0",
            "acme.moleculesai.app\r\n",
            "user@acme.moleculesai.app",
            "acme.moleculesai.app@evil.com",
            "acme.moleculesai.app/",
            "acme.moleculesai.app/x",
            "acme.moleculesai.app\\",
            "acme%2emoleculesai.app",
            "acme.moleculesai.app?",
            "acme.moleculesai.app#",
            "acme.moleculesai.app\"",
            "<acme.moleculesai.app>",
            "acme.moléculesai.app",
            "acme.moleculesai.app\u{7f}",
            "ａcme.moleculesai.app",
        ] {
            t!(bad, None);
        }
    }

    #[test]
    fn served_table() {
        let s = served();
        assert_eq!(
            s,
            ["acme.moleculesai.app", "localhost", "127.0.0.1", "[::1]"]
        );
        macro_rules! t {
            ($in:expr, $want:expr) => {
                assert_eq!(is_served($in.as_bytes(), &s), $want, "{:?}", $in);
            };
        }
        for ok in [
            "acme.moleculesai.app",
            "ACME.MOLECULESAI.APP",
            "Acme.MoleculesAI.App",
            "acme.moleculesai.app.",
            "acme.moleculesai.app:443",
            "acme.moleculesai.app:8443",
            "ACME.moleculesai.app.:1",
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.0.0.1.",
            "[::1]",
            "[::1]:8080",
        ] {
            t!(ok, true);
        }
        for foreign in [
            "evilacme.moleculesai.app",
            "acme.moleculesai.app.evil.com",
            "acme.moleculesai.app..",
            "acme.moleculesai.app...",
            "x.acme.moleculesai.app",
            ".acme.moleculesai.app",
            "acme.moleculesai.ap",
            "acme.moleculesai.apps",
            "acme-moleculesai.app",
            "acmemoleculesai.app",
            "acme.moleculesai.app:",
            "acme.moleculesai.app:123456",
            "acme.moleculesai.app:80x",
            "moleculesai.app",
            "other.moleculesai.app",
            "acme.moleculesai.app@evil.com",
            "evil.com@acme.moleculesai.app",
            "user@acme.moleculesai.app",
            "acme.moleculesai.app%00",
            "acme.moleculesai.app/",
            "acme.moleculesai.app\\",
            "acme.moleculesai.app evil.com",
            "acme.moleculesai.app,evil.com",
            "acme.moleculesai.app;evil.com",
            "localhost.localdomain",
            "localhos",
            "127.0.0.2",
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "::1",
            "[::2]",
            "[0:0:0:0:0:0:0:1]",
            "[::1].",
            "",
            ":443",
        ] {
            t!(foreign, false);
        }
    }

    #[test]
    fn served_form_table() {
        assert_eq!(served_form("ACME.Example.COM"), "acme.example.com");
        assert_eq!(served_form("example.com."), "example.com");
        assert_eq!(served_form("example.com:8080"), "example.com");
        assert_eq!(served_form("::1"), "[::1]");
        assert_eq!(served_form("[::1]"), "[::1]");
        assert_eq!(served_form("[::1]:80"), "[::1]");
        assert_eq!(served_form("2001:DB8::1"), "[2001:db8::1]");
        assert_eq!(served_form("bad host"), "bad host");
    }

    #[test]
    fn eq_host_table() {
        assert!(eq_host(b"acme.moleculesai.app", b"ACME.moleculesai.app."));
        assert!(eq_host(
            b"acme.moleculesai.app:80",
            b"acme.moleculesai.app:8080"
        ));
        assert!(eq_host(b"[::1]:80", b"[::1]"));
        assert!(!eq_host(b"acme.moleculesai.app", b"evil.com"));
        assert!(!eq_host(b"acme.moleculesai.app", b"acme.moleculesai.app.."));
        assert!(!eq_host(b"bad host", b"bad host"));
        assert!(!eq_host(b"", b""));
    }

    fn parts(version: Version, uri: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn check_http1() {
        let s = served();
        use Version as V;
        macro_rules! t {
            ($v:expr, $hosts:expr, Ok($fwd:expr)) => {
                let p = parts($v, "/x", &$hosts);
                assert_eq!(
                    check(&p, &s),
                    Ok(HeaderValue::from_static($fwd)),
                    "{:?}",
                    $hosts
                );
            };
            ($v:expr, $hosts:expr, $err:ident) => {
                let p = parts($v, "/x", &$hosts);
                assert_eq!(check(&p, &s), Err(Rejection::$err), "{:?}", $hosts);
            };
        }
        for v in [V::HTTP_10, V::HTTP_11, V::HTTP_09] {
            t!(v, ["acme.moleculesai.app"], Ok("acme.moleculesai.app"));
            t!(
                v,
                ["ACME.moleculesai.app.:8443"],
                Ok("ACME.moleculesai.app.:8443")
            );
            t!(v, ["localhost:8080"], Ok("localhost:8080"));
            t!(v, ["[::1]:8080"], Ok("[::1]:8080"));
            t!(v, [] as [&str; 0], BadHost);
            t!(v, ["acme.moleculesai.app", "acme.moleculesai.app"], BadHost);
            t!(v, ["acme.moleculesai.app", "evil.com"], BadHost);
            t!(v, ["evil.com", "acme.moleculesai.app"], BadHost);
            t!(v, ["", ""], BadHost);
            t!(v, [""], Misdirected);
            t!(v, ["evil.com"], Misdirected);
            t!(v, ["evilacme.moleculesai.app"], Misdirected);
            t!(v, ["acme.moleculesai.app.evil.com"], Misdirected);
            t!(v, ["acme.moleculesai.app.."], Misdirected);
            t!(v, ["acme.moleculesai.app:"], Misdirected);
            t!(v, ["user@acme.moleculesai.app"], Misdirected);
            t!(v, ["acme.moleculesai.app/x"], Misdirected);
            t!(v, ["acme.moleculesai.app, evil.com"], Misdirected);
        }
        // Non-ASCII (obs-text) Host value.
        let mut p = parts(V::HTTP_11, "/x", &[]);
        p.headers.insert(
            HOST,
            HeaderValue::from_bytes(b"acme.moleculesai.app\xff").unwrap(),
        );
        assert_eq!(check(&p, &s), Err(Rejection::Misdirected));
        // An absolute-form authority is not a Host for HTTP/1.1.
        let p = parts(V::HTTP_11, "http://acme.moleculesai.app/x", &[]);
        assert_eq!(check(&p, &s), Err(Rejection::BadHost));
    }

    #[test]
    fn check_http2() {
        let s = served();
        let v = Version::HTTP_2;
        macro_rules! t {
            ($uri:expr, $hosts:expr, Ok($fwd:expr)) => {
                let p = parts(v, $uri, &$hosts);
                assert_eq!(
                    check(&p, &s),
                    Ok(HeaderValue::from_static($fwd)),
                    "{} {:?}",
                    $uri,
                    $hosts
                );
            };
            ($uri:expr, $hosts:expr, $err:ident) => {
                let p = parts(v, $uri, &$hosts);
                assert_eq!(check(&p, &s), Err(Rejection::$err), "{} {:?}", $uri, $hosts);
            };
        }
        const NONE: [&str; 0] = [];
        t!(
            "https://acme.moleculesai.app/x",
            NONE,
            Ok("acme.moleculesai.app")
        );
        t!(
            "http://acme.moleculesai.app:8080/x",
            NONE,
            Ok("acme.moleculesai.app:8080")
        );
        t!(
            "https://ACME.moleculesai.app./x",
            NONE,
            Ok("ACME.moleculesai.app.")
        );
        t!("https://[::1]:8443/x", NONE, Ok("[::1]:8443"));
        t!(
            "https://acme.moleculesai.app/x",
            ["acme.moleculesai.app"],
            Ok("acme.moleculesai.app")
        );
        t!(
            "https://acme.moleculesai.app/x",
            ["ACME.moleculesai.app.:443"],
            Ok("acme.moleculesai.app")
        );
        t!("/x", ["acme.moleculesai.app"], Ok("acme.moleculesai.app"));
        t!("/x", NONE, BadHost);
        t!(
            "https://acme.moleculesai.app/x",
            ["evil.com"],
            AuthorityMismatch
        );
        t!(
            "https://evil.com/x",
            ["acme.moleculesai.app"],
            AuthorityMismatch
        );
        t!(
            "https://acme.moleculesai.app/x",
            ["acme.moleculesai.app.."],
            AuthorityMismatch
        );
        t!(
            "https://acme.moleculesai.app/x",
            ["acme.moleculesai.app", "acme.moleculesai.app"],
            BadHost
        );
        t!(
            "/x",
            ["acme.moleculesai.app", "acme.moleculesai.app"],
            BadHost
        );
        t!("https://evil.com/x", NONE, Misdirected);
        t!("https://evilacme.moleculesai.app/x", NONE, Misdirected);
        t!("https://acme.moleculesai.app.evil.com/x", NONE, Misdirected);
        t!("https://acme.moleculesai.app../x", NONE, Misdirected);
        t!("https://evil.com/x", ["evil.com"], Misdirected);
        t!("/x", ["evil.com"], Misdirected);
        t!("https://user@acme.moleculesai.app/x", NONE, Misdirected);
    }
}
