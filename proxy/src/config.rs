//! `keyhold-proxy` configuration: `etcd grpc-proxy start`'s flag names, each also settable as
//! `KEYHOLD_PROXY_<NAME>` (upper case, `-` → `_`). Parsed once by clap and validated once into
//! [`ValidConfig`]; every default lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// Command-line flags of `keyhold-proxy`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "keyhold-proxy",
    version,
    about = "A stateless etcd v3 gRPC proxy in front of Keyhold (or etcd) members"
)]
pub struct Config {
    /// Comma-separated storage member endpoints (`host:port`, `http://host:port`, or
    /// `https://host:port` with `--cacert`).
    #[arg(
        long,
        env = "KEYHOLD_PROXY_ENDPOINTS",
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: String,
    /// Address to serve clients on (gRPC, and `/metrics` + `/health` over HTTP).
    #[arg(
        long,
        env = "KEYHOLD_PROXY_LISTEN_ADDR",
        default_value = "127.0.0.1:23790"
    )]
    pub listen_addr: String,
    /// When set, MemberList answers with this proxy (one member with this client URL) instead of
    /// the storage members, so clients that sync endpoints keep talking to the proxy.
    #[arg(long, env = "KEYHOLD_PROXY_ADVERTISE_CLIENT_URL", default_value = "")]
    pub advertise_client_url: String,
    /// Extra HTTP listener for `/metrics` and `/health` (e.g. `http://127.0.0.1:23791`).
    #[arg(long, env = "KEYHOLD_PROXY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Serializable reads never go back in revision, also across upstream switches.
    #[arg(
        long,
        env = "KEYHOLD_PROXY_SERIALIZABLE_ORDERING",
        alias = "experimental-serializable-ordering"
    )]
    pub serializable_ordering: bool,
    /// Key prefix clients are confined to: they see the keys under it as the whole key space
    /// (KV, Watch and Lease, as etcd's grpc-proxy).
    #[arg(long, env = "KEYHOLD_PROXY_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// Registers this proxy under `<prefix>/<advertise-client-url>` (etcd's naming format) on a
    /// lease of `--resolver-ttl` seconds; MemberList then lists every registered proxy.
    #[arg(long, env = "KEYHOLD_PROXY_RESOLVER_PREFIX", default_value = "")]
    pub resolver_prefix: String,
    /// TTL in seconds of the registration lease (required with `--resolver-prefix`).
    #[arg(long, env = "KEYHOLD_PROXY_RESOLVER_TTL", default_value_t = 0)]
    pub resolver_ttl: i64,
    /// Keepalive ping interval towards the members.
    #[arg(long, env = "KEYHOLD_PROXY_DIAL_KEEPALIVE_TIME", default_value = "2s", value_parser = parse_duration)]
    pub dial_keepalive_time: Duration,
    /// How long a keepalive ping may go unanswered before the connection counts as dead.
    #[arg(long, env = "KEYHOLD_PROXY_DIAL_KEEPALIVE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dial_keepalive_timeout: Duration,
    /// Upper bound of the range cache, in bytes of cached responses (0 disables the cache).
    #[arg(long, env = "KEYHOLD_PROXY_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_bytes: u64,
    /// Largest request a client may send, as on a member.
    #[arg(long, env = "KEYHOLD_PROXY_MAX_RECV_BYTES", default_value_t = 1536 * 1024 + 512 * 1024)]
    pub max_recv_bytes: usize,
    /// Certificate (PEM) clients see: the proxy serves TLS (with `--key-file`).
    #[arg(long, env = "KEYHOLD_PROXY_CERT_FILE")]
    pub cert_file: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--cert-file`.
    #[arg(long, env = "KEYHOLD_PROXY_KEY_FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// CA bundle (PEM) that signs client certificates: clients must present one (mutual TLS).
    #[arg(long, env = "KEYHOLD_PROXY_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<std::path::PathBuf>,
    /// Serve TLS to clients with a self-signed certificate made at start (trials only: clients
    /// cannot verify it).
    #[arg(long, env = "KEYHOLD_PROXY_AUTO_TLS")]
    pub auto_tls: bool,
    /// CA bundle (PEM) that signs the members' certificates, for `https://` endpoints.
    #[arg(long, env = "KEYHOLD_PROXY_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) the proxy presents to members (with `--key`).
    #[arg(long, env = "KEYHOLD_PROXY_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--cert`.
    #[arg(long, env = "KEYHOLD_PROXY_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "KEYHOLD_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// Upstream endpoints as `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// TLS towards clients, when configured.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS towards `https://` endpoints.
    pub upstream_tls: Option<tonic::transport::ClientTlsConfig>,
    pub listen_addr: SocketAddr,
    pub advertise_client_url: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub serializable_ordering: bool,
    pub namespace: String,
    /// `(prefix, ttl seconds)` of the proxy registration.
    pub resolver: Option<(String, i64)>,
    pub dial_keepalive_time: Duration,
    pub dial_keepalive_timeout: Duration,
    pub cache_bytes: u64,
    pub max_recv_bytes: usize,
    pub log_level: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

