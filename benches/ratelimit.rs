//! Cost of the rate-limit check on the request path (contract §11).
//!
//! * `ratelimit/unset`: a key without a limit (goal ≤ 5 ns): the proxy's
//!   call returns at the `rate_limit()` check.
//! * `ratelimit/limited`: a limited key with budget left (goal ≤ 50 ns): the
//!   key's entry (DashMap on the token hash), the UTC clock, the window
//!   slot, one compare-and-swap, the header values. Local mode (no store),
//!   which runs the same hot path as with reservations from the store.
//! * `ratelimit/limited_4_threads`: the same key from 4 threads at once
//!   (contended CAS), per admission.
//!
//! Run: `cargo bench --bench ratelimit`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, Criterion};
use keygate::config::{RateLimit, RateUnit};
use keygate::ratelimit::{bench_principal, now_ms, RateLimiter};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let limiter = RateLimiter::new(Duration::from_millis(250));
    limiter.assume_store_down();
    let unset = bench_principal("unset", None);
    let limited = bench_principal(
        "limited",
        Some(RateLimit {
            limit: NonZeroU32::MAX,
            per: RateUnit::Second,
        }),
    );
    assert!(limiter.try_admit_at(&unset, now_ms()).is_none());
    assert!(matches!(
        limiter.try_admit_at(&limited, now_ms()),
        Some(Ok(_))
    ));
    let mut g = c.benchmark_group("ratelimit");
    g.bench_function("unset", |b| {
        b.iter(|| black_box(limiter.try_admit_at(black_box(&unset), 0)))
    });
    g.bench_function("limited", |b| {
        b.iter(|| black_box(limiter.try_admit_at(black_box(&limited), now_ms())))
    });
    g.finish();

    // Contended: 4 threads on one key, ns per admission.
    let limiter = Arc::new(limiter);
    let per_thread = 2_000_000u64;
    let t0 = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let l = limiter.clone();
            let p = limited.clone();
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    black_box(l.try_admit_at(&p, now_ms()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ns = t0.elapsed().as_nanos() as f64 / (4 * per_thread) as f64;
    println!("ratelimit/limited_4_threads: {ns:.1} ns per admission (wall / total)");
}
