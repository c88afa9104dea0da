//! Test helpers shared by the config modules' unit tests.

use super::*;

pub(super) const EXAMPLE: &str = include_str!("../../config/keygate.example.toml");

pub(super) const MINIMAL: &str = r#"
[upstream]
url = "http://127.0.0.1:8080"
[tenant]
slug = "acme"
[store]
url = "redis://127.0.0.1:6379/0"
"#;

pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, &no_env)
}

pub(super) fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

pub(super) fn problems(text: &str) -> Vec<ConfigProblem> {
    match parse(text) {
        Ok(_) => panic!("expected problems, config was accepted:\n{text}"),
        Err(e) => e.problems,
    }
}

pub(super) fn keys(text: &str) -> Vec<String> {
    problems(text).into_iter().map(|p| p.key).collect()
}

/// MINIMAL plus `extra` (sections that MINIMAL does not have).
pub(super) fn with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}")
}

/// MINIMAL with `[section]`'s body extended by `body`.
pub(super) fn in_section(section: &str, body: &str) -> String {
    let header = format!("[{section}]\n");
    if MINIMAL.contains(&header) {
        MINIMAL.replace(&header, &format!("{header}{body}\n"))
    } else {
        format!("{MINIMAL}\n{header}{body}\n")
    }
}

/// The single problem of `text`, which must be keyed `key`.
pub(super) fn one_problem(text: &str, key: &str) -> String {
    let ps = problems(text);
    assert_eq!(ps.len(), 1, "expected one problem for {key}, got {ps:?}");
    assert_eq!(ps[0].key, key, "{ps:?}");
    ps[0].message.clone()
}

pub(super) const SECRET: &str = "s3cr3t-Admin-Token-7f9";
pub(super) const REDIS_PW: &str = "r3dis-Passw0rd-x1";

pub(super) fn test_env(name: &str) -> Option<String> {
    match name {
        "TENANT_ADMIN_TOKEN" => Some(SECRET.to_string()),
        "KEYGATE_REDIS_URL" => Some(format!("redis://keygate:{REDIS_PW}@cache.internal:6379/3")),
        "NODE_A" => Some(format!("redis://:{REDIS_PW}@10.0.0.1:6379")),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

pub(super) const WITH_SECRETS: &str = r#"
[upstream]
url = "http://127.0.0.1:8080"
authorization = "env:TENANT_ADMIN_TOKEN"
[tenant]
slug = "acme"
[store]
url = "env:KEYGATE_REDIS_URL"
"#;
