//! Behaviour of the MVCC store on a real fjall directory: revisions, ranges, txns, compaction,
//! leases, restart, and a property test against a plain in-memory model.

use std::collections::BTreeMap;

use keyhold_store::*;
use proptest::prelude::*;

fn open(dir: &tempfile::TempDir) -> KvStore {
    KvStore::open(dir.path(), StoreOptions::default()).expect("open")
}

fn apply(s: &KvStore, req: WriteRequest) -> Result<WriteResponse> {
    s.apply(&req, ApplyContext::default())
}

fn put(s: &KvStore, k: &str, v: &str) -> i64 {
    let req = PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    };
    match apply(s, WriteRequest::Put(req)).expect("put") {
        WriteResponse::Put(p) => p.revision,
        other => panic!("unexpected {other:?}"),
    }
}

fn get(s: &KvStore, k: &str, rev: i64) -> Result<Option<KeyValue>> {
    let req = RangeRequest {
        key: k.into(),
        revision: rev,
        ..Default::default()
    };
    Ok(s.range(&req)?.kvs.into_iter().next())
}

fn range(s: &KvStore, req: RangeRequest) -> RangeResponse {
    s.range(&req).expect("range")
}

#[test]
fn revisions_versions_and_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    assert_eq!(s.current_revision().expect("rev"), 1);
    assert_eq!(put(&s, "a", "1"), 2);
    assert_eq!(put(&s, "a", "2"), 3);
    let kv = get(&s, "a", 0).expect("get").expect("present");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(get(&s, "a", 2).expect("get").expect("present").value, b"1");
    let del = DeleteRangeRequest {
        key: "a".into(),
        prev_kv: true,
        ..Default::default()
    };
    match apply(&s, WriteRequest::DeleteRange(del.clone())).expect("delete") {
        WriteResponse::DeleteRange(d) => {
            assert_eq!((d.revision, d.deleted, d.prev_kvs.len()), (4, 1, 1));
        }
        other => panic!("{other:?}"),
    }
    match apply(&s, WriteRequest::DeleteRange(del)).expect("delete") {
        WriteResponse::DeleteRange(d) => assert_eq!((d.revision, d.deleted), (4, 0), "no bump"),
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&s, "a", 0).expect("get"), None);
    assert_eq!(get(&s, "a", 3).expect("get").expect("old").version, 2);
    assert_eq!(put(&s, "a", "3"), 5);
    let kv = get(&s, "a", 0).expect("get").expect("present");
    assert_eq!((kv.create_revision, kv.version), (5, 1), "new generation");
    assert_eq!(get(&s, "a", 6), Err(Error::FutureRevision));
}

#[test]
fn range_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    for (k, v) in [("b", "z"), ("a", "y"), ("c", "x"), ("d\0", "w")] {
        put(&s, k, v);
    }
    put(&s, "a", "y2");
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    let keys = |r: RangeResponse| r.kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    assert_eq!(
        keys(range(&s, all.clone())),
        vec![b"a".to_vec(), b"b".into(), b"c".into(), b"d\0".into()]
    );
    let limited = range(
        &s,
        RangeRequest {
            limit: 2,
            ..all.clone()
        },
    );
    assert_eq!(
        (limited.kvs.len(), limited.more, limited.count),
        (2, true, 4)
    );
    let by_value = RangeRequest {
        sort_target: SortTarget::Value,
        sort_order: SortOrder::Descend,
        ..all.clone()
    };
    assert_eq!(keys(range(&s, by_value))[0], b"b");
    let by_mod = RangeRequest {
        sort_target: SortTarget::Mod,
        ..all.clone()
    };
    assert_eq!(
        keys(range(&s, by_mod))[3],
        b"a",
        "NONE order on a non-key target ascends"
    );
    let prefix = RangeRequest {
        key: "a".into(),
        range_end: prefix_end(b"a"),
        ..Default::default()
    };
    assert_eq!(range(&s, prefix).count, 1);
    let filtered = RangeRequest {
        min_mod_revision: 4,
        ..all.clone()
    };
    let r = range(&s, filtered);
    assert_eq!((r.kvs.len(), r.count), (3, 4), "count ignores filters");
    let count_only = range(
        &s,
        RangeRequest {
            count_only: true,
            ..all.clone()
        },
    );
    assert!(count_only.kvs.is_empty());
    assert_eq!(count_only.count, 4);
    let keys_only = range(
        &s,
        RangeRequest {
            keys_only: true,
            ..all.clone()
        },
    );
    assert!(keys_only.kvs.iter().all(|kv| kv.value.is_empty()));
    let from_key = RangeRequest {
        key: "c".into(),
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(range(&s, from_key).count, 2);
    let historical = RangeRequest { revision: 3, ..all };
    assert_eq!(
        keys(range(&s, historical)),
        vec![b"a".to_vec(), b"b".into()]
    );
}

