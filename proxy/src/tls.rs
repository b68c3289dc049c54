//! TLS on both sides of the proxy, with `etcd grpc-proxy start`'s flags:
//!
//! ```text
//!  client ──TLS (--cert-file/--key-file, or --auto-tls;──► proxy ──TLS (https:// endpoints,──► member
//!              --trusted-ca-file: client certificates           --cacert; --cert/--key as
//!              required and verified)                           the client certificate)
//! ```
//!
//! The client side is a [`TlsListener`]: TCP accepts feed handshakes that run concurrently (a
//! slow or silent client never holds up the others), and finished connections queue for the
//! server. ALPN offers `h2` (gRPC) and `http/1.1` (`/health`, `/metrics`). The member side is
//! tonic's rustls client.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Client handshakes in progress at once; further connections wait in the kernel's backlog.
const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_QUEUE_MAX: usize = 64;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the client-facing certificate comes from.
#[derive(Debug, Clone)]
pub enum ServerCert {
    /// `--cert-file` and `--key-file` (PEM).
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
    /// `--auto-tls`: a self-signed certificate for these names, made at start.
    SelfSigned(Vec<String>),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client-facing TLS configuration. With `trusted_ca`, every client must present a
/// certificate signed by one of its CAs (mutual TLS).
///
/// # Errors
/// A file that cannot be read or parsed, or a key that does not match.
pub fn server_config(
    cert: &ServerCert,
    trusted_ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = provider();
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match cert {
        ServerCert::Files { cert, key } => (
            CertificateDer::pem_file_iter(cert)
                .map_err(|e| anyhow::anyhow!("--cert-file {}: {e}", cert.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--cert-file {}: {e}", cert.display()))?,
            PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("--key-file {}: {e}", key.display()))?,
        ),
        ServerCert::SelfSigned(names) => {
            let made = rcgen::generate_simple_self_signed(names.clone())?;
            (
                vec![made.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der())),
            )
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match trusted_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| anyhow::anyhow!("--trusted-ca-file {}: {e}", ca.display()))?
            {
                roots.add(c.map_err(|e| anyhow::anyhow!("--trusted-ca-file: {e}"))?)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Builds the member-facing TLS configuration: the CA that signed the members' certificates and,
/// optionally, the proxy's client certificate.
///
/// # Errors
/// A file that cannot be read.
pub fn client_config(
    cacert: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let read = |flag: &str, p: &Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
    };
    let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read("--cacert", cacert)?),
    );
    if let Some((cert, key)) = identity {
        config = config.identity(tonic::transport::Identity::from_pem(
            read("--cert", cert)?,
            read("--key", key)?,
        ));
    }
    Ok(config)
}

/// A TLS listener for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp`.
    ///
    /// # Errors
    /// When the listener has no local address.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        let acceptor = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(Self {
            accepted,
            local,
            acceptor,
        })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (stream, addr) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a client connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without TCP_NODELAY small HTTP/2 frames meet Nagle + delayed ACK (~40 ms per request).
        let _ = stream.set_nodelay(true);
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(s)) => {
                    let _ = tx.send((s, addr)).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        });
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accept loop only ends with the listener; nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
