//! Step 3: the path (contract §3 step 3). Strict first, then canonical. Pure;
//! no allocation on the accepted path (the matching view is compared while
//! iterating, never built), except for a `/org/tokens/{id}` id.
//!
//! **Strict** (400 `ambiguous path`): a path containing any of
//! - a dot-segment `.` or `..` (an encoded dot is refused on its own),
//! - an encoded `/ \ . % ; ? #` (any hex case), an encoded control character
//!   (`%00`–`%1F`, `%7F`) or an encoded non-ASCII byte (`%80`–`%FF`),
//! - a raw `\` or `;`, a raw control character, space or non-ASCII byte,
//! - invalid percent-encoding (`%` not followed by two hex digits).
//!
//! What passes is unambiguous: every back-end decodes, splits and resolves it
//! the same way. The **matching view** is then the path with unreserved
//! escapes (`ALPHA DIGIT - _ ~`) decoded, repeated slashes merged and ASCII
//! lower-cased; a view that starts (byte-wise) with a deny prefix is 403. So
//! `/cp/admin`, `//CP/Admin`, `/cp/%61dmin`, `/cp/admin.json` and
//! `/cp/administrator` are all refused under `/cp/admin`, while `/cp/adm`,
//! `/cpx/admin` and `/api/cp/admin` pass. Other escapes (`%20`, `%2B`, …) stay
//! encoded in the view (lower-cased).
//!
//! A path that starts with `//` and is not refused by a deny prefix is 400
//! too: URL parsers read `//x/cp/admin` as host `x`, path `/cp/admin`.
//!
//! A path that passes is forwarded byte for byte as received: nothing here
//! rewrites it.

use std::borrow::Cow;

use crate::error::Rejection;

/// A key management route (contract §5), recognised on the matching view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysRoute {
    /// `/org/tokens` or `/org/tokens/`.
    Collection,
    /// `/org/tokens/{id}`: the id as it appears in the raw path (original
    /// case), unreserved escapes decoded.
    Item(String),
    /// `/org/tokens/{id}/rotate` (contract §9); the id as for `Item`.
    Rotate(String),
    /// `/org/tokens/{id}/usage` (contract §10); the id as for `Item`.
    Usage(String),
    /// Deeper under `/org/tokens/` (`/org/tokens/a/b`, `/org/tokens/a/`):
    /// answered 404 by keygate, never forwarded.
    Unknown,
}

/// Step 3 for the path part of the target (no query): strict rules, deny
/// prefixes (lower-case, as in the matching view), keys routes.
pub fn check<S: AsRef<str>>(
    path: &str,
    deny_prefixes: &[S],
) -> Result<Option<KeysRoute>, Rejection> {
    check_strict(path)?;
    if deny_prefixes
        .iter()
        .any(|p| view_starts_with(path, p.as_ref().as_bytes()))
    {
        return Err(Rejection::Forbidden);
    }
    // `//x/cp/admin` is a network-path reference to URL parsers such as
    // `new URL(path, base)` (host `x`, path `/cp/admin`): never forwarded.
    if path.starts_with("//") {
        return Err(Rejection::AmbiguousPath);
    }
    Ok(keys_route(path))
}

/// The matching view of `path`, or the strict rules' refusal. Borrowed when
/// the path is already canonical (no escapes, no repeated slash, lower-case).
pub fn matching_view(path: &str) -> Result<Cow<'_, str>, Rejection> {
    check_strict(path)?;
    let b = path.as_bytes();
    let canonical = !b.iter().any(|c| *c == b'%' || c.is_ascii_uppercase())
        && !b.windows(2).any(|w| w == b"//");
    if canonical {
        return Ok(Cow::Borrowed(path));
    }
    // The view of a strictly valid path is ASCII.
    String::from_utf8(View::new(path).collect())
        .map(Cow::Owned)
        .map_err(|_| Rejection::AmbiguousPath)
}