#[test]
fn txn_compares_branches_and_nested_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    put(&s, "k", "v");
    let cmp = |target, result| Compare {
        result,
        target,
        key: "k".into(),
        range_end: vec![],
    };
    let txn = TxnRequest {
        compare: vec![cmp(
            CompareTarget::Value(b"v".to_vec()),
            CompareResult::Equal,
        )],
        success: vec![
            RequestOp::Put(PutRequest {
                key: "k".into(),
                value: "w".into(),
                ..Default::default()
            }),
            RequestOp::Range(RangeRequest {
                key: "k".into(),
                ..Default::default()
            }),
            RequestOp::Txn(TxnRequest {
                compare: vec![cmp(CompareTarget::Version(1), CompareResult::Equal)],
                success: vec![RequestOp::Put(PutRequest {
                    key: "n".into(),
                    value: "1".into(),
                    ..Default::default()
                })],
                failure: vec![],
            }),
        ],
        failure: vec![],
    };
    validate_txn(&txn, 128).expect("valid");
    let WriteResponse::Txn(resp) = apply(&s, WriteRequest::Txn(txn)).expect("txn") else {
        panic!("not a txn response")
    };
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 3);
    let ResponseOp::Range(r) = &resp.responses[1] else {
        panic!("range expected")
    };
    assert_eq!(r.kvs[0].value, b"w", "later ops see earlier writes");
    let ResponseOp::Txn(n) = &resp.responses[2] else {
        panic!("txn expected")
    };
    assert!(n.succeeded, "nested compare sees the pre-txn version 1");
    let n_kv = get(&s, "n", 0).expect("get").expect("present");
    assert_eq!(n_kv.mod_revision, 3, "one revision for the whole txn");
    // Missing key: VALUE compare false, CREATE == 0 true.
    let absent = |target, result| Compare {
        result,
        target,
        key: "zz".into(),
        range_end: vec![],
    };
    let t = TxnRequest {
        compare: vec![absent(CompareTarget::Value(vec![]), CompareResult::Equal)],
        ..Default::default()
    };
    let WriteResponse::Txn(r) = apply(&s, WriteRequest::Txn(t)).expect("txn") else {
        panic!()
    };
    assert!(!r.succeeded);
    assert_eq!(r.revision, 3, "read-only txn does not bump");
    let t = TxnRequest {
        compare: vec![absent(CompareTarget::Create(0), CompareResult::Equal)],
        ..Default::default()
    };
    let WriteResponse::Txn(r) = apply(&s, WriteRequest::Txn(t)).expect("txn") else {
        panic!()
    };
    assert!(r.succeeded);
}

#[test]
fn txn_validation_rules() {
    let p = |k: &str| {
        RequestOp::Put(PutRequest {
            key: k.into(),
            ..Default::default()
        })
    };
    let d = |k: &str, e: &str| {
        RequestOp::DeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: e.into(),
            ..Default::default()
        })
    };
    let txn = |success| TxnRequest {
        success,
        ..Default::default()
    };
    assert_eq!(
        validate_txn(&txn(vec![p("a"), p("a")]), 128),
        Err(Error::DuplicateKey)
    );
    assert_eq!(
        validate_txn(&txn(vec![p("b"), d("a", "c")]), 128),
        Err(Error::DuplicateKey)
    );
    assert_eq!(
        validate_txn(&txn(vec![d("a", "c"), d("b", "d")]), 128),
        Ok(())
    );
    let nested = TxnRequest {
        success: vec![p("x")],
        failure: vec![p("x")],
        ..Default::default()
    };
    assert_eq!(
        validate_txn(&txn(vec![RequestOp::Txn(nested.clone())]), 128),
        Ok(())
    );
    assert_eq!(
        validate_txn(&txn(vec![p("x"), RequestOp::Txn(nested)]), 128),
        Err(Error::DuplicateKey)
    );
    assert_eq!(
        validate_txn(&txn((0..129).map(|i| p(&i.to_string())).collect()), 128),
        Err(Error::TooManyTxnOps)
    );
    assert_eq!(validate_txn(&txn(vec![p("")]), 128), Err(Error::EmptyKey));
}

#[test]
fn compaction_keeps_newest_at_or_below_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = open(&dir);
        for i in 0..5 {
            put(&s, "a", &i.to_string()); // revs 2..=6
        }
        put(&s, "b", "x"); // 7
        apply(
            &s,
            WriteRequest::DeleteRange(DeleteRangeRequest {
                key: "b".into(),
                ..Default::default()
            }),
        )
        .expect("delete"); // 8
        put(&s, "c", "y"); // 9
        assert!(matches!(
            apply(&s, WriteRequest::Compact { revision: 10 }),
            Err(Error::FutureRevision)
        ));
        apply(&s, WriteRequest::Compact { revision: 9 }).expect("compact");
        assert_eq!(get(&s, "a", 8), Err(Error::Compacted));
        assert_eq!(get(&s, "a", 9).expect("get").expect("a").value, b"4");
        assert!(matches!(
            apply(&s, WriteRequest::Compact { revision: 9 }),
            Err(Error::Compacted)
        ));
    }
    let s = open(&dir);
    assert_eq!(s.current_revision().expect("rev"), 9);
    assert_eq!(s.compact_revision().expect("compact"), 9);
    assert_eq!(get(&s, "a", 0).expect("get").expect("a").version, 5);
    let range = KeyRange::new(b"\0", b"\0");
    assert_eq!(s.watch_events(&range, 8, 9, false), Err(Error::Compacted));
    let (events, next) = s.watch_events(&range, 9, 9, false).expect("events");
    assert_eq!((events.len(), next), (1, 10));
    assert_eq!(put(&s, "a", "5"), 10, "revisions continue after restart");
}

#[test]
fn leases_attach_revoke_and_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = open(&dir);
        apply(&s, WriteRequest::LeaseGrant { id: 7, ttl: 30 }).expect("grant");
        assert_eq!(
            apply(&s, WriteRequest::LeaseGrant { id: 7, ttl: 30 }),
            Err(Error::LeaseExists)
        );
        let leased = |k: &str, lease| PutRequest {
            key: k.into(),
            value: "v".into(),
            lease,
            ..Default::default()
        };
        assert_eq!(
            apply(&s, WriteRequest::Put(leased("x", 8))),
            Err(Error::LeaseNotFound)
        );
        apply(&s, WriteRequest::Put(leased("x", 7))).expect("put");
        apply(&s, WriteRequest::Put(leased("y", 7))).expect("put");
        apply(&s, WriteRequest::Put(leased("y", 0))).expect("detach");
        assert_eq!(s.lease_keys(7), vec![b"x".to_vec()]);
    }
    let s = open(&dir);
    assert_eq!(
        s.lease_keys(7),
        vec![b"x".to_vec()],
        "attachments survive restart"
    );
    let before = s.current_revision().expect("rev");
    apply(&s, WriteRequest::LeaseRevoke { id: 7 }).expect("revoke");
    assert_eq!(s.current_revision().expect("rev"), before + 1);
    assert_eq!(get(&s, "x", 0).expect("get"), None);
    assert!(get(&s, "y", 0).expect("get").is_some());
    assert_eq!(
        apply(&s, WriteRequest::LeaseRevoke { id: 7 }),
        Err(Error::LeaseNotFound)
    );
}

