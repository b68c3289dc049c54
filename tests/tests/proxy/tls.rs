//! TLS on both sides of the proxy: clients reach proxy A over mutual TLS (etcdctl with the CA
//! and a client certificate); proxy B reaches A as its member over mutual TLS (`https://`
//! endpoint, `--cacert`, `--cert`/`--key`), so A plays the TLS member and B the TLS client.

use std::path::Path;

use keyhold_tests::certs::issue;
use keyhold_tests::proxy::ProxyProcess;
use keyhold_tests::{NodeProcess, etcdctl, free_port};

use super::client;

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// etcdctl against `endpoint` with the given TLS files (`None`: that flag left out).
fn etcdctl_tls(
    endpoint: &str,
    cacert: &str,
    identity: Option<(&str, &str)>,
    args: &[&str],
) -> std::process::Output {
    let mut all = vec![format!("--cacert={cacert}")];
    if let Some((cert, key)) = identity {
        all.push(format!("--cert={cert}"));
        all.push(format!("--key={key}"));
    }
    all.push("--dial-timeout=2s".into());
    all.push("--command-timeout=3s".into());
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    etcdctl(endpoint, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_clients_and_to_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    issue(d, "ca", "server");
    issue(d, "ca", "client");
    issue(d, "rogue-ca", "rogue");
    let (ca, rogue_ca) = (file(d, "ca.crt"), file(d, "rogue-ca.crt"));
    let client_id = (file(d, "client.crt"), file(d, "client.key"));
    let client_id = (client_id.0.as_str(), client_id.1.as_str());

    let node = NodeProcess::start();
    let member = node.client.to_string();
    let (cert, key) = (file(d, "server.crt"), file(d, "server.key"));
    let metrics = format!("http://127.0.0.1:{}", free_port());
    let a = ProxyProcess::start(
        std::slice::from_ref(&member),
        &[
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--metrics-addr",
            &metrics,
        ],
    );
    let a_url = format!("https://{}", a.endpoint());

    // Clients with a certificate from the trusted CA get through; others do not.
    let put = etcdctl_tls(&a_url, &ca, Some(client_id), &["put", "k", "over-tls"]);
    assert!(
        put.status.success(),
        "put over mutual TLS: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = etcdctl_tls(
        &a_url,
        &ca,
        Some(client_id),
        &["get", "k", "--print-value-only"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "over-tls");
    for (what, out) in [
        (
            "no client certificate",
            etcdctl_tls(&a_url, &ca, None, &["get", "k"]),
        ),
        (
            "a certificate from another CA",
            etcdctl_tls(
                &a_url,
                &ca,
                Some((&file(d, "rogue.crt"), &file(d, "rogue.key"))),
                &["get", "k"],
            ),
        ),
        (
            "a client that does not trust the proxy's CA",
            etcdctl_tls(&a_url, &rogue_ca, Some(client_id), &["get", "k"]),
        ),
        (
            "plain text",
            etcdctl(
                &format!("http://{}", a.endpoint()),
                &["--dial-timeout=2s", "--command-timeout=3s", "get", "k"],
            ),
        ),
    ] {
        assert!(!out.status.success(), "{what} was let through");
    }

    // Proxy B uses A as its member over TLS: reads, writes and a watch go through both.
    let b = ProxyProcess::start(
        std::slice::from_ref(&a_url),
        &["--cacert", &ca, "--cert", client_id.0, "--key", client_id.1],
    );
    let mut c = client(&b.endpoint()).await;
    let got = c.get("k", None).await.expect("read through B and A");
    assert_eq!(got.kvs()[0].value(), b"over-tls");
    let mut watch = c.watch("w", None).await.expect("watch through B and A");
    assert!(
        watch
            .message()
            .await
            .expect("ok")
            .expect("created")
            .created()
    );
    c.put("w", "1", None).await.expect("write through B and A");
    let event = watch.message().await.expect("ok").expect("event");
    assert_eq!(event.events()[0].kv().expect("kv").value(), b"1");
    let direct = etcdctl(&member, &["get", "w", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "1");

    // A proxy that does not trust A's certificate never reaches it.
    let wrong = ProxyProcess::start_unhealthy(
        std::slice::from_ref(&a_url),
        &[
            "--cacert",
            &rogue_ca,
            "--cert",
            client_id.0,
            "--key",
            client_id.1,
        ],
    );
    let mut w = client(&wrong.endpoint()).await;
    let (code, _) = keyhold_tests::grpc_status(w.get("k", None).await);
    assert_eq!(code, tonic::Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls_serves_clients_that_skip_verification() {
    let node = NodeProcess::start();
    let metrics = format!("http://127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(
        &[node.client.to_string()],
        &["--auto-tls", "--metrics-addr", &metrics],
    );
    let url = format!("https://{}", proxy.endpoint());
    let skip = [
        "--insecure-transport=false",
        "--insecure-skip-tls-verify=true",
    ];
    let put = etcdctl(&url, &[&skip[..], &["put", "k", "auto"]].concat());
    assert!(
        put.status.success(),
        "put over auto TLS: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = etcdctl(
        &url,
        &[&skip[..], &["get", "k", "--print-value-only"]].concat(),
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "auto");
    // A client that verifies cannot: the certificate is self-signed.
    let verifying = etcdctl(
        &url,
        &[
            "--insecure-transport=false",
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "get",
            "k",
        ],
    );
    assert!(
        !verifying.status.success(),
        "a self-signed certificate was trusted"
    );
}
