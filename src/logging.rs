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

/// The access log: one line per request, written by keygate itself into a
/// buffer that goes to stdout every 100 ms, when it passes 32 KiB, and at
/// shutdown — one `write` per batch instead of one formatted event and one
/// `write` per request (the per-request cost of logging is what makes a proxy
/// slower than nginx with `access_log` on). Same fields and format as the
/// rest of the log (`log.format`); never a credential.
pub struct AccessLog {
    format: LogFormat,
    state: std::sync::Mutex<AccessBuf>,
}

struct AccessBuf {
    bytes: Vec<u8>,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`, reused within that second.
    stamp: String,
    second: i64,
}

/// One access-log line's fields.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub client: std::net::IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub duration_ms: f64,
    pub key_id: Option<&'a str>,
    /// A refused org key: why (`malformed`, `bad_checksum`, `unknown`,
    /// `revoked`, `expired`, `other_tenant`) and its 12-character prefix.
    pub refusal: Option<&'a str>,
    pub prefix: Option<&'a str>,
    pub upstream_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// A WebSocket tunnel's line (written when it closes): why it ended.
    pub tunnel_end: Option<&'a str>,
}

const ACCESS_FLUSH_BYTES: usize = 32 * 1024;

impl AccessLog {
    /// `None` when access lines are off (`log.access = false`, or a level
    /// above `info`).
    pub fn new(cfg: &LogConfig) -> Option<std::sync::Arc<AccessLog>> {
        let info_enabled = matches!(cfg.level.as_str(), "trace" | "debug" | "info");
        (cfg.access && info_enabled).then(|| {
            std::sync::Arc::new(AccessLog {
                format: cfg.format,
                state: std::sync::Mutex::new(AccessBuf {
                    bytes: Vec::with_capacity(ACCESS_FLUSH_BYTES + 1024),
                    stamp: String::new(),
                    second: i64::MIN,
                }),
            })
        })
    }

    /// Flush every 100 ms while the runtime runs.
    pub fn spawn_flusher(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(log) => log.flush(),
                    None => return,
                }
            }
        });
    }

    pub fn write(&self, l: &AccessLine<'_>) {
        use std::fmt::Write as _;
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let now = chrono::Utc::now();
        let second = now.timestamp();
        if second != st.second {
            st.second = second;
            st.stamp = now.format("%Y-%m-%dT%H:%M:%S").to_string();
        }
        let micros = now.timestamp_subsec_micros();
        let mut line = String::with_capacity(320);
        match self.format {
            LogFormat::Json => {
                let _ = write!(
                    line,
                    "{{\"timestamp\":\"{}.{micros:06}Z\",\"level\":\"INFO\",\"target\":\"keygate::access\",\"request_id\":\"",
                    st.stamp
                );
                json_escape(&mut line, l.request_id);
                let _ = write!(line, "\",\"client\":\"{}\",\"method\":\"", l.client);
                json_escape(&mut line, l.method);
                line.push_str("\",\"path\":\"");
                json_escape(&mut line, l.path);
                let _ = write!(
                    line,
                    "\",\"status\":{},\"outcome\":\"{}\",\"duration_ms\":{:.3},\"key_id\":",
                    l.status, l.outcome, l.duration_ms
                );
                match l.key_id {
                    Some(k) => {
                        line.push('"');
                        json_escape(&mut line, k);
                        line.push('"');
                    }
                    None => line.push_str("null"),
                }
                if let Some(reason) = l.refusal {
                    let _ = write!(line, ",\"refusal\":\"{reason}\"");
                }
                if let Some(p) = l.prefix {
                    line.push_str(",\"prefix\":\"");
                    json_escape(&mut line, p);
                    line.push('"');
                }
                match l.upstream_status {
                    Some(s) => {
                        let _ = write!(line, ",\"upstream_status\":{s}");
                    }
                    None => line.push_str(",\"upstream_status\":null"),
                }
                let _ = write!(
                    line,
                    ",\"bytes_in\":{},\"bytes_out\":{}",
                    l.bytes_in, l.bytes_out
                );
                if let Some(end) = l.tunnel_end {
                    let _ = write!(line, ",\"tunnel_end\":\"{end}\"");
                }
                line.push_str("}\n");
            }
            LogFormat::Text => {
                let _ = writeln!(
                    line,
                    "{}.{micros:06}Z  INFO keygate::access: request_id={} client={} method={} path={:?} status={} outcome={} duration_ms={:.3} key_id={} upstream_status={} bytes_in={} bytes_out={}",
                    st.stamp,
                    l.request_id,
                    l.client,
                    l.method,
                    l.path,
                    l.status,
                    l.outcome,
                    l.duration_ms,
                    l.key_id.unwrap_or("-"),
                    l.upstream_status.map_or_else(|| "-".to_string(), |s| s.to_string()),
                    l.bytes_in,
                    l.bytes_out
                );
                if l.refusal.is_some() || l.prefix.is_some() || l.tunnel_end.is_some() {
                    line.pop();
                    if let Some(reason) = l.refusal {
                        let _ = write!(line, " refusal={reason}");
                    }
                    if let Some(p) = l.prefix {
                        let _ = write!(line, " prefix={p:?}");
                    }
                    if let Some(end) = l.tunnel_end {
                        let _ = write!(line, " tunnel_end={end}");
                    }
                    line.push('\n');
                }
            }
        }
        st.bytes.extend_from_slice(line.as_bytes());
        if st.bytes.len() >= ACCESS_FLUSH_BYTES {
            let batch =
                std::mem::replace(&mut st.bytes, Vec::with_capacity(ACCESS_FLUSH_BYTES + 1024));
            drop(st);
            write_stdout(&batch);
        }
    }

    /// Write out what is buffered (also at shutdown).
    pub fn flush(&self) {
        let batch = match self.state.lock() {
            Ok(mut st) if !st.bytes.is_empty() => std::mem::take(&mut st.bytes),
            _ => return,
        };
        write_stdout(&batch);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

fn write_stdout(batch: &[u8]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(batch);
    let _ = out.flush();
}

fn json_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_parse_and_escape() {
        let cfg = LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
            access: true,
        };
        let log = AccessLog::new(&cfg).unwrap();
        log.write(&AccessLine {
            request_id: "r1",
            client: "127.0.0.1".parse().unwrap(),
            method: "GET",
            path: "/a\"b\\c",
            status: 200,
            outcome: "forwarded",
            duration_ms: 1.5,
            key_id: Some("k1"),
            refusal: None,
            prefix: None,
            upstream_status: Some(200),
            bytes_in: 3,
            bytes_out: 2,
            tunnel_end: None,
        });
        let bytes = std::mem::take(&mut log.state.lock().unwrap().bytes);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["path"], "/a\"b\\c");
        assert_eq!(v["key_id"], "k1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 2);
        assert_eq!(v["target"], "keygate::access");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn refused_key_fields_in_both_formats() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let cfg = LogConfig {
                format,
                level: "info".into(),
                access: true,
            };
            let log = AccessLog::new(&cfg).unwrap();
            log.write(&AccessLine {
                request_id: "r1",
                client: "127.0.0.1".parse().unwrap(),
                method: "GET",
                path: "/",
                status: 401,
                outcome: "unauthorized",
                duration_ms: 0.5,
                key_id: Some("k1"),
                refusal: Some("revoked"),
                prefix: Some("mok_abcdefgh"),
                upstream_status: None,
                bytes_in: 0,
                bytes_out: 45,
                tunnel_end: None,
            });
            let bytes = std::mem::take(&mut log.state.lock().unwrap().bytes);
            let text = String::from_utf8(bytes).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "{text}");
            match format {
                LogFormat::Json => {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["refusal"], "revoked");
                    assert_eq!(v["prefix"], "mok_abcdefgh");
                    assert_eq!(v["key_id"], "k1");
                }
                LogFormat::Text => {
                    assert!(
                        text.ends_with(" refusal=revoked prefix=\"mok_abcdefgh\"\n"),
                        "{text}"
                    );
                    assert!(text.contains(" key_id=k1 "), "{text}");
                }
            }
        }
    }

    #[test]
    fn off_below_info_or_when_disabled() {
        let mut cfg = LogConfig {
            format: LogFormat::Text,
            level: "warn".into(),
            access: true,
        };
        assert!(AccessLog::new(&cfg).is_none());
        cfg.level = "info".into();
        cfg.access = false;
        assert!(AccessLog::new(&cfg).is_none());
    }
}
