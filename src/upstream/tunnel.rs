//! An upgraded (WebSocket) connection relayed both ways until either side
//! closes, nothing moves in either direction for `listen.idle_timeout`, or
//! the key that opened it stops being valid (revoked or expired: `ends`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::conn::AppConn;

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// One side closed (or failed).
    Closed,
    /// Nothing in either direction for the idle limit.
    Idle,
    /// The key that opened the tunnel was revoked or expired.
    KeyEnded,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::KeyEnded => "key_ended",
        }
    }
}

/// What a tunnel carried.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub client_to_app: u64,
    pub app_to_client: u64,
    pub end: End,
}

/// Relays `client` and `app` both ways (the bytes the app sent after its
/// 101 head first) until one of the ends above.
pub async fn relay<C>(
    client: C,
    app: AppConn,
    idle: Duration,
    ends: impl Future<Output = ()>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let (app_io, early) = app.into_tunnel();
    let mut client = Counted::new(client, activity.clone());
    let mut app = Counted::new(app_io, activity.clone());
    let end = {
        let copy = async {
            if !early.is_empty() {
                client.write_all(&early).await?;
            }
            tokio::io::copy_bidirectional(&mut client, &mut app).await
        };
        tokio::select! {
            _ = copy => End::Closed,
            _ = ends => End::KeyEnded,
            _ = activity.idle_for(idle) => End::Idle,
        }
    };
    Relayed {
        client_to_app: client.read,
        app_to_client: app.read + early.len() as u64,
        end,
    }
}

/// When the last byte moved, in milliseconds after `born`.
struct Activity {
    born: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let due =
                self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A side of the tunnel: bytes read counted, every byte moved recorded.
struct Counted<T> {
    inner: T,
    activity: Arc<Activity>,
    read: u64,
}

impl<T> Counted<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Counted<T> {
        Counted {
            inner,
            activity,
            read: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
