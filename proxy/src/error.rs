//! The proxy's errors and the one table that maps them to gRPC status (etcd's codes and
//! messages; answers from members pass through unchanged).

use tonic::{Code, Status};

/// Everything that can go wrong in the proxy itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A member answered with an error: passed to the client unchanged.
    #[error("{}", .0.message())]
    Upstream(Status),
    /// No member could be reached.
    #[error("no healthy endpoint: {0}")]
    NoEndpoint(String),
    /// A request waited longer than the request timeout.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// A bounded queue or limit was hit.
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    /// The proxy is shutting down.
    #[error("proxy is shutting down")]
    Stopped,
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Upstream(s)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Upstream(s) => s,
            Error::NoEndpoint(_) | Error::Timeout | Error::Stopped => {
                Status::new(Code::Unavailable, e.to_string())
            }
            Error::TooManyRequests => Status::new(Code::ResourceExhausted, e.to_string()),
        }
    }
}

/// Proxy result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_errors_pass_through_unchanged() {
        let s = Status::new(Code::InvalidArgument, "etcdserver: key is not provided");
        let back: Status = Error::from(s).into();
        assert_eq!(back.code(), Code::InvalidArgument);
        assert_eq!(back.message(), "etcdserver: key is not provided");
    }

    #[test]
    fn own_errors_use_etcd_codes_and_messages() {
        let s: Status = Error::Timeout.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "etcdserver: request timed out")
        );
        let s: Status = Error::TooManyRequests.into();
        assert_eq!(s.code(), Code::ResourceExhausted);
    }
}
