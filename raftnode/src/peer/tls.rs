//! Peer TLS for QUIC. Two modes:
//! - **certificate files** (`--peer-cert-file`, `--peer-key-file`, `--peer-trusted-ca-file`,
//!   optional `--peer-crl-file`): mutual TLS, each side verifies the other against the trusted
//!   CA (and the CRL);
//! - **auto TLS** (`--peer-auto-tls`, the default without files): a self-signed certificate
//!   generated at start; traffic is encrypted but peers are not authenticated, as etcd's
//!   `--peer-auto-tls`. For trial clusters only.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    UnixTime,
};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::wire::ALPN;
use crate::config::PeerTlsConfig;

/// Idle time after which a silent peer connection is dropped (keepalives keep live ones up);
/// also how long requests to a dead peer's cached connection can hang before failing.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Keepalive interval on peer connections.
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Concurrent request streams a peer may open (each RPC is one stream).
const STREAMS_PER_PEER_MAX: u32 = 1024;
/// Per-stream flow-control window; large enough for a full append-entries payload in flight.
const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Per-connection flow-control window.
const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// QUIC configurations for both roles.
pub struct PeerTls {
    /// For accepting peers.
    pub server: quinn::ServerConfig,
    /// For dialing peers.
    pub client: quinn::ClientConfig,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS_PER_PEER_MAX.into())
        .stream_receive_window(STREAM_WINDOW_BYTES.into())
        .receive_window(CONNECTION_WINDOW_BYTES.into())
        .send_window(CONNECTION_WINDOW_BYTES.into())
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// Builds the peer TLS configuration from the flags.
///
/// # Errors
/// When a certificate, key, CA or CRL file cannot be read or does not parse.
pub fn build(cfg: &PeerTlsConfig, hosts: &[String]) -> anyhow::Result<PeerTls> {
    let provider = provider();
    let (server, client) = match cfg {
        PeerTlsConfig::Auto => {
            let mut names = hosts.to_vec();
            names.push("localhost".into());
            let cert = rcgen::generate_simple_self_signed(names)?;
            let chain = vec![cert.cert.der().clone()];
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider.clone())))
                .with_no_client_auth();
            (server, client)
        }
        PeerTlsConfig::Files {
            cert,
            key,
            trusted_ca,
            crl,
        } => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(trusted_ca)? {
                roots.add(ca?)?;
            }
            let roots = Arc::new(roots);
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            );
            if let Some(crl) = crl {
                let crls: Vec<CertificateRevocationListDer<'static>> =
                    CertificateRevocationListDer::pem_file_iter(crl)?.collect::<Result<_, _>>()?;
                verifier = verifier.with_crls(crls);
            }
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier.build()?)
                .with_single_cert(chain.clone(), key.clone_key())?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)?;
            (server, client)
        }
    };
    let mut server = server;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = client;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
    server.transport_config(transport());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
    client.transport_config(transport());
    Ok(PeerTls { server, client })
}

/// Auto TLS: any server certificate is accepted (handshake signatures are still checked, so the
/// session is bound to the presented key).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
