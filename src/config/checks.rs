//! Value checks (pure; messages never echo secrets).

use http::HeaderName;
use ipnet::IpNet;

use super::table::quote;
use super::AdminOnlyRule;

/// A DNS name or (for `allow_ip`) an IP literal, no scheme, port or path.
/// Returned lower-case, without a trailing dot; IPv6 in the bracketed form
/// it has in a Host header (`[::1]`).
pub(super) fn check_host(s: &str, allow_ip: bool) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains("://") {
        return Err(format!(
            "{} must be a bare host name, without a scheme",
            quote(s)
        ));
    }
    if s.contains(['/', '?', '#', '@']) {
        return Err(format!("{} must be a bare host name", quote(s)));
    }
    let ip = if let Some(inner) = s.strip_prefix('[') {
        match inner.strip_suffix(']') {
            Some(inner) => match inner.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => Some(std::net::IpAddr::V6(v6)),
                Err(_) => return Err(format!("{} is not an IPv6 literal", quote(s))),
            },
            None => {
                return Err(format!(
                    "{} must not include a port (or is not a bracketed IPv6 literal)",
                    quote(s)
                ))
            }
        }
    } else {
        s.parse::<std::net::IpAddr>().ok()
    };
    if let Some(ip) = ip {
        if !allow_ip {
            return Err(format!(
                "{} must be a DNS name, not an IP address",
                quote(s)
            ));
        }
        return Ok(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    if s.contains(':') {
        return Err(format!("{} must not include a port", quote(s)));
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{} is not a valid DNS name", quote(s)));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let last_numeric = labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    if !labels.iter().all(label_ok) || last_numeric {
        return Err(format!("{} is not a valid DNS name", quote(s)));
    }
    Ok(name.to_ascii_lowercase())
}

pub(super) fn check_slug(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err("must be at most 63 characters (it is a DNS label)".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!("{} may contain only a-z, 0-9 and '-'", quote(s)));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{} must not start or end with '-'", quote(s)));
    }
    Ok(())
}

/// An http(s) URL. `origin_only`: no path (other than `/`) and no query.
/// Userinfo is always refused. Messages do not echo the URL.
pub(super) fn check_http_url(s: &str, origin_only: bool) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|_| {
        "not a valid URL (expected http://host[:port] or https://host[:port])".to_string()
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("must include a host".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not contain userinfo (user:password@)".into());
    }
    if authority.host().is_empty() {
        return Err("must include a host".into());
    }
    // `http::Uri` accepts any digits as a port (`port()` is then `None`): check it here.
    let after_host = authority
        .as_str()
        .get(authority.host().len()..)
        .unwrap_or("");
    if !after_host.is_empty() {
        let valid = after_host
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !valid {
            return Err("has an invalid port".into());
        }
    }
    if origin_only {
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        if !matches!(uri.path(), "" | "/") {
            return Err("must not have a path (the request path is forwarded as received)".into());
        }
        // `http://host?` parses with an empty query; refuse the stray `?` too.
        if s.ends_with('?') {
            return Err("must not have a query string".into());
        }
    }
    Ok(uri)
}

/// `redis://` or `rediss://` with a host; checked with the redis client's own
/// parser. Messages do not echo the URL (it may hold a password).
pub(super) fn check_redis_url(s: &str) -> Result<(), &'static str> {
    use redis::IntoConnectionInfo as _;
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("must be a redis:// or rediss:// URL");
    }
    let Some(url) = redis::parse_redis_url(s) else {
        return Err("not a valid redis:// or rediss:// URL");
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must include a host");
    }
    if url.query().is_some() {
        return Err("must not have a query string");
    }
    match url.into_connection_info() {
        Ok(_) => Ok(()),
        Err(_) => Err("not a valid redis:// or rediss:// URL (host, port, /db number)"),
    }
}