/// A compaction takes effect when applied; its sweep runs in steps, survives a restart, and a
/// compaction applied in the middle of a pass gets a pass of its own.
#[test]
fn compaction_sweep_runs_in_steps_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let history = |s: &KvStore| {
        let mut out = Vec::new();
        s.for_each_history(|r, kv, tombstone| out.push((r.main, kv.key.clone(), tombstone)))
            .expect("history");
        out
    };
    {
        let s = open(&dir);
        for i in 0..5 {
            put(&s, "a", &i.to_string()); // revs 2..=6
        }
        put(&s, "b", "x"); // 7
        let del = DeleteRangeRequest {
            key: "b".into(),
            ..Default::default()
        };
        apply(&s, WriteRequest::DeleteRange(del)).expect("delete"); // 8
        put(&s, "c", "y"); // 9
        apply(&s, WriteRequest::Compact { revision: 8 }).expect("compact");
        // In effect before any sweep: nothing below 8 is served from the history still there.
        assert_eq!(s.compaction_pending(), Ok(true));
        assert_eq!(history(&s).len(), 8);
        assert_eq!(get(&s, "a", 7), Err(Error::Compacted));
        let all = KeyRange::new(b"\0", b"\0");
        assert_eq!(s.watch_events(&all, 7, 9, false), Err(Error::Compacted));
        assert_eq!(s.sweep_compacted(2), Ok(false));
        assert_eq!(history(&s).len(), 7, "the first step removed a@2");
    }
    let s = open(&dir);
    assert_eq!(
        s.compaction_pending(),
        Ok(true),
        "a restart leaves the sweep pending"
    );
    assert_eq!(get(&s, "a", 8).expect("get").expect("a").value, b"4");
    // The pass for 8 reads on through b's tombstone at 8, which it keeps...
    for _ in 4..=8 {
        assert_eq!(s.sweep_compacted(1), Ok(false));
    }
    assert!(history(&s).contains(&(8, b"b".to_vec(), true)));
    // ...and a compaction to 9 applied before that pass ends gets a pass that removes it.
    apply(&s, WriteRequest::Compact { revision: 9 }).expect("compact");
    let mut steps = 1;
    while !s.sweep_compacted(1).expect("sweep") {
        steps += 1;
        assert!(steps < 20, "the sweep ends");
    }
    assert_eq!(s.compaction_pending(), Ok(false));
    assert_eq!(
        history(&s),
        vec![(6, b"a".to_vec(), false), (9, b"c".to_vec(), false)]
    );
    assert_eq!(s.sweep_compacted(1), Ok(true), "nothing left to do");
}

#[test]
fn hash_kv_is_equal_for_equal_histories() {
    let (d1, d2) = (
        tempfile::tempdir().expect("t"),
        tempfile::tempdir().expect("t"),
    );
    let (a, b) = (open(&d1), open(&d2));
    for s in [&a, &b] {
        put(s, "k", "1");
        put(s, "k", "2");
        apply(s, WriteRequest::Compact { revision: 2 }).expect("compact");
    }
    assert_eq!(a.hash_kv(0).expect("hash"), b.hash_kv(0).expect("hash"));
    put(&b, "k", "3");
    assert_ne!(a.hash_kv(0).expect("hash").0, b.hash_kv(0).expect("hash").0);
    assert_eq!(a.hash_kv(3).expect("hash").0, b.hash_kv(3).expect("hash").0);
}

/// Plain model: every revision's full key→(value, create, mod, version) map.
#[derive(Default, Clone)]
struct Model {
    revs: Vec<BTreeMap<Vec<u8>, KeyValue>>,
}

