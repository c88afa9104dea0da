//! A real `redis-server` for integration tests, on a free port of 127.0.0.1,
//! without persistence. It can be killed (SIGKILL) and restarted on the same
//! port to test outages; it is killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer PING.
const START_DEADLINE: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    /// Full `redis-server` argument list (reused by `restart`).
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Start a server on a free port with `extra` arguments after the defaults
    /// (`--port <free> --bind 127.0.0.1 --save '' --appendonly no`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            port,
            args,
            child: None,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL the server and wait for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port (after [`RedisServer::kill`]); empty data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start `redis-server <args>` and wait until it answers PING.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server not found: install it with apt-get install -y redis-server")
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if ping(self.addr()) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server on port {} exited at start: {status}",
                        self.port
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {START_DEADLINE:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago (bind :0, read it, drop the listener).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// One PING over a raw connection; true on `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Run `redis-cli -p <port> <args>` and return its stdout (for assertions on
/// what Redis holds). Panics if redis-cli is missing or fails.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-cli not found: install it with apt-get install -y redis-server")
        }
        Err(e) => panic!("cannot run redis-cli: {e}"),
    };
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A local Redis Cluster: `masters` cluster-enabled servers on free ports,
/// joined with `redis-cli --cluster create`, no replicas. Killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..masters {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--dir",
                &node_dir.display().to_string(),
            ]));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.push("--cluster-yes");
        redis_cli(nodes[0].port(), &args);
        let deadline = Instant::now() + START_DEADLINE;
        for n in &nodes {
            while !redis_cli(n.port(), &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.url().replace("/0", ""))
            .collect()
    }
}

/// One master plus one Redis Sentinel monitoring it under `master_name`.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub sentinel: RedisServer,
    pub master_name: String,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub fn start(master_name: &str) -> RedisSentinel {
        let master = RedisServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("sentinel.conf");
        let port = free_port();
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master_name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n",
                dir.path().display(),
                master.port()
            ),
        )
        .expect("write sentinel.conf");
        let mut sentinel = RedisServer {
            port,
            args: vec![conf.display().to_string(), "--sentinel".into()],
            child: None,
        };
        sentinel.spawn();
        RedisSentinel {
            master,
            sentinel,
            master_name: master_name.to_string(),
            _dir: dir,
        }
    }

    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel.port())
    }
}