/// Redis URL for display: the password (or a lone username, which might be a
/// mistyped password) is replaced; scheme, host, port and db are kept.
/// Header names a header keygate sets (`auth.principal_header`,
/// `auth.role_header`, `auth.workspaces_header`, `keys.expiry_header`) must
/// never be (after folding `_`/`.` to `-`), nor any `x-forwarded-*`:
/// hop-by-hop, framing, routing and credential headers keygate itself manages.
pub(super) const RESERVED_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "www-authenticate",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "content-encoding",
    "expect",
    "cookie",
    "set-cookie",
    "forwarded",
    "via",
    "x-real-ip",
    "x-request-id",
    "x-original-url",
    "x-rewrite-url",
    "origin",
];

/// Response headers keygate sets itself (contract §11): a `keys.expiry_header`
/// named like one of them would remove the real one.
const RESPONSE_HEADERS: &[&str] = &[
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];

/// A header name as keygate strips and sets it: lower-case, with `_` and `.`
/// read as `-` (a client's `X_Molecule.Principal` is the same header).
pub(super) fn folded_header(name: &HeaderName) -> String {
    name.as_str().replace(['_', '.'], "-")
}

/// A header keygate sets on forwarded requests (the identity headers).
pub(super) fn check_header_name(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("{} is not a valid header name", quote(s)))?;
    let folded = folded_header(&name);
    if RESERVED_HEADERS.contains(&folded.as_str()) || folded.starts_with("x-forwarded-") {
        return Err(format!(
            "{} is reserved (hop-by-hop, framing, routing or credential header)",
            quote(s)
        ));
    }
    Ok(name)
}

/// A header keygate sets on responses (`keys.expiry_header`).
pub(super) fn check_response_header_name(s: &str) -> Result<HeaderName, String> {
    let name = check_header_name(s)?;
    if RESPONSE_HEADERS.contains(&folded_header(&name).as_str()) {
        return Err(format!(
            "{} is reserved (keygate sets it on responses itself)",
            quote(s)
        ));
    }
    Ok(name)
}

pub(super) fn check_key_prefix(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 16 {
        return Err("must be at most 16 characters".into());
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{} may contain only A-Z, a-z, 0-9 and '_'",
            quote(s)
        ));
    }
    Ok(())
}

/// RFC 6265 cookie-name: an RFC 2616 token.
pub(super) fn check_cookie_name(s: &str) -> Result<(), String> {
    const SEPARATORS: &str = "()<>@,;:\\\"/[]?={} \t";
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_graphic() && !SEPARATORS.contains(c))
    {
        return Err(format!("{} is not a valid cookie name", quote(s)));
    }
    Ok(())
}

