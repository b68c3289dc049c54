//! Watch-guarantee validators (the guarantees etcd documents and its robustness suite checks):
//! every event matches the watch's range (filter), revisions never go back (ordered), no
//! `(revision, key)` twice (unique), a revision's events never split across responses (atomic),
//! no event at or below an earlier progress notification's revision (bookmarkable), exactly the
//! committed events of the watched window with none missing (reliable, which includes resumable:
//! the first event is the first committed one at or after the start revision), and `prev_kv` /
//! create-ness equal to the ground truth.
//!
//! Ground truth is the full history read back from the stopped node's data dir
//! (`keyhold-node --debug-dump-history`), not a watch: the system under test does not grade
//! itself through the path being tested.

use std::collections::{BTreeMap, HashSet};

/// One committed change, from the ground truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthEvent {
    /// Main revision.
    pub revision: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Put (true) or delete.
    pub put: bool,
    /// Value (empty for deletes).
    pub value: Vec<u8>,
    /// Create revision (0 for deletes).
    pub create_revision: i64,
}

/// Ground truth: every change in revision order.
#[derive(Debug, Default, Clone)]
pub struct Truth {
    /// Changes in `(revision, sub)` order (below `compact_revision` only what compaction kept).
    pub events: Vec<TruthEvent>,
    /// Compact revision of the store (0 = never compacted).
    pub compact_revision: i64,
}

impl Truth {
    /// Parses `keyhold-node --debug-dump-history` output (JSON lines, hex keys and values).
    pub fn parse(dump: &str) -> Result<Self, String> {
        let mut events = Vec::new();
        let mut compact_revision = 0;
        for line in dump.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
            if let Some(c) = v["compact_revision"].as_i64() {
                compact_revision = c;
                continue;
            }
            let hex = |f: &str| -> Result<Vec<u8>, String> {
                let s = v[f].as_str().ok_or_else(|| format!("no {f} in {line}"))?;
                (0..s.len())
                    .step_by(2)
                    .map(|i| {
                        u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            };
            events.push(TruthEvent {
                revision: v["revision"].as_i64().ok_or("no revision")?,
                key: hex("key")?,
                put: v["put"].as_bool().ok_or("no put")?,
                value: hex("value")?,
                create_revision: v["create_revision"].as_i64().unwrap_or(0),
            });
        }
        Ok(Self {
            events,
            compact_revision,
        })
    }

    /// Value of `key` just before revision `rev` (None when absent).
    fn value_before(&self, key: &[u8], rev: i64) -> Option<Vec<u8>> {
        self.events
            .iter()
            .take_while(|e| e.revision < rev)
            .filter(|e| e.key == key)
            .last()
            .and_then(|e| e.put.then(|| e.value.clone()))
    }
}

/// One event as a client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenEvent {
    /// Mod revision.
    pub revision: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Put or delete.
    pub put: bool,
    /// Value.
    pub value: Vec<u8>,
    /// Create revision.
    pub create_revision: i64,
    /// prev_kv value, if the server sent one.
    pub prev_value: Option<Vec<u8>>,
}

/// One watch response as received.
#[derive(Debug, Clone, Default)]
pub struct SeenResponse {
    /// Header revision.
    pub header_revision: i64,
    /// `created` flag.
    pub created: bool,
    /// `canceled` flag.
    pub canceled: bool,
    /// Compact revision of a compaction cancel.
    pub compact_revision: i64,
    /// `fragment` flag.
    pub fragment: bool,
    /// Events.
    pub events: Vec<SeenEvent>,
}

/// Everything one watch received.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    /// Prefix watched.
    pub prefix: Vec<u8>,
    /// Requested start revision (0 = now).
    pub start_revision: i64,
    /// Whether prev_kv was asked for.
    pub prev_kv: bool,
    /// Responses in arrival order.
    pub responses: Vec<SeenResponse>,
}