impl Model {
    fn latest(&self) -> BTreeMap<Vec<u8>, KeyValue> {
        self.revs.last().cloned().unwrap_or_default()
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.put_all(&[(k, v)]);
    }
    /// Puts of distinct keys at one revision (a txn).
    fn put_all(&mut self, puts: &[(Vec<u8>, Vec<u8>)]) {
        let mut m = self.latest();
        let rev = self.revs.len() as i64 + 1;
        for (k, v) in puts {
            let prev = m.get(k).cloned();
            m.insert(
                k.clone(),
                KeyValue {
                    key: k.clone(),
                    create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                    mod_revision: rev,
                    version: prev.map_or(0, |p| p.version) + 1,
                    value: v.clone(),
                    lease: 0,
                },
            );
        }
        self.revs.push(m);
    }
    /// The events of revision `rev` in key order: puts (with their previous value) and
    /// deletes (a tombstone and the deleted value).
    fn events(&self, rev: i64) -> Vec<Event> {
        let before = &self.revs[(rev - 2) as usize];
        let after = &self.revs[(rev - 1) as usize];
        let keys: std::collections::BTreeSet<&Vec<u8>> =
            before.keys().chain(after.keys()).collect();
        let mut events = Vec::new();
        for k in keys {
            match (before.get(k), after.get(k)) {
                (prev, Some(kv)) if kv.mod_revision == rev => events.push(Event {
                    kind: EventType::Put,
                    kv: kv.clone(),
                    prev_kv: prev.cloned(),
                }),
                (Some(prev), None) => events.push(Event {
                    kind: EventType::Delete,
                    kv: KeyValue {
                        key: k.clone(),
                        mod_revision: rev,
                        ..Default::default()
                    },
                    prev_kv: Some(prev.clone()),
                }),
                _ => {}
            }
        }
        events
    }
    fn delete(&mut self, r: &KeyRange) {
        let mut m = self.latest();
        let before = m.len();
        m.retain(|k, _| !r.contains(k));
        if m.len() != before {
            self.revs.push(m);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    /// Puts of two distinct keys in one txn (one revision, two sub-revisions).
    PutTwo(u8, u8, u8),
    Delete(u8, u8),
    Get(u8, u8, u8),
    /// Compact at `current - back` (when that is above the compacted revision).
    Compact(u8),
    /// A compaction sweep step reading this many history records.
    Sweep(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..6, 1u8..6, any::<u8>()).prop_map(|(k, d, v)| Op::PutTwo(k, (k + d) % 6, v)),
        3 => (0u8..6, 0u8..7).prop_map(|(k, e)| Op::Delete(k, e)),
        6 => (0u8..6, 0u8..7, 0u8..40).prop_map(|(k, e, r)| Op::Get(k, e, r)),
        1 => (0u8..8).prop_map(Op::Compact),
        2 => (1u8..4).prop_map(Op::Sweep),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn store_matches_model(
        ops in proptest::collection::vec(op(), 1..60),
        waypoints in 1i64..4,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        // Sparse index entries every 1 to 3 versions, so reads start their walks from them.
        let options = StoreOptions { waypoint_versions: waypoints, ..StoreOptions::default() };
        let open = |dir: &tempfile::TempDir| KvStore::open(dir.path(), options.clone()).expect("open");
        let mut s = open(&dir);
        let mut model = Model::default();
        model.revs.push(BTreeMap::new()); // revision 1: empty
        let mut compacted = 0i64;
        let key = |k: u8| vec![b'k', k];
        let end = |e: u8| if e == 6 { vec![0] } else if e == 0 { vec![] } else { vec![b'k', e] };
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    put(&s, std::str::from_utf8(&key(k)).expect("utf8"), &v.to_string());
                    model.put(key(k), v.to_string().into_bytes());
                }
                Op::PutTwo(a, b, v) => {
                    let puts = [(key(a), vec![v]), (key(b), vec![v, 1])];
                    let success = puts.iter().map(|(k, v)| RequestOp::Put(PutRequest {
                        key: k.clone(),
                        value: v.clone(),
                        ..Default::default()
                    })).collect();
                    let txn = TxnRequest { compare: vec![], success, failure: vec![] };
                    apply(&s, WriteRequest::Txn(txn)).expect("txn");
                    model.put_all(&puts);
                }
                Op::Compact(back) => {
                    let rev = model.revs.len() as i64 - back as i64;
                    let got = apply(&s, WriteRequest::Compact { revision: rev });
                    if rev > compacted && rev >= 1 {
                        prop_assert!(got.is_ok(), "compact {} after {}: {:?}", rev, compacted, got);
                        compacted = rev;
                    } else {
                        prop_assert!(got.is_err(), "compact {} after {}: {:?}", rev, compacted, got);
                    }
                }
                Op::Sweep(n) => {
                    s.sweep_compacted(n as usize).expect("sweep");
                }
                Op::Reopen => {
                    drop(s);
                    s = open(&dir);
                }
                Op::Delete(k, e) => {
                    let range = KeyRange::new(&key(k), &end(e));
                    let want = model.latest().keys().filter(|k| range.contains(k)).count() as i64;
                    let req = DeleteRangeRequest { key: key(k), range_end: end(e), prev_kv: false };
                    match apply(&s, WriteRequest::DeleteRange(req)).expect("delete") {
                        WriteResponse::DeleteRange(d) => prop_assert_eq!(d.deleted, want),
                        other => prop_assert!(false, "{:?}", other),
                    }
                    model.delete(&range);
                }
                Op::Get(k, e, r) => {
                    let current = model.revs.len() as i64;
                    let rev = (r as i64) % (current + 2);
                    let req = RangeRequest { key: key(k), range_end: end(e), revision: rev, ..Default::default() };
                    let got = s.range(&req);
                    if rev > current {
                        prop_assert_eq!(got, Err(Error::FutureRevision));
                        continue;
                    }
                    if rev > 0 && rev < compacted {
                        prop_assert_eq!(got, Err(Error::Compacted));
                        continue;
                    }
                    let at = if rev <= 0 { current } else { rev };
                    let range = KeyRange::new(&key(k), &end(e));
                    let want: Vec<KeyValue> = model.revs[(at - 1) as usize]
                        .values().filter(|kv| range.contains(&kv.key)).cloned().collect();
                    let got = got.expect("range");
                    prop_assert_eq!(got.revision, current);
                    prop_assert_eq!(got.kvs, want);
                }
            }
        }
        let current = model.revs.len() as i64;
        prop_assert_eq!(s.current_revision().expect("rev"), current);
        prop_assert_eq!(s.check_live_index(), Ok(()));
        prop_assert_eq!(s.check_sparse_index(), Ok(()));
        // Watch catch-up from the compacted revision (or 2): every event with its prev_kv.
        // An event at exactly the compacted revision may have lost its previous value.
        let everything = KeyRange::new(&[0], &[0]);
        let from = compacted.max(2);
        let (mut got, next) = s.watch_events(&everything, from, current, true).expect("events");
        prop_assert_eq!(next, current + 1);
        let want: Vec<Event> = (from..=current).flat_map(|r| model.events(r)).collect();
        // Within a revision, a txn's events come in op order, the model's in key order.
        got.sort_by(|a, b| (a.kv.mod_revision, &a.kv.key).cmp(&(b.kv.mod_revision, &b.kv.key)));
        for (g, w) in got.iter_mut().zip(&want) {
            if g.kv.mod_revision == compacted && g.prev_kv.is_none() {
                g.prev_kv = w.prev_kv.clone();
            }
        }
        prop_assert_eq!(got, want);
        // Everything above held with the sweep anywhere. Once it ends, compaction kept exactly
        // every change above the compacted revision and each key's newest change at or below
        // it, unless that is a tombstone below it.
        s.finish_compaction().expect("sweep");
        prop_assert_eq!(s.compaction_pending(), Ok(false));
        prop_assert_eq!(s.check_sparse_index(), Ok(()));
        let mut kept = Vec::new();
        s.for_each_history(|r, kv, tombstone| kept.push((kv.key.clone(), r.main, tombstone))).expect("history");
        kept.sort();
        let mut changes: Vec<(Vec<u8>, i64, bool)> = (2..=current)
            .flat_map(|r| model.events(r))
            .map(|e| (e.kv.key, e.kv.mod_revision, e.kind == EventType::Delete))
            .collect();
        changes.sort();
        let want: Vec<_> = changes.iter().enumerate().filter(|(i, (k, r, tombstone))| {
            let newer_at_or_below = changes.get(i + 1).is_some_and(|n| &n.0 == k && n.1 <= compacted);
            let deleted_below = *tombstone && *r < compacted;
            *r > compacted || !(newer_at_or_below || deleted_below)
        }).map(|(_, c)| c.clone()).collect();
        prop_assert_eq!(kept, want);
    }
}

