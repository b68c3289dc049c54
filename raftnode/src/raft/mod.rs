//! openraft wiring: type configuration, the fjall log store, the state machine over the MVCC
//! store, and the peer network.
//!
//! ```text
//!  client write ──► Raft::client_write(WriteRequest) ──► LogStore::append ──► flusher (fsync, grouped)
//!                                                             │ committed
//!                                                             ▼
//!                          StateMachine::apply ──► KvStore::apply (data + applied log id, one batch)
//! ```

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); boxing it here
// would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;

use keyhold_store::{Error as StoreError, WriteRequest, WriteResponse};
use serde::{Deserialize, Serialize};

/// What applying one log entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A client write and its outcome (domain errors are outcomes, not failures).
    Write(Result<WriteResponse, StoreError>),
    /// A blank or membership entry.
    Nothing,
}

openraft::declare_raft_types!(
    /// Keyhold's raft types.
    pub TypeConfig:
        D = WriteRequest,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// The raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Storage error of this type config.
pub type StorageError = openraft::StorageError<u64>;

/// Last applied log id and membership, as the state machine reports them.
pub type AppliedState = (
    Option<openraft::LogId<u64>>,
    openraft::StoredMembership<u64, openraft::BasicNode>,
);

/// Meta key (in the store's meta keyspace) of the last applied log id.
pub const META_APPLIED: &[u8] = b"raft/applied";
/// Meta key of the last applied membership.
pub const META_MEMBERSHIP: &[u8] = b"raft/membership";

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain owned data into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}
