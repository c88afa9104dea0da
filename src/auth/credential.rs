//! `Authorization` parsing (contract §3 step 4): pure, no allocation.
//!
//! | header                                         | result                        |
//! | ---------------------------------------------- | ----------------------------- |
//! | none                                           | [`Credential::Missing`]       |
//! | more than one                                  | `Err(DuplicateAuthorization)` |
//! | contains `key_prefix`, exactly `Bearer <tok>`  | [`Credential::OrgKey`]        |
//! | contains `key_prefix`, any other shape         | [`Credential::MalformedKey`]  |
//! | `Bearer …` without the prefix                  | [`Credential::OtherBearer`]   |
//! | any other scheme, empty value                  | [`Credential::OtherScheme`]   |
//!
//! "Exactly `Bearer <tok>`": the scheme `Bearer` in any case, ONE space, then a
//! token that starts with `key_prefix` and continues with letters and digits
//! only, nothing after it. Anything that mentions the prefix but is not that
//! shape (two spaces, a tab, a trailing space, `Basic mok_…`, a second token, a
//! `,`-list, obs-text) is a failed key: answered 401, never forwarded, so a key
//! can never reach the app by being wrapped in a shape the app parses
//! differently. The format and checksum are checked next by
//! [`super::token::check_format`].

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::error::Rejection;

/// What the request's `Authorization` header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// `Bearer <token>` with a token that starts with `key_prefix` (format and
    /// checksum not yet checked). Borrowed from the header map.
    OrgKey(&'a str),
    /// The value mentions `key_prefix` but is not exactly `Bearer <token>`.
    MalformedKey,
    /// A bearer token without the prefix (per `auth.other_bearer`).
    OtherBearer,
    /// Another scheme or an empty value (per `auth.other_bearer`).
    OtherScheme,
    /// No `Authorization` header (per `auth.anonymous`).
    Missing,
}

/// Classify the request's `Authorization` header. `key_prefix` is non-empty
/// (config validation); an empty prefix never yields `OrgKey`.
pub fn parse<'a>(headers: &'a HeaderMap, key_prefix: &str) -> Result<Credential<'a>, Rejection> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(Credential::Missing);
    };
    if all.next().is_some() {
        return Err(Rejection::DuplicateAuthorization);
    }
    Ok(classify(value.as_bytes(), key_prefix.as_bytes()))
}

/// Classify one header value (bytes: obs-text must not escape the prefix rule).
pub fn classify<'a>(value: &'a [u8], prefix: &[u8]) -> Credential<'a> {
    const SCHEME: &[u8] = b"bearer ";
    if !prefix.is_empty() && contains(value, prefix) {
        let Some(token) = value
            .get(..SCHEME.len())
            .filter(|s| s.eq_ignore_ascii_case(SCHEME))
            .map(|_| &value[SCHEME.len()..])
        else {
            return Credential::MalformedKey;
        };
        let well_formed = token.len() > prefix.len()
            && token.starts_with(prefix)
            && token[prefix.len()..].iter().all(u8::is_ascii_alphanumeric);
        if !well_formed {
            return Credential::MalformedKey;
        }
        // The prefix comes from config (UTF-8) and the rest is ASCII, but do
        // not trust that blindly: a non-UTF-8 value is just malformed.
        return match std::str::from_utf8(token) {
            Ok(t) => Credential::OrgKey(t),
            Err(_) => Credential::MalformedKey,
        };
    }
    let scheme = value.split(|&b| b == b' ').next().unwrap_or_default();
    if scheme.eq_ignore_ascii_case(b"bearer") {
        Credential::OtherBearer
    } else {
        Credential::OtherScheme
    }
}

