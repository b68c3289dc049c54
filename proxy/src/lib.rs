//! `keyhold-proxy`: a stateless etcd v3 gRPC proxy in front of the storage members.
//!
//! ```text
//!  clients ──gRPC──► services (kv, watch, lease, relayed ones) ──► Upstream (members,
//!                        │ range cache ◄── invalidation feed ◄──────  health, failover)
//!                        │ watch groups (one upstream watch per range)
//!                        └ keepalive coalescer (one upstream keepalive stream)
//! ```
//!
//! Killing it loses nothing but caches: every write goes to the members before it is
//! acknowledged, and every watch and keepalive is re-established by the client as with any
//! etcd endpoint.

pub mod cache;
pub mod config;
pub mod error;
pub(crate) mod forward;
pub mod http;
pub mod kv;
pub mod lease;
pub mod namespace;
pub mod registration;
pub mod services;
pub mod tls;
pub mod upstream;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use config::ValidConfig;

/// The proxy's shared parts.
pub struct Proxy {
    pub config: ValidConfig,
    pub upstream: Arc<upstream::Upstream>,
    pub cache: Arc<cache::RangeCache>,
    pub watch: Arc<watch::WatchHub>,
    pub keepalives: Arc<lease::Keepalives>,
}

/// How long shutdown waits for client streams to end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn grpc_router(proxy: &Arc<Proxy>) -> axum::Router {
    use keyhold_proto::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
        lease_server::LeaseServer, maintenance_server::MaintenanceServer,
        watch_server::WatchServer,
    };
    use keyhold_proto::v3electionpb::election_server::ElectionServer;
    use keyhold_proto::v3lockpb::lock_server::LockServer;
    let max = proxy.config.max_recv_bytes;
    let up = &proxy.upstream;
    let ns = namespace::Namespace::new(&proxy.config.namespace);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    drop(health_reporter);
    tonic::service::Routes::new(health)
        .add_service(
            KvServer::new(kv::KvService {
                upstream: up.clone(),
                cache: proxy.cache.clone(),
                ordering: proxy.config.serializable_ordering,
                ns: ns.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            WatchServer::new(watch::WatchService {
                hub: proxy.watch.clone(),
                ns: ns.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            LeaseServer::new(lease::LeaseService {
                upstream: up.clone(),
                keepalives: proxy.keepalives.clone(),
                ns: ns.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            ClusterServer::new(services::ClusterService {
                upstream: up.clone(),
                advertise_client_url: proxy.config.advertise_client_url.clone(),
                resolver_prefix: proxy.config.resolver.as_ref().map(|(p, _)| p.clone()),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            MaintenanceServer::new(services::MaintenanceService {
                upstream: up.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            AuthServer::new(services::AuthService {
                upstream: up.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            ElectionServer::new(services::ElectionService {
                upstream: up.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            LockServer::new(services::LockService {
                upstream: up.clone(),
            })
            .max_decoding_message_size(max),
        )
        .into_axum_router()
}

async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Without TCP_NODELAY small HTTP/2 frames meet Nagle + delayed ACK (~40 ms per request).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    serve_on(listener, app, stop).await
}

async fn serve_on<L>(
    listener: L,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Runs the proxy until `shutdown` completes.
///
/// # Errors
/// A listener that cannot be bound, or a bad endpoint.
pub async fn run(config: ValidConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let upstream = upstream::Upstream::new(&config)?;
    let (keepalives, renewals) = lease::Keepalives::new();
    let proxy = Arc::new(Proxy {
        cache: cache::RangeCache::new(config.cache_bytes, upstream.clone()),
        watch: watch::WatchHub::new(upstream.clone()),
        upstream: upstream.clone(),
        keepalives: keepalives.clone(),
        config,
    });
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut drivers = vec![
        tokio::spawn(upstream.clone().probe(stop.clone())),
        tokio::spawn(proxy.cache.clone().run_feed(stop.clone())),
        tokio::spawn(keepalives.run_upstream(upstream.clone(), renewals, stop.clone())),
    ];
    if let (Some((prefix, ttl)), Some(url)) =
        (&proxy.config.resolver, &proxy.config.advertise_client_url)
    {
        drivers.push(tokio::spawn(registration::run(
            upstream.clone(),
            prefix.clone(),
            *ttl,
            url.clone(),
            services::hostname(),
            stop.clone(),
        )));
    }
    let app = grpc_router(&proxy).merge(http::router(proxy.clone()));
    let mut servers = Vec::new();
    let listener = tokio::net::TcpListener::bind(proxy.config.listen_addr).await?;
    tracing::info!(
        addr = %proxy.config.listen_addr,
        endpoints = ?proxy.config.endpoints,
        tls = proxy.config.client_tls.is_some(),
        "serving client traffic (gRPC + HTTP)"
    );
    match proxy.config.client_tls.clone() {
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, tls)?;
            servers.push(tokio::spawn(serve_on(listener, app, stop.clone())));
        }
        None => servers.push(tokio::spawn(serve(listener, app, stop.clone()))),
    }
    if let Some(addr) = proxy.config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "serving metrics (HTTP)");
        servers.push(tokio::spawn(serve(
            listener,
            http::router(proxy.clone()),
            stop.clone(),
        )));
    }
    shutdown.await;
    tracing::info!("shutting down: closing client streams");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, s).await;
    }
    for d in drivers {
        d.abort();
    }
    tracing::info!("stopped");
    Ok(())
}
