//! The coordination task (contract §11): every 20 ms it looks at the keys
//! with traffic or waiting requests whose last round is at least 100 ms old,
//! and sends ONE store call for all of them ([`Store::rate_sync`], one Lua
//! script on Redis): per key, what it let through without a reservation,
//! and how much more it wants to reserve of what is left of N. The store
//! grants at most what is left, so reservations never add up past N.
//!
//! Slice sizes ([`slice`]): enough for the demand and twice the last
//! interval's traffic, at least a quarter of what is left. Near a window's
//! end a key with traffic also reserves a slice of the next window, so its
//! requests do not wait at the window start.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{now_ms, window_of, KeyLimiter, RateLimiter, SYNC_SPACING};
use crate::auth::store::{RateSync, Store};
use crate::metrics::Metrics;

/// How often the task looks for due keys.
pub const TICK: Duration = Duration::from_millis(20);
/// Counters outlive their window by this much (clock skew between instances).
const TTL_MARGIN_MS: u64 = 10_000;
/// Idle keys (no traffic in the current or previous window) are dropped
/// this often.
const EVICT_EVERY_MS: u64 = 5_000;

/// How many more to ask for: `left` = what the store may still have,
/// `unused` = reserved here and not yet used, `rate` = let through in the
/// last interval, `demand` = requests waiting.
pub fn slice(left: u64, unused: u64, rate: u64, demand: u64) -> u64 {
    let target = (demand + 2 * rate).max(left.div_ceil(4)).max(1);
    target.saturating_sub(unused).min(left)
}

struct Item {
    key: Arc<KeyLimiter>,
    window: u64,
    add: u64,
}

/// Start the task; it ends when the limiter is dropped.
pub fn spawn(limiter: &Arc<RateLimiter>, store: Store, metrics: Arc<Metrics>) {
    let weak = Arc::downgrade(limiter);
    tokio::spawn(run(weak, store, metrics));
}

async fn run(weak: Weak<RateLimiter>, store: Store, metrics: Arc<Metrics>) {
    let mut last_evict = now_ms();
    loop {
        {
            let Some(l) = weak.upgrade() else { return };
            let wake = l.wake.clone();
            drop(l);
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let _ = tokio::time::timeout(TICK, woken).await;
        }
        let Some(l) = weak.upgrade() else { return };
        let now = now_ms();
        round(&l, &store, &metrics, now).await;
        if now.saturating_sub(last_evict) >= EVICT_EVERY_MS {
            last_evict = now;
            evict(&l, now);
        }
    }
}

/// One coordination round at `now` (ms): plan, one store call, apply.
pub async fn round(l: &RateLimiter, store: &Store, metrics: &Metrics, now: u64) {
    let (items, syncs) = plan(l, now);
    if items.is_empty() {
        return;
    }
    metrics.ratelimit_syncs.inc();
    match store.rate_sync(&syncs).await {
        Ok(grants) => {
            l.store_ok.store(true, Ordering::Relaxed);
            for (item, (sync, grant)) in items.iter().zip(syncs.iter().zip(grants)) {
                let k = &item.key;
                let slot = &k.slots[(item.window & 1) as usize];
                if slot.id.load(Ordering::Acquire) != item.window {
                    continue;
                }
                let _g = k.roll.lock().unwrap_or_else(|e| e.into_inner());
                let granted = slot
                    .granted
                    .fetch_add(item.add + grant.granted, Ordering::AcqRel)
                    + item.add
                    + grant.granted;
                slot.others
                    .store(grant.total.saturating_sub(granted), Ordering::Relaxed);
                if grant.total >= sync.limit {
                    slot.exhausted.store(true, Ordering::Release);
                }
                slot.local.store(false, Ordering::Release);
                slot.cap.store(granted, Ordering::Release);
            }
        }
        Err(err) => {
            if l.store_ok.swap(false, Ordering::Relaxed) {
                tracing::warn!(error = %err, "rate limit store call failed; each instance enforces the limits alone until it answers");
            }
            metrics.ratelimit_store_errors.inc();
            for item in &items {
                let k = &item.key;
                let slot = &k.slots[(item.window & 1) as usize];
                let _g = k.roll.lock().unwrap_or_else(|e| e.into_inner());
                if slot.id.load(Ordering::Acquire) == item.window {
                    slot.local.store(true, Ordering::Release);
                    slot.cap.store(k.limit, Ordering::Release);
                }
            }
        }
    }
    for item in &items {
        item.key.synced.notify_waiters();
    }
}

