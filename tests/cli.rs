//! The `keygate keys …` and `keygate audit` commands of the built binary
//! against a real `redis-server` (contract §1, §5 audit trail), next to an
//! in-process keygate sharing the same Redis.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::bin;
use common::keys::{bearer, send, MINT_FIELDS};
use common::kg;
use common::redis::RedisServer;
use common::upstream::{closed_port, Upstream};
use common::verify::Verify;
use keygate::config::SessionConfig;
use serde_json::Value;

const OS_USER: &str = "alice";

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

fn write_config(dir: &Path, redis_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("keygate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n\n[tenant]\nslug = \"acme\"\n\n\
             [store]\nurl = \"{redis_url}\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// Run the built binary (USER=alice), bounded.
async fn keygate(args: &[&str]) -> Output {
    bin::run(args, &[("USER", OS_USER)]).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    let all = format!("{}{}", stdout(o), stderr(o));
    assert!(
        !all.contains("panicked") && !all.contains("RUST_BACKTRACE"),
        "{what}: panic output: {all}"
    );
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// `keygate keys mint --json`: (id, token).
async fn cli_mint(config: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "keys",
        "mint",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = keygate(&args).await;
    assert_exit(&o, 0, "keys mint --json");
    let v = json(stdout(&o).trim());
    (
        v["id"].as_str().unwrap().to_string(),
        v["auth_token"].as_str().unwrap().to_string(),
    )
}

// ---------------------------------------------------------------------------
// keys mint / list / revoke
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keys_mint_list_revoke_with_the_built_binary() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    let cfg = config.to_str().unwrap();
    let kg = kg::start_live(&kg::redis_config(&up, &redis)).await;
    let addr = kg.public_addr;

    // Plain: the token alone on stdout's first line, details on stderr.
    let o = keygate(&["keys", "mint", "--config", cfg, "--name", "ops"]).await;
    assert_exit(&o, 0, "keys mint");
    let out = stdout(&o);
    let token = out.lines().next().unwrap_or_default().to_string();
    assert!(
        keygate::auth::token::check_format(&token, "mok_"),
        "first stdout line is not a token: {out:?}"
    );
    assert_eq!(out.trim_end(), token, "stdout holds more than the token");
    let err = stderr(&o);
    assert!(
        err.contains(&token[..12]),
        "no prefix in the details: {err}"
    );
    assert!(!err.contains(&token), "token repeated on stderr");
    // It works at once on a running keygate.
    let r = send(
        addr,
        "GET",
        "/api/x",
        &[("Authorization", &bearer(&token))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let principal = up.wait_for(1).await[0].headers["x-molecule-principal"].clone();
    assert!(
        principal.to_str().unwrap().starts_with("org-key:"),
        "{principal:?}"
    );

    // --json: the POST object.
    let o = keygate(&[
        "keys",
        "mint",
        "--config",
        cfg,
        "--json",
        "--name",
        "ci",
        "--expires-in",
        "1h",
    ])
    .await;
    assert_exit(&o, 0, "keys mint --json");
    let out = stdout(&o);
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let minted = json(out.trim());
    assert_eq!(
        fields(&minted),
        MINT_FIELDS.iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(minted["name"], "ci");
    let expires: DateTime<Utc> =
        DateTime::parse_from_rfc3339(minted["expires_at"].as_str().unwrap())
            .unwrap()
            .with_timezone(&Utc);
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    assert!(
        (expires - in_an_hour).num_seconds().abs() <= 60,
        "--expires-in 1h gave {expires}"
    );
    let json_id = minted["id"].as_str().unwrap().to_string();
    let json_token = minted["auth_token"].as_str().unwrap().to_string();
    assert_eq!(minted["prefix"], &json_token[..12]);

    // keys list --json is the GET object (last_used_at aside: it moves on use).
    let o = keygate(&["keys", "list", "--config", cfg, "--json"]).await;
    assert_exit(&o, 0, "keys list --json");
    let mut cli_list = json(stdout(&o).trim());
    let r = send(
        addr,
        "GET",
        "/org/tokens",
        &[("Authorization", &bearer(&json_token))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut api_list = r.json();
    for v in [&mut cli_list, &mut api_list] {
        for t in v["tokens"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("last_used_at");
        }
    }
    assert_eq!(
        cli_list, api_list,
        "keys list --json differs from GET /org/tokens"
    );
    assert_eq!(cli_list["count"], 2);
    for t in cli_list["tokens"].as_array().unwrap() {
        assert_eq!(t["created_by"], format!("cli:{OS_USER}").as_str());
    }
    assert!(!stdout(&o).contains(&token) && !stdout(&o).contains(&json_token));

    // Table: a header and one row per key.
    let o = keygate(&["keys", "list", "--config", cfg]).await;
    assert_exit(&o, 0, "keys list");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].to_uppercase().contains("ID") && lines[0].to_uppercase().contains("PREFIX"),
        "{out}"
    );
    assert!(out.contains(&json_id) && out.contains("ci"), "{out}");
    assert!(!out.contains(&token) && !out.contains(&json_token));

    // revoke: exit 0, then the running keygate refuses it; again: exit 1.
    let o = keygate(&["keys", "revoke", "--config", cfg, &json_id]).await;
    assert_exit(&o, 0, "keys revoke");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = send(
            addr,
            "GET",
            "/api/x",
            &[("Authorization", &bearer(&json_token))],
            None,
        )
        .await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "a CLI-revoked key still accepted after 2 s"
        );
    }
    let o = keygate(&["keys", "revoke", "--config", cfg, &json_id]).await;
    assert_exit(&o, 1, "keys revoke (again)");
    // (That stderr is this one line alone is checked in
    // `cli_stderr_holds_no_log_lines`.)
    assert!(
        stderr(&o).lines().any(|l| l.starts_with("error:")),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("not found or already revoked"),
        "{}",
        stderr(&o)
    );
    let o = keygate(&["keys", "revoke", "--config", cfg, "no-such-id"]).await;
    assert_exit(&o, 1, "keys revoke unknown id");
    assert!(
        stderr(&o).contains("not found or already revoked"),
        "{}",
        stderr(&o)
    );
    kg.stop().await;
}

/// Contract §1: "Errors print one line starting with `error:`"; plain mint
/// prints "details on stderr". Log lines of the CLI's own revocation feed
/// must not be mixed in.
#[tokio::test]
async fn cli_stderr_holds_no_log_lines() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    let cfg = config.to_str().unwrap();
    let o = keygate(&["keys", "mint", "--config", cfg]).await;
    assert_exit(&o, 0, "keys mint");
    let err = stderr(&o);
    assert!(
        err.lines().all(|l| !l.trim_start().starts_with('{')),
        "log lines among the mint details:\n{err}"
    );
    for args in [
        vec!["keys", "revoke", "--config", cfg, "no-such-id"],
        vec!["keys", "list", "--config", cfg],
        vec!["audit", "--config", cfg],
    ] {
        let o = keygate(&args).await;
        let err = stderr(&o);
        if o.status.success() {
            assert!(err.is_empty(), "{args:?}: stderr on success:\n{err}");
        } else {
            assert_eq!(err.lines().count(), 1, "{args:?}: not one line:\n{err}");
            assert!(err.starts_with("error: "), "{args:?}: {err}");
        }
    }
}

#[tokio::test]
async fn created_by_falls_back_to_the_account_name() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    let whoami = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let whoami = String::from_utf8_lossy(&whoami.stdout).trim().to_string();
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["keys", "mint", "--config", config.to_str().unwrap()])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .output()
        .await
        .unwrap();
    assert_exit(&o, 0, "keys mint without USER");
    let o = keygate(&[
        "keys",
        "list",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ])
    .await;
    let v = json(stdout(&o).trim());
    assert_eq!(
        v["tokens"][0]["created_by"],
        format!("cli:{whoami}").as_str()
    );
}

