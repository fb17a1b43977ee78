//! Service clusterIP and nodePort allocation: from the configured ranges, requested values
//! honoured when free, conflicts refused with 422, kept across updates, released on delete.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion":"v1","kind":"Service","metadata":{"name":name},"spec":spec})
}

const SVC: &str = "/api/v1/namespaces/default/services";

#[tokio::test]
async fn cluster_ips_come_from_the_range_and_conflicts_are_refused() {
    let s = start_with(|c| c.service_cidr = "10.200.0.0/24".parse().expect("cidr")).await;
    let r = s
        .post(
            SVC,
            &service("a", json!({"selector":{"app":"a"},"ports":[{"port":80}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let ip: std::net::Ipv4Addr = r.body["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .parse()
        .expect("an IPv4");
    let range: ipnet::Ipv4Net = "10.200.0.0/24".parse().expect("cidr");
    assert!(
        range.contains(&ip) && ip != "10.200.0.1".parse::<std::net::Ipv4Addr>().expect("ip"),
        "{ip}"
    );
    assert_eq!(r.body["spec"]["type"], "ClusterIP");
    assert_eq!(r.body["spec"]["ports"][0]["protocol"], "TCP");

    // The same IP requested again: 422.
    let r = s
        .post(
            SVC,
            &service(
                "b",
                json!({"clusterIP": ip.to_string(),"ports":[{"port":80}]}),
            ),
        )
        .await;
    assert_status(&r, 422, "Invalid");
    assert!(
        r.text.contains("provided IP is already allocated"),
        "{}",
        r.text
    );
    // Outside the range: 422.
    let r = s
        .post(
            SVC,
            &service(
                "c",
                json!({"clusterIP":"192.168.1.1","ports":[{"port":80}]}),
            ),
        )
        .await;
    assert_status(&r, 422, "Invalid");
    // A free one inside the range is honoured.
    let r = s
        .post(
            SVC,
            &service(
                "d",
                json!({"clusterIP":"10.200.0.77","ports":[{"port":80}]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["spec"]["clusterIP"], "10.200.0.77");
    // Headless.
    let r = s
        .post(
            SVC,
            &service("h", json!({"clusterIP":"None","ports":[{"port":80}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["spec"]["clusterIP"], "None");

    // An update without clusterIP (a client re-apply) keeps the allocated one.
    let r = s
        .patch(
            &format!("{SVC}/a"),
            "application/merge-patch+json",
            r#"{"spec":{"clusterIP":null,"clusterIPs":null,"ports":[{"port":81}]}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["clusterIP"], ip.to_string());

    // Released on delete: the IP can be requested again.
    assert_eq!(s.delete(&format!("{SVC}/a")).await.status, StatusCode::OK);
    let r = s
        .post(
            SVC,
            &service(
                "e",
                json!({"clusterIP": ip.to_string(),"ports":[{"port":80}]}),
            ),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "the IP of a deleted Service is free again: {}",
        r.text
    );
}

#[tokio::test]
async fn node_ports_come_from_the_range_and_are_released() {
    let s = start_with(|c| c.node_port_range = 31000..=31002).await;
    let r = s
        .post(
            SVC,
            &service(
                "np",
                json!({"type":"NodePort","ports":[{"port":80,"name":"a"},{"port":81,"name":"b"}]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let ports: Vec<i64> = r.body["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["nodePort"].as_i64())
        .collect();
    assert_eq!(ports.len(), 2);
    assert!(
        ports.iter().all(|p| (31000..=31002).contains(p)) && ports[0] != ports[1],
        "{ports:?}"
    );

    // A requested port already taken: 422; a free one: honoured.
    let r = s
        .post(
            SVC,
            &service(
                "np2",
                json!({"type":"NodePort","ports":[{"port":80,"nodePort":ports[0]}]}),
            ),
        )
        .await;
    assert_status(&r, 422, "Invalid");
    let free = (31000..=31002)
        .find(|p| !ports.contains(p))
        .expect("one left");
    let r = s
        .post(
            SVC,
            &service(
                "np3",
                json!({"type":"NodePort","ports":[{"port":80,"nodePort":free}]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // The range is now full.
    let r = s
        .post(
            SVC,
            &service("np4", json!({"type":"NodePort","ports":[{"port":80}]})),
        )
        .await;
    assert!(
        r.status.is_client_error() || r.status.is_server_error(),
        "{}",
        r.text
    );
    assert_eq!(r.body["kind"], "Status");

    // Changing the type to ClusterIP releases the node ports.
    let r = s
        .patch(
            &format!("{SVC}/np"),
            "application/merge-patch+json",
            r#"{"spec":{"type":"ClusterIP"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.body["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .all(|p| p.get("nodePort").is_none()),
        "{}",
        r.text
    );
    let r = s
        .post(
            SVC,
            &service(
                "np5",
                json!({"type":"NodePort","ports":[{"port":80,"nodePort":ports[0]}]}),
            ),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "released on type change: {}",
        r.text
    );
    // And deleting releases too.
    assert_eq!(s.delete(&format!("{SVC}/np3")).await.status, StatusCode::OK);
    let r = s
        .post(
            SVC,
            &service(
                "np6",
                json!({"type":"NodePort","ports":[{"port":80,"nodePort":free}]}),
            ),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "released on delete: {}",
        r.text
    );
}

#[tokio::test]
async fn a_replace_without_node_ports_keeps_the_allocated_ones() {
    let s = start().await;
    let r = s.post(SVC, &service("keep", json!({"type":"NodePort","selector":{"app":"k"},"ports":[{"name":"http","port":80}]}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let node_port = r.body["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    let cluster_ip = r.body["spec"]["clusterIP"].clone();
    // `kubectl replace -f` of the original manifest: no clusterIP, no nodePort, no resourceVersion.
    let r = s
        .put(&format!("{SVC}/keep"), &service("keep", json!({"type":"NodePort","selector":{"app":"k"},"ports":[{"name":"http","port":80}]})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["spec"]["ports"][0]["nodePort"], node_port,
        "{}",
        r.text
    );
    assert_eq!(r.body["spec"]["clusterIP"], cluster_ip);
    // Changing an allocated clusterIP is refused (it is immutable), and nothing changes.
    let r = s
        .patch(
            &format!("{SVC}/keep"),
            "application/merge-patch+json",
            r#"{"spec":{"clusterIP":"10.96.0.250","clusterIPs":["10.96.0.250"]}}"#,
        )
        .await;
    assert_status(&r, 422, "Invalid");
    assert_eq!(
        s.get(&format!("{SVC}/keep")).await.body["spec"]["clusterIP"],
        cluster_ip
    );
}

#[tokio::test]
async fn concurrent_creates_never_share_an_ip() {
    let s = std::sync::Arc::new(
        start_with(|c| c.service_cidr = "10.201.0.0/28".parse().expect("cidr")).await,
    );
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .post(
                    SVC,
                    &service(&format!("c{i}"), json!({"ports":[{"port":80}]})),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            r.body["spec"]["clusterIP"]
                .as_str()
                .expect("ip")
                .to_string()
        }));
    }
    let mut ips = std::collections::BTreeSet::new();
    for t in tasks {
        assert!(
            ips.insert(t.await.expect("task")),
            "an IP was handed out twice: {ips:?}"
        );
    }
    assert_eq!(ips.len(), 10);
}

/// A ClusterIP Service's update skips reading the other Services (nothing to allocate); one
/// that turns it into a NodePort Service must still see them.
#[tokio::test]
async fn a_clusterip_service_turned_nodeport_still_sees_the_others_ports() {
    let s = start().await;
    let r = s
        .post(
            SVC,
            &service("holder", json!({"type":"NodePort","ports":[{"port":80}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let held = r.body["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    let r = s
        .post(SVC, &service("plain", json!({"ports":[{"port":80}]})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let ip = r.body["spec"]["clusterIP"].clone();
    // A plain update keeps the address.
    let r = s
        .put(
            &format!("{SVC}/plain"),
            &service("plain", json!({"ports":[{"port":81}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["clusterIP"], ip);
    // Asking for the held port is refused, and nothing changes.
    let r = s
        .patch(
            &format!("{SVC}/plain"),
            "application/merge-patch+json",
            &json!({"spec":{"type":"NodePort","ports":[{"port":81,"nodePort":held}]}}).to_string(),
        )
        .await;
    assert_status(&r, 422, "Invalid");
    assert_eq!(
        s.get(&format!("{SVC}/plain")).await.body["spec"]["type"],
        "ClusterIP"
    );
    // Without a request it gets another port.
    let r = s
        .patch(
            &format!("{SVC}/plain"),
            "application/merge-patch+json",
            r#"{"spec":{"type":"NodePort"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let got = r.body["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    assert_ne!(got, held);
    assert_eq!(r.body["spec"]["clusterIP"], ip);
}
