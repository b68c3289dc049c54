//! Maintenance through the proxy: answers name the member that gave them, and MoveLeader
//! reaches the leader whichever member the proxy uses.

use keyhold_tests::Cluster;
use keyhold_tests::proxy::ProxyProcess;

use super::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_through_the_proxy_reaches_the_leader() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let ids = cluster.member_ids();
    let eps = cluster.endpoints();
    let (follower, target) = (cluster.others(leader)[0], cluster.others(leader)[1]);
    // The proxy uses its first endpoint, a follower: relayed there, MoveLeader would be refused.
    let order = [
        eps[follower].clone(),
        eps[leader].clone(),
        eps[target].clone(),
    ];
    let proxy = ProxyProcess::start(&order, &[]);
    let mut c = client(&proxy.endpoint()).await;
    let status = c.status().await.expect("status through the proxy");
    assert_eq!(
        status.header().expect("header").member_id(),
        ids[follower],
        "Status is the member the proxy uses, and its header says which"
    );
    assert_eq!(status.leader(), ids[leader]);
    c.maintenance_client()
        .move_leader(ids[target])
        .await
        .expect("move leader through the proxy");
    assert_eq!(cluster.wait_leader(Some(leader)), target);
    let status = c.status().await.expect("status");
    assert_eq!(status.leader(), ids[target]);
}
