//! attach_pod / detach_pod: a process that did not load the datapath (the CNI plugin) attaches
//! the pinned `from_pod` program to pod veths and registers the pods, with real packets.

use std::net::SocketAddr;

use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges, tcp_ask};
use skiff_datapath::{Datapath, EndpointSpec, attach_pod, detach_pod, pod};

#[test]
fn pinned_from_pod_attaches_registers_and_detaches() {
    if !require_privileges("pinned_from_pod_attaches_registers_and_detaches") {
        return;
    }
    let lab = Lab::new("podatt", 2);
    // Load and drop: the programs and maps live on through their pins, as when the agent loaded
    // them and the CNI plugin (another process) comes later.
    drop(Datapath::load(&lab.pin_dir).expect("loading the datapath"));
    let prog_pin = pod::from_pod_pin_path(&lab.pin_dir);
    assert!(prog_pin.exists(), "{} pinned by load", prog_pin.display());
    // A second load replaces the pin (rename over it) without failing.
    drop(Datapath::load(&lab.pin_dir).expect("reloading the datapath"));
    assert!(
        prog_pin.exists(),
        "{} still pinned after reload",
        prog_pin.display()
    );

    for p in &lab.pods {
        let spec = EndpointSpec {
            host_ifindex: p.host_ifindex,
            pod_mac: p.pod_mac,
            host_mac: p.host_mac,
        };
        lab.in_node(|| attach_pod(&lab.pin_dir, &p.host_if, p.ip, &spec))
            .expect("attach_pod");
        assert_eq!(
            pod::endpoint(&lab.pin_dir, p.ip).expect("reading ENDPOINTS"),
            Some(spec),
            "ENDPOINTS holds {}",
            p.ip
        );
        let pins = pod::pod_link_pins(&lab.pin_dir, &p.host_if);
        assert_eq!(
            pins,
            vec![
                lab.pin_dir
                    .join("links")
                    .join(format!("tc-{}-{}", p.host_if, p.host_ifindex))
            ],
            "one link pinned for {}",
            p.host_if
        );
    }
    // Attaching again replaces the link (still exactly one pin).
    {
        let p = &lab.pods[0];
        let spec = EndpointSpec {
            host_ifindex: p.host_ifindex,
            pod_mac: p.pod_mac,
            host_mac: p.host_mac,
        };
        lab.in_node(|| attach_pod(&lab.pin_dir, &p.host_if, p.ip, &spec))
            .expect("attach_pod again");
        assert_eq!(pod::pod_link_pins(&lab.pin_dir, &p.host_if).len(), 1);
    }

    let _server = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let dst = SocketAddr::from((lab.pods[1].ip, 8080));
    let before = Datapath::open_pinned(&lab.pin_dir)
        .expect("open pins")
        .counters()
        .expect("counters")["packets"];
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..5)
            .map(|_| tcp_ask(dst).expect("pod to pod").0)
            .collect::<Vec<_>>()
    });
    assert!(
        answers.iter().all(|a| *a == lab.pods[1].ip.to_string()),
        "{answers:?}"
    );
    let after = Datapath::open_pinned(&lab.pin_dir)
        .expect("open pins")
        .counters()
        .expect("counters")["packets"];
    assert!(
        after > before,
        "the attached from_pod saw the pod traffic ({before} -> {after} packets)"
    );

    let p = &lab.pods[0];
    detach_pod(&lab.pin_dir, &p.host_if, p.ip).expect("detach_pod");
    assert_eq!(pod::endpoint(&lab.pin_dir, p.ip).expect("ENDPOINTS"), None);
    assert!(pod::pod_link_pins(&lab.pin_dir, &p.host_if).is_empty());
    detach_pod(&lab.pin_dir, &p.host_if, p.ip).expect("a second detach_pod is a no-op");
    // The other pod is untouched.
    assert!(
        pod::endpoint(&lab.pin_dir, lab.pods[1].ip)
            .expect("ENDPOINTS")
            .is_some()
    );
    assert_eq!(
        pod::pod_link_pins(&lab.pin_dir, &lab.pods[1].host_if).len(),
        1
    );
    // A missing pin directory is nothing to undo.
    detach_pod(&lab.pin_dir.join("absent"), "h9", p.ip).expect("no pin dir: no-op");
}

#[test]
fn attach_pod_without_a_loaded_datapath_says_so() {
    if !require_privileges("attach_pod_without_a_loaded_datapath_says_so") {
        return;
    }
    let lab = Lab::new("podnodp", 1);
    std::fs::create_dir_all(&lab.pin_dir).expect("pin dir");
    let p = &lab.pods[0];
    let spec = EndpointSpec {
        host_ifindex: p.host_ifindex,
        pod_mac: p.pod_mac,
        host_mac: p.host_mac,
    };
    let err = lab
        .in_node(|| attach_pod(&lab.pin_dir, &p.host_if, p.ip, &spec))
        .expect_err("no pinned program");
    assert!(err.to_string().contains("programs/from_pod"), "{err}");
    assert!(pod::pod_link_pins(&lab.pin_dir, &p.host_if).is_empty());
}
