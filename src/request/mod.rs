//! The gate's first three stages (contract §3 steps 1–3), as pure functions
//! over the request parts: request target, Host / `:authority`, path.
//! No I/O here; every refusal is a typed [`Rejection`].
//!
//! OWNER: gate helper.

pub mod host;
pub mod path;
pub mod target;

use http::request::Parts;

use crate::config::Config;
use crate::error::Rejection;

/// Longest request target (path + query) keygate accepts: 8 KiB → 414 beyond.
pub const MAX_TARGET_LEN: usize = 8 * 1024;

/// What the gate established about an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The request arrived in absolute-form (HTTP/1.1) or with `:authority`
    /// (HTTP/2): the forwarder rewrites it to origin-form and sets `Host`.
    pub rewrite_to_origin_form: bool,
}

/// Steps 1–3, configured once from [`Config`].
#[derive(Debug, Clone)]
pub struct Gate {
    served_hosts: Vec<String>,
    deny_prefixes: Vec<String>,
}

impl Gate {
    pub fn new(config: &Config) -> Gate {
        Gate {
            served_hosts: config.tenant.served_hosts(),
            deny_prefixes: config.policy.deny_prefixes.clone(),
        }
    }

    /// Target (step 1), Host (step 2), path (step 3), in that order.
    pub fn check(&self, parts: &Parts) -> Result<Admitted, Rejection> {
        let _ = (&self.served_hosts, &self.deny_prefixes, parts);
        todo!("gate helper")
    }

    pub fn served_hosts(&self) -> &[String] {
        &self.served_hosts
    }
}
