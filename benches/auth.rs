//! Org-key validation cost.
//!
//! * `auth/cache_hit`: `Authenticator::authenticate` on a cached key, SHA-256
//!   included (goal ≤ 1 µs). The future is polled once (a hit completes
//!   without yielding), so no executor overhead is measured.
//! * `auth/sha256`: the hash alone, for reference.
//! * `auth/usage_count`: counting one request for per-key usage (§10, goal
//!   ≤ 20 ns): a DashMap shard read and one atomic add.
//! * `auth/cache_miss_redis`: a valid key that must be re-checked on every
//!   request (`cache_ttl = 0`) against a `redis-server` on loopback that the
//!   bench starts itself (skipped with a message if `redis-server` is missing).
//! * revocation propagation between two instances sharing that Redis: p50/p99
//!   from "revoke returned on A" to "B refuses the key" (printed after the
//!   criterion groups).
//!
//! Run: `cargo bench --bench auth` (criterion medians in the output).

use std::future::Future;
use std::net::TcpListener;
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{black_box, Criterion};
use keygate::auth::store::Store;
use keygate::auth::{token, Actor, Authenticator, MintRequest, OpContext};
use keygate::config::{Config, RedisTarget, Secret, StoreBackend};
use keygate::metrics::Metrics;

fn config() -> Config {
    Config::new("bench", http::Uri::from_static("http://127.0.0.1:9"))
}

fn ctx() -> OpContext {
    OpContext {
        actor: Actor("cli:bench".into()),
        client: None,
        user_agent: None,
    }
}

fn mint_req() -> MintRequest {
    MintRequest {
        name: Some("bench".into()),
        enforce_ceiling: false,
        ..MintRequest::default()
    }
}

async fn wait_feed(auth: &Authenticator) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !auth.feed_live() {
        assert!(Instant::now() < deadline, "revocation feed never connected");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Poll once: a cache hit is `Ready` on the first poll.
fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
    let mut f = pin!(f);
    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

fn bench_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let auth = Authenticator::start(&config(), Store::memory("bench"), Arc::new(Metrics::new()));
    let minted = rt.block_on(async {
        wait_feed(&auth).await;
        let minted = auth.keys().mint(mint_req(), &ctx()).await.expect("mint");
        auth.authenticate(minted.token.expose())
            .await
            .expect("valid key");
        minted
    });
    let token = minted.token.expose().to_string();
    assert!(matches!(
        poll_once(auth.authenticate(&token)),
        Poll::Ready(Ok(_))
    ));

    let mut g = c.benchmark_group("auth");
    g.bench_function("cache_hit", |b| {
        b.iter(|| match poll_once(auth.authenticate(black_box(&token))) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("a cache hit must not yield"),
        })
    });
    g.bench_function("sha256", |b| b.iter(|| token::hash(black_box(&token))));
    // §10: counting one request for usage, as the request path does (the
    // key already has a bucket for this hour; goal ≤ 20 ns).
    let principal = match poll_once(auth.authenticate(&token)) {
        Poll::Ready(Ok(p)) => p,
        _ => panic!("cached key"),
    };
    g.bench_function("usage_count", |b| {
        b.iter(|| auth.usage().count(black_box(&principal), false))
    });
    g.finish();
}

struct RedisServer(Child, u16);

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer(child, port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }

    fn config(&self, cache_ttl: Duration) -> Config {
        let mut config = config();
        config.store.backend = StoreBackend::Redis(RedisTarget::Url(Secret::new(format!(
            "redis://127.0.0.1:{}/0",
            self.1
        ))));
        config.store.timeout = Duration::from_secs(2);
        config.auth.cache_ttl = cache_ttl;
        config
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn store(config: &Config) -> Store {
    Store::from_config(&config.store, &config.tenant.slug).expect("store")
}

fn bench_miss(c: &mut Criterion, redis: &RedisServer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let config = redis.config(Duration::ZERO);
    let auth = rt.block_on(async {
        let auth = Authenticator::start(&config, store(&config), Arc::new(Metrics::new()));
        wait_feed(&auth).await;
        auth
    });
    let minted = rt
        .block_on(auth.keys().mint(mint_req(), &ctx()))
        .expect("mint");
    let token = minted.token.expose().to_string();
    rt.block_on(auth.authenticate(&token)).expect("valid key");

    let mut g = c.benchmark_group("auth");
    g.bench_function("cache_miss_redis", |b| {
        b.iter(|| rt.block_on(auth.authenticate(black_box(&token))))
    });
    g.finish();
}

fn propagation(redis: &RedisServer) {
    const ROUNDS: usize = 200;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let config = redis.config(Duration::from_secs(60));
    let mut samples = rt.block_on(async {
        let a = Authenticator::start(&config, store(&config), Arc::new(Metrics::new()));
        let b = Authenticator::start(&config, store(&config), Arc::new(Metrics::new()));
        wait_feed(&a).await;
        wait_feed(&b).await;
        let mut samples = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let k = a.keys().mint(mint_req(), &ctx()).await.expect("mint");
            b.authenticate(k.token.expose()).await.expect("valid on b");
            assert!(a.keys().revoke(&k.record.id, &ctx()).await.expect("revoke"));
            let revoked = Instant::now();
            let deadline = revoked + Duration::from_secs(5);
            while b.authenticate(k.token.expose()).await.is_ok() {
                assert!(Instant::now() < deadline, "b never saw the revocation");
                tokio::task::yield_now().await;
            }
            samples.push(revoked.elapsed());
        }
        samples
    });
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "auth/revocation_propagation (redis pub/sub, {ROUNDS} rounds): p50 {:?}  p99 {:?}  max {:?}",
        pct(50),
        pct(99),
        samples[samples.len() - 1]
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_hit(&mut c);
    let redis_present = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match redis_present.then(RedisServer::start).flatten() {
        Some(redis) => {
            bench_miss(&mut c, &redis);
            propagation(&redis);
        }
        None => {
            println!("auth/cache_miss_redis: skipped (redis-server not found or did not start)")
        }
    }
    c.final_summary();
}
