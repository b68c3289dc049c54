//! Watch: live events, history replay, prev_kv, filters, compaction cancel, progress,
//! client-chosen watch IDs.

use std::time::Duration;

use etcd_client::{EventType, WatchFilterType, WatchOptions, WatchResponse, WatchStream};
use keyhold_tests::NodeProcess;

use crate::client;

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch response in time")
        .expect("stream ok")
        .expect("stream open")
}

/// Collects events until `n` have arrived; returns (type, key, value, mod_revision).
async fn events(stream: &mut WatchStream, n: usize) -> Vec<(EventType, String, String, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = next(stream).await;
        for e in r.events() {
            let kv = e.kv().expect("kv");
            out.push((
                e.event_type(),
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn live_events_in_order_with_prev_kv() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let mut w = c
        .watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .expect("watch");
    let created = next(&mut w).await;
    assert!(created.created());
    assert_eq!(created.watch_id(), 0, "auto-assigned ids start at 0");
    c.put("w/a", "1", None).await.expect("put");
    c.put("w/a", "2", None).await.expect("put");
    c.put("other", "x", None).await.expect("put");
    c.delete("w/a", None).await.expect("delete");
    let got = events(&mut w, 3).await;
    assert_eq!(
        got,
        vec![
            (EventType::Put, "w/a".into(), "1".into(), 2),
            (EventType::Put, "w/a".into(), "2".into(), 3),
            (EventType::Delete, "w/a".into(), String::new(), 5),
        ]
    );
    // prev_kv on the second put and the delete.
    c.put("w/b", "x", None).await.expect("put");
    c.put("w/b", "y", None).await.expect("put");
    let r = loop {
        let r = next(&mut w).await;
        if r.events()
            .iter()
            .any(|e| e.kv().is_some_and(|kv| kv.value() == b"y"))
        {
            break r;
        }
    };
    let prev = r.events()[0].prev_kv().expect("prev_kv");
    assert_eq!(prev.value(), b"x");
}

#[tokio::test]
async fn history_replay_filters_and_watch_ids() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    for i in 0..5 {
        c.put("h", format!("v{i}"), None).await.expect("put"); // revisions 2..=6
    }
    c.delete("h", None).await.expect("delete"); // 7
    let opts = WatchOptions::new().with_start_revision(3).with_watch_id(42);
    let mut w = c.watch("h", Some(opts)).await.expect("watch");
    let created = next(&mut w).await;
    assert_eq!((created.created(), created.watch_id()), (true, 42));
    let got = events(&mut w, 5).await;
    let revs: Vec<i64> = got.iter().map(|e| e.3).collect();
    assert_eq!(
        revs,
        [3, 4, 5, 6, 7],
        "replay from revision 3, no gap, no duplicate"
    );
    // NOPUT filter on the same stream, with a duplicate id refused.
    w.watch("h", Some(WatchOptions::new().with_watch_id(42)))
        .await
        .expect("send");
    let dup = next(&mut w).await;
    assert!(dup.canceled());
    assert_eq!(
        dup.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
    let opts = WatchOptions::new()
        .with_watch_id(7)
        .with_filters([WatchFilterType::NoPut]);
    w.watch("f", Some(opts)).await.expect("send");
    assert_eq!(next(&mut w).await.watch_id(), 7);
    c.put("f", "1", None).await.expect("put");
    c.delete("f", None).await.expect("delete");
    let r = next(&mut w).await;
    assert_eq!(r.watch_id(), 7);
    assert_eq!(r.events().len(), 1);
    assert_eq!(
        r.events()[0].event_type(),
        EventType::Delete,
        "NOPUT drops puts"
    );
}

#[tokio::test]
async fn compacted_start_revision_cancels_with_compact_revision() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    for i in 0..4 {
        c.put("c", format!("{i}"), None).await.expect("put"); // 2..=5
    }
    c.compact(4, None).await.expect("compact");
    let mut w = c
        .watch("c", Some(WatchOptions::new().with_start_revision(2)))
        .await
        .expect("watch");
    assert!(next(&mut w).await.created());
    let r = next(&mut w).await;
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 4);
    // Starting exactly at the compact revision is allowed.
    let mut w = c
        .watch("c", Some(WatchOptions::new().with_start_revision(4)))
        .await
        .expect("watch");
    assert!(next(&mut w).await.created());
    let revs: Vec<i64> = events(&mut w, 2).await.iter().map(|e| e.3).collect();
    assert_eq!(revs, [4, 5]);
}

#[tokio::test]
async fn progress_request_reports_the_current_revision() {
    let node = NodeProcess::start();
    let mut c = client(&node).await;
    c.put("x", "1", None).await.expect("put");
    c.put("x", "2", None).await.expect("put");
    let mut w = c.watch("p", None).await.expect("watch");
    assert!(next(&mut w).await.created());
    w.request_progress().await.expect("progress");
    let r = next(&mut w).await;
    assert!(r.events().is_empty());
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.header().expect("header").revision(), 3);
}

#[tokio::test]
async fn progress_notify_fires_on_idle_watchers() {
    let node = NodeProcess::start_with(&["--watch-progress-notify-interval", "200ms"]);
    let mut c = client(&node).await;
    let mut w = c
        .watch("idle", Some(WatchOptions::new().with_progress_notify()))
        .await
        .expect("watch");
    assert!(next(&mut w).await.created());
    c.put("elsewhere", "1", None).await.expect("put");
    let r = loop {
        let r = next(&mut w).await;
        if r.header().expect("h").revision() == 2 {
            break r;
        }
    };
    assert!(
        r.events().is_empty(),
        "a progress notification carries no events"
    );
    assert_eq!(r.watch_id(), 0);
}

#[tokio::test]
async fn large_catch_up_responses_are_fragmented_when_asked() {
    use keyhold_proto::etcdserverpb::watch_client::WatchClient;
    use keyhold_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};

    let node = NodeProcess::start();
    let mut c = client(&node).await;
    let value = vec![b'f'; 1024 * 1024];
    for i in 0..3 {
        c.put(format!("frag/{i}"), value.clone(), None)
            .await
            .expect("put"); // revisions 2..=4
    }
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"frag/".to_vec(),
                range_end: b"frag0".to_vec(),
                start_revision: 2,
                fragment: true,
                ..Default::default()
            },
        )),
    };
    let mut raw = WatchClient::connect(format!("http://{}", node.endpoint()))
        .await
        .expect("connect")
        .max_decoding_message_size(64 * 1024 * 1024);
    let requests =
        futures::StreamExt::chain(futures::stream::iter([create]), futures::stream::pending());
    let mut responses = raw.watch(requests).await.expect("watch").into_inner();
    let created = responses.message().await.expect("ok").expect("created");
    assert!(created.created);
    let mut parts = Vec::new();
    loop {
        let r = tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("msg");
        let last = !r.fragment;
        parts.push(r);
        if last {
            break;
        }
    }
    assert!(
        parts.len() >= 2,
        "3 MiB of events over a 2 MiB limit come in fragments"
    );
    let events: usize = parts.iter().map(|p| p.events.len()).sum();
    assert_eq!(events, 3);
    assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
}
