//! App state and [`run`]: the seam shared by `keygate serve`, `keygate demo`
//! and the integration tests. Everything a request needs lives in one [`App`]
//! behind an `Arc` (no globals), so tests can run many keygates in parallel.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;
use tokio::net::TcpListener;

use crate::auth::store::Store;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::Rejection;
use crate::forward::{Forwarder, ProxyBody};
use crate::metrics::Metrics;
use crate::proxy::json_response;
use crate::request::Gate;
use crate::session::SessionVerifier;
use crate::shutdown::{self, Tracker};

pub struct App {
    pub config: Arc<Config>,
    pub gate: Gate,
    pub auth: Arc<Authenticator>,
    pub forwarder: Forwarder,
    pub sessions: Option<SessionVerifier>,
    pub metrics: Arc<Metrics>,
    /// Upgraded (WebSocket) tunnels, drained on shutdown like requests.
    pub tunnels: Tracker,
    /// The access log, when `log.access` is on.
    pub access_log: Option<Arc<crate::logging::AccessLog>>,
    www_authenticate: HeaderValue,
}

impl App {
    /// Build the app state (starts the authenticator's background tasks).
    pub fn new(config: Config, store: Store) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new());
        let auth = Authenticator::start(&config, store, metrics.clone());
        let forwarder = Forwarder::new(&config)?;
        let sessions = match &config.session {
            Some(s) => Some(SessionVerifier::new(s).map_err(|e| format!("session: {e}"))?),
            None => None,
        };
        let www_authenticate = HeaderValue::from_str(&format!(
            "Bearer realm=\"{}\", error=\"invalid_token\"",
            config.tenant.slug
        ))
        .map_err(|_| "tenant.slug: not usable in a header".to_string())?;
        Ok(Arc::new(App {
            gate: Gate::new(&config),
            access_log: crate::logging::AccessLog::new(&config.log),
            config: Arc::new(config),
            auth,
            forwarder,
            sessions,
            metrics,
            tunnels: Tracker::default(),
            www_authenticate,
        }))
    }

    /// The JSON answer for a refusal (status, fixed message, extra headers).
    pub fn reject(&self, rejection: Rejection, request_id: &HeaderValue) -> Response<ProxyBody> {
        let body = serde_json::to_vec(&serde_json::json!({ "error": rejection.message() }))
            .unwrap_or_default();
        let mut resp = json_response(rejection.status(), Bytes::from(body), request_id);
        let h = resp.headers_mut();
        if rejection.wants_www_authenticate() {
            h.insert(header::WWW_AUTHENTICATE, self.www_authenticate.clone());
        }
        if rejection.wants_retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if rejection.close_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Listeners bound before `run` (so start-up fails before anything is served,
/// and tests can bind `127.0.0.1:0` and read the port).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Bind the configured public and admin addresses.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let public = TcpListener::bind(config.listen.addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("listen.addr {}: {e}", config.listen.addr))
        })?;
        let admin = TcpListener::bind(config.admin.addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("admin.addr {}: {e}", config.admin.addr))
        })?;
        Ok(Listeners {
            public,
            admin: Some(admin),
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
) -> Result<(), String> {
    let app = App::new(config, store)?;
    serve_app(app, listeners, shutdown).await;
    Ok(())
}

/// Start keygate on already-bound listeners in the background.
pub async fn spawn(
    config: Config,
    store: Store,
    listeners: Listeners,
) -> Result<RunHandle, String> {
    let app = App::new(config, store)?;
    let public_addr = listeners.public.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    let (trigger, signal) = shutdown::channel();
    let done = tokio::spawn(serve_app(app.clone(), listeners, signal));
    Ok(RunHandle {
        public_addr,
        admin_addr,
        app,
        shutdown: trigger,
        done,
    })
}

async fn serve_app(app: Arc<App>, listeners: Listeners, shutdown: shutdown::Signal) {
    let tls = match &app.config.listen.tls {
        Some(tls) => match crate::tls::TlsAcceptor::new(tls) {
            Ok(acceptor) => Some(Arc::new(acceptor)),
            Err(e) => {
                tracing::error!(error = %e, "cannot load TLS certificate");
                return;
            }
        },
        None => None,
    };
    if let Some(admin) = listeners.admin {
        tokio::spawn(crate::admin::serve(admin, app.clone(), shutdown.clone()));
    }
    if let Some(log) = &app.access_log {
        log.spawn_flusher();
    }
    crate::listener::serve(listeners.public, app.clone(), tls, shutdown).await;
    if let Some(log) = &app.access_log {
        log.flush();
    }
}
