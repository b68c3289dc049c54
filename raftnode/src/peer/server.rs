//! The listening side of the peer plane: accepts connections and answers each request stream.

use std::sync::Arc;

use openraft::storage::Snapshot;
use tokio::io::AsyncWriteExt;

use super::wire::{self, Answer, Envelope, PeerRequest, PeerResponse};
use crate::error::Error;
use crate::node::Node;
use crate::probe::{self, Stage};

/// Accepts peer connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>) {
    while let Some(incoming) = endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "peer handshake failed");
                    return;
                }
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_stream(node.clone(), send, recv));
            }
        });
    }
}

/// Answers the requests of one stream in turn until its sender ends it: senders keep request
/// streams open between calls (see [`super::RequestStream`]). A snapshot's stream carries the
/// snapshot's data after the request and ends with it.
async fn handle_stream(node: Arc<Node>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut first = true;
    loop {
        let envelope: Envelope = match wire::read_frame_or_end(&mut recv).await {
            Ok(Some(e)) => e,
            Ok(None) if !first => {
                let _ = send.finish();
                return;
            }
            Ok(None) => {
                let _ = send.reset(1u32.into());
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "bad peer request");
                let _ = send.reset(1u32.into());
                return;
            }
        };
        first = false;
        if node.peers.faults.drops_from(envelope.from) {
            let _ = send.reset(2u32.into());
            return;
        }
        if envelope.cluster_id != 0
            && node.cluster_id != 0
            && envelope.cluster_id != node.cluster_id
        {
            tracing::warn!(
                from = format!("{:x}", envelope.from),
                cluster_id = format!("{:x}", envelope.cluster_id),
                "request from a member of another cluster refused"
            );
            let _ = wire::write_frame(
                &mut send,
                &Answer::Err(Error::Internal("cluster ID mismatch".into())),
            )
            .await;
            let _ = send.finish();
            return;
        }
        let appended = match &envelope.request {
            PeerRequest::AppendEntries(rpc) => {
                let last = rpc.entries.last().map_or(0, |e| e.log_id.index);
                probe::mark(Stage::AppendReceived, last);
                Some(last)
            }
            _ => None,
        };
        let snapshot = matches!(envelope.request, PeerRequest::Snapshot { .. });
        let answer = handle(&node, envelope.request, &mut recv).await;
        if snapshot {
            wire::take_end(&mut recv);
        }
        if wire::write_frame(&mut send, &answer).await.is_err() {
            return;
        }
        if let Some(last) = appended {
            probe::mark(Stage::AppendAnswerWritten, last);
        }
        if snapshot {
            let _ = send.finish();
            return;
        }
    }
}

async fn handle(node: &Arc<Node>, request: PeerRequest, recv: &mut quinn::RecvStream) -> Answer {
    match request {
        PeerRequest::AppendEntries(rpc) => Ok(PeerResponse::AppendEntries(
            node.raft.append_entries(rpc).await,
        )),
        PeerRequest::Vote(rpc) => Ok(PeerResponse::Vote(node.raft.vote(rpc).await)),
        PeerRequest::Snapshot { vote, meta } => receive_snapshot(node, vote, meta, recv).await,
        PeerRequest::Forward(proposal) => {
            let (index, applied) = node.lead_proposal(proposal).await?;
            Ok(PeerResponse::Forward { index, applied })
        }
        PeerRequest::ReadIndex => Ok(PeerResponse::ReadIndex(node.lead_read_index().await?)),
        PeerRequest::LeaseRenew { id } => Ok(PeerResponse::LeaseRenew(node.lead_lease_renew(id)?)),
        PeerRequest::LeaseRemaining { id } => {
            Ok(PeerResponse::LeaseRemaining(node.lead_lease_remaining(id)?))
        }
        PeerRequest::ChangeMembership(change) => {
            crate::membership::change_on_leader(node, change).await?;
            Ok(PeerResponse::Changed)
        }
        PeerRequest::SetElect { enabled } => {
            node.raft.runtime_config().elect(enabled);
            Ok(PeerResponse::Changed)
        }
        PeerRequest::Campaign => {
            node.raft
                .trigger()
                .elect()
                .await
                .map_err(|_| Error::Stopped)?;
            Ok(PeerResponse::Changed)
        }
        PeerRequest::Hello => Ok(PeerResponse::Hello {
            cluster_id: node.cluster_id,
            member_id: node.member_id,
        }),
    }
}

/// Keeps this member from campaigning while it receives and installs a snapshot, and lets it
/// again when dropped.
///
/// A transfer of a large snapshot takes seconds, while the member's log is far behind the
/// leader's, so it cannot win an election; but if it campaigns, its higher term makes the leader
/// step down, which abandons the transfer and the install (raft refuses a snapshot from an older
/// term), and the next transfer meets the same fate. Seen with 1 GiB of data: the member never
/// caught up. (A MoveLeader that pauses elections meanwhile may re-enable them early; the member
/// then only risks that retry.)
struct NoCampaign<'a>(&'a Node);

impl<'a> NoCampaign<'a> {
    fn new(node: &'a Node) -> Self {
        node.raft.runtime_config().elect(false);
        Self(node)
    }
}

impl Drop for NoCampaign<'_> {
    fn drop(&mut self) {
        self.0.raft.runtime_config().elect(true);
    }
}

/// Receives a snapshot's data frames into the state machine's incoming file, then lets raft
/// install it (raft checks the leader's vote first).
async fn receive_snapshot(
    node: &Node,
    vote: openraft::Vote<u64>,
    meta: openraft::SnapshotMeta<u64, crate::raft::Member>,
    recv: &mut quinn::RecvStream,
) -> Answer {
    let io = |e: String| Error::Internal(format!("receiving snapshot: {e}"));
    let _no_campaign = NoCampaign::new(node);
    let mut file = node
        .raft
        .begin_receiving_snapshot()
        .await
        .map_err(|e| io(e.to_string()))?;
    let mut bytes = 0u64;
    loop {
        let chunk = wire::read_raw(recv).await.map_err(|e| io(e.to_string()))?;
        if chunk.is_empty() {
            break;
        }
        bytes += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| io(e.to_string()))?;
    }
    file.flush().await.map_err(|e| io(e.to_string()))?;
    tracing::info!(bytes, snapshot = %meta.snapshot_id, "snapshot received; installing");
    let snapshot = Snapshot {
        meta,
        snapshot: file,
    };
    let resp = node
        .raft
        .install_full_snapshot(vote, snapshot)
        .await
        .map_err(|e| io(e.to_string()))?;
    Ok(PeerResponse::Snapshot(resp))
}