pub(super) fn check_deny_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("{} must start with '/'", quote(s)));
    }
    if s.contains(|c: char| c.is_control() || c.is_whitespace() || c == '?' || c == '#') {
        return Err(format!(
            "{} must be a plain path (no whitespace, control characters, '?' or '#')",
            quote(s)
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// A path prefix compared with matching views (`scopes.*`): a plain path
/// that keygate's strict path rules admit, returned as its matching view.
/// A prefix those rules refuse could never match a request.
pub(super) fn check_view_prefix(s: &str) -> Result<String, String> {
    check_deny_prefix(s)?;
    match crate::request::matching_view(s) {
        Ok(view) => Ok(view.into_owned()),
        Err(_) => Err(format!(
            "{} is not a path keygate admits (a dot-segment, a raw ';' or '\\', an encoded \
             '/', '\\', '.', '%', ';', control or non-ASCII byte, or a bad escape): it would never match",
            quote(s)
        )),
    }
}

/// `scopes.workspace_prefix`: a view prefix that ends with `/` (one is added).
pub(super) fn check_workspace_prefix(s: &str) -> Result<String, String> {
    let mut view = check_view_prefix(s)?;
    if !view.ends_with('/') {
        view.push('/');
    }
    Ok(view)
}

/// A `scopes.admin_only` entry: `"METHOD /prefix"` (one space; the method an
/// upper-case token) or `"/prefix"` (every method).
pub(super) fn check_admin_only(s: &str) -> Result<AdminOnlyRule, String> {
    if s.starts_with('/') {
        return Ok(AdminOnlyRule {
            method: None,
            prefix: check_view_prefix(s)?,
        });
    }
    let shape = || {
        format!(
            "{} is not \"METHOD /prefix\" or \"/prefix\" (e.g. \"POST /org/import\")",
            quote(s)
        )
    };
    let (method, prefix) = s.split_once(' ').ok_or_else(shape)?;
    if !prefix.starts_with('/') {
        return Err(shape());
    }
    const TCHAR: &str = "!#$%&'*+-.^_`|~";
    let token = !method.is_empty()
        && method
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || TCHAR.contains(c));
    if !token {
        return Err(format!("{}: {} is not a method", quote(s), quote(method)));
    }
    if method.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(format!(
            "{}: the method must be upper-case ({})",
            quote(s),
            quote(&method.to_ascii_uppercase())
        ));
    }
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("{}: {} is not a method", quote(s), quote(method)))?;
    Ok(AdminOnlyRule {
        method: Some(method),
        prefix: check_view_prefix(prefix)?,
    })
}

