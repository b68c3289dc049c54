//! Spawning and faulting `keyhold-node` processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to answer `/health` after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports handed to test processes come from below the kernel's ephemeral range (32768+), so
/// client connections never take them, and each test process starts at its own offset.
const PORT_RANGE: std::ops::Range<u16> = 10_000..32_000;

/// A port free on 127.0.0.1 for both TCP (client port) and UDP (QUIC peer port): never handed
/// out twice by this process, checked by binding both, then released for the node to bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    // Processes of one test run get offsets far apart (PIDs are mostly consecutive).
    let base = std::process::id().wrapping_mul(7_919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "out of test ports");
        let port = PORT_RANGE.start + ((base.wrapping_add(n)) % span) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// Whether the tests run against Debian's etcd (`KEYHOLD_TEST_TARGET=etcd`) instead of
/// keyhold-node.
pub fn target_is_etcd() -> bool {
    std::env::var("KEYHOLD_TEST_TARGET").is_ok_and(|t| t == "etcd")
}

/// The etcd 3.4 spelling of a keyhold-node flag, when etcd has it.
fn etcd_flag(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "--quota-backend-bytes" => "--quota-backend-bytes",
        "--heartbeat-interval" => "--heartbeat-interval",
        "--election-timeout" => "--election-timeout",
        "--watch-progress-notify-interval" => "--experimental-watch-progress-notify-interval",
        _ => return None,
    })
}

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KEYHOLD_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in target/<profile>/deps/, binaries in target/<profile>/.
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    dir.to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// One `keyhold-node` process with its own data dir and ports.
pub struct NodeProcess {
    child: Option<Child>,
    /// Client address (gRPC + HTTP).
    pub client: SocketAddr,
    /// Peer (QUIC) port on 127.0.0.1.
    pub peer_port: u16,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    starts: u32,
    /// Cluster flags (`--name`, `--initial-cluster`, ...) of a cluster member.
    cluster_args: Vec<String>,
    /// The proxy in front of this node (`KEYHOLD_TEST_TARGET=proxy`); dropped first.
    proxy: Option<crate::proxy::ProxyProcess>,
}

