//! HTTP beside gRPC: `/health` (etcd's JSON: a linearizable read through the proxy's upstream
//! succeeds) and `/metrics` (the proxy's own Prometheus metrics).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::kv_client::KvClient;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tonic::Code;

use crate::Proxy;
use crate::upstream::Retry;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
/// `/health` fails when the read takes longer (as etcd's proxy).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder (once).
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
    });
}

/// HTTP routes.
pub fn router(proxy: Arc<Proxy>) -> Router {
    let router = Router::new()
        .route("/health", get(health))
        .route("/proxy/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/proxy/metrics", get(render_metrics));
    #[cfg(feature = "failpoints")]
    let router = router.route(
        "/debug/blocked-endpoints",
        axum::routing::post(blocked_endpoints),
    );
    router.with_state(proxy)
}

/// Test-only (failpoints builds): `POST /debug/blocked-endpoints?urls=http://a,http://b` cuts
/// the proxy off from those members (a partition between this proxy and them); no `urls`
/// heals.
#[cfg(feature = "failpoints")]
async fn blocked_endpoints(
    State(proxy): State<Arc<Proxy>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> String {
    let urls: Vec<String> = q
        .get("urls")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    tracing::warn!(?urls, "test fault: proxy cut off from members");
    format!("blocked {}", proxy.upstream.block(&urls))
}

async fn render_metrics(State(proxy): State<Arc<Proxy>>) -> String {
    let (entries, bytes) = proxy.cache.usage();
    metrics::gauge!("keyhold_proxy_cache_keys").set(entries as f64);
    metrics::gauge!("keyhold_proxy_cache_bytes").set(bytes as f64);
    let (groups, watchers) = proxy.watch.counts();
    metrics::gauge!("keyhold_proxy_upstream_watches").set(groups as f64);
    metrics::gauge!("keyhold_proxy_watchers").set(watchers as f64);
    PROMETHEUS.get().map(|h| h.render()).unwrap_or_default()
}

async fn health(State(proxy): State<Arc<Proxy>>) -> (StatusCode, Json<serde_json::Value>) {
    let probe = pb::RangeRequest {
        key: b"health".to_vec(),
        ..Default::default()
    };
    let read = proxy.upstream.call(Retry::Immutable, |channel| {
        let req = tonic::Request::new(probe.clone());
        async move { KvClient::new(channel).range(req).await.map(|_| ()) }
    });
    let outcome = match tokio::time::timeout(HEALTH_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(()),
        // Auth on: the member answered, so it is healthy.
        Ok(Err(crate::error::Error::Upstream(s))) if s.code() == Code::PermissionDenied => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("read through the proxy timed out".to_string()),
    };
    match outcome {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"health": "true"}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"health": "false", "reason": reason})),
        ),
    }
}