fn plan(l: &RateLimiter, now: u64) -> (Vec<Item>, Vec<RateSync>) {
    let local = !l.store_ok.load(Ordering::Relaxed);
    let spacing = SYNC_SPACING.as_millis() as u64;
    let mut items = Vec::new();
    let mut syncs = Vec::new();
    for entry in l.keys.iter() {
        let k = entry.value();
        let last = k.last_sync_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + spacing {
            continue;
        }
        let w = window_of(now, k.unit_ms);
        let slot = k.window(w, local);
        let used = slot.used.load(Ordering::Acquire);
        let granted = slot.granted.load(Ordering::Acquire);
        let synced = slot.synced_used.load(Ordering::Relaxed);
        let demand = k.demand.load(Ordering::Acquire);
        let exhausted = slot.exhausted.load(Ordering::Acquire);
        let add = used.saturating_sub(granted);
        let rate = used.saturating_sub(synced);
        let end = (w + 1) * k.unit_ms;
        let ttl = |w: u64| (w + 1) * k.unit_ms - now + TTL_MARGIN_MS;
        let mut any = false;
        if (rate > 0 || demand > 0 || add > 0) && !(exhausted && add == 0) {
            let known = slot.others.load(Ordering::Relaxed) + granted + add;
            let left = k.limit.saturating_sub(known);
            let ask = if exhausted {
                0
            } else {
                slice(left, granted.saturating_sub(used), rate, demand)
            };
            if ask > 0 || add > 0 {
                items.push(Item {
                    key: k.clone(),
                    window: w,
                    add,
                });
                syncs.push(RateSync {
                    key_id: k.id.to_string(),
                    window_start_s: w * k.unit_ms / 1000,
                    limit: k.limit,
                    add,
                    ask,
                    ttl_ms: ttl(w),
                });
                any = true;
            }
        }
        // Near the end of a window with traffic: a slice of the next one.
        if used > 0 && end - now <= spacing + 2 * TICK.as_millis() as u64 {
            let next = k.window(w + 1, local);
            let have = next.granted.load(Ordering::Acquire) > 0
                || next.exhausted.load(Ordering::Acquire)
                || next.local.load(Ordering::Acquire);
            if !have {
                items.push(Item {
                    key: k.clone(),
                    window: w + 1,
                    add: 0,
                });
                syncs.push(RateSync {
                    key_id: k.id.to_string(),
                    window_start_s: (w + 1) * k.unit_ms / 1000,
                    limit: k.limit,
                    add: 0,
                    ask: slice(k.limit, 0, rate.max(k.rate.load(Ordering::Relaxed)), 0)
                        .min(k.limit.div_ceil(2)),
                    ttl_ms: ttl(w + 1),
                });
                any = true;
            }
        }
        if any {
            k.last_sync_ms.store(now.max(1), Ordering::Relaxed);
            slot.synced_used.store(used, Ordering::Relaxed);
            k.rate.store(rate, Ordering::Relaxed);
        }
    }
    (items, syncs)
}

/// Drop keys with no traffic in the current or previous window.
fn evict(l: &RateLimiter, now: u64) {
    l.keys.retain(|_, k| {
        let w = window_of(now, k.unit_ms);
        let recent = k.slots.iter().any(|s| {
            let id = s.id.load(Ordering::Acquire);
            id != super::ROLLING - 1
                && id.saturating_add(1) >= w
                && s.used.load(Ordering::Relaxed) > 0
        });
        recent || k.demand.load(Ordering::Acquire) > 0 || Arc::strong_count(k) > 1
    });
}
