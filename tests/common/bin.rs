//! The built `keygate` binary as a child process: a generated config on free
//! ports, `/healthz` polled with a deadline, output captured to files, RSS
//! read from `/proc`, signals sent with `kill`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::kg;

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// The memory store, as the body of a `[store]` section.
pub const MEMORY_STORE: &str = "backend = \"memory\"";

/// A free address on 127.0.0.1 (bound to `:0`, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local addr")
}

/// Whether `addr` can be bound (nobody listens on it).
pub fn port_is_free(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// Run `keygate <args>` to completion (stdin closed, `KEYGATE_CONFIG`
/// unset so that only `args` name a config), bounded by 30 s.
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("KEYGATE_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("keygate {args:?} did not finish within 30 s"))
        .expect("run keygate")
}

/// A `keygate` child process (killed when dropped) whose stdout and stderr
/// go to files in its own temp dir: what it wrote is complete once it exits.
pub struct Proc {
    pub child: Child,
    dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_with_env(args, &[])
    }

    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let dir = tempfile::tempdir().expect("temp dir");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout.log");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn keygate");
        Proc { child, dir }
    }

    /// The process's own temp dir (also a place for its config).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every line written so far: stdout's, then stderr's.
    pub fn lines(&self) -> Vec<String> {
        ["stdout.log", "stderr.log"]
            .iter()
            .flat_map(|name| {
                std::fs::read_to_string(self.dir.path().join(name))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Everything written so far (stdout, then stderr), one line per line.
    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("keygate still running")
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("keygate exited ({status}):\n{}", self.output());
        }
    }

    /// `kill <which> <pid>`, e.g. `-TERM`.
    pub fn signal(&self, which: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .arg(which)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid}");
    }

    pub fn signal_term(&self) {
        self.signal("-TERM");
    }

    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    /// Poll the admin `/healthz` until it answers 200 (bounded: 20 s).
    pub async fn wait_healthy(&mut self, admin: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                panic!(
                    "keygate exited during start-up: {status}\n{}",
                    self.output()
                );
            }
            if let Ok(mut s) = TcpStream::connect(admin).await {
                let req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                if s.write_all(req).await.is_ok() && kg::read_response(&mut s).await.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keygate not healthy within 20s:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait (bounded) for the process to exit.
    pub async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("keygate still running after {limit:?}:\n{}", self.output()),
        }
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} missing in /proc status"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A `keygate serve` config for tenant `acme`: `[listen]` (with `listen`
/// lines after its addr), `[admin]`, `[tenant]`, `[store]`, then
/// `[upstream]` last so that `rest` may add upstream keys before its own
/// sections.
pub struct Serve {
    upstream: String,
    listen: String,
    store: String,
    rest: String,
    env: Vec<(String, String)>,
}

impl Serve {
    /// `upstream`: the upstream URL (`http://127.0.0.1:1234`).
    pub fn new(upstream: impl std::fmt::Display) -> Serve {
        Serve {
            upstream: upstream.to_string(),
            listen: String::new(),
            store: MEMORY_STORE.into(),
            rest: String::new(),
            env: Vec::new(),
        }
    }

    /// In front of `http://<addr>`.
    pub fn at(upstream: SocketAddr) -> Serve {
        Serve::new(format!("http://{upstream}"))
    }

    /// Lines under `[listen]` after its addr (keys, or a `[listen.tls]` table).
    pub fn listen(mut self, lines: &str) -> Serve {
        self.listen = lines.into();
        self
    }

    /// The body of `[store]` (the memory store unless set).
    pub fn store(mut self, body: &str) -> Serve {
        self.store = body.into();
        self
    }

    /// TOML after `url = ...` under `[upstream]`.
    pub fn rest(mut self, toml: &str) -> Serve {
        self.rest = toml.into();
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Serve {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn toml(&self, public: SocketAddr, admin: SocketAddr) -> String {
        format!(
            "[listen]\naddr = \"{public}\"\n{listen}\n\
             [admin]\naddr = \"{admin}\"\n\n\
             [tenant]\nslug = \"acme\"\n\n\
             [store]\n{store}\n\n\
             [upstream]\nurl = \"{upstream}\"\n{rest}\n",
            listen = self.listen,
            store = self.store,
            upstream = self.upstream,
            rest = self.rest,
        )
    }

    /// Write the config for `public`/`admin` to `dir/keygate.toml`.
    pub fn write(&self, dir: &Path, public: SocketAddr, admin: SocketAddr) -> PathBuf {
        let path = dir.join("keygate.toml");
        std::fs::write(&path, self.toml(public, admin)).expect("write config");
        path
    }

    /// `keygate serve` on two free ports; returns once `/healthz` is 200.
    pub async fn start(self) -> Served {
        let (public, admin) = (free_addr(), free_addr());
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = self.write(dir.path(), public, admin);
        let config_arg = config.display().to_string();
        let mut proc = Proc::spawn_with_env(&["serve", "--config", &config_arg], &env);
        proc.wait_healthy(admin).await;
        Served {
            proc,
            public,
            admin,
            config,
            _config_dir: dir,
        }
    }
}

/// A healthy `keygate serve`; derefs to its [`Proc`].
pub struct Served {
    pub proc: Proc,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    _config_dir: tempfile::TempDir,
}

impl Deref for Served {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
