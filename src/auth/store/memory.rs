//! In-memory store (unit tests and `keygate demo`).
//!
//! Same semantics as the Redis store: atomic mint with the live-key ceiling,
//! revoke that succeeds once per key, an audit trail, and a revocation feed
//! (an in-process broadcast channel instead of Redis pub/sub). Nothing
//! survives the process.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc};

use super::{
    AuditEntry, FeedEvent, KeyRecord, KeyState, MintOutcome, RateGrant, RateSync, RotateOp,
    StoreError, UsageDelta, UsageHour,
};
use crate::auth::token::KeyHash;

/// Revocations buffered per feed subscriber before it counts as lagging
/// (a lagging subscriber gets `Lost` then `Connected`).
const FEED_CAPACITY: usize = 1024;

pub struct MemoryStore {
    slug: String,
    inner: Mutex<Inner>,
    /// Revocations and expiry changes, for the feed subscribers.
    revoked: broadcast::Sender<FeedEvent>,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<KeyHash, KeyRecord>,
    ids: HashMap<String, KeyHash>,
    audit: Vec<AuditEntry>,
    /// Rotated keys: old id -> successor id (§9).
    rotated_to: HashMap<String, String>,
    /// Usage buckets (§10): (key id, hour) -> (requests, refused).
    usage: HashMap<(String, i64), (u64, u64)>,
    /// Usage batches already added (retries are not added twice).
    usage_markers: std::collections::HashSet<String>,
    /// §11 window counters: (key id, window start s) -> (reserved, expires at ms).
    rate: HashMap<(String, u64), (u64, u64)>,
}

impl MemoryStore {
    pub fn new(slug: &str) -> MemoryStore {
        let (revoked, _) = broadcast::channel(FEED_CAPACITY);
        MemoryStore {
            slug: slug.to_string(),
            inner: Mutex::new(Inner::default()),
            revoked,
        }
    }

    /// The tenant this store belongs to.
    pub fn slug(&self) -> &str {
        &self.slug
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in
        // a way that matters more than losing the store: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Same semantics as the Redis script (`scripts/ratelimit.lua`).
    pub fn rate_sync(&self, items: &[RateSync]) -> Vec<RateGrant> {
        let now = Utc::now().timestamp_millis().max(0) as u64;
        let mut inner = self.inner();
        inner.rate.retain(|_, (_, exp)| *exp > now);
        items
            .iter()
            .map(|it| {
                let slot = inner
                    .rate
                    .entry((it.key_id.clone(), it.window_start_s))
                    .or_insert((0, 0));
                let granted = it
                    .limit
                    .saturating_sub(slot.0.saturating_add(it.add))
                    .min(it.ask);
                if it.add + granted > 0 {
                    slot.0 += it.add + granted;
                    slot.1 = now + it.ttl_ms;
                }
                RateGrant {
                    granted,
                    total: slot.0,
                }
            })
            .collect()
    }

    pub fn lookup(&self, hash: &KeyHash) -> Option<KeyRecord> {
        self.inner().keys.get(hash).cloned()
    }

    pub fn mint(
        &self,
        hash: &KeyHash,
        record: &KeyRecord,
        ceiling: Option<u32>,
        audit: &AuditEntry,
    ) -> Result<MintOutcome, StoreError> {
        let now = Utc::now();
        let mut inner = self.inner();
        if inner.keys.contains_key(hash) || inner.ids.contains_key(&record.id) {
            return Err(StoreError::Unavailable(
                "mint refused: a key with this id or hash already exists".into(),
            ));
        }
        let live = inner.keys.values().filter(|r| r.is_live(now)).count() as u64;
        if let Some(max) = ceiling {
            if live >= u64::from(max) {
                return Ok(MintOutcome::CeilingReached);
            }
        }
        inner.keys.insert(*hash, record.clone());
        inner.ids.insert(record.id.clone(), *hash);
        inner.audit.push(audit.clone());
        let live = live + u64::from(record.is_live(now));
        Ok(MintOutcome::Minted { live })
    }

    pub fn list_live(&self) -> Vec<KeyRecord> {
        let now = Utc::now();
        let mut live: Vec<KeyRecord> = self
            .inner()
            .keys
            .values()
            .filter(|r| r.is_live(now))
            .cloned()
            .collect();
        live.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        live
    }

    pub fn revoke(&self, id: &str, at: DateTime<Utc>, audit: &AuditEntry) -> Option<KeyHash> {
        let now = Utc::now();
        let hash = {
            let mut inner = self.inner();
            let hash = *inner.ids.get(id)?;
            let record = inner.keys.get_mut(&hash)?;
            if !record.is_live(now) {
                return None;
            }
            record.revoked_at = Some(at);
            inner.audit.push(audit.clone());
            hash
        };
        // No subscriber is not an error: nobody is listening yet.
        let _ = self.revoked.send(FeedEvent::Revoked(hash));
        Some(hash)
    }

    pub fn touch(&self, updates: &[(KeyHash, DateTime<Utc>)]) {
        let mut inner = self.inner();
        for (hash, at) in updates {
            if let Some(record) = inner.keys.get_mut(hash) {
                if record.last_used_at.is_none_or(|prev| prev < *at) {
                    record.last_used_at = Some(*at);
                }
            }
        }
    }

    pub fn audit(&self, since: Option<DateTime<Utc>>) -> Vec<AuditEntry> {
        self.inner()
            .audit
            .iter()
            .filter(|e| since.is_none_or(|s| e.time >= s))
            .cloned()
            .collect()
    }

    pub fn lookup_id(&self, id: &str) -> Option<KeyState> {
        let inner = self.inner();
        let hash = *inner.ids.get(id)?;
        let record = inner.keys.get(&hash)?.clone();
        Some(KeyState {
            hash,
            record,
            rotated_to: inner.rotated_to.get(id).cloned().unwrap_or_default(),
        })
    }

    /// The same checks and effects as `scripts/rotate.lua`, under one lock.
    pub fn rotate(&self, op: &RotateOp<'_>) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let old_expires = {
            let mut inner = self.inner();
            if inner.ids.get(op.old_id) != Some(&op.old_hash) {
                return None;
            }
            let seen = inner.rotated_to.get(op.old_id).map_or("", String::as_str);
            if seen != op.expect_rotated_to {
                return None;
            }
            if inner.keys.contains_key(&op.new_hash) || inner.ids.contains_key(&op.new_record.id) {
                return None;
            }
            let record = inner.keys.get_mut(&op.old_hash)?;
            if !record.is_live(now) {
                return None;
            }
            if record.expires_at.is_none_or(|e| op.grace_end < e) {
                record.expires_at = Some(op.grace_end);
            }
            let old_expires = record.expires_at;
            inner
                .rotated_to
                .insert(op.old_id.to_string(), op.new_record.id.clone());
            inner.keys.insert(op.new_hash, op.new_record.clone());
            inner.ids.insert(op.new_record.id.clone(), op.new_hash);
            inner.audit.push(op.audit.clone());
            old_expires
        };
        let _ = self.revoked.send(FeedEvent::Changed(op.old_hash));
        old_expires
    }

