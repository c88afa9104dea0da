//! The state every request shares, in one [`App`] behind an `Arc` (no
//! globals), so tests can run many keygates in one process. Built once at
//! start ([`App::new`]); everything that can fail to build fails here,
//! before anything is served.

use std::sync::Arc;

use http::header::HeaderValue;

use crate::auth::store::Store;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::request::Gate;
use crate::session::SessionVerifier;
use crate::shutdown::Tracker;
use crate::tls::TlsAcceptor;
use crate::StartError;

pub struct App {
    pub config: Arc<Config>,
    pub gate: Gate,
    pub auth: Arc<Authenticator>,
    pub forwarder: Forwarder,
    pub sessions: Option<SessionVerifier>,
    pub metrics: Arc<Metrics>,
    /// The public listener's TLS, when `[listen.tls]` is set.
    pub tls: Option<Arc<TlsAcceptor>>,
    /// Upgraded (WebSocket) tunnels, drained on shutdown like requests.
    pub tunnels: Tracker,
    /// The access log, when `log.access` is on.
    pub access_log: Option<Arc<crate::logging::AccessLog>>,
    /// `Bearer realm="<slug>", error="invalid_token"` for 401 answers.
    pub www_authenticate: HeaderValue,
    /// §11 per-key rate limits (coordinated through the store).
    pub ratelimit: Arc<crate::ratelimit::RateLimiter>,
}

impl App {
    /// Build the app state (starts the authenticator's background tasks).
    pub fn new(config: Config, store: Store) -> Result<Arc<App>, StartError> {
        let tls = match &config.listen.tls {
            Some(tls) => Some(Arc::new(TlsAcceptor::new(tls).map_err(StartError::Tls)?)),
            None => None,
        };
        let forwarder = Forwarder::new(&config).map_err(StartError::Upstream)?;
        let sessions = match &config.session {
            Some(s) => Some(SessionVerifier::new(s).map_err(StartError::Session)?),
            None => None,
        };
        let www_authenticate = HeaderValue::from_str(&format!(
            "Bearer realm=\"{}\", error=\"invalid_token\"",
            config.tenant.slug
        ))
        .map_err(|_| StartError::Upstream("tenant.slug: not usable in a header".into()))?;
        let metrics = Arc::new(Metrics::new());
        let ratelimit = Arc::new(crate::ratelimit::RateLimiter::new(config.store.timeout));
        crate::ratelimit::coord::spawn(&ratelimit, store.clone(), metrics.clone());
        let auth = Authenticator::start(&config, store, metrics.clone());
        Ok(Arc::new(App {
            gate: Gate::new(&config),
            access_log: crate::logging::AccessLog::new(&config.log),
            config: Arc::new(config),
            auth,
            forwarder,
            sessions,
            metrics,
            tls,
            tunnels: Tracker::default(),
            www_authenticate,
            ratelimit,
        }))
    }
}
