//! Agents pull images from a registry on a `skiff up` cluster, as kubelet does: Debian's
//! docker-registry with htpasswd auth listens on the lab bridge (172.20.77.1, which the node
//! namespaces reach; their loopback is their own), the echo image is pushed there by skopeo as
//! Docker v2 schema 2 (a manifest the nodes' store does not hold, so layers really travel), and
//! the store's registries.json names the registry insecure (plain HTTP). Then: a Deployment with
//! an imagePullSecret runs (Pulling/Pulled events), a pod without credentials waits in
//! ErrImagePull/ImagePullBackOff, and `imagePullPolicy: Never` on an absent image is
//! ErrImageNeverPull.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

const REGISTRY: &str = "/usr/bin/docker-registry";
/// `skiff:s3cret`, bcrypt (cost 4), as htpasswd -B writes it.
const HTPASSWD: &str = "skiff:$2b$04$8jxPocIpaal4A96s/u2x/.dLiq22vVkMjxJ73dKAtpCbPtJCrKB1y\n";
const BRIDGE: &str = "172.20.77.1";

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(dir: &Path) -> (Registry, String) {
    let port = std::net::TcpListener::bind((BRIDGE, 0)).expect("a free port on the lab bridge").local_addr().expect("addr").port();
    let host = format!("{BRIDGE}:{port}");
    std::fs::create_dir_all(dir.join("storage")).expect("storage");
    std::fs::write(dir.join("htpasswd"), HTPASSWD).expect("htpasswd");
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\nauth:\n  htpasswd:\n    realm: skiff-e2e\n    path: {}\n",
        dir.join("storage").display(),
        dir.join("htpasswd").display()
    );
    std::fs::write(dir.join("config.yml"), config).expect("config");
    let child = Command::new(REGISTRY)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log")).map(Stdio::from).unwrap_or(Stdio::null()))
        .spawn()
        .expect("start docker-registry");
    let reg = Registry(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&host).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not listen on {host}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (reg, host)
}

fn manifests(host: &str) -> String {
    // base64("skiff:s3cret")
    let auth = "c2tpZmY6czNjcmV0";
    let dockerconfig = format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#);
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: pulls}}
---
apiVersion: v1
kind: Secret
metadata: {{name: regcred, namespace: pulls}}
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{dockerconfig}'
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: pulled, namespace: pulls}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: pulled}}}}
  template:
    metadata: {{labels: {{app: pulled}}}}
    spec:
      imagePullSecrets: [{{name: regcred}}]
      containers:
      - {{name: echo, image: "{host}/skiff/echo:1.0"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: nocreds, namespace: pulls}}
spec:
  containers:
  - {{name: echo, image: "{host}/skiff/echo:1.0", imagePullPolicy: Always}}
---
apiVersion: v1
kind: Pod
metadata: {{name: never, namespace: pulls}}
spec:
  containers:
  - {{name: echo, image: "{host}/skiff/absent:1.0", imagePullPolicy: Never}}
"#
    )
}

fn waiting_reason(k: &Kubectl, pod: &str) -> String {
    let p = k.json(&["get", "pod", pod, "-n", "pulls", "-o", "json"]);
    p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str().unwrap_or_default().to_string()
}

#[test]
fn agents_pull_from_a_registry_with_pull_secrets_and_back_off() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0)
        || !require("runc", have("runc"))
        || !require("docker-registry (apt-get install docker-registry)", Path::new(REGISTRY).exists())
        || !require("skopeo", have("skopeo"))
    {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up(1, &image);
    let reg_dir = tempfile::tempdir().expect("tmp");
    let (registry, host) = start_registry(reg_dir.path());
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds=skiff:s3cret", "--format=v2s2"])
        .arg(format!("oci-archive:{}", image.display()))
        .arg(format!("docker://{host}/skiff/echo:1.0"))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "skopeo push: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(cluster.dir.path().join("images/registries.json"), format!(r#"{{"insecure": ["{host}"]}}"#)).expect("registries.json");

    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    k.run_with_stdin(&["apply", "-f", "-"], Some(&manifests(&host)));

    let running = eventually_or(
        "the Deployment's pod Running from the pulled image",
        Duration::from_secs(120),
        || {
            let pods = k.json(&["get", "pods", "-n", "pulls", "-l", "app=pulled", "-o", "json"]);
            pods["items"].as_array()?.iter().find(|p| p["status"]["phase"] == "Running").cloned()
        },
        || format!("{}\n{}", k.ok(&["get", "events", "-n", "pulls"]), cluster.agent_logs()),
    );
    let name = running["metadata"]["name"].as_str().expect("name").to_string();
    let cs = &running["status"]["containerStatuses"][0];
    assert_eq!(cs["image"], format!("{host}/skiff/echo:1.0"), "{cs}");
    let events = k.ok(&["get", "events", "-n", "pulls", "--field-selector", &format!("involvedObject.name={name}")]);
    assert!(events.contains("Pulling") && events.contains("Pulled") && events.contains("Successfully pulled image"), "{events}");

    // No credentials: the registry says 401; the pod waits and backs off.
    let reason = eventually_or(
        "nocreds waiting in ImagePullBackOff",
        Duration::from_secs(60),
        || Some(waiting_reason(&k, "nocreds")).filter(|r| r == "ImagePullBackOff"),
        || format!("reason now: {:?}\n{}", waiting_reason(&k, "nocreds"), cluster.agent_logs()),
    );
    assert_eq!(reason, "ImagePullBackOff");
    let events = k.ok(&["get", "events", "-n", "pulls", "--field-selector", "involvedObject.name=nocreds"]);
    assert!(events.contains("Failed to pull image") && events.to_lowercase().contains("unauthorized"), "{events}");
    assert!(events.contains("ErrImagePull") && events.contains("BackOff"), "{events}");

    // Never: not pulled, not present.
    let reason = eventually("never waiting in ErrImageNeverPull", Duration::from_secs(60), || {
        Some(waiting_reason(&k, "never")).filter(|r| r == "ErrImageNeverPull")
    });
    assert_eq!(reason, "ErrImageNeverPull");

    drop(registry);
    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
}

/// `eventually`, with `why()` (events, agent logs) in the failure message.
fn eventually_or<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>, why: impl FnOnce() -> String) -> T {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}\n{}", why());
}