/// `host:port` or `scheme://host:port` → a socket address.
fn socket_addr(url: &str) -> Result<SocketAddr, String> {
    let hostport = url.split_once("://").map_or(url, |(_, rest)| rest);
    let hostport = hostport.trim_end_matches('/');
    let hostport = hostport.replacen("localhost:", "127.0.0.1:", 1);
    hostport
        .parse()
        .map_err(|_| format!("{url:?} is not host:port with an IP address"))
}

impl Config {
    /// The client-facing TLS configuration from `--cert-file`/`--key-file`, `--auto-tls` and
    /// `--trusted-ca-file`.
    fn client_tls(&self, listen: SocketAddr) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        use crate::tls::ServerCert;
        let cert = match (&self.cert_file, &self.key_file, self.auto_tls) {
            (Some(cert), Some(key), false) => ServerCert::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None, true) => {
                ServerCert::SelfSigned(vec!["localhost".into(), listen.ip().to_string()])
            }
            (None, None, false) if self.trusted_ca_file.is_none() => return Ok(None),
            (None, None, false) => {
                return Err("--trusted-ca-file needs --cert-file and --key-file".into());
            }
            (_, _, true) => {
                return Err("--auto-tls and --cert-file/--key-file exclude each other".into());
            }
            _ => return Err("--cert-file and --key-file must be given together".into()),
        };
        crate::tls::server_config(&cert, self.trusted_ca_file.as_deref())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Checks every flag once.
    ///
    /// # Errors
    /// A message naming the bad flag.
    pub fn validate(self) -> Result<ValidConfig, String> {
        let mut endpoints = Vec::new();
        for e in self
            .endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if e.starts_with("unix://") || e.starts_with("unixs://") {
                return Err(format!(
                    "--endpoints: unix socket endpoints are not supported ({e})"
                ));
            }
            let addr = socket_addr(e).map_err(|m| format!("--endpoints: {m}"))?;
            let scheme = if e.starts_with("https://") {
                "https"
            } else {
                "http"
            };
            endpoints.push(format!("{scheme}://{addr}"));
        }
        if endpoints.is_empty() {
            return Err("--endpoints: at least one endpoint is required".into());
        }
        if self.resolver_prefix.is_empty() != (self.resolver_ttl < 1) {
            return Err(
                "--resolver-prefix and --resolver-ttl (>= 1) must be given together".into(),
            );
        }
        if !self.resolver_prefix.is_empty() && self.advertise_client_url.is_empty() {
            return Err(
                "--resolver-prefix needs --advertise-client-url (the address to register)".into(),
            );
        }
        let listen_addr =
            socket_addr(&self.listen_addr).map_err(|m| format!("--listen-addr: {m}"))?;
        let client_tls = self.client_tls(listen_addr)?;
        let upstream_tls = if endpoints.iter().any(|e| e.starts_with("https://")) {
            let cacert = self.cacert.as_deref().ok_or(
                "--endpoints: https:// endpoints need --cacert (the CA that signed the members)",
            )?;
            let identity = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                (None, None) => None,
                _ => return Err("--cert and --key must be given together".into()),
            };
            Some(crate::tls::client_config(cacert, identity).map_err(|e| e.to_string())?)
        } else {
            if self.cacert.is_some() || self.cert.is_some() || self.key.is_some() {
                return Err("--cacert, --cert and --key need https:// --endpoints".into());
            }
            None
        };
        let metrics_addr = self
            .metrics_addr
            .as_deref()
            .map(socket_addr)
            .transpose()
            .map_err(|m| format!("--metrics-addr: {m}"))?;
        let advertise_client_url =
            (!self.advertise_client_url.is_empty()).then_some(self.advertise_client_url);
        Ok(ValidConfig {
            endpoints,
            client_tls,
            upstream_tls,
            listen_addr,
            advertise_client_url,
            metrics_addr,
            serializable_ordering: self.serializable_ordering,
            namespace: self.namespace,
            resolver: (!self.resolver_prefix.is_empty())
                .then_some((self.resolver_prefix, self.resolver_ttl)),
            dial_keepalive_time: self.dial_keepalive_time,
            dial_keepalive_timeout: self.dial_keepalive_timeout,
            cache_bytes: self.cache_bytes,
            max_recv_bytes: self.max_recv_bytes,
            log_level: self.log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ValidConfig, String> {
        let mut all = vec!["keyhold-proxy"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn defaults_follow_etcd_grpc_proxy() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:2379".to_string()]);
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:23790");
        assert!(c.advertise_client_url.is_none());
    }

    #[test]
    fn endpoints_accept_urls_and_bare_addresses() {
        let c = parse(&["--endpoints", "http://127.0.0.1:1, 127.0.0.1:2,localhost:3"]).expect("ok");
        assert_eq!(
            c.endpoints,
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
    }

    #[test]
    fn bad_flags_are_named() {
        assert!(
            parse(&["--endpoints", ""])
                .unwrap_err()
                .contains("--endpoints")
        );
        assert!(
            parse(&["--listen-addr", "nowhere"])
                .unwrap_err()
                .contains("--listen-addr")
        );
        assert!(
            parse(&["--resolver-prefix", "a/"])
                .unwrap_err()
                .contains("--resolver-ttl")
        );
        assert!(
            parse(&["--resolver-prefix", "a/", "--resolver-ttl", "5"])
                .unwrap_err()
                .contains("--advertise-client-url")
        );
        let c = parse(&[
            "--resolver-prefix",
            "p",
            "--resolver-ttl",
            "5",
            "--advertise-client-url",
            "http://127.0.0.1:1",
        ])
        .expect("registration flags");
        assert_eq!(c.resolver, Some(("p".to_string(), 5)));
        assert!(parse(&["--dial-keepalive-time", "3h"]).is_err());
    }

    #[test]
    fn tls_flags_come_in_working_sets() {
        assert!(
            parse(&["--cert-file", "/nonexistent.crt"])
                .unwrap_err()
                .contains("--key-file")
        );
        assert!(
            parse(&["--trusted-ca-file", "/nonexistent.crt"])
                .unwrap_err()
                .contains("--cert-file")
        );
        assert!(
            parse(&[
                "--cert-file",
                "/nonexistent.crt",
                "--key-file",
                "/nonexistent.key"
            ])
            .unwrap_err()
            .contains("/nonexistent.crt"),
            "an unreadable file is named"
        );
        assert!(
            parse(&["--endpoints", "https://127.0.0.1:1"])
                .unwrap_err()
                .contains("--cacert")
        );
        assert!(
            parse(&["--cacert", "/nonexistent.crt"])
                .unwrap_err()
                .contains("https://")
        );
        let c = parse(&["--auto-tls"]).expect("auto TLS");
        assert!(c.client_tls.is_some() && c.upstream_tls.is_none());
    }
}