#[test]
fn reclaim_is_amortized_over_removed_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    for i in 0..100 {
        put(&s, "k", &i.to_string());
    }
    let rev = s.current_revision().expect("rev");
    apply(&s, WriteRequest::Compact { revision: rev }).expect("compact");
    s.finish_compaction().expect("sweep");
    assert_eq!(
        s.reclaim_compacted(),
        Ok(false),
        "99 removed entries do not pay for a rewrite"
    );
    for i in 0..10_000 {
        put(&s, "k", &i.to_string());
    }
    let rev = s.current_revision().expect("rev");
    apply(&s, WriteRequest::Compact { revision: rev }).expect("compact");
    assert_eq!(s.reclaim_compacted(), Ok(false), "nothing is swept yet");
    s.finish_compaction().expect("sweep");
    assert_eq!(s.reclaim_compacted(), Ok(true));
    assert_eq!(
        s.reclaim_compacted(),
        Ok(false),
        "the counter restarts after a rewrite"
    );
    assert_eq!(get(&s, "k", 0).expect("get").expect("k").value, b"9999");
}

/// After a compaction's sweep and reclaim, the table files on disk hold about the live data.
/// (That the replaced files go without a later write is checked on a running node, where it
/// failed: `compacted_history_leaves_the_disk_without_a_defragment`.)
#[test]
fn reclaim_leaves_about_the_live_data_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    let value = "v".repeat(1000);
    for i in 0..30_000 {
        put(&s, &format!("k{}", i % 10), &value); // 30 MB of history over 10 keys
    }
    let rev = s.current_revision().expect("rev");
    apply(&s, WriteRequest::Compact { revision: rev }).expect("compact");
    s.finish_compaction().expect("sweep");
    assert_eq!(s.reclaim_compacted(), Ok(true));
    let tables: u64 = std::fs::read_dir(dir.path().join("keyspaces"))
        .expect("keyspaces")
        .flat_map(|ks| std::fs::read_dir(ks.expect("keyspace").path().join("tables")))
        .flatten()
        .map(|t| t.expect("table").metadata().expect("metadata").len())
        .sum();
    assert!(tables < 1_000_000, "{tables} bytes of tables for 10 keys");
    assert_eq!(
        get(&s, "k3", 0).expect("get").expect("k3").value,
        value.as_bytes()
    );
}

/// Collects every revision the watch hub hands out, and counts resyncs.
#[derive(Default)]
struct Recorder(
    std::sync::Mutex<Vec<(i64, Vec<Event>)>>,
    std::sync::atomic::AtomicUsize,
);

impl WatchSink for Recorder {
    fn offer(&self, _id: WatcherId, revision: i64, events: Vec<Event>) -> bool {
        self.0.lock().expect("recorder").push((revision, events));
        true
    }

