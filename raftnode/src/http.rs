//! HTTP on the client port, beside gRPC: `/health` (etcd's JSON), `/version`, `/metrics`
//! (Prometheus text, etcd's metric names where etcd has them).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::node::{ETCD_COMPAT_VERSION, Node};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
/// How often gauges are refreshed from node state.
const METRICS_REFRESH: Duration = Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder (once; later calls are no-ops).
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "metrics recorder already installed");
                PrometheusBuilder::new().build_recorder().handle()
            })
    });
}

/// HTTP routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(render_metrics))
        .with_state(node)
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "etcdserver": ETCD_COMPAT_VERSION,
        "etcdcluster": ETCD_COMPAT_VERSION,
        "keyhold": env!("CARGO_PKG_VERSION"),
    }))
}

async fn render_metrics(State(node): State<Arc<Node>>) -> String {
    refresh_gauges(&node);
    PROMETHEUS.get().map(|h| h.render()).unwrap_or_default()
}

/// `{"health":"true"}` when there is a leader, no alarm (except those in `?exclude=`) and a
/// linearizable read succeeds (skipped with `?serializable=true`); HTTP 503 otherwise.
async fn health(
    State(node): State<Arc<Node>>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let exclude = q.get("exclude").cloned().unwrap_or_default();
    let mut reason = String::new();
    if node.leader().is_none() {
        reason = "RAFT NO LEADER".into();
    } else if let Some(a) = node.store.alarms().iter().find(|a| {
        let name = match a.alarm {
            keyhold_store::AlarmType::NoSpace => "NOSPACE",
            keyhold_store::AlarmType::Corrupt => "CORRUPT",
        };
        !exclude.split(',').any(|x| x == name)
    }) {
        reason = format!("ALARM {:?}", a.alarm).to_uppercase();
    } else if q.get("serializable").map(String::as_str) != Some("true")
        && let Err(e) = node.read_barrier().await
    {
        reason = format!("RAFT READ FAILED: {e}");
    }
    let healthy = reason.is_empty();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "health": healthy.to_string(), "reason": reason })),
    )
}

fn refresh_gauges(node: &Node) {
    let (committed, applied) = node.raft_indexes();
    metrics::gauge!("etcd_mvcc_db_total_size_in_bytes").set(node.store.size_bytes() as f64);
    metrics::gauge!("etcd_mvcc_db_total_size_in_use_in_bytes")
        .set(node.store.size_in_use_bytes() as f64);
    metrics::gauge!("etcd_server_has_leader").set(if node.leader().is_some() { 1.0 } else { 0.0 });
    metrics::gauge!("etcd_server_is_leader").set(if node.is_leader() { 1.0 } else { 0.0 });
    metrics::gauge!("etcd_server_quota_backend_bytes").set(node.config.quota_bytes as f64);
    metrics::gauge!("etcd_server_proposals_committed_total").set(committed as f64);
    metrics::gauge!("etcd_server_proposals_applied_total").set(applied as f64);
    metrics::gauge!("etcd_server_term").set(node.term() as f64);
    metrics::gauge!("etcd_debugging_mvcc_current_revision")
        .set(node.store.current_revision().unwrap_or(0) as f64);
    metrics::gauge!("etcd_debugging_mvcc_compact_revision")
        .set(node.store.compact_revision().unwrap_or(0) as f64);
    // 1 while history still holds changes the applied compaction removes (see `sweep_driver`).
    metrics::gauge!("keyhold_mvcc_compaction_sweep_pending").set(
        if node.store.compaction_pending().unwrap_or(false) {
            1.0
        } else {
            0.0
        },
    );
    metrics::gauge!("etcd_debugging_mvcc_watcher_total").set(node.store.hub().len() as f64);
    metrics::gauge!("etcd_debugging_lease_total")
        .set(node.store.with_lessor(|l| l.ids().len()) as f64);
    metrics::gauge!("etcd_server_version", "server_version" => ETCD_COMPAT_VERSION).set(1.0);
    metrics::gauge!("etcd_server_id", "server_id" => format!("{:x}", node.member_id)).set(1.0);
    metrics::gauge!("etcd_server_is_learner").set(if node.is_learner() { 1.0 } else { 0.0 });
    for m in crate::membership::list(node) {
        if m.id == node.member_id {
            continue;
        }
        let connected = m
            .member
            .peer_addr()
            .is_some_and(|a| node.peers.connected(a));
        metrics::gauge!(
            "etcd_network_active_peers",
            "Local" => format!("{:x}", node.member_id),
            "Remote" => format!("{:x}", m.id)
        )
        .set(if connected { 1.0 } else { 0.0 });
    }
    metrics::gauge!("keyhold_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Refreshes gauges and runs exporter upkeep periodically.
pub async fn metrics_driver(node: Arc<Node>) {
    let mut tick = tokio::time::interval(METRICS_REFRESH);
    loop {
        tick.tick().await;
        refresh_gauges(&node);
        if let Some(h) = PROMETHEUS.get() {
            h.run_upkeep();
        }
    }
}
