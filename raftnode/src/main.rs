//! `keyhold-node` binary: parse flags, set up logging, run the node until SIGINT/SIGTERM.

use clap::Parser;
use keyhold_raftnode::config::Config;

/// glibc's malloc cost a loaded member about a tenth of its CPU (many threads, many small
/// short-lived buffers in h2, prost and quinn).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = match Config::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyhold-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if !cfg!(feature = "failpoints")
        && std::env::var("KEYHOLD_FAILPOINTS").is_ok_and(|v| !v.is_empty())
    {
        eprintln!(
            "keyhold-node: KEYHOLD_FAILPOINTS is set but this build has no failpoints \
             (build with --features keyhold-raftnode/failpoints)"
        );
        return std::process::ExitCode::from(2);
    }
    if config.debug_dump_history {
        return match keyhold_raftnode::node::dump_history(&config.data_dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyhold-node: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    keyhold_raftnode::http::install_metrics();
    let runtime = match runtime(config.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyhold-node: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "async runtime started"
    );
    match runtime.block_on(keyhold_raftnode::node::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keyhold-node failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The async runtime: tokio's multi-threaded scheduler without its LIFO slot.
///
/// With the LIFO slot, a task woken by the running task runs next on the same worker. When an
/// apply completes a batch of writes, each gRPC handler that finishes wakes its HTTP/2
/// connection task, which then runs before the next handler and flushes that one response in a
/// write of its own. Without it, the handlers of a batch finish first and the connection task
/// sends their responses together: at 256 clients a 3-member cluster made 0.70 TCP writes per
/// put before and 0.16 after, and its CPU per put fell from 79–103 µs to 69–71 µs
/// (BENCHMARKS.md).
/// `disable_lifo_slot` needs `--cfg tokio_unstable` (set in `.cargo/config.toml`); a build
/// without it keeps the slot and says so at startup.
///
/// `workers` is `--worker-threads` (`None`: one per core). Members sharing a host run better
/// with fewer: with three members and a client on 2 cores, each member's two threads handed
/// every wake-up across cores, and one thread per member cut CPU per put at 1 client by a
/// seventh (BENCHMARKS.md).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    #[cfg(all(tokio_unstable, feature = "latency-probe"))]
    builder
        .on_before_task_poll(|m| keyhold_raftnode::probe::task_polled(m.spawned_at(), m.id(), true))
        .on_after_task_poll(|m| keyhold_raftnode::probe::task_polled(m.spawned_at(), m.id(), false))
        .on_thread_park(|| {
            keyhold_raftnode::probe::mark(keyhold_raftnode::probe::Stage::WorkerParked, 0)
        })
        .on_thread_unpark(|| {
            keyhold_raftnode::probe::mark(keyhold_raftnode::probe::Stage::WorkerUnparked, 0)
        });
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
