//! Clients waiting for the leader's proposals to apply.
//!
//! A write's outcome exists once the state machine has applied its entry. Raft's own way back
//! to the proposer passes it through raft's core task, then the proposer's task, and only then
//! to the client's handler: two hand-offs on a 1-client write's path, where the core often has
//! other work queued (replication answers, commit announcements). So the leader names each
//! proposal ([`Proposal::id`](super::Proposal)) and registers its clients here, and its state
//! machine answers them as it applies the entry. Raft's answer still arrives, and answers the
//! clients when the state machine did not: a proposal that failed, or an entry this member did
//! not apply itself (it was installed by a snapshot).
//!
//! Exactly one of the two answers: both take the clients out of the table under its lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use keyhold_store::WriteResponse;
use tokio::sync::oneshot;

use super::Applied;
use crate::error::{Error, Result};

/// The outcome of one applied write (a domain error is an outcome, not a failure).
pub type StoreResult = std::result::Result<WriteResponse, keyhold_store::Error>;

/// Where one write's outcome goes: the index of the raft entry that carried it and what
/// applying it produced.
pub type Waiter = oneshot::Sender<Outcome>;

/// What a [`Waiter`] receives.
pub type Outcome = Result<(u64, StoreResult)>;

/// Proposals in flight and their clients (bounded by the proposer's `PROPOSALS_IN_FLIGHT_MAX`:
/// each proposal's clients are taken out before its permit is released).
pub struct ProposalWaiters {
    /// The next proposal ID. Starts at a random point, so the IDs in entries proposed before a
    /// restart (which this member may apply again after it) are not the ones waited for now.
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Vec<Waiter>>>,
    /// The last index the state machine applied. Raft's metrics learn it a hand-off later than
    /// the clients answered here, and a client that sends Status after its Put must see the
    /// put's index applied, as etcd shows it.
    applied: AtomicU64,
}

impl Default for ProposalWaiters {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(rand::random::<u64>() | 1),
            waiting: Mutex::default(),
            applied: AtomicU64::new(0),
        }
    }
}

impl ProposalWaiters {
    /// Registers the clients of a proposal about to be made and returns its ID (never 0, which
    /// names no proposal).
    pub fn register(&self, waiters: Vec<Waiter>) -> u64 {
        let mut id = self.next.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            id = self.next.fetch_add(1, Ordering::Relaxed);
        }
        self.lock().insert(id, waiters);
        id
    }

    /// Takes the clients of proposal `id` out, unless they were answered already.
    pub fn take(&self, id: u64) -> Option<Vec<Waiter>> {
        if id == 0 {
            return None;
        }
        self.lock().remove(&id)
    }

    /// The state machine applied proposal `id` as the entry at `index`. When this member
    /// registered it, answers its clients, leaving [`Applied::Nothing`] for raft to carry
    /// back, and returns true; otherwise leaves `applied` as it is.
    pub fn applied(&self, id: u64, index: u64, applied: &mut Applied) -> bool {
        let Some(waiters) = self.take(id) else {
            return false;
        };
        crate::probe::mark(crate::probe::Stage::ProposalApplied, index);
        answer(
            waiters,
            Ok((index, std::mem::replace(applied, Applied::Nothing))),
        );
        true
    }

    /// The state machine applied everything up to `index`.
    pub fn applied_through(&self, index: u64) {
        self.applied.fetch_max(index, Ordering::Release);
    }

    /// The last index the state machine applied (0 before its first apply).
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Waiter>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Answers each client of a proposal with its write's outcome, or all of them with the
/// proposal's failure.
pub fn answer(waiters: Vec<Waiter>, outcome: Result<(u64, Applied)>) {
    match outcome {
        Ok((index, Applied::Writes(results))) if results.len() == waiters.len() => {
            for (w, r) in waiters.into_iter().zip(results) {
                let _ = w.send(Ok((index, r)));
            }
        }
        Ok((_, other)) => {
            let e = Error::Internal(format!("proposal applied as {other:?}"));
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(revision: i64) -> StoreResult {
        Ok(WriteResponse::Compact { revision })
    }

    fn waiters(n: usize) -> (Vec<Waiter>, Vec<oneshot::Receiver<Outcome>>) {
        (0..n).map(|_| oneshot::channel()).unzip()
    }

    #[test]
    fn the_state_machine_answers_a_registered_proposal_and_raft_finds_it_answered() {
        let table = ProposalWaiters::default();
        let (tx, mut rx) = waiters(2);
        let id = table.register(tx);
        assert_ne!(id, 0);
        let mut applied = Applied::Writes(vec![outcome(7), outcome(8)]);
        table.applied(id, 42, &mut applied);
        assert_eq!(
            applied,
            Applied::Nothing,
            "the outcomes went to the clients"
        );
        assert_eq!(rx[0].try_recv().unwrap(), Ok((42, outcome(7))));
        assert_eq!(rx[1].try_recv().unwrap(), Ok((42, outcome(8))));
        assert!(
            table.take(id).is_none(),
            "raft's answer must not answer again"
        );
    }

    #[test]
    fn an_entry_not_proposed_here_is_left_for_raft() {
        let table = ProposalWaiters::default();
        let (tx, mut rx) = waiters(1);
        let id = table.register(tx);
        let mut applied = Applied::Writes(vec![outcome(3)]);
        table.applied(id.wrapping_add(1000), 9, &mut applied);
        table.applied(0, 9, &mut applied);
        assert_eq!(applied, Applied::Writes(vec![outcome(3)]));
        assert!(rx[0].try_recv().is_err(), "not answered yet");
        let w = table.take(id).expect("still registered");
        answer(w, Err(Error::LeaderChanged));
        assert_eq!(rx[0].try_recv().unwrap(), Err(Error::LeaderChanged));
    }

    #[test]
    fn an_entry_that_does_not_fit_its_clients_fails_them() {
        let table = ProposalWaiters::default();
        let (tx, mut rx) = waiters(2);
        let id = table.register(tx);
        let mut applied = Applied::Writes(vec![outcome(3)]);
        table.applied(id, 9, &mut applied);
        for r in &mut rx {
            assert!(matches!(r.try_recv().unwrap(), Err(Error::Internal(_))));
        }
    }

    #[test]
    fn the_applied_index_only_moves_forward() {
        let table = ProposalWaiters::default();
        assert_eq!(table.applied_index(), 0);
        table.applied_through(12);
        table.applied_through(9);
        assert_eq!(table.applied_index(), 12);
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let table = ProposalWaiters {
            next: AtomicU64::new(u64::MAX),
            ..ProposalWaiters::default()
        };
        let a = table.register(Vec::new());
        let b = table.register(Vec::new());
        assert_eq!(a, u64::MAX);
        assert_eq!(b, 1, "0 is skipped");
    }
}
