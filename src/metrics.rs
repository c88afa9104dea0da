//! The metrics registry, owned by the app (no globals), so parallel tests and
//! several keygates in one process never share counters. Hot-path metrics are
//! resolved once at start-up: recording an outcome is one atomic add.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::auth::Refusal;
use crate::error::Outcome;

pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    key_refusals: Vec<IntCounter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub revocations: IntCounter,
    pub open_connections: IntGauge,
    pub parked_connections: IntGauge,
    pub cache_size: IntGauge,
    pub store_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub accept_errors: IntCounter,
    /// §11 coordination rounds (one store call each) and their failures.
    pub ratelimit_syncs: IntCounter,
    pub ratelimit_store_errors: IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new("keygate_requests_total", "Requests by outcome."),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests_vec.clone()))
            .expect("register");
        let requests = Outcome::ALL
            .iter()
            .map(|o| requests_vec.with_label_values(&[o.label()]))
            .collect();
        let refusals_vec = IntCounterVec::new(
            Opts::new(
                "keygate_key_refusals_total",
                "Org keys refused (401), by reason: malformed, bad_checksum, unknown, revoked, expired, other_tenant.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(refusals_vec.clone()))
            .expect("register");
        let key_refusals = Refusal::ALL
            .iter()
            .map(|r| refusals_vec.with_label_values(&[r.label()]))
            .collect();

        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from request head to response head, keygate's answer or the app's.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time the app took to send its response head.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let cache_hits = IntCounter::new(
            "keygate_auth_cache_hits_total",
            "Org-key checks answered from the local cache.",
        )
        .expect("valid metric");
        let cache_misses = IntCounter::new(
            "keygate_auth_cache_misses_total",
            "Org-key checks that needed the store.",
        )
        .expect("valid metric");
        let revocations = IntCounter::new(
            "keygate_revocations_total",
            "Revocations this instance applied to its cache (served here or learned from the feed).",
        )
        .expect("valid metric");
        let open_connections = IntGauge::new(
            "keygate_open_connections",
            "Client connections currently open on the public listener.",
        )
        .expect("valid metric");
        let parked_connections = IntGauge::new(
            "keygate_parked_connections",
            "Idle HTTP/1 client connections holding no HTTP state or buffers (of keygate_open_connections).",
        )
        .expect("valid metric");
        let cache_size = IntGauge::new("keygate_auth_cache_entries", "Keys in the local cache.")
            .expect("valid metric");
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_store_duration_seconds",
                "Key store call durations.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "keygate_store_errors_total",
                "Key store calls that failed or timed out.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let accept_errors = IntCounter::new(
            "keygate_accept_errors_total",
            "Errors accepting client connections (e.g. out of file descriptors).",
        )
        .expect("valid metric");
        let ratelimit_syncs = IntCounter::new(
            "keygate_rate_limit_syncs_total",
            "Rate-limit coordination rounds (one store call for every active limited key).",
        )
        .expect("valid metric");
        let ratelimit_store_errors = IntCounter::new(
            "keygate_rate_limit_store_errors_total",
            "Rate-limit coordination rounds that failed (limits then enforced per instance).",
        )
        .expect("valid metric");
        for m in [
            Box::new(request_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ratelimit_syncs.clone()),
            Box::new(ratelimit_store_errors.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(revocations.clone()),
            Box::new(open_connections.clone()),
            Box::new(parked_connections.clone()),
            Box::new(cache_size.clone()),
            Box::new(store_duration.clone()),
            Box::new(store_errors.clone()),
            Box::new(accept_errors.clone()),
        ] {
            registry.register(m).expect("register");
        }
        Metrics {
            registry,
            requests,
            key_refusals,
            request_duration,
            upstream_duration,
            cache_hits,
            cache_misses,
            revocations,
            open_connections,
            parked_connections,
            cache_size,
            store_duration,
            store_errors,
            accept_errors,
            ratelimit_syncs,
            ratelimit_store_errors,
        }
    }

    #[inline]
    pub fn record_outcome(&self, outcome: Outcome) {
        self.requests[outcome.index()].inc();
    }

    #[inline]
    pub fn record_refusal(&self, reason: Refusal) {
        self.key_refusals[reason.index()].inc();
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Keeps `keygate_open_connections` right on every exit path.
pub struct ConnectionGuard(IntGauge);

impl ConnectionGuard {
    pub fn new(gauge: &IntGauge) -> ConnectionGuard {
        gauge.inc();
        ConnectionGuard(gauge.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