/// The strict rules alone.
pub fn check_strict(path: &str) -> Result<(), Rejection> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(Rejection::AmbiguousPath);
    }
    let mut seg_start = 1;
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'/' => {
                if is_dot_segment(&b[seg_start..i]) {
                    return Err(Rejection::AmbiguousPath);
                }
                seg_start = i + 1;
                i += 1;
            }
            b'%' => match escape_at(b, i) {
                Some(v) if escape_allowed(v) => i += 3,
                _ => return Err(Rejection::AmbiguousPath),
            },
            c if raw_allowed(c) => i += 1,
            _ => return Err(Rejection::AmbiguousPath),
        }
    }
    if is_dot_segment(&b[seg_start..]) {
        return Err(Rejection::AmbiguousPath);
    }
    Ok(())
}

fn is_dot_segment(seg: &[u8]) -> bool {
    seg == b"." || seg == b".."
}

/// Raw bytes allowed in a path (`%` and `/` are handled by the caller):
/// visible ASCII except `\ ; ? #`.
fn raw_allowed(c: u8) -> bool {
    matches!(c, 0x21..=0x7e) && !matches!(c, b'\\' | b';' | b'?' | b'#')
}

/// Decoded values an escape may carry: not `/ \ . % ; ? #`, not a control
/// character, not a non-ASCII byte.
fn escape_allowed(v: u8) -> bool {
    matches!(v, 0x20..=0x7e) && !matches!(v, b'/' | b'\\' | b'.' | b'%' | b';' | b'?' | b'#')
}

/// ALPHA DIGIT `-` `_` `~`: decoded in the matching view. (`.` is unreserved
/// in RFC 3986, but an encoded dot is refused outright.)
fn is_unreserved(v: u8) -> bool {
    v.is_ascii_alphanumeric() || matches!(v, b'-' | b'_' | b'~')
}

/// The byte encoded by the `%XX` at `b[i]`, if well-formed.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hi = hex(*b.get(i + 1)?)?;
    let lo = hex(*b.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The matching view of a (strictly valid) path, one byte at a time.
struct View<'a> {
    b: &'a [u8],
    i: usize,
    after_slash: bool,
}

impl<'a> View<'a> {
    fn new(path: &'a str) -> Self {
        View {
            b: path.as_bytes(),
            i: 0,
            after_slash: false,
        }
    }
}

impl Iterator for View<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        loop {
            let c = *self.b.get(self.i)?;
            if c == b'/' {
                self.i += 1;
                if self.after_slash {
                    continue;
                }
                self.after_slash = true;
                return Some(b'/');
            }
            self.after_slash = false;
            if c == b'%' {
                if let Some(v) = escape_at(self.b, self.i).filter(|v| is_unreserved(*v)) {
                    self.i += 3;
                    return Some(v.to_ascii_lowercase());
                }
            }
            // A kept escape's `%` and hex digits come out one by one.
            self.i += 1;
            return Some(c.to_ascii_lowercase());
        }
    }
}

/// The matching view of `path` starts with `prefix` (compared while iterating).
///
/// Byte-wise, with one widening: a deny prefix character that the view keeps
/// encoded (anything but unreserved and `/`, e.g. `:` in `/a:b`) also matches
/// its escape (`/a%3Ab`), so such a prefix cannot be dodged by encoding it.
/// For prefixes made of unreserved characters and `/` (the usual case) this
/// is exactly the contract's byte-wise comparison.
pub(crate) fn view_starts_with(path: &str, prefix: &[u8]) -> bool {
    let mut view = View::new(path);
    prefix.iter().all(|&p| match view.next() {
        Some(v) if v == p => true,
        Some(b'%') => {
            let (hi, lo) = (view.next().and_then(hex), view.next().and_then(hex));
            matches!((hi, lo), (Some(hi), Some(lo)) if hi << 4 | lo == p)
        }
        _ => false,
    })
}

