//! keygate: an authenticating reverse-proxy sidecar for organization API keys.
//!
//! The modules in the order a request meets them:
//!
//! - [`listener`] accepts the connection: limits, timeouts, TLS via [`tls`],
//!   the protocol decided once, every HTTP/1 head judged by its scan;
//! - [`proxy`] runs the stages below in the contract's order and turns any
//!   refusal into its answer, metric and log line;
//! - [`request`] decides target, Host and path (pure, no I/O);
//! - [`auth`] parses the credential and validates org keys (cache, store),
//!   and [`request::scope`] holds them to their role and workspaces (§8);
//! - [`ratelimit`] lets a limited key's request through or answers 429 (§11);
//! - [`keys_api`] answers `/org/tokens` itself (browser sessions via
//!   [`session`]; rotation and usage in [`keys_rotate`]);
//! - [`forward`] cleans the headers and sends everything else to the app
//!   over [`upstream`], whose HTTP/1.1 codec is [`h1`];
//! - [`key_notice`] adds the expiry notice to the answer and counts it in
//!   the key's usage (§9, §10).
//!
//! Beside the path: [`config`] (validated once), [`app`] (the shared state),
//! [`exchange`] and [`error`] (the types every stage shares), [`failure`]
//! and [`time`] (error chains, RFC 3339), [`admin`] and [`metrics`],
//! [`logging`], [`shutdown`], and the binary's [`cli`] and [`demo`].
//!
//! [`run`] and [`spawn`] are the seam the binary and the integration tests
//! share: an already-validated [`config::Config`], already-bound listeners
//! and a shutdown signal.
#![forbid(unsafe_code)]
#![recursion_limit = "256"]

pub mod auth;
pub mod forward;
pub mod h1;
pub mod key_notice;
pub mod keys_api;
pub mod keys_rotate;
pub mod listener;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod session;
pub mod time;
pub mod tls;
pub mod upstream;

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod exchange;
pub mod failure;
pub mod logging;
pub mod metrics;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use app::App;
use auth::store::Store;
use config::Config;

/// Why keygate could not start (after the config validated): each names
/// its cause; the binary prints it as one `error:` line and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listen.tls: {0}")]
    Tls(tls::TlsError),
    #[error("{0}")]
    Upstream(String),
    #[error("session: {0}")]
    Session(tls::TlsError),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the address of a bound listener: {0}")]
    LocalAddr(std::io::Error),
}

/// Listeners bound before `run` (so start-up fails before anything is served,
/// and tests can bind `127.0.0.1:0` and read the port).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Bind the configured public and admin addresses.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |what, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        Ok(Listeners {
            public: bind("listen.addr", config.listen.addr).await?,
            admin: Some(bind("admin.addr", config.admin.addr).await?),
        })
    }
}

/// A running keygate (tests, demo): addresses and the shutdown trigger.
pub struct RunHandle {
    pub public_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    pub shutdown: shutdown::Trigger,
    pub done: tokio::task::JoinHandle<()>,
}

impl RunHandle {
    /// Fire the shutdown and wait for the drain to finish.
    pub async fn stop(self) {
        self.shutdown.fire();
        let _ = self.done.await;
    }
}

/// Serve until `shutdown` fires, then drain (bounded by `listen.shutdown_grace`).
pub async fn run(
    config: Config,
    store: Store,
    listeners: Listeners,
    shutdown: shutdown::Signal,
) -> Result<(), StartError> {
    let app = App::new(config, store)?;
    serve(app, listeners, shutdown).await;
    Ok(())
}

/// Start keygate on already-bound listeners in the background.
pub async fn spawn(
    config: Config,
    store: Store,
    listeners: Listeners,
) -> Result<RunHandle, StartError> {
    let app = App::new(config, store)?;
    let public_addr = listeners
        .public
        .local_addr()
        .map_err(StartError::LocalAddr)?;
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    let (trigger, signal) = shutdown::channel();
    let done = tokio::spawn(serve(app.clone(), listeners, signal));
    Ok(RunHandle {
        public_addr,
        admin_addr,
        app,
        shutdown: trigger,
        done,
    })
}

async fn serve(app: Arc<App>, listeners: Listeners, shutdown: shutdown::Signal) {
    tls::reload_on_sighup(app.tls.clone(), shutdown.clone());
    if let Some(admin) = listeners.admin {
        tokio::spawn(admin::serve(admin, app.clone(), shutdown.clone()));
    }
    if let Some(log) = &app.access_log {
        log.spawn_flusher();
    }
    listener::serve(listeners.public, app.clone(), app.tls.clone(), shutdown).await;
    if let Some(log) = &app.access_log {
        log.flush();
    }
    // The usage counted since the last flush (§10), bounded by store.timeout.
    if let Err(e) = app.auth.flush_usage().await {
        tracing::warn!(error = %e, "usage could not be written at shutdown");
    }
}
