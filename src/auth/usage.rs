//! Per-key usage (contract §10): `requests` and `refused` per key and UTC
//! hour, counted in memory and written behind in batches.
//!
//! The request path calls [`Usage::count`]: one DashMap shard read lock and
//! one atomic add when the key already has a bucket for the current hour
//! (every request but the first per key and hour), no allocation, no store
//! call. The hour comes from an atomic that [`Usage::tick`] keeps current
//! (the flush task calls it every second), so counting never reads a clock.
//!
//! [`Usage::flush`] moves the counts out of the map into a *pending* batch
//! with a unique marker and writes it with one script call per 256 buckets
//! (`Store::add_usage`). A batch whose write fails stays pending and is
//! re-sent, with the same marker, before anything newer: the store adds a
//! marked batch once, so a write whose reply was lost is not counted twice,
//! and counts are lost only when the process dies.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use dashmap::DashMap;

use super::principal::Principal;
use super::store::{Store, StoreError, UsageDelta};
use super::token::KeyHash;

/// Counts of one key in one hour, not yet flushed.
struct Bucket {
    key_id: Box<str>,
    requests: AtomicU64,
    refused: AtomicU64,
}

/// A token hash is uniformly random: its first eight bytes are a good hash.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
            .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
}

type Map = DashMap<(i64, KeyHash), Bucket, BuildHasherDefault<PrefixHasher>>;

/// A batch taken out of the map, kept until the store confirms it.
struct Pending {
    marker: String,
    deltas: Vec<UsageDelta>,
}

pub struct Usage {
    buckets: Map,
    /// The current UTC hour (hours since the epoch), kept by [`Usage::tick`].
    hour: AtomicI64,
    pending: Mutex<Vec<Pending>>,
    /// Marker prefix of this instance (random) and batch sequence number.
    instance: String,
    seq: AtomicU64,
    retention: Duration,
}

/// Hours since the Unix epoch of `t`.
pub fn hour_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(3600)
}

/// The start of hour `h` (hours since the epoch).
pub fn hour_start(h: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(h.saturating_mul(3600), 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

impl Usage {
    pub fn new(retention: Duration) -> Usage {
        Usage {
            buckets: Map::default(),
            hour: AtomicI64::new(hour_of(Utc::now())),
            pending: Mutex::new(Vec::new()),
            instance: crate::auth::token::new_key_id(),
            seq: AtomicU64::new(0),
            retention,
        }
    }

    /// Count one key-authenticated request keygate answered or forwarded;
    /// `refused`: refused for the key's scope (§8) or rate limit (§11).
    #[inline]
    pub fn count(&self, principal: &Principal, refused: bool) {
        let key = (self.hour.load(Ordering::Relaxed), *principal.hash());
        if let Some(b) = self.buckets.get(&key) {
            b.add(refused);
            return;
        }
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket {
                key_id: principal.key_id().into(),
                requests: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            })
            .add(refused);
    }

    /// Keep the current hour up to date (called every second).
    pub fn tick(&self) {
        self.hour.store(hour_of(Utc::now()), Ordering::Relaxed);
    }

    /// Counts not yet confirmed by the store (in the map or pending).
    pub fn unflushed(&self) -> u64 {
        let in_map: u64 = self
            .buckets
            .iter()
            .map(|b| b.requests.load(Ordering::Relaxed) + b.refused.load(Ordering::Relaxed))
            .sum();
        let pending: u64 = lock(&self.pending)
            .iter()
            .flat_map(|p| p.deltas.iter())
            .map(|d| d.requests + d.refused)
            .sum();
        in_map + pending
    }

    /// Write pending batches, then the counts since the last flush. Stops at
    /// the first failure (what failed stays pending, new counts stay in the map).
    pub async fn flush(&self, store: &Store, timeout: Duration) -> Result<(), StoreError> {
        // One flush at a time: the pending list is taken and put back.
        let mut pending = std::mem::take(&mut *lock(&self.pending));
        let result = self.write_pending(&mut pending, store, timeout).await;
        let result = match result {
            Ok(()) => {
                if let Some(batch) = self.take_batch() {
                    pending.push(batch);
                    self.write_pending(&mut pending, store, timeout).await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        let mut slot = lock(&self.pending);
        pending.append(&mut slot);
        *slot = pending;
        result
    }

    async fn write_pending(
        &self,
        pending: &mut Vec<Pending>,
        store: &Store,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        while let Some(p) = pending.first() {
            match tokio::time::timeout(
                timeout,
                store.add_usage(&p.marker, &p.deltas, self.retention),
            )
            .await
            {
                Ok(Ok(())) => {
                    pending.remove(0);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(StoreError::Timeout(timeout)),
            }
        }
        Ok(())
    }

    /// Move the map's counts into a new batch; buckets of past hours that are
    /// empty afterwards are dropped.
    fn take_batch(&self) -> Option<Pending> {
        let current = self.hour.load(Ordering::Relaxed);
        let mut deltas = Vec::new();
        let mut old = Vec::new();
        for b in self.buckets.iter() {
            let requests = b.requests.swap(0, Ordering::Relaxed);
            let refused = b.refused.swap(0, Ordering::Relaxed);
            if requests > 0 || refused > 0 {
                deltas.push(UsageDelta {
                    key_id: b.key_id.to_string(),
                    hour: b.key().0,
                    requests,
                    refused,
                });
            }
            if b.key().0 < current {
                old.push(*b.key());
            }
        }
        for k in old {
            // Under the shard's write lock: a count in between keeps the bucket.
            self.buckets.remove_if(&k, |_, b| b.is_empty());
        }
        if deltas.is_empty() {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Some(Pending {
            marker: format!("{}:{seq}", self.instance),
            deltas,
        })
    }
}

impl Bucket {
    #[inline]
    fn add(&self, refused: bool) {
        if refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn is_empty(&self) -> bool {
        self.requests.load(Ordering::Relaxed) == 0 && self.refused.load(Ordering::Relaxed) == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scope::Role;

    fn principal(id: &str) -> Principal {
        Principal::with_scope(id, "mok_x", Role::Admin, &[])
    }

    #[tokio::test]
    async fn counts_add_up_and_flush_once() {
        let store = Store::memory("acme");
        let usage = Usage::new(Duration::from_secs(3600));
        let p = principal("k1");
        for i in 0..10 {
            usage.count(&p, i % 5 == 0);
        }
        assert_eq!(usage.unflushed(), 10);
        usage.flush(&store, Duration::from_secs(1)).await.unwrap();
        assert_eq!(usage.unflushed(), 0);
        usage.flush(&store, Duration::from_secs(1)).await.unwrap();
        let h = hour_of(Utc::now());
        let got = store.usage("k1", h - 1, h + 1).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].requests, got[0].refused), (8, 2));
    }
}