    fn resync(&self, _id: WatcherId) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Requests that exercise what a batch must get right: reads of earlier requests' writes (prev
/// values, versions, compares, range deletes), domain errors that must leave no trace, and the
/// requests that are applied alone (leases, compaction, historical reads).
fn batch_request() -> impl Strategy<Value = WriteRequest> {
    let key = (0u8..5).prop_map(|k| vec![b'k', b'0' + k]);
    let put = (key.clone(), 0u8..4, any::<bool>(), 0i64..3, any::<bool>()).prop_map(
        |(key, v, prev_kv, lease, ignore_value)| PutRequest {
            key,
            value: vec![b'v', b'0' + v],
            lease,
            prev_kv,
            ignore_value,
            ignore_lease: false,
        },
    );
    let delete = (key.clone(), any::<bool>()).prop_map(|(key, whole)| DeleteRangeRequest {
        range_end: if whole { b"l".to_vec() } else { Vec::new() },
        key,
        prev_kv: true,
    });
    let compare =
        (key.clone(), 0i64..4, 0u8..4, any::<bool>()).prop_map(|(key, n, v, on_value)| Compare {
            result: CompareResult::Equal,
            target: if on_value {
                CompareTarget::Value(vec![b'v', b'0' + v])
            } else {
                CompareTarget::Version(n)
            },
            key,
            range_end: Vec::new(),
        });
    let read = (key.clone(), 0i64..6).prop_map(|(key, revision)| {
        RequestOp::Range(RangeRequest {
            key,
            range_end: b"l".to_vec(),
            revision,
            ..Default::default()
        })
    });
    // The second put fails often (a missing lease, or ignore_value on a missing key), after
    // the first one wrote.
    let txn =
        (compare, put.clone(), put.clone(), delete.clone(), read).prop_map(|(c, p, p2, d, r)| {
            TxnRequest {
                compare: vec![c],
                success: vec![RequestOp::Put(p), r.clone(), RequestOp::Put(p2)],
                failure: vec![RequestOp::DeleteRange(d), r],
            }
        });
    prop_oneof![
        4 => put.prop_map(WriteRequest::Put),
        2 => delete.prop_map(WriteRequest::DeleteRange),
        3 => txn.prop_map(WriteRequest::Txn),
        1 => (1i64..3).prop_map(|id| WriteRequest::LeaseGrant { id, ttl: 60 }),
        1 => (1i64..3).prop_map(|id| WriteRequest::LeaseRevoke { id }),
        1 => (1i64..8).prop_map(|revision| WriteRequest::Compact { revision }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Requests applied through write batches (committed at random points, and wherever a
    /// request must be applied alone) answer exactly as when each is applied on its own, and
    /// leave the same history, leases and watch events.
    #[test]
    fn batched_writes_match_one_by_one(
        reqs in proptest::collection::vec(batch_request(), 1..40),
        cuts in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let (d1, d2) = (tempfile::tempdir().expect("t"), tempfile::tempdir().expect("t"));
        let (single, batched) = (open(&d1), open(&d2));
        let (seen1, seen2) = (std::sync::Arc::new(Recorder::default()), std::sync::Arc::new(Recorder::default()));
        single.hub().register(KeyRange::new(b"", &[0]), 0, true, seen1.clone());
        batched.hub().register(KeyRange::new(b"", &[0]), 0, true, seen2.clone());

        let want: Vec<_> = reqs.iter().map(|r| apply(&single, r.clone())).collect();
        let mut got = Vec::new();
        let mut batch = batched.write_batch(0).expect("batch");
        for (req, cut) in reqs.iter().zip(&cuts) {
            if !batch.admits(req) {
                batch.commit(&[]).expect("commit");
                batch = batched.write_batch(0).expect("batch");
            }
            got.push(batch.apply(req));
            if *cut {
                batch.commit(&[]).expect("commit");
                batch = batched.write_batch(0).expect("batch");
            }
        }
        batch.commit(&[]).expect("commit");

        prop_assert_eq!(got, want);
        let current = single.current_revision().expect("rev");
        prop_assert_eq!(batched.current_revision().expect("rev"), current);
        prop_assert_eq!(batched.hash_kv(0), single.hash_kv(0));
        for rev in single.compact_revision().expect("compact").max(1)..=current {
            let all = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), revision: rev, ..Default::default() };
            prop_assert_eq!(batched.range(&all), single.range(&all));
        }
        for id in 1..3 {
            prop_assert_eq!(batched.lease_keys(id), single.lease_keys(id));
        }
        let events = |r: &Recorder| r.0.lock().expect("recorder").clone();
        prop_assert_eq!(events(&seen2), events(&seen1));
        prop_assert_eq!(batched.check_live_index(), Ok(()));
        prop_assert_eq!(single.check_live_index(), Ok(()));
    }
}

/// A request that fails after some of its ops wrote leaves no trace, alone or between other
/// requests of a batch: no value, no history, no lease attachment, no revision.
#[test]
fn failed_request_in_a_batch_leaves_no_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    apply(&s, WriteRequest::LeaseGrant { id: 7, ttl: 60 }).expect("grant");
    let put = |k: &str, lease: i64, ignore_value: bool| {
        RequestOp::Put(PutRequest {
            key: k.into(),
            value: b"v".to_vec(),
            lease,
            ignore_value,
            ..Default::default()
        })
    };
    // Writes `a` under the lease, then fails: `missing` does not exist for ignore_value.
    let failing = WriteRequest::Txn(TxnRequest {
        compare: Vec::new(),
        success: vec![put("a", 7, false), put("missing", 0, true)],
        failure: Vec::new(),
    });
    let before = s.current_revision().expect("rev");
    let mut batch = s.write_batch(0).expect("batch");
    let ok = |k: &str| {
        WriteRequest::Put(PutRequest {
            key: k.into(),
            value: b"1".to_vec(),
            ..Default::default()
        })
    };
    assert!(batch.apply(&ok("b")).is_ok());
    assert!(batch.admits(&failing));
    assert_eq!(batch.apply(&failing), Err(Error::KeyNotFound));
    assert!(batch.apply(&ok("c")).is_ok());
    batch.commit(&[]).expect("commit");

    assert_eq!(
        s.current_revision().expect("rev"),
        before + 2,
        "one revision per successful put"
    );
    assert_eq!(get(&s, "a", 0).expect("get"), None);
    assert!(
        s.lease_keys(7).is_empty(),
        "the failed put's attachment was rolled back"
    );
    let c = get(&s, "c", 0).expect("get").expect("c");
    assert_eq!(c.mod_revision, before + 2);
    let history = s
        .watch_events(&KeyRange::new(b"", &[0]), before + 1, before + 2, false)
        .expect("events")
        .0;
    let keys: Vec<_> = history.iter().map(|e| e.kv.key.clone()).collect();
    assert_eq!(keys, vec![b"b".to_vec(), b"c".to_vec()]);
}

fn put_req(k: &str, v: &str) -> WriteRequest {
    WriteRequest::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
}

fn prev_values(r: &Recorder) -> Vec<Option<Vec<u8>>> {
    let seen = r.0.lock().expect("recorder");
    seen.iter()
        .flat_map(|(_, events)| {
            events
                .iter()
                .map(|e| e.prev_kv.as_ref().map(|kv| kv.value.clone()))
        })
        .collect()
}

fn delete_req(k: &str, end: &str, prev_kv: bool) -> WriteRequest {
    WriteRequest::DeleteRange(DeleteRangeRequest {
        key: k.into(),
        range_end: end.into(),
        prev_kv,
    })
}

/// Puts and deletes read their previous value only while a watcher asks for `prev_kv`; the
/// ones that do get it, and the version, create revision and lease are right either way.
#[test]
fn prev_values_are_read_while_a_watcher_wants_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    let all = || KeyRange::new(b"", &[0]);
    let plain = std::sync::Arc::new(Recorder::default());
    s.hub().register(all(), 0, false, plain.clone());
    let first = put(&s, "k", "v1");
    put(&s, "k", "v2");
    apply(&s, WriteRequest::LeaseGrant { id: 7, ttl: 60 }).expect("grant");
    let leased = PutRequest {
        key: b"l".to_vec(),
        value: b"lv".to_vec(),
        lease: 7,
        ..Default::default()
    };
    apply(&s, WriteRequest::Put(leased.clone())).expect("put");
    apply(&s, delete_req("l", "", false)).expect("delete");
    assert_eq!(prev_values(&plain), vec![None, None, None, None]);
    assert!(s.lease_keys(7).is_empty(), "the delete detached the key");

