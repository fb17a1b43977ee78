//! A watch whose client goes away leaves nothing running on the server.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_whose_clients_leave_leave_no_tasks_behind() {
    let s = start().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Settle the start-up work, then take the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = metrics.num_alive_tasks();

    // Each watch on its own client, so dropping the client closes its connection.
    let mut watches = Vec::new();
    for i in 0..20 {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(s.ca_pem.as_bytes()).expect("ca"))
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let path = if i % 2 == 0 {
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&allowWatchBookmarks=true"
        } else {
            "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
        };
        let resp = client
            .request(Method::GET, s.url(path))
            .bearer_auth(&s.token)
            .send()
            .await
            .expect("watch");
        assert!(resp.status().is_success());
        watches.push((client, resp));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = metrics.num_alive_tasks();
    assert!(
        during >= baseline + 20,
        "20 open watches must show as tasks (baseline {baseline}, now {during})"
    );

    drop(watches);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = metrics.num_alive_tasks();
        if now <= baseline + 2 {
            eprintln!("alive tasks: baseline {baseline}, with 20 watches {during}, after {now}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks still alive 20 s after the clients left: baseline {baseline}, during {during}, now {now}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
