//! TLS: the public listener's rustls server configuration (TLS 1.2 and 1.3
//! only, ALPN `h2` then `http/1.1`, a bounded handshake) with a certificate
//! that `SIGHUP` reloads in place, and the client configuration keygate uses
//! towards an `https://` upstream or session verifier.
//!
//! The certificate sits behind a [`ResolvesServerCert`] that hands out the
//! current pair for every new handshake, so a reload never touches open
//! connections and never rebuilds the `ServerConfig`. A reload that fails
//! (missing file, bad PEM, key not matching the certificate) keeps the old
//! pair: an operator's typo must not take the listener down.
//!
//! Errors name the file and the cause; they never carry key material.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::TlsConfig;

/// ALPN protocols offered by the public listener, in preference order.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// TLS versions keygate speaks, on both sides.
static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS12, &rustls::version::TLS13];

/// A certificate, key or CA file that keygate cannot use. The message names the
/// file and the cause, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("no certificate in {}", path.display())]
    NoCertificate { path: PathBuf },
    #[error("invalid PEM in {}: {reason}", path.display())]
    BadCertificatePem { path: PathBuf, reason: String },
    #[error("invalid certificate in {}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("no private key in {}", path.display())]
    NoKey { path: PathBuf },
    /// Deliberately without the parser's detail: it is about the key file's content.
    #[error("invalid PEM in {}", path.display())]
    BadKeyPem { path: PathBuf },
    #[error("unusable private key in {}: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order; at least one.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificatePem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Load a PEM certificate chain and its private key (PKCS#8, PKCS#1 or SEC1),
/// checking that the key belongs to the chain's first certificate.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key_pem = read_file(key)?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(der) => der,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key.to_path_buf(),
            })
        }
        Err(_) => {
            return Err(TlsError::BadKeyPem {
                path: key.to_path_buf(),
            })
        }
    };
    drop(key_pem);
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::BadKey {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        Ok(()) => Ok(Arc::new(pair)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
        // The key type cannot report its public half: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(e) => Err(TlsError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Hands the current pair to every new handshake; `reload` swaps it.
struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The public listener's TLS side: a reloadable certificate, the rustls
/// server configuration built on it, and the handshake bound.
#[derive(Clone)]
pub struct TlsAcceptor {
    cert: Arc<ReloadableCert>,
    config: Arc<rustls::ServerConfig>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("cert", &self.cert.cert_path)
            .field("key", &self.cert.key_path)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

impl TlsAcceptor {
    /// Load `cfg.cert` / `cfg.key`; any problem is returned (at start-up: a
    /// config error, exit 2).
    pub fn new(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let pair = load_pair(&cfg.cert, &cfg.key)?;
        let cert = Arc::new(ReloadableCert {
            cert_path: cfg.cert.clone(),
            key_path: cfg.key.clone(),
            current: RwLock::new(pair),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        Ok(TlsAcceptor {
            cert,
            acceptor: tokio_rustls::TlsAcceptor::from(config.clone()),
            config,
            handshake_timeout: cfg.handshake_timeout,
        })
    }

    /// Re-read the certificate and key files. New handshakes get the new pair;
    /// open connections are untouched. On error the old pair stays in use and
    /// the error (naming the file) is returned for the caller to log.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.cert.cert_path, &self.cert.key_path)?;
        *self
            .cert
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = pair;
        Ok(())
    }

    /// The certificate chain currently served (DER, leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.cert.current().cert.clone()
    }

    /// The rustls server configuration (shares the reloadable certificate).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The handshake bound from `listen.tls.handshake_timeout`.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Run the server handshake on an accepted connection, bounded by the
    /// handshake timeout (`io::ErrorKind::TimedOut` when exceeded).
    pub async fn accept<IO>(&self, io: IO) -> io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            )),
        }
    }
}

/// Whether the client and keygate agreed on HTTP/2 via ALPN.
pub fn negotiated_h2<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
}