/// `needle` occurs in `hay` (byte-wise; both short, so a naive scan is fastest).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const P: &str = "mok_";
    const TOK: &str = "mok_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3kL5mN";

    fn map(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn header_count() {
        assert_eq!(parse(&HeaderMap::new(), P), Ok(Credential::Missing));
        let mut other = HeaderMap::new();
        other.insert(
            "proxy-authorization",
            HeaderValue::from_static("Bearer mok_x"),
        );
        other.insert("x-authorization", HeaderValue::from_static("Bearer mok_x"));
        assert_eq!(parse(&other, P), Ok(Credential::Missing));
        let two: &[&[u8]] = &[b"Bearer mok_a", b"Bearer mok_a"];
        assert_eq!(parse(&map(two), P), Err(Rejection::DuplicateAuthorization));
        let two: &[&[u8]] = &[b"Basic eA==", b"Bearer x"];
        assert_eq!(parse(&map(two), P), Err(Rejection::DuplicateAuthorization));
        let two: &[&[u8]] = &[b"", b""];
        assert_eq!(parse(&map(two), P), Err(Rejection::DuplicateAuthorization));
        let three: &[&[u8]] = &[b"a", b"b", b"c"];
        assert_eq!(
            parse(&map(three), P),
            Err(Rejection::DuplicateAuthorization)
        );
    }

    #[test]
    fn classify_table() {
        use Credential::*;
        let tok = TOK.as_bytes();
        macro_rules! t {
            ($value:expr, $want:expr) => {{
                let v: Vec<u8> = $value.into();
                let h = map(&[&v]);
                assert_eq!(
                    parse(&h, P),
                    Ok($want),
                    "value {:?}",
                    String::from_utf8_lossy(&v)
                );
            }};
        }
        let bearer = |scheme: &str, sep: &str, rest: &[u8]| -> Vec<u8> {
            let mut v = format!("{scheme}{sep}").into_bytes();
            v.extend_from_slice(rest);
            v
        };

        // The one accepted shape, scheme in any case.
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR", "BeArEr"] {
            t!(bearer(scheme, " ", tok), OrgKey(TOK));
        }
        // Short or checksum-less keys still parse (check_format refuses them next).
        t!(b"Bearer mok_x".to_vec(), OrgKey("mok_x"));
        t!(b"Bearer mok_0".to_vec(), OrgKey("mok_0"));

        // Mentions the prefix, wrong shape: malformed.
        for sep in ["  ", "\t", " \t", "", "=", ":", ": "] {
            t!(bearer("Bearer", sep, tok), MalformedKey);
        }
        for scheme in [
            "Basic", "Token", "Bearer2", "Bear", "Bearers", "OAuth", "Digest", "mok_",
        ] {
            t!(bearer(scheme, " ", tok), MalformedKey);
        }
        t!(b"Bearer mok_".to_vec(), MalformedKey); // prefix alone
        t!(b"Bearer MOK_abc mok_".to_vec(), MalformedKey);
        t!(b"mok_abc".to_vec(), MalformedKey); // bare token, no scheme
        t!(b" Bearer mok_abc".to_vec(), MalformedKey);
        t!(TOK.as_bytes().to_vec(), MalformedKey);
        for suffix in [
            " ",
            "  ",
            "\t",
            ",",
            ", Bearer x",
            " x",
            "=",
            "==",
            "-",
            "_",
            ".",
            "~",
            "+",
            "/",
            "%41",
            "\"",
            "é",
        ] {
            let mut v = bearer("Bearer", " ", tok);
            v.extend_from_slice(suffix.as_bytes());
            t!(v, MalformedKey);
        }
        for prefix_junk in ["x", "\"", "'", "=", "+", "-", "_", "Xmok_", "mok"] {
            let mut v = format!("Bearer {prefix_junk}").into_bytes();
            v.extend_from_slice(tok);
            t!(v, MalformedKey);
        }
        // A key anywhere in another scheme's credentials.
        t!(b"Basic bW9rXzp4 mok_abc".to_vec(), MalformedKey);
        t!(b"Bearer x, Bearer mok_abc".to_vec(), MalformedKey);
        t!(b"Bearer abc.mok_def".to_vec(), MalformedKey);
        t!(b"Bearer xmok_abc".to_vec(), MalformedKey);
        t!(b"Digest username=\"mok_abc\"".to_vec(), MalformedKey);
        // obs-text around or inside the key.
        t!(b"Bearer mok_abc\xff".to_vec(), MalformedKey);
        t!(b"Bearer mok_a\x80bc".to_vec(), MalformedKey);
        t!(b"\xffBearer mok_abc".to_vec(), MalformedKey);
        t!(b"Bearer\xa0mok_abc".to_vec(), MalformedKey);

        // Bearer without the prefix.
        t!(b"Bearer abc".to_vec(), OtherBearer);
        t!(b"bearer abc.def-ghi_jkl~".to_vec(), OtherBearer);
        t!(b"BEARER eyJhbGciOi.eyJzdWIi.sig".to_vec(), OtherBearer);
        t!(b"Bearer MOK_abc".to_vec(), OtherBearer); // prefix is case-sensitive
        t!(b"Bearer mok-abc".to_vec(), OtherBearer);
        t!(b"Bearer mo k_abc".to_vec(), OtherBearer);
        t!(b"Bearer".to_vec(), OtherBearer);
        t!(b"Bearer ".to_vec(), OtherBearer);
        t!(b"Bearer  abc".to_vec(), OtherBearer);
        t!(b"Bearer \xffabc".to_vec(), OtherBearer);

        // Other schemes and odd values.
        t!(b"".to_vec(), OtherScheme);
        t!(b"Basic dXNlcjpwYXNz".to_vec(), OtherScheme);
        t!(b"Token abc".to_vec(), OtherScheme);
        t!(b"Bearerabc".to_vec(), OtherScheme);
        t!(b"Bearer\tabc".to_vec(), OtherScheme);
        t!(b"Bearer,abc".to_vec(), OtherScheme);
        t!(b" Bearer abc".to_vec(), OtherScheme);
        t!(b"abc".to_vec(), OtherScheme);
        t!(b"\xff\xfe".to_vec(), OtherScheme);
    }

    #[test]
    fn other_prefixes() {
        assert_eq!(
            classify(b"Bearer tk-9xY", b"tk-"),
            Credential::OrgKey("tk-9xY")
        );
        assert_eq!(
            classify(b"Bearer tk-9x-Y", b"tk-"),
            Credential::MalformedKey
        );
        assert_eq!(classify(b"Bearer mok_abc", b"tk-"), Credential::OtherBearer);
        assert_eq!(classify(b"Bearer key", b""), Credential::OtherBearer);
        assert_eq!(classify(b"Basic key", b""), Credential::OtherScheme);
    }

    #[test]
    fn minted_tokens_parse_as_org_keys() {
        for _ in 0..100 {
            let t = crate::auth::token::mint(P);
            let v = format!("Bearer {}", t.expose());
            assert_eq!(
                classify(v.as_bytes(), P.as_bytes()),
                Credential::OrgKey(t.expose())
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_org_key_is_exact(v in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            match classify(&v, P.as_bytes()) {
                Credential::OrgKey(t) => {
                    proptest::prop_assert_eq!(&v[..7].to_ascii_lowercase(), b"bearer ");
                    proptest::prop_assert_eq!(&v[7..], t.as_bytes());
                }
                Credential::OtherBearer | Credential::OtherScheme => {
                    proptest::prop_assert!(!contains(&v, P.as_bytes()));
                }
                Credential::MalformedKey => {
                    proptest::prop_assert!(contains(&v, P.as_bytes()));
                }
                Credential::Missing => proptest::prop_assert!(false),
            }
        }
    }
}
