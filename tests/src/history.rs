//! Recorded client operations: what was asked, when it was invoked and returned (monotonic ns
//! since the run started, from one clock), and what came back. A write whose outcome is unknown
//! (timeout, connection lost) has `ret = None`: it may have happened at any point after its
//! invocation, or never.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Keys are small integers (`k0`..`kN`), values unique per write so effects are attributable.
pub type Key = u8;

/// A client request in the model's terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Linearizable get of one key.
    Get(Key),
    /// Serializable get of one key: not linearizable by design, so checked apart from the
    /// linearizability search (the answer must be the key's state at the answer's revision).
    SerializableGet(Key),
    /// Put of a unique value.
    Put(Key, u64),
    /// Delete of one key.
    Delete(Key),
    /// `If mod_revision(key) == expected Then Put(key, value)` (else nothing).
    CompareAndPut {
        key: Key,
        expected_mod: i64,
        value: u64,
    },
    /// Count of all keys (a linearizable range over the whole key space).
    CountAll,
    /// Grant a lease with this ID and TTL in seconds (long: it never expires during a run,
    /// except the short leases of the `lease-expiry` scenario).
    LeaseGrant(i64, i64),
    /// Put of a unique value attached to a lease.
    PutWithLease(Key, u64, i64),
    /// Revoke a lease, deleting its keys.
    LeaseRevoke(i64),
    /// One keepalive of a lease (a read of whether it is alive; the TTL it refreshes is not
    /// modelled, only the expiry's earliest time is).
    LeaseKeepAlive(i64),
    /// The server expired a lease: recorded by the harness, not a client, with the earliest
    /// time it may happen as its call and no return (it happens once, or is still pending).
    LeaseExpire(i64),
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// Get: value (or none), its mod revision (0 when absent), header revision.
    Get {
        value: Option<u64>,
        mod_revision: i64,
        revision: i64,
    },
    /// Put: header revision.
    Put { revision: i64 },
    /// Delete: number deleted, header revision.
    Delete { deleted: i64, revision: i64 },
    /// CompareAndPut: whether it succeeded, header revision.
    CompareAndPut { succeeded: bool, revision: i64 },
    /// CountAll: count and header revision.
    CountAll { count: i64, revision: i64 },
    /// LeaseGrant or LeaseRevoke succeeded; header revision.
    Lease { revision: i64 },
    /// The request named a lease that does not exist (a definite outcome: nothing changed).
    LeaseNotFound,
    /// A keepalive's answer: whether the lease was alive (TTL > 0).
    KeepAlive { alive: bool },
    /// The outcome is unknown (only for writes; failed reads are dropped).
    Unknown,
}

/// One operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Client that issued it (each client is sequential).
    pub client: usize,
    /// Invocation time, ns.
    pub call: u64,
    /// Return time, ns; `None` = unknown outcome (never returned as far as we know).
    pub ret: Option<u64>,
    /// Request.
    pub input: Input,
    /// Response.
    pub output: Output,
}

impl Input {
    /// Whether the request only reads (a failed read changed nothing and is not recorded).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Input::Get(_) | Input::SerializableGet(_) | Input::CountAll | Input::LeaseKeepAlive(_)
        )
    }
}

impl Op {
    /// Whether the request can change state.
    pub fn is_write(&self) -> bool {
        !self.input.is_read()
    }
}

/// Thread-safe recorder shared by client tasks.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            ops: Arc::default(),
        }
    }
}

impl Recorder {
    /// Nanoseconds since the recorder was created.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records a finished (or unknown) operation.
    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Every operation recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
