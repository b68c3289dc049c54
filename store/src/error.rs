//! The store's one error type. Each variant is a domain condition that the API layer maps to
//! etcd's gRPC code and exact message (`raftnode/src/api/status.rs`), except `Storage` and
//! `Corrupt`, which mean the disk cannot be trusted and the node should stop.

/// Errors returned by the store.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// The requested revision is older than the compacted revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A put named a lease that does not exist (or a revoke/keepalive named an unknown lease).
    #[error("lease not found")]
    LeaseNotFound,
    /// A lease grant reused the ID of a live lease.
    #[error("lease already exists")]
    LeaseExists,
    /// A lease TTL above `limits::LEASE_TTL_MAX_SECONDS`.
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    /// `ignore_value`/`ignore_lease` on a key that does not exist, or an empty request op.
    #[error("key not found")]
    KeyNotFound,
    /// A request without a key.
    #[error("key is not provided")]
    EmptyKey,
    /// `ignore_value` together with a value.
    #[error("value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("lease is provided")]
    LeaseProvided,
    /// More than `txn_ops_max` operations in one txn branch or compare list.
    #[error("too many operations in txn request")]
    TooManyTxnOps,
    /// Two writes to the same key in one txn branch.
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    /// A write would push the backend over the quota, or the NOSPACE alarm is active.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// The CORRUPT alarm is active.
    #[error("corrupt cluster")]
    Corrupt,
    /// Unknown enum value in a range request's sort options.
    #[error("invalid sort option")]
    InvalidSortOption,
    /// The on-disk state could not be read or written; the node must stop.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<fjall::Error> for Error {
    fn from(e: fjall::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Self::Storage(format!("decode: {e}"))
    }
}

/// Store result alias.
pub type Result<T> = std::result::Result<T, Error>;