    pub fn add_usage(&self, marker: &str, deltas: &[UsageDelta], _retention: std::time::Duration) {
        let mut inner = self.inner();
        if !inner.usage_markers.insert(marker.to_string()) {
            return;
        }
        for d in deltas {
            let b = inner.usage.entry((d.key_id.clone(), d.hour)).or_default();
            b.0 += d.requests;
            b.1 += d.refused;
        }
    }

    pub fn usage(&self, id: &str, from: i64, to: i64) -> Vec<UsageHour> {
        let inner = self.inner();
        let mut out: Vec<UsageHour> = inner
            .usage
            .iter()
            .filter(|((k, h), c)| k == id && (from..=to).contains(h) && (c.0 > 0 || c.1 > 0))
            .map(|((_, h), c)| UsageHour {
                hour: *h,
                requests: c.0,
                refused: c.1,
            })
            .collect();
        out.sort_by_key(|u| u.hour);
        out
    }

    /// Forward revocations to `events` until it is closed. `Connected` is sent
    /// once the subscription exists, so no revocation after it is missed.
    pub fn spawn_revocation_feed(&self, events: mpsc::UnboundedSender<FeedEvent>) {
        let mut rx = self.revoked.subscribe();
        tokio::spawn(async move {
            if events.send(FeedEvent::Connected).is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = events.closed() => return,
                    r = rx.recv() => r,
                };
                let sent = match event {
                    Ok(event) => events.send(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => events
                        .send(FeedEvent::Lost)
                        .and_then(|()| events.send(FeedEvent::Connected)),
                    // The store was dropped: no more revocations can happen.
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sent.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeDelta;

    use super::*;

    fn hash(n: u8) -> KeyHash {
        KeyHash([n; 32])
    }

    fn record(id: &str, created_at: DateTime<Utc>, expires_at: Option<DateTime<Utc>>) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            prefix: format!("mok_{id}"),
            name: Some(format!("name {id}")),
            created_by: "cli:test".into(),
            created_at,
            expires_at,
            last_used_at: None,
            revoked_at: None,
            role: Default::default(),
            workspaces: Vec::new(),
            rate_limit: None,
        }
    }

    fn audit(action: &str, id: &str) -> AuditEntry {
        AuditEntry {
            time: Utc::now(),
            actor: "cli:test".into(),
            action: action.into(),
            key_id: id.into(),
            prefix: format!("mok_{id}"),
            name: None,
            client: None,
            user_agent: None,
            role: None,
            workspaces: Vec::new(),
            new_key_id: None,
        }
    }

    #[test]
    fn mint_lookup_list_revoke() {
        let s = MemoryStore::new("acme");
        let t0 = Utc::now();
        let r1 = record("a", t0, None);
        let r2 = record("b", t0 + TimeDelta::seconds(1), None);
        assert_eq!(
            s.mint(&hash(1), &r1, None, &audit("mint", "a")).unwrap(),
            MintOutcome::Minted { live: 1 }
        );
        assert_eq!(
            s.mint(&hash(2), &r2, None, &audit("mint", "b")).unwrap(),
            MintOutcome::Minted { live: 2 }
        );
        assert_eq!(s.lookup(&hash(1)), Some(r1.clone()));
        assert_eq!(s.lookup(&hash(3)), None);
        let ids: Vec<String> = s.list_live().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["b", "a"]);

        assert_eq!(
            s.revoke("a", Utc::now(), &audit("revoke", "a")),
            Some(hash(1))
        );
        assert_eq!(s.revoke("a", Utc::now(), &audit("revoke", "a")), None);
        assert_eq!(s.revoke("nope", Utc::now(), &audit("revoke", "nope")), None);
        assert!(s.lookup(&hash(1)).unwrap().revoked_at.is_some());
        let ids: Vec<String> = s.list_live().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["b"]);
        let actions: Vec<String> = s.audit(None).into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["mint", "mint", "revoke"]);
    }

    #[test]
    fn ceiling_counts_only_live_keys() {
        let s = MemoryStore::new("acme");
        let now = Utc::now();
        let expired = record("x", now, Some(now - TimeDelta::seconds(1)));
        s.mint(&hash(9), &expired, None, &audit("mint", "x"))
            .unwrap();
        for i in 0..2u8 {
            let r = record(&format!("k{i}"), now, None);
            let out = s.mint(&hash(i), &r, Some(2), &audit("mint", "k")).unwrap();
            assert_eq!(
                out,
                MintOutcome::Minted {
                    live: u64::from(i) + 1
                }
            );
        }
        let r = record("k2", now, None);
        assert_eq!(
            s.mint(&hash(2), &r, Some(2), &audit("mint", "k2")).unwrap(),
            MintOutcome::CeilingReached
        );
        assert_eq!(s.lookup(&hash(2)), None);
        // Expired keys are not live: not listed, not revocable.
        assert!(s.list_live().iter().all(|r| r.id != "x"));
        assert_eq!(s.revoke("x", now, &audit("revoke", "x")), None);
        // Revoking frees a slot.
        assert!(s.revoke("k0", now, &audit("revoke", "k0")).is_some());
        assert_eq!(
            s.mint(&hash(2), &r, Some(2), &audit("mint", "k2")).unwrap(),
            MintOutcome::Minted { live: 2 }
        );
    }

    #[test]
    fn touch_moves_last_used_forward_only_for_known_keys() {
        let s = MemoryStore::new("acme");
        let now = Utc::now();
        s.mint(&hash(1), &record("a", now, None), None, &audit("mint", "a"))
            .unwrap();
        let later = now + TimeDelta::seconds(5);
        s.touch(&[(hash(1), later), (hash(7), later)]);
        s.touch(&[(hash(1), now)]);
        assert_eq!(s.lookup(&hash(1)).unwrap().last_used_at, Some(later));
        assert_eq!(s.lookup(&hash(7)), None);
    }

    #[test]
    fn audit_since_filters() {
        let s = MemoryStore::new("acme");
        let now = Utc::now();
        let mut a = audit("mint", "a");
        a.time = now - TimeDelta::seconds(10);
        s.mint(&hash(1), &record("a", now, None), None, &a).unwrap();
        let mut b = audit("revoke", "a");
        b.time = now;
        s.revoke("a", now, &b);
        assert_eq!(s.audit(Some(now - TimeDelta::seconds(1))), vec![b]);
    }

    #[tokio::test]
    async fn feed_sends_connected_then_revocations() {
        let s = MemoryStore::new("acme");
        let (tx, mut rx) = mpsc::unbounded_channel();
        s.spawn_revocation_feed(tx);

        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap(),
            Some(FeedEvent::Connected)
        );
        s.mint(
            &hash(1),
            &record("a", Utc::now(), None),
            None,
            &audit("mint", "a"),
        )
        .unwrap();
        s.revoke("a", Utc::now(), &audit("revoke", "a"));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap(),
            Some(FeedEvent::Revoked(hash(1)))
        );
    }
}
