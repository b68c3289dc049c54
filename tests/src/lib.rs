//! Keyhold's process-level test harness: starts the real `keyhold-node` binary on loopback
//! ports chosen at run time, on a temporary data dir, captures its log, and kills it by PID on
//! drop (also when a test panics). Faults: kill -9, SIGTERM, SIGSTOP/SIGCONT, restart on the
//! same data dir.
//!
//! The binaries are found next to the test executable's `target/<profile>` directory (or in
//! `$KEYHOLD_BIN_DIR`); `cargo nextest run --workspace` / `cargo test --workspace` build them.

pub mod process;

pub use process::{NodeProcess, etcdctl, etcdctl_stdin, free_port};
