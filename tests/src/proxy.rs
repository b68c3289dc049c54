//! Spawning `keyhold-proxy` processes in front of members.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{bin_dir, free_port, http_get, http_request, unsafe_kill};

/// How long a proxy may take to answer `/health` after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the node suite runs through a proxy in front of each node
/// (`KEYHOLD_TEST_TARGET=proxy`): the same tests, the proxy's address as the only endpoint.
pub fn target_is_proxy() -> bool {
    std::env::var("KEYHOLD_TEST_TARGET").is_ok_and(|t| t == "proxy")
}

/// One `keyhold-proxy` process.
pub struct ProxyProcess {
    child: Option<Child>,
    /// Client address (gRPC + HTTP).
    pub client: SocketAddr,
    /// Plain-HTTP address of `/health` and `/metrics`: the client address, or `--metrics-addr`
    /// when given (a TLS proxy's client port speaks only TLS).
    http: SocketAddr,
    endpoints: Vec<String>,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
    starts: u32,
}

impl ProxyProcess {
    /// Starts a proxy in front of `endpoints` (`host:port`) and waits until it is healthy.
    pub fn start(endpoints: &[String], extra_args: &[&str]) -> Self {
        Self::start_on(free_port(), endpoints, extra_args)
    }

    /// Starts a proxy and waits only until it serves, not until it is healthy (for proxies that
    /// cannot reach any member).
    pub fn start_unhealthy(endpoints: &[String], extra_args: &[&str]) -> Self {
        let mut p = Self::new(free_port(), endpoints, extra_args);
        p.spawn_with(false);
        p
    }

    /// [`Self::start`] on a given client port.
    pub fn start_on(port: u16, endpoints: &[String], extra_args: &[&str]) -> Self {
        let mut p = Self::new(port, endpoints, extra_args);
        p.spawn();
        p
    }

    fn new(port: u16, endpoints: &[String], extra_args: &[&str]) -> Self {
        let client = SocketAddr::from(([127, 0, 0, 1], port));
        let http = extra_args
            .iter()
            .position(|a| *a == "--metrics-addr")
            .and_then(|i| extra_args.get(i + 1))
            .map(|url| {
                let hostport = url.split_once("://").map_or(*url, |(_, rest)| rest);
                hostport.parse().expect("--metrics-addr is http://ip:port")
            })
            .unwrap_or(client);
        Self {
            child: None,
            client,
            http,
            endpoints: endpoints.to_vec(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().expect("tempdir"),
            starts: 0,
        }
    }

    /// `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("proxy-{}.log", self.starts))
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.spawn_with(true);
    }

    fn spawn_with(&mut self, healthy: bool) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(bin_dir().join("keyhold-proxy"))
            .args(["--endpoints", &self.endpoints.join(",")])
            .args(["--listen-addr", &self.client.to_string()])
            .args(&self.extra_args)
            .env("KEYHOLD_PROXY_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keyhold-proxy (built by `cargo build --workspace --bins`)");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "keyhold-proxy exited during startup ({status}):\n{}",
                    self.log()
                );
            }
            if self.log().contains("serving client traffic")
                && (!healthy || matches!(http_get(self.http, "/health"), Ok((200, _))))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy not healthy in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = unsafe_kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts the proxy again (same address).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Cuts this proxy off from the members at `urls` (`http://host:port`; empty heals). Needs
    /// the proxy's failpoints build (`scripts/test` makes it).
    pub fn block(&self, urls: &[String]) {
        let path = format!("/debug/blocked-endpoints?urls={}", urls.join(","));
        let (code, body) = http_request(self.http, "POST", &path).expect("blocked-endpoints");
        assert_eq!(
            code, 200,
            "blocked-endpoints: {body} (is the failpoints feature on?)"
        );
        eprintln!(
            "[fault {:?}] proxy {}: blocked {urls:?}",
            std::time::SystemTime::now(),
            self.client
        );
    }

    /// The value of the Prometheus metric line starting with `name` (first match).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.http, "/metrics").ok()?;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- keyhold-proxy log ----\n{}", self.log());
        }
    }
}
