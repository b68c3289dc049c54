//! A Wing–Gong–Lowe linearizability checker with memoization (the algorithm of Lowe's
//! "Testing for linearizability", as used by porcupine), over the etcd KV model in
//! [`crate::model`].
//!
//! Calls and returns are events on one timeline (calls before returns at equal times, so
//! touching operations count as concurrent). The search linearizes any pending call whose model
//! step accepts its output, and backtracks when it reaches the return of a call it has not
//! linearized. `(linearized set, state)` pairs already explored are cached. Unknown-outcome
//! writes return "at infinity": they may take effect anywhere after their call, or never.
//!
//! Before the search, [`check`] tries the order the answers themselves give: etcd stamps every
//! answer with a revision, so sorting by it (the write that made a revision first, then what
//! was seen at it, by call time) is one candidate linearization, checked against the model and
//! against real time in O(n log n). It confirms a correct history at once however many
//! writes' outcomes are unknown; those are what make the search exponential (each unknown
//! write that may or may not have happened doubles the states it explores). The search runs
//! only when the candidate fails, so a violation is still found, and reported, by the search.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::history::{Input, Op, Output};
use crate::model::KvState;

/// Verdict of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// None exists; the longest linearized prefix found (op indexes, in order).
    Violation {
        /// Ops linearized before the search got stuck.
        longest: Vec<usize>,
    },
    /// The search ran out of time; not a pass.
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Linearizable => "linearizable",
            Verdict::Violation { .. } => "VIOLATION",
            Verdict::Inconclusive => "inconclusive (search budget spent)",
        })
    }
}

const NIL: usize = usize::MAX;

struct Node {
    op: usize,
    is_call: bool,
    /// For a call node: index of its return node.
    ret: usize,
    prev: usize,
    next: usize,
}

struct List {
    nodes: Vec<Node>,
}

impl List {
    const HEAD: usize = 0;

    fn new(ops: &[Op]) -> Self {
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, 0, i));
            events.push((op.ret.unwrap_or(u64::MAX), 1, i));
        }
        events.sort();
        let mut nodes = vec![Node {
            op: NIL,
            is_call: false,
            ret: NIL,
            prev: NIL,
            next: NIL,
        }];
        let mut call_node = vec![NIL; ops.len()];
        for (_, kind, op) in events {
            let idx = nodes.len();
            let prev = idx - 1;
            nodes[prev].next = idx;
            nodes.push(Node {
                op,
                is_call: kind == 0,
                ret: NIL,
                prev,
                next: NIL,
            });
            if kind == 0 {
                call_node[op] = idx;
            } else {
                nodes[call_node[op]].ret = idx;
            }
        }
        Self { nodes }
    }

    fn unlink(&mut self, i: usize) {
        let (p, n) = (self.nodes[i].prev, self.nodes[i].next);
        self.nodes[p].next = n;
        if n != NIL {
            self.nodes[n].prev = p;
        }
    }

    fn relink(&mut self, i: usize) {
        let (p, n) = (self.nodes[i].prev, self.nodes[i].next);
        self.nodes[p].next = i;
        if n != NIL {
            self.nodes[n].prev = i;
        }
    }

    /// Removes a call and its return.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].ret);
    }

    /// Undoes [`List::lift`] (in reverse order).
    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].ret);
        self.relink(call);
    }
}