/// Client TLS for an `https://` upstream (and the session verifier): the
/// webpki roots plus every certificate in `ca_file`, TLS 1.2/1.3, SNI and
/// certificate verification on.
///
/// ALPN is left empty on purpose: hyper-rustls' connector builder refuses a
/// config with ALPN set and writes it itself from the enabled HTTP versions
/// (`enable_http1()` alone sends none, which servers treat as HTTP/1.1).
pub fn upstream_client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::BadCertificate {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// SIGHUP: reload the listener's certificate and key (a bad file keeps the
/// old pair and logs why). Without `[listen.tls]` there is nothing to
/// reload: it is logged and keygate keeps serving — SIGHUP never ends the
/// process (an operator's `systemctl reload` must not take a tenant down).
pub fn reload_on_sighup(tls: Option<Arc<TlsAcceptor>>, mut shutdown: crate::shutdown::Signal) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; TLS reload disabled");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match &tls {
                        None => tracing::info!("SIGHUP: no [listen.tls] configured, nothing to reload"),
                        Some(tls) => match tls.reload() {
                            Ok(()) => tracing::info!("TLS certificate reloaded"),
                            Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
                        },
                    }
                }
                _ = shutdown.recv() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    struct Pair {
        cert_pem: String,
        key_pem: String,
        cert_der: CertificateDer<'static>,
    }

    fn generate(name: &str) -> Pair {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
        Pair {
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
            cert_der: ck.cert.der().clone(),
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    fn write_files(cert_pem: &str, key_pem: &str) -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, cert_pem).expect("write cert");
        std::fs::write(&key, key_pem).expect("write key");
        Files {
            _dir: dir,
            cert,
            key,
        }
    }

    fn tls_config(files: &Files, handshake_timeout: Duration) -> TlsConfig {
        TlsConfig {
            cert: files.cert.clone(),
            key: files.key.clone(),
            handshake_timeout,
        }
    }

    /// A real handshake against `acceptor`, trusting only `trusted`; returns
    /// the certificate the server presented and the ALPN protocol agreed.
    async fn handshake(
        acceptor: &TlsAcceptor,
        trusted: &[CertificateDer<'static>],
        alpn: &[&[u8]],
    ) -> Result<(CertificateDer<'static>, Option<Vec<u8>>, bool), String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_acceptor = acceptor.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = server_acceptor.accept(tcp).await?;
            let h2 = negotiated_h2(&tls);
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            Ok::<bool, io::Error>(h2)
        });

        let mut roots = rustls::RootCertStore::empty();
        for c in trusted {
            roots.add(c.clone()).expect("add root");
        }
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("keygate.test").expect("name");
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut echo = [0u8; 4];
        tls.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        assert_eq!(&echo, b"ping");
        let (_, conn) = tls.get_ref();
        let presented = conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .expect("server presented a certificate");
        let alpn = conn.alpn_protocol().map(|p| p.to_vec());
        let server_h2 = server
            .await
            .expect("server task")
            .map_err(|e| e.to_string())?;
        Ok((presented, alpn, server_h2))
    }

    #[test]
    fn load_pair_accepts_matching_pair() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let pair = load_pair(&f.cert, &f.key).expect("valid pair loads");
        assert_eq!(pair.cert, vec![p.cert_der]);
    }

    #[test]
    fn load_pair_rejects_key_of_another_certificate() {
        let a = generate("keygate.test");
        let b = generate("keygate.test");
        let f = write_files(&a.cert_pem, &b.key_pem);
        let err = load_pair(&f.cert, &f.key).expect_err("mismatched key must fail");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("does not match certificate"), "{msg}");
        assert!(msg.contains(&f.cert.display().to_string()), "{msg}");
    }

    #[test]
    fn load_pair_names_missing_file() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let missing = f.cert.with_file_name("absent.crt");
        let err = load_pair(&missing, &f.key).expect_err("missing cert must fail");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("cannot read {}: ", missing.display())),
            "{msg}"
        );
        let missing_key = f.key.with_file_name("absent.key");
        let err = load_pair(&f.cert, &missing_key).expect_err("missing key must fail");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", missing_key.display())),
            "{err}"
        );
    }

    #[test]
    fn load_pair_rejects_garbage() {
        let p = generate("keygate.test");

        let f = write_files("this is not a certificate\n", &p.key_pem);
        let err = load_pair(&f.cert, &f.key).expect_err("garbage cert");
        assert_eq!(
            err.to_string(),
            format!("no certificate in {}", f.cert.display())
        );

        let f = write_files(&p.cert_pem, "garbage\n");
        let err = load_pair(&f.cert, &f.key).expect_err("garbage key");
        assert_eq!(
            err.to_string(),
            format!("no private key in {}", f.key.display())
        );

        // A key file holding only a certificate has no key either.
        let f = write_files(&p.cert_pem, &p.cert_pem);
        let err = load_pair(&f.cert, &f.key).expect_err("cert as key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");

        // A PEM block with a broken body.
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let f = write_files(broken, &p.key_pem);
        let err = load_pair(&f.cert, &f.key).expect_err("broken PEM");
        assert!(err.to_string().starts_with("invalid PEM in "), "{err}");

        // Valid PEM, but the DER inside is not a certificate.
        let junk_der = "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n";
        let f = write_files(junk_der, &p.key_pem);
        let err = load_pair(&f.cert, &f.key).expect_err("junk DER");
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err}");
    }

    #[test]
    fn key_errors_do_not_echo_key_material() {
        let p = generate("keygate.test");
        let body_line = p
            .key_pem
            .lines()
            .nth(1)
            .expect("pem has a body")
            .to_string();
        let truncated: String = p.key_pem.lines().take(2).collect::<Vec<_>>().join("\n");
        let f = write_files(&p.cert_pem, &truncated);
        let err = load_pair(&f.cert, &f.key).expect_err("truncated key");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(&body_line), "{shown}");
        assert!(!shown.contains(&body_line[..16]), "{shown}");
    }

    #[tokio::test]
    async fn handshake_offers_h2_and_http11() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let acceptor = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5))).expect("acceptor");

        let (cert, alpn, server_h2) = handshake(
            &acceptor,
            std::slice::from_ref(&p.cert_der),
            &[b"h2", b"http/1.1"],
        )
        .await
        .expect("handshake");
        assert_eq!(cert, p.cert_der);
        assert_eq!(alpn.as_deref(), Some(b"h2".as_slice()));
        assert!(server_h2);

        let (_, alpn, server_h2) =
            handshake(&acceptor, std::slice::from_ref(&p.cert_der), &[b"http/1.1"])
                .await
                .expect("handshake");
        assert_eq!(alpn.as_deref(), Some(b"http/1.1".as_slice()));
        assert!(!server_h2);

        // No ALPN at all is HTTP/1.1.
        let (_, alpn, server_h2) = handshake(&acceptor, std::slice::from_ref(&p.cert_der), &[])
            .await
            .expect("handshake");
        assert_eq!(alpn, None);
        assert!(!server_h2);
    }

    #[tokio::test]
    async fn reload_switches_certificate_for_new_handshakes() {
        let old = generate("keygate.test");
        let f = write_files(&old.cert_pem, &old.key_pem);
        let acceptor = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5))).expect("acceptor");
        let both = [old.cert_der.clone()];
        let (cert, _, _) = handshake(&acceptor, &both, &[]).await.expect("old");
        assert_eq!(cert, old.cert_der);

        let new = generate("keygate.test");
        std::fs::write(&f.cert, &new.cert_pem).expect("write");
        std::fs::write(&f.key, &new.key_pem).expect("write");
        // Not reloaded yet: still the old one.
        assert_eq!(acceptor.current_chain(), vec![old.cert_der.clone()]);
        acceptor.reload().expect("reload");
        assert_eq!(acceptor.current_chain(), vec![new.cert_der.clone()]);

        let both = [old.cert_der.clone(), new.cert_der.clone()];
        let (cert, _, _) = handshake(&acceptor, &both, &[]).await.expect("new");
        assert_eq!(cert, new.cert_der);
    }

    #[tokio::test]
    async fn reload_with_broken_files_keeps_old_certificate() {
        let old = generate("keygate.test");
        let f = write_files(&old.cert_pem, &old.key_pem);
        let acceptor = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5))).expect("acceptor");

        // Garbage certificate.
        std::fs::write(&f.cert, "not pem").expect("write");
        let err = acceptor.reload().expect_err("garbage cert");
        assert!(err.to_string().contains("no certificate in"), "{err}");

        // New certificate with the old key: mismatch.
        let new = generate("keygate.test");
        std::fs::write(&f.cert, &new.cert_pem).expect("write");
        let err = acceptor.reload().expect_err("mismatch");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");

        // Missing key file.
        std::fs::remove_file(&f.key).expect("rm");
        let err = acceptor.reload().expect_err("missing key");
        assert!(matches!(err, TlsError::Read { .. }), "{err}");

        assert_eq!(acceptor.current_chain(), vec![old.cert_der.clone()]);
        let (cert, _, _) = handshake(&acceptor, std::slice::from_ref(&old.cert_der), &[])
            .await
            .expect("still served");
        assert_eq!(cert, old.cert_der);
    }

    #[tokio::test]
    async fn new_fails_on_bad_files() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, "garbage");
        let err = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5)))
            .expect_err("bad key at start");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_client_is_cut_off_at_handshake_timeout() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let acceptor =
            TlsAcceptor::new(&tls_config(&f, Duration::from_millis(200))).expect("acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Connected but never speaks.
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp))
            .await
            .expect("accept must give up on its own");
        let err = result.expect_err("silent client cannot complete a handshake");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// Send a hand-made ClientHello (rustls' client cannot speak TLS 1.1) and
    /// return the server's handshake result and the first record type it sent.
    async fn raw_hello(version: [u8; 2]) -> (io::Result<()>, Option<u8>) {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let acceptor = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5))).expect("acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            acceptor.accept(tcp).await.map(|_| ())
        });
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&client_hello(version)).await.expect("send");
        let mut head = [0u8; 1];
        let first = match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head)).await {
            Ok(Ok(1)) => Some(head[0]),
            _ => None,
        };
        drop(tcp);
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server finished")
            .expect("server task");
        (result, first)
    }

    #[tokio::test]
    async fn tls11_only_client_is_refused() {
        // Control: the same hello claiming TLS 1.2 gets a ServerHello (record type 22).
        let (_, first) = raw_hello([0x03, 0x03]).await;
        assert_eq!(
            first,
            Some(22),
            "TLS 1.2 hello must be answered with a handshake"
        );

        let (result, first) = raw_hello([0x03, 0x02]).await;
        let err = result.expect_err("a TLS 1.1-only handshake must fail");
        assert!(err.to_string().contains("Tls12NotOffered"), "{err}");
        // A fatal alert (record type 21), never a ServerHello.
        assert_eq!(first, Some(21), "expected an alert");
    }

    /// A minimal ClientHello with `version` as client_version and no
    /// supported_versions extension (so TLS 1.3 is not offered).
    fn client_hello(version: [u8; 2]) -> Vec<u8> {
        fn ext(id: u16, data: &[u8]) -> Vec<u8> {
            let mut e = id.to_be_bytes().to_vec();
            e.extend_from_slice(&(data.len() as u16).to_be_bytes());
            e.extend_from_slice(data);
            e
        }
        let mut exts = Vec::new();
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        exts.extend(ext(
            0x000d,
            &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
        ));
        // supported_groups: x25519, secp256r1
        exts.extend(ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]));
        // ec_point_formats: uncompressed
        exts.extend(ext(0x000b, &[0x01, 0x00]));

        let mut body = Vec::new();
        body.extend_from_slice(&version);
        body.extend_from_slice(&[0x11; 32]); // random
        body.push(0); // session id
                      // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256
        body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);

        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    #[test]
    fn upstream_client_config_adds_ca_file() {
        let p = generate("upstream.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let cfg = upstream_client_config(Some(&f.cert)).expect("ca file loads");
        assert!(cfg.alpn_protocols.is_empty());
        assert!(cfg.enable_sni);
        upstream_client_config(None).expect("webpki roots only");
        let err = upstream_client_config(Some(&f.key)).expect_err("a key is not a CA");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let missing = f.cert.with_file_name("none.pem");
        let err = upstream_client_config(Some(&missing)).expect_err("missing");
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
    }

    #[tokio::test]
    async fn upstream_client_config_trusts_ca_file_and_verifies_names() {
        let p = generate("keygate.test");
        let f = write_files(&p.cert_pem, &p.key_pem);
        let acceptor = TlsAcceptor::new(&tls_config(&f, Duration::from_secs(5))).expect("acceptor");

        for (name, ok) in [("keygate.test", true), ("other.test", false)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let a = acceptor.clone();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.expect("accept");
                let _ = a.accept(tcp).await;
            });
            let client = upstream_client_config(Some(&f.cert)).expect("client config");
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let server_name = ServerName::try_from(name.to_string()).expect("name");
            let result = connector.connect(server_name, tcp).await;
            assert_eq!(result.is_ok(), ok, "{name}: {:?}", result.err());
            drop(result);
            let _ = server.await;
        }

        // Without the CA file the self-signed upstream is not trusted.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let a = acceptor.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ = a.accept(tcp).await;
        });
        let client = upstream_client_config(None).expect("client config");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let server_name = ServerName::try_from("keygate.test").expect("name");
        assert!(connector.connect(server_name, tcp).await.is_err());
        let _ = server.await;
    }
}
