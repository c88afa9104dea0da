//! Rate-limit coordination in Redis (contract §11): one script call per
//! instance per tick reserves slices of each active key's window budget.
//! Counters are `keygate:{<slug>}:rl:<key id>:<window start>` (STRING,
//! the requests reserved by every instance in that window), in the tenant's
//! hash slot, expiring shortly after the window ends.

use super::RedisStore;
use crate::auth::store::{RateGrant, RateSync, StoreError};

/// Keys per script call (a larger batch is sent as several calls).
const SYNC_BATCH: usize = 512;

impl RedisStore {
    pub async fn rate_sync(&self, items: &[RateSync]) -> Result<Vec<RateGrant>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(SYNC_BATCH) {
            let mut inv = self.ratelimit.prepare();
            for it in chunk {
                inv.key(self.keys.rate(&it.key_id, it.window_start_s));
            }
            for it in chunk {
                inv.arg(it.limit).arg(it.add).arg(it.ask).arg(it.ttl_ms);
            }
            let got: Vec<(u64, u64)> = self.eval(inv).await?;
            if got.len() != chunk.len() {
                return Err(StoreError::Unavailable(
                    "rate limit script returned the wrong number of results".into(),
                ));
            }
            out.extend(
                got.into_iter()
                    .map(|(granted, total)| RateGrant { granted, total }),
            );
        }
        Ok(out)
    }
}