/// Where, in the raw `path`, the segment after a view prefix begins: the
/// matching view of `path` starts with `prefix` (exactly, byte-wise; the
/// prefix is a view that ends with `/`) and the raw bytes consumed for it are
/// followed by byte `Some(i)`. `None` when the view does not start with the
/// prefix. Used by the scope check (`request::scope`) to find a bound key's
/// workspace segment in the path as received.
pub(crate) fn raw_after_view_prefix(path: &str, prefix: &[u8]) -> Option<usize> {
    let mut view = View::new(path);
    for &p in prefix {
        if view.next()? != p {
            return None;
        }
    }
    Some(view.i)
}

/// `/org/tokens`, `/org/tokens/`, `/org/tokens/{id}`, deeper: on the view.
fn keys_route(path: &str) -> Option<KeysRoute> {
    const ROUTE: &[u8] = b"/org/tokens";
    let mut view = View::new(path);
    if !ROUTE.iter().all(|&r| view.next() == Some(r)) {
        return None;
    }
    match view.next() {
        None => return Some(KeysRoute::Collection),
        Some(b'/') => {}
        Some(_) => return None, // `/org/tokensx`, `/org/tokens.json`
    }
    // No `//` in a view: anything after the slash is the id's first byte.
    if view.next().is_none() {
        return Some(KeysRoute::Collection);
    }
    if view.any(|c| c == b'/') {
        return Some(sub_route(path).unwrap_or(KeysRoute::Unknown));
    }
    // The raw path ends with the id's segment (the view has no trailing slash,
    // so neither has the raw path).
    let raw = path.rsplit('/').next().unwrap_or_default();
    Some(KeysRoute::Item(decode_unreserved(raw)))
}

/// `/org/tokens/{id}/rotate` and `/org/tokens/{id}/usage` (the route part
/// compared like the matching view: unreserved escapes decoded, any case;
/// repeated slashes merged). Anything else deeper is `None` (→ `Unknown`).
fn sub_route(path: &str) -> Option<KeysRoute> {
    if path.ends_with('/') {
        return None;
    }
    // The caller matched `/org/tokens/` on the view: the raw path's non-empty
    // segments are `org`, `tokens`, then the rest.
    let mut segs = path.split('/').filter(|s| !s.is_empty()).skip(2);
    let (id, action) = (segs.next()?, segs.next()?);
    if segs.next().is_some() {
        return None;
    }
    let id = decode_unreserved(id);
    let action = decode_unreserved(action);
    if action.eq_ignore_ascii_case("rotate") {
        Some(KeysRoute::Rotate(id))
    } else if action.eq_ignore_ascii_case("usage") {
        Some(KeysRoute::Usage(id))
    } else {
        None
    }
}

