//! keygate: an authenticating reverse-proxy sidecar for organization API keys.
//!
//! The request path reads top to bottom through the modules, in the order a
//! request meets them (see `proxy::handle`):
//!
//! 1. [`listener`] accepts the connection (limits, timeouts, TLS via [`tls`]);
//! 2. [`request`] decides target, Host and path — pure functions, no I/O;
//! 3. [`auth`] parses the credential and validates org keys (cache, store);
//! 4. [`keys_api`] answers `/org/tokens` itself;
//! 5. [`forward`] sends everything else to the app with clean headers.
//!
//! [`run`] is the seam the binary and the integration tests share: it takes
//! an already-validated [`config::Config`], already-bound listeners and a
//! shutdown signal.
#![forbid(unsafe_code)]
#![recursion_limit = "256"]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod h1;
pub mod head_scan;
pub mod keys_api;
pub mod link;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod request;
pub mod session;
pub mod shutdown;
pub mod tls;

pub use app::{run, Listeners, RunHandle};
