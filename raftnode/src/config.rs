//! `keyhold-node` configuration: etcd's flag names, each also settable as `KEYHOLD_<NAME>`
//! (upper case, `-` → `_`). Parsed once by clap and validated once into [`ValidConfig`]; every
//! default lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Upper bound of `--worker-threads` (a typo's guard: each thread has its own stack).
const WORKER_THREADS_MAX: usize = 1024;

/// Command-line flags of `keyhold-node`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "keyhold-node",
    version,
    about = "An etcd v3 compatible storage node"
)]
pub struct Config {
    /// Human-readable name of this member.
    #[arg(long, env = "KEYHOLD_NAME", default_value = "default")]
    pub name: String,
    /// Directory for the store and raft log. Default = `./<name>.keyhold`.
    #[arg(long, env = "KEYHOLD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic (gRPC and HTTP on the same port).
    #[arg(
        long,
        env = "KEYHOLD_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client_urls: String,
    /// Client URLs advertised to the cluster. Default = the listen URLs.
    #[arg(long, env = "KEYHOLD_ADVERTISE_CLIENT_URLS")]
    pub advertise_client_urls: Option<String>,
    /// URLs to listen on for peer traffic (QUIC, UDP).
    #[arg(
        long,
        env = "KEYHOLD_LISTEN_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    pub listen_peer_urls: String,
    /// Peer URLs advertised to the cluster.
    #[arg(
        long,
        env = "KEYHOLD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://127.0.0.1:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster: `name=peerURL,...`. Default = this member alone.
    #[arg(long, env = "KEYHOLD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// `new` or `existing`.
    #[arg(long, env = "KEYHOLD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Token that makes member and cluster IDs unique per cluster.
    #[arg(
        long,
        env = "KEYHOLD_INITIAL_CLUSTER_TOKEN",
        default_value = "keyhold-cluster"
    )]
    pub initial_cluster_token: String,
    /// Peer TLS certificate (PEM). With `--peer-key-file` and `--peer-trusted-ca-file`, peers
    /// use mutual TLS.
    #[arg(long, env = "KEYHOLD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Peer TLS private key (PEM).
    #[arg(long, env = "KEYHOLD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// CA bundle (PEM) peers' certificates must chain to.
    #[arg(long, env = "KEYHOLD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Certificate revocation list (PEM) checked against peers' client certificates.
    #[arg(long, env = "KEYHOLD_PEER_CRL_FILE")]
    pub peer_crl_file: Option<PathBuf>,
    /// Self-signed peer certificates, peers unauthenticated (the default when no peer
    /// certificate files are given; for trial clusters).
    #[arg(long, env = "KEYHOLD_PEER_AUTO_TLS")]
    pub peer_auto_tls: bool,
    /// Raft heartbeat interval in ms.
    #[arg(long, env = "KEYHOLD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Raft election timeout in ms.
    #[arg(long, env = "KEYHOLD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Backend quota in bytes: 0 = default (2 GiB), negative = none.
    #[arg(
        long,
        env = "KEYHOLD_QUOTA_BACKEND_BYTES",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub quota_backend_bytes: i64,
    /// Largest client request in bytes.
    #[arg(long, env = "KEYHOLD_MAX_REQUEST_BYTES", default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,
    /// Most operations in one txn.
    #[arg(long, env = "KEYHOLD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,
    /// `periodic` or `revision`.
    #[arg(long, env = "KEYHOLD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Periodic: a duration (`1h`, `30m`, `90s`; bare numbers are hours). Revision: a count.
    /// `0` disables auto compaction.
    #[arg(long, env = "KEYHOLD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// History records a compaction sweep step reads; writes go on between steps.
    #[arg(
        long,
        alias = "experimental-compaction-batch-limit",
        env = "KEYHOLD_COMPACTION_BATCH_LIMIT",
        default_value_t = 1000
    )]
    pub compaction_batch_limit: usize,
    /// Pause between compaction sweep steps (`10ms`).
    #[arg(
        long,
        alias = "experimental-compaction-sleep-interval",
        env = "KEYHOLD_COMPACTION_SLEEP_INTERVAL",
        default_value = "10ms"
    )]
    pub compaction_sleep_interval: String,
    /// Interval of progress notifications for watchers that asked for them (`10m`, `500ms`).
    #[arg(
        long,
        alias = "experimental-watch-progress-notify-interval",
        env = "KEYHOLD_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m"
    )]
    pub watch_progress_notify_interval: String,
    /// Threads of the async runtime (0: one per core). Members that share a host each take a
    /// share of its cores: `deploy/local` gives each of its three members one thread per three
    /// cores (at least one).
    #[arg(long, env = "KEYHOLD_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Print the data dir's whole MVCC history as JSON lines and exit (offline checks; the
    /// node must be stopped).
    #[arg(long, hide = true)]
    pub debug_dump_history: bool,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `keyhold_raftnode=debug`).
    #[arg(long, env = "KEYHOLD_LOG_LEVEL", default_value = "info,openraft=warn")]
    pub log_level: String,
}

