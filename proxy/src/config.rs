//! `keyhold-proxy` configuration: `etcd grpc-proxy start`'s flag names, each also settable as
//! `KEYHOLD_PROXY_<NAME>` (upper case, `-` → `_`). Parsed once by clap and validated once into
//! [`ValidConfig`]; every default lives here.

use std::net::SocketAddr;
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
    /// Comma-separated storage member endpoints (`host:port` or `http://host:port`).
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
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "KEYHOLD_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// Upstream endpoints as `http://host:port`.
    pub endpoints: Vec<String>,
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
            if e.starts_with("https://") || e.starts_with("unixs://") {
                return Err(format!(
                    "--endpoints: TLS upstreams are not supported yet ({e})"
                ));
            }
            let addr = socket_addr(e).map_err(|m| format!("--endpoints: {m}"))?;
            endpoints.push(format!("http://{addr}"));
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
}
