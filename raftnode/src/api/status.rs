//! The one table from errors to etcd's gRPC status: code and exact message. etcd clients rebuild
//! typed errors by matching the message text, so these strings are part of the wire contract.

use keyhold_store::Error as StoreError;
use tonic::{Code, Status};

use crate::error::Error;

/// etcd's code and message for a store error.
fn store_status(e: &StoreError) -> (Code, &'static str) {
    use StoreError::*;
    match e {
        Compacted => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        FutureRevision => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        LeaseNotFound => (Code::NotFound, "etcdserver: requested lease not found"),
        LeaseExists => (Code::FailedPrecondition, "etcdserver: lease already exists"),
        LeaseTtlTooLarge => (Code::OutOfRange, "etcdserver: too large lease TTL"),
        KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found"),
        EmptyKey => (Code::InvalidArgument, "etcdserver: key is not provided"),
        ValueProvided => (Code::InvalidArgument, "etcdserver: value is provided"),
        LeaseProvided => (Code::InvalidArgument, "etcdserver: lease is provided"),
        TooManyTxnOps => (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        ),
        DuplicateKey => (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        ),
        NoSpace => (
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        ),
        Corrupt => (Code::DataLoss, "etcdserver: corrupt cluster"),
        InvalidSortOption => (Code::InvalidArgument, "etcdserver: invalid sort option"),
        Storage(_) => (Code::Unknown, "etcdserver: storage failure"),
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let (code, message): (Code, &str) = match &e {
            Error::Store(StoreError::Storage(m)) => return Status::new(Code::Unknown, m.clone()),
            Error::Store(s) => store_status(s),
            Error::NoLeader => (Code::Unavailable, "etcdserver: no leader"),
            Error::LeaderChanged => (Code::Unavailable, "etcdserver: leader changed"),
            Error::Timeout => (Code::Unavailable, "etcdserver: request timed out"),
            Error::Stopped => (Code::Unavailable, "etcdserver: server stopped"),
            Error::TooManyRequests => (Code::ResourceExhausted, "etcdserver: too many requests"),
            Error::RequestTooLarge => (Code::InvalidArgument, "etcdserver: request is too large"),
            Error::NotLeader => (Code::FailedPrecondition, "etcdserver: not leader"),
            Error::BadLeaderTransferee => (
                Code::FailedPrecondition,
                "etcdserver: bad leader transferee",
            ),
            Error::LeaderUnreachable => (Code::Unavailable, "etcdserver: no leader"),
            Error::LearnerNotSupported => (
                Code::FailedPrecondition,
                "etcdserver: rpc not supported for learner",
            ),
            Error::MemberNotFound => (Code::NotFound, "etcdserver: member not found"),
            Error::PeerUrlExists => (
                Code::FailedPrecondition,
                "etcdserver: Peer URLs already exists",
            ),
            Error::MemberIdExists => (
                Code::FailedPrecondition,
                "etcdserver: member ID already exist",
            ),
            Error::NotLearner => (
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member",
            ),
            Error::LearnerNotReady => (
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            Error::NotEnoughStartedMembers => (
                Code::FailedPrecondition,
                "etcdserver: re-configuration failed due to not enough started members",
            ),
            Error::ConfigChangeInProgress => (Code::Unavailable, "etcdserver: request timed out"),
            Error::LeaderTransferTimeout => (
                Code::Unavailable,
                "etcdserver: request timed out, leader transfer took too long",
            ),
            Error::TooManyLearners => (
                Code::FailedPrecondition,
                "etcdserver: too many learner members in cluster",
            ),
            Error::InvalidPeerUrls => (
                Code::InvalidArgument,
                "etcdserver: given member URLs are invalid",
            ),
            Error::Internal(m) => return Status::new(Code::Unknown, m.clone()),
        };
        Status::new(code, message)
    }
}

/// A store error as a status (the store's errors are not the node's, so no `From`).
pub fn store_err(e: StoreError) -> Status {
    Error::Store(e).into()
}

/// The message etcd puts in a watch `cancel_reason` for an error.
pub fn cancel_reason(e: &StoreError) -> String {
    store_err(e.clone()).message().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_etcds() {
        let s = store_err(StoreError::Compacted);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            )
        );
        let s = Status::from(Error::NoLeader);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "etcdserver: no leader")
        );
        let s = store_err(StoreError::DuplicateKey);
        assert_eq!(
            s.message(),
            "etcdserver: duplicate key given in txn request"
        );
    }
}