#[tokio::test]
async fn the_cli_may_exceed_the_ceiling_and_warns() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "\n[keys]\nmax_live = 2\n");
    let cfg = config.to_str().unwrap();
    let mut tokens = Vec::new();
    for i in 0..3 {
        let o = keygate(&["keys", "mint", "--config", cfg]).await;
        assert_exit(&o, 0, "keys mint");
        let err = stderr(&o);
        if i < 2 {
            assert!(
                !err.to_lowercase().contains("warning"),
                "mint {i} warned: {err}"
            );
        } else {
            assert!(
                err.to_lowercase().contains("warning") && err.contains("max_live"),
                "no warning past the ceiling: {err}"
            );
        }
        tokens.push(stdout(&o).lines().next().unwrap().to_string());
    }
    let o = keygate(&["keys", "list", "--config", cfg, "--json"]).await;
    assert_eq!(json(stdout(&o).trim())["count"], 3);
    // The API still refuses.
    let mut c = kg::redis_config(&up, &redis);
    c.keys.max_live = 2;
    let kg = kg::start_live(&c).await;
    let r = send(
        kg.public_addr,
        "POST",
        "/org/tokens",
        &[("Authorization", &bearer(&tokens[0]))],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.error(), "org api token mint ceiling exceeded");
    kg.stop().await;
}

