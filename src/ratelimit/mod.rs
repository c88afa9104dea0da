//! Per-key rate limits held across every keygate sharing the store
//! (contract §11).
//!
//! # How a request is judged (hot path: atomics only)
//!
//! Each limited key has a [`KeyLimiter`] with two window slots (the current
//! window and the next, by parity of the window number; windows are aligned
//! to UTC seconds, minutes or hours). A slot holds `cap`, how many requests
//! this instance may let through in that window, and `used`. A request takes
//! one unit with a compare-and-swap of `used` below `cap`: no lock, no store
//! call. `cap` is what this instance has *reserved* in the store for the
//! window ([`coord`] reserves slices of the key's budget, at most one round
//! trip per key every 100 ms, prefetching the next window near the end of
//! the current one). Reservations are atomic in the store and never exceed
//! N in total, so with the store reachable every instance together lets
//! through at most N per window.
//!
//! A request that finds the slot's reservation used up:
//! - is refused (429) at once when the window's known total has reached N;
//! - otherwise waits for the coordinator's next round for this key (bounded:
//!   100 ms + `store.timeout` + 50 ms), which reserves a new slice sized to
//!   the demand; still nothing → 429.
//!
//! With the store unreachable (a failed round), slots switch to *local*
//! mode: `cap` = N, this instance enforcing the limit alone. When the store
//! answers again, what was let through meanwhile is added to the window's
//! counter unconditionally and reservations resume.

pub mod coord;

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tokio::sync::Notify;

use crate::auth::token::KeyHash;
use crate::auth::Principal;
use crate::config::RateLimit;

/// Minimum spacing of two store round trips for one key on one instance.
pub const SYNC_SPACING: Duration = Duration::from_millis(100);

const ROLLING: u64 = u64::MAX;

pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Milliseconds since the Unix epoch (UTC).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The window `now_ms` falls in: its number (start / length) for a window
/// of `unit_ms`.
#[inline]
pub fn window_of(now_ms: u64, unit_ms: u64) -> u64 {
    now_ms / unit_ms
}

/// Whole seconds from `now_ms` to the end of window `w`, rounded up, at
/// least 1 (`Retry-After`, `RateLimit-Reset`).
#[inline]
pub fn seconds_to_end(now_ms: u64, w: u64, unit_ms: u64) -> u64 {
    let end = (w + 1) * unit_ms;
    end.saturating_sub(now_ms).div_ceil(1000).max(1)
}

/// The `RateLimit-*` values of one response of a limited key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds to the window's end (rounded up, ≥ 1).
    pub reset: u64,
    /// The request was refused: the answer also carries `Retry-After`.
    pub refused: bool,
}

impl RateHeaders {
    /// Set (never append) the headers on a response.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(self.limit));
        h.insert(
            RATELIMIT_REMAINING.clone(),
            HeaderValue::from(self.remaining),
        );
        h.insert(RATELIMIT_RESET.clone(), HeaderValue::from(self.reset));
        if self.refused {
            h.insert(RETRY_AFTER, HeaderValue::from(self.reset));
        }
    }
}

/// Identity hasher for [`KeyHash`] (already a SHA-256): its first 8 bytes.
#[derive(Default)]
pub struct HashPrefix(u64);

impl Hasher for HashPrefix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[..8]);
            self.0 = u64::from_le_bytes(b);
        } else {
            for &x in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(x);
            }
        }
    }
    // The slice's length prefix: ignored.
    fn write_usize(&mut self, _: usize) {}
}

/// One window of one key on this instance.
pub(crate) struct Window {
    /// Window number; `ROLLING` while being reset.
    id: AtomicU64,
    /// Requests this instance may let through: `granted`, or N in local mode.
    cap: AtomicU64,
    used: AtomicU64,
    /// Reserved for this instance in the store (written by the coordinator).
    granted: AtomicU64,
    /// Other instances' reservations, as of the last round.
    others: AtomicU64,
    /// `used` when the last round was sent.
    synced_used: AtomicU64,
    /// The store did not answer: this instance enforces N alone.
    local: AtomicBool,
    /// The store said the window's budget is all reserved.
    exhausted: AtomicBool,
}

impl Window {
    fn new() -> Window {
        Window {
            id: AtomicU64::new(ROLLING - 1),
            cap: AtomicU64::new(0),
            used: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            others: AtomicU64::new(0),
            synced_used: AtomicU64::new(0),
            local: AtomicBool::new(false),
            exhausted: AtomicBool::new(false),
        }
    }

    /// Take one unit below `cap`; the new `used`.
    #[inline]
    fn take(&self) -> Option<u64> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used >= self.cap.load(Ordering::Acquire) {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(used + 1),
                Err(u) => used = u,
            }
        }
    }
}

/// One limited key on this instance.
pub(crate) struct KeyLimiter {
    id: Box<str>,
    limit: u64,
    unit_ms: u64,
    slots: [Window; 2],
    roll: Mutex<()>,
    /// Woken after every coordination round for this key.
    synced: Notify,
    /// Requests waiting for a reservation.
    demand: AtomicU64,
    /// When the last round for this key was sent (ms), 0 = never.
    last_sync_ms: AtomicU64,
    /// Requests let through in the last round's interval (for slice sizes).
    rate: AtomicU64,
}

