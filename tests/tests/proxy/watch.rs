//! Watch coalescing through one proxy.

use std::collections::HashMap;
use std::time::Duration;

use keyhold_proto::etcdserverpb::watch_client::WatchClient;
use keyhold_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
use keyhold_tests::NodeProcess;
use keyhold_tests::proxy::ProxyProcess;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::client;

const STREAMS: usize = 100;
const WATCHERS_PER_STREAM: usize = 100;
const EVENTS: usize = 5;
const WAIT: Duration = Duration::from_secs(60);

fn create(key: &[u8], watch_id: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.to_vec(),
                watch_id,
                ..Default::default()
            },
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_on_one_key_share_one_upstream_watch() {
    let node = NodeProcess::start();
    let proxy = ProxyProcess::start(&[node.client.to_string()], &[]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.endpoint()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for s in 0..STREAMS {
        let (tx, rx) = mpsc::channel(WATCHERS_PER_STREAM);
        for w in 0..WATCHERS_PER_STREAM {
            // Client-chosen IDs, distinct per stream, must come back as chosen.
            let id = (s * WATCHERS_PER_STREAM + w) as i64 + 1;
            tx.send(create(b"hot", id)).await.expect("queue create");
        }
        let responses = WatchClient::new(channel.clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        senders.push(tx);
        streams.push(responses);
    }
    for s in &mut streams {
        for _ in 0..WATCHERS_PER_STREAM {
            let r = tokio::time::timeout(WAIT, s.next())
                .await
                .expect("created in time")
                .expect("open")
                .expect("ok");
            assert!(r.created && !r.canceled, "{r:?}");
        }
    }
    assert_eq!(proxy.metric("keyhold_proxy_watchers"), Some(10_000.0));
    assert_eq!(
        proxy.metric("keyhold_proxy_upstream_watches"),
        Some(1.0),
        "10,000 watchers of one key, one upstream watch"
    );

    // Every stream is read concurrently, as a real client would (h2 refuses to buffer
    // unlimited small frames for streams nobody reads).
    let readers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(s, mut stream)| {
            tokio::spawn(async move {
                let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
                while seen.values().map(Vec::len).sum::<usize>() < WATCHERS_PER_STREAM * EVENTS {
                    let r = tokio::time::timeout(WAIT, stream.next())
                        .await
                        .expect("events in time")
                        .expect("open")
                        .expect("ok");
                    let first = (s * WATCHERS_PER_STREAM) as i64 + 1;
                    assert!(
                        (first..first + WATCHERS_PER_STREAM as i64).contains(&r.watch_id),
                        "watch id {} not one this stream chose",
                        r.watch_id
                    );
                    let revs = seen.entry(r.watch_id).or_default();
                    revs.extend(
                        r.events
                            .iter()
                            .map(|e| e.kv.as_ref().expect("kv").mod_revision),
                    );
                }
                seen
            })
        })
        .collect();
    let mut direct = client(&node.client.to_string()).await;
    let mut revisions = Vec::new();
    for i in 0..EVENTS {
        let r = direct.put("hot", format!("v{i}"), None).await.expect("put");
        revisions.push(r.header().expect("header").revision());
    }
    for reader in readers {
        for (id, revs) in reader.await.expect("reader") {
            assert_eq!(revs, revisions, "watcher {id}: every event, in order, once");
        }
    }
    drop(senders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_watcher_catches_up_then_joins_without_gap_or_duplicate() {
    let node = NodeProcess::start();
    let proxy = ProxyProcess::start(&[node.client.to_string()], &[]);
    let mut c = client(&proxy.endpoint()).await;
    let mut live = c.watch("k", None).await.expect("watch");
    assert!(
        live.message()
            .await
            .expect("ok")
            .expect("created")
            .created()
    );
    let mut revisions = Vec::new();
    for i in 0..10 {
        let r = c.put("k", format!("{i}"), None).await.expect("put");
        revisions.push(r.header().expect("header").revision());
    }
    // Starts 6 revisions back while the shared watch is ahead: replay, then join.
    let from = revisions[4];
    let opts = etcd_client::WatchOptions::new().with_start_revision(from);
    let mut late = c.watch("k", Some(opts)).await.expect("watch");
    assert!(
        late.message()
            .await
            .expect("ok")
            .expect("created")
            .created()
    );
    for i in 10..15 {
        let r = c.put("k", format!("{i}"), None).await.expect("put");
        revisions.push(r.header().expect("header").revision());
    }
    let want: Vec<i64> = revisions.iter().copied().filter(|&r| r >= from).collect();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let r = tokio::time::timeout(WAIT, late.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("msg");
        got.extend(
            r.events()
                .iter()
                .map(|e| e.kv().expect("kv").mod_revision()),
        );
    }
    assert_eq!(got, want);
    assert_eq!(
        proxy.metric("keyhold_proxy_upstream_watches"),
        Some(1.0),
        "the late watcher shares the group's upstream watch after its catch-up"
    );
}
