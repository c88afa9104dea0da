//! Stage 4: the credential. [`credential`] parses `Authorization` (pure),
//! [`token`] checks a token's format and checksum (pure, no store look-up for a
//! mistyped token), [`Authenticator`] validates well-formed org keys against
//! the local cache and the store, and yields a [`Principal`] — the proof that
//! `forward` requires for a key-authenticated request.
//!
//! [`KeyService`] (keys.rs) is the key lifecycle — mint, list, revoke, audit —
//! shared by `/org/tokens` and the `keygate keys` CLI.
//!
//! # Bounds on store calls
//!
//! A request with a well-formed key reaches the store only on a cache miss
//! (see [`cache`] for when an entry answers). On a miss:
//!
//! * **single-flight**: concurrent misses for one token hash share one
//!   `lookup` (a request arriving after a revocation starts its own);
//! * **negative cache**: a token the store does not accept is answered 401
//!   locally for `auth.negative_ttl` (up to [`cache::NEGATIVE_CAPACITY`]
//!   tokens);
//! * **concurrency cap**: look-ups of tokens with no cache entry at all hold
//!   one of [`MAX_UNKNOWN_LOOKUPS`] permits; excess requests wait for a permit
//!   up to `store.timeout` and then get 503 (`StoreUnavailable`), never 401
//!   — a valid key is never refused because of a flood. Re-checks of keys
//!   already in the cache bypass the cap, so a flood of random tokens cannot
//!   starve the keys in use.
//!
//! So a flood of random well-formed tokens costs at most one store call per
//! distinct token per `negative_ttl` (while the negative cache has room), and
//! never more than [`MAX_UNKNOWN_LOOKUPS`] such calls at once; each call is
//! bounded by `store.timeout`, each request by `2 × store.timeout`.
//!
//! # Outage policy
//!
//! When the store fails (error or timeout) for a key the cache cannot answer:
//! `reject` → [`AuthError::StoreUnavailable`]; `serve_cached` → the stale
//! entry answers if its last successful check is within `auth.max_stale`
//! (even across feed epochs), else `StoreUnavailable`. A key the store could
//! not check is never answered 401.

pub mod cache;
pub mod credential;
mod keys;
pub mod principal;
pub mod refusal;
mod rotate;
pub mod scope;
pub mod store;
pub mod token;
pub mod usage;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc, watch, Semaphore};

use cache::{Cache, Flights, Probe};
pub use keys::{Actor, KeyService, MintError, MintRequest, Minted, OpContext};
pub use principal::Principal;
pub use refusal::{Refusal, Refused};
pub use rotate::{RotateRequest, Rotated, UsageReport, MAX_GRACE};
use store::{FeedEvent, Store, StoreError};
use token::KeyHash;

use crate::config::{Config, OutagePolicy};
use crate::metrics::Metrics;

/// Concurrent store look-ups for tokens that have no cache entry.
pub const MAX_UNKNOWN_LOOKUPS: usize = 32;

/// How often queued `last_used_at` updates are written to the store.
pub const TOUCH_FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Bound on queued `last_used_at` updates (more are dropped until a flush).
const MAX_PENDING_TOUCHES: usize = 100_000;

/// Why a well-formed org key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown, revoked, expired, or another tenant's: the client gets the
    /// same 401; the reason and key id are for the access log and metrics.
    Invalid(Refused),
    /// The store could not answer in time and the cache may not be used.
    StoreUnavailable,
}

/// Validates org keys: cache first, store on a miss (single-flight), revocation
/// feed keeps the cache honest.
///
/// Dropping the `Authenticator` stops its background tasks (after a last
/// `last_used_at` flush) and closes the revocation feed.
pub struct Authenticator {
    keys: KeyService,
    _stop: watch::Sender<()>,
}

/// The result of one store look-up, shared by the requests of a flight.
#[derive(Clone)]
enum Fetched {
    Live(Principal),
    Invalid(Refused),
    Unavailable,
}

