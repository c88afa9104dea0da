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
    fn joined_form_round_trips() {
        for v in [ids(&[]), ids(&["a"]), ids(&["ws_1", "ws_2"])] {
            assert_eq!(split_workspaces(&join_workspaces(&v)), v);
        }
    }
}
