//! The node's error type. Each variant maps to one etcd gRPC code and exact message in
//! `api::status` (the single table).

/// Errors of the node (beyond the store's own).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A store domain or storage error.
    #[error(transparent)]
    Store(#[from] keyhold_store::Error),
    /// No raft leader is known.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// Leadership moved while the request waited.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// The proposal did not commit within the request timeout.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The node is shutting down.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// Committed entries wait too long for apply.
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    /// The request exceeds `--max-request-bytes`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// A leader-only RPC reached a follower.
    #[error("etcdserver: not leader")]
    NotLeader,
    /// MoveLeader to a member that cannot lead.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// Anything unexpected; the message is passed through.
    #[error("{0}")]
    Internal(String),
}

/// Node result alias.
pub type Result<T> = std::result::Result<T, Error>;
