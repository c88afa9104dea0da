//! The accept loop: a connection slot held before each accept (at
//! `listen.max_connections`, new clients wait in the kernel backlog), an
//! accept error never ends it (EMFILE, ECONNABORTED: log, count, back off),
//! one task per connection, and the drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::conn::{self, Alpn};
use crate::app::App;
use crate::exchange::ConnInfo;
use crate::metrics::ConnectionGuard;
use crate::shutdown::{Signal, Tracker};
use crate::tls::TlsAcceptor;

pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<TlsAcceptor>>,
    mut shutdown: Signal,
) {
    let limits = Arc::new(Semaphore::new(app.config.listen.max_connections));
    let connections = Tracker::default();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = limits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.recv() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.recv() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(err) => {
                app.metrics.accept_errors.inc();
                tracing::error!(error = %err, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let guard = connections.track();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            let _open = ConnectionGuard::new(&app.metrics.open_connections);
            let info = Arc::new(ConnInfo::new(
                peer,
                &app.config.listen.trusted_proxies,
                tls.is_some(),
                app.forwarder.upstream().home(),
            ));
            match tls {
                None => conn::serve(stream, app, info, None, drain).await,
                // Boxed: the TLS handshake and stream are several KiB that a
                // plain connection's task should not reserve.
                Some(tls) => Box::pin(serve_tls(stream, tls, app, info, drain)).await,
            }
        });
    }
    drop(listener);
    // Drain: in-flight requests and tunnels get `shutdown_grace` to finish.
    let _ = drain_tx.send(true);
    let grace = app.config.listen.shutdown_grace;
    let tunnels = app.tunnels.clone();
    let drained = tokio::time::timeout(grace, async {
        connections.wait_idle().await;
        tunnels.wait_idle().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.count(),
            tunnels = app.tunnels.count(),
            "shutdown grace elapsed; closing remaining connections"
        );
    }
}

async fn serve_tls(
    stream: TcpStream,
    tls: Arc<TlsAcceptor>,
    app: Arc<App>,
    info: Arc<ConnInfo>,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let peer = info.peer;
    match first_byte(&stream, tls.handshake_timeout()).await {
        Some(b) if b.is_ascii_uppercase() => return plain_http_on_tls(stream).await,
        Some(_) => {}
        None => return,
    }
    match tls.accept(stream).await {
        Ok(stream) => {
            let alpn = match crate::tls::negotiated_h2(&stream) {
                true => Some(Alpn::H2),
                false if stream.get_ref().1.alpn_protocol().is_some() => Some(Alpn::Http1),
                false => None,
            };
            conn::serve(stream, app, info, alpn, drain).await
        }
        Err(err) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
    }
}

/// The first byte the client sent, without consuming it (a TLS record
/// starts with 0x16; an HTTP request with a method's upper-case letter).
async fn first_byte(stream: &TcpStream, within: Duration) -> Option<u8> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(within, stream.peek(&mut b)).await {
        Ok(Ok(1)) => Some(b[0]),
        _ => None,
    }
}

/// A cleartext HTTP request on the TLS port: answered like nginx does (400
/// with a clear message, in plain HTTP), then closed.
async fn plain_http_on_tls(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":"plain HTTP request sent to the TLS port: use https://"}"#;
    let id = crate::exchange::new_request_id();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-request-id: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        id.to_str().unwrap_or("0"),
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