pub(super) fn parse_trusted_proxy(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::super::table::toml_string;
    use super::super::testing::*;

    #[test]
    fn trusted_proxies_take_cidrs_and_bare_ips() {
        let c = ok(&with(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\", \"::1\"]",
        ));
        let got: Vec<String> = c
            .listen
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            got,
            vec!["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "::1/128"]
        );
        let ks = keys(&with(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/33\", \"ok\", \"10.0.0.1\"]",
        ));
        assert_eq!(
            ks,
            vec!["listen.trusted_proxies[0]", "listen.trusted_proxies[1]"]
        );
    }

    #[test]
    fn upstream_urls() {
        let good = [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "https://app.internal",
            "http://[::1]:3000",
            "HTTP://app:1",
        ];
        for u in good {
            ok(&MINIMAL.replace("http://127.0.0.1:8080", u));
        }
        let bad = [
            ("ftp://app", "must start with http:// or https://"),
            ("127.0.0.1:8080", "must start with http:// or https://"),
            ("/relative", "must start with http:// or https://"),
            ("http://user:pw@app:8080", "userinfo"),
            ("http://app:8080/base", "must not have a path"),
            ("http://app:8080/?x=1", "must not have a query string"),
            ("http://app?", "must not have a query string"),
            ("http://app:99999", ""),
            ("http://app:0", "invalid port"),
            ("http://", ""),
            ("not a url", ""),
            ("", ""),
        ];
        for (u, want) in bad {
            let m = one_problem(&MINIMAL.replace("http://127.0.0.1:8080", u), "upstream.url");
            assert!(m.contains(want), "{u}: {m}");
            if u.contains("pw") {
                assert!(!m.contains("pw"), "message echoes userinfo: {m}");
            }
        }
    }

    #[test]
    fn tenant_slug() {
        for s in ["acme", "a", "acme-2", "0day"] {
            assert_eq!(
                ok(&MINIMAL.replace("\"acme\"", &format!("\"{s}\"")))
                    .tenant
                    .slug,
                s
            );
        }
        for s in [
            "",
            "Acme",
            "-acme",
            "acme-",
            "ac_me",
            "ac.me",
            "acmé",
            &"a".repeat(64),
        ] {
            one_problem(
                &MINIMAL.replace("\"acme\"", &format!("\"{s}\"")),
                "tenant.slug",
            );
        }
    }

    #[test]
    fn tenant_domain_and_extra_hosts() {
        let c = ok(&in_section(
            "tenant",
            "domain = \"Example.COM.\"\nextra_hosts = [\"localhost\", \"127.0.0.1\", \"[::1]\", \"::2\", \"Api.Example.com\"]",
        ));
        assert_eq!(c.tenant.domain, "example.com");
        assert_eq!(
            c.tenant.extra_hosts,
            vec![
                "localhost",
                "127.0.0.1",
                "[::1]",
                "[::2]",
                "api.example.com"
            ]
        );
        assert_eq!(c.tenant.served_hosts()[0], "acme.example.com");
        for bad in [
            "https://example.com",
            "example.com:443",
            "example.com/x",
            "exa mple.com",
            "-bad.com",
            "bad-.com",
            "a..b",
            "",
            "1.2.3",
            "[::1]:80",
            "[zz]",
            "user@example.com",
            "ex_ample.com",
        ] {
            let text = in_section("tenant", &format!("extra_hosts = [{}]", toml_string(bad)));
            one_problem(&text, "tenant.extra_hosts[0]");
        }
        one_problem(
            &in_section("tenant", "domain = \"moleculesai.app:443\""),
            "tenant.domain",
        );
        one_problem(
            &in_section("tenant", "domain = \"10.0.0.1\""),
            "tenant.domain",
        );
        one_problem(&in_section("tenant", "domain = \"\""), "tenant.domain");
    }

    #[test]
    fn auth_key_prefix_and_principal_header() {
        assert_eq!(
            ok(&with("[auth]\nkey_prefix = \"Org_Key9\""))
                .auth
                .key_prefix,
            "Org_Key9"
        );
        for bad in ["", "mok-", "mok ", "a_very_long_prefix_", "ключ"] {
            one_problem(
                &with(&format!("[auth]\nkey_prefix = {}", toml_string(bad))),
                "auth.key_prefix",
            );
        }
        let c = ok(&with("[auth]\nprincipal_header = \"X-Org-Principal\""));
        assert_eq!(c.auth.principal_header.as_str(), "x-org-principal");
        for bad in [
            "",
            "X Principal",
            "X-Principal:",
            "Host",
            "authorization",
            "Connection",
            "Content-Length",
            "transfer_encoding",
            "Cookie",
            "X-Forwarded-For",
            "x_forwarded.user",
            "Forwarded",
            "Upgrade",
            "TE",
            "Proxy-Authorization",
            "X-Request-Id",
        ] {
            one_problem(
                &with(&format!("[auth]\nprincipal_header = {}", toml_string(bad))),
                "auth.principal_header",
            );
        }
    }

    #[test]
    fn deny_prefixes_are_lower_cased_and_start_with_slash() {
        let c = ok(&with(
            "[policy]\ndeny_prefixes = [\"/CP/Admin\", \"/internal/\"]",
        ));
        assert_eq!(c.policy.deny_prefixes, vec!["/cp/admin", "/internal/"]);
        assert!(ok(&with("[policy]\ndeny_prefixes = []"))
            .policy
            .deny_prefixes
            .is_empty());
        let ks = keys(&with(
            "[policy]\ndeny_prefixes = [\"/ok\", \"cp/admin\", \"/a b\", \"/x?y\", \"\"]",
        ));
        assert_eq!(
            ks,
            vec![
                "policy.deny_prefixes[1]",
                "policy.deny_prefixes[2]",
                "policy.deny_prefixes[3]",
                "policy.deny_prefixes[4]",
            ]
        );
    }

    fn scopes(body: &str) -> String {
        with(&format!("[scopes]\n{body}"))
    }

    #[test]
    fn workspace_prefix_is_a_view_ending_in_slash() {
        assert_eq!(ok(MINIMAL).scopes.workspace_prefix, "/workspaces/");
        for (given, stored) in [
            ("/workspaces/", "/workspaces/"),
            ("/Workspaces", "/workspaces/"),
            ("//WS//", "/ws/"),
            ("/api/%77s", "/api/ws/"),
            ("/", "/"),
        ] {
            let c = ok(&scopes(&format!(
                "workspace_prefix = {}",
                toml_string(given)
            )));
            assert_eq!(c.scopes.workspace_prefix, stored, "{given}");
        }
        for bad in [
            "",
            "workspaces/",
            "/a b/",
            "/ws?x",
            "/ws#x",
            "/ws/../x",
            "/./ws",
            "/ws%2F",
            "/ws;x",
            "/ws%zz",
        ] {
            one_problem(
                &scopes(&format!("workspace_prefix = {}", toml_string(bad))),
                "scopes.workspace_prefix",
            );
        }
        one_problem(&scopes("workspace_prefix = 5"), "scopes.workspace_prefix");
    }

    #[test]
    fn admin_only_entries_are_parsed_once() {
        assert!(ok(MINIMAL).scopes.admin_only.is_empty());
        let c = ok(&scopes(
            "admin_only = [\"POST /org/import\", \"/Bundles//Import\", \"M-SEARCH /x\", \"DELETE /%41pi\"]",
        ));
        let got: Vec<(Option<&str>, &str)> = c
            .scopes
            .admin_only
            .iter()
            .map(|r| {
                (
                    r.method.as_ref().map(http::Method::as_str),
                    r.prefix.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("POST"), "/org/import"),
                (None, "/bundles/import"),
                (Some("M-SEARCH"), "/x"),
                (Some("DELETE"), "/api"),
            ]
        );
        let shown: Vec<String> = c.scopes.admin_only.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "POST /org/import",
                "/bundles/import",
                "M-SEARCH /x",
                "DELETE /api"
            ]
        );
        // each bad entry is named by its index; the good ones are kept
        let bad = [
            "post /x",
            "POST",
            "POST  /x",
            "POST\t/x",
            " /x",
            "GET x",
            "",
            "/a?b",
            "G(T /x",
            "GET /a/../b",
            "PUT /a b",
        ];
        let list: Vec<String> = std::iter::once("POST /ok")
            .chain(bad)
            .map(toml_string)
            .collect();
        let ks = keys(&scopes(&format!("admin_only = [{}]", list.join(", "))));
        let want: Vec<String> = (1..=bad.len())
            .map(|i| format!("scopes.admin_only[{i}]"))
            .collect();
        assert_eq!(ks, want);
        let m = one_problem(
            &scopes("admin_only = [\"post /x\"]"),
            "scopes.admin_only[0]",
        );
        assert_eq!(m, "\"post /x\": the method must be upper-case (\"POST\")");
        let m = one_problem(&scopes("admin_only = [\"POST\"]"), "scopes.admin_only[0]");
        assert!(
            m.contains("is not \"METHOD /prefix\" or \"/prefix\""),
            "{m}"
        );
        one_problem(&scopes("admin_only = \"POST /x\""), "scopes.admin_only");
        one_problem(&scopes("admin_only = [5]"), "scopes.admin_only[0]");
        one_problem(&scopes("workspace = \"/w/\""), "scopes.workspace");
    }

    #[test]
    fn admin_only_rules_match_like_deny_prefixes() {
        let c = ok(&scopes(
            "admin_only = [\"POST /org/import\", \"/bundles/import\"]",
        ));
        let (post, any) = (&c.scopes.admin_only[0], &c.scopes.admin_only[1]);
        assert!(post.matches(&http::Method::POST, "/org/import"));
        assert!(post.matches(&http::Method::POST, "/org/imports/x"));
        assert!(!post.matches(&http::Method::GET, "/org/import"));
        assert!(!post.matches(&http::Method::POST, "/org/impor"));
        assert!(any.matches(&http::Method::GET, "/bundles/import"));
        assert!(any.matches(&http::Method::DELETE, "/bundles/import/1"));
        assert!(!any.matches(&http::Method::GET, "/api/bundles/import"));
    }
}
