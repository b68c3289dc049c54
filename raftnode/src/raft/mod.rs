//! openraft wiring: type configuration, the fjall log store, the state machine over the MVCC
//! store, and the peer network.
//!
//! ```text
//!  client write ──► Raft::client_write(Proposal) ──► LogStore::append (Wal) ──► flusher (fsync, grouped)
//!                                                             │ committed           │ durable
//!                                                             ▼                     ▼
//!          StateMachine::apply (waits for durable) ──► KvStore write batch (data + applied log id)
//! ```
//!
//! The leader's fsync runs while followers write theirs; what raft commits is applied and
//! announced only once it is durable on the leader too (see [`log_store`]). The leader's state
//! machine answers the clients of its own proposals as it applies them, ahead of raft's answer
//! (see [`proposals`]).

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); boxing it here
// would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod proposals;
pub mod state_machine;
pub mod wal;

use keyhold_store::{Error as StoreError, WriteRequest, WriteResponse};
use serde::{Deserialize, Serialize};

/// One raft entry's payload: the client writes the proposer batched while earlier entries were
/// in flight (fewer, larger entries: fewer appends, messages and apply calls per write). Each
/// write gets its own revision, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Writes, applied in order.
    pub writes: Vec<WriteRequest>,
    /// Names the proposal on the leader that made it, whose state machine answers its clients
    /// as it applies the entry ([`proposals`]); 0 names none.
    pub id: u64,
    /// Runs of `writes` that followers forwarded: each follower's state machine answers the
    /// clients of its own run as it applies the entry, without waiting for the leader's answer.
    pub forwarded: Vec<Forwarded>,
}

/// A run of a proposal's writes, `first..first + count`, that follower `member` forwarded as
/// its own proposal `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    /// The follower's member ID.
    pub member: u64,
    /// The proposal's ID on that follower.
    pub id: u64,
    /// The run's first write.
    pub first: u32,
    /// The run's length.
    pub count: u32,
}

impl Forwarded {
    /// The run's writes, as positions in the proposal.
    pub fn writes(&self) -> std::ops::Range<usize> {
        self.first as usize..self.first as usize + self.count as usize
    }
}

/// What applying one log entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// One outcome per write of the proposal (domain errors are outcomes, not failures).
    Writes(Vec<Result<WriteResponse, StoreError>>),
    /// A blank or membership entry.
    Nothing,
}

/// A member as raft's membership records it: what etcd's MemberList reports. The client URLs
/// and name are published by the member itself once it runs (empty until then, as in etcd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Member name (`--name`); empty until the member has started and published it.
    pub name: String,
    /// Peer URLs (QUIC, UDP).
    pub peer_urls: Vec<String>,
    /// Client URLs; empty until published.
    pub client_urls: Vec<String>,
}

impl Member {
    /// The QUIC address peers dial: the first peer URL.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.peer_urls
            .first()
            .and_then(|u| crate::config::parse_url(u).ok())
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_urls.join(","))
    }
}

openraft::declare_raft_types!(
    /// Keyhold's raft types.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = Member,
        SnapshotData = tokio::fs::File,
);

/// The raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Storage error of this type config.
pub type StorageError = openraft::StorageError<u64>;

/// Last applied log id and membership, as the state machine reports them.
pub type AppliedState = (
    Option<openraft::LogId<u64>>,
    openraft::StoredMembership<u64, Member>,
);

/// Meta key (in the store's meta keyspace) of the last applied log id.
pub const META_APPLIED: &[u8] = b"raft/applied";
/// Meta key of `(log id, writes applied)` for the entry being applied, so a crash in the middle
/// of a proposal's writes resumes after the last one applied instead of repeating it.
pub const META_PARTIAL: &[u8] = b"raft/partial";
/// Meta key of the last applied membership.
pub const META_MEMBERSHIP: &[u8] = b"raft/membership";

/// Encodes `v` into a buffer sized up front (a growing one would be copied as it grows).
pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain owned data into a Vec cannot fail.
    let len = postcard::experimental::serialized_size(v).unwrap_or_default();
    postcard::to_extend(v, Vec::with_capacity(len)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_entries_round_trip_through_postcard() {
        let mut nodes = std::collections::BTreeMap::new();
        for i in 1..=3u64 {
            let m = Member {
                name: format!("m{i}"),
                peer_urls: vec![format!("http://127.0.0.1:{i}")],
                client_urls: vec![],
            };
            nodes.insert(i, m);
        }
        let membership = openraft::Membership::new(vec![nodes.keys().copied().collect()], nodes);
        let entry: openraft::Entry<TypeConfig> = openraft::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 2),
            payload: openraft::EntryPayload::Membership(membership),
        };
        let bytes = postcard::to_allocvec(&entry).expect("encodes");
        let back: openraft::Entry<TypeConfig> = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back.log_id, entry.log_id);
    }
}
