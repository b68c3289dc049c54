//! Peer mutual TLS from certificate files: members with certificates from the trusted CA form a
//! cluster; a member whose certificate comes from another CA is refused by its peers.

use std::path::Path;
use std::time::Duration;

use keyhold_tests::Cluster;
use keyhold_tests::certs::issue;

use crate::client;

fn tls_flags(dir: &Path, ca: &str, name: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--peer-cert-file".into(),
        p(format!("{name}.crt")),
        "--peer-key-file".into(),
        p(format!("{name}.key")),
        "--peer-trusted-ca-file".into(),
        p(format!("{ca}.crt")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_certificates_from_the_trusted_ca_form_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    issue(dir.path(), "ca", "peer");
    let flags = tls_flags(dir.path(), "ca", "peer");
    let cluster = Cluster::start_each(3, keyhold_tests::cluster::FAST_ELECTION, &[], |_| {
        flags.clone()
    });
    let leader = cluster.wait_leader(None);
    let follower = cluster.others(leader)[0];
    let mut c = client(&cluster.members[follower].endpoint()).await;
    let r = c
        .put("over-mtls", "v", None)
        .await
        .expect("forwarded write");
    crate::wait_revision(&cluster.endpoints(), r.header().expect("header").revision()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    issue(dir.path(), "ca", "peer");
    issue(dir.path(), "rogue-ca", "rogue");
    let (good, rogue) = (
        tls_flags(dir.path(), "ca", "peer"),
        // The rogue member trusts the real CA but presents a certificate the others do not.
        {
            let mut f = tls_flags(dir.path(), "rogue-ca", "rogue");
            f[5] = dir.path().join("ca.crt").display().to_string();
            f
        },
    );
    let mut cluster =
        Cluster::start_unchecked(3, |i| if i == 2 { rogue.clone() } else { good.clone() });
    cluster.members[0].wait_ready();
    cluster.members[1].wait_ready();
    let leader = cluster.wait_leader(Some(2));
    assert_ne!(leader, 2);
    let mut c = client(&cluster.members[leader].endpoint()).await;
    let r = c
        .put("k", "v", None)
        .await
        .expect("the two good members make a quorum");
    let rev = r.header().expect("header").revision();
    // The rogue member never gets the write: the leader cannot verify its certificate when it
    // dials it, and the rogue's own dials are refused for the same reason. Give replication a
    // few heartbeats' chance, then look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = cluster.member_ids();
    let gauge = |remote: u64| {
        format!(
            "etcd_network_active_peers{{Local=\"{:x}\",Remote=\"{:x}\"}}",
            ids[leader], remote
        )
    };
    let good_follower = if leader == 0 { 1 } else { 0 };
    assert_eq!(
        cluster.members[leader].metric(&gauge(ids[good_follower])),
        Some(1.0)
    );
    assert_eq!(cluster.members[leader].metric(&gauge(ids[2])), Some(0.0));
    let mut rc = client(&cluster.members[2].endpoint()).await;
    let seen = rc
        .get(
            "k",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(
        seen, 0,
        "a member with an untrusted certificate received data (revision {rev})"
    );
}
