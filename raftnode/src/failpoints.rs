//! Test-only fault injection, compiled in only with the `failpoints` cargo feature (never in a
//! release build), enabled by `KEYHOLD_FAILPOINTS=name[,name...]` at start. They exist so the
//! robustness suite can prove its checkers catch what they claim to catch:
//! - `stale-read`: linearizable ranges read one revision behind the current one.
//! - `drop-watch-event`: one watch response (the 20th with events) is silently not sent.
//! - `early-lease-expiry`: the leader expires leases [`EARLY_LEASE_EXPIRY_MS`] before their
//!   deadline.
//!
//! and one switched at run time, for one member only: `POST /debug/log-fsync-delay?ms=N` holds
//! every fsync of this member's raft log back by N ms (0 ends it), so a test can show that a
//! leader's writes reach the followers before its own fsync and show nowhere before it.

/// How early `early-lease-expiry` expires a lease.
pub const EARLY_LEASE_EXPIRY_MS: u64 = 1500;

/// Whether failpoint `name` is on.
#[cfg(feature = "failpoints")]
pub fn enabled(name: &str) -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<Vec<String>> = OnceLock::new();
    ON.get_or_init(|| {
        std::env::var("KEYHOLD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
    .iter()
    .any(|n| n == name)
}

#[cfg(feature = "failpoints")]
static LOG_FSYNC_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long the raft log flusher waits before each fsync (`/debug/log-fsync-delay`).
#[cfg(feature = "failpoints")]
pub fn log_fsync_delay() -> std::time::Duration {
    std::time::Duration::from_millis(LOG_FSYNC_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// No fsync delay without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
pub fn log_fsync_delay() -> std::time::Duration {
    std::time::Duration::ZERO
}

/// Whether failpoint `name` is on (always false without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
pub fn enabled(_name: &str) -> bool {
    false
}

/// Test-only HTTP routes (only in builds with the `failpoints` feature):
/// `POST /debug/peer-faults?drop_to=ID,...&drop_from=ID,...` (member IDs in hex) makes this
/// member drop peer traffic to and from those members, a partition without root; an empty query
/// heals it. Returns the member IDs it now drops.
#[cfg(feature = "failpoints")]
pub fn router(node: std::sync::Arc<crate::node::Node>) -> axum::Router {
    use std::collections::{HashMap, HashSet};

    use axum::extract::{Query, State};
    use axum::http::StatusCode;

    async fn peer_faults(
        State(node): State<std::sync::Arc<crate::node::Node>>,
        Query(q): Query<HashMap<String, String>>,
    ) -> (StatusCode, String) {
        let parse = |name: &str| -> Result<HashSet<u64>, String> {
            q.get(name)
                .map(String::as_str)
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| u64::from_str_radix(s, 16).map_err(|e| format!("{name}: {s:?}: {e}")))
                .collect()
        };
        match (parse("drop_to"), parse("drop_from")) {
            (Ok(to), Ok(from)) => {
                tracing::warn!(?to, ?from, "test fault: dropping peer traffic");
                let body = format!("drop_to={to:x?} drop_from={from:x?}");
                node.peers.faults.set(to, from);
                (StatusCode::OK, body)
            }
            (Err(e), _) | (_, Err(e)) => (StatusCode::BAD_REQUEST, e),
        }
    }
    async fn log_fsync_delay(Query(q): Query<HashMap<String, String>>) -> (StatusCode, String) {
        match q.get("ms").map(|v| v.parse::<u64>()) {
            Some(Ok(ms)) => {
                tracing::warn!(ms, "test fault: raft log fsyncs delayed");
                LOG_FSYNC_DELAY_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
                (StatusCode::OK, format!("ms={ms}"))
            }
            _ => (StatusCode::BAD_REQUEST, "ms=<milliseconds> expected".into()),
        }
    }
    axum::Router::new()
        .route("/debug/peer-faults", axum::routing::post(peer_faults))
        .route(
            "/debug/log-fsync-delay",
            axum::routing::post(log_fsync_delay),
        )
        .with_state(node)
}

/// No test-only routes without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
pub fn router(_node: std::sync::Arc<crate::node::Node>) -> axum::Router {
    axum::Router::new()
}
