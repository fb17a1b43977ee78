//! The serving certificate: signed by the written CA, valid for localhost, 127.0.0.1 and the
//! extra names asked for, also when those change between starts; plain HTTP is not served.

use std::net::SocketAddr;

use reqwest::StatusCode;

fn client_for(ca_pem: &str, name: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .tls_built_in_root_certs(false)
        .resolve(name, addr)
        .build()
        .expect("client")
}

async fn healthz(client: &reqwest::Client, name: &str, port: u16) -> Result<StatusCode, String> {
    client
        .get(format!("https://{name}:{port}/healthz"))
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn the_certificate_covers_loopback_names_and_extra_sans_across_restarts() {
    let dir = tempfile::tempdir().expect("data dir");
    let config = |sans: &[&str]| {
        let mut c = skiff_apiserver::ServerConfig::new(dir.path().to_path_buf());
        c.bind = "127.0.0.1:0".parse().expect("addr");
        c.extra_sans = sans.iter().map(|s| s.to_string()).collect();
        c
    };
    let server = skiff_apiserver::start(config(&["skiff-one.example.test"]))
        .await
        .expect("start");
    let (addr, ca) = (server.addr, server.ca_pem.clone());
    for name in ["localhost", "skiff-one.example.test"] {
        let r = healthz(&client_for(&ca, name, addr), name, addr.port()).await;
        assert_eq!(r, Ok(StatusCode::OK), "{name}");
    }
    let r = healthz(
        &client_for(&ca, "127.0.0.1", addr),
        "127.0.0.1",
        addr.port(),
    )
    .await;
    assert_eq!(r, Ok(StatusCode::OK));
    // A name that is not in the certificate is refused by the client.
    let r = healthz(
        &client_for(&ca, "not-in-cert.example.test", addr),
        "not-in-cert.example.test",
        addr.port(),
    )
    .await;
    assert!(
        r.is_err(),
        "a name outside the SANs must fail verification: {r:?}"
    );
    // Plain HTTP gets no API answer.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/v1/namespaces",
            addr.port()
        ))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()),
        "plain HTTP must not be served"
    );
    server.stop().await;

    // Restart with another extra name: the CA stays, the new name is served.
    let server = skiff_apiserver::start(config(&["skiff-two.example.test"]))
        .await
        .expect("restart");
    assert_eq!(server.ca_pem, ca);
    let addr = server.addr;
    let r = healthz(
        &client_for(&ca, "skiff-two.example.test", addr),
        "skiff-two.example.test",
        addr.port(),
    )
    .await;
    assert_eq!(r, Ok(StatusCode::OK));
    server.stop().await;
}
