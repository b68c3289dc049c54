//! Keyhold's storage engine: etcd's MVCC model over the fjall LSM.
//!
//! Synchronous and deterministic: no async runtime, no clock (time is passed in), no threads of
//! its own beyond fjall's. The raft layer applies replicated [`WriteRequest`]s through
//! [`KvStore::apply`]; the API layer reads through [`KvStore::range`].
//!
//! # Layout
//! - [`kv_store`]: the store (keyspaces, reads, the single-writer apply path, compaction, hash).
//! - [`types`]: request/response types mirroring etcd's protobuf messages.
//! - [`keys`]: key-range conventions (`range_end`, prefixes) and the index key encoding.
//! - [`revision`]: `(main, sub)` revisions and their byte encoding.
//! - [`watch`]: the watch hub (synced/unsynced watchers, delivery of committed revisions).
//! - `live_index`: every live key's revisions, version and lease in memory (the writer's lookup).
//! - [`lease`]: the lessor (attached keys, primary-only expiry, checkpoints).
//! - [`snapshot`]: full-state export/import for raft snapshots.
//! - [`limits`]: every named bound.
//! - [`error`]: the store's error enum.

#![deny(unsafe_code, clippy::unwrap_used)]

pub mod error;
pub mod keys;
pub mod kv_store;
pub mod lease;
pub mod limits;
mod live_index;
pub mod revision;
pub mod snapshot;
pub mod types;
pub mod watch;

pub use error::{Error, Result};
pub use keys::{KeyEnd, KeyRange, prefix_end};
pub use kv_store::{ApplyContext, KvStore, StoreOptions, WriteBatch, validate_put, validate_txn};
pub use lease::Lessor;
pub use types::*;
pub use watch::{SyncState, WatchHub, WatchSink, WatcherId};
