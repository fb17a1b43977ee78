//! `skiff agent`: the node agent's command line, and the node-side helpers `skiff up/down`
//! share with it (image import, removing a node's pods).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// A kubeconfig for the server (or use --server and --token).
    #[arg(long, env = "KUBECONFIG", conflicts_with = "server")]
    kubeconfig: Option<PathBuf>,
    /// The server's URL, e.g. https://10.0.0.1:6443.
    #[arg(long, requires = "token")]
    server: Option<String>,
    /// A bearer token for the server.
    #[arg(long, env = "SKIFF_TOKEN")]
    token: Option<String>,
    /// The server's CA certificate (PEM), with --server.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// With --server: the server CA's public-key hash (sha256:<hex>, as `skiff server` and
    /// `skiff token create --print-join-command` print it): the CA is fetched from the server and
    /// kept only if it matches (kubeadm's discovery). Needed with a bootstrap token unless
    /// --ca-file is given.
    #[arg(long, requires = "server")]
    ca_cert_hash: Option<String>,
    /// The Node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The node's address other nodes and the server reach it on.
    #[arg(long)]
    node_ip: Ipv4Addr,
    /// Run inside this network namespace (/run/netns/NAME): the agent enters it before anything
    /// else, so CNI and the runtime run there too.
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, default_value = "/var/lib/skiff-agent")]
    data_dir: PathBuf,
    /// The bpffs directory for this node's datapath (default /sys/fs/bpf/skiff/<node>).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Run without the eBPF datapath (pods get networks; Services are not translated here).
    #[arg(long)]
    no_datapath: bool,
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The local image store (`skiff image import` writes it).
    #[arg(long, default_value = "/var/lib/skiff/images")]
    image_dir: PathBuf,
    /// The node's uplink interface (NodePort XDP and reverse NAT of replies from other nodes).
    #[arg(long)]
    uplink: Option<String>,
    /// The pod CIDR to use when the controller-manager assigns none.
    #[arg(long)]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// How pods reach other nodes: native (routes via the other nodes' IPs: the nodes share an
    /// L2 segment) or vxlan (an overlay between node IPs: device skiff_vxlan, VNI 1, UDP 8472;
    /// pods get the uplink's MTU - 50).
    #[arg(long, default_value = "native", value_parser = ["native", "vxlan"])]
    network: String,
    /// Seconds before the first container restart (doubling per crash, capped at 300).
    #[arg(long, default_value_t = 10)]
    restart_backoff: u64,
    /// How often the agent renews its node Lease and posts its Node's conditions.
    #[arg(long, default_value = "10s", value_parser = skiff_controller_manager::parse_duration)]
    heartbeat_interval: Duration,
    /// The container runtime: runc (skiff's own, over the local image store) or cri (a CRI v1
    /// runtime such as containerd at --cri-endpoint; it makes the pod sandboxes and runs CNI).
    #[arg(long, default_value = "runc", value_parser = ["runc", "cri"])]
    runtime: String,
    /// The CRI runtime's socket, with --runtime cri.
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    cri_endpoint: String,
    /// Where the plain-HTTP Prometheus endpoint (GET /metrics: datapath counters, proxy and
    /// agent stats) listens [default: <node-ip>:10249].
    #[arg(long)]
    metrics_bind: Option<std::net::SocketAddr>,
    /// How NodePort / LoadBalancer / externalIPs traffic reaches a backend on another node, as
    /// Cilium's --bpf-lb-mode: snat (the backend sees this node; replies come back through it)
    /// or dsr (direct server return: the backend sees the client, and its node answers the
    /// client directly; every node must run a datapath that reads skiff's DSR IP option).
    #[arg(long, default_value = "snat", value_parser = ["snat", "dsr"])]
    lb_mode: String,
}

/// Enters `/run/netns/<name>` for this thread, before any other thread exists, so every thread
/// and child process the agent makes lives in the node's namespace.
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {} (ip netns add {name})", path.display()))?;
    // SAFETY: a valid namespace fd; affects only this (still the only) thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering netns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The runtime the agent runs pods with: runc over its state under `data_dir`, or the CRI
