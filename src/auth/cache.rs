//! Local key cache: what lets a cache hit cost one SHA-256 and one DashMap
//! shard read, while a revocation still takes effect on the very next request.
//!
//! # Entries
//!
//! Keyed by [`KeyHash`] (SHA-256 of the token; the token itself is never kept).
//! A positive [`Entry`] holds the [`Principal`], the key's expiry as a
//! monotonic deadline, the time of its last successful check against the
//! store, the feed epoch of that check, and when `last_used_at` was last
//! queued. An entry answers a request only when
//!
//! * its expiry has not passed (else the request gets 401 and the entry is
//!   dropped);
//! * it was checked in the **current feed epoch**, and
//! * it was checked within `auth.cache_ttl` while the feed is live, or within
//!   [`FEED_DOWN_REUSE`] (1 s) while it is down.
//!
//! Otherwise it is *stale*: the caller re-checks the store, and may still use
//! the stale entry under `on_store_unavailable = "serve_cached"` (see
//! [`Cache::stale`]).
//!
//! # Revocation: generation and epoch
//!
//! * The **generation** is bumped by every revocation (served here, or learned
//!   from the feed). A store look-up takes the generation *before* it reads
//!   the store and inserts its result only if the generation is unchanged.
//!   The check happens under the shard write lock of the insert, and a
//!   revocation bumps the generation *before* removing the entry (which takes
//!   the same lock), so either the removal comes after the insert and deletes
//!   it, or the insert sees the new generation and is skipped: a look-up that
//!   raced a revocation can never leave the revoked key in the cache.
//! * The **epoch** counts feed state changes. `Lost` bumps it (entries from
//!   before the loss must be re-checked: revocations may be missed), and so
//!   does `Connected` (entries checked while the feed was down are re-checked
//!   once more, since the revocations of the gap were never delivered).
//!   Epoch and liveness share one atomic word, read once per request.
//!
//! # Bounds
//!
//! Positive entries: at most `auth.cache_capacity` (plus the handful of
//! concurrent inserts in flight); when full, stale entries are evicted first,
//! else arbitrary ones. Negative entries (well-formed tokens the store does
//! not know, or revoked/expired ones): TTL `auth.negative_ttl`, at most
//! `negative_capacity`; when full, expired ones are swept (at most once a
//! second) and otherwise nothing is inserted. The bound on store calls is in
//! `auth::Authenticator` (single-flight + a concurrency cap).

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tokio::sync::OnceCell;

use super::principal::Principal;
use super::refusal::Refused;
use super::token::KeyHash;

/// While the revocation feed is down, an entry checked in the current epoch
/// answers for at most this long before it is re-checked against the store:
/// a revocation served by another keygate during an outage of the feed is
/// honoured here within this bound (plus one store round-trip).
pub const FEED_DOWN_REUSE: Duration = Duration::from_secs(1);

/// `last_used_at` is queued for the store at most once per key per interval.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);

/// Default bound on the negative cache.
pub const NEGATIVE_CAPACITY: usize = 10_000;

const NEVER: u64 = u64::MAX;

/// Monotonic milliseconds since the cache was created (one `Instant::now()`).
struct Clock {
    base: Instant,
    /// Added to the real clock; only tests move it.
    skew_ms: AtomicU64,
}

impl Clock {
    /// The wall clock, moved by the same test skew as [`Clock::now_ms`].
    fn wall_now(&self) -> chrono::DateTime<chrono::Utc> {
        let skew = self.skew_ms.load(Ordering::Relaxed);
        chrono::Utc::now() + chrono::Duration::milliseconds(i64::try_from(skew).unwrap_or(0))
    }

    #[inline]
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + self.skew_ms.load(Ordering::Relaxed)
    }
}

struct Entry {
    principal: Principal,
    /// Monotonic deadline of `expires_at`; [`NEVER`] for a key without expiry.
    expires_ms: u64,
    /// The key's `expires_at` (wall clock): the exact check near the deadline.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Last successful check against the store (taken before the read).
    checked_ms: u64,
    /// Feed epoch of that check.
    epoch: u64,
    /// When `last_used_at` was last queued; [`NEVER`] = not yet.
    touched_ms: AtomicU64,
}