#[tokio::test]
async fn unreachable_redis_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().await.port();
    let config = write_config(dir.path(), &format!("redis://127.0.0.1:{port}/0"), "");
    let cfg = config.to_str().unwrap();
    for args in [
        vec!["keys", "mint", "--config", cfg],
        vec!["keys", "mint", "--config", cfg, "--json"],
        vec!["keys", "list", "--config", cfg],
        vec!["keys", "revoke", "--config", cfg, "someid"],
        vec!["audit", "--config", cfg],
    ] {
        let started = Instant::now();
        let o = keygate(&args).await;
        assert_exit(&o, 1, &format!("{args:?} with Redis down"));
        let err = stderr(&o);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
        assert!(
            lines[0].starts_with(&format!("error: cannot reach redis at 127.0.0.1:{port}")),
            "{args:?}: {err}"
        );
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }

    // Configuration and usage errors: exit 2.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstream]\nurl = \"http://127.0.0.1:9\"\n[tenant]\nslug = \"acme\"\n[store]\nurl = \"redis://127.0.0.1:1/0\"\nbogus = 1\n").unwrap();
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "this is = = not toml").unwrap();
    let missing = dir.path().join("missing.toml");
    for (args, needle) in [
        (
            vec!["keys", "mint", "--config", bad.to_str().unwrap()],
            "store.bogus",
        ),
        (
            vec!["keys", "list", "--config", garbage.to_str().unwrap()],
            "error:",
        ),
        (
            vec!["keys", "list", "--config", missing.to_str().unwrap()],
            "error:",
        ),
        (
            vec!["audit", "--config", bad.to_str().unwrap()],
            "store.bogus",
        ),
        (
            vec!["keys", "mint", "--config", cfg, "--expires-in", "soon"],
            "--expires-in",
        ),
        (
            vec!["audit", "--config", cfg, "--since", "yesterday"],
            "--since",
        ),
        (vec!["keys", "revoke", "--config", cfg], "error"),
    ] {
        let o = keygate(&args).await;
        assert_exit(&o, 2, &format!("{args:?}"));
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
}

/// A refused password names Redis's own reply, not a redis-rs enum name;
/// a missing one says that the URL has none. Never the password itself.
#[tokio::test]
async fn redis_password_errors_name_the_cause() {
    let server = RedisServer::start();
    let port = server.port();
    common::redis::redis_cli(port, &["CONFIG", "SET", "requirepass", "hunter2"]);
    let dir = tempfile::tempdir().unwrap();
    for (url, want) in [
        (
            format!("redis://:wrong-pass@127.0.0.1:{port}/0"),
            format!("error: redis at 127.0.0.1:{port}: refused the password (WRONGPASS invalid username-password pair or user is disabled.)"),
        ),
        (
            format!("redis://someone:wrong-pass@127.0.0.1:{port}/0"),
            format!("error: redis at 127.0.0.1:{port}: refused the password (WRONGPASS invalid username-password pair or user is disabled.)"),
        ),
        (
            format!("redis://127.0.0.1:{port}/0"),
            format!("error: redis at 127.0.0.1:{port}: wants a password, store.url has none (NOAUTH Authentication required.)"),
        ),
    ] {
        let config = write_config(dir.path(), &url, "");
        let o = keygate(&["keys", "list", "--config", config.to_str().unwrap()]).await;
        assert_exit(&o, 1, &url);
        assert_eq!(stderr(&o).trim_end(), want, "{url}");
        assert!(!stderr(&o).contains("wrong-pass"));
    }
}

