//! The load benchmark's stand-in app: a single-threaded (current_thread tokio)
//! hyper HTTP/1.1 server that answers every request with `200 ok`
//! (`Content-Length: 2`), keep-alive on; `GET /__headers` answers with the
//! request headers it received instead.
//!
//! Built by `benches/load/run.sh` with `cargo bench --no-run --bench upstream`
//! and run directly (not through `cargo bench`):
//!
//! ```text
//! upstream ADDR          # or $UPSTREAM_ADDR; 127.0.0.1:0 picks a free port
//! upstream               # no address: exits at once (cargo test/bench run it so)
//! ```
//!
//! It prints `listening on <ip:port>` on stdout once bound (so port 0 works),
//! and exits on SIGTERM/SIGINT or when the listener fails.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"ok";

/// The path that answers with the request's headers instead (one `name: value`
/// a line, names lower-case, sorted), so run.sh can check that nginx and keygate
/// forward the same thing.
const HEADERS_PATH: &str = "/__headers";

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == HEADERS_PATH {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(n, v)| format!("{}: {}", n.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect();
        lines.sort();
        lines.push(String::new());
        return Ok(Response::new(Full::new(Bytes::from(lines.join("\n")))));
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

/// The address to serve on; `Ok(None)` when none was given — then this is
/// `cargo test --all-targets` / `cargo bench` running the target, which must
/// not start a server that never exits.
fn addr_from_args() -> Result<Option<SocketAddr>, String> {
    // `cargo bench` would pass `--bench`; skip any flag.
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let Some(raw) = arg.or_else(|| std::env::var("UPSTREAM_ADDR").ok()) else {
        return Ok(None);
    };
    raw.parse()
        .map(Some)
        .map_err(|e| format!("bad address {raw:?}: {e} (expected ip:port)"))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {local}")?;
        out.flush()?;
    }
    let mut http = http1::Builder::new();
    http.keep_alive(true);
    loop {
        let (stream, _) = listener.accept().await?;
        // Loopback benchmark traffic: small writes must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), service_fn(answer));
        tokio::spawn(async move {
            // A client closing mid-request is normal under wrk; nothing to report.
            let _ = conn.await;
        });
    }
}

fn main() -> std::process::ExitCode {
    let addr = match addr_from_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("upstream: no address given (usage: upstream ADDR); nothing to run");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = serve(addr) => r,
            _ = shutdown_signal() => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: upstream on {addr}: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // No signal handling: run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
