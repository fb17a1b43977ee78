//! `skiff token create|list|delete`: bootstrap tokens (kubeadm's format, see
//! `skiff_apiserver::bootstrap_token`) that let a node join, and the joining side's discovery:
//! fetch the CA from `kube-public/cluster-info` without trusting the connection, and keep it only
//! when its public-key hash matches the one the node was given (`--ca-cert-hash`, kubeadm's
//! `--discovery-token-ca-cert-hash`).
//!
//! The join command, as kubeadm prints it:
//! `skiff agent --server https://ADDR:6443 --token <id>.<secret> --ca-cert-hash sha256:<hex>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use skiff_apiserver::bootstrap_token::{self as bt, parse_token};

#[derive(clap::Args)]
pub struct TokenArgs {
    /// An admin kubeconfig (default: <data-dir>/admin.kubeconfig).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The server's data directory, for its admin kubeconfig.
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Make a bootstrap token and print it (`<id>.<secret>`).
    Create {
        /// How long it is valid (e.g. 30m, 24h); 0 never expires.
        #[arg(long, default_value = "24h", value_parser = skiff_controller_manager::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value = "")]
        description: String,
        /// Print the whole `skiff agent ...` join command instead of the token alone.
        #[arg(long)]
        print_join_command: bool,
        /// With --print-join-command: the server URL nodes reach (default: the one the server
        /// publishes in kube-public/cluster-info).
        #[arg(long, requires = "print_join_command")]
        server: Option<String>,
    },
    /// List the bootstrap tokens.
    List,
    /// Delete bootstrap tokens, by id or by whole token.
    Delete {
        #[arg(required = true)]
        tokens: Vec<String>,
    },
}

