//! The node's error type. Each variant maps to one etcd gRPC code and exact message in
//! `api::status` (the single table).

/// Errors of the node (beyond the store's own).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The leader could not be reached (the request never left this member).
    #[error("etcdserver: no leader")]
    LeaderUnreachable,
    /// A learner received what etcd learners refuse.
    #[error("etcdserver: rpc not supported for learner")]
    LearnerNotSupported,
    /// No member with that ID.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// Another member already has one of the peer URLs.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// A member with that ID already exists.
    #[error("etcdserver: member ID already exist")]
    MemberIdExists,
    /// MemberPromote of a voter.
    #[error("etcdserver: can only promote a learner member")]
    NotLearner,
    /// MemberPromote of a learner that lags the leader.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// MemberAdd of a learner when the cluster has `LEARNERS_MAX` already.
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    /// Peer URLs that do not parse.
    #[error("etcdserver: given member URLs are invalid")]
    InvalidPeerUrls,
    /// A membership change would leave fewer running voters than a quorum.
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    /// Another membership change is still committing (retried internally; clients see
    /// `request timed out` if it never clears).
    #[error("etcdserver: request timed out")]
    ConfigChangeInProgress,
    /// MoveLeader did not complete in time.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// Anything unexpected; the message is passed through.
    #[error("{0}")]
    Internal(String),
}

/// Node result alias.
pub type Result<T> = std::result::Result<T, Error>;