/// A configuration that passed [`Config::validate`].
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// Member name.
    pub name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Client listen addresses.
    pub listen_client: Vec<SocketAddr>,
    /// Advertised client URLs.
    pub advertise_client_urls: Vec<String>,
    /// Advertised peer URLs.
    pub advertise_peer_urls: Vec<String>,
    /// Peer (QUIC) listen address.
    pub listen_peer: SocketAddr,
    /// Peer TLS.
    pub peer_tls: PeerTlsConfig,
    /// Whether this member joins an existing cluster (`--initial-cluster-state existing`).
    pub join_existing: bool,
    /// Initial cluster members `(name, peer URLs)`.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    /// Cluster token.
    pub cluster_token: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout.
    pub election_timeout: Duration,
    /// Backend quota in bytes; 0 = none.
    pub quota_bytes: u64,
    /// Max request bytes.
    pub max_request_bytes: usize,
    /// Max txn ops.
    pub max_txn_ops: usize,
    /// Auto compaction.
    pub auto_compaction: AutoCompaction,
    /// History records per compaction sweep step.
    pub compaction_batch_limit: usize,
    /// Pause between compaction sweep steps.
    pub compaction_sleep_interval: Duration,
    /// Watch progress notify interval.
    pub progress_notify_interval: Duration,
    /// Async runtime threads; `None` for one per core.
    pub worker_threads: Option<usize>,
    /// Log filter.
    pub log_level: String,
    /// Dump history and exit.
    pub debug_dump_history: bool,
}

/// How peers secure QUIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTlsConfig {
    /// Self-signed certificate, peers not verified.
    Auto,
    /// Mutual TLS from files.
    Files {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Private key (PEM).
        key: PathBuf,
        /// Trusted CA bundle (PEM).
        trusted_ca: PathBuf,
        /// Revocation list (PEM).
        crl: Option<PathBuf>,
    },
}

/// Auto compaction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Off.
    Disabled,
    /// Keep history of the last `Duration`.
    Periodic(Duration),
    /// Keep the last `n` revisions.
    Revision(i64),
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A URL list could not be parsed.
    #[error("invalid URL {0:?}: expected http://host:port or https://host:port")]
    Url(String),
    /// `--initial-cluster` is malformed or does not name this member.
    #[error("invalid --initial-cluster: {0}")]
    InitialCluster(String),
    /// A duration could not be parsed.
    #[error("invalid duration {0:?}")]
    Duration(String),
    /// Timing flags that cannot work together.
    #[error(
        "--election-timeout ({election_ms} ms) must be at least 5 x --heartbeat-interval ({heartbeat_ms} ms)"
    )]
    Timing {
        /// Election timeout.
        election_ms: u64,
        /// Heartbeat interval.
        heartbeat_ms: u64,
    },
    /// Anything else.
    #[error("{0}")]
    Invalid(String),
}

