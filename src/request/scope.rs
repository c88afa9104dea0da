//! Step 4½: a key's scope (contract §8), for requests forwarded to the app.
//! Pure, like the other gate decisions; run after the key is validated and
//! before the keys API and forwarding. Key-management calls have their own
//! rule ([`crate::auth::scope::key_call_allowed`]), applied by the keys API.
//!
//! - **Role**: `reader` only `GET` / `HEAD` / `OPTIONS`; `editor` everything
//!   but the `scopes.admin_only` routes (matched byte-wise on the matching
//!   view, exactly like `policy.deny_prefixes`); `admin` everything.
//! - **Binding**: a key with workspaces reaches only paths whose matching
//!   view starts with `scopes.workspace_prefix`, followed by a segment equal
//!   to one of its ids *exactly*: the path's own segment (case kept) with
//!   unreserved escapes decoded, so `/workspaces/ws%5F1` is `ws_1` and
//!   `/workspaces/WS_1` is not; then the end of the path or `/`.
//!   `/workspaces` and `/workspaces/` alone are refused.
//! - **Repeated slashes**: the matching view merges them, but a back-end that
//!   does not would read `/workspaces//ws_1` as workspace `""`. So a bound
//!   key's path may not repeat a slash anywhere up to its workspace segment
//!   (refused); after it (`/workspaces/ws_1//x`) it stays inside `ws_1`
//!   whatever the back-end does, and passes.
//!
//! The path given is the raw path that passed step 3 (strictly valid); the
//! matching view is compared while iterating, never built: no allocation.
//!
//! OWNER: scopes helper.

use http::Method;

use crate::auth::scope::Role;
use crate::config::ScopesConfig;
use crate::error::Rejection;

use super::path::{raw_after_view_prefix, view_starts_with};

/// §8's check for a request a key with `role` and `workspaces` wants
/// forwarded: `Err(OutOfScope)` (403) when the scope does not cover it.
pub fn check(
    rules: &ScopesConfig,
    role: Role,
    workspaces: &[Box<str>],
    method: &Method,
    path: &str,
) -> Result<(), Rejection> {
    let role_allows = match role {
        Role::Admin => true,
        Role::Editor => !rules.admin_only.iter().any(|r| {
            r.method.as_ref().is_none_or(|m| m == method)
                && view_starts_with(path, r.prefix.as_bytes())
        }),
        Role::Reader => matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS),
    };
    if !role_allows {
        return Err(Rejection::OutOfScope);
    }
    if workspaces.is_empty() || in_workspaces(rules, workspaces, path) {
        Ok(())
    } else {
        Err(Rejection::OutOfScope)
    }
}

/// The path is under `workspace_prefix` + one of `workspaces` (see the module
/// documentation for the exact rule).
fn in_workspaces(rules: &ScopesConfig, workspaces: &[Box<str>], path: &str) -> bool {
    let Some(start) = raw_after_view_prefix(path, rules.workspace_prefix.as_bytes()) else {
        return false;
    };
    let raw = path.as_bytes();
    // No repeated slash before the workspace segment (nor as its start).
    if raw[..start].windows(2).any(|w| w == b"//") {
        return false;
    }
    let end = raw[start..]
        .iter()
        .position(|&c| c == b'/')
        .map_or(raw.len(), |e| start + e);
    let segment = &raw[start..end];
    workspaces
        .iter()
        .any(|id| segment_is(segment, id.as_bytes()))
}

