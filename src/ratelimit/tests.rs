use std::num::NonZeroU32;

use super::coord::{round, slice};
use super::*;
use crate::auth::scope::Role;
use crate::auth::store::{KeyRecord, Store};
use crate::config::RateUnit;
use crate::metrics::Metrics;

fn principal(id: &str, limit: Option<(u32, RateUnit)>) -> Principal {
    let record = KeyRecord {
        id: id.into(),
        prefix: "kg_test".into(),
        name: None,
        created_by: String::new(),
        created_at: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
        role: Role::Admin,
        workspaces: Vec::new(),
        rate_limit: limit.map(|(n, per)| RateLimit {
            limit: NonZeroU32::new(n).unwrap(),
            per,
        }),
    };
    let mut h = [0u8; 32];
    for (i, b) in id.bytes().enumerate() {
        h[i % 32] ^= b;
    }
    Principal::of(KeyHash(h), &record)
}

#[test]
fn windows_align_to_utc_units() {
    // 2026-12-04T13:00:59.999Z and the next millisecond.
    let t = 1_796_389_259_999u64;
    assert_eq!(window_of(t, 1000), t / 1000);
    assert_eq!(window_of(t + 1, 1000), t / 1000 + 1);
    assert_eq!(window_of(t, 60_000) * 60_000, 1_796_389_200_000);
    assert_eq!(window_of(t + 1, 60_000) * 60_000, 1_796_389_260_000);
    assert_eq!((window_of(t, 3_600_000) * 3_600_000) % 3_600_000, 0);
}

#[test]
fn seconds_to_end_round_up_and_are_at_least_one() {
    let cases: &[(u64, u64, u64)] = &[
        // (ms into a 1 s window, unit ms, expected)
        (0, 1000, 1),
        (1, 1000, 1),
        (999, 1000, 1),
        (0, 60_000, 60),
        (1, 60_000, 60),
        (59_000, 60_000, 1),
        (59_001, 60_000, 1),
        (58_999, 60_000, 2),
        (30_500, 60_000, 30),
        (1, 3_600_000, 3600),
    ];
    for &(into, unit, want) in cases {
        let w = 12345;
        assert_eq!(
            seconds_to_end(w * unit + into, w, unit),
            want,
            "{into} into {unit}"
        );
    }
}

#[test]
fn headers_are_set_never_appended() {
    let mut h = HeaderMap::new();
    h.append("ratelimit-limit", HeaderValue::from_static("999"));
    RateHeaders {
        limit: 5,
        remaining: 0,
        reset: 1,
        refused: true,
    }
    .apply(&mut h);
    assert_eq!(h.get_all("ratelimit-limit").iter().count(), 1);
    assert_eq!(h["ratelimit-limit"], "5");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert_eq!(h["ratelimit-reset"], "1");
    assert_eq!(h["retry-after"], "1");
    let mut h = HeaderMap::new();
    RateHeaders {
        limit: 5,
        remaining: 4,
        reset: 1,
        refused: false,
    }
    .apply(&mut h);
    assert!(h.get("retry-after").is_none());
}

#[test]
fn slices() {
    // (left, unused, rate, demand) -> ask
    type Case = ((u64, u64, u64, u64), u64);
    let cases: &[Case] = &[
        ((5, 0, 0, 1), 2),
        ((40, 0, 0, 1), 10),
        ((40, 10, 0, 1), 0),
        ((1000, 0, 400, 0), 800),
        ((100, 0, 400, 0), 100),
        ((0, 0, 10, 10), 0),
        ((1, 0, 0, 0), 1),
    ];
    for &((left, unused, rate, demand), want) in cases {
        assert_eq!(
            slice(left, unused, rate, demand),
            want,
            "{left} {unused} {rate} {demand}"
        );
    }
}

#[test]
fn unlimited_keys_are_not_tracked() {
    let l = RateLimiter::new(Duration::from_millis(250));
    assert_eq!(l.try_admit_at(&principal("k0", None), now_ms()), None);
    assert_eq!(l.tracked_keys(), 0);
}

