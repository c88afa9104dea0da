//! Log set-up: JSON or text lines per `[log]`. Access log lines use the target
//! `keygate::access`. Nothing logged anywhere carries a token, a cookie or
//! `upstream.authorization`: those values never reach a `Debug`/`Display` impl.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Where log lines go.
#[derive(Clone, Copy)]
pub enum Sink {
    Stdout,
    Stderr,
}

/// Install the global subscriber (once per process; later calls are ignored).
pub fn init(cfg: &LogConfig, sink: Sink) {
    let filter = EnvFilter::try_new(format!(
        "{level},h2=warn,hyper=warn,hyper_util=warn,rustls=warn,redis=warn",
        level = cfg.level
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = match (cfg.format, sink) {
        (LogFormat::Json, Sink::Stdout) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .try_init(),
        (LogFormat::Json, Sink::Stderr) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .try_init(),
        (LogFormat::Text, Sink::Stdout) => builder.with_writer(std::io::stdout).try_init(),
        (LogFormat::Text, Sink::Stderr) => builder.with_writer(std::io::stderr).try_init(),
    };
    let _ = result;
}