struct Inner {
    cache: Cache,
    flights: Flights<Fetched>,
    store: Store,
    metrics: Arc<Metrics>,
    store_timeout: Duration,
    outage: OutagePolicy,
    max_stale: Duration,
    key_prefix: String,
    max_live: u32,
    default_rate_limit: Option<crate::config::RateLimit>,
    unknown_lookups: Semaphore,
    touches: Mutex<HashMap<KeyHash, DateTime<Utc>>>,
    /// What open tunnels listen to (see [`Authenticator::key_ends`]).
    events: broadcast::Sender<KeyEvent>,
    /// Per-key usage counters (§10), written behind by the flush task.
    usage: usage::Usage,
    usage_flush: Duration,
    rotate_grace: Duration,
    usage_retention: Duration,
    rotating: rotate::InFlight,
    /// Revocations applied in the last minute, so that
    /// `keygate_revocations_total` counts each once although a revoke served
    /// here also comes back on the feed (in either order).
    applied_revocations: Mutex<HashMap<KeyHash, Instant>>,
}

impl Authenticator {
    /// Build the authenticator and start its background tasks (revocation feed,
    /// last-used write-behind) on the current runtime.
    pub fn start(config: &Config, store: Store, metrics: Arc<Metrics>) -> Arc<Authenticator> {
        let inner = Arc::new(Inner::new(config, store, metrics));
        let (stop, stopped) = watch::channel(());

        let (events, mut feed) = mpsc::unbounded_channel();
        inner.store.spawn_revocation_feed(events);
        let feed_inner = inner.clone();
        let mut feed_stop = stopped.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = feed.recv() => match event {
                        Some(event) => feed_inner.on_feed(event),
                        None => {
                            // The feed task ended: nothing will tell us about
                            // revocations any more.
                            feed_inner.on_feed(FeedEvent::Lost);
                            tracing::error!("revocation feed task ended");
                            return;
                        }
                    },
                    _ = feed_stop.changed() => return,
                }
            }
        });

        let touch_inner = inner.clone();
        let mut touch_stop = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TOUCH_FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => touch_inner.flush_touches().await,
                    _ = touch_stop.changed() => {
                        touch_inner.flush_touches().await;
                        return;
                    }
                }
            }
        });

        let usage_inner = inner.clone();
        let mut usage_stop = stopped.clone();
        tokio::spawn(async move { usage_inner.usage_task(&mut usage_stop).await });

        Arc::new(Authenticator {
            keys: KeyService { inner },
            _stop: stop,
        })
    }

    /// Validate a token whose format and checksum already passed
    /// ([`token::check_format`]). A cache hit does not yield, allocate, or
    /// take a lock other than one DashMap shard read.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        self.keys.inner.authenticate(token::hash(token)).await
    }

    /// The key management operations (API and CLI) share the cache so that a
    /// revoke served here is effective for the very next request.
    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    /// Per-key usage counters (§10): call `usage().count(..)` for every
    /// key-authenticated request keygate answers or forwards.
    pub fn usage(&self) -> &usage::Usage {
        &self.keys.inner.usage
    }

    /// Write the usage counted so far now (shutdown, tests).
    pub async fn flush_usage(&self) -> Result<(), StoreError> {
        let inner = &self.keys.inner;
        inner.usage.flush(&inner.store, inner.store_timeout).await
    }

    /// Readiness: `(store_ok, feed_live)`; the ping is bounded by `store.timeout`.
    pub async fn readiness(&self) -> (bool, bool) {
        let inner = &self.keys.inner;
        let store_ok = inner.timed("ping", inner.store.ping()).await.is_ok();
        (store_ok, inner.cache.feed_live())
    }

    /// Whether the revocation feed is connected (no store call).
    pub fn feed_live(&self) -> bool {
        self.keys.inner.cache.feed_live()
    }

    /// Resolves when the key behind `principal` stops being valid: revoked
    /// (here or, through the feed, on any keygate sharing the store — the
    /// same bound as a request), or past its `expires_at` (the record's
    /// current one: a rotation that shortens it moves the deadline). A lost or
    /// reconnected feed, or a listener that fell behind, re-checks the key
    /// as a request would. For tunnels opened with the key (contract §4).
    pub fn key_ends(&self, principal: &Principal) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.keys.inner.clone();
        let hash = *principal.hash();
        let mut expires_at = principal.expires_at();
        let mut events = inner.events.subscribe();
        async move {
            loop {
                let expired = async {
                    match expires_at {
                        Some(at) => {
                            let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                            tokio::time::sleep(left).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let recheck = tokio::select! {
                    _ = expired => return,
                    event = events.recv() => match event {
                        Ok(KeyEvent::Revoked(h)) if h == hash => return,
                        Ok(KeyEvent::Revoked(_)) => false,
                        // A rotation moved this key's expiry (§9): the
                        // timer follows the record.
                        Ok(KeyEvent::Changed(h)) => h == hash,
                        Ok(KeyEvent::Recheck) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                            false
                        }
                    },
                };
                if recheck {
                    match inner.authenticate(hash).await {
                        Err(AuthError::Invalid(_)) => return,
                        Ok(now) => expires_at = now.expires_at(),
                        // A store outage is not the key's end: only a clear "invalid".
                        Err(AuthError::StoreUnavailable) => {}
                    }
                }
            }
        }
    }
}