/// Runs every validator; returns the violations found (empty = all guarantees held).
pub fn validate(truth: &Truth, log: &WatchLog) -> Vec<String> {
    let mut bad = Vec::new();
    if log.responses.is_empty() {
        // The stream broke before anything arrived (its member stopped): nothing observed.
        return bad;
    }
    let Some(created) = log.responses.iter().find(|r| r.created) else {
        return vec!["no created response".into()];
    };
    if log
        .responses
        .iter()
        .any(|r| r.canceled && r.compact_revision > 0)
    {
        return bad; // compacted before it caught up: nothing to deliver
    }
    let first_rev = if log.start_revision > 0 {
        log.start_revision
    } else {
        created.header_revision + 1
    };
    // History below the compact revision is partial in the ground truth: judge only above it.
    let judged_from = first_rev.max(truth.compact_revision + 1);
    let mut last_rev = 0i64;
    let mut last_progress = 0i64;
    let mut seen: HashSet<(i64, Vec<u8>)> = HashSet::new();
    let mut prev_last_event_rev: Option<i64> = None;
    let mut prev_fragment = false;
    let mut received: Vec<&SeenEvent> = Vec::new();
    let mut window_end = 0i64;
    for r in &log.responses {
        if r.created || r.canceled {
            continue;
        }
        if r.events.is_empty() {
            if r.header_revision < last_progress {
                bad.push(format!(
                    "progress went back: {} after {last_progress}",
                    r.header_revision
                ));
            }
            if r.header_revision < last_rev {
                bad.push(format!(
                    "progress {} claims before delivered event {last_rev}",
                    r.header_revision
                ));
            }
            last_progress = r.header_revision;
            window_end = window_end.max(r.header_revision);
            continue;
        }
        if let (Some(prev), Some(first)) = (prev_last_event_rev, r.events.first())
            && prev == first.revision
            && !prev_fragment
        {
            bad.push(format!("revision {prev} split across responses"));
        }
        for e in &r.events {
            if !e.key.starts_with(&log.prefix) {
                bad.push(format!("event for {:?} outside the watched prefix", e.key));
            }
            if e.revision < last_rev {
                bad.push(format!(
                    "revision went back: {} after {last_rev}",
                    e.revision
                ));
            }
            if e.revision <= last_progress {
                bad.push(format!(
                    "event at {} after progress notification at {last_progress}",
                    e.revision
                ));
            }
            if !seen.insert((e.revision, e.key.clone())) {
                bad.push(format!("duplicate event ({}, {:?})", e.revision, e.key));
            }
            last_rev = e.revision;
            received.push(e);
        }
        prev_last_event_rev = r.events.last().map(|e| e.revision);
        prev_fragment = r.fragment;
        window_end = window_end.max(last_rev);
    }
    // Reliable and resumable: exactly the committed events in [first_rev, window_end].
    let expected: Vec<&TruthEvent> = truth
        .events
        .iter()
        .filter(|e| {
            e.revision >= judged_from && e.revision <= window_end && e.key.starts_with(&log.prefix)
        })
        .collect();
    let got: BTreeMap<(i64, Vec<u8>), &SeenEvent> = received
        .iter()
        .map(|e| ((e.revision, e.key.clone()), *e))
        .collect();
    for t in &expected {
        match got.get(&(t.revision, t.key.clone())) {
            None => bad.push(format!(
                "missed event ({}, {:?}) in window [{first_rev}, {window_end}]",
                t.revision, t.key
            )),
            Some(e) => {
                if e.put != t.put
                    || (t.put && (e.value != t.value || e.create_revision != t.create_revision))
                {
                    bad.push(format!(
                        "event ({}, {:?}) differs from the committed one",
                        t.revision, t.key
                    ));
                }
                if log.prev_kv {
                    let want = truth.value_before(&t.key, t.revision);
                    if e.prev_value != want {
                        bad.push(format!(
                            "prev_kv of ({}, {:?}) is {:?}, want {:?}",
                            t.revision, t.key, e.prev_value, want
                        ));
                    }
                }
                let existed = truth.value_before(&t.key, t.revision).is_some();
                if t.put && (e.create_revision == e.revision) == existed {
                    bad.push(format!(
                        "create-ness of ({}, {:?}) is wrong",
                        t.revision, t.key
                    ));
                }
            }
        }
    }
    if received
        .iter()
        .filter(|e| e.revision >= judged_from)
        .count()
        > expected.len()
    {
        let want: HashSet<(i64, Vec<u8>)> = expected
            .iter()
            .map(|t| (t.revision, t.key.clone()))
            .collect();
        for e in received.iter().filter(|e| e.revision >= judged_from) {
            if !want.contains(&(e.revision, e.key.clone())) {
                bad.push(format!(
                    "event ({}, {:?}) was never committed in the window",
                    e.revision, e.key
                ));
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth() -> Truth {
        let ev = |revision, key: &str, put, value: &str, create_revision| TruthEvent {
            revision,
            key: key.into(),
            put,
            value: value.into(),
            create_revision,
        };
        Truth {
            events: vec![
                ev(2, "ka", true, "1", 2),
                ev(3, "ka", true, "2", 2),
                ev(4, "kb", true, "3", 4),
                ev(5, "ka", false, "", 0),
            ],
            compact_revision: 0,
        }
    }

    fn seen(
        revision: i64,
        key: &str,
        put: bool,
        value: &str,
        create_revision: i64,
        prev: Option<&str>,
    ) -> SeenEvent {
        SeenEvent {
            revision,
            key: key.into(),
            put,
            value: value.into(),
            create_revision,
            prev_value: prev.map(Into::into),
        }
    }

    fn log(events: Vec<Vec<SeenEvent>>, progress_at: Option<i64>) -> WatchLog {
        let mut responses = vec![SeenResponse {
            created: true,
            header_revision: 1,
            ..Default::default()
        }];
        for evs in events {
            responses.push(SeenResponse {
                header_revision: evs.last().map_or(0, |e| e.revision),
                events: evs,
                ..Default::default()
            });
        }
        if let Some(p) = progress_at {
            responses.push(SeenResponse {
                header_revision: p,
                ..Default::default()
            });
        }
        WatchLog {
            prefix: b"k".to_vec(),
            start_revision: 2,
            prev_kv: true,
            responses,
        }
    }

    fn all() -> Vec<Vec<SeenEvent>> {
        vec![
            vec![seen(2, "ka", true, "1", 2, None)],
            vec![
                seen(3, "ka", true, "2", 2, Some("1")),
                seen(4, "kb", true, "3", 4, None),
            ],
            vec![seen(5, "ka", false, "", 0, Some("2"))],
        ]
    }

    #[test]
    fn a_correct_stream_passes() {
        assert_eq!(
            validate(&truth(), &log(all(), Some(5))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_gap_is_caught() {
        let mut evs = all();
        evs[1].remove(0);
        assert!(!validate(&truth(), &log(evs, Some(5))).is_empty());
    }

    #[test]
    fn duplicates_reordering_and_wrong_prev_kv_are_caught() {
        let mut dup = all();
        dup.push(vec![seen(5, "ka", false, "", 0, Some("2"))]);
        assert!(!validate(&truth(), &log(dup, None)).is_empty());
        let mut reordered = all();
        reordered.swap(0, 2);
        assert!(!validate(&truth(), &log(reordered, None)).is_empty());
        let mut wrong_prev = all();
        wrong_prev[2][0].prev_value = Some(b"1".to_vec());
        assert!(!validate(&truth(), &log(wrong_prev, None)).is_empty());
    }

    #[test]
    fn progress_before_an_undelivered_event_is_caught() {
        let mut evs = all();
        let last = evs.pop().expect("last");
        let mut l = log(evs, Some(5));
        l.responses.push(SeenResponse {
            header_revision: 5,
            events: last,
            ..Default::default()
        });
        assert!(!validate(&truth(), &l).is_empty());
    }
}