impl KeyLimiter {
    fn new(id: &str, limit: RateLimit) -> KeyLimiter {
        KeyLimiter {
            id: id.into(),
            limit: u64::from(limit.limit.get()),
            unit_ms: limit.per.seconds() * 1000,
            slots: [Window::new(), Window::new()],
            roll: Mutex::new(()),
            synced: Notify::new(),
            demand: AtomicU64::new(0),
            last_sync_ms: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    /// The slot of window `w`, reset for it if it still holds an older one.
    #[inline]
    fn window(&self, w: u64, local: bool) -> &Window {
        let slot = &self.slots[(w & 1) as usize];
        let id = slot.id.load(Ordering::Acquire);
        if id != w {
            self.roll(slot, w, local);
        }
        slot
    }

    #[cold]
    fn roll(&self, slot: &Window, w: u64, local: bool) {
        let _g = self.roll.lock().unwrap_or_else(|e| e.into_inner());
        let id = slot.id.load(Ordering::Acquire);
        // Already this window, or a later one (a request that stalled past
        // a whole window counts in the newer one).
        if id == w || (id != ROLLING && id != ROLLING - 1 && id > w) {
            return;
        }
        slot.id.store(ROLLING, Ordering::Release);
        slot.used.store(0, Ordering::Relaxed);
        slot.granted.store(0, Ordering::Relaxed);
        slot.others.store(0, Ordering::Relaxed);
        slot.synced_used.store(0, Ordering::Relaxed);
        slot.exhausted.store(false, Ordering::Relaxed);
        slot.local.store(local, Ordering::Relaxed);
        slot.cap
            .store(if local { self.limit } else { 0 }, Ordering::Release);
        slot.id.store(w, Ordering::Release);
    }

    fn headers(&self, slot: &Window, used: u64, now: u64, w: u64, refused: bool) -> RateHeaders {
        let others = slot.others.load(Ordering::Relaxed);
        RateHeaders {
            limit: self.limit,
            remaining: self.limit.saturating_sub(others.saturating_add(used)),
            reset: seconds_to_end(now, w, self.unit_ms),
            refused,
        }
    }
}

type LimiterRef<'a> = dashmap::mapref::one::Ref<'a, KeyHash, Arc<KeyLimiter>>;

/// What the fast path decided.
enum Fast {
    Allowed(RateHeaders),
    Refused(RateHeaders),
    /// Nothing reserved left, budget maybe left: wait for a round.
    Wait(u64),
}

/// Every limited key of this instance, and the coordinator's wake-up.
pub struct RateLimiter {
    keys: DashMap<KeyHash, Arc<KeyLimiter>, BuildHasherDefault<HashPrefix>>,
    /// The last coordination round reached the store (else new windows
    /// start in local mode).
    store_ok: AtomicBool,
    /// Wakes the coordinator when a request waits for a reservation.
    wake: Arc<Notify>,
    /// Longest wait for a reservation.
    max_wait: Duration,
}

impl RateLimiter {
    /// `store_timeout` bounds a coordination round, so a waiting request
    /// waits at most 100 ms + `store_timeout` + 50 ms.
    pub fn new(store_timeout: Duration) -> RateLimiter {
        RateLimiter {
            keys: DashMap::default(),
            store_ok: AtomicBool::new(true),
            wake: Arc::new(Notify::new()),
            max_wait: SYNC_SPACING + store_timeout + Duration::from_millis(50),
        }
    }

    /// Judge one request of `p` (after the scope check). `Ok(None)`: the key
    /// has no limit. `Ok(Some(h))`: let through, answer with `h`.
    /// `Err(h)`: refuse with 429 and `h` (incl. `Retry-After`).
    #[inline]
    pub async fn admit(&self, p: &Principal) -> Result<Option<RateHeaders>, RateHeaders> {
        let Some(limit) = p.rate_limit() else {
            return Ok(None);
        };
        // The map entry is borrowed for the synchronous part (no reference
        // count touched); only a request that must wait holds the key.
        let waiting = {
            let entry = self.entry(p, limit);
            let key: &KeyLimiter = &entry;
            let now = now_ms();
            let w = window_of(now, key.unit_ms);
            match self.fast(key, now, w) {
                Fast::Allowed(h) => return Ok(Some(h)),
                Fast::Refused(h) => return Err(h),
                Fast::Wait(w) => (Arc::clone(&entry), w),
            }
        };
        let (key, w) = waiting;
        let slot = &key.slots[(w & 1) as usize];
        self.wait(&key, slot, w).await.map(Some)
    }

    /// The `RateLimit-*` values for a limited key's request refused after
    /// the key was checked but before its limit (§8's 403): what the key
    /// has left in the window, nothing taken, no `Retry-After`. `None`: the
    /// key has no limit.
    pub fn peek(&self, p: &Principal) -> Option<RateHeaders> {
        let limit = p.rate_limit()?;
        let n = u64::from(limit.limit.get());
        let unit_ms = limit.per.seconds() * 1000;
        let now = now_ms();
        let w = window_of(now, unit_ms);
        let (used, others) = match self.keys.get(p.hash()) {
            Some(k) => {
                let slot = &k.slots[(w & 1) as usize];
                if slot.id.load(Ordering::Acquire) == w {
                    (
                        slot.used.load(Ordering::Relaxed),
                        slot.others.load(Ordering::Relaxed),
                    )
                } else {
                    (0, 0)
                }
            }
            None => (0, 0),
        };
        Some(RateHeaders {
            limit: n,
            remaining: n.saturating_sub(others.saturating_add(used)),
            reset: seconds_to_end(now, w, unit_ms),
            refused: false,
        })
    }

    /// The synchronous part of [`admit`](Self::admit) at `now` (ms): `None`
    /// when the request would have to wait for a reservation (benchmarks,
    /// unit tests).
    #[doc(hidden)]
    pub fn try_admit_at(
        &self,
        p: &Principal,
        now: u64,
    ) -> Option<Result<RateHeaders, RateHeaders>> {
        let limit = p.rate_limit()?;
        let entry = self.entry(p, limit);
        let w = window_of(now, entry.unit_ms);
        match self.fast(&entry, now, w) {
            Fast::Allowed(h) => Some(Ok(h)),
            Fast::Refused(h) => Some(Err(h)),
            Fast::Wait(..) => None,
        }
    }

    /// The key's limiter, borrowed from the map (a shard read lock, held
    /// only while the caller judges synchronously).
    #[inline]
    fn entry(&self, p: &Principal, limit: RateLimit) -> LimiterRef<'_> {
        if let Some(k) = self.keys.get(p.hash()) {
            return k;
        }
        self.keys
            .entry(*p.hash())
            .or_insert_with(|| Arc::new(KeyLimiter::new(p.key_id(), limit)))
            .downgrade()
    }

    #[inline]
    fn fast(&self, key: &KeyLimiter, now: u64, w: u64) -> Fast {
        let slot = key.window(w, !self.store_ok.load(Ordering::Relaxed));
        if let Some(used) = slot.take() {
            return Fast::Allowed(key.headers(slot, used, now, w, false));
        }
        let used = slot.used.load(Ordering::Relaxed);
        let others = slot.others.load(Ordering::Relaxed);
        if slot.local.load(Ordering::Acquire)
            || slot.exhausted.load(Ordering::Acquire)
            || others.saturating_add(used) >= key.limit
        {
            return Fast::Refused(key.headers(slot, used, now, w, true));
        }
        Fast::Wait(w)
    }

    #[cold]
    async fn wait(
        &self,
        key: &KeyLimiter,
        slot: &Window,
        w: u64,
    ) -> Result<RateHeaders, RateHeaders> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        key.demand.fetch_add(1, Ordering::AcqRel);
        let _undo = Undo(&key.demand);
        loop {
            let synced = key.synced.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            self.wake.notify_one();
            let now = now_ms();
            if window_of(now, key.unit_ms) != w {
                // A new window began while waiting: judge it there.
                let w = window_of(now, key.unit_ms);
                return match self.fast(key, now, w) {
                    Fast::Allowed(h) => Ok(h),
                    Fast::Refused(h) => Err(h),
                    Fast::Wait(..) => Err(key.headers(key.window(w, false), 0, now, w, true)),
                };
            }
            if let Some(used) = slot.take() {
                return Ok(key.headers(slot, used, now, w, false));
            }
            let used = slot.used.load(Ordering::Relaxed);
            let refused = slot.local.load(Ordering::Acquire)
                || slot.exhausted.load(Ordering::Acquire)
                || slot.others.load(Ordering::Relaxed).saturating_add(used) >= key.limit;
            if refused || tokio::time::timeout_at(deadline, synced).await.is_err() {
                let now = now_ms();
                let used = slot.used.load(Ordering::Relaxed);
                return Err(key.headers(slot, used, now, w, true));
            }
        }
    }

    /// Benchmarks: start new windows in local mode (as after a failed round),
    /// so the hot path runs without a store.
    #[doc(hidden)]
    pub fn assume_store_down(&self) {
        self.store_ok.store(false, Ordering::Relaxed);
    }

    /// Limited keys currently tracked (tests, metrics).
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }

    /// Whether the last coordination round reached the store.
    pub fn store_ok(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }
}

/// A proof for benchmarks: key `id` with `limit`.
#[doc(hidden)]
pub fn bench_principal(id: &str, limit: Option<RateLimit>) -> Principal {
    let record = crate::auth::store::KeyRecord {
        id: id.into(),
        prefix: "bench".into(),
        name: None,
        created_by: String::new(),
        created_at: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
        role: crate::auth::scope::Role::Admin,
        workspaces: Vec::new(),
        rate_limit: limit,
    };
    let mut h = [7u8; 32];
    h[..id.len().min(32)].copy_from_slice(&id.as_bytes()[..id.len().min(32)]);
    Principal::of(KeyHash(h), &record)
}

struct Undo<'a>(&'a AtomicU64);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
