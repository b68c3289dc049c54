//! `--resolver-prefix`: proxies register themselves; MemberList through any lists them all.

use std::time::{Duration, Instant};

use keyhold_tests::proxy::ProxyProcess;
use keyhold_tests::{NodeProcess, free_port};

use super::client;

async fn listed(endpoint: &str) -> Vec<String> {
    let mut c = client(endpoint).await;
    let mut urls: Vec<String> = c
        .member_list()
        .await
        .expect("member list")
        .members()
        .iter()
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    urls.sort();
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_proxies_list_each_other_and_a_dead_one_drops_out() {
    let node = NodeProcess::start();
    let member = node.client.to_string();
    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut proxies: Vec<ProxyProcess> = ports
        .iter()
        .zip(&urls)
        .map(|(&port, url)| {
            ProxyProcess::start_on(
                port,
                std::slice::from_ref(&member),
                &[
                    "--resolver-prefix",
                    "proxies",
                    "--resolver-ttl",
                    "2",
                    "--advertise-client-url",
                    url,
                ],
            )
        })
        .collect();
    let mut want = urls.clone();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(&proxies[0].endpoint()).await != want {
        assert!(Instant::now() < deadline, "both proxies registered in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed(&proxies[1].endpoint()).await, want);

    // A killed proxy's registration lease runs out: it leaves the list within about its TTL.
    let killed = Instant::now();
    proxies[1].kill9();
    while listed(&proxies[0].endpoint()).await != [urls[0].clone()] {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the dead proxy still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("dead proxy unlisted after {:?}", killed.elapsed());
}
