//! A byte stream to the app — plain TCP or TLS — and how one is dialled:
//! DNS, connect bounded by `upstream.connect_timeout` (the TLS handshake
//! included), `TCP_NODELAY`, TCP keepalive.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::UpstreamError;

/// TCP keepalive on every connection to the app: the first probe after this
/// much silence (then every [`KEEPALIVE_INTERVAL`]), so a peer that vanished
/// without a FIN (a rebooted host, a dropped NAT entry) is noticed.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A connection to the app.
pub enum AppIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AppIo {
    /// Whether a connection that sat idle is still usable: not closed by the
    /// app, nothing unsolicited received. Never waits.
    pub fn alive_while_idle(&mut self) -> bool {
        match self {
            AppIo::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            AppIo::Tls(tls) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }
}

impl AsyncRead for AppIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            AppIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AppIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AppIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            AppIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AppIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AppIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            AppIo::Plain(s) => s.is_write_vectored(),
            AppIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppIo::Plain(s) => Pin::new(s).poll_flush(cx),
            AppIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AppIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            AppIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where and how the app is dialled.
pub struct Dialer {
    /// `host:port`, resolved at each connect (the app may move).
    pub addr: String,
    pub connect_timeout: Duration,
    /// For an `https://` app: the client config (ALPN `http/1.1`) and the name to verify.
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    /// `upstream.url`'s host and port; TLS for `https`.
    pub fn new(
        url: &http::Uri,
        connect_timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Dialer, String> {
        let authority = url
            .authority()
            .ok_or_else(|| "upstream.url: missing host".to_string())?;
        let https = url.scheme_str() == Some("https");
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host();
        let tls = match (https, tls) {
            (true, Some(mut config)) => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(bare.to_string())
                    .map_err(|_| format!("upstream.url: {host} is not a valid TLS server name"))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
            (true, None) => return Err("upstream.url: https needs a TLS client config".into()),
            (false, _) => None,
        };
        Ok(Dialer {
            addr: format!("{host}:{port}"),
            connect_timeout,
            tls,
        })
    }

    /// A new connection, within `connect_timeout`.
    pub async fn dial(&self) -> Result<AppIo, UpstreamError> {
        let dial = async {
            let tcp = connect_tcp(&self.addr)
                .await
                .map_err(UpstreamError::Connect)?;
            match &self.tls {
                None => Ok(AppIo::Plain(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| AppIo::Tls(Box::new(s)))
                    .map_err(UpstreamError::Tls),
            }
        };
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
        }
    }
}

async fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                tcp.set_nodelay(true)?;
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL);
                socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("the app's host resolved to no address")))
}