/// runtime at `cri_endpoint`.
pub fn node_runtime(runtime: &str, data_dir: &Path, image_dir: &Path, cri_endpoint: &str) -> Result<Arc<dyn skiff_agent::ContainerRuntime>> {
    if runtime == "cri" {
        let rt = skiff_agent::cri_adapter::CriAdapter::connect(cri_endpoint)
            .with_context(|| format!("connecting to the CRI runtime at {cri_endpoint}"))?;
        tracing::info!(endpoint = cri_endpoint, version = %skiff_agent::ContainerRuntime::version(&rt), "CRI runtime");
        return Ok(Arc::new(rt));
    }
    let rt = skiff_agent::runc_adapter::RuncRuntime::open(&data_dir.join("runc"), image_dir)
        .context("opening the runc runtime")?;
    Ok(Arc::new(rt))
}

/// The private containerd `skiff up --runtime cri` runs for a node (`<data dir>/containerd`).
pub fn node_containerd(data_dir: &Path, cni_bin_dir: &Path) -> skiff_runtime::cri::containerd::ContainerdPaths {
    skiff_runtime::cri::containerd::ContainerdPaths::new(&data_dir.join("containerd"), cni_bin_dir, &data_dir.join("cni-conf"))
}

/// Stops and removes every pod sandbox and container the agent made in the CRI runtime at
/// `endpoint` (StopPodSandbox runs CNI DEL, so addresses and veths go too). Best effort.
fn remove_cri_pods(endpoint: &str) {
    use skiff_agent::ContainerRuntime;
    use skiff_agent::runtime::SandboxRuntime;
    let Ok(rt) = skiff_agent::cri_adapter::CriAdapter::connect(endpoint) else { return };
    if let Ok(ids) = rt.list() {
        let handles: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let rt = rt.clone();
                std::thread::spawn(move || {
                    let _ = rt.stop(&id, Duration::from_secs(5));
                    let _ = rt.remove(&id);
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
    for uid in rt.sandbox_pod_uids().unwrap_or_default() {
        let _ = rt.remove_sandbox(&uid);
    }
}

/// Imports an OCI or docker archive into the image store at `image_dir`.
pub fn import_image(image_dir: &Path, archive: &Path) -> Result<()> {
    let store = skiff_runtime::images::ImageStore::open(image_dir)
        .with_context(|| format!("opening the image store {}", image_dir.display()))?;
    let imported = store.import(archive).with_context(|| format!("importing {}", archive.display()))?;
    for i in imported {
        eprintln!("[image] {i:?}");
    }
    Ok(())
}

/// Stops and removes every container the node's runtime holds and the pod namespaces its
/// agent recorded (for `skiff down`, after the agent stopped). Best effort.
pub fn remove_node_pods(data_dir: &Path, image_dir: &Path) {
    let containerd = data_dir.join("containerd/containerd.sock");
    if containerd.exists() {
        remove_cri_pods(&format!("unix://{}", containerd.display()));
    }
    if data_dir.join("runc").is_dir()
        && let Ok(rt) = skiff_agent::runc_adapter::RuncRuntime::open(&data_dir.join("runc"), image_dir)
    {
        use skiff_agent::ContainerRuntime;
        if let Ok(ids) = rt.list() {
            let handles: Vec<_> = ids
                .into_iter()
                .map(|id| {
                    let rt = rt.clone();
                    std::thread::spawn(move || {
                        let _ = rt.stop(&id, Duration::from_secs(5));
                        let _ = rt.remove(&id);
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(data_dir.join("pods")) {
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path().join("sandbox.json"))
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                && let Some(ns) = v["netns"].as_str()
            {
                let _ = skiff_agent::sandbox::delete_netns(ns);
            }
        }
    }
}

/// The API client, and the cluster CA when known (for the agent endpoint): from the kubeconfig,
/// or from --server with --ca-file, or discovered and pinned by --ca-cert-hash (saved as
/// `<data-dir>/server-ca.crt`).
///
/// A bootstrap token (given with --token, or as the kubeconfig's user: kubelet's bootstrap
/// kubeconfig) is only for joining: the agent uses it once to get its node client certificate
/// (`system:node:<name>` in `system:nodes`, see [`node_client`]) and talks with that from then on.
async fn connect(args: &AgentArgs, node_name: &str) -> Result<(kube::Client, Option<String>)> {
    if let Some(k) = &args.kubeconfig {
        let text = std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?;
        let ca = crate::token_cli::kubeconfig_ca(&text).ok();
        if let (Some(token), Some(url), Some(ca_pem)) = (skiff_agent::server::kubeconfig_token(&text), kubeconfig_server(&text), &ca)
            && skiff_apiserver::bootstrap_token::parse_token(token.trim()).is_some()
        {
            let ca_file = crate::token_cli::save_ca(&args.data_dir, ca_pem)?;
            let client = node_client(&url, &ca_file, Some(token.trim()), &args.data_dir, node_name).await?;
            return Ok((client, ca));
        }
        return Ok((crate::kube_client(k).await?, ca));
    }
    let Some(url) = &args.server else { bail!("give --kubeconfig FILE, or --server URL and --token TOKEN") };
    let token = args.token.as_deref().unwrap_or_default().trim();
    let bootstrap = skiff_apiserver::bootstrap_token::parse_token(token).is_some();
    let ca = match (&args.ca_file, &args.ca_cert_hash) {
        (Some(f), hash) => {
            let pem = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            if let Some(hash) = hash {
                let (want, got) = (crate::token_cli::normalize_hash(hash)?, crate::token_cli::ca_cert_hash(&pem)?);
                if want != got {
                    bail!("the CA in {} hashes to {got}, not --ca-cert-hash {want}: refusing to join", f.display());
                }
            }
            Some((pem, f.clone()))
        }
        (None, Some(hash)) => {
            let pem = crate::token_cli::discover_ca(url, hash).await?;
            let saved = crate::token_cli::save_ca(&args.data_dir, &pem)?;
            tracing::info!(server = %url, hash, ca = %saved.display(), "server CA pinned");
            Some((pem, saved))
        }
        (None, None) if bootstrap => bail!("joining with a bootstrap token needs the server CA's hash (--ca-cert-hash sha256:<hex>, printed by `skiff server` and `skiff token create --print-join-command`) or --ca-file"),
        (None, None) => None,
    };
    let client = match &ca {
        Some((_, ca_file)) if bootstrap => node_client(url, ca_file, Some(token), &args.data_dir, node_name).await?,
        _ => crate::kube_client_for(url, token, ca.as_ref().map(|(_, f)| f.as_path())).await?,
    };
    let ca = ca.map(|(pem, _)| pem);
    Ok((client, ca))
}

/// The server URL of a kubeconfig's first cluster.
fn kubeconfig_server(text: &str) -> Option<String> {
    let kc = kube::config::Kubeconfig::from_yaml(text).ok()?;
    kc.clusters.first()?.cluster.as_ref()?.server.clone()
}

/// Where a joined node keeps its client certificate and key (kubelet's kubelet-client-current.pem).
pub const NODE_CERT_FILE: &str = "pki/node-client.crt";
pub const NODE_KEY_FILE: &str = "pki/node-client.key";
/// A stored certificate this close to its end is replaced at start rather than used.
const RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);

/// The node's certificate and key from the data dir, when they name this node and are valid for
/// more than [`RENEW_BEFORE`] (or, for a certificate shorter-lived than a day, until its
/// rotation point: the running agent rotates it then).
fn stored_node_cert(data_dir: &Path, node_name: &str) -> Option<(String, String)> {
    let cert = std::fs::read_to_string(data_dir.join(NODE_CERT_FILE)).ok()?;
    let key = std::fs::read_to_string(data_dir.join(NODE_KEY_FILE)).ok()?;
    let (cn, not_before, not_after) = cert_times(&cert)?;
    let now = chrono::Utc::now().timestamp();
    let renew_before = (RENEW_BEFORE.as_secs() as i64).min((not_after - not_before) / 5);
    (cn == format!("system:node:{node_name}") && not_after - now > renew_before).then_some((cert, key))
}

/// A PEM certificate's CommonName, notBefore and notAfter (Unix seconds).
fn cert_times(cert_pem: &str) -> Option<(String, i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let parsed = pem.parse_x509().ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let v = parsed.validity();
    Some((cn, v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When to replace a certificate: at a point drawn between 70% and 90% of its lifetime, as
/// kubelet's certificate manager does (the spread keeps many nodes from renewing at once).
fn rotation_deadline(not_before: i64, not_after: i64) -> i64 {
    // The jitter needs no cryptographic randomness: any spread across nodes will do.
    let jitter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) as f64 / 1e9;
    let lifetime = (not_after - not_before).max(0) as f64;
    not_before + (lifetime * (0.7 + 0.2 * jitter)) as i64
}

/// kubeadm's TLS bootstrap: the API client of this node, authenticated by its own client
/// certificate. One from an earlier start is reused (so a restart needs no valid token); else
/// a new key is made and a CertificateSigningRequest for `system:node:<name>` posted with the
/// bootstrap token, and the signed certificate saved with its key in the data dir. While the
/// agent runs, [`rotate_node_certificate`] replaces the certificate before it expires and swaps
/// it into the returned client (kubelet's client certificate rotation).
pub async fn node_client(url: &str, ca_file: &Path, bootstrap_token: Option<&str>, data_dir: &Path, node_name: &str) -> Result<kube::Client> {
    let (cert, key) = match stored_node_cert(data_dir, node_name) {
        Some(found) => {
            tracing::info!(cert = %data_dir.join(NODE_CERT_FILE).display(), "using the node's client certificate");
            found
        }
        None => {
            let token = bootstrap_token.context("this node has no valid client certificate yet and no bootstrap token to ask for one")?;
            let boot = crate::kube_client_for(url, token, Some(ca_file)).await?;
            let (cert, key) = request_node_certificate(&boot, node_name).await?;
            save_node_cert(data_dir, &cert, &key)?;
            tracing::info!(cert = %data_dir.join(NODE_CERT_FILE).display(), "the node's client certificate was signed and saved");
            (cert, key)
        }
    };
    let current = Arc::new(std::sync::RwLock::new(client_with_cert(url, ca_file, &cert, &key).await?));
    let client = kube::Client::new(SwappableClient(current.clone()), "default");
    tokio::spawn(rotate_node_certificate(current, url.to_string(), ca_file.to_path_buf(), data_dir.to_path_buf(), node_name.to_string(), cert));
    Ok(client)
}

fn save_node_cert(data_dir: &Path, cert: &str, key: &str) -> Result<()> {
    let pki = data_dir.join("pki");
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    write_private(&data_dir.join(NODE_KEY_FILE), key)?;
    write_private(&data_dir.join(NODE_CERT_FILE), cert)
}

/// A kube client whose requests go to whichever client holds the node's current certificate:
/// every clone of the agent's client (reflectors, workers, heartbeats) follows a rotation. A
/// request already under way (an open watch) finishes on the connection it has.
#[derive(Clone)]
struct SwappableClient(Arc<std::sync::RwLock<kube::Client>>);

impl tower::Service<http::Request<kube::client::Body>> for SwappableClient {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), kube::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let client = match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Box::pin(async move { client.send(request).await })
    }
}

/// Replaces the node's certificate at its rotation deadline: a new key, a CSR posted with the
/// current identity (the node authorizer lets a node ask for its own), the signed certificate
/// saved and swapped into the agent's client without a restart. A failure is retried (every
/// tenth of what is left, at least 5 s, at most 5 min) until the certificate expires, and on.
async fn rotate_node_certificate(
    current: Arc<std::sync::RwLock<kube::Client>>,
    url: String,
    ca_file: PathBuf,
    data_dir: PathBuf,
    node_name: String,
    mut cert: String,
) {
    loop {
        let Some((_, not_before, not_after)) = cert_times(&cert) else {
            tracing::warn!("the node's client certificate cannot be read: no rotation");
            return;
        };
        let deadline = rotation_deadline(not_before, not_after);
        let wait = (deadline - chrono::Utc::now().timestamp()).max(0) as u64;
        tracing::info!(in_seconds = wait, "the node's client certificate will be rotated");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        loop {
            let client = match current.read() {
                Ok(c) => c.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            let rotated = async {
                let (new_cert, key) = request_node_certificate(&client, &node_name).await?;
                let next = client_with_cert(&url, &ca_file, &new_cert, &key).await?;
                save_node_cert(&data_dir, &new_cert, &key)?;
                anyhow::Ok((new_cert, next))
            }
            .await;
            match rotated {
                Ok((new_cert, next)) => {
                    match current.write() {
                        Ok(mut c) => *c = next,
                        Err(poisoned) => *poisoned.into_inner() = next,
                    }
                    let expires = cert_times(&new_cert).map(|(_, _, a)| a).unwrap_or_default();
                    tracing::info!(expires, "rotated the node's client certificate");
                    cert = new_cert;
                    break;
                }
                Err(e) => {
                    let left = (not_after - chrono::Utc::now().timestamp()).max(0) as u64;
                    let retry = (left / 10).clamp(5, 300);
                    tracing::warn!("rotating the node's client certificate failed (retrying in {retry}s): {e:#}");
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                }
            }
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Posts a CSR for this node and waits (a minute at most) for the signed certificate.
async fn request_node_certificate(client: &kube::Client, node_name: &str) -> Result<(String, String)> {
    use base64::Engine as _;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let key = rcgen::KeyPair::generate().context("generating the node's key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("system:node:{node_name}"));
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name = dn;
    let request = params.serialize_request(&key).context("making the certificate request")?.pem().context("encoding the certificate request")?;
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"generateName": "node-csr-"},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(request),
                 "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                 "usages": ["digital signature", "client auth"]},
    }))?;
    let api: kube::Api<CertificateSigningRequest> = kube::Api::all(client.clone());
    // A refusal (401/403) ends the join at once; a dropped connection (a loaded server) is
    // retried for a minute, as the agent's other first requests are.
    let mut attempt = 0;
    let mut created = loop {
        match api.create(&Default::default(), &csr).await {
            Ok(created) => break created,
            Err(kube::Error::Api(e)) => bail!("posting the node's CertificateSigningRequest was refused (is the bootstrap token valid?): {e}"),
            Err(e) if attempt < 12 => {
                attempt += 1;
                tracing::warn!("posting the node's CertificateSigningRequest failed (retrying): {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("posting the node's CertificateSigningRequest")),
        }
    };
    let name = created.metadata.name.clone().unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = created.status.clone().unwrap_or_default();
        if let Some(cert) = status.certificate {
            let pem = String::from_utf8(cert.0).context("the signed certificate is not PEM text")?;
            return Ok((pem, key.serialize_pem()));
        }
        if let Some(c) = status.conditions.unwrap_or_default().iter().find(|c| c.type_ == "Denied" || c.type_ == "Failed") {
            bail!("the node's certificate request {name} was {}: {}", c.type_, c.message.clone().unwrap_or_default());
        }
        if std::time::Instant::now() > deadline {
            bail!("the node's certificate request {name} was not signed within a minute");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        created = api.get(&name).await.with_context(|| format!("reading the certificate request {name}"))?;
    }
}

/// A kube client presenting a client certificate, trusting only the cluster CA.
async fn client_with_cert(url: &str, ca_file: &Path, cert_pem: &str, key_pem: &str) -> Result<kube::Client> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: node\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: node\n  context: {{cluster: skiff, user: node}}\ncurrent-context: node\n",
        ca_file.display(), b64(cert_pem), b64(key_pem));
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).context("the node kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.context("loading the node kubeconfig")?;
    kube::Client::try_from(config).context("building the node's API client")
}

pub fn run(args: AgentArgs) -> Result<()> {
    if let Some(ns) = &args.netns {
        enter_netns(ns)?;
    }
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).context("reading the host name")?,
    };
    let mut cfg = skiff_agent::AgentConfig::new(&node_name, args.node_ip, args.data_dir.clone());
    if !args.no_datapath {
        cfg.pin_dir = Some(args.pin_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/skiff").join(&node_name)));
    }
    cfg.cni_bin_dirs = vec![args.cni_bin_dir.clone()];
    cfg.cni_conf_dir = args.cni_conf_dir.clone();
    cfg.uplink = args.uplink.clone();
    cfg.pod_cidr = args.pod_cidr;
    cfg.network = args.network.parse()?;
    cfg.backoff_base = Duration::from_secs(args.restart_backoff.max(1));
    cfg.heartbeat_interval = args.heartbeat_interval.max(Duration::from_millis(500));
    cfg.metrics_bind = args.metrics_bind;
    cfg.lb_mode = args.lb_mode.parse().map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // Joining comes first: a wrong CA hash or token fails before anything changes on the node.
    let (client, server_ca) = rt.block_on(connect(&args, &node_name))?;
    // The agent endpoint (kubectl logs/exec) knows the apiserver by its client certificate from
    // the cluster CA; it also accepts the admin token this agent was given (never a bootstrap
    // token: that is only for joining).
    cfg.server_client_ca = server_ca;
    cfg.server_token = match (&args.kubeconfig, &args.token) {
        (Some(k), _) => std::fs::read_to_string(k)
            .ok()
            .and_then(|t| skiff_agent::server::kubeconfig_token(&t))
            .filter(|t| skiff_apiserver::bootstrap_token::parse_token(t.trim()).is_none()),
        (None, Some(t)) if skiff_apiserver::bootstrap_token::parse_token(t.trim()).is_none() => Some(t.clone()),
        _ => None,
    };
    let runtime = node_runtime(&args.runtime, &args.data_dir, &args.image_dir, &args.cri_endpoint)?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut agent = tokio::spawn(skiff_agent::run(client, cfg, runtime, rx));
        tokio::select! {
            _ = crate::shutdown_signal() => {
                tracing::info!("stopping the agent (pods keep running)");
                let _ = tx.send(true);
                agent.await??;
            }
            r = &mut agent => r??,
        }
        Ok(())
    })
}
