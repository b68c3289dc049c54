//! The lessor: in-memory lease state (attached keys and, on the primary, expiry deadlines).
//!
//! Grants, revokes and checkpoints are replicated writes applied by [`crate::KvStore`]; renewals
//! and expiry are local to the primary (the raft leader), as in etcd. Only the primary tracks
//! deadlines: a follower holds every lease "forever" until it becomes primary, when each deadline
//! restarts from the lease's last checkpointed remaining TTL (or its full TTL). Time is passed in
//! as milliseconds of a monotonic clock owned by the caller.

use std::collections::{BTreeMap, BTreeSet};

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Remaining TTL recorded by the last checkpoint, 0 when none.
    pub remaining_ttl: i64,
    /// Keys attached to the lease.
    pub keys: BTreeSet<Vec<u8>>,
    /// Expiry deadline in ms (primary only).
    deadline_ms: Option<u64>,
    /// When a revoke for this expired lease was last handed out, to avoid proposing it twice.
    revoke_requested_ms: Option<u64>,
}

/// Persisted lease record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LeaseRecord {
    pub(crate) ttl: i64,
    pub(crate) remaining_ttl: i64,
}

/// How long an expired lease waits before its revoke is handed out again (etcd retries expired
/// but unrevoked leases after the request timeout).
const REVOKE_RETRY_MS: u64 = 3_000;

/// In-memory lease table.
#[derive(Debug, Default)]
pub struct Lessor {
    leases: BTreeMap<i64, Lease>,
    /// Whether this member tracks deadlines (is the raft leader).
    primary: bool,
}

impl Lessor {
    pub(crate) fn insert(&mut self, id: i64, record: LeaseRecord, now_ms: u64) {
        let deadline_ms = self.primary.then(|| deadline(now_ms, record.ttl, 0));
        let lease = Lease {
            ttl: record.ttl,
            remaining_ttl: record.remaining_ttl,
            keys: BTreeSet::new(),
            deadline_ms,
            revoke_requested_ms: None,
        };
        self.leases.insert(id, lease);
    }

    pub(crate) fn remove(&mut self, id: i64) -> Option<Lease> {
        self.leases.remove(&id)
    }