/// How many key events a slow tunnel may fall behind before it re-checks.
const KEY_EVENTS: usize = 1024;

/// What happened to keys, for the tunnels they opened.
#[derive(Debug, Clone, Copy)]
enum KeyEvent {
    Revoked(KeyHash),
    /// The key's `expires_at` changed (a rotation): its tunnels re-read it.
    Changed(KeyHash),
    /// The feed was lost or came back: revocations may have been missed.
    Recheck,
}

impl Inner {
    fn new(config: &Config, store: Store, metrics: Arc<Metrics>) -> Inner {
        let auth = &config.auth;
        Inner {
            cache: Cache::new(
                auth.cache_ttl,
                auth.cache_capacity,
                auth.negative_ttl,
                cache::NEGATIVE_CAPACITY,
            ),
            flights: Flights::new(),
            store,
            metrics,
            store_timeout: config.store.timeout,
            outage: auth.on_store_unavailable,
            max_stale: auth.max_stale,
            key_prefix: auth.key_prefix.clone(),
            max_live: config.keys.max_live,
            default_rate_limit: config.keys.default_rate_limit,
            unknown_lookups: Semaphore::new(MAX_UNKNOWN_LOOKUPS),
            touches: Mutex::new(HashMap::new()),
            events: broadcast::channel(KEY_EVENTS).0,
            applied_revocations: Mutex::new(HashMap::new()),
            usage: usage::Usage::new(config.keys.usage_retention),
            usage_flush: config.keys.usage_flush,
            rotate_grace: config.keys.rotate_grace,
            usage_retention: config.keys.usage_retention,
            rotating: rotate::InFlight::default(),
        }
    }

    async fn authenticate(&self, hash: KeyHash) -> Result<Principal, AuthError> {
        match self.cached(hash) {
            Ok(answer) => answer,
            // Boxed: the store round trip is a large future, and a cache hit
            // (every request but the first per key) should not carry its space.
            Err(known) => Box::pin(self.fetch_missing(hash, known)).await,
        }
    }

    /// The cache's answer, with no await; `Err(known)`: ask the store.
    fn cached(&self, hash: KeyHash) -> Result<Result<Principal, AuthError>, bool> {
        let now_ms = self.cache.now_ms();
        match self.cache.probe(&hash, now_ms) {
            Probe::Hit { principal, touch } => {
                self.metrics.cache_hits.inc();
                if touch {
                    self.queue_touch(hash);
                }
                Ok(Ok(principal))
            }
            Probe::Expired { key_id } => {
                self.metrics.cache_hits.inc();
                self.update_size();
                Ok(Err(AuthError::Invalid(Refused {
                    reason: Refusal::Expired,
                    key_id: Some(key_id),
                })))
            }
            Probe::Negative(refused) => {
                self.metrics.cache_hits.inc();
                Ok(Err(AuthError::Invalid(refused)))
            }
            Probe::Miss { known } => Err(known),
        }
    }

