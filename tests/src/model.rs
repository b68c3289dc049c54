//! The etcd KV model the linearizability checker runs requests against: a global revision and,
//! per key, its value, create/mod revision and version. Every write that changes something bumps
//! the revision by one, as in etcd, and every response that reports a revision must match.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{Input, Key, Output};

/// One key's state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Unique value id.
    pub value: u64,
    /// Create revision.
    pub create_revision: i64,
    /// Mod revision.
    pub mod_revision: i64,
    /// Version.
    pub version: i64,
    /// Attached lease, 0 for none.
    pub lease: i64,
}

/// Model state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvState {
    /// Store revision (1 on an empty store).
    pub revision: i64,
    /// Live keys.
    pub keys: BTreeMap<Key, Entry>,
    /// Live leases.
    pub leases: BTreeSet<i64>,
}

impl Default for KvState {
    fn default() -> Self {
        Self {
            revision: 1,
            keys: BTreeMap::new(),
            leases: BTreeSet::new(),
        }
    }
}

impl KvState {
    fn put(&mut self, key: Key, value: u64, lease: i64) {
        self.revision += 1;
        let rev = self.revision;
        let e = self.keys.entry(key).or_insert(Entry {
            value,
            create_revision: rev,
            mod_revision: rev,
            version: 0,
            lease,
        });
        e.value = value;
        e.mod_revision = rev;
        e.version += 1;
        e.lease = lease;
    }

    /// Applies `input`; returns the new state when `output` is what this state would answer.
    /// An `Unknown` output accepts whatever the request does.
    pub fn step(&self, input: &Input, output: &Output) -> Option<KvState> {
        let mut next = self.clone();
        let expected = match input {
            // Checked apart (`robustness::serializable_violations`); never in a linearization.
            Input::SerializableGet(_) => return None,
            Input::Get(k) => {
                let e = self.keys.get(k);
                Output::Get {
                    value: e.map(|e| e.value),
                    mod_revision: e.map_or(0, |e| e.mod_revision),
                    revision: self.revision,
                }
            }
            Input::CountAll => Output::CountAll {
                count: self.keys.len() as i64,
                revision: self.revision,
            },
            Input::Put(k, v) => {
                next.put(*k, *v, 0);
                Output::Put {
                    revision: next.revision,
                }
            }
            Input::PutWithLease(k, v, lease) => {
                if self.leases.contains(lease) {
                    next.put(*k, *v, *lease);
                    Output::Put {
                        revision: next.revision,
                    }
                } else {
                    Output::LeaseNotFound
                }
            }
            Input::LeaseGrant(id, _) => {
                // IDs are unique per run, so a grant never collides.
                next.leases.insert(*id);
                Output::Lease {
                    revision: self.revision,
                }
            }
            Input::LeaseKeepAlive(id) => Output::KeepAlive {
                alive: self.leases.contains(id),
            },
            // An expiry is a revoke the server makes on its own.
            Input::LeaseRevoke(id) | Input::LeaseExpire(id) => {
                if next.leases.remove(id) {
                    let before = next.keys.len();
                    next.keys.retain(|_, e| e.lease != *id);
                    if next.keys.len() != before {
                        next.revision += 1;
                    }
                    Output::Lease {
                        revision: next.revision,
                    }
                } else {
                    Output::LeaseNotFound
                }
            }
            Input::Delete(k) => {
                let deleted = i64::from(next.keys.remove(k).is_some());
                if deleted > 0 {
                    next.revision += 1;
                }
                Output::Delete {
                    deleted,
                    revision: next.revision,
                }
            }
            Input::CompareAndPut {
                key,
                expected_mod,
                value,
            } => {
                let current = self.keys.get(key).map_or(0, |e| e.mod_revision);
                let succeeded = current == *expected_mod;
                if succeeded {
                    next.put(*key, *value, 0);
                }
                Output::CompareAndPut {
                    succeeded,
                    revision: next.revision,
                }
            }
        };
        (matches!(output, Output::Unknown) || *output == expected).then_some(next)
    }
}