/// Parses `http://host:port` into a socket address (host must be an IP or `localhost`).
pub fn parse_url(url: &str) -> Result<SocketAddr, ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ConfigError::Url(url.into()))?;
    let rest = rest.trim_end_matches('/');
    let rest = rest.replacen("localhost", "127.0.0.1", 1);
    rest.parse().map_err(|_| ConfigError::Url(url.into()))
}

/// Parses `10m`, `500ms`, `2h`, `30s`; a bare number uses `default_unit_s` seconds per unit.
pub fn parse_duration(s: &str, default_unit_s: u64) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let err = || ConfigError::Duration(s.into());
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n * default_unit_s));
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(err)?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

impl Config {
    /// Checks every flag once and resolves defaults.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the flag that is wrong.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        let client_urls = split_urls(&self.listen_client_urls);
        let listen_client = client_urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if listen_client.is_empty() {
            return Err(ConfigError::Url(self.listen_client_urls));
        }
        let advertise_client_urls = self
            .advertise_client_urls
            .as_deref()
            .map(split_urls)
            .unwrap_or(client_urls);
        let advertise_peer_urls = split_urls(&self.initial_advertise_peer_urls);
        for u in &advertise_peer_urls {
            parse_url(u)?;
        }
        let initial_cluster = match &self.initial_cluster {
            None => vec![(self.name.clone(), advertise_peer_urls.clone())],
            Some(spec) => parse_initial_cluster(spec)?,
        };
        if !initial_cluster.iter().any(|(n, _)| n == &self.name) {
            return Err(ConfigError::InitialCluster(format!(
                "member {:?} is not in the initial cluster",
                self.name
            )));
        }
        let me = initial_cluster.iter().find(|(n, _)| n == &self.name);
        if me.is_some_and(|(_, urls)| {
            let (mut a, mut b) = (urls.clone(), advertise_peer_urls.clone());
            a.sort();
            b.sort();
            a != b
        }) {
            return Err(ConfigError::InitialCluster(format!(
                "member {:?} has peer URLs {:?} in --initial-cluster but advertises {:?}",
                self.name,
                me.map(|m| &m.1),
                advertise_peer_urls
            )));
        }
        let listen_peer_urls = split_urls(&self.listen_peer_urls);
        let listen_peer = match listen_peer_urls.as_slice() {
            [one] => parse_url(one)?,
            _ => {
                return Err(ConfigError::Invalid(
                    "--listen-peer-urls takes exactly one URL (one QUIC endpoint)".into(),
                ));
            }
        };
        let peer_tls = match (
            self.peer_cert_file,
            self.peer_key_file,
            self.peer_trusted_ca_file,
        ) {
            (None, None, None) => PeerTlsConfig::Auto,
            (Some(cert), Some(key), Some(trusted_ca)) if !self.peer_auto_tls => {
                PeerTlsConfig::Files {
                    cert,
                    key,
                    trusted_ca,
                    crl: self.peer_crl_file,
                }
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "peer TLS needs all of --peer-cert-file, --peer-key-file and \
                     --peer-trusted-ca-file (or none of them, and --peer-auto-tls)"
                        .into(),
                ));
            }
        };
        if self.initial_cluster_state != "new" && self.initial_cluster_state != "existing" {
            return Err(ConfigError::Invalid(format!(
                "--initial-cluster-state must be new or existing, not {:?}",
                self.initial_cluster_state
            )));
        }
        if self.heartbeat_interval == 0 || self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError::Timing {
                election_ms: self.election_timeout,
                heartbeat_ms: self.heartbeat_interval,
            });
        }
        let quota_bytes = match self.quota_backend_bytes {
            0 => keyhold_store::limits::QUOTA_BACKEND_BYTES_DEFAULT,
            n if n < 0 => 0,
            n => n as u64,
        };
        let auto_compaction = match (
            self.auto_compaction_mode.as_str(),
            self.auto_compaction_retention.as_str(),
        ) {
            (_, "0") => AutoCompaction::Disabled,
            ("periodic", r) => AutoCompaction::Periodic(parse_duration(r, 3600)?),
            ("revision", r) => AutoCompaction::Revision(
                r.parse()
                    .map_err(|_| ConfigError::Invalid(format!("bad revision retention {r:?}")))?,
            ),
            (m, _) => {
                return Err(ConfigError::Invalid(format!(
                    "--auto-compaction-mode must be periodic or revision, not {m:?}"
                )));
            }
        };
        let progress = parse_duration(&self.watch_progress_notify_interval, 1)?;
        if progress < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "--watch-progress-notify-interval must be at least 100ms".into(),
            ));
        }
        if self.compaction_batch_limit == 0 {
            return Err(ConfigError::Invalid(
                "--compaction-batch-limit must be > 0".into(),
            ));
        }
        let compaction_sleep_interval = parse_duration(&self.compaction_sleep_interval, 1)?;
        if self.worker_threads > WORKER_THREADS_MAX {
            return Err(ConfigError::Invalid(format!(
                "--worker-threads must be at most {WORKER_THREADS_MAX} (0: one per core)"
            )));
        }
        if self.max_txn_ops == 0 || self.max_request_bytes == 0 {
            return Err(ConfigError::Invalid(
                "--max-txn-ops and --max-request-bytes must be > 0".into(),
            ));
        }
        Ok(ValidConfig {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!("{}.keyhold", self.name))),
            name: self.name,
            listen_client,
            advertise_client_urls,
            advertise_peer_urls,
            listen_peer,
            peer_tls,
            join_existing: self.initial_cluster_state == "existing",
            initial_cluster,
            cluster_token: self.initial_cluster_token,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election_timeout: Duration::from_millis(self.election_timeout),
            quota_bytes,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            auto_compaction,
            compaction_batch_limit: self.compaction_batch_limit,
            compaction_sleep_interval,
            progress_notify_interval: progress,
            worker_threads: (self.worker_threads > 0).then_some(self.worker_threads),
            log_level: self.log_level,
            debug_dump_history: self.debug_dump_history,
        })
    }
}