    async fn fetch_missing(&self, hash: KeyHash, known: bool) -> Result<Principal, AuthError> {
        self.metrics.cache_misses.inc();
        let generation = self.cache.generation();
        let fetched = self
            .flights
            .run(hash, generation, |g| self.fetch(hash, g, known))
            .await;
        match fetched {
            Fetched::Live(principal) => Ok(principal),
            Fetched::Invalid(refused) => Err(AuthError::Invalid(refused)),
            Fetched::Unavailable => match self.outage {
                OutagePolicy::Reject => Err(AuthError::StoreUnavailable),
                OutagePolicy::ServeCached => self
                    .cache
                    .stale(&hash, self.cache.now_ms(), self.max_stale)
                    .ok_or(AuthError::StoreUnavailable),
            },
        }
    }

    /// One store look-up; its result goes into the cache unless a revocation
    /// happened since `generation` (taken before the read).
    async fn fetch(&self, hash: KeyHash, generation: u64, known: bool) -> Fetched {
        let _permit = if known {
            None
        } else {
            match tokio::time::timeout(self.store_timeout, self.unknown_lookups.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) | Err(_) => {
                    self.metrics
                        .store_errors
                        .with_label_values(&["lookup_queue"])
                        .inc();
                    tracing::debug!("key store look-up queue full for store.timeout");
                    return Fetched::Unavailable;
                }
            }
        };
        let mut at = self.cache.snapshot();
        // The wall clock at the same instant as the cache clock in `at`, so the
        // cached expiry deadline is never earlier than `expires_at`.
        let wall_at_snapshot = Utc::now();
        at.generation = at.generation.min(generation);
        let record = match self.timed("lookup", self.store.lookup(&hash)).await {
            Ok(record) => record,
            Err(_) => return Fetched::Unavailable,
        };
        let now = Utc::now();
        let record = match record {
            Some(r) if r.is_live(now) => r,
            other => {
                if self.cache.remove(&hash) {
                    self.update_size();
                }
                let refused = other.as_ref().map_or_else(Refused::unknown, Refused::of);
                self.cache.insert_negative(hash, at.now_ms, refused.clone());
                return Fetched::Invalid(refused);
            }
        };
        let principal = Principal::of(hash, &record);
        let expiry = record.expires_at.map(|e| cache::Expiry {
            left: (e - wall_at_snapshot).to_std().unwrap_or(Duration::ZERO),
            at: e,
        });
        if let Some(touch) = self.cache.insert(hash, principal.clone(), expiry, at) {
            self.update_size();
            if touch {
                self.queue_touch(hash);
            }
        }
        Fetched::Live(principal)
    }

    /// A revocation served here or learned from the feed.
    fn apply_revocation(&self, hash: &KeyHash) {
        self.cache.revoke(hash);
        let _ = self.events.send(KeyEvent::Revoked(*hash));
        self.update_size();
        let first = {
            let mut applied = lock(&self.applied_revocations);
            if applied.len() >= 1024 {
                applied.retain(|_, t| t.elapsed() < Duration::from_secs(60));
            }
            applied.insert(*hash, Instant::now()).is_none()
        };
        if first {
            self.metrics.revocations.inc();
        }
    }

    fn on_feed(&self, event: FeedEvent) {
        match event {
            FeedEvent::Revoked(hash) => self.apply_revocation(&hash),
            FeedEvent::Changed(hash) => self.apply_expiry_change(&hash),
            // The store logs the feed's changes (once, with its address).
            FeedEvent::Lost => {
                self.cache.feed_lost();
                let _ = self.events.send(KeyEvent::Recheck);
            }
            FeedEvent::Connected => {
                self.cache.feed_connected();
                let _ = self.events.send(KeyEvent::Recheck);
            }
        }
    }

    /// A key's `expires_at` changed (a rotation here or on another
    /// instance): drop its entry so that the next request re-reads it, and
    /// let its tunnels re-check. Not a revocation (not counted as one).
    fn apply_expiry_change(&self, hash: &KeyHash) {
        self.cache.revoke(hash);
        let _ = self.events.send(KeyEvent::Changed(*hash));
        self.update_size();
    }

    /// Keep the usage hour current; flush every `keys.usage_flush`, and once
    /// more when stopped.
    async fn usage_task(&self, stop: &mut watch::Receiver<()>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(self.usage_flush));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.usage.tick();
                    if last.elapsed() >= self.usage_flush {
                        last = Instant::now();
                        self.flush_usage_logged().await;
                    }
                }
                _ = stop.changed() => {
                    self.flush_usage_logged().await;
                    return;
                }
            }
        }
    }

    async fn flush_usage_logged(&self) {
        if let Err(e) = self.usage.flush(&self.store, self.store_timeout).await {
            self.metrics
                .store_errors
                .with_label_values(&["usage"])
                .inc();
            tracing::debug!(error = %e, unflushed = self.usage.unflushed(), "usage write-behind failed; retried at the next flush");
        }
    }

    fn update_size(&self) {
        self.metrics.cache_size.set(self.cache.len() as i64);
    }

    /// Queue `last_used_at` (never awaited on the request path).
    fn queue_touch(&self, hash: KeyHash) {
        let mut touches = lock(&self.touches);
        if touches.len() < MAX_PENDING_TOUCHES {
            touches.insert(hash, Utc::now());
        }
    }

    async fn flush_touches(&self) {
        let batch: Vec<(KeyHash, DateTime<Utc>)> = {
            let mut touches = lock(&self.touches);
            if touches.is_empty() {
                return;
            }
            std::mem::take(&mut *touches).into_iter().collect()
        };
        if let Err(e) = self.timed("touch", self.store.touch(&batch)).await {
            tracing::debug!(error = %e, dropped = batch.len(), "last_used_at write-behind failed");
        }
    }

    /// A store call bounded by `store.timeout`, with its metrics.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.store_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.store_timeout)),
        };
        self.metrics
            .store_duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics.store_errors.with_label_values(&[op]).inc();
            tracing::debug!(op, error = %e, "key store call failed");
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::token::Token;
    use super::*;
    use chrono::TimeDelta;

    use crate::config::Config;

    fn config() -> Config {
        Config::new("acme", http::Uri::from_static("http://127.0.0.1:9"))
    }

    fn refused(reason: Refusal, key_id: &str) -> AuthError {
        AuthError::Invalid(Refused {
            reason,
            key_id: Some(Arc::from(key_id)),
        })
    }

    fn ctx() -> OpContext {
        OpContext {
            actor: Actor("cli:test".into()),
            client: Some("127.0.0.1".into()),
            user_agent: None,
        }
    }

    fn lookups(m: &Metrics) -> u64 {
        m.store_duration
            .with_label_values(&["lookup"])
            .get_sample_count()
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn start_with(config: &Config, store: Store) -> (Arc<Authenticator>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let auth = Authenticator::start(config, store, metrics.clone());
        let a = auth.clone();
        wait_for("the revocation feed", move || a.feed_live()).await;
        (auth, metrics)
    }

    async fn start(config: &Config) -> (Arc<Authenticator>, Arc<Metrics>) {
        start_with(config, Store::memory("acme")).await
    }

    async fn mint(auth: &Authenticator, expires_at: Option<DateTime<Utc>>) -> Minted {
        let req = MintRequest {
            name: Some("test".into()),
            expires_at,
            enforce_ceiling: true,
            ..Default::default()
        };
        auth.keys().mint(req, &ctx()).await.expect("mint")
    }

    fn inner(auth: &Authenticator) -> &Inner {
        &auth.keys.inner
    }

    #[tokio::test]
    async fn first_use_misses_then_hits() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, None).await;
        for _ in 0..3 {
            let p = auth
                .authenticate(k.token.expose())
                .await
                .expect("valid key");
            assert_eq!(p.key_id(), k.record.id);
            assert_eq!(p.prefix(), k.record.prefix);
            assert_eq!(
                p.header_value(),
                format!("org-key:{}", k.record.id).as_str()
            );
        }
        assert_eq!(lookups(&m), 1);
        assert_eq!(m.cache_misses.get(), 1);
        assert_eq!(m.cache_hits.get(), 2);
        assert_eq!(m.cache_size.get(), 1);
    }

    #[tokio::test]
    async fn entry_is_rechecked_after_cache_ttl() {
        let config = config();
        let (auth, m) = start(&config).await;
        let k = mint(&auth, None).await;
        auth.authenticate(k.token.expose()).await.unwrap();
        inner(&auth)
            .cache
            .advance(config.auth.cache_ttl - Duration::from_secs(1));
        auth.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lookups(&m), 1);
        inner(&auth).cache.advance(Duration::from_secs(1));
        auth.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lookups(&m), 2);
    }

    #[tokio::test]
    async fn unknown_key_is_negatively_cached() {
        let config = config();
        let (auth, m) = start(&config).await;
        let unknown = token::mint("mok_");
        for _ in 0..5 {
            let r = auth.authenticate(unknown.expose()).await;
            assert_eq!(r.unwrap_err(), AuthError::Invalid(Refused::unknown()));
        }
        assert_eq!(lookups(&m), 1);
        inner(&auth).cache.advance(config.auth.negative_ttl);
        assert_eq!(
            auth.authenticate(unknown.expose()).await.unwrap_err(),
            AuthError::Invalid(Refused::unknown())
        );
        assert_eq!(lookups(&m), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_uses_make_one_lookup() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, None).await;
        let unknown = token::mint("mok_");
        for (token, valid) in [(k.token.clone(), true), (unknown, false)] {
            let before = lookups(&m);
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let (auth, token) = (auth.clone(), token.clone());
                    tokio::spawn(async move { auth.authenticate(token.expose()).await })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap().is_ok(), valid);
            }
            assert_eq!(lookups(&m) - before, 1, "valid={valid}");
        }
    }

    #[tokio::test]
    async fn revoked_key_is_refused_on_the_next_request() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, None).await;
        let other = mint(&auth, None).await;
        auth.authenticate(k.token.expose()).await.unwrap();
        auth.authenticate(other.token.expose()).await.unwrap();
        assert!(auth.keys().revoke(&k.record.id, &ctx()).await.unwrap());
        assert_eq!(
            auth.authenticate(k.token.expose()).await.unwrap_err(),
            refused(Refusal::Revoked, &k.record.id)
        );
        assert!(auth.authenticate(other.token.expose()).await.is_ok());
        assert!(!auth.keys().revoke(&k.record.id, &ctx()).await.unwrap());
        assert!(!auth.keys().revoke("no-such-id", &ctx()).await.unwrap());
        // The feed echo of our own revoke is not counted twice.
        inner(&auth).on_feed(FeedEvent::Revoked(token::hash(k.token.expose())));
        assert_eq!(m.revocations.get(), 1);
        let listed: Vec<String> = auth
            .keys()
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, std::slice::from_ref(&other.record.id));
        let audit = auth.keys().audit(None).await.unwrap();
        let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["mint", "mint", "revoke"]);
        let revoke = &audit[2];
        assert_eq!(revoke.key_id, k.record.id);
        assert_eq!(revoke.prefix, k.record.prefix);
        assert_eq!(revoke.actor, "cli:test");
        assert_eq!(revoke.client.as_deref(), Some("127.0.0.1"));
    }

    #[tokio::test]
    async fn revocation_reaches_another_instance_through_the_feed() {
        let store = Store::memory("acme");
        let (a, _) = start_with(&config(), store.clone()).await;
        let (b, mb) = start_with(&config(), store).await;
        let k = mint(&a, None).await;
        b.authenticate(k.token.expose()).await.unwrap();
        b.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lookups(&mb), 1);
        assert!(a.keys().revoke(&k.record.id, &ctx()).await.unwrap());
        let mb2 = mb.clone();
        wait_for("b to apply the revocation", move || {
            mb2.revocations.get() == 1
        })
        .await;
        assert_eq!(
            b.authenticate(k.token.expose()).await.unwrap_err(),
            refused(Refusal::Revoked, &k.record.id)
        );
    }

    #[tokio::test]
    async fn lookup_that_started_before_a_revocation_does_not_reinsert() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, None).await;
        let victim = mint(&auth, None).await;
        let hash = token::hash(k.token.expose());
        let i = inner(&auth);
        // A look-up starts (takes the generation) ...
        let generation = i.cache.generation();
        // ... a revocation lands ...
        assert!(auth.keys().revoke(&victim.record.id, &ctx()).await.unwrap());
        // ... the look-up answers its own request but does not cache.
        assert!(matches!(
            i.fetch(hash, generation, false).await,
            Fetched::Live(_)
        ));
        assert_eq!(m.cache_size.get(), 0);
        let before = lookups(&m);
        auth.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lookups(&m), before + 1, "not served from cache");
        auth.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lookups(&m), before + 1, "cached by the later look-up");
    }

    #[tokio::test]
    async fn feed_loss_forces_rechecks() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, None).await;
        let t = k.token.expose();
        let i = inner(&auth);
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 1);
        i.on_feed(FeedEvent::Lost);
        assert!(!auth.feed_live());
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 2, "entry from before the loss re-checked");
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 2, "re-checked entry usable briefly");
        i.cache.advance(cache::FEED_DOWN_REUSE);
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 3, "feed down: at most FEED_DOWN_REUSE");
        i.on_feed(FeedEvent::Connected);
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 4, "entries checked during the gap re-checked");
        i.cache.advance(Duration::from_secs(10));
        auth.authenticate(t).await.unwrap();
        assert_eq!(lookups(&m), 4);
        assert_eq!(auth.readiness().await, (true, true));
    }

    #[tokio::test]
    async fn expired_keys_are_refused() {
        let (auth, m) = start(&config()).await;
        let k = mint(&auth, Some(Utc::now() + TimeDelta::seconds(2))).await;
        auth.authenticate(k.token.expose()).await.unwrap();
        inner(&auth).cache.advance(Duration::from_secs(2));
        assert_eq!(
            auth.authenticate(k.token.expose()).await.unwrap_err(),
            refused(Refusal::Expired, &k.record.id)
        );
        assert_eq!(m.cache_size.get(), 0);
        let old = mint(&auth, Some(Utc::now() - TimeDelta::seconds(1))).await;
        assert_eq!(
            auth.authenticate(old.token.expose()).await.unwrap_err(),
            refused(Refusal::Expired, &old.record.id)
        );
    }

    #[tokio::test]
    async fn cache_capacity_bounds_entries() {
        let mut config = config();
        config.auth.cache_capacity = 3;
        let (auth, m) = start(&config).await;
        let mut keys = Vec::new();
        for _ in 0..10 {
            keys.push(mint(&auth, None).await);
        }
        for k in &keys {
            auth.authenticate(k.token.expose()).await.unwrap();
            assert!(m.cache_size.get() <= 3, "{}", m.cache_size.get());
        }
        for k in &keys {
            auth.authenticate(k.token.expose()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn last_used_is_written_behind_once_per_interval() {
        let (auth, _) = start(&config()).await;
        let k = mint(&auth, None).await;
        auth.authenticate(k.token.expose()).await.unwrap();
        let i = inner(&auth);
        assert_eq!(lock(&i.touches).len(), 1);
        i.flush_touches().await;
        assert!(lock(&i.touches).is_empty());
        let listed = auth.keys().list().await.unwrap();
        assert!(listed[0].last_used_at.is_some());
        auth.authenticate(k.token.expose()).await.unwrap();
        assert!(lock(&i.touches).is_empty(), "at most once per interval");
        i.cache.advance(cache::TOUCH_INTERVAL);
        auth.authenticate(k.token.expose()).await.unwrap();
        assert_eq!(lock(&i.touches).len(), 1);
    }

    #[tokio::test]
    async fn mint_ceiling_for_api_not_for_cli() {
        let mut config = config();
        config.keys.max_live = 2;
        let (auth, _) = start(&config).await;
        mint(&auth, None).await;
        let second = mint(&auth, None).await;
        assert!(!second.over_ceiling);
        let api = MintRequest {
            name: None,
            expires_at: None,
            enforce_ceiling: true,
            ..Default::default()
        };
        assert!(matches!(
            auth.keys().mint(api, &ctx()).await,
            Err(MintError::CeilingReached)
        ));
        let cli = MintRequest {
            name: None,
            expires_at: None,
            enforce_ceiling: false,
            ..Default::default()
        };
        let third = auth.keys().mint(cli, &ctx()).await.unwrap();
        assert!(third.over_ceiling);
        assert_eq!(third.record.created_by, "cli:test");
        assert!(token::check_format(third.token.expose(), "mok_"));
        assert_eq!(third.record.prefix, &third.token.expose()[..12]);
        assert!(auth.authenticate(third.token.expose()).await.is_ok());
    }

    /// A store whose every call fails at once (connection refused).
    fn dead_store() -> Store {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = crate::config::RedisTarget::Url(crate::config::Secret::new(format!(
            "redis://127.0.0.1:{port}/0"
        )));
        Store::Redis(Arc::new(
            store::redis::RedisStore::new(&target, "acme", Duration::from_millis(250)).unwrap(),
        ))
    }

    /// An authenticator on a dead store, with one key cached (checked now).
    async fn outage(policy: OutagePolicy) -> (Arc<Authenticator>, Token) {
        let mut config = config();
        config.auth.on_store_unavailable = policy;
        let auth = Authenticator::start(&config, dead_store(), Arc::new(Metrics::new()));
        let a = auth.clone();
        wait_for("the feed to report its failure", move || {
            inner(&a).cache.epoch() >= 1
        })
        .await;
        let token = token::mint("mok_");
        let i = inner(&auth);
        let principal = Principal::new("k1", token::display_prefix(token.expose()));
        let at = i.cache.snapshot();
        assert!(i
            .cache
            .insert(token::hash(token.expose()), principal, None, at)
            .is_some());
        (auth, token)
    }

    #[tokio::test]
    async fn store_down_reject_policy() {
        let (auth, token) = outage(OutagePolicy::Reject).await;
        // Fresh entry: answered from cache, the store is not needed.
        assert!(auth.authenticate(token.expose()).await.is_ok());
        // Needs a re-check while the store fails: 503, not 401.
        inner(&auth).on_feed(FeedEvent::Lost);
        assert_eq!(
            auth.authenticate(token.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        let unknown = token::mint("mok_");
        assert_eq!(
            auth.authenticate(unknown.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        assert_eq!(auth.readiness().await, (false, false));
    }

    #[tokio::test]
    async fn store_down_serve_cached_within_max_stale() {
        let (auth, token) = outage(OutagePolicy::ServeCached).await;
        let i = inner(&auth);
        i.on_feed(FeedEvent::Lost);
        i.on_feed(FeedEvent::Connected);
        i.on_feed(FeedEvent::Lost);
        // Across epochs, within max_stale (30s) of the last successful check.
        i.cache.advance(Duration::from_secs(29));
        let p = auth.authenticate(token.expose()).await.unwrap();
        assert_eq!(p.key_id(), "k1");
        i.cache.advance(Duration::from_secs(2));
        assert_eq!(
            auth.authenticate(token.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
        // Unknown keys are never served (nor answered 401) without the store.
        let unknown = token::mint("mok_");
        assert_eq!(
            auth.authenticate(unknown.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
    }

    #[tokio::test]
    async fn revoked_key_is_not_served_stale() {
        let (auth, token) = outage(OutagePolicy::ServeCached).await;
        let i = inner(&auth);
        i.on_feed(FeedEvent::Revoked(token::hash(token.expose())));
        i.on_feed(FeedEvent::Lost);
        assert_eq!(
            auth.authenticate(token.expose()).await.unwrap_err(),
            AuthError::StoreUnavailable
        );
    }

    #[tokio::test]
    async fn dropping_the_authenticator_stops_its_tasks() {
        let (auth, _) = start(&config()).await;
        let weak = Arc::downgrade(&auth.keys.inner);
        drop(auth);
        wait_for("the background tasks to end", move || {
            weak.upgrade().is_none()
        })
        .await;
    }
}
