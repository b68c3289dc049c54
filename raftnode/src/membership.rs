//! Cluster membership as etcd presents it, on openraft's joint-consensus membership: MemberAdd
//! (voter or learner), MemberRemove, MemberPromote, MemberUpdate, and the attributes (name,
//! client URLs) each member publishes when it starts. Changes run on the leader; followers
//! forward them over the peer plane.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::ChangeMembers;
use openraft::error::RaftError;

use crate::error::{Error, Result};
use crate::node::Node;
use crate::peer::wire::{MembershipChange, PeerRequest, PeerResponse};
use crate::raft::Member;

/// Learners a cluster may have at once (etcd's `--max-learners` default).
pub const LEARNERS_MAX: usize = 1;
/// A learner may be promoted once it has replicated this share of the leader's log (etcd: 90%).
const PROMOTE_MATCH_PERCENT_MIN: u64 = 90;
/// Pause before retrying a membership change while the previous one commits.
const CHANGE_RETRY: std::time::Duration = std::time::Duration::from_millis(20);
/// How often a running member re-checks that its published attributes are current.
const PUBLISH_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// A member as listed by MemberList.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Member ID.
    pub id: u64,
    /// What raft's membership records.
    pub member: Member,
    /// Not a voter.
    pub is_learner: bool,
}

/// The members in this member's view of the latest membership (this member's own name and
/// client URLs filled in before it has published them).
pub fn list(node: &Node) -> Vec<Listed> {
    let mut listed = recorded(node);
    for l in &mut listed {
        if l.id == node.member_id && l.member.client_urls.is_empty() {
            l.member.name = node.config.name.clone();
            l.member.client_urls = node.config.advertise_client_urls.clone();
        }
    }
    listed
}

/// The members exactly as raft's latest membership records them.
fn recorded(node: &Node) -> Vec<Listed> {
    let metrics = node.raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, member)| Listed {
            id: *id,
            member: member.clone(),
            is_learner: !voters.contains(id),
        })
        .collect()
}

fn raft_error(e: RaftError<u64, openraft::error::ClientWriteError<u64, Member>>) -> Error {
    use openraft::error::ClientWriteError;
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            if f.leader_id.is_some() {
                Error::LeaderChanged
            } else {
                Error::NoLeader
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(_),
        )) => Error::ConfigChangeInProgress,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Error::Internal(format!("etcdserver: {e}"))
        }
        RaftError::Fatal(_) => Error::Stopped,
    }
}

/// Runs a membership change on this member, which must lead.
///
/// # Errors
/// etcd's membership errors, `LeaderChanged` when this member does not lead, `Timeout`.
pub async fn change_on_leader(node: &Node, change: MembershipChange) -> Result<()> {
    // One change at a time (raft allows one uncommitted configuration; etcd serializes its
    // conf changes the same way), retried while openraft still reports one in progress.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let deadline = tokio::time::Instant::now() + node.request_timeout();
    let _one = tokio::time::timeout_at(deadline, SERIAL.lock())
        .await
        .map_err(|_| Error::Timeout)?;
    loop {
        match change_once(node, change.clone()).await {
            Err(Error::ConfigChangeInProgress) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(CHANGE_RETRY).await;
            }
            Err(Error::ConfigChangeInProgress) => return Err(Error::Timeout),
            other => return other,
        }
    }
}

