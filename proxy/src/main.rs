//! `keyhold-proxy` binary: parse and validate the flags once, then run until SIGTERM/SIGINT.

use clap::Parser;
use keyhold_proxy::config::Config;

/// glibc's malloc cost a loaded member about a tenth of its CPU (many threads, many small
/// short-lived buffers in h2, prost and quinn).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = match Config::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyhold-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    keyhold_proxy::http::install_metrics();
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyhold-proxy: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(keyhold_proxy::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keyhold-proxy failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime: tokio's multi-threaded scheduler without its LIFO slot, so the gRPC
/// responses that become ready together leave in one write per connection (see `runtime` in
/// raftnode/src/main.rs). Needs `--cfg tokio_unstable`, set in `.cargo/config.toml`.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    #[cfg(not(tokio_unstable))]
    tracing::info!("built without --cfg tokio_unstable: the runtime keeps its LIFO slot");
    builder.build()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
