//! Peer messages and their framing: every frame is a 4-byte big-endian length followed by that
//! many bytes of postcard, and no frame may exceed [`FRAME_BYTES_MAX`]. One request per QUIC
//! stream: the dialer writes an [`Envelope`] (and, for snapshots, data frames ending with an
//! empty one), the listener answers with one `Result<PeerResponse, Error>` frame.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::raft::{Applied, Member, Proposal, TypeConfig};

/// Largest frame: a raft payload of up to `RAFT_PAYLOAD_ENTRIES_MAX` entries of at most
/// ~6 MiB each (a 4 MiB proposal batch plus one maximal request) fits.
pub const FRAME_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Snapshot data travels in frames of this size.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// ALPN of the peer protocol; a mismatch fails the handshake instead of a later decode.
pub const ALPN: &[u8] = b"keyhold-peer/1";

/// A request and who sent it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Sending member.
    pub from: u64,
    /// Cluster the sender belongs to (0 while a joining member does not know it yet).
    pub cluster_id: u64,
    /// The request.
    pub request: PeerRequest,
}

/// An [`Envelope`] as its sender writes it: the request borrowed, so that a request can be
/// sent again on a new stream without a copy. Encodes exactly as [`Envelope`].
#[derive(Debug, Serialize)]
pub struct EnvelopeRef<'a> {
    /// Sending member.
    pub from: u64,
    /// Cluster the sender belongs to.
    pub cluster_id: u64,
    /// The request.
    pub request: &'a PeerRequest,
}

/// A membership change, run on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a member (as a learner, or as a voter).
    Add {
        /// New member's ID.
        id: u64,
        /// Its peer URLs.
        peer_urls: Vec<String>,
        /// Join as a learner.
        learner: bool,
    },
    /// Remove a voter or learner.
    Remove {
        /// Member ID.
        id: u64,
    },
    /// Make a learner a voter.
    Promote {
        /// Member ID.
        id: u64,
    },
    /// Replace a member's peer URLs.
    Update {
        /// Member ID.
        id: u64,
        /// New peer URLs.
        peer_urls: Vec<String>,
    },
    /// A running member publishes its name and client URLs.
    Publish {
        /// Member ID.
        id: u64,
        /// `--name`.
        name: String,
        /// `--advertise-client-urls`.
        client_urls: Vec<String>,
    },
}

/// What one member asks another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<u64>),
    /// A full snapshot follows as data frames, ended by an empty frame.
    Snapshot {
        /// The sending leader's vote.
        vote: Vote<u64>,
        /// What the snapshot is known as to raft.
        meta: SnapshotMeta<u64, Member>,
    },
    /// Client writes received by a follower, for the leader to propose.
    Forward(Proposal),
    /// A read index for a follower's linearizable read.
    ReadIndex,
    /// A lease keepalive received by a follower.
    LeaseRenew {
        /// Lease ID.
        id: i64,
    },
    /// The remaining TTL of a lease, which only the leader knows.
    LeaseRemaining {
        /// Lease ID.
        id: i64,
    },
    /// A membership change received by a follower.
    ChangeMembership(MembershipChange),
    /// Who are you (a joining member learns the cluster ID).
    Hello,
    /// Leader transfer: turn this member's election timer on or off.
    SetElect {
        /// Whether the member may campaign on its own.
        enabled: bool,
    },
    /// Leader transfer: campaign now.
    Campaign,
}

/// Answers, one variant per request.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<u64>, openraft::error::RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, openraft::error::RaftError<u64>>),
    /// To `Snapshot`.
    Snapshot(SnapshotResponse<u64>),
    /// To `Forward`: the entry's log index and what applying it produced on the leader.
    Forward {
        /// Log index of the entry.
        index: u64,
        /// Outcome of each write.
        applied: Applied,
    },
    /// To `ReadIndex`: reads may be served once this index is applied.
    ReadIndex(u64),
    /// To `LeaseRenew`: remaining TTL (0 = unknown or expired).
    LeaseRenew(i64),
    /// To `LeaseRemaining`: remaining seconds (`None` = unknown lease).
    LeaseRemaining(Option<i64>),
    /// To `ChangeMembership`, `SetElect` and `Campaign`.
    Changed,
    /// To `Hello`.
    Hello {
        /// The cluster's ID.
        cluster_id: u64,
        /// The answering member's ID.
        member_id: u64,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended early.
    #[error("peer stream: {0}")]
    Stream(String),
    /// The frame is larger than allowed.
    #[error("peer frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The bytes are not a valid message.
    #[error("peer frame does not decode: {0}")]
    Decode(String),
}

/// Writes one frame. The length prefix and the message go to the stream as one chunk, sized
/// up front: two writes could leave as two packets, and a growing buffer would be copied as it
/// grows.
///
/// # Errors
/// When the stream fails or the message is too large.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    let encode_err = |e: postcard::Error| FrameError::Decode(e.to_string());
    let len = postcard::experimental::serialized_size(msg).map_err(encode_err)?;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    let frame = postcard::to_extend(msg, frame).map_err(encode_err)?;
    send.write_chunk(frame.into())
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))
}

/// Writes one frame of raw bytes.
///
/// # Errors
/// When the stream fails or the bytes are too many.
pub async fn write_raw(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    send.write_chunk(frame.into())
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))
}

/// Reads one frame of raw bytes.
///
/// # Errors
/// When the stream fails, ends, or announces a frame over the limit.
pub async fn read_raw(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    read_body(recv, len).await
}

/// Reads one frame, or `None` when the stream ends cleanly where a frame would start (a
/// request stream kept open for several requests, closed by its sender).
///
/// # Errors
/// As [`read_frame`]; a stream that ends inside a frame is an error.
pub async fn read_frame_or_end<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Stream(e.to_string())),
    }
    decode(&read_body(recv, len).await?).map(Some)
}

/// Reads the body of a frame whose length prefix was `len`.
async fn read_body(recv: &mut quinn::RecvStream, len: [u8; 4]) -> Result<Vec<u8>, FrameError> {
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    Ok(body)
}

/// Takes the end of a stream whose last frame has been read, if it has arrived, without
/// waiting. quinn answers a receive stream dropped before its end with STOP_SENDING: one more
/// packet, and one more wakeup of the peer, per request.
pub fn take_end(recv: &mut quinn::RecvStream) {
    use futures::FutureExt;
    let mut byte = [0u8; 1];
    let _ = recv.read(&mut byte).now_or_never();
}

/// Reads and decodes one frame.
///
/// # Errors
/// As [`read_raw`], or when the bytes do not decode.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, FrameError> {
    decode(&read_raw(recv).await?)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// The answer frame's type.
pub type Answer = Result<PeerResponse, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Senders write [`EnvelopeRef`] and receivers read [`Envelope`]: the two must not drift.
    #[test]
    fn a_borrowed_envelope_encodes_as_an_envelope() {
        let request = PeerRequest::LeaseRenew { id: 42 };
        let sent = EnvelopeRef {
            from: 7,
            cluster_id: 9,
            request: &request,
        };
        let bytes = postcard::to_allocvec(&sent).expect("encode");
        let read: Envelope = decode(&bytes).expect("decode");
        assert_eq!((read.from, read.cluster_id), (7, 9));
        assert!(matches!(read.request, PeerRequest::LeaseRenew { id: 42 }));
    }
}