/// Zobrist key of op `i`: the set of linearized ops is fingerprinted as the XOR of its members'
/// keys, so a search step costs O(1) instead of copying and hashing a bitset of every op (the
/// memo is keyed by 128-bit fingerprints of (linearized set, model state); a collision, at odds
/// of about 2^-64 per pair, could only hide a linearization, never invent one).
fn op_key(i: usize) -> u64 {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn state_hash(state: &KvState) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

/// Checks `ops` against the KV model from an empty store, giving up after `budget`.
pub fn check(ops: &[Op], budget: Duration) -> Verdict {
    if revision_order_holds(ops, UnknownGrants::NeverHappened)
        || revision_order_holds(ops, UnknownGrants::HappenedAtCall)
    {
        return Verdict::Linearizable;
    }
    search(ops, budget)
}

/// For a time, the highest revision any answer returned strictly before it carried (0 when
/// none had): a write called at that time can only have made a later revision, and an op whose
/// answer carries no revision ran at this one or later.
pub fn revisions_seen_before(ops: &[Op]) -> impl Fn(u64) -> i64 + use<> {
    let mut returned: Vec<(u64, i64)> = ops
        .iter()
        .filter_map(|o| Some((o.ret?, o.output.revision()?)))
        .collect();
    returned.sort_unstable();
    let mut highest = 0;
    for r in &mut returned {
        highest = highest.max(r.1);
        r.1 = highest;
    }
    move |at| {
        let n = returned.partition_point(|(ret, _)| *ret < at);
        n.checked_sub(1).map_or(0, |i| returned[i].1)
    }
}

/// Where the candidate order puts a lease grant whose outcome is unknown (it carries no
/// revision, and a later op may depend on it having happened or not).
#[derive(Clone, Copy)]
enum UnknownGrants {
    /// Left out, like every other unknown-outcome op the persisted history did not resolve.
    NeverHappened,
    /// Taken to have happened as soon as it was called.
    HappenedAtCall,
}

/// Whether the order the answers' revisions give is a linearization of `ops`: every op with
/// a known outcome placed by its revision (ops whose answer carries none, at the highest
/// revision answered before their call), within a revision the write that made it first and
/// the rest by call time; unknown-outcome ops left out (they may never have happened), except
/// grants with [`UnknownGrants::HappenedAtCall`]. The order must be accepted by the model op by
/// op and keep real time: no op placed after one that was called after it returned. `true`
/// proves the history linearizable; `false` proves nothing.
fn revision_order_holds(ops: &[Op], unknown_grants: UnknownGrants) -> bool {
    // An empty store is at revision 1.
    let seen_before = {
        let seen = revisions_seen_before(ops);
        move |at| seen(at).max(1)
    };
    let mut placed: Vec<(i64, u64, usize)> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let revision = match (op.output.revision(), &op.output, &op.input) {
            (Some(revision), _, _) => revision,
            (None, Output::Unknown, Input::LeaseGrant(..))
                if matches!(unknown_grants, UnknownGrants::HappenedAtCall) =>
            {
                seen_before(op.call)
            }
            (None, Output::Unknown, _) => continue,
            (None, _, _) => seen_before(op.call),
        };
        placed.push((revision, op.call, i));
    }
    placed.sort_unstable();

    let mut state = KvState::default();
    let mut order = Vec::with_capacity(placed.len());
    let mut rest = &placed[..];
    while let Some(&(revision, _, _)) = rest.first() {
        let n = rest.iter().take_while(|p| p.0 == revision).count();
        let mut group: Vec<usize> = rest[..n].iter().map(|p| p.2).collect();
        rest = &rest[n..];
        if state.revision < revision {
            // Exactly one op of the group made this revision; it goes first.
            let made = group.iter().enumerate().find_map(|(k, &i)| {
                let next = state.step(&ops[i].input, &ops[i].output)?;
                (next.revision == revision).then_some((k, next))
            });
            let Some((k, next)) = made else {
                return false;
            };
            order.push(group.remove(k));
            state = next;
        }
        for i in group {
            match state.step(&ops[i].input, &ops[i].output) {
                Some(next) if next.revision == revision => state = next,
                _ => return false,
            }
            order.push(i);
        }
    }
    // Real time: walking back, nothing placed later may have returned before this op's call.
    let mut earliest_return_after = u64::MAX;
    for &i in order.iter().rev() {
        if earliest_return_after < ops[i].call {
            return false;
        }
        earliest_return_after = earliest_return_after.min(ops[i].ret.unwrap_or(u64::MAX));
    }
    true
}

