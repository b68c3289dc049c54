//! Peer mutual TLS from certificate files: members with certificates from the trusted CA form a
//! cluster; a member whose certificate comes from another CA is refused by its peers.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyhold_tests::Cluster;

use crate::client;

/// Makes `<name>.crt`/`<name>.key` (EC P-256, SAN 127.0.0.1, server and client auth) signed by
/// the CA `<ca>.crt`/`<ca>.key` in `dir`, creating the CA if needed (openssl CLI).
fn issue(dir: &Path, ca: &str, name: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !dir.join(format!("{ca}.crt")).exists() {
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN={ca}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-subj", &subj, "-days", "2"]);
        run(&args);
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write ext");
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=keyhold-peer"]);
    run(&args);
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

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
