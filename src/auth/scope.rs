//! A key's scope (contract §8): its role and the workspaces it is bound to,
//! fixed at mint. The values and their validation live here; the decision
//! that applies them to a request is `request::scope`.

use std::fmt;

/// Most workspaces one key may be bound to.
pub const MAX_WORKSPACES: usize = 100;
/// Longest workspace id, in bytes (ids are ASCII).
pub const MAX_WORKSPACE_ID: usize = 64;

/// What a key may do. A record without a role (minted before §8) is `Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    #[default]
    Admin,
    Editor,
    Reader,
}

impl Role {
    /// `"admin"`, `"editor"` or `"reader"`, exactly (no case folding: the
    /// same spelling everywhere it is written).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "editor" => Some(Role::Editor),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a list of workspace ids was refused (the text is a client's 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspacesError {
    TooMany,
    BadId,
    Duplicate,
}

impl WorkspacesError {
    pub fn message(self) -> &'static str {
        match self {
            WorkspacesError::TooMany => "bad request: more than 100 workspaces",
            WorkspacesError::BadId => {
                "bad request: a workspace id is 1-64 characters of A-Z a-z 0-9 _ -"
            }
            WorkspacesError::Duplicate => "bad request: duplicated workspace id",
        }
    }
}

impl fmt::Display for WorkspacesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message().trim_start_matches("bad request: "))
    }
}

/// One workspace id: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn is_workspace_id(id: &str) -> bool {
    (1..=MAX_WORKSPACE_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validate a key's workspace ids (kept in the given order: the order of
/// the workspaces header).
pub fn check_workspaces(ids: &[String]) -> Result<(), WorkspacesError> {
    if ids.len() > MAX_WORKSPACES {
        return Err(WorkspacesError::TooMany);
    }
    for (i, id) in ids.iter().enumerate() {
        if !is_workspace_id(id) {
            return Err(WorkspacesError::BadId);
        }
        if ids[..i].contains(id) {
            return Err(WorkspacesError::Duplicate);
        }
    }
    Ok(())
}

/// The form stored in Redis and sent in the workspaces header: ids joined
/// by `,` (ids never contain one).
pub fn join_workspaces(ids: &[String]) -> String {
    ids.join(",")
}

/// Inverse of [`join_workspaces`]; the empty string is no workspaces.
pub fn split_workspaces(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_owned).collect()
    }
}

/// A key-management call (§5, §9, §10), as the §8 rule sees it.
#[derive(Debug, Clone, Copy)]
pub enum KeyCall<'a> {
    /// `GET /org/tokens`.
    List,
    /// `POST /org/tokens` for a key with this scope.
    Mint { workspaces: &'a [String] },
    /// `DELETE /org/tokens/{id}`, `POST …/{id}/rotate`, `GET …/{id}/usage`.
    OnKey { id: &'a str },
}

/// §8's rule for key-management calls by a key with `role` and
/// `workspaces` (`key_id` its own id): any key may revoke, rotate and read
/// the usage of itself; an unbound key lists; only an admin mints, a bound
/// admin only keys bound to a non-empty subset of its workspaces; only an
/// unbound admin acts on other keys. Sessions and the CLI are not keys and
/// may do everything (they never ask).
pub fn key_call_allowed(
    role: Role,
    workspaces: &[Box<str>],
    key_id: &str,
    call: KeyCall<'_>,
) -> bool {
    let unbound = workspaces.is_empty();
    match call {
        KeyCall::List => unbound,
        KeyCall::Mint { workspaces: minted } => {
            role == Role::Admin
                && (unbound
                    || (!minted.is_empty()
                        && minted.iter().all(|m| workspaces.iter().any(|w| **w == **m))))
        }
        KeyCall::OnKey { id } => id == key_id || (role == Role::Admin && unbound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roles_parse_exactly() {
        for r in [Role::Admin, Role::Editor, Role::Reader] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        for bad in ["", "Admin", "ADMIN", "owner", " reader", "reader "] {
            assert_eq!(Role::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Role::default(), Role::Admin);
    }

    #[test]
    fn workspace_ids() {
        assert!(check_workspaces(&[]).is_ok());
        assert!(check_workspaces(&ids(&["ws_1", "WS-2", &"a".repeat(64)])).is_ok());
        for bad in ["", "a b", "ws.1", "ws/1", "ws,1", "é", &"a".repeat(65)] {
            assert_eq!(
                check_workspaces(&ids(&[bad])),
                Err(WorkspacesError::BadId),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_workspaces(&ids(&["a", "b", "a"])),
            Err(WorkspacesError::Duplicate)
        );
        let many: Vec<String> = (0..101).map(|i| format!("w{i}")).collect();
        assert_eq!(check_workspaces(&many), Err(WorkspacesError::TooMany));
        assert!(check_workspaces(&many[..100]).is_ok());
    }

    #[test]
    fn key_calls_follow_section_8() {
        let bound: Vec<Box<str>> = vec!["a".into(), "b".into()];
        let none: Vec<Box<str>> = Vec::new();
        let (a, b, ab, c, empty) = (
            ids(&["a"]),
            ids(&["b"]),
            ids(&["a", "b"]),
            ids(&["c"]),
            ids(&[]),
        );
        fn mint(w: &[String]) -> KeyCall<'_> {
            KeyCall::Mint { workspaces: w }
        }
        let me = KeyCall::OnKey { id: "k1" };
        let other = KeyCall::OnKey { id: "k2" };
        // role, bound?, call, allowed
        let rows: Vec<(Role, &[Box<str>], KeyCall<'_>, bool)> = vec![
            (Role::Admin, &none, KeyCall::List, true),
            (Role::Editor, &none, KeyCall::List, true),
            (Role::Reader, &none, KeyCall::List, true),
            (Role::Admin, &bound, KeyCall::List, false),
            (Role::Reader, &bound, KeyCall::List, false),
            (Role::Admin, &none, mint(&empty), true),
            (Role::Admin, &none, mint(&c), true),
            (Role::Editor, &none, mint(&empty), false),
            (Role::Reader, &none, mint(&a), false),
            (Role::Admin, &bound, mint(&a), true),
            (Role::Admin, &bound, mint(&ab), true),
            (Role::Admin, &bound, mint(&b), true),
            (Role::Admin, &bound, mint(&empty), false),
            (Role::Admin, &bound, mint(&c), false),
            (Role::Editor, &bound, mint(&a), false),
            (Role::Reader, &none, me, true),
            (Role::Reader, &bound, me, true),
            (Role::Editor, &none, me, true),
            (Role::Admin, &none, other, true),
            (Role::Admin, &bound, other, false),
            (Role::Editor, &none, other, false),
            (Role::Reader, &none, other, false),
        ];
        for (role, ws, call, want) in rows {
            assert_eq!(
                key_call_allowed(role, ws, "k1", call),
                want,
                "{role} {ws:?} {call:?}"
            );
        }
    }

    #[test]
    fn joined_form_round_trips() {
        for v in [ids(&[]), ids(&["a"]), ids(&["ws_1", "ws_2"])] {
            assert_eq!(split_workspaces(&join_workspaces(&v)), v);
        }
    }
}