/// The search alone: Wing–Gong–Lowe with memoization, giving up after `budget` ([`check`]
/// runs it when the revision order fails; `robustness --recheck` times both).
pub fn search(ops: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let mut list = List::new(ops);
    let mut state = KvState::default();
    let mut linearized = 0u64;
    let mut cache: HashSet<(u64, u64)> = HashSet::new();
    let mut calls: Vec<(usize, KvState)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps = 0u64;
    let mut entry = list.nodes[List::HEAD].next;
    while list.nodes[List::HEAD].next != NIL {
        steps += 1;
        if steps.is_multiple_of(4096) && Instant::now() > deadline {
            return Verdict::Inconclusive;
        }
        let node = &list.nodes[entry];
        if node.is_call {
            let op = &ops[node.op];
            if let Some(next) = state.step(&op.input, &op.output) {
                let bits = linearized ^ op_key(node.op);
                if cache.insert((bits, state_hash(&next))) {
                    calls.push((entry, std::mem::replace(&mut state, next)));
                    linearized = bits;
                    list.lift(entry);
                    entry = list.nodes[List::HEAD].next;
                    continue;
                }
            }
            entry = list.nodes[entry].next;
        } else {
            // Reached a return whose call is not linearized: backtrack. The deepest partial
            // linearization is kept for the report (copied only when a backtrack leaves a new
            // maximum, not on every step: that made long histories quadratic).
            if calls.len() > longest.len() {
                longest = calls.iter().map(|(e, _)| list.nodes[*e].op).collect();
            }
            let Some((call, previous)) = calls.pop() else {
                return Verdict::Violation { longest };
            };
            linearized ^= op_key(list.nodes[call].op);
            state = previous;
            list.unlift(call);
            entry = list.nodes[call].next;
        }
    }
    Verdict::Linearizable
}