    let with_prev = std::sync::Arc::new(Recorder::default());
    let (id, _) = s.hub().register(all(), 0, true, with_prev.clone());
    assert!(s.hub().wants_prev_kv());
    put(&s, "k", "v3");
    apply(&s, WriteRequest::Put(leased)).expect("put");
    apply(&s, delete_req("l", "", false)).expect("delete");
    assert_eq!(
        prev_values(&with_prev),
        vec![Some(b"v2".to_vec()), None, Some(b"lv".to_vec())]
    );
    assert!(s.hub().cancel(id));
    assert!(!s.hub().wants_prev_kv());

    // A delete that returns its values reads them with no watcher asking.
    put(&s, "l", "lv2");
    let deleted = apply(&s, delete_req("k", "m", true)).expect("delete");
    let WriteResponse::DeleteRange(d) = deleted else {
        panic!("{deleted:?}")
    };
    let values: Vec<_> = d.prev_kvs.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(
        (d.deleted, values),
        (2, vec![b"v3".to_vec(), b"lv2".to_vec()])
    );
    assert_eq!(d.prev_kvs[0].create_revision, first);
    assert_eq!(d.prev_kvs[0].version, 3);
    assert_eq!(s.check_live_index(), Ok(()));
}

/// A `prev_kv` watcher that arrives while a batch without previous values is being applied is
/// not handed that batch: it is told to resync, and history gives it the previous value.
#[test]
fn a_prev_kv_watcher_registered_during_a_batch_reads_it_from_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    put(&s, "k", "v1");
    let mut batch = s.write_batch(0).expect("batch");
    let late = std::sync::Arc::new(Recorder::default());
    let (id, _) = s
        .hub()
        .register(KeyRange::new(b"", &[0]), 0, true, late.clone());
    batch.apply(&put_req("k", "v2")).expect("put");
    batch.commit(&[]).expect("commit");

    let rev = s.current_revision().expect("rev");
    assert!(late.0.lock().expect("recorder").is_empty(), "not offered");
    assert_eq!(late.1.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(!s.hub().is_synced(id));
    assert_eq!(s.hub().next_revision(id), Some(rev));
    let (events, next) = s
        .watch_events(&KeyRange::new(b"", &[0]), rev, rev, true)
        .expect("history");
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(b"v1".to_vec())
    );
    assert_eq!(s.hub().try_sync(id, next), SyncState::Synced);
}

/// The live index is rebuilt from disk on restart and on a snapshot install, and matches what
/// the writes left.
#[test]
fn live_index_survives_restart_and_snapshot_install() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    apply(&s, WriteRequest::LeaseGrant { id: 5, ttl: 60 }).expect("grant");
    for i in 0..50 {
        put(&s, &format!("k{}", i % 20), &i.to_string());
    }
    let leased = PutRequest {
        key: b"k3".to_vec(),
        lease: 5,
        ignore_value: true,
        ..Default::default()
    };
    apply(&s, WriteRequest::Put(leased)).expect("put");
    let delete = DeleteRangeRequest {
        key: b"k1".to_vec(),
        range_end: b"k2".to_vec(),
        prev_kv: false,
    };
    apply(&s, WriteRequest::DeleteRange(delete)).expect("delete");
    assert_eq!(s.check_live_index(), Ok(()));
    let mut image = Vec::new();
    s.export(&mut image, &[]).expect("export");
    drop(s);

    let s = open(&dir);
    assert_eq!(s.check_live_index(), Ok(()));
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = open(&other_dir);
    put(&other, "stale", "x");
    other.import(&mut image.as_slice()).expect("import");
    assert_eq!(other.check_live_index(), Ok(()));
    for store in [&s, &other] {
        put(store, "k3", "again");
        let kv = get(store, "k3", 0).expect("get").expect("k3");
        assert_eq!(
            (kv.version, kv.lease),
            (5, 0),
            "k3 was put 3 times, then leased"
        );
        assert_eq!(store.lease_keys(5), Vec::<Vec<u8>>::new());
    }
}