/// `sha256:<hex>` of the first certificate's SubjectPublicKeyInfo (DER), as kubeadm's
/// `--discovery-token-ca-cert-hash`: it pins the key, so a re-issued CA with the same key matches.
pub fn ca_cert_hash(ca_pem: &str) -> Result<String> {
    use sha2::Digest as _;
    let block = pem::parse_many(ca_pem.as_bytes())
        .context("the CA is not PEM")?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .context("the CA holds no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents()).map_err(|e| anyhow::anyhow!("the CA certificate does not parse: {e}"))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!("sha256:{}", sha2::Sha256::digest(spki).iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// A CA hash as given by a user: `sha256:` and 64 hex digits (case folded).
pub fn normalize_hash(hash: &str) -> Result<String> {
    let hex = hash.trim().strip_prefix("sha256:").with_context(|| format!("CA hash {hash:?} must look like sha256:<64 hex digits>"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("CA hash {hash:?} must look like sha256:<64 hex digits>");
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

fn random_token() -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(23);
    // Rejection sampling keeps every character uniform (256 is not a multiple of 36).
    let mut buf = [0u8; 64];
    while out.len() < 23 {
        getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
        for b in buf {
            if out.len() == 6 {
                out.push('.');
            }
            if out.len() < 23 && (b as usize) < 252 {
                out.push(ALPHABET[b as usize % 36] as char);
            }
        }
    }
    Ok(out)
}

/// Makes a bootstrap token Secret through the API; returns `<id>.<secret>`.
pub async fn create_token(client: &kube::Client, ttl: Duration, description: &str) -> Result<String> {
    let token = random_token()?;
    let (id, secret) = parse_token(&token).context("made a malformed token")?;
    let mut data = std::collections::BTreeMap::from([
        ("token-id".to_string(), id.to_string()),
        ("token-secret".to_string(), secret.to_string()),
        ("usage-bootstrap-authentication".to_string(), "true".to_string()),
        ("usage-bootstrap-signing".to_string(), "true".to_string()),
        ("auth-extra-groups".to_string(), bt::DEFAULT_GROUP.to_string()),
    ]);
    if !ttl.is_zero() {
        let expires = chrono::Utc::now() + chrono::Duration::from_std(ttl).context("the TTL is too long")?;
        data.insert("expiration".into(), expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    if !description.is_empty() {
        data.insert("description".into(), description.to_string());
    }
    let obj: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{}{id}", bt::SECRET_PREFIX), "namespace": "kube-system"},
        "type": bt::SECRET_TYPE,
        "stringData": data,
    }))?;
    Api::<Secret>::namespaced(client.clone(), "kube-system")
        .create(&PostParams::default(), &obj)
        .await
        .context("creating the bootstrap token Secret")?;
    Ok(token)
}

/// The CA in a kubeconfig (certificate-authority-data, else certificate-authority).
pub fn kubeconfig_ca(text: &str) -> Result<String> {
    use base64::Engine as _;
    let kc = kube::config::Kubeconfig::from_yaml(text).context("parsing the kubeconfig")?;
    let cluster = kc.clusters.first().and_then(|c| c.cluster.as_ref()).context("the kubeconfig names no cluster")?;
    if let Some(data) = &cluster.certificate_authority_data {
        let raw = base64::engine::general_purpose::STANDARD.decode(data.trim()).context("certificate-authority-data is not base64")?;
        return String::from_utf8(raw).context("the CA is not PEM text");
    }
    let file = cluster.certificate_authority.as_ref().context("the kubeconfig carries no CA")?;
    std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
}

/// kubeadm's join command for `token` at `server`, pinning the CA `ca_pem`.
pub fn join_command(server: &str, token: &str, ca_pem: &str) -> Result<String> {
    Ok(format!("skiff agent --server {server} --token {token} --ca-cert-hash {}", ca_cert_hash(ca_pem)?))
}

/// What `skiff server` made its join tokens with: a restart reuses the token rather than piling
/// up new ones.
const SERVER_TOKEN_DESCRIPTION: &str = "made by skiff server at start";

/// The token `skiff server` prints at start: one it made earlier with at least an hour left, or a
/// new one valid for `ttl`. Expired bootstrap tokens are deleted on the way (kubeadm's token
/// cleaner; the apiserver refuses them anyway).
pub async fn server_join_token(client: &kube::Client, ttl: Duration) -> Result<String> {
    let api = Api::<Secret>::namespaced(client.clone(), "kube-system");
    let secrets = api.list(&ListParams::default().fields(&format!("type={}", bt::SECRET_TYPE))).await.context("listing bootstrap tokens")?;
    let now = chrono::Utc::now();
    let mut reuse = None;
    for s in secrets.items.iter().filter(|s| s.type_.as_deref() == Some(bt::SECRET_TYPE)) {
        let expires = chrono::DateTime::parse_from_rfc3339(&field(s, "expiration")).ok().map(|t| t.with_timezone(&chrono::Utc));
        match expires {
            Some(t) if t <= now => {
                if let Some(name) = &s.metadata.name {
                    let _ = api.delete(name, &DeleteParams::default()).await;
                }
            }
            Some(t) if t - now > chrono::Duration::hours(1) && field(s, "description") == SERVER_TOKEN_DESCRIPTION => {
                let token = format!("{}.{}", field(s, "token-id"), field(s, "token-secret"));
                if parse_token(&token).is_some() && reuse.as_ref().is_none_or(|(best, _)| t > *best) {
                    reuse = Some((t, token));
                }
            }
            _ => {}
        }
    }
    match reuse {
        Some((_, token)) => Ok(token),
        None => create_token(client, ttl, SERVER_TOKEN_DESCRIPTION).await,
    }
}

/// The server URL `kube-public/cluster-info` names.
async fn cluster_info_server(client: &kube::Client) -> Result<String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), bt::CLUSTER_INFO_NAMESPACE).get(bt::CLUSTER_INFO_NAME).await.context("reading kube-public/cluster-info")?;
    let text = cm.data.as_ref().and_then(|d| d.get("kubeconfig")).context("cluster-info has no kubeconfig")?;
    let kc = kube::config::Kubeconfig::from_yaml(text).context("parsing cluster-info's kubeconfig")?;
    kc.clusters.first().and_then(|c| c.cluster.as_ref()).and_then(|c| c.server.clone()).context("cluster-info names no server")
}

fn field(s: &Secret, k: &str) -> String {
    s.data.as_ref().and_then(|d| d.get(k)).map(|b| String::from_utf8_lossy(&b.0).into_owned()).unwrap_or_default()
}