impl NodeProcess {
    /// Starts a single-member node and waits until it is healthy.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra flags.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_with_env(extra_args, &[])
    }

    /// Starts with extra flags and environment variables (e.g. `KEYHOLD_FAILPOINTS`).
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut node = Self::member(free_port(), free_port(), Vec::new(), extra_args, env);
        node.spawn();
        node
    }

    /// A cluster member's process, not started yet: `name`, the ports it will use, and the
    /// cluster flags (see [`crate::cluster::Cluster`]).
    pub fn member(
        client_port: u16,
        peer_port: u16,
        cluster_args: Vec<String>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self {
            child: None,
            client: SocketAddr::from(([127, 0, 0, 1], client_port)),
            peer_port,
            dir: tempfile::tempdir().expect("tempdir"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
            cluster_args,
            proxy: None,
        }
    }

    /// `http://127.0.0.1:<peer port>`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// `127.0.0.1:port`, as etcd clients take endpoints: the proxy in front of this node
    /// when the tests run through one (`KEYHOLD_TEST_TARGET=proxy`).
    pub fn endpoint(&self) -> String {
        match &self.proxy {
            Some(p) => p.endpoint(),
            None => self.client.to_string(),
        }
    }

    /// The proxy in front of this node, if the tests run through one.
    pub fn proxy(&self) -> Option<&crate::proxy::ProxyProcess> {
        self.proxy.as_ref()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Path of the current process's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", self.starts))
    }

    /// The node's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// OS process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn spawn(&mut self) {
        self.spawn_no_wait();
        self.wait_ready();
    }

    /// Starts the process without waiting for it to be healthy (a cluster member is healthy
    /// only once a quorum runs).
    pub fn spawn_no_wait(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = format!("http://{}", self.client);
        let mut cmd = if target_is_etcd() {
            // Reference mode: the same tests against Debian's etcd 3.4, to check that what they
            // expect is what etcd answers. Keyhold-only flags are dropped.
            let mut c = Command::new("etcd");
            c.args(["--advertise-client-urls", &client])
                .args(["--initial-cluster", &format!("default={peer}")])
                .args(["--logger", "zap", "--log-outputs", "stderr"]);
            for pair in self.extra_args.chunks(2) {
                if let [flag, value] = pair
                    && let Some(f) = etcd_flag(flag)
                {
                    c.args([f, value.as_str()]);
                }
            }
            c
        } else {
            let mut c = Command::new(binary("keyhold-node"));
            c.args(&self.extra_args)
                .args(&self.cluster_args)
                .env(
                    "KEYHOLD_LOG_LEVEL",
                    std::env::var("KEYHOLD_TEST_NODE_LOG")
                        .unwrap_or_else(|_| "info,openraft=warn".into()),
                )
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            c
        };
        let child = cmd
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args([
                "--initial-advertise-peer-urls",
                &peer,
                "--listen-peer-urls",
                &peer,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the node under test");
        self.child = Some(child);
    }

    /// Waits until `/health` answers 200 (leader elected, linearizable read works).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "keyhold-node exited during startup ({status}):\n{}",
                    self.log()
                );
            }
            // Only once this process has bound its ports (it logs that) may a healthy answer
            // count: another test's process could hold a port picked for this one.
            let bound = target_is_etcd() || self.log().contains("serving client traffic");
            if bound && let Ok((200, _)) = http_get(self.client, "/health") {
                if crate::proxy::target_is_proxy()
                    && self.proxy.is_none()
                    && self.cluster_args.is_empty()
                {
                    // Advertised as the member clients see (as etcd's grpc-proxy does).
                    let port = free_port();
                    let url = format!("http://127.0.0.1:{port}");
                    self.proxy = Some(crate::proxy::ProxyProcess::start_on(
                        port,
                        &[self.client.to_string()],
                        &["--advertise-client-url", &url],
                    ));
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node not healthy in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid();
        assert!(pid > 0, "no process");
        // SAFETY-free: libc::kill on our own child's PID.
        let rc = unsafe_kill(pid, sig);
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited with status 0.
    pub fn terminate(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().expect("running");
        c.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// SIGSTOP.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Starts the process again on the same data dir and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Starts the process again without waiting for health.
    pub fn restart_no_wait(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn_no_wait();
    }

    /// Replaces the extra flags the next start passes.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Replaces the cluster flags (e.g. to start with `--initial-cluster-state existing`).
    pub fn set_cluster_args(&mut self, args: Vec<String>) {
        self.cluster_args = args;
    }

    /// POST `path` on the client port: `(status, body)`.
    pub fn http_post(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_request(self.client, "POST", path)
    }

    /// A gauge from `/metrics` (the first sample whose name, labels included, starts with
    /// `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").ok()?;
        body.lines()
            .filter(|l| l.starts_with(name))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
    }

    /// This member's ID, from `/metrics`.
    pub fn member_id(&self) -> Option<u64> {
        let (_, body) = self.http_get("/metrics").ok()?;
        let line = body.lines().find(|l| l.starts_with("etcd_server_id{"))?;
        let id = line.split('"').nth(1)?;
        u64::from_str_radix(id, 16).ok()
    }

    /// Whether the process is running (not killed or stopped by the harness).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's MVCC history, read from its data dir with `keyhold-node --debug-dump-history`
    /// (the node must be stopped).
    pub fn dump_history(&self) -> String {
        assert!(
            self.child.is_none(),
            "stop the node before reading its data dir"
        );
        let out = Command::new(binary("keyhold-node"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--debug-dump-history")
            .output()
            .expect("run keyhold-node --debug-dump-history");
        assert!(
            out.status.success(),
            "dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8 dump")
    }

    /// GET `path` on the client port over HTTP/1.1: `(status, body)`.
    pub fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.client, path)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.proxy = None;
        if let Some(mut c) = self.child.take() {
            let _ = unsafe_kill(c.id() as i32, libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- keyhold-node log ({}) ----\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        // Debugging aid: keep data dirs and logs for inspection after the run.
        if std::env::var_os("KEYHOLD_TEST_KEEP_DIRS").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept node dir {}", kept.keep().display());
        }
    }
}

#[allow(unsafe_code)]
pub(crate) fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own child's.
    unsafe { libc::kill(pid, sig) }
}

pub(crate) fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

pub(crate) fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs Debian's `etcdctl` (v3 API) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("etcdctl is installed (apt-get install etcd-client)")
}

/// Runs `etcdctl` with `input` on stdin (for `txn`).
pub fn etcdctl_stdin(endpoint: &str, args: &[&str], input: &str) -> Output {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("etcdctl output")
}
