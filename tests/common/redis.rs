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

// ---------------------------------------------------------------------------
// High availability: a cluster with replicas (automatic failover) and a
// Sentinel group (master + replica + several sentinels).

/// How long a replicated cluster or a sentinel group may take to settle.
const HA_DEADLINE: Duration = Duration::from_secs(30);

/// `cluster-node-timeout` of [`RedisCluster::start_with_replicas`]: a killed
/// master is failed over a few multiples of this after the kill.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// Id of the master, for a replica.
    pub master_id: Option<String>,
    pub link_connected: bool,
    /// Served slot ranges (inclusive).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }
    pub fn is_failing(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// Parse `CLUSTER NODES` output.
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let n = s.parse().ok()?;
                        Some((n, n))
                    }
                })
                .collect();
            Some(ClusterNode {
                id: f[0].to_string(),
                port,
                flags: f[2].split(',').map(str::to_string).collect(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                link_connected: f[7] == "connected",
                slots,
            })
        })
        .collect()
}

/// `redis-cli` that returns `None` instead of panicking (for nodes that may be
/// down or busy failing over).
/// Block until every replica of the master on `port` has acknowledged all
/// of its writes so far (its `offset` in `INFO replication` has reached the
/// master's `master_repl_offset`), polling for at most `limit`; `WAIT` from
/// a fresh client cannot say this, it waits only for that client's writes.
/// Returns how many replicas are caught up (panics if none within `limit`).
pub fn wait_replicated(port: u16, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let info = redis_cli(port, &["INFO", "replication"]);
        let field = |line: &str, name: &str| -> Option<u64> {
            line.split([',', ':']).find_map(|kv| {
                kv.trim()
                    .strip_prefix(name)?
                    .strip_prefix('=')?
                    .parse()
                    .ok()
            })
        };
        let master = info
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("master_repl_offset:")?
                    .parse::<u64>()
                    .ok()
            })
            .expect("master_repl_offset in INFO replication");
        let caught_up = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .filter(|l| field(l, "offset").is_some_and(|o| o >= master))
            .count();
        if caught_up > 0 {
            return caught_up;
        }
        assert!(
            Instant::now() < deadline,
            "no replica of :{port} caught up within {limit:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn try_redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

impl RedisCluster {
    /// `masters` masters with one replica each (`2 * masters` nodes), joined
    /// with `redis-cli --cluster create ... --cluster-replicas 1`. Nodes use a
    /// short `cluster-node-timeout` ([`CLUSTER_NODE_TIMEOUT_MS`]) so a killed
    /// master is failed over in seconds, and `cluster-require-full-coverage
    /// no` so a shard that is down only affects the slots it holds (the
    /// production setting for many tenants on one cluster). Returns once
    /// every node says `cluster_state:ok`, knows all nodes, and every replica
    /// is in sync with its master.
    pub fn start_with_replicas(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
        let mut nodes = Vec::new();
        for i in 0..masters * 2 {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &timeout,
                "--cluster-require-full-coverage",
                "no",
                // Fail over even if the replica lost its master a while ago.
                "--cluster-replica-validity-factor",
                "0",
                // Full sync at once (7.0 waits 5 s by default for more replicas).
                "--repl-diskless-sync-delay",
                "0",
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
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        redis_cli(nodes[0].port(), &args);
        let cluster = RedisCluster { nodes, _dir: dir };
        let deadline = Instant::now() + HA_DEADLINE;
        while !cluster.settled(masters) {
            assert!(
                Instant::now() < deadline,
                "replicated cluster did not settle within {HA_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every node: state ok, sees `2 * masters` connected nodes of which
    /// `masters` are masters; every replica's link to its master is up.
    fn settled(&self, masters: usize) -> bool {
        self.nodes.iter().all(|n| {
            let Some(info) = try_redis_cli(n.port(), &["CLUSTER", "INFO"]) else {
                return false;
            };
            let Some(text) = try_redis_cli(n.port(), &["CLUSTER", "NODES"]) else {
                return false;
            };
            let view = parse_cluster_nodes(&text);
            let me = view.iter().find(|v| v.flags.iter().any(|f| f == "myself"));
            let replica_synced = match me {
                Some(me) if !me.is_master() => try_redis_cli(n.port(), &["INFO", "replication"])
                    .is_some_and(|r| r.contains("master_link_status:up")),
                Some(_) => true,
                None => false,
            };
            info.contains("cluster_state:ok")
                && view.len() == masters * 2
                && view.iter().filter(|v| v.is_master()).count() == masters
                && view.iter().all(|v| v.link_connected && !v.is_failing())
                && view
                    .iter()
                    .all(|v| v.flags.iter().all(|f| f != "handshake" && f != "noaddr"))
                && replica_synced
        })
    }

    /// The node on `port` (panics if it is not part of the cluster).
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Ports of the nodes that are running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(RedisServer::port)
            .collect()
    }

    /// `CLUSTER KEYSLOT key`, asked of a running node.
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        let out = redis_cli(port, &["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {out:?}"))
    }

    /// `CLUSTER NODES` as seen by the running node on `port`.
    pub fn view_of(&self, port: u16) -> Option<Vec<ClusterNode>> {
        try_redis_cli(port, &["CLUSTER", "NODES"]).map(|t| parse_cluster_nodes(&t))
    }

    /// The port of the master serving `slot` when every running node agrees
    /// on one running, non-failing master for it; `None` while they do not
    /// (e.g. during a failover).
    pub fn serving_master(&self, slot: u16) -> Option<u16> {
        let live = self.live_ports();
        let mut agreed = None;
        for &port in &live {
            let view = self.view_of(port)?;
            let master = view
                .iter()
                .find(|v| v.is_master() && v.serves(slot) && !v.is_failing())?;
            if !live.contains(&master.port) {
                return None;
            }
            match agreed {
                None => agreed = Some(master.port),
                Some(p) if p == master.port => {}
                Some(_) => return None,
            }
        }
        agreed
    }

    /// The replica of the master on `master_port` (from that master's view).
    pub fn replica_of(&self, master_port: u16) -> Option<u16> {
        let view = self.view_of(master_port)?;
        let master = view.iter().find(|v| v.port == master_port)?;
        view.iter()
            .find(|v| v.master_id.as_deref() == Some(master.id.as_str()))
            .map(|v| v.port)
    }

    /// `cluster_state:ok` on every running node.
    pub fn all_ok(&self) -> bool {
        self.live_ports().iter().all(|&p| {
            try_redis_cli(p, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))
        })
    }
}

/// A Sentinel group: one master, one replica, several sentinels (quorum 2),
/// tuned to fail over within seconds. Killed on drop.
pub struct SentinelGroup {
    /// The initial master (after a failover it may be dead or a replica).
    pub master: RedisServer,
    /// The initial replica (the failover candidate).
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    pub master_name: String,
    _dir: tempfile::TempDir,
}

impl SentinelGroup {
    /// Start the master, a replica of it and `sentinels` sentinels, each with
    /// its own config file (`sentinel monitor <name> 127.0.0.1 <port> 2`,
    /// `down-after-milliseconds 1000`, `failover-timeout 5000`,
    /// `parallel-syncs 1`). Returns once the replica is in sync and every
    /// sentinel knows the replica and the other sentinels.
    pub fn start(master_name: &str, sentinels: usize) -> SentinelGroup {
        let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
        let replica = RedisServer::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &master.port().to_string(),
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut group = SentinelGroup {
            master,
            replica,
            sentinels: Vec::new(),
            master_name: master_name.to_string(),
            _dir: dir,
        };
        for i in 0..sentinels {
            let sdir = group._dir.path().join(format!("sentinel{i}"));
            std::fs::create_dir_all(&sdir).expect("sentinel dir");
            let conf = sdir.join("sentinel.conf");
            let port = free_port();
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {master_name} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    sdir.display(),
                    group.master.port()
                ),
            )
            .expect("write sentinel.conf");
            let mut sentinel = RedisServer {
                port,
                args: vec![conf.display().to_string(), "--sentinel".into()],
                child: None,
            };
            sentinel.spawn();
            group.sentinels.push(sentinel);
        }
        let deadline = Instant::now() + HA_DEADLINE;
        while !group.settled() {
            assert!(
                Instant::now() < deadline,
                "sentinel group did not settle within {HA_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        group
    }

    fn settled(&self) -> bool {
        let synced = try_redis_cli(self.replica.port(), &["INFO", "replication"])
            .is_some_and(|r| r.contains("master_link_status:up"));
        synced
            && self.sentinels.iter().all(|s| {
                let Some(text) =
                    try_redis_cli(s.port(), &["SENTINEL", "MASTER", &self.master_name])
                else {
                    return false;
                };
                let fields: Vec<&str> = text.lines().collect();
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|kv| kv[0] == name)
                        .and_then(|kv| kv.get(1))
                        .and_then(|v| v.parse::<usize>().ok())
                };
                field("num-slaves") == Some(1)
                    && field("num-other-sentinels") == Some(self.sentinels.len() - 1)
            })
    }

    /// `redis://127.0.0.1:<port>` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port()))
            .collect()
    }

    /// The master port every running sentinel reports
    /// (`SENTINEL get-master-addr-by-name`), when they agree.
    pub fn master_port(&self) -> Option<u16> {
        let mut agreed = None;
        for s in self.sentinels.iter().filter(|s| s.child.is_some()) {
            let out = try_redis_cli(
                s.port(),
                &["SENTINEL", "get-master-addr-by-name", &self.master_name],
            )?;
            let port: u16 = out.lines().nth(1)?.trim().parse().ok()?;
            match agreed {
                None => agreed = Some(port),
                Some(p) if p == port => {}
                Some(_) => return None,
            }
        }
        agreed
    }
}
