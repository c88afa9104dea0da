//! Who holds an idle connection to the app, and for how long.
//!
//! - A client connection's **home** keeps the link its last request used,
//!   for its next one (HTTP/1 clients send one request at a time: no
//!   contention, no checkout). At most `upstream.own_links` client
//!   connections hold a home link at once; beyond that, and for HTTP/2
//!   clients (many streams at once), requests use the shared pool.
//! - The shared **pool** keeps up to `upstream.max_idle` idle connections,
//!   most recently used first.
//! - When a client connection is parked (idle, see `listener::park`) or
//!   closes, its home link moves to the pool ([`Home::release`]): an idle
//!   client never pins a connection to the app.
//! - Every idle connection is closed after `upstream.idle_timeout`: a sweeper
//!   task closes the pool's, and a checkout never hands out an expired or
//!   dead one (closed by the app, or with unsolicited bytes).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::conn::AppConn;

pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Client connections holding a home link now (see `own_cap`).
    own: AtomicUsize,
    own_cap: usize,
}

struct Idle {
    conn: AppConn,
    since: Instant,
}

/// Where a connection goes back to when its response is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Home,
    Pool,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration, own_cap: usize) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            own: AtomicUsize::new(0),
            own_cap,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep(Arc::downgrade(&pool), idle_timeout));
        }
        pool
    }

    /// An idle connection for a request (`None`: dial one), and where it
    /// goes back afterwards. `home`: the client connection's, if it may keep one.
    pub fn checkout(&self, home: Option<&Home>) -> (Option<AppConn>, Return) {
        let to = match home {
            Some(h) if h.claim(self) => Return::Home,
            _ => Return::Pool,
        };
        if let Some(conn) = home.and_then(|h| h.take()) {
            if let Some(conn) = self.usable(conn) {
                return (Some(conn), to);
            }
        }
        loop {
            let Some(Idle { conn, since }) = lock(&self.idle).pop() else {
                return (None, to);
            };
            if since.elapsed() >= self.idle_timeout {
                continue;
            }
            if let Some(conn) = self.usable(conn) {
                return (Some(conn), to);
            }
        }
    }

    fn usable(&self, mut conn: AppConn) -> Option<AppConn> {
        (conn.idle_for() < self.idle_timeout && conn.alive_while_idle()).then_some(conn)
    }

    /// A connection whose response ended cleanly, ready for another request.
    pub fn check_in(&self, mut conn: AppConn, to: Return, home: Option<&Home>) {
        conn.mark_idle();
        if let (Return::Home, Some(home)) = (to, home) {
            if let Some(conn) = home.put(conn) {
                self.put_idle(conn);
            }
            return;
        }
        self.put_idle(conn);
    }

    fn put_idle(&self, mut conn: AppConn) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            conn.release_buffer();
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections in the shared pool now.
    pub fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// Closes the pool's expired connections until the pool is gone.
async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let expired: Vec<Idle> = {
            let mut idle = lock(&pool.idle);
            let keep = idle
                .iter()
                .position(|i| i.since.elapsed() < idle_timeout)
                .unwrap_or(idle.len());
            // Oldest first: everything before `keep` has expired.
            idle.drain(..keep).collect()
        };
        drop(expired); // closed outside the lock
    }
}

/// A client connection's slot for its own link to the app.
pub struct Home {
    pool: Weak<Pool>,
    slot: Mutex<Option<AppConn>>,
    /// Counted against `upstream.own_links`.
    owns: std::sync::atomic::AtomicBool,
}

impl Home {
    pub fn new(pool: &Arc<Pool>) -> Home {
        Home {
            pool: Arc::downgrade(pool),
            slot: Mutex::new(None),
            owns: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether this connection may keep a link (claims a slot under the cap).
    fn claim(&self, pool: &Pool) -> bool {
        if self.owns.load(Ordering::Acquire) {
            return true;
        }
        if pool.own.fetch_add(1, Ordering::AcqRel) < pool.own_cap {
            self.owns.store(true, Ordering::Release);
            true
        } else {
            pool.own.fetch_sub(1, Ordering::AcqRel);
            false
        }
    }

    fn take(&self) -> Option<AppConn> {
        lock(&self.slot).take()
    }

    /// Keeps `conn`; hands it back when the slot is taken.
    fn put(&self, conn: AppConn) -> Option<AppConn> {
        let mut slot = lock(&self.slot);
        if slot.is_some() {
            return Some(conn);
        }
        *slot = Some(conn);
        None
    }

    /// The client connection is idle or gone: its link moves to the shared
    /// pool and its claim on `upstream.own_links` ends.
    pub fn release(&self) {
        let conn = self.take();
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.owns.swap(false, Ordering::AcqRel) {
            pool.own.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(conn) = conn {
            pool.put_idle(conn);
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        self.release();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