fn parse_initial_cluster(spec: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::InitialCluster(format!("{part:?} is not name=url")))?;
        parse_url(url)?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<ValidConfig, ConfigError> {
        let mut all = vec!["keyhold-node"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("parses").validate()
    }

    #[test]
    fn defaults_give_a_single_member_on_2379() {
        let c = config(&[]).expect("valid");
        assert_eq!(
            c.listen_client,
            vec!["127.0.0.1:2379".parse().expect("addr")]
        );
        assert_eq!(c.data_dir, PathBuf::from("default.keyhold"));
        assert_eq!(c.initial_cluster.len(), 1);
        assert_eq!(c.quota_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(c.auto_compaction, AutoCompaction::Disabled);
        assert_eq!(c.worker_threads, None, "one runtime thread per core");
    }

    #[test]
    fn worker_threads_zero_means_one_per_core_and_huge_is_refused() {
        assert_eq!(
            config(&["--worker-threads", "0"])
                .expect("valid")
                .worker_threads,
            None
        );
        assert_eq!(
            config(&["--worker-threads", "1"])
                .expect("valid")
                .worker_threads,
            Some(1)
        );
        assert!(matches!(
            config(&["--worker-threads", "100000"]),
            Err(ConfigError::Invalid(m)) if m.contains("--worker-threads")
        ));
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        assert!(matches!(
            config(&["--listen-client-urls", "tcp://x"]),
            Err(ConfigError::Url(_))
        ));
        assert!(matches!(
            config(&["--election-timeout", "100"]),
            Err(ConfigError::Timing { .. })
        ));
        assert!(matches!(
            config(&["--initial-cluster", "other=http://127.0.0.1:1"]),
            Err(ConfigError::InitialCluster(_))
        ));
        assert!(config(&["--watch-progress-notify-interval", "10ms"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms", 1), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2", 3600), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5m", 1), Ok(Duration::from_secs(90)));
        assert!(parse_duration("x", 1).is_err());
    }
}