// ---------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_mint_and_revoke_is_audited_with_its_actor() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // A fake session verify endpoint: `wos-session=good` is user `u_123`.
    let verify = Verify::start("good", "u_123").await.addr;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    let cfg = config.to_str().unwrap();
    let mut c = kg::redis_config(&up, &redis);
    c.session = Some(SessionConfig {
        verify_url: format!("http://{verify}/verify").parse().unwrap(),
        cookie: "wos-session".into(),
        timeout: Duration::from_secs(2),
        cache_ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(5),
    });
    let kg = kg::start_live(&c).await;
    let addr = kg.public_addr;
    let cli = format!("cli:{OS_USER}");
    let session = "session:u_123".to_string();

    // 1. CLI mint.
    let (k1, t1) = cli_mint(&config, &["--name", "ci-deploy"]).await;
    let by_key = format!("org-key:{}", &t1[..12]);
    // 2. API mint with a key.
    let key_headers = [
        ("Authorization", bearer(&t1)),
        ("User-Agent", "curl/8.5.0".to_string()),
    ];
    let key_headers: Vec<(&str, &str)> =
        key_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send(
        addr,
        "POST",
        "/org/tokens",
        &key_headers,
        Some(r#"{"name":"by key"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (k2, t2) = (
        r.json()["id"].as_str().unwrap().to_string(),
        r.json()["auth_token"].as_str().unwrap().to_string(),
    );
    let between = Utc::now();
    // 3. Session mint.
    let session_headers = [
        ("Cookie", "wos-session=good"),
        ("Origin", "https://acme.moleculesai.app"),
        ("User-Agent", "Mozilla/5.0 canvas"),
    ];
    let r = send(addr, "POST", "/org/tokens", &session_headers, Some("{}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let (k3, t3) = (
        r.json()["id"].as_str().unwrap().to_string(),
        r.json()["auth_token"].as_str().unwrap().to_string(),
    );
    // 4. API revoke with a key, 5. session revoke, 6. CLI revoke.
    let r = send(
        addr,
        "DELETE",
        &format!("/org/tokens/{k3}"),
        &key_headers,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = send(
        addr,
        "DELETE",
        &format!("/org/tokens/{k2}"),
        &session_headers,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let o = keygate(&["keys", "revoke", "--config", cfg, &k1]).await;
    assert_exit(&o, 0, "keys revoke");
    // A refused operation leaves no entry.
    let r = send(
        addr,
        "DELETE",
        &format!("/org/tokens/{k1}"),
        &session_headers,
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");

    let o = keygate(&["audit", "--config", cfg, "--json"]).await;
    assert_exit(&o, 0, "audit --json");
    let out = stdout(&o);
    let entries: Vec<Value> = out.lines().map(json).collect();
    let got: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["action"].as_str().unwrap_or_default().to_string(),
                e["key_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want = vec![
        (cli.clone(), "mint".to_string(), k1.clone()),
        (by_key.clone(), "mint".to_string(), k2.clone()),
        (session.clone(), "mint".to_string(), k3.clone()),
        (by_key.clone(), "revoke".to_string(), k3.clone()),
        (session.clone(), "revoke".to_string(), k2.clone()),
        (cli.clone(), "revoke".to_string(), k1.clone()),
    ];
    assert_eq!(got, want, "audit trail:\n{out}");
    let prefixes = [(&k1, &t1), (&k2, &t2), (&k3, &t3)];
    let names = [(&k1, "ci-deploy"), (&k2, "by key")];
    let mut last: Option<DateTime<Utc>> = None;
    for e in &entries {
        for f in [
            "time",
            "actor",
            "action",
            "key_id",
            "prefix",
            "client",
            "user_agent",
        ] {
            assert!(e.get(f).is_some(), "audit entry without {f}: {e}");
        }
        let time = e["time"].as_str().unwrap();
        assert!(time.ends_with('Z'), "{time}");
        let time = DateTime::parse_from_rfc3339(time)
            .unwrap()
            .with_timezone(&Utc);
        assert!(last.is_none_or(|l| l <= time), "not oldest first:\n{out}");
        assert!((Utc::now() - time).num_seconds().abs() < 120, "{e}");
        last = Some(time);
        let (_, token) = prefixes
            .iter()
            .find(|(id, _)| e["key_id"] == id.as_str())
            .unwrap();
        assert_eq!(e["prefix"], &token[..12], "{e}");
        // The key's name, on its mint and its revoke alike (k3 has none).
        let name = names.iter().find(|(id, _)| e["key_id"] == id.as_str());
        assert_eq!(
            e["name"],
            name.map_or(Value::Null, |(_, n)| (*n).into()),
            "{e}"
        );
        for (_, t) in &prefixes {
            assert!(
                !e.to_string().contains(t.as_str()),
                "a token in the audit trail"
            );
        }
        let actor = e["actor"].as_str().unwrap();
        if actor.starts_with("cli:") {
            continue;
        }
        assert_eq!(e["client"], "127.0.0.1", "{e}");
        let ua = if actor.starts_with("session:") {
            "Mozilla/5.0 canvas"
        } else {
            "curl/8.5.0"
        };
        assert_eq!(e["user_agent"], ua, "{e}");
    }

    // --since: only what happened from then on.
    let since = between.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let o = keygate(&["audit", "--config", cfg, "--json", "--since", &since]).await;
    assert_exit(&o, 0, "audit --since");
    let recent: Vec<(String, String, String)> = stdout(&o)
        .lines()
        .map(json)
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                e["key_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(recent, want[2..].to_vec(), "--since {since}");
    let future =
        (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let o = keygate(&["audit", "--config", cfg, "--json", "--since", &future]).await;
    assert_exit(&o, 0, "audit --since (future)");
    assert!(stdout(&o).trim().is_empty(), "{}", stdout(&o));
    // A date (midnight UTC) and a duration back from now: the same syntax
    // as the config's durations.
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let tomorrow = (Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    for (since, entries) in [
        ("1h", want.len()),
        ("24h", want.len()),
        ("7d", want.len()),
        (today.as_str(), want.len()),
        (tomorrow.as_str(), 0),
    ] {
        let o = keygate(&["audit", "--config", cfg, "--json", "--since", since]).await;
        assert_exit(&o, 0, &format!("audit --since {since}"));
        assert_eq!(stdout(&o).lines().count(), entries, "--since {since}");
    }

    // Table: a header line, then one line per entry, oldest first.
    let o = keygate(&["audit", "--config", cfg]).await;
    assert_exit(&o, 0, "audit");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), want.len() + 1, "{out}");
    let header = lines[0].to_uppercase();
    for col in [
        "TIME",
        "ACTOR",
        "ACTION",
        "KEY_ID",
        "PREFIX",
        "NAME",
        "CLIENT",
        "USER_AGENT",
    ] {
        assert!(header.contains(col), "header without {col}: {out}");
    }
    // NAME is its own column, between PREFIX and CLIENT: each row's cell
    // starts where the header's does.
    let name_at = lines[0].find("NAME").unwrap();
    assert!(
        lines[0].find("PREFIX").unwrap() < name_at && name_at < lines[0].find("CLIENT").unwrap(),
        "{out}"
    );
    for (line, (actor, action, id)) in lines[1..].iter().zip(&want) {
        assert!(
            line.contains(actor.as_str())
                && line.contains(action.as_str())
                && line.contains(id.as_str()),
            "row {line:?} is not {actor} {action} {id}"
        );
        let name = names
            .iter()
            .find(|(k, _)| *k == id)
            .map_or("-", |(_, n)| *n);
        assert!(
            line.get(name_at..)
                .is_some_and(|cell| cell.starts_with(&format!("{name}  "))),
            "row {line:?}: NAME is not {name:?}\n{out}"
        );
    }
    kg.stop().await;
}

// ---------------------------------------------------------------------------
// Completions and the man page
// ---------------------------------------------------------------------------

#[tokio::test]
async fn completions_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _keygate"),
        ("zsh", "#compdef keygate"),
        ("fish", "complete -c keygate"),
    ] {
        let o = keygate(&["completions", shell]).await;
        assert_exit(&o, 0, &format!("completions {shell}"));
        let out = stdout(&o);
        assert!(out.contains(marker), "{shell}: no {marker:?} in\n{out}");
        // Every command and a nested one's flags are offered.
        for word in [
            "serve",
            "check",
            "keys",
            "mint",
            "revoke",
            "audit",
            "demo",
            "expires-in",
            "since",
        ] {
            assert!(out.contains(word), "{shell}: {word} missing");
        }
        assert!(stderr(&o).is_empty(), "{shell}: {}", stderr(&o));
    }
    let o = keygate(&["completions", "tcsh"]).await;
    assert_exit(&o, 2, "completions tcsh");
}

/// A reader that stops early (`keygate completions zsh | head -3`) ends the
/// command quietly: exit 0, no panic, nothing on stderr.
#[test]
fn generated_text_to_a_closed_pipe_is_not_a_panic() {
    for args in [&["completions", "zsh"][..], &["man"][..]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before keygate writes: its writes meet EPIPE.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn man_page_is_roff_with_every_command() {
    let o = keygate(&["man"]).await;
    assert_exit(&o, 0, "man");
    let page = stdout(&o);
    assert!(
        page.starts_with(".ie") || page.contains(".TH keygate 1"),
        "{page}"
    );
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH \"KEYGATE SERVE\"",
        ".SH \"KEYGATE KEYS MINT\"",
        ".SH \"KEYGATE AUDIT\"",
        ".SH \"EXIT STATUS\"",
    ] {
        assert!(page.contains(section), "{section} missing:\n{page}");
    }
    assert!(page.contains("\\-\\-since"), "{page}");
    // Renders with man(1) where it is installed.
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keygate.1");
        std::fs::write(&file, &page).unwrap();
        let shown = std::process::Command::new("man")
            .arg("-l")
            .arg(&file)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&shown.stdout);
        assert!(text.contains("KEYGATE KEYS MINT"), "{text}");
        assert!(
            !String::from_utf8_lossy(&shown.stderr).contains("warning"),
            "{shown:?}"
        );
    }
}
