//! Membership churn under load: add a learner, promote it, remove an old member; learner
//! refusals and etcd's membership errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyhold_tests::cluster::FAST_ELECTION;
use keyhold_tests::{Cluster, NodeProcess, free_port};

use crate::{client, status, wait_revision};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_learner_promote_it_and_remove_an_old_member_under_load() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let eps = cluster.endpoints();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, written, ep) = (stop.clone(), written.clone(), eps[leader].clone());
        tokio::spawn(async move {
            let mut c = client(&ep).await;
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let n = written.load(Ordering::Relaxed);
                if let Ok(r) = c
                    .put(format!("churn/{}", n % 50), n.to_string(), None)
                    .await
                {
                    last = r.header().expect("header").revision();
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
            last
        })
    };

    let mut admin = client(&eps[leader]).await;
    let (client_port, peer_port) = (free_port(), free_port());
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let added = admin
        .member_add(
            [peer_url.clone()],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("member add --learner");
    let new_id = added.member().expect("member").id();
    assert!(added.member().expect("member").is_learner());
    // A second learner is refused (etcd's --max-learners default is 1).
    let (code, msg) = status(
        admin
            .member_add(
                ["http://127.0.0.1:1".to_string()],
                Some(etcd_client::MemberAddOptions::new().with_is_learner()),
            )
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: too many learner members in cluster"
        )
    );
    let (code, msg) = status(admin.member_add([eps_peer(&cluster, 0)], None).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: Peer URLs already exists"
        )
    );

    let mut initial: Vec<String> = cluster
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("m{i}={}", m.peer_url()))
        .collect();
    initial.push(format!("m3={peer_url}"));
    let args = [
        "--name",
        "m3",
        "--initial-cluster",
        &initial.join(","),
        "--initial-cluster-state",
        "existing",
        "--initial-cluster-token",
        &cluster.token,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut learner = NodeProcess::member(client_port, peer_port, args, FAST_ELECTION, &[]);
    learner.spawn_no_wait();
    // The learner serves serializable reads and refuses the rest.
    let mut lc = client(&learner.endpoint()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = lc
            .get(
                "churn/0",
                Some(etcd_client::GetOptions::new().with_serializable()),
            )
            .await;
        if r.as_ref().is_ok_and(|r| r.count() == 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "learner never caught up: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, msg) = status(lc.put("x", "y", None).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: rpc not supported for learner"
        )
    );

    // Promote (retrying while it is not yet in sync), then remove an old follower.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match admin.member_promote(new_id).await {
            Ok(_) => break,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "promote: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let (code, msg) = status(admin.member_promote(new_id).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: can only promote a learner member"
        )
    );
    let ids = cluster.member_ids();
    let removed = cluster.others(leader)[0];
    admin
        .member_remove(ids[removed])
        .await
        .expect("member remove");
    let (code, msg) = status(admin.member_remove(ids[removed]).await);
    assert_eq!(
        (code, msg.as_str()),
        (tonic::Code::NotFound, "etcdserver: member not found")
    );

    let before = written.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Relaxed) < before + 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "load stalled after churn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let last = load.await.expect("load");

    let list = admin.member_list().await.expect("list");
    let mut got: Vec<(u64, bool)> = list
        .members()
        .iter()
        .map(|m| (m.id(), m.is_learner()))
        .collect();
    got.sort_unstable();
    let mut want: Vec<(u64, bool)> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != removed)
        .map(|(_, id)| (*id, false))
        .chain([(new_id, false)])
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
    // The promoted member votes and serves linearizable reads.
    let mut eps_now: Vec<String> = cluster
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != removed)
        .map(|(_, m)| m.endpoint())
        .collect();
    eps_now.push(learner.endpoint());
    wait_revision(&eps_now, last).await;
    let r = lc
        .get("churn/0", None)
        .await
        .expect("linearizable read on the promoted member");
    assert_eq!(r.count(), 1);
}

fn eps_peer(cluster: &Cluster, i: usize) -> String {
    cluster.members[i].peer_url()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_leadership_to_the_chosen_voter() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let target = cluster.others(leader)[0];
    let ids = cluster.member_ids();
    let eps = cluster.endpoints();

    let mut on_follower = client(&eps[target]).await;
    let (code, msg) = status(
        on_follower
            .maintenance_client()
            .move_leader(ids[leader])
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (tonic::Code::FailedPrecondition, "etcdserver: not leader")
    );
    let mut on_leader = client(&eps[leader]).await;
    let (code, msg) = status(on_leader.maintenance_client().move_leader(12345).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: bad leader transferee"
        )
    );

    on_leader
        .maintenance_client()
        .move_leader(ids[target])
        .await
        .expect("move leader");
    let status = on_follower.status().await.expect("status");
    assert_eq!(status.leader(), ids[target], "leadership went elsewhere");
    assert_eq!(cluster.wait_leader(Some(leader)), target);
    // Writes through the old leader go on (forwarded to the new one).
    let r = on_leader.put("after-move", "x", None).await.expect("put");
    wait_revision(&eps, r.header().expect("header").revision()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_add_that_would_lose_quorum_is_refused() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let stopped = cluster.others(leader)[0];
    let ids = cluster.member_ids();
    cluster.members[stopped].kill9();
    // Wait until the leader no longer counts the stopped member as running.
    let gauge = format!(
        "etcd_network_active_peers{{Local=\"{:x}\",Remote=\"{:x}\"}}",
        ids[leader], ids[stopped]
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.members[leader].metric(&gauge) != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "peer still counted as active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admin = client(&cluster.members[leader].endpoint()).await;
    // Four voters need three running; only two run.
    let (code, msg) = status(
        admin
            .member_add([format!("http://127.0.0.1:{}", free_port())], None)
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: re-configuration failed due to not enough started members"
        )
    );
    // A learner does not vote, so it may be added.
    admin
        .member_add(
            [format!("http://127.0.0.1:{}", free_port())],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("learner add");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_update_replaces_peer_urls_with_etcds_errors() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(None);
    let follower = cluster.others(leader)[0];
    // Through a follower: the change is forwarded to the leader.
    let mut admin = client(&cluster.members[follower].endpoint()).await;
    let first = format!("http://127.0.0.1:{}", free_port());
    let added = admin
        .member_add(
            [first],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("add a learner that never starts");
    let id = added.member().expect("member").id();
    let moved = format!("http://127.0.0.1:{}", free_port());
    admin
        .member_update(id, [moved.clone()])
        .await
        .expect("member update");
    let list = admin.member_list().await.expect("list");
    let m = list
        .members()
        .iter()
        .find(|m| m.id() == id)
        .expect("updated member listed");
    assert_eq!(m.peer_urls(), [moved]);
    assert!(m.is_learner());

    let (code, msg) = status(
        admin
            .member_update(id, [cluster.members[leader].peer_url()])
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: Peer URLs already exists"
        )
    );
    let (code, msg) = status(admin.member_update(42, ["http://127.0.0.1:1".into()]).await);
    assert_eq!(
        (code, msg.as_str()),
        (tonic::Code::NotFound, "etcdserver: member not found")
    );
    let (code, msg) = status(admin.member_update(id, ["not a url".into()]).await);
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: given member URLs are invalid"
        )
    );
    admin.member_remove(id).await.expect("remove the learner");
}
