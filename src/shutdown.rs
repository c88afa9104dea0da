//! Shutdown plumbing: a [`Trigger`] / [`Signal`] pair (a watch channel) and a
//! [`Tracker`] that counts in-flight work (connections, upgraded tunnels) so
//! the drain can wait for it, bounded by `listen.shutdown_grace`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// Fires the shutdown. Dropping it also counts as a shutdown.
#[derive(Clone)]
pub struct Trigger(Arc<watch::Sender<bool>>);

/// Resolves once shutdown was requested.
#[derive(Clone)]
pub struct Signal(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(Arc::new(tx)), Signal(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Signal {
    /// Wait until shutdown is requested (or the trigger is gone).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}

/// Counts live work items; [`Tracker::wait_idle`] resolves when none is left.
#[derive(Clone, Default)]
pub struct Tracker(Arc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    count: AtomicUsize,
    idle: Notify,
}

/// One unit of tracked work; dropping it releases it.
pub struct TrackGuard(Arc<TrackerInner>);

impl Tracker {
    pub fn track(&self) -> TrackGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a release in between is not missed.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