/// `seg` with unreserved escapes decoded, case kept.
fn decode_unreserved(seg: &str) -> String {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = escape_at(b, i).filter(|v| is_unreserved(*v)) {
                out.push(v as char);
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &[&str] = &["/cp/admin"];

    #[derive(Debug, PartialEq)]
    enum Want {
        Pass,
        Bad,
        Deny,
    }
    use Want::*;

    fn outcome(path: &str, deny: &[&str]) -> Want {
        match check(path, deny) {
            Ok(_) => Pass,
            Err(Rejection::AmbiguousPath) => Bad,
            Err(Rejection::Forbidden) => Deny,
            Err(e) => panic!("{path}: unexpected {e:?}"),
        }
    }

    macro_rules! t {
        ($path:expr, $want:ident) => {
            assert_eq!(outcome($path, DENY), $want, "path {:?}", $path);
        };
        ($path:expr, $want:ident, $deny:expr) => {
            assert_eq!(
                outcome($path, $deny),
                $want,
                "path {:?} deny {:?}",
                $path,
                $deny
            );
        };
    }

    #[test]
    fn contract_examples() {
        t!("/cp/admin", Deny);
        t!("/cp/admin/x", Deny);
        t!("//CP/Admin", Deny);
        t!("/cp/%61dmin", Deny);
        t!("/cp/admin.json", Deny);
        t!("/cp/administrator", Deny);
        t!("/cp/adm", Pass);
        t!("/cpx/admin", Pass);
        t!("/api/cp/admin", Pass);
    }

    #[test]
    fn deny_prefix_spellings() {
        for p in [
            "/cp/admin",
            "/cp/admin/",
            "/cp/admin/x/y",
            "/cp/admin?x", // (the gate passes the path only; `?` raw is refused)
            "/CP/ADMIN",
            "/Cp/AdMiN",
            "/cp/Admin",
            "//cp/admin",
            "///cp///admin",
            "/cp//admin",
            "/cp/admin//",
            "/%63p/admin",
            "/%43P/admin",
            "/c%70/admin",
            "/cp/%61dmin",
            "/cp/%41dmin",
            "/cp/a%64min",
            "/cp/ad%6Din",
            "/cp/ad%6din",
            "/cp/adm%69n",
            "/cp/admi%6e",
            "/cp/admi%6E",
            "/cp/admi%4E",
            "/%63%70/%61%64%6d%69%6e",
            "/%43%50/%41%44%4D%49%4E",
            "/cp/admin.json",
            "/cp/admin.",
            "/cp/admin-",
            "/cp/admin_x",
            "/cp/admin~",
            "/cp/admin%2D",
            "/cp/admin%7e",
            "/cp/administrator",
            "/cp/admin%20",
            "/cp/admin%2B",
            "/cp/admin%40x",
            "/cp/admin@x",
            "/cp/admin:x",
            "/cp/admin!",
            "/cp/admin...",
            "/cp/admin..x",
            "/cp/admin%22",
            "/cp/admin{}",
        ] {
            if p.contains('?') {
                t!(p, Bad);
            } else {
                t!(p, Deny);
            }
        }
    }

    #[test]
    fn passes() {
        for p in [
            "/",
            "/a",
            "/api/v1/things",
            "/API/V1/Things",
            "/a/b/c/",
            "/a//b",
            "/cp",
            "/cp/",
            "/cp/adm",
            "/cp/admi",
            "/cp/admi/n",
            "/cpx/admin",
            "/cp-admin",
            "/cp_admin",
            "/cp%2Dadmin", // "-"
            "/cp%20/admin",
            "/cp%20admin",
            "/cp%2Badmin",
            "/api/cp/admin",
            "/x/cp/admin",
            "/%7Ecp/admin",
            "/...",
            "/a/.../b",
            "/.a",
            "/a.",
            "/..a",
            "/a..",
            "/.well-known/x",
            "/a/b.json",
            "/a%20b",
            "/a%2Bb",
            "/a%2bb",
            "/a%40b",
            "/a%3Ab",
            "/a%3db",
            "/a%26b",
            "/a%21",
            "/a%7B%7D",
            "/a%22",
            "/a%27",
            "/a%28%29",
            "/a%2A",
            "/a%2C",
            "/a%3C%3E",
            "/a%5B%5D",
            "/a%5E",
            "/a%60",
            "/a%7C",
            "/a@b:c!$&'()*+,=",
            "/a\"{}|[]^`",
            "/a~b-c_d",
            "/%41",
            "/%7e",
            "/%7E",
            "/%5F",
            "/%2D",
            "/%30%39",
        ] {
            let want = if p == "/cp/admin" { Deny } else { Pass };
            assert_eq!(outcome(p, DENY), want, "path {p:?}");
        }
    }

    #[test]
    fn leading_double_slash_is_ambiguous_unless_denied() {
        for p in [
            "//",
            "//x",
            "//x/cp/admin",
            "//a/b",
            "///a",
            "//org/tokens",
            "//%61",
        ] {
            assert_eq!(check(p, DENY), Err(Rejection::AmbiguousPath), "{p:?}");
        }
        for p in [
            "//cp/admin",
            "//CP/Admin",
            "///cp///admin",
            "//cp/admin.json",
        ] {
            assert_eq!(check(p, DENY), Err(Rejection::Forbidden), "{p:?}");
        }
    }

    #[test]
    fn ambiguous() {
        for p in [
            // dot-segments
            "/.",
            "/..",
            "/./",
            "/../",
            "/a/.",
            "/a/..",
            "/a/./b",
            "/a/../b",
            "/./cp/admin",
            "/x/../cp/admin",
            "//..//cp/admin",
            "/a/./",
            "/a//./b",
            // encoded dots, any case and position
            "/%2e",
            "/%2E",
            "/%2e%2e",
            "/%2E%2E/cp/admin",
            "/.%2e/cp/admin",
            "/%2e./cp/admin",
            "/a%2eb",
            "/a%2Ejson",
            "/cp/admin%2ejson",
            // encoded separators and meta
            "/%2f",
            "/%2F",
            "/cp%2fadmin",
            "/cp%2Fadmin",
            "/%5c",
            "/%5C",
            "/cp%5cadmin",
            "/%25",
            "/%2561",
            "/cp/%2561dmin",
            "/%252e%252e",
            "/%3b",
            "/%3B",
            "/cp/admin%3bx",
            "/%3f",
            "/%3F",
            "/cp%3F/admin",
            "/%23",
            "/cp%23/admin",
            // encoded controls
            "/%00",
            "/a%00b",
            "/%01",
            "/%09",
            "/%0a",
            "/%0A",
            "/%0d",
            "/%0D",
            "/%1f",
            "/%1F",
            "/%7f",
            "/%7F",
            "/cp/admin%00",
            // encoded non-ASCII
            "/%80",
            "/%ff",
            "/%FF",
            "/%c0%ae",
            "/%C0%AE%C0%AE/cp/admin",
            "/%e2%80%ae",
            "/%c3%a9",
            "/%A0",
            // raw
            "/a\\b",
            "/\\cp\\admin",
            "\\cp/admin",
            "/cp\\admin",
            "/a;b",
            "/cp/admin;x",
            "/cp;/admin",
            "/;",
            "/a?b",
            "/a#b",
            "/a b",
            "/a\tb",
            "/a\0b",
            "/a\rb",
            "/a\nb",
            "/a\u{7f}",
            "/é",
            "/cp/ädmin",
            "/\u{ff0f}",
            "/cp/admın",
            // invalid percent-encoding
            "/%",
            "/%a",
            "/%A",
            "/a%",
            "/a%g0",
            "/a%0g",
            "/a%%41",
            "/a%-1",
            "/a% 1",
            "/a%+1",
            "/%u0041",
            "/%%",
            // not a path
            "",
            "*",
            "a",
            "cp/admin",
            "?x",
        ] {
            t!(p, Bad);
        }
    }

    #[test]
    fn dot_segment_rule_is_exact() {
        // Dots inside a segment are fine; only whole `.` / `..` segments are not.
        for (p, want) in [
            ("/a.b", Pass),
            ("/a..b", Pass),
            ("/.../", Pass),
            ("/.x/", Pass),
            ("/x./", Pass),
            ("/./", Bad),
            ("/../", Bad),
            ("/x/.", Bad),
            ("/x/..", Bad),
            ("/x/.//", Bad),
            ("/.//x", Bad),
        ] {
            t!(p, want);
        }
    }

    #[test]
    fn many_prefixes_and_empty_list() {
        let deny = &["/cp/admin", "/internal", "/metrics", "/a%20b", "/"][..];
        t!("/internal", Deny, &deny[..4]);
        t!("/INTERNAL/x", Deny, &deny[..4]);
        t!("/internalx", Deny, &deny[..4]);
        t!("/metrics", Deny, &deny[..4]);
        t!("/%6Detrics", Deny, &deny[..4]);
        t!("/a%20b", Deny, &deny[..4]);
        t!("/A%20B", Deny, &deny[..4]);
        t!("/intern", Pass, &deny[..4]);
        t!("/x", Pass, &deny[..4]);
        t!("/x", Deny, deny); // "/" denies everything
                              // A prefix with characters the view keeps encoded matches their escapes too.
        let odd = &["/a:b", "/x y", "/p+q"][..];
        for p in [
            "/a:b", "/a%3Ab", "/a%3ab/c", "/A%3AB", "/x%20y", "/X%20Y", "/p+q", "/p%2Bq", "/p%2bqq",
        ] {
            t!(p, Deny, odd);
        }
        for p in ["/a%3A", "/a:c", "/a%3Bb", "/x%21y", "/p%2Cq", "/p-q"] {
            let want = if p == "/a%3Bb" { Bad } else { Pass };
            t!(p, want, odd);
        }
        t!("/cp/admin", Pass, &[] as &[&str]);
        t!("/cp/admin/..", Bad, &[] as &[&str]);
    }

    #[test]
    fn matching_view_table() {
        macro_rules! v {
            ($path:expr, $view:expr, $borrowed:expr) => {
                let got = matching_view($path).unwrap();
                assert_eq!(got, $view, "{:?}", $path);
                assert_eq!(matches!(got, Cow::Borrowed(_)), $borrowed, "{:?}", $path);
            };
        }
        v!("/", "/", true);
        v!("/api/v1/things", "/api/v1/things", true);
        v!("/a.b/c-d_e~f", "/a.b/c-d_e~f", true);
        v!("//", "/", false);
        v!("///a///b///", "/a/b/", false);
        v!("/API/V1", "/api/v1", false);
        v!("//CP/Admin", "/cp/admin", false);
        v!("/cp/%61dmin", "/cp/admin", false);
        v!("/%41%42%43", "/abc", false);
        v!("/%7E%7e%2D%5F%30", "/~~-_0", false);
        v!("/a%20B", "/a%20b", false);
        v!("/a%2Bb", "/a%2bb", false);
        v!("/a%3A%40", "/a%3a%40", false);
        v!("/%2B%41", "/%2ba", false);
        for bad in ["/../x", "/%2e", "/a;b", "/%", ""] {
            assert_eq!(matching_view(bad), Err(Rejection::AmbiguousPath), "{bad:?}");
        }
    }

    #[test]
    fn keys_routes() {
        macro_rules! k {
            ($path:expr, $want:expr) => {
                assert_eq!(check($path, DENY), Ok($want), "{:?}", $path);
            };
        }
        use KeysRoute::*;
        k!("/org/tokens", Some(Collection));
        k!("/org/tokens/", Some(Collection));
        k!("/org/tokens//", Some(Collection));
        // A leading `//` is a network-path reference to URL parsers: 400.
        assert_eq!(check("//org//tokens", DENY), Err(Rejection::AmbiguousPath));
        k!("/ORG/Tokens", Some(Collection));
        k!("/org/%74okens", Some(Collection));
        k!("/org/tokens/abc123", Some(Item("abc123".into())));
        k!("/org/tokens/AbC123xYz", Some(Item("AbC123xYz".into())));
        k!("/org/tokens//AbC", Some(Item("AbC".into())));
        k!("/ORG/TOKENS/AbC", Some(Item("AbC".into())));
        k!("/org/tokens/%41b%63", Some(Item("Abc".into())));
        k!("/org/tokens/a%20b", Some(Item("a%20b".into())));
        k!("/org/tokens/a.b", Some(Item("a.b".into())));
        k!("/org/tokens/a/b", Some(Unknown));
        k!("/org/tokens/AbC/rotate", Some(Rotate("AbC".into())));
        k!("/org/tokens/AbC/ROTATE", Some(Rotate("AbC".into())));
        k!("/org/tokens//AbC//rotate", Some(Rotate("AbC".into())));
        k!("/org/tokens/%41b/%72otate", Some(Rotate("Ab".into())));
        k!("/org/tokens/AbC/usage", Some(Usage("AbC".into())));
        k!("/org/tokens/AbC/Usage", Some(Usage("AbC".into())));
        k!("/org/tokens/AbC/rotate/", Some(Unknown));
        k!("/org/tokens/AbC/rotate/x", Some(Unknown));
        k!("/org/tokens/AbC/rotatex", Some(Unknown));
        k!("/org/tokens/AbC/usage.json", Some(Unknown));
        k!("/org/tokens/a/", Some(Unknown));
        k!("/org/tokens/a//", Some(Unknown));
        k!("/org/tokens/a/b/c", Some(Unknown));
        k!("/org/token", None);
        k!("/org/tokensx", None);
        k!("/org/tokens.json", None);
        k!("/org/tokens%20", None);
        k!("/org", None);
        k!("/", None);
        k!("/api/org/tokens", None);
        k!("/orgs/tokens", None);
        k!("/org/tokens-x/a", None);
        assert_eq!(
            check("/org/tokens/../x", DENY),
            Err(Rejection::AmbiguousPath)
        );
        assert_eq!(
            check("/org/tokens/%2e%2e", DENY),
            Err(Rejection::AmbiguousPath)
        );
        assert_eq!(
            check("/org/tokens/a%2fb", DENY),
            Err(Rejection::AmbiguousPath)
        );
        // A deny prefix covering the route wins.
        assert_eq!(check("/org/tokens", &["/org"]), Err(Rejection::Forbidden));
    }

    mod props {
        use super::super::*;
        use crate::request::norms::Norm;
        use proptest::prelude::*;

        const DENY: &[&str] = &["/cp/admin", "/internal/", "/_debug"];

        /// Pieces an attacker would combine around a deny prefix.
        fn piece() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "/", "//", "cp", "CP", "Cp", "admin", "Admin", "ADMIN", "adm", "in", "internal",
                "_debug", "debug", "a", "d", "m", "i", "n", "c", "p", "x", ".", "..", "%", "%2",
                "%25", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%3b", "%3B", "%61", "%41", "%64",
                "%6d", "%6D", "%69", "%6e", "%6E", "%63", "%43", "%70", "%50", "%5f", "%5F", "%2d",
                "%7e", "%20", "%2B", "%40", "%00", "%c0%ae", "%ff", "2", "5", "e", "f", "3", "b",
                "\\", ";", ";x=1", "-", "_", "~", "@", ":", "!", "+",
            ])
            .prop_map(str::to_string)
        }

        /// Free combinations of pieces.
        fn free_path() -> impl Strategy<Value = String> {
            (
                prop::sample::select(vec![
                    "/",
                    "//",
                    "/cp/",
                    "/cp",
                    "/cp/adm",
                    "/cp/a",
                    "/c",
                    "/internal",
                    "/_",
                ]),
                prop::collection::vec(piece(), 0..12),
            )
                .prop_map(|(head, pieces)| format!("{head}{}", pieces.concat()))
        }

        /// A deny prefix, each character spelled one of many ways (raw, upper,
        /// `%xx`, `%XX`, double-encoded), with pieces sometimes slipped in
        /// between, then a tail: near misses and hits in fair numbers.
        fn mutated_prefix() -> impl Strategy<Value = String> {
            let spelling = (0u8..20, prop::option::weighted(0.05, piece()));
            (
                prop::sample::select(DENY.to_vec()),
                prop::collection::vec(spelling, 16),
                prop::collection::vec(piece(), 0..4),
            )
                .prop_map(|(prefix, spellings, tail)| {
                    let mut out = String::new();
                    for (c, (how, insert)) in prefix.chars().zip(spellings) {
                        match how {
                            0..=12 => out.push(c),
                            13 | 14 => out.push(c.to_ascii_uppercase()),
                            15 => out.push_str(&format!("%{:02x}", c as u8)),
                            16 => out.push_str(&format!("%{:02X}", c as u8)),
                            17 => out.push_str(&format!("%25{:02x}", c as u8)),
                            18 => {}
                            _ => {
                                out.push(c);
                                out.push(c);
                            }
                        }
                        if let Some(p) = insert {
                            out.push_str(&p);
                        }
                    }
                    if !out.starts_with('/') {
                        out.insert(0, '/');
                    }
                    out.push_str(&tail.concat());
                    out
                })
        }

        fn path() -> impl Strategy<Value = String> {
            prop_oneof![free_path(), mutated_prefix()]
        }

        fn norm() -> impl Strategy<Value = Norm> {
            prop::sample::select(Norm::ALL.to_vec())
        }

        fn denied(p: &[u8]) -> bool {
            let lower = p.to_ascii_lowercase();
            DENY.iter().any(|d| lower.starts_with(d.as_bytes()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(20_000))]

            /// For any path the gate accepts, no back-end normalisation (or
            /// combination) reaches a denied path.
            #[test]
            fn accepted_paths_never_normalise_into_a_deny_prefix(
                p in path(),
                norms in prop::collection::vec(norm(), 1..6),
            ) {
                if check(&p, DENY).is_ok() {
                    // Each single normalisation, and the sequence.
                    for n in [Norm::DecodeOnce, Norm::DecodeAll, Norm::RemoveDots,
                              Norm::MergeSlashes, Norm::Backslash, Norm::StripParams] {
                        let once = n.apply(p.as_bytes());
                        prop_assert!(!denied(&once), "{p:?} --{n:?}--> {:?}", String::from_utf8_lossy(&once));
                    }
                    let mut cur = p.as_bytes().to_vec();
                    for n in &norms {
                        cur = n.apply(&cur);
                        prop_assert!(!denied(&cur), "{p:?} --{norms:?}--> {:?}", String::from_utf8_lossy(&cur));
                    }
                }
            }

            /// A path is refused 403 exactly when its matching view is denied,
            /// and the view is a fixed point.
            #[test]
            fn view_is_consistent(p in path()) {
                match matching_view(&p) {
                    Ok(view) => {
                        let is_denied = DENY.iter().any(|d| view.starts_with(d));
                        let network_path = p.starts_with("//");
                        prop_assert_eq!(check(&p, DENY).is_err(), is_denied || network_path);
                        if is_denied {
                            prop_assert_eq!(check(&p, DENY), Err(Rejection::Forbidden));
                        } else if network_path {
                            prop_assert_eq!(check(&p, DENY), Err(Rejection::AmbiguousPath));
                        }
                        let again = matching_view(&view).unwrap();
                        prop_assert_eq!(again.as_ref(), view.as_ref());
                    }
                    Err(e) => {
                        prop_assert_eq!(e, Rejection::AmbiguousPath);
                        prop_assert_eq!(check(&p, DENY), Err(Rejection::AmbiguousPath));
                    }
                }
            }

            #[test]
            fn never_panics_on_any_string(p in "\\PC{0,40}", q in prop::collection::vec(any::<u8>(), 0..40)) {
                let _ = check(&p, DENY);
                let _ = matching_view(&p);
                let s = String::from_utf8_lossy(&q);
                let _ = check(&s, DENY);
            }
        }

        #[test]
        fn generator_reaches_all_outcomes() {
            // Guard against a vacuous property: the generator produces accepted,
            // refused and denied paths in fair numbers.
            use proptest::strategy::ValueTree;
            use proptest::test_runner::TestRunner;
            let mut runner = TestRunner::deterministic();
            let (mut ok, mut bad, mut deny) = (0, 0, 0);
            for _ in 0..5000 {
                let p = path().new_tree(&mut runner).unwrap().current();
                match check(&p, DENY) {
                    Ok(_) => ok += 1,
                    Err(Rejection::AmbiguousPath) => bad += 1,
                    Err(Rejection::Forbidden) => deny += 1,
                    Err(e) => panic!("{e:?}"),
                }
            }
            assert!(
                ok > 500 && bad > 500 && deny > 200,
                "ok {ok} bad {bad} deny {deny}"
            );
        }

        #[test]
        fn bypass_shapes_are_refused() {
            // The oracle's own cases are in `request::norms`; each of these
            // bypass shapes is refused by the gate.
            for p in [
                "/x/../cp/admin",
                "/%252e%252e/cp/admin",
                "/cp;x/admin",
                "/cp\\admin",
                "//cp//admin",
            ] {
                assert!(check(p, DENY).is_err(), "{p}");
            }
        }
    }
}