async fn change_once(node: &Node, change: MembershipChange) -> Result<()> {
    if !node.is_leader() {
        return Err(Error::LeaderChanged);
    }
    let listed = recorded(node);
    let find = |id: u64| listed.iter().find(|l| l.id == id).cloned();
    let urls_taken = |urls: &[String], except: u64| {
        listed
            .iter()
            .filter(|l| l.id != except)
            .any(|l| l.member.peer_urls.iter().any(|u| urls.contains(u)))
    };
    let raft = &node.raft;
    let work = async {
        match change {
            MembershipChange::Add {
                id,
                peer_urls,
                learner,
            } => {
                if urls_taken(&peer_urls, 0) {
                    return Err(Error::PeerUrlExists);
                }
                if find(id).is_some() {
                    return Err(Error::MemberIdExists);
                }
                if !learner {
                    // etcd's strict reconfiguration check: the new voter has not started, so
                    // the running voters alone must make the new quorum.
                    let voters = listed.iter().filter(|l| !l.is_learner).count() + 1;
                    if started_voters(node, &listed, None) < voters / 2 + 1 {
                        return Err(Error::NotEnoughStartedMembers);
                    }
                }
                if learner && listed.iter().filter(|l| l.is_learner).count() >= LEARNERS_MAX {
                    return Err(Error::TooManyLearners);
                }
                let member = Member {
                    name: String::new(),
                    peer_urls,
                    client_urls: Vec::new(),
                };
                raft.add_learner(id, member, false)
                    .await
                    .map_err(raft_error)?;
                if !learner {
                    let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                    raft.change_membership(voters, false)
                        .await
                        .map_err(raft_error)?;
                }
            }
            MembershipChange::Remove { id } => {
                let m = find(id).ok_or(Error::MemberNotFound)?;
                if !m.is_learner {
                    let voters = listed.iter().filter(|l| !l.is_learner).count() - 1;
                    if started_voters(node, &listed, Some(id)) < voters / 2 + 1 {
                        return Err(Error::NotEnoughStartedMembers);
                    }
                }
                let change = if m.is_learner {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                };
                raft.change_membership(change, false)
                    .await
                    .map_err(raft_error)?;
            }
            MembershipChange::Promote { id } => {
                let m = find(id).ok_or(Error::MemberNotFound)?;
                if !m.is_learner {
                    return Err(Error::NotLearner);
                }
                if !in_sync(node, id) {
                    return Err(Error::LearnerNotReady);
                }
                let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                raft.change_membership(voters, false)
                    .await
                    .map_err(raft_error)?;
            }
            MembershipChange::Update { id, peer_urls } => {
                let mut m = find(id).ok_or(Error::MemberNotFound)?;
                if urls_taken(&peer_urls, id) {
                    return Err(Error::PeerUrlExists);
                }
                m.member.peer_urls = peer_urls;
                set_node(node, id, m.member).await?;
            }
            MembershipChange::Publish {
                id,
                name,
                client_urls,
            } => {
                let mut m = find(id).ok_or(Error::MemberNotFound)?;
                if m.member.name != name || m.member.client_urls != client_urls {
                    m.member.name = name;
                    m.member.client_urls = client_urls;
                    set_node(node, id, m.member).await?;
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(node.request_timeout(), work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout),
    }
}

async fn set_node(node: &Node, id: u64, member: Member) -> Result<()> {
    let change = ChangeMembers::SetNodes(BTreeMap::from([(id, member)]));
    node.raft
        .change_membership(change, true)
        .await
        .map(|_| ())
        .map_err(raft_error)
}

/// Voters that are running as far as this leader can tell (itself, and those it holds a live
/// peer connection to), leaving out `except`.
fn started_voters(node: &Node, listed: &[Listed], except: Option<u64>) -> usize {
    listed
        .iter()
        .filter(|l| !l.is_learner && Some(l.id) != except)
        .filter(|l| {
            l.id == node.member_id
                || l.member
                    .peer_addr()
                    .is_some_and(|a| node.peers.connected(a))
        })
        .count()
}

/// Whether learner `id` has replicated enough of the leader's log to be promoted.
fn in_sync(node: &Node, id: u64) -> bool {
    let metrics = node.raft.metrics();
    let m = metrics.borrow();
    let last = m.last_log_index.unwrap_or(0);
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map_or(0, |l| l.index);
    matched * 100 >= last * PROMOTE_MATCH_PERCENT_MIN
}

/// Runs a membership change wherever this member is: here when leading, on the leader
/// otherwise.
///
/// # Errors
/// As [`change_on_leader`], plus forwarding errors.
pub async fn change(node: &Node, change: MembershipChange) -> Result<()> {
    if node.is_leader() {
        return change_on_leader(node, change).await;
    }
    match node
        .to_leader(PeerRequest::ChangeMembership(change))
        .await?
    {
        PeerResponse::Changed => Ok(()),
        other => Err(Error::Internal(format!("leader answered {other:?}"))),
    }
}

/// Publishes this member's name and client URLs into the membership once it runs (so
/// MemberList shows them, as etcd's members publish their attributes), and again if they
/// change.
pub async fn publish(node: Arc<Node>) {
    let mut stopped = std::pin::pin!(crate::node::stopped(node.shutdown.clone()));
    loop {
        let current = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .get_node(&node.member_id)
                .cloned()
        };
        let wanted = current.as_ref().is_some_and(|m| {
            m.name != node.config.name || m.client_urls != node.config.advertise_client_urls
        });
        let wait = if wanted && node.leader().is_some() {
            let change = MembershipChange::Publish {
                id: node.member_id,
                name: node.config.name.clone(),
                client_urls: node.config.advertise_client_urls.clone(),
            };
            match self::change(&node, change).await {
                Ok(()) => {
                    tracing::info!(name = %node.config.name, "published member attributes");
                    PUBLISH_CHECK
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publishing member attributes");
                    crate::node::PUBLISH_RETRY
                }
            }
        } else if wanted {
            crate::node::PUBLISH_RETRY
        } else {
            PUBLISH_CHECK
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stopped => return,
        }
    }
}
