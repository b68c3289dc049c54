//! Debian's `etcdctl` 3.4 against keyhold-node: the same commands an operator types.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyhold_tests::{NodeProcess, etcdctl, etcdctl_stdin};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kv_txn_and_errors() {
    let node = NodeProcess::start();
    let ep = node.endpoint();
    assert_eq!(ok(etcdctl(&ep, &["put", "foo", "bar"])), "OK\n");
    assert_eq!(ok(etcdctl(&ep, &["put", "foo2", "baz"])), "OK\n");
    assert_eq!(ok(etcdctl(&ep, &["get", "foo"])), "foo\nbar\n");
    assert_eq!(
        ok(etcdctl(&ep, &["get", "foo", "--prefix", "--keys-only"])),
        "foo\n\nfoo2\n\n"
    );
    let fields = ok(etcdctl(&ep, &["get", "foo", "--prefix", "-w", "fields"]));
    assert!(fields.lines().any(|l| l == "\"Count\" : 2"), "{fields}");
    let json = ok(etcdctl(&ep, &["get", "foo", "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["kvs"][0]["mod_revision"], 2);
    let txn = "value(\"foo\") = \"bar\"\n\nput foo qux\n\nput foo nope\n\n";
    let out = ok(etcdctl_stdin(&ep, &["txn"], txn));
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert_eq!(
        ok(etcdctl(&ep, &["get", "foo", "--print-value-only"])),
        "qux\n"
    );
    assert_eq!(ok(etcdctl(&ep, &["del", "foo", "--prefix"])), "2\n");
    let out = etcdctl(&ep, &["compact", "100"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("etcdserver: mvcc: required revision is a future revision")
    );
    ok(etcdctl(&ep, &["compact", "3"]));
    let out = etcdctl(&ep, &["get", "foo", "--rev", "2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("etcdserver: mvcc: required revision has been compacted")
    );
}

#[test]
fn maintenance_commands() {
    let node = NodeProcess::start();
    let ep = node.endpoint();
    ok(etcdctl(&ep, &["put", "a", "1"]));
    let status = ok(etcdctl(&ep, &["endpoint", "status", "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(v[0]["Status"]["version"], crate::expected_version());
    let health = etcdctl(&ep, &["endpoint", "health"]);
    assert!(health.status.success());
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("is healthy"),
        "{health:?}"
    );
    let hash = ok(etcdctl(&ep, &["endpoint", "hashkv", "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&hash).expect("json");
    assert!(v[0]["HashKV"]["hash"].as_u64().is_some());
    assert_eq!(ok(etcdctl(&ep, &["alarm", "list"])), "");
    assert!(ok(etcdctl(&ep, &["defrag"])).contains("Finished defragmenting"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("snap.db");
    let out = ok(etcdctl(
        &ep,
        &["snapshot", "save", file.to_str().expect("utf8")],
    ));
    assert!(out.contains("Snapshot saved"), "{out}");
    assert!(std::fs::metadata(&file).expect("snapshot file").len() > 0);
    let members = ok(etcdctl(&ep, &["member", "list"]));
    assert!(members.contains(&format!("http://{ep}")), "{members}");
    let lease = ok(etcdctl(&ep, &["lease", "grant", "30"]));
    let id = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    ok(etcdctl(&ep, &["put", "leased", "v", "--lease", &id]));
    assert!(ok(etcdctl(&ep, &["lease", "timetolive", &id, "--keys"])).contains("leased"));
    assert!(ok(etcdctl(&ep, &["lease", "list"])).contains(&id));
    ok(etcdctl(&ep, &["lease", "revoke", &id]));
    assert_eq!(ok(etcdctl(&ep, &["get", "leased"])), "");
}

#[test]
fn lock_and_elect_work_over_kv_lease_and_watch() {
    let node = NodeProcess::start();
    let ep = node.endpoint();
    // `etcdctl lock NAME CMD` runs CMD while holding the lock.
    assert_eq!(
        ok(etcdctl(&ep, &["lock", "mylock", "echo", "locked"])),
        "locked\n"
    );
    // A second locker waits until the first releases.
    let mut holder = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            format!("--endpoints={ep}").as_str(),
            "lock",
            "mylock",
            "sleep",
            "2",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok(etcdctl(&ep, &["get", "mylock", "--prefix", "--keys-only"])).is_empty() {
        assert!(Instant::now() < deadline, "holder never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    assert_eq!(
        ok(etcdctl(&ep, &["lock", "mylock", "echo", "second"])),
        "second\n"
    );
    assert!(holder.wait().expect("holder").success());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the second locker waited for the first"
    );
    // `etcdctl elect NAME PROPOSAL` campaigns and stays leader until killed.
    let mut candidate = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            format!("--endpoints={ep}").as_str(),
            "elect",
            "myelection",
            "p1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn candidate");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leader = ok(etcdctl(
            &ep,
            &["get", "myelection", "--prefix", "--print-value-only"],
        ));
        if leader == "p1\n" {
            break;
        }
        assert!(Instant::now() < deadline, "candidate never became leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = candidate.kill();
    let _ = candidate.wait();
}