    pub(crate) fn attach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.insert(key.to_vec());
        }
    }

    pub(crate) fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.remove(key);
        }
    }

    pub(crate) fn set_remaining(&mut self, id: i64, remaining_ttl: i64) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.remaining_ttl = remaining_ttl;
        }
    }

    /// Whether lease `id` exists.
    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// The lease, if it exists.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Number of leases.
    pub fn count(&self) -> usize {
        self.leases.len()
    }

    /// All lease IDs, ascending.
    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    /// Becomes primary: every deadline restarts at `now + extend + remaining` (etcd's promote).
    pub fn promote(&mut self, now_ms: u64, extend_ms: u64) {
        self.primary = true;
        for l in self.leases.values_mut() {
            let ttl = if l.remaining_ttl > 0 {
                l.remaining_ttl
            } else {
                l.ttl
            };
            l.deadline_ms = Some(deadline(now_ms, ttl, extend_ms));
            l.revoke_requested_ms = None;
        }
    }

    /// Stops tracking deadlines (no longer the leader).
    pub fn demote(&mut self) {
        self.primary = false;
        for l in self.leases.values_mut() {
            l.deadline_ms = None;
        }
    }

    /// Whether this lessor is primary.
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// Renews lease `id`; returns its TTL, or `None` when unknown or already expired.
    pub fn renew(&mut self, id: i64, now_ms: u64) -> Option<i64> {
        let l = self.leases.get_mut(&id)?;
        if l.deadline_ms.is_some_and(|d| d <= now_ms) {
            return None;
        }
        l.deadline_ms = self.primary.then(|| deadline(now_ms, l.ttl, 0));
        l.remaining_ttl = 0;
        Some(l.ttl)
    }

    /// Remaining whole seconds of lease `id` (its TTL when not primary).
    pub fn remaining_seconds(&self, id: i64, now_ms: u64) -> Option<i64> {
        let l = self.leases.get(&id)?;
        Some(match l.deadline_ms {
            Some(d) => (d.saturating_sub(now_ms) / 1000) as i64,
            None if l.remaining_ttl > 0 => l.remaining_ttl,
            None => l.ttl,
        })
    }

    /// Up to `max` expired leases whose revoke should be proposed now (primary only).
    pub fn expired(&mut self, now_ms: u64, max: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for (id, l) in &mut self.leases {
            if out.len() >= max {
                break;
            }
            let expired = l.deadline_ms.is_some_and(|d| d <= now_ms);
            let retry_due = l
                .revoke_requested_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= REVOKE_RETRY_MS);
            if expired && retry_due {
                l.revoke_requested_ms = Some(now_ms);
                out.push(*id);
            }
        }
        out
    }

    /// Leases whose remaining TTL has drifted from the last recorded one (checkpoint, grant or
    /// renewal) by half the recorded TTL, at least `CHECKPOINT_DRIFT_MIN_S` and at most
    /// `drift_cap_ms`: `(id, remaining seconds)` for the primary to replicate as checkpoints.
    /// A new primary so extends an unrenewed lease by at most half its TTL (etcd without
    /// checkpoints: the whole TTL), and leases kept alive (clients renew every third of the
    /// TTL) are never checkpointed.
    pub fn checkpoints_due(&self, now_ms: u64, drift_cap_ms: u64, max: usize) -> Vec<(i64, i64)> {
        let cap_s = (drift_cap_ms / 1000) as i64;
        self.leases
            .iter()
            .filter_map(|(id, l)| {
                let d = l.deadline_ms?;
                let remaining = (d.saturating_sub(now_ms) / 1000) as i64;
                let recorded = if l.remaining_ttl > 0 {
                    l.remaining_ttl
                } else {
                    l.ttl
                };
                let drift_s = (recorded / 2).clamp(CHECKPOINT_DRIFT_MIN_S, cap_s.max(1));
                (remaining > 0 && recorded - remaining >= drift_s).then_some((*id, remaining))
            })
            .take(max)
            .collect()
    }
}

/// Smallest TTL drift worth a checkpoint (short leases would otherwise checkpoint every second).
const CHECKPOINT_DRIFT_MIN_S: i64 = 2;

fn deadline(now_ms: u64, ttl_s: i64, extend_ms: u64) -> u64 {
    now_ms
        .saturating_add(extend_ms)
        .saturating_add((ttl_s.max(0) as u64).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttl: i64) -> LeaseRecord {
        LeaseRecord {
            ttl,
            remaining_ttl: 0,
        }
    }

    #[test]
    fn only_the_primary_expires_leases() {
        let mut l = Lessor::default();
        l.insert(1, rec(5), 0);
        assert!(
            l.expired(1_000_000, 10).is_empty(),
            "a follower never expires"
        );
        l.promote(1_000, 0);
        assert!(l.expired(5_999, 10).is_empty());
        assert_eq!(l.expired(6_000, 10), vec![1]);
        assert!(
            l.expired(6_001, 10).is_empty(),
            "not handed out twice within the retry time"
        );
        assert_eq!(l.expired(6_000 + REVOKE_RETRY_MS, 10), vec![1]);
    }

    #[test]
    fn renew_pushes_the_deadline_and_refuses_expired_leases() {
        let mut l = Lessor::default();
        l.promote(0, 0);
        l.insert(7, rec(10), 0);
        assert_eq!(l.renew(7, 9_000), Some(10));
        assert_eq!(l.remaining_seconds(7, 9_000), Some(10));
        assert_eq!(l.renew(7, 19_000), None, "expired at 19 s");
        assert_eq!(l.renew(8, 0), None);
    }

    #[test]
    fn promotion_resumes_from_the_checkpointed_remaining_ttl() {
        let mut l = Lessor::default();
        l.insert(
            3,
            LeaseRecord {
                ttl: 60,
                remaining_ttl: 20,
            },
            0,
        );
        l.promote(100_000, 1_000);
        assert_eq!(l.remaining_seconds(3, 100_000), Some(21));
        assert!(l.expired(120_999, 1).is_empty());
        assert_eq!(l.expired(121_000, 1), vec![3]);
    }
}