/// The raw `segment`, with unreserved escapes decoded (case kept), equals
/// `id` exactly. Ids are `[A-Za-z0-9_-]`, so any other escape is a mismatch.
fn segment_is(segment: &[u8], id: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < segment.len() {
        let (c, width) = match segment[i] {
            b'%' => match (segment.get(i + 1), segment.get(i + 2)) {
                (Some(&h), Some(&l)) => match (hex(h), hex(l)) {
                    (Some(h), Some(l)) => (h << 4 | l, 3),
                    _ => return false,
                },
                _ => return false,
            },
            c => (c, 1),
        };
        if id.get(j) != Some(&c) {
            return false;
        }
        i += width;
        j += 1;
    }
    j == id.len() && !segment.is_empty()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminOnlyRule;

    fn rules() -> ScopesConfig {
        ScopesConfig {
            workspace_prefix: "/workspaces/".into(),
            admin_only: vec![
                AdminOnlyRule {
                    method: Some(Method::POST),
                    prefix: "/org/import".into(),
                },
                AdminOnlyRule {
                    method: None,
                    prefix: "/bundles/import".into(),
                },
            ],
        }
    }

    fn ws(ids: &[&str]) -> Vec<Box<str>> {
        ids.iter().map(|s| (*s).into()).collect()
    }

    fn decide(role: Role, ids: &[&str], method: &str, path: &str) -> bool {
        let m: Method = method.parse().unwrap();
        // Only strictly valid paths reach the check (step 3 came first).
        assert!(
            super::super::path::check_strict(path).is_ok(),
            "test path {path:?} would be 400 at step 3"
        );
        check(&rules(), role, &ws(ids), &m, path).is_ok()
    }

    const METHODS: &[&str] = &[
        "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "PURGE",
    ];

    #[test]
    fn roles_by_method_unbound() {
        for path in ["/", "/api/things", "/workspaces/ws_1", "/org/templates"] {
            for m in METHODS {
                let safe = matches!(*m, "GET" | "HEAD" | "OPTIONS");
                assert!(decide(Role::Admin, &[], m, path), "admin {m} {path}");
                assert!(decide(Role::Editor, &[], m, path), "editor {m} {path}");
                assert_eq!(
                    decide(Role::Reader, &[], m, path),
                    safe,
                    "reader {m} {path}"
                );
            }
        }
    }

    #[test]
    fn admin_only_is_for_admins_and_matched_like_deny_prefixes() {
        // (method, path, an editor may)
        let rows = [
            ("POST", "/org/import", false),
            ("POST", "/org/import/", false),
            ("POST", "/org/imports", false), // byte-wise prefix, like deny_prefixes
            ("POST", "/org/import.json", false),
            ("POST", "/ORG/Import", false),   // the view is lower-case
            ("POST", "/org//import", false),  // repeated slashes merge
            ("POST", "/org/%69mport", false), // unreserved escapes decoded
            ("POST", "/org/impor", true),
            ("POST", "/api/org/import", true),
            ("GET", "/org/import", true), // the rule names POST only
            ("PUT", "/org/import", true),
            ("GET", "/bundles/import", false), // every method
            ("DELETE", "/bundles/import/1", false),
            ("GET", "/bundles/imp", true),
        ];
        for (m, path, editor) in rows {
            assert_eq!(
                decide(Role::Editor, &[], m, path),
                editor,
                "editor {m} {path}"
            );
            assert!(decide(Role::Admin, &[], m, path), "admin {m} {path}");
            let safe = matches!(m, "GET" | "HEAD" | "OPTIONS");
            assert_eq!(
                decide(Role::Reader, &[], m, path),
                safe,
                "reader {m} {path}"
            );
        }
        // No rules: an editor may do anything.
        let none = ScopesConfig {
            workspace_prefix: "/workspaces/".into(),
            admin_only: vec![],
        };
        assert!(check(&none, Role::Editor, &[], &Method::POST, "/org/import").is_ok());
    }

    #[test]
    fn workspace_binding_table() {
        let one = &["ws_1"];
        // (path, a key bound to ws_1 may reach it)
        let rows = [
            ("/workspaces/ws_1", true),
            ("/workspaces/ws_1/", true), // trailing slash
            ("/workspaces/ws_1/secrets", true),
            ("/workspaces/ws_1/a/b/c", true),
            ("/workspaces/ws%5F1", true), // encoded `_`, any hex case
            ("/workspaces/ws%5f1", true),
            ("/workspaces/%77s_1", true),
            ("/workspaces/ws_%31/x", true),
            ("/workspaces/ws_1//x", true), // a repeat after the segment stays inside
            ("/Workspaces/ws_1", true),    // the prefix is matched on the (lower-case) view
            ("/%77orkspaces/ws_1", true),
            ("/workspaces/WS_1", false), // the id is case-sensitive
            ("/workspaces/Ws_1", false),
            ("/workspaces/ws%5F%31", true),
            ("/workspaces/%57S_1", false), // %57 is `W`
            ("/workspaces/ws_10", false),  // segment boundary
            ("/workspaces/ws_1x/y", false),
            ("/workspaces/ws_", false),
            ("/workspaces/ws", false),
            ("/workspaces/ws_1-", false),
            ("/workspaces/ws_1~", false),
            ("/workspaces/ws_1%20", false),
            ("/workspaces/ws_1%2B", false),
            ("/workspaces/ws_1:x", false),
            ("/workspaces//ws_1", false), // a repeat before the segment
            ("/workspaces///ws_1", false),
            ("/workspaces/", false),
            ("/workspaces", false),
            ("/workspacesws_1", false),
            ("/workspace/ws_1", false),
            ("/api/workspaces/ws_1", false),
            ("/org/templates", false),
            ("/", false),
            ("/ws_1", false),
            ("/workspaces/ws_2", false),
        ];
        for (path, want) in rows {
            for role in [Role::Admin, Role::Editor, Role::Reader] {
                assert_eq!(decide(role, one, "GET", path), want, "{role} GET {path}");
            }
        }
    }

    #[test]
    fn several_workspaces_and_roles_combine() {
        let two = &["ws_1", "WS-2"];
        assert!(decide(Role::Reader, two, "GET", "/workspaces/ws_1"));
        assert!(decide(Role::Reader, two, "GET", "/workspaces/WS-2/x"));
        assert!(decide(Role::Reader, two, "GET", "/workspaces/WS%2D2"));
        assert!(!decide(Role::Reader, two, "GET", "/workspaces/ws-2"));
        assert!(!decide(Role::Reader, two, "POST", "/workspaces/ws_1"));
        assert!(decide(Role::Editor, two, "POST", "/workspaces/ws_1"));
        assert!(!decide(Role::Editor, two, "POST", "/org/import"));
        assert!(!decide(Role::Admin, two, "POST", "/org/import"));
        assert!(decide(Role::Admin, two, "DELETE", "/workspaces/WS-2"));
        // admin_only still applies to a bound editor inside its workspace prefix.
        let inside = ScopesConfig {
            workspace_prefix: "/workspaces/".into(),
            admin_only: vec![AdminOnlyRule {
                method: Some(Method::DELETE),
                prefix: "/workspaces/".into(),
            }],
        };
        let w = ws(two);
        assert!(check(
            &inside,
            Role::Editor,
            &w,
            &Method::DELETE,
            "/workspaces/ws_1"
        )
        .is_err());
        assert!(check(
            &inside,
            Role::Admin,
            &w,
            &Method::DELETE,
            "/workspaces/ws_1"
        )
        .is_ok());
    }

    #[test]
    fn another_prefix() {
        let r = ScopesConfig {
            workspace_prefix: "/api/v1/ws/".into(),
            admin_only: vec![],
        };
        let w = ws(&["a"]);
        let ok = |p: &str| check(&r, Role::Reader, &w, &Method::GET, p).is_ok();
        assert!(ok("/api/v1/ws/a"));
        assert!(ok("/API/V1/WS/a/x"));
        assert!(!ok("/api/v1/ws/A"));
        assert!(!ok("/api//v1/ws/a"));
        assert!(!ok("/workspaces/a"));
    }

    #[test]
    fn refusal_is_the_section_8_answer() {
        let e = check(&rules(), Role::Reader, &[], &Method::POST, "/x").unwrap_err();
        assert_eq!(e, Rejection::OutOfScope);
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(e.message(), "forbidden: outside this key's scope");
        assert_eq!(e.outcome().label(), "out_of_scope");
    }

    mod props {
        use super::*;
        use crate::request::norms::{decode_all, Norm};
        use proptest::prelude::*;

        /// Pieces an attacker would combine around a workspace path.
        fn piece() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "/",
                "//",
                "workspaces",
                "Workspaces",
                "WORKSPACES",
                "workspace",
                "ws_a",
                "ws_b",
                "WS_A",
                "Ws_a",
                "ws_",
                "ws",
                "_a",
                "a",
                "b",
                "A",
                "ws_a0",
                "ws_ab",
                "%5f",
                "%5F",
                "%77",
                "%57",
                "%61",
                "%41",
                "%62",
                "%2d",
                "%7e",
                "%20",
                "%2B",
                "%2f",
                "%2F",
                "%2e",
                "%2E",
                "%25",
                "%255f",
                "%5c",
                ".",
                "..",
                "\\",
                ";",
                ";x",
                "-",
                "_",
                "~",
                ":",
                "@",
                "+",
                "%",
                "%0",
            ])
            .prop_map(str::to_string)
        }

        /// `/workspaces/<id>` spelled many ways, then a tail.
        fn workspace_path() -> impl Strategy<Value = String> {
            (
                prop::sample::select(vec![
                    "/workspaces/",
                    "/workspaces/",
                    "/workspaces/",
                    "/Workspaces/",
                    "/workspaces//",
                    "/%77orkspaces/",
                    "/workspaces",
                    "/api/workspaces/",
                    "/",
                    "//workspaces/",
                ]),
                prop::sample::select(vec![
                    "ws_a", "ws_a", "ws_a", "ws_b", "ws%5Fa", "ws%5fb", "WS_A", "ws_ab", "",
                ]),
                prop::sample::select(vec!["", "", "/", "/x/", ""]),
                prop::collection::vec(piece(), 0..8),
                any::<bool>(),
            )
                .prop_map(|(head, id, sep, tail, short)| {
                    let tail = if short {
                        &tail[..tail.len().min(1)]
                    } else {
                        &tail[..]
                    };
                    format!("{head}{id}{sep}{}", tail.concat())
                })
        }

        fn free_path() -> impl Strategy<Value = String> {
            prop::collection::vec(piece(), 1..12).prop_map(|p| format!("/{}", p.concat()))
        }

        fn path() -> impl Strategy<Value = String> {
            prop_oneof![3 => workspace_path(), 1 => free_path()]
        }

        /// Where a back-end that reads `p` (after its own normalisation)
        /// lands: inside workspace `ws_a`, i.e. `/workspaces/` (any case: a
        /// case-sensitive back-end just answers 404 elsewhere) then exactly
        /// `ws_a`, then the end or `/`. No empty segment is merged away here:
        /// the back-end may not merge.
        fn lands_in_ws_a(p: &[u8]) -> bool {
            let p = decode_all(p);
            let prefix = b"/workspaces/";
            if p.len() < prefix.len() || !p[..prefix.len()].eq_ignore_ascii_case(prefix) {
                return false;
            }
            let rest = &p[prefix.len()..];
            let seg = rest.split(|&c| c == b'/').next().unwrap_or_default();
            seg == b"ws_a"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(20_000))]

            /// For any path the gate accepts and the scope check lets
            /// through for a key bound to `ws_a`, every normalisation (and
            /// any sequence of them) still lands inside `ws_a`: never under
            /// another workspace, never outside the prefix.
            #[test]
            fn a_bound_key_never_leaves_its_workspace(
                p in path(),
                seq in prop::collection::vec(0..Norm::ALL.len(), 1..6),
            ) {
                let admitted = super::super::super::path::check(&p, &["/cp/admin"]).is_ok();
                let w = ws(&["ws_a"]);
                if admitted && check(&rules(), Role::Admin, &w, &Method::GET, &p).is_ok() {
                    prop_assert!(lands_in_ws_a(p.as_bytes()), "{p:?} as received");
                    for n in Norm::ALL {
                        let once = n.apply(p.as_bytes());
                        prop_assert!(lands_in_ws_a(&once), "{p:?} -> {:?}", String::from_utf8_lossy(&once));
                    }
                    let mut cur = p.as_bytes().to_vec();
                    for &i in &seq {
                        cur = Norm::ALL[i].apply(&cur);
                        prop_assert!(lands_in_ws_a(&cur), "{p:?} --{seq:?}--> {:?}", String::from_utf8_lossy(&cur));
                    }
                }
            }

            #[test]
            fn never_panics(p in "\\PC{0,40}") {
                let w = ws(&["ws_a"]);
                let _ = check(&rules(), Role::Editor, &w, &Method::POST, &p);
            }
        }

        #[test]
        fn generator_reaches_both_outcomes() {
            use proptest::strategy::ValueTree;
            use proptest::test_runner::TestRunner;
            let mut runner = TestRunner::deterministic();
            let w = ws(&["ws_a"]);
            let (mut inside, mut outside) = (0, 0);
            for _ in 0..5000 {
                let p = path().new_tree(&mut runner).unwrap().current();
                if super::super::super::path::check(&p, &["/cp/admin"]).is_err() {
                    continue;
                }
                match check(&rules(), Role::Reader, &w, &Method::GET, &p) {
                    Ok(()) => inside += 1,
                    Err(_) => outside += 1,
                }
            }
            assert!(
                inside > 200 && outside > 300,
                "inside {inside} outside {outside}"
            );
        }
    }
}
