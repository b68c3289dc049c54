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

impl Output {
    /// The revision the answer carries (keepalives, "lease not found" and unknown outcomes
    /// carry none).
    pub fn revision(&self) -> Option<i64> {
        match *self {
            Output::Get { revision, .. }
            | Output::Put { revision }
            | Output::Delete { revision, .. }
            | Output::CompareAndPut { revision, .. }
            | Output::CountAll { revision, .. }
            | Output::Lease { revision } => Some(revision),
            Output::LeaseNotFound | Output::KeepAlive { .. } | Output::Unknown => None,
        }
    }
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

/// One op per line, as `KEYHOLD_TEST_DUMP_DIR` writes a history and `robustness --recheck`
/// reads it back: `client call ret|- INPUT args = OUTPUT args` (times in ns; `-` for none).
impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ", self.client, self.call)?;
        match self.ret {
            Some(r) => write!(f, "{r} ")?,
            None => write!(f, "- ")?,
        }
        match &self.input {
            Input::Get(k) => write!(f, "Get {k}"),
            Input::SerializableGet(k) => write!(f, "SerializableGet {k}"),
            Input::Put(k, v) => write!(f, "Put {k} {v}"),
            Input::Delete(k) => write!(f, "Delete {k}"),
            Input::CompareAndPut {
                key,
                expected_mod,
                value,
            } => write!(f, "CompareAndPut {key} {expected_mod} {value}"),
            Input::CountAll => write!(f, "CountAll"),
            Input::LeaseGrant(id, ttl) => write!(f, "LeaseGrant {id} {ttl}"),
            Input::PutWithLease(k, v, lease) => write!(f, "PutWithLease {k} {v} {lease}"),
            Input::LeaseRevoke(id) => write!(f, "LeaseRevoke {id}"),
            Input::LeaseKeepAlive(id) => write!(f, "LeaseKeepAlive {id}"),
            Input::LeaseExpire(id) => write!(f, "LeaseExpire {id}"),
        }?;
        write!(f, " = ")?;
        match &self.output {
            Output::Get {
                value,
                mod_revision,
                revision,
            } => match value {
                Some(v) => write!(f, "Get {v} {mod_revision} {revision}"),
                None => write!(f, "Get - {mod_revision} {revision}"),
            },
            Output::Put { revision } => write!(f, "Put {revision}"),
            Output::Delete { deleted, revision } => write!(f, "Delete {deleted} {revision}"),
            Output::CompareAndPut {
                succeeded,
                revision,
            } => write!(f, "CompareAndPut {} {revision}", u8::from(*succeeded)),
            Output::CountAll { count, revision } => write!(f, "CountAll {count} {revision}"),
            Output::Lease { revision } => write!(f, "Lease {revision}"),
            Output::LeaseNotFound => write!(f, "LeaseNotFound"),
            Output::KeepAlive { alive } => write!(f, "KeepAlive {}", u8::from(*alive)),
            Output::Unknown => write!(f, "Unknown"),
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;

    /// Parses what [`Op`]'s `Display` writes.
    fn from_str(line: &str) -> Result<Self, String> {
        let bad = || format!("not an op: {line:?}");
        let (head, out) = line.split_once(" = ").ok_or_else(bad)?;
        let mut h = head.split_whitespace();
        let mut o = out.split_whitespace();
        fn num<T: std::str::FromStr>(
            it: &mut std::str::SplitWhitespace<'_>,
            bad: &dyn Fn() -> String,
        ) -> Result<T, String> {
            it.next().and_then(|t| t.parse().ok()).ok_or_else(bad)
        }
        fn maybe<T: std::str::FromStr>(
            it: &mut std::str::SplitWhitespace<'_>,
            bad: &dyn Fn() -> String,
        ) -> Result<Option<T>, String> {
            match it.next() {
                Some("-") => Ok(None),
                Some(t) => t.parse().map(Some).map_err(|_| bad()),
                None => Err(bad()),
            }
        }
        let client = num(&mut h, &bad)?;
        let call = num(&mut h, &bad)?;
        let ret = maybe(&mut h, &bad)?;
        let input = match h.next().ok_or_else(bad)? {
            "Get" => Input::Get(num(&mut h, &bad)?),
            "SerializableGet" => Input::SerializableGet(num(&mut h, &bad)?),
            "Put" => Input::Put(num(&mut h, &bad)?, num(&mut h, &bad)?),
            "Delete" => Input::Delete(num(&mut h, &bad)?),
            "CompareAndPut" => Input::CompareAndPut {
                key: num(&mut h, &bad)?,
                expected_mod: num(&mut h, &bad)?,
                value: num(&mut h, &bad)?,
            },
            "CountAll" => Input::CountAll,
            "LeaseGrant" => Input::LeaseGrant(num(&mut h, &bad)?, num(&mut h, &bad)?),
            "PutWithLease" => {
                Input::PutWithLease(num(&mut h, &bad)?, num(&mut h, &bad)?, num(&mut h, &bad)?)
            }
            "LeaseRevoke" => Input::LeaseRevoke(num(&mut h, &bad)?),
            "LeaseKeepAlive" => Input::LeaseKeepAlive(num(&mut h, &bad)?),
            "LeaseExpire" => Input::LeaseExpire(num(&mut h, &bad)?),
            _ => return Err(bad()),
        };
        let output = match o.next().ok_or_else(bad)? {
            "Get" => Output::Get {
                value: maybe(&mut o, &bad)?,
                mod_revision: num(&mut o, &bad)?,
                revision: num(&mut o, &bad)?,
            },
            "Put" => Output::Put {
                revision: num(&mut o, &bad)?,
            },
            "Delete" => Output::Delete {
                deleted: num(&mut o, &bad)?,
                revision: num(&mut o, &bad)?,
            },
            "CompareAndPut" => Output::CompareAndPut {
                succeeded: num::<u8>(&mut o, &bad)? == 1,
                revision: num(&mut o, &bad)?,
            },
            "CountAll" => Output::CountAll {
                count: num(&mut o, &bad)?,
                revision: num(&mut o, &bad)?,
            },
            "Lease" => Output::Lease {
                revision: num(&mut o, &bad)?,
            },
            "LeaseNotFound" => Output::LeaseNotFound,
            "KeepAlive" => Output::KeepAlive {
                alive: num::<u8>(&mut o, &bad)? == 1,
            },
            "Unknown" => Output::Unknown,
            _ => return Err(bad()),
        };
        if h.next().is_some() || o.next().is_some() {
            return Err(bad());
        }
        Ok(Op {
            client,
            call,
            ret,
            input,
            output,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_read_back_what_they_write() {
        let ops = [
            Op {
                client: 3,
                call: 10,
                ret: Some(20),
                input: Input::CompareAndPut {
                    key: 4,
                    expected_mod: 7,
                    value: 99,
                },
                output: Output::CompareAndPut {
                    succeeded: true,
                    revision: 8,
                },
            },
            Op {
                client: 0,
                call: 5,
                ret: None,
                input: Input::PutWithLease(1, 2, 3),
                output: Output::Unknown,
            },
            Op {
                client: 1,
                call: 6,
                ret: Some(9),
                input: Input::Get(2),
                output: Output::Get {
                    value: None,
                    mod_revision: 0,
                    revision: 4,
                },
            },
            Op {
                client: 2,
                call: 7,
                ret: Some(8),
                input: Input::LeaseKeepAlive(-5),
                output: Output::KeepAlive { alive: false },
            },
        ];
        for op in ops {
            let line = op.to_string();
            let back: Op = line.parse().expect("parses");
            assert_eq!(
                (back.client, back.call, back.ret, &back.input, &back.output),
                (op.client, op.call, op.ret, &op.input, &op.output),
                "{line}"
            );
        }
        assert!("1 2 - Put 1 = Put 2 3".parse::<Op>().is_err());
    }
}