/// One instance on the memory store: N let through in a window (after the
/// first round), then 429 with the headers, then the next window works.
#[tokio::test]
async fn one_instance_lets_n_through_per_window() {
    let store = Store::memory("acme");
    let metrics = Metrics::new();
    let l = RateLimiter::new(Duration::from_millis(250));
    let p = principal("k1", Some((5, RateUnit::Minute)));
    let t0 = 1_796_389_200_000u64 + 1_000; // 1 s into a minute
                                           // Nothing reserved yet: the request would wait.
    assert_eq!(l.try_admit_at(&p, t0), None);
    let mut through = Vec::new();
    let mut now = t0;
    for _ in 0..50 {
        // Demand as a waiting request would register it.
        l.keys
            .get(p.hash())
            .unwrap()
            .demand
            .store(1, Ordering::Relaxed);
        round(&l, &store, &metrics, now).await;
        l.keys
            .get(p.hash())
            .unwrap()
            .demand
            .store(0, Ordering::Relaxed);
        while let Some(Ok(h)) = l.try_admit_at(&p, now) {
            through.push(h);
        }
        now += 100;
    }
    assert_eq!(through.len(), 5);
    let remaining: Vec<u64> = through.iter().map(|h| h.remaining).collect();
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    assert!(through.iter().all(|h| h.limit == 5 && !h.refused));
    let refused = l.try_admit_at(&p, now).unwrap().unwrap_err();
    assert!(refused.refused);
    assert_eq!(refused.remaining, 0);
    assert_eq!(
        refused.reset,
        seconds_to_end(now, window_of(now, 60_000), 60_000)
    );
    // Next minute: a fresh budget.
    let next = 1_796_389_260_000u64 + 10;
    l.keys
        .get(p.hash())
        .unwrap()
        .demand
        .store(1, Ordering::Relaxed);
    round(&l, &store, &metrics, next).await;
    assert!(matches!(l.try_admit_at(&p, next), Some(Ok(_))));
}

/// Two instances on one store never reserve more than N together.
#[tokio::test]
async fn two_instances_share_one_budget() {
    let store = Store::memory("acme");
    let metrics = Metrics::new();
    let a = RateLimiter::new(Duration::from_millis(250));
    let b = RateLimiter::new(Duration::from_millis(250));
    let p = principal("k2", Some((40, RateUnit::Minute)));
    let mut now = 1_796_389_200_000u64 + 500;
    let mut through = 0;
    for _ in 0..100 {
        for l in [&a, &b] {
            let _ = l.try_admit_at(&p, now);
            l.keys
                .get(p.hash())
                .unwrap()
                .demand
                .store(3, Ordering::Relaxed);
            round(l, &store, &metrics, now).await;
            while let Some(Ok(_)) = l.try_admit_at(&p, now) {
                through += 1;
            }
        }
        now += 100;
    }
    assert_eq!(through, 40);
}

/// With the store failing, a window starts in local mode: N alone.
#[tokio::test]
async fn store_down_enforces_n_locally() {
    let metrics = Metrics::new();
    // A Redis target nobody listens on (port 1): every round fails.
    let cfg = crate::config::StoreConfig {
        backend: crate::config::StoreBackend::Redis(crate::config::RedisTarget::Url(
            crate::config::Secret::new("redis://127.0.0.1:1"),
        )),
        timeout: Duration::from_millis(100),
    };
    let store = Store::from_config(&cfg, "acme").unwrap();
    let l = RateLimiter::new(Duration::from_millis(100));
    let p = principal("k3", Some((3, RateUnit::Minute)));
    let now = 1_796_389_200_000u64 + 500;
    let _ = l.try_admit_at(&p, now);
    l.keys
        .get(p.hash())
        .unwrap()
        .demand
        .store(1, Ordering::Relaxed);
    round(&l, &store, &metrics, now).await;
    assert!(!l.store_ok());
    assert_eq!(metrics.ratelimit_store_errors.get(), 1);
    let mut through = 0;
    while let Some(Ok(_)) = l.try_admit_at(&p, now) {
        through += 1;
    }
    assert_eq!(through, 3);
    assert!(matches!(l.try_admit_at(&p, now), Some(Err(_))));
}
