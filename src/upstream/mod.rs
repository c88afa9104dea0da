//! Stage 6's transport: every request keygate forwards reaches the app
//! through [`Upstream::send`], over one HTTP/1.1 codec of keygate's own
//! ([`crate::h1`]) — HTTP/1 and HTTP/2 clients, plain and `https` apps,
//! WebSocket upgrades alike — so timeouts, keepalive, retries, framing and
//! error mapping are the same on every path.
//!
//! - [`io`]: the socket (TCP or TLS), dialling, TCP keepalive;
//! - [`pool`]: which idle connection serves a request (the client
//!   connection's own link, or the shared pool), idle expiry;
//! - [`conn`]: one exchange on a connection, and the streamed response body;
//! - [`tunnel`]: an upgraded connection relayed both ways.
//!
//! Why not hyper's client: measured on the load benchmark, hyper's client
//! dispatcher (a task per connection, two channels per request) cost
//! keygate ~12% of its throughput against nginx; writing the head in one
//! `write` and streaming the body straight from the socket made keygate
//! level with nginx (BENCHMARKS.md). The codec is pure and unit-tested on
//! bytes, and checked end to end by the smuggling oracle (tests/smuggling.rs).

pub mod conn;
pub mod io;
pub mod pool;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::Body;

pub use conn::{AppConn, Bounds, Exchange, UpstreamBody};
pub use pool::Home;

use crate::config::Config;
use crate::error::{BoxError, Rejection};
use crate::h1::{BodyKind, H1Error};
use conn::Back;
use io::Dialer;
use pool::Pool;

/// Why a request could not be exchanged with the app (logs get the
/// `Display`; the client gets [`UpstreamError::rejection`]'s fixed answer).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to the app failed: {0}")]
    Connect(std::io::Error),
    #[error("connect to the app timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake with the app failed: {0}")]
    Tls(std::io::Error),
    #[error("writing the request to the app failed: {0}")]
    Write(std::io::Error),
    #[error("the app took no request bytes for {0:?}")]
    WriteStalled(Duration),
    #[error("reading the app's response failed: {0}")]
    Read(std::io::Error),
    #[error("the app closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Protocol(H1Error),
    #[error("no response head from the app within {0:?}")]
    HeadTimeout(Duration),
    #[error("the client's request body failed: {0}")]
    RequestBody(BoxError),
    #[error("the client sent no request body bytes for {0:?}")]
    RequestBodyTimeout(Duration),
    #[error("the app's response body broke: {0}")]
    Body(&'static str),
}

impl UpstreamError {
    /// Failed before any response byte on a reused connection: the app most
    /// likely closed it while idle, so a replayable request may go again.
    fn stale(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        match self {
            UpstreamError::Closed => true,
            UpstreamError::Write(e) | UpstreamError::Read(e) => {
                matches!(e.kind(), BrokenPipe | ConnectionReset)
            }
            _ => false,
        }
    }

    /// The answer the client gets.
    pub fn rejection(&self) -> Rejection {
        match self {
            UpstreamError::HeadTimeout(_) | UpstreamError::WriteStalled(_) => {
                Rejection::UpstreamTimeout
            }
            UpstreamError::RequestBodyTimeout(_) => Rejection::BodyTimeout,
            UpstreamError::RequestBody(_) => Rejection::BadBody,
            UpstreamError::Connect(_)
            | UpstreamError::ConnectTimeout(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Write(_)
            | UpstreamError::Read(_)
            | UpstreamError::Closed
            | UpstreamError::Protocol(_)
            | UpstreamError::Body(_) => Rejection::UpstreamUnreachable,
        }
    }
}

/// One request on its way to the app.
pub struct Outbound<B> {
    pub exchange: Exchange<B>,
    /// Safe to send again on a fresh connection when a reused one turns out
    /// dead (never with a body: it cannot be replayed).
    pub idempotent: bool,
    /// The client connection's home, when it may keep a link of its own
    /// (HTTP/1 clients; `None` for HTTP/2 and upgrades).
    pub home: Option<Arc<Home>>,
}

/// What the app answered.
pub enum Answer {
    Response(Response<UpstreamBody>),
    /// 101 to a WebSocket upgrade: the head, and the connection as a tunnel.
    Upgrade(http::response::Parts, AppConn),
}

/// The app, as every forwarded request reaches it.
pub struct Upstream {
    dialer: Dialer,
    pool: Arc<Pool>,
    bounds: Bounds,
}

/// Most reused connections tried before dialling afresh for a replayable request.
const STALE_RETRIES: usize = 2;

impl Upstream {
    pub fn new(config: &Config) -> Result<Upstream, String> {
        let u = &config.upstream;
        let tls = if u.url.scheme_str() == Some("https") {
            Some(
                crate::tls::upstream_client_config(u.ca_file.as_deref())
                    .map_err(|e| format!("upstream.ca_file: {e}"))?,
            )
        } else {
            None
        };
        Ok(Upstream {
            dialer: Dialer::new(&u.url, u.connect_timeout, tls)?,
            pool: Pool::new(u.max_idle, u.idle_timeout, u.own_links),
            bounds: Bounds {
                timeout: u.timeout,
                body_timeout: config.listen.body_timeout,
                read_timeout: u.read_timeout,
            },
        })
    }

    /// A new client connection's home for its own link.
    pub fn home(&self) -> Arc<Home> {
        Arc::new(Home::new(&self.pool))
    }

    /// Idle connections in the shared pool.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Sends `out` and returns the app's answer, its body streaming.
    pub async fn send<B>(&self, mut out: Outbound<B>) -> Result<Answer, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let replayable = out.idempotent && out.exchange.body.is_none();
        let mut reuses = 0;
        loop {
            let (pooled, to) = if reuses < STALE_RETRIES {
                self.pool.checkout(out.home.as_deref())
            } else {
                (None, pool::Return::Pool)
            };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                // Boxed: dialling (DNS, TLS) is rare and its future large.
                None => AppConn::new(Box::pin(self.dialer.dial()).await?),
            };
            let (head, early) = match conn.round_trip(&mut out.exchange, &self.bounds).await {
                Ok(answer) => answer,
                Err(e) if reused && replayable && e.stale() => {
                    reuses += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if head.body == BodyKind::Upgrade {
                return Ok(Answer::Upgrade(head.parts, conn));
            }
            let back = Back {
                pool: self.pool.clone(),
                to,
                home: out.home.take(),
            };
            let keep_alive = head.keep_alive && !early;
            let body =
                UpstreamBody::new(conn, head.body, keep_alive, back, self.bounds.read_timeout)?;
            return Ok(Answer::Response(Response::from_parts(head.parts, body)));
        }
    }
}
