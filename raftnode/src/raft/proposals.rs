//! Clients waiting for their proposals to apply.
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
//! A follower does the same for the writes it forwards: it registers their clients under an ID
//! of its own, the leader records that ID with the run of the entry's writes they became
//! ([`Forwarded`]), and the follower's state machine answers them as it applies the entry. The
//! leader's answer to the forward, a network hop after the leader's own apply, is then only the
//! fallback.
//!
//! Exactly one of the two answers: both take the clients out of the table under its lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use keyhold_store::WriteResponse;
use tokio::sync::oneshot;

use super::{Applied, Forwarded};
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
    /// This member's ID: the runs of forwarded writes it answers name it.
    me: u64,
    /// The next proposal ID. Starts at a random point, so the IDs in entries proposed before a
    /// restart (which this member may apply again after it) are not the ones waited for now.
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Vec<Waiter>>>,
    /// The last index the state machine applied. Raft's metrics learn it a hand-off later than
    /// the clients answered here, and a client that sends Status after its Put must see the
    /// put's index applied, as etcd shows it.
    applied: AtomicU64,
}

impl ProposalWaiters {
    /// The table of member `me`.
    pub fn new(me: u64) -> Self {
        Self {
            me,
            next: AtomicU64::new(rand::random::<u64>() | 1),
            waiting: Mutex::default(),
            applied: AtomicU64::new(0),
        }
    }

    /// The runs of `forwarded` this member forwarded.
    pub fn own_runs<'a>(&self, forwarded: &'a [Forwarded]) -> impl Iterator<Item = &'a Forwarded> {
        let me = self.me;
        forwarded.iter().filter(move |f| f.member == me)
    }

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
    /// registered it and the entry produced outcomes, answers its clients, leaving
    /// [`Applied::Nothing`] for raft to carry back; otherwise leaves it all to raft's answer.
    pub fn applied(&self, id: u64, index: u64, applied: &mut Applied) {
        if !matches!(applied, Applied::Writes(_)) {
            return;
        }
        let Some(waiters) = self.take(id) else {
            return;
        };
        crate::probe::mark(crate::probe::Stage::ProposalApplied, index);
        answer(
            waiters,
            Ok((index, std::mem::replace(applied, Applied::Nothing))),
        );
    }

    /// The state machine applied the entry at `index`, in which `run` holds writes this member
    /// forwarded: answers their clients with their outcomes, unless the entry did not produce
    /// them (it was installed by a snapshot), which leaves them to the leader's answer.
    pub fn applied_run(&self, run: &Forwarded, index: u64, applied: &Applied) {
        let Applied::Writes(results) = applied else {
            return;
        };
        let Some(outcomes) = results.get(run.writes()) else {
            return;
        };
        let Some(waiters) = self.take(run.id) else {
            return;
        };
        crate::probe::mark(crate::probe::Stage::ProposalApplied, index);
        answer(waiters, Ok((index, Applied::Writes(outcomes.to_vec()))));
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

    /// Member `me`'s table, with a proposal of `n` clients registered.
    fn registered(me: u64, n: usize) -> (ProposalWaiters, u64, Vec<oneshot::Receiver<Outcome>>) {
        let table = ProposalWaiters::new(me);
        let (tx, rx) = waiters(n);
        let id = table.register(tx);
        (table, id, rx)
    }

    /// Each client got its outcome at `index`, and the fallback answer finds none left.
    fn assert_answered(
        table: &ProposalWaiters,
        id: u64,
        rx: &mut [oneshot::Receiver<Outcome>],
        index: u64,
        revisions: &[i64],
    ) {
        for (r, &revision) in rx.iter_mut().zip(revisions) {
            assert_eq!(r.try_recv().unwrap(), Ok((index, outcome(revision))));
        }
        assert!(
            table.take(id).is_none(),
            "the fallback must not answer again"
        );
    }

    #[test]
    fn the_state_machine_answers_a_registered_proposal_and_raft_finds_it_answered() {
        let (table, id, mut rx) = registered(1, 2);
        assert_ne!(id, 0);
        let mut applied = Applied::Writes(vec![outcome(7), outcome(8)]);
        table.applied(id, 42, &mut applied);
        assert_eq!(
            applied,
            Applied::Nothing,
            "the outcomes went to the clients"
        );
        assert_answered(&table, id, &mut rx, 42, &[7, 8]);
    }

    #[test]
    fn an_entry_not_proposed_here_is_left_for_raft() {
        let (table, id, mut rx) = registered(1, 1);
        let mut applied = Applied::Writes(vec![outcome(3)]);
        table.applied(id.wrapping_add(1000), 9, &mut applied);
        table.applied(0, 9, &mut applied);
        assert_eq!(applied, Applied::Writes(vec![outcome(3)]));
        // Installed by a snapshot: no outcomes here.
        table.applied(id, 9, &mut Applied::Nothing);
        assert!(rx[0].try_recv().is_err(), "not answered yet");
        let w = table.take(id).expect("still registered");
        answer(w, Err(Error::LeaderChanged));
        assert_eq!(rx[0].try_recv().unwrap(), Err(Error::LeaderChanged));
    }

    #[test]
    fn an_entry_that_does_not_fit_its_clients_fails_them() {
        let (table, id, mut rx) = registered(1, 2);
        let mut applied = Applied::Writes(vec![outcome(3)]);
        table.applied(id, 9, &mut applied);
        for r in &mut rx {
            assert!(matches!(r.try_recv().unwrap(), Err(Error::Internal(_))));
        }
    }

    #[test]
    fn a_follower_answers_its_forwarded_run_from_its_own_apply() {
        let (table, id, mut rx) = registered(7, 2);
        let runs = [
            Forwarded {
                member: 9,
                id,
                first: 0,
                count: 1,
            },
            Forwarded {
                member: 7,
                id,
                first: 1,
                count: 2,
            },
        ];
        let mine: Vec<_> = table.own_runs(&runs).collect();
        assert_eq!(mine, vec![&runs[1]], "only this member's run");
        let applied = Applied::Writes(vec![outcome(4), outcome(5), outcome(6)]);
        table.applied_run(mine[0], 30, &applied);
        assert_answered(&table, id, &mut rx, 30, &[5, 6]);
    }

    #[test]
    fn a_run_the_entry_did_not_produce_is_left_for_the_leaders_answer() {
        let (table, id, mut rx) = registered(7, 1);
        let run = Forwarded {
            member: 7,
            id,
            first: 2,
            count: 1,
        };
        table.applied_run(&run, 30, &Applied::Nothing);
        table.applied_run(&run, 30, &Applied::Writes(vec![outcome(1)]));
        assert!(rx[0].try_recv().is_err(), "not answered");
        assert!(table.take(id).is_some(), "still registered");
    }

    #[test]
    fn the_applied_index_only_moves_forward() {
        let table = ProposalWaiters::new(1);
        assert_eq!(table.applied_index(), 0);
        table.applied_through(12);
        table.applied_through(9);
        assert_eq!(table.applied_index(), 12);
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let table = ProposalWaiters {
            next: AtomicU64::new(u64::MAX),
            ..ProposalWaiters::new(1)
        };
        let a = table.register(Vec::new());
        let b = table.register(Vec::new());
        assert_eq!(a, u64::MAX);
        assert_eq!(b, 1, "0 is skipped");
    }
}
