//! Benchmark helper: opens N idle watchers on one key through an endpoint, prints `ready` once
//! every watcher is created, then holds them until killed (used to measure a proxy's memory
//! per idle watcher, `scripts/bench/proxy`).
//!
//! usage: idle-watchers <host:port> <watchers> [streams]

use keyhold_proto::etcdserverpb::watch_client::WatchClient;
use keyhold_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, watch_request};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(endpoint), Some(total)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: idle-watchers <host:port> <watchers> [streams]");
        std::process::exit(2);
    };
    let total: usize = total;
    let streams: usize = args
        .get(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
        .max(1);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut held = Vec::new();
    for s in 0..streams {
        let n = total / streams + usize::from(s < total % streams);
        let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
        for _ in 0..n {
            let create = WatchCreateRequest {
                key: b"idle-watchers".to_vec(),
                ..Default::default()
            };
            let req = WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            };
            tx.send(req).await.expect("queue");
        }
        let mut responses = WatchClient::new(channel.clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        for _ in 0..n {
            let r = responses.next().await.expect("open").expect("ok");
            assert!(r.created && !r.canceled, "{r:?}");
        }
        held.push((tx, responses));
    }
    println!("ready {total}");
    std::future::pending::<()>().await;
}