/// The shortest prefix of `ops` (by invocation time) that is already not linearizable, so a
/// failure report shows the few operations around the violation.
pub fn smallest_failing_prefix(ops: &[Op], budget: Duration) -> Vec<Op> {
    let mut sorted = ops.to_vec();
    sorted.sort_by_key(|o| o.call);
    let failing = |n: usize| {
        // Ops still running at the cut are treated as unknown outcome writes or dropped reads.
        let cut = sorted[..n].last().map_or(0, |o| o.call);
        let prefix: Vec<Op> = sorted[..n]
            .iter()
            .filter(|o| o.ret.is_some_and(|r| r <= cut) || o.is_write())
            .map(|o| {
                let mut o = o.clone();
                if o.ret.is_none_or(|r| r > cut) {
                    o.ret = None;
                    o.output = Output::Unknown;
                }
                o
            })
            .collect();
        matches!(check(&prefix, budget), Verdict::Violation { .. }).then_some(prefix)
    };
    let (mut lo, mut hi) = (1, sorted.len());
    let mut best = failing(hi).unwrap_or(sorted.clone());
    while lo < hi {
        let mid = (lo + hi) / 2;
        match failing(mid) {
            Some(p) => {
                best = p;
                hi = mid;
            }
            None => lo = mid + 1,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, call: u64, ret: Option<u64>, input: Input, output: Output) -> Op {
        Op {
            client,
            call,
            ret,
            input,
            output,
        }
    }

    /// A linearizable get of `key` that answered `value` (mod revision, header revision).
    fn get(
        client: usize,
        call: u64,
        ret: Option<u64>,
        key: u8,
        value: Option<u64>,
        mod_revision: i64,
        revision: i64,
    ) -> Op {
        op(
            client,
            call,
            ret,
            Input::Get(key),
            Output::Get {
                value,
                mod_revision,
                revision,
            },
        )
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            get(0, 2, Some(3), 1, Some(10), 2, 2),
            op(
                0,
                4,
                Some(5),
                Input::Delete(1),
                Output::Delete {
                    deleted: 1,
                    revision: 3,
                },
            ),
            op(
                0,
                6,
                Some(7),
                Input::CountAll,
                Output::CountAll {
                    count: 0,
                    revision: 3,
                },
            ),
        ];
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
    }

    /// Two acknowledged puts of one key, then a read called after both that returns the
    /// first: consistent with the model at revision 2, stale in real time.
    fn stale_read_history() -> Vec<Op> {
        vec![
            op(
                0,
                0,
                Some(1),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            op(
                0,
                2,
                Some(3),
                Input::Put(1, 11),
                Output::Put { revision: 3 },
            ),
            get(1, 4, Some(5), 1, Some(10), 2, 2),
        ]
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_a_violation() {
        let ops = stale_read_history();
        assert!(matches!(
            check(&ops, Duration::from_secs(5)),
            Verdict::Violation { .. }
        ));
        assert_eq!(
            smallest_failing_prefix(&ops, Duration::from_secs(5)).len(),
            3
        );
    }

    #[test]
    fn concurrent_ops_may_take_either_order() {
        let ops = vec![
            op(
                0,
                0,
                Some(10),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            get(1, 1, Some(9), 1, None, 0, 1),
        ];
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        let lost = op(0, 0, None, Input::Put(1, 10), Output::Unknown);
        let seen = get(1, 5, Some(6), 1, Some(10), 2, 2);
        let unseen = get(1, 5, Some(6), 1, None, 0, 1);
        assert_eq!(
            check(&[lost.clone(), seen], Duration::from_secs(5)),
            Verdict::Linearizable
        );
        assert_eq!(
            check(&[lost.clone(), unseen], Duration::from_secs(5)),
            Verdict::Linearizable
        );
        // But it cannot take effect before it was invoked.
        let early = get(1, 0, Some(1), 1, Some(10), 2, 2);
        let late_lost = op(0, 5, None, Input::Put(1, 10), Output::Unknown);
        assert!(matches!(
            check(&[early, late_lost], Duration::from_secs(5)),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn revisions_must_match() {
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            op(
                0,
                2,
                Some(3),
                Input::Put(2, 20),
                Output::Put { revision: 4 },
            ),
        ];
        assert!(
            matches!(
                check(&ops, Duration::from_secs(5)),
                Verdict::Violation { .. }
            ),
            "a skipped revision"
        );
    }

    #[test]
    fn compare_and_put() {
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            op(
                0,
                2,
                Some(3),
                Input::CompareAndPut {
                    key: 1,
                    expected_mod: 2,
                    value: 11,
                },
                Output::CompareAndPut {
                    succeeded: true,
                    revision: 3,
                },
            ),
            op(
                0,
                4,
                Some(5),
                Input::CompareAndPut {
                    key: 1,
                    expected_mod: 2,
                    value: 12,
                },
                Output::CompareAndPut {
                    succeeded: false,
                    revision: 3,
                },
            ),
        ];
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
        let mut bad = ops.clone();
        bad[2].output = Output::CompareAndPut {
            succeeded: true,
            revision: 4,
        };
        assert!(matches!(
            check(&bad, Duration::from_secs(5)),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn leases_attach_and_revoke_deletes_their_keys() {
        let l = 1 << 40;
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                Input::LeaseGrant(l, 3600),
                Output::Lease { revision: 1 },
            ),
            op(
                0,
                2,
                Some(3),
                Input::PutWithLease(1, 10, l),
                Output::Put { revision: 2 },
            ),
            op(
                0,
                4,
                Some(5),
                Input::LeaseRevoke(l),
                Output::Lease { revision: 3 },
            ),
            get(0, 6, Some(7), 1, None, 0, 3),
            op(
                0,
                8,
                Some(9),
                Input::PutWithLease(1, 11, l),
                Output::LeaseNotFound,
            ),
            op(
                0,
                10,
                Some(11),
                Input::LeaseRevoke(l),
                Output::LeaseNotFound,
            ),
        ];
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
        let mut kept = ops.clone();
        kept[3].output = Output::Get {
            value: Some(10),
            mod_revision: 2,
            revision: 3,
        };
        assert!(
            matches!(
                check(&kept, Duration::from_secs(5)),
                Verdict::Violation { .. }
            ),
            "revoke must delete attached keys"
        );
    }

    /// An expiry is pinned to its revision by the harness (from the persisted tombstones) and
    /// may not take effect before its earliest time: a read that saw its keys gone, or a
    /// keepalive that found the lease dead, before that time is a violation.
    #[test]
    fn a_lease_expires_no_earlier_than_its_last_keepalive_allows() {
        let l = 1 << 40;
        let history = |expire_after: u64| {
            vec![
                op(
                    0,
                    0,
                    Some(1),
                    Input::LeaseGrant(l, 3600),
                    Output::Lease { revision: 1 },
                ),
                op(
                    0,
                    2,
                    Some(3),
                    Input::PutWithLease(1, 10, l),
                    Output::Put { revision: 2 },
                ),
                op(
                    0,
                    4,
                    Some(5),
                    Input::LeaseKeepAlive(l),
                    Output::KeepAlive { alive: true },
                ),
                op(
                    1,
                    expire_after,
                    None,
                    Input::LeaseExpire(l),
                    Output::Lease { revision: 3 },
                ),
                get(0, 20, Some(21), 1, None, 0, 3),
                op(
                    0,
                    22,
                    Some(23),
                    Input::LeaseKeepAlive(l),
                    Output::KeepAlive { alive: false },
                ),
            ]
        };
        assert_eq!(
            check(&history(10), Duration::from_secs(5)),
            Verdict::Linearizable
        );
        assert!(
            matches!(
                check(&history(30), Duration::from_secs(5)),
                Verdict::Violation { .. }
            ),
            "keys gone before the lease's earliest expiry"
        );
        let mut alive_after = history(10);
        alive_after[5].output = Output::KeepAlive { alive: true };
        assert!(
            matches!(
                check(&alive_after, Duration::from_secs(5)),
                Verdict::Violation { .. }
            ),
            "a keepalive answered alive after the expiry"
        );
    }

    /// Unknown-outcome writes that the persisted history could not resolve make the search
    /// explore every subset of them: here 40 grants nobody used and one delete that never
    /// happened. The revision order confirms the history at once.
    #[test]
    fn unknown_writes_that_explode_the_search_are_confirmed_by_revision_order() {
        let mut ops = vec![
            op(
                0,
                1,
                Some(2),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            op(1, 3, None, Input::Delete(1), Output::Unknown),
        ];
        for lease in 0..40 {
            ops.push(op(
                2 + lease as usize,
                4 + lease as u64,
                None,
                Input::LeaseGrant(100 + lease, 60),
                Output::Unknown,
            ));
        }
        ops.push(get(50, 100, Some(101), 1, Some(10), 2, 2));
        assert_eq!(
            search(&ops, Duration::from_millis(200)),
            Verdict::Inconclusive,
            "the search alone should not finish this history"
        );
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
    }

    #[test]
    fn revision_order_puts_the_write_that_made_a_revision_before_what_saw_it() {
        // The read was called first but saw the put: concurrent, so linearizable.
        let ops = vec![
            get(0, 0, Some(8), 1, Some(10), 2, 2),
            op(
                1,
                5,
                Some(10),
                Input::Put(1, 10),
                Output::Put { revision: 2 },
            ),
            // No revision in a keepalive's answer: placed by the revisions answered before it.
            op(
                2,
                11,
                Some(12),
                Input::LeaseKeepAlive(7),
                Output::KeepAlive { alive: false },
            ),
        ];
        assert!(revision_order_holds(&ops, UnknownGrants::NeverHappened));
    }

    #[test]
    fn revision_order_keeps_real_time() {
        // The candidate order must not accept a read that is stale in real time.
        let ops = stale_read_history();
        assert!(!revision_order_holds(&ops, UnknownGrants::NeverHappened));
        assert!(!revision_order_holds(&ops, UnknownGrants::HappenedAtCall));
    }

    #[test]
    fn revision_order_may_take_an_unknown_grant_as_done() {
        let ops = vec![
            op(0, 0, None, Input::LeaseGrant(7, 60), Output::Unknown),
            op(
                1,
                5,
                Some(6),
                Input::LeaseKeepAlive(7),
                Output::KeepAlive { alive: true },
            ),
        ];
        assert!(!revision_order_holds(&ops, UnknownGrants::NeverHappened));
        assert!(revision_order_holds(&ops, UnknownGrants::HappenedAtCall));
        assert_eq!(check(&ops, Duration::from_secs(5)), Verdict::Linearizable);
    }
}