/// A compare on one key's revisions, version or lease (answered from the live index) agrees
/// with the same compare over a range holding only that key (answered from `kv_latest`), for
/// live, deleted and never-written keys, and for a key written earlier in the same batch.
#[test]
fn single_key_compares_agree_with_range_compares() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir);
    apply(&s, WriteRequest::LeaseGrant { id: 4, ttl: 60 }).expect("grant");
    put(&s, "a", "1");
    put(&s, "b", "1");
    let leased = PutRequest {
        key: b"a".to_vec(),
        value: b"2".to_vec(),
        lease: 4,
        ..Default::default()
    };
    apply(&s, WriteRequest::Put(leased)).expect("put");
    let delete = DeleteRangeRequest {
        key: b"b".to_vec(),
        ..Default::default()
    };
    apply(&s, WriteRequest::DeleteRange(delete)).expect("delete");
    let current = s.current_revision().expect("rev");

    let mut batch = s.write_batch(0).expect("batch");
    batch.apply(&put_req("c", "in batch")).expect("put");
    let results = [
        CompareResult::Equal,
        CompareResult::NotEqual,
        CompareResult::Greater,
        CompareResult::Less,
    ];
    let mut checked = 0;
    for key in ["a", "b", "c", "never"] {
        for n in 0..=current + 2 {
            let targets = [
                CompareTarget::Version(n),
                CompareTarget::Create(n),
                CompareTarget::Mod(n),
                CompareTarget::Lease(n),
            ];
            for (target, result) in targets.iter().flat_map(|t| results.map(|r| (t, r))) {
                let txn = |range_end: Vec<u8>| {
                    WriteRequest::Txn(TxnRequest {
                        compare: vec![Compare {
                            result,
                            target: target.clone(),
                            key: key.into(),
                            range_end,
                        }],
                        success: Vec::new(),
                        failure: Vec::new(),
                    })
                };
                let succeeded = |resp: Result<WriteResponse>| match resp {
                    Ok(WriteResponse::Txn(t)) => t.succeeded,
                    other => panic!("unexpected {other:?}"),
                };
                let mut one_key_range = key.as_bytes().to_vec();
                one_key_range.push(0);
                assert_eq!(
                    succeeded(batch.apply(&txn(Vec::new()))),
                    succeeded(batch.apply(&txn(one_key_range))),
                    "{key} {target:?} {result:?}"
                );
                checked += 1;
            }
        }
    }
    batch.commit(&[]).expect("commit");
    assert_eq!(checked, 4 * (current as usize + 3) * 16);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// A store whose live index is still loading (a member just restarted) answers writes
    /// exactly as one whose index is loaded, whatever the loader has reached, and its index ends
    /// up equal to `kv_latest`: the loader never brings back a key the writer deleted or
    /// overwrote meanwhile.
    #[test]
    fn writes_while_the_live_index_loads_match_a_loaded_store(
        initial in proptest::collection::vec((0u8..5, 0u8..4, any::<bool>()), 0..12),
        reqs in proptest::collection::vec(batch_request(), 1..30),
        steps in proptest::collection::vec(0usize..3, 30),
    ) {
        let (d1, d2) = (tempfile::tempdir().expect("t"), tempfile::tempdir().expect("t"));
        for dir in [&d1, &d2] {
            let s = open(dir);
            apply(&s, WriteRequest::LeaseGrant { id: 1, ttl: 60 }).expect("grant");
            for (k, v, leased) in &initial {
                let req = PutRequest {
                    key: vec![b'k', b'0' + k],
                    value: vec![b'v', b'0' + v],
                    lease: i64::from(*leased),
                    ..Default::default()
                };
                apply(&s, WriteRequest::Put(req)).expect("put");
            }
        }
        let loaded = open(&d1);
        let db = fjall::Database::builder(d2.path()).open().expect("db");
        let loading = KvStore::with_database(db, StoreOptions::default()).expect("store");
        for (req, step) in reqs.iter().zip(&steps) {
            prop_assert_eq!(apply(&loading, req.clone()), apply(&loaded, req.clone()));
            if *step > 0 {
                loading.load_live_index(*step).expect("load");
            }
        }
        while !loading.load_live_index(2).expect("load") {}
        prop_assert_eq!(loading.check_live_index(), Ok(()));
        prop_assert_eq!(loaded.check_live_index(), Ok(()));
        prop_assert_eq!(loading.hash_kv(0), loaded.hash_kv(0));
        // After loading, the index alone answers: the next writes still agree.
        for req in &reqs {
            prop_assert_eq!(apply(&loading, req.clone()), apply(&loaded, req.clone()));
        }
        prop_assert_eq!(loading.hash_kv(0), loaded.hash_kv(0));
    }
}

/// A snapshot installed while the live index is still loading (a member restarted far behind)
/// leaves an index equal to the installed state, and later load steps change nothing.
#[test]
fn snapshot_install_while_the_live_index_loads() {
    let (d1, d2) = (
        tempfile::tempdir().expect("t"),
        tempfile::tempdir().expect("t"),
    );
    let source = open(&d1);
    for i in 0..30 {
        put(&source, &format!("k{:02}", i % 10), "new");
    }
    let mut image = Vec::new();
    source.export(&mut image, &[]).expect("export");
    {
        let stale = open(&d2);
        for i in 0..40 {
            put(&stale, &format!("k{i:02}"), "old");
        }
    }
    let db = fjall::Database::builder(d2.path()).open().expect("db");
    let s = KvStore::with_database(db, StoreOptions::default()).expect("store");
    assert_eq!(
        s.load_live_index(5),
        Ok(false),
        "part of the stale keys loaded"
    );
    s.import(&mut image.as_slice()).expect("import");
    assert_eq!(s.check_live_index(), Ok(()));
    assert_eq!(s.load_live_index(5), Ok(true));
    put(&s, "k05", "after");
    let kv = get(&s, "k05", 0).expect("get").expect("k05");
    assert_eq!(kv.version, 4, "3 puts in the snapshot, then this one");
    assert_eq!(
        get(&s, "k35", 0).expect("get"),
        None,
        "only in the stale state"
    );
    assert_eq!(s.check_live_index(), Ok(()));
}