/// State of the cache as a store look-up starts; its result is inserted
/// against this snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub now_ms: u64,
    pub generation: u64,
    epoch: u64,
}

/// What the cache says about a hash.
#[derive(Debug)]
pub enum Probe {
    /// Usable entry. `touch`: `last_used_at` is due for this key.
    Hit { principal: Principal, touch: bool },
    /// The key's `expires_at` has passed (entry dropped).
    Expired { key_id: std::sync::Arc<str> },
    /// Recently found unknown, revoked or expired in the store (and why).
    Negative(Refused),
    /// Ask the store. `known`: a (stale) positive entry exists.
    Miss { known: bool },
}

pub struct Cache {
    clock: Clock,
    ttl_ms: u64,
    feed_down_ms: u64,
    capacity: usize,
    negative_ttl_ms: u64,
    negative_capacity: usize,
    entries: DashMap<KeyHash, Entry>,
    size: AtomicUsize,
    negative: DashMap<KeyHash, (u64, Refused)>,
    last_sweep_ms: AtomicU64,
    generation: AtomicU64,
    /// `epoch << 1 | feed_live`.
    feed: AtomicU64,
}

/// A key's expiry as seen by one store check: time left (from the check's
/// snapshot) and the wall-clock `expires_at`.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub left: Duration,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Expiry {
    /// `left` from now (tests).
    pub fn after(left: Duration) -> Expiry {
        Expiry {
            left,
            at: chrono::Utc::now() + chrono::Duration::from_std(left).unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Cache {
    pub fn new(
        ttl: Duration,
        capacity: usize,
        negative_ttl: Duration,
        negative_capacity: usize,
    ) -> Cache {
        Cache {
            clock: Clock {
                base: Instant::now(),
                skew_ms: AtomicU64::new(0),
            },
            ttl_ms: ms(ttl),
            feed_down_ms: ms(ttl.min(FEED_DOWN_REUSE)),
            capacity: capacity.max(1),
            negative_ttl_ms: ms(negative_ttl),
            negative_capacity,
            entries: DashMap::new(),
            size: AtomicUsize::new(0),
            negative: DashMap::new(),
            last_sweep_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            feed: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The hot path: one shard read lock, no allocation, no await.
    pub fn probe(&self, hash: &KeyHash, now_ms: u64) -> Probe {
        if let Some(e) = self.entries.get(hash) {
            // Near the monotonic deadline (ms granularity), decide by the wall
            // clock: refused from `expires_at` on, never before.
            let expired = now_ms.saturating_add(2) >= e.expires_ms
                && e.expires_at.is_none_or(|t| self.clock.wall_now() >= t);
            if expired {
                let key_id = std::sync::Arc::from(e.principal.key_id());
                drop(e);
                self.remove(hash);
                return Probe::Expired { key_id };
            }
            let feed = self.feed.load(Ordering::Acquire);
            let max_age = if feed & 1 == 1 {
                self.ttl_ms
            } else {
                self.feed_down_ms
            };
            if e.epoch == feed >> 1 && now_ms.saturating_sub(e.checked_ms) < max_age {
                let touch = touch_due(&e.touched_ms, now_ms);
                return Probe::Hit {
                    principal: e.principal.clone(),
                    touch,
                };
            }
            return Probe::Miss { known: true };
        }
        if let Some(n) = self.negative.get(hash) {
            if now_ms < n.0 {
                return Probe::Negative(n.1.clone());
            }
            drop(n);
            self.negative.remove_if(hash, |_, (exp, _)| now_ms >= *exp);
        }
        Probe::Miss { known: false }
    }

    /// Take before a store read; insert its result against it.
    pub fn snapshot(&self) -> Snapshot {
        // Generation first: an insert compares against it, so it must not be
        // newer than the store read that follows.
        let generation = self.generation.load(Ordering::SeqCst);
        Snapshot {
            now_ms: self.now_ms(),
            generation,
            epoch: self.feed.load(Ordering::Acquire) >> 1,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Insert the result of a successful store check that found the key live.
    /// `expires_in`: time left until `expires_at` (None: no expiry).
    /// Returns `None` when the insert was skipped because a revocation
    /// happened since `at` was taken, else `Some(touch_due)`.
    pub fn insert(
        &self,
        hash: KeyHash,
        principal: Principal,
        expiry: Option<Expiry>,
        at: Snapshot,
    ) -> Option<bool> {
        let expires_at = expiry.map(|e| e.at);
        let expires_ms = match expiry.map(|e| e.left) {
            // Rounded up: an entry may outlive `expires_at` by under 1 ms of
            // clock granularity (then the next check refuses it), never end early.
            Some(d) => at
                .now_ms
                .saturating_add(ms(d))
                .saturating_add(u64::from(d.subsec_nanos() % 1_000_000 != 0)),
            None => NEVER,
        };
        let fresh = |touched_ms| Entry {
            principal,
            expires_ms,
            expires_at,
            checked_ms: at.now_ms,
            epoch: at.epoch,
            touched_ms: AtomicU64::new(touched_ms),
        };
        self.make_room(at.now_ms);
        // The shard write lock is held from here to the end of the match.
        match self.entries.entry(hash) {
            MapEntry::Occupied(mut o) => {
                if self.generation.load(Ordering::SeqCst) != at.generation {
                    return None;
                }
                let previous = o.get().touched_ms.load(Ordering::Relaxed);
                let entry = fresh(previous);
                let touch = touch_due(&entry.touched_ms, at.now_ms);
                o.insert(entry);
                Some(touch)
            }
            MapEntry::Vacant(v) => {
                if self.generation.load(Ordering::SeqCst) != at.generation {
                    return None;
                }
                v.insert(fresh(at.now_ms));
                self.size.fetch_add(1, Ordering::Relaxed);
                Some(true)
            }
        }
    }

    /// Remember a well-formed token the store does not accept.
    pub fn insert_negative(&self, hash: KeyHash, now_ms: u64, refused: Refused) {
        if self.negative_ttl_ms == 0 || self.negative_capacity == 0 {
            return;
        }
        if self.negative.len() >= self.negative_capacity {
            let last = self.last_sweep_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 1000
                && self
                    .last_sweep_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.negative.retain(|_, (exp, _)| now_ms < *exp);
            }
            if self.negative.len() >= self.negative_capacity {
                return;
            }
        }
        self.negative
            .insert(hash, (now_ms.saturating_add(self.negative_ttl_ms), refused));
    }

    /// A newly minted key must not stay "unknown" here.
    pub fn forget_negative(&self, hash: &KeyHash) {
        self.negative.remove(hash);
    }

    /// Drop a positive entry (the store said revoked, expired or unknown).
    pub fn remove(&self, hash: &KeyHash) -> bool {
        if self.entries.remove(hash).is_some() {
            self.size.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// A revocation: bump the generation, then drop the entry (this order is
    /// what makes a concurrent look-up unable to re-insert it).
    pub fn revoke(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.remove(hash);
    }

    /// The revocation feed dropped: nothing from before may be trusted.
    pub fn feed_lost(&self) {
        self.set_feed(false);
    }

    /// The revocation feed (re)connected.
    pub fn feed_connected(&self) {
        self.set_feed(true);
    }

    fn set_feed(&self, live: bool) {
        let _ = self
            .feed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((((w >> 1) + 1) << 1) | u64::from(live))
            });
    }

    pub fn feed_live(&self) -> bool {
        self.feed.load(Ordering::Acquire) & 1 == 1
    }

    pub fn epoch(&self) -> u64 {
        self.feed.load(Ordering::Acquire) >> 1
    }

    /// For `serve_cached` while the store fails: the entry, if its last
    /// successful check is within `max_stale` and it has not expired.
    pub fn stale(&self, hash: &KeyHash, now_ms: u64, max_stale: Duration) -> Option<Principal> {
        let e = self.entries.get(hash)?;
        (now_ms < e.expires_ms && now_ms.saturating_sub(e.checked_ms) <= ms(max_stale))
            .then(|| e.principal.clone())
    }

    /// Positive entries.
    pub fn len(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn negative_len(&self) -> usize {
        self.negative.len()
    }

    /// Evict until there is room for one more entry: stale ones first.
    fn make_room(&self, now_ms: u64) {
        const SCAN: usize = 64;
        const BATCH: usize = 8;
        while self.len() >= self.capacity {
            let feed = self.feed.load(Ordering::Acquire);
            let mut stale = Vec::with_capacity(BATCH);
            let mut any = Vec::with_capacity(BATCH);
            for e in self.entries.iter().take(SCAN) {
                let old = e.epoch != feed >> 1
                    || now_ms.saturating_sub(e.checked_ms) >= self.ttl_ms
                    || now_ms >= e.expires_ms;
                if old && stale.len() < BATCH {
                    stale.push(*e.key());
                } else if any.len() < BATCH {
                    any.push(*e.key());
                }
                if stale.len() == BATCH {
                    break;
                }
            }
            let victims = if stale.is_empty() { any } else { stale };
            if victims.is_empty() {
                // Counter and map disagree (a concurrent remove): resync.
                self.size.store(self.entries.len(), Ordering::Relaxed);
                if self.entries.is_empty() {
                    return;
                }
                continue;
            }
            for v in &victims {
                self.remove(v);
            }
        }
    }

    #[cfg(test)]
    pub fn advance(&self, d: Duration) {
        self.clock.skew_ms.fetch_add(ms(d), Ordering::Relaxed);
    }
}

#[inline]
fn touch_due(touched_ms: &AtomicU64, now_ms: u64) -> bool {
    let last = touched_ms.load(Ordering::Relaxed);
    (last == NEVER || now_ms.saturating_sub(last) >= ms(TOUCH_INTERVAL))
        && touched_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Single-flight: concurrent look-ups of one hash share one store call.
///
/// A flight is tagged with the revocation generation at which it was created;
/// a request that arrives after a revocation does not join an older flight
/// (its answer may predate the revocation) but starts its own.
pub struct Flights<V> {
    map: DashMap<KeyHash, Arc<Flight<V>>, RandomState>,
}

struct Flight<V> {
    generation: u64,
    cell: OnceCell<V>,
}

impl<V: Clone> Flights<V> {
    pub fn new() -> Flights<V> {
        Flights {
            map: DashMap::new(),
        }
    }

    /// Run `fetch(generation)` once for all concurrent callers with the same
    /// `hash` (and no revocation in between). If the caller running it is
    /// cancelled, a waiting caller takes over.
    pub async fn run<F, Fut>(&self, hash: KeyHash, generation: u64, fetch: F) -> V
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = V>,
    {
        let flight = {
            let new = || {
                Arc::new(Flight {
                    generation,
                    cell: OnceCell::new(),
                })
            };
            match self.map.entry(hash) {
                MapEntry::Occupied(mut o) => {
                    if o.get().generation >= generation {
                        o.get().clone()
                    } else {
                        let f = new();
                        o.insert(f.clone());
                        f
                    }
                }
                MapEntry::Vacant(v) => {
                    let f = new();
                    v.insert(f.clone());
                    f
                }
            }
        };
        let _guard = FlightGuard {
            map: &self.map,
            hash,
            flight: &flight,
        };
        let g = flight.generation;
        flight.cell.get_or_init(|| fetch(g)).await.clone()
    }

    pub fn in_flight(&self) -> usize {
        self.map.len()
    }
}

impl<V: Clone> Default for Flights<V> {
    fn default() -> Self {
        Flights::new()
    }
}

/// Removes the flight from the map when its first caller is done (or
/// cancelled), so later requests start a fresh look-up.
struct FlightGuard<'a, V> {
    map: &'a DashMap<KeyHash, Arc<Flight<V>>, RandomState>,
    hash: KeyHash,
    flight: &'a Arc<Flight<V>>,
}

impl<V> Drop for FlightGuard<'_, V> {
    fn drop(&mut self) {
        self.map
            .remove_if(&self.hash, |_, f| Arc::ptr_eq(f, self.flight));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn h(n: u8) -> KeyHash {
        KeyHash([n; 32])
    }

    fn cache() -> Cache {
        let c = Cache::new(Duration::from_secs(60), 100, Duration::from_secs(5), 100);
        c.feed_connected();
        c
    }

    fn p(id: &str) -> Principal {
        Principal::new(id, "mok_abcdefgh")
    }

    fn poll_once<F: Future + ?Sized>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    fn is_hit(probe: Probe) -> bool {
        matches!(probe, Probe::Hit { .. })
    }

    #[test]
    fn hit_after_insert_then_stale_after_ttl() {
        let c = cache();
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: false }
        ));
        let at = c.snapshot();
        assert_eq!(c.insert(h(1), p("a"), None, at), Some(true));
        match c.probe(&h(1), c.now_ms()) {
            Probe::Hit { principal, touch } => {
                assert_eq!(principal.key_id(), "a");
                assert!(!touch, "touched on insert, not again within the interval");
            }
            other => panic!("{other:?}"),
        }
        c.advance(Duration::from_secs(61));
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: true }
        ));
    }

    #[test]
    fn touch_due_once_per_interval() {
        let c = cache();
        c.insert(h(1), p("a"), None, c.snapshot());
        c.advance(TOUCH_INTERVAL);
        // Re-check (ttl 60s passed too): the insert carries the touch time over.
        assert_eq!(c.insert(h(1), p("a"), None, c.snapshot()), Some(true));
        assert_eq!(c.insert(h(1), p("a"), None, c.snapshot()), Some(false));
        match c.probe(&h(1), c.now_ms()) {
            Probe::Hit { touch, .. } => assert!(!touch),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expired_entry_is_dropped() {
        let c = cache();
        c.insert(
            h(1),
            p("a"),
            Some(Expiry::after(Duration::from_secs(2))),
            c.snapshot(),
        );
        assert!(is_hit(c.probe(&h(1), c.now_ms())));
        c.advance(Duration::from_secs(2));
        assert!(matches!(c.probe(&h(1), c.now_ms()), Probe::Expired { .. }));
        assert_eq!(c.len(), 0);
        assert!(c
            .stale(&h(1), c.now_ms(), Duration::from_secs(30))
            .is_none());
    }

    #[test]
    fn revocation_during_lookup_prevents_insert() {
        let c = cache();
        // A look-up starts, a revocation (of any key) lands, the look-up ends.
        let at = c.snapshot();
        c.revoke(&h(1));
        assert_eq!(c.insert(h(1), p("a"), None, at), None);
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: false }
        ));
        // A look-up started after the revocation inserts normally.
        assert_eq!(c.insert(h(1), p("a"), None, c.snapshot()), Some(true));
        assert!(is_hit(c.probe(&h(1), c.now_ms())));
        // Over an existing (stale) entry too.
        let at = c.snapshot();
        c.revoke(&h(2));
        assert_eq!(c.insert(h(1), p("b"), None, at), None);
        match c.probe(&h(1), c.now_ms()) {
            Probe::Hit { principal, .. } => assert_eq!(principal.key_id(), "a"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revoke_removes_entry() {
        let c = cache();
        c.insert(h(1), p("a"), None, c.snapshot());
        c.revoke(&h(1));
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: false }
        ));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn feed_loss_and_reconnect_force_rechecks() {
        let c = cache();
        c.insert(h(1), p("a"), None, c.snapshot());
        c.feed_lost();
        assert!(!c.feed_live());
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: true }
        ));
        // Re-checked while the feed is down: usable for FEED_DOWN_REUSE only.
        c.insert(h(1), p("a"), None, c.snapshot());
        assert!(is_hit(c.probe(&h(1), c.now_ms())));
        c.advance(FEED_DOWN_REUSE);
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: true }
        ));
        c.insert(h(1), p("a"), None, c.snapshot());
        assert!(is_hit(c.probe(&h(1), c.now_ms())));
        // Reconnected: checked during the gap -> re-check once more.
        c.feed_connected();
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: true }
        ));
        c.insert(h(1), p("a"), None, c.snapshot());
        c.advance(Duration::from_secs(30));
        assert!(is_hit(c.probe(&h(1), c.now_ms())));
    }

    #[test]
    fn lookup_spanning_a_feed_loss_is_not_trusted() {
        let c = cache();
        let at = c.snapshot();
        c.feed_lost();
        c.feed_connected();
        assert_eq!(c.insert(h(1), p("a"), None, at), Some(true));
        assert!(matches!(
            c.probe(&h(1), c.now_ms()),
            Probe::Miss { known: true }
        ));
    }

    #[test]
    fn stale_entry_serves_within_max_stale_only() {
        let c = cache();
        c.insert(h(1), p("a"), None, c.snapshot());
        c.feed_lost();
        let max_stale = Duration::from_secs(30);
        assert!(c.stale(&h(1), c.now_ms(), max_stale).is_some());
        c.advance(Duration::from_secs(31));
        assert!(c.stale(&h(1), c.now_ms(), max_stale).is_none());
    }

    #[test]
    fn negative_cache_ttl_and_bound() {
        let c = Cache::new(Duration::from_secs(60), 100, Duration::from_secs(5), 3);
        let now = c.now_ms();
        for n in 0..10 {
            c.insert_negative(h(n), now, Refused::unknown());
        }
        assert_eq!(c.negative_len(), 3);
        assert!(matches!(c.probe(&h(0), now), Probe::Negative(_)));
        assert!(matches!(c.probe(&h(9), now), Probe::Miss { known: false }));
        c.advance(Duration::from_secs(5));
        let now = c.now_ms();
        assert!(matches!(c.probe(&h(0), now), Probe::Miss { known: false }));
        // Full of expired entries: swept, new ones fit again.
        c.insert_negative(h(20), now, Refused::unknown());
        assert!(matches!(c.probe(&h(20), now), Probe::Negative(_)));
        c.forget_negative(&h(20));
        assert!(matches!(c.probe(&h(20), now), Probe::Miss { known: false }));
    }

    #[test]
    fn capacity_is_a_bound() {
        let c = Cache::new(Duration::from_secs(60), 4, Duration::from_secs(5), 10);
        for n in 0..50 {
            c.insert(h(n), p("x"), None, c.snapshot());
            assert!(c.len() <= 4, "{}", c.len());
        }
        assert_eq!(c.entries.len(), c.len());
        // The newest is always present.
        assert!(is_hit(c.probe(&h(49), c.now_ms())));
    }

    #[tokio::test]
    async fn single_flight_coalesces_concurrent_callers() {
        // current_thread runtime: a task that counted itself in `joined` has
        // also reached its await point inside `run` (one poll, no yield).
        let flights: Arc<Flights<u32>> = Arc::new(Flights::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let joined = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (flights, calls, joined, gate) =
                (flights.clone(), calls.clone(), joined.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                joined.fetch_add(1, Ordering::SeqCst);
                flights
                    .run(h(1), 0, |_| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        7
                    })
                    .await
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while joined.load(Ordering::SeqCst) < 100 {
            assert!(Instant::now() < deadline, "tasks never ran");
            tokio::task::yield_now().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn newer_generation_does_not_join_an_older_flight() {
        let flights: Flights<u32> = Flights::new();
        let gate = tokio::sync::Notify::new();
        let first = flights.run(h(1), 0, |_| async {
            gate.notified().await;
            1
        });
        let second = flights.run(h(1), 1, |g| async move { 10 + g as u32 });
        let mut first = std::pin::pin!(first);
        // Start the first flight (it parks on the gate).
        assert!(poll_once(first.as_mut()).is_pending());
        assert_eq!(second.await, 11);
        gate.notify_one();
        assert_eq!(first.await, 1);
    }

    #[tokio::test]
    async fn cancelled_leader_hands_over() {
        let flights: Flights<u32> = Flights::new();
        let leader = flights.run(h(1), 0, |_| std::future::pending::<u32>());
        let mut leader = Box::pin(leader);
        assert!(poll_once(leader.as_mut()).is_pending());
        drop(leader);
        assert_eq!(flights.in_flight(), 0);
        assert_eq!(flights.run(h(1), 0, |_| async { 5 }).await, 5);
    }
}