pub fn run(args: TokenArgs) -> Result<()> {
    let kubeconfig = args.kubeconfig.clone().unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    let text = std::fs::read_to_string(&kubeconfig).with_context(|| format!("reading {} (the server's admin kubeconfig; see --kubeconfig)", kubeconfig.display()))?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let client = crate::kube_client(&kubeconfig).await?;
        match args.command {
            TokenCommand::Create { ttl, description, print_join_command, server } => {
                let token = create_token(&client, ttl, &description).await?;
                if print_join_command {
                    let server = match server {
                        Some(s) => s,
                        None => cluster_info_server(&client).await?,
                    };
                    println!("{}", join_command(&server, &token, &kubeconfig_ca(&text)?)?);
                } else {
                    println!("{token}");
                }
            }
            TokenCommand::List => {
                let secrets = Api::<Secret>::namespaced(client, "kube-system")
                    .list(&ListParams::default().fields(&format!("type={}", bt::SECRET_TYPE)))
                    .await
                    .context("listing bootstrap tokens")?;
                println!("{:<24} {:<10} {:<22} {:<45} DESCRIPTION", "TOKEN", "TTL", "EXPIRES", "USAGES");
                let now = chrono::Utc::now();
                for s in secrets.items.iter().filter(|s| s.type_.as_deref() == Some(bt::SECRET_TYPE)) {
                    let token = format!("{}.{}", field(s, "token-id"), field(s, "token-secret"));
                    let expires = field(s, "expiration");
                    let ttl = match chrono::DateTime::parse_from_rfc3339(&expires) {
                        Ok(t) if t > now => format!("{}h", (t.with_timezone(&chrono::Utc) - now).num_minutes().div_euclid(60) + 1),
                        Ok(_) => "<expired>".into(),
                        Err(_) if expires.is_empty() => "<forever>".into(),
                        Err(_) => "<invalid>".into(),
                    };
                    let usages: Vec<&str> = s.data.iter().flatten().filter_map(|(k, v)| (v.0 == b"true").then_some(k.strip_prefix("usage-bootstrap-")?)).collect();
                    println!("{token:<24} {ttl:<10} {:<22} {:<45} {}", if expires.is_empty() { "<never>" } else { &expires }, usages.join(","), field(s, "description"));
                }
            }
            TokenCommand::Delete { tokens } => {
                let api = Api::<Secret>::namespaced(client, "kube-system");
                for t in tokens {
                    let id = parse_token(t.trim()).map(|(id, _)| id).unwrap_or(t.trim());
                    if id.len() != 6 || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
                        bail!("{t:?} is neither a token id ([a-z0-9]{{6}}) nor a token");
                    }
                    api.delete(&format!("{}{id}", bt::SECRET_PREFIX), &DeleteParams::default())
                        .await
                        .with_context(|| format!("deleting bootstrap token {id}"))?;
                    println!("bootstrap token {id} deleted");
                }
            }
        }
        Ok(())
    })
}

/// Discovery: fetches `kube-public/cluster-info` from `server` without verifying its
/// certificate and without credentials, and returns its CA only when the CA's hash is `pinned`.
/// Nothing secret is sent before the pin matched.
pub async fn discover_ca(server: &str, pinned: &str) -> Result<String> {
    let pinned = normalize_hash(pinned)?;
    let uri: http::Uri = server.parse().with_context(|| format!("{server:?} is not a URL"))?;
    let mut config = kube::Config::new(uri);
    config.accept_invalid_certs = true;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(20));
    let client = kube::Client::try_from(config).context("building the discovery client")?;
    let cm = Api::<ConfigMap>::namespaced(client, bt::CLUSTER_INFO_NAMESPACE)
        .get(bt::CLUSTER_INFO_NAME)
        .await
        .with_context(|| format!("reading {}/{} from {server} (is it a skiff server?)", bt::CLUSTER_INFO_NAMESPACE, bt::CLUSTER_INFO_NAME))?;
    let text = cm.data.as_ref().and_then(|d| d.get("kubeconfig")).context("cluster-info has no kubeconfig")?;
    let ca = kubeconfig_ca(text).context("reading the CA from cluster-info")?;
    let got = ca_cert_hash(&ca)?;
    if got != pinned {
        bail!("the server's CA hash is {got}, not the pinned {pinned}: refusing to join (wrong token or --ca-cert-hash, or something between this node and {server} is impersonating the server)");
    }
    Ok(ca)
}

/// Writes `pem` to `<dir>/server-ca.crt` (the discovered, pinned CA) and returns the path.
pub fn save_ca(dir: &Path, pem: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("server-ca.crt");
    std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_kubeadm_shape() {
        for _ in 0..50 {
            let t = random_token().unwrap();
            assert!(parse_token(&t).is_some(), "{t}");
        }
    }

    #[test]
    fn hashes_normalize() {
        let h = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(normalize_hash(&h).unwrap(), format!("sha256:{}", "ab".repeat(32)));
        assert!(normalize_hash("sha256:abc").is_err());
        assert!(normalize_hash(&"ab".repeat(32)).is_err());
        assert!(normalize_hash(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn ca_hash_is_of_the_public_key() {
        // Two certificates over one key hash alike; another key hashes differently.
        let key = rcgen::KeyPair::generate().unwrap();
        let a = rcgen::CertificateParams::new(vec!["a".into()]).unwrap().self_signed(&key).unwrap();
        let b = rcgen::CertificateParams::new(vec!["b".into()]).unwrap().self_signed(&key).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let ha = ca_cert_hash(&a.pem()).unwrap();
        assert_eq!(ha, ca_cert_hash(&b.pem()).unwrap());
        assert_ne!(ha, ca_cert_hash(&other.cert.pem()).unwrap());
        use sha2::Digest as _;
        let expect: String = sha2::Sha256::digest(key.public_key_der()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(ha, format!("sha256:{expect}"));
        assert!(ca_cert_hash("not pem").is_err());
    }
}
