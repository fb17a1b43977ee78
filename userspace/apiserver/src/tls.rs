//! The cluster's credentials: a CA, a serving certificate it signs, and the admin bearer token,
//! all created in the data directory on first start and reused afterwards.

use std::fs;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVING_CERT: &str = "apiserver.crt";
pub const SERVING_KEY: &str = "apiserver.key";
pub const SERVING_SANS: &str = "apiserver.sans";
pub const ADMIN_TOKEN: &str = "admin.token";
pub const KUBECONFIG: &str = "admin.kubeconfig";
/// The kubeconfigs of the control-plane components `skiff server` runs (kubeadm's
/// controller-manager.conf and scheduler.conf): client certificates from the cluster CA whose
/// CN is the component's RBAC user, so the default ClusterRoles, not `system:masters`, bound them.
pub const CONTROLLER_MANAGER_KUBECONFIG: &str = "controller-manager.kubeconfig";
pub const SCHEDULER_KUBECONFIG: &str = "scheduler.kubeconfig";
pub const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";
pub const SCHEDULER_USER: &str = "system:kube-scheduler";

pub struct Credentials {
    pub ca_pem: String,
    /// The CA's private key: it signs the node-proxy client certificates (see
    /// [`node_proxy_client_cert`]).
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub admin_token: String,
}

/// Writes a secret file readable only by its owner, atomically: the contents go to a temporary
/// file in the same directory that is then renamed over `path`, so a reader (kubectl, a test
/// waiting for the kubeconfig of a restarting server) never sees it half-written.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting permissions of {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "skiff-ca");
    dn.push(DnType::OrganizationName, "skiff");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

/// Every name the serving certificate must carry.
pub fn serving_sans(bind: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    if !bind.ip().is_unspecified() {
        sans.push(bind.ip().to_string());
    }
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            if let IpAddr::V4(ip) = iface.ip() {
                sans.push(ip.to_string());
            }
        }
    }
    // A host name that is not a valid DNS name (it happens in containers) is left out rather
    // than failing the start; names the operator asked for are checked strictly below.
    if let Ok(name) = hostname::get()
        && let Some(name) = name.to_str()
        && !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        sans.push(name.to_string());
    }
    sans.extend(extra.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Loads the credentials, creating what is missing. The serving certificate is re-issued when
/// the set of names it must carry changed (a new bind address or interface).
pub fn ensure(data_dir: &Path, bind: SocketAddr, extra_sans: &[String]) -> Result<Credentials> {
    fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let path = |name: &str| -> PathBuf { data_dir.join(name) };

    let (ca_key, ca_pem) = if path(CA_KEY).exists() && path(CA_CERT).exists() {
        let key_pem = fs::read_to_string(path(CA_KEY)).context("reading ca.key")?;
        let key = KeyPair::from_pem(&key_pem).context("ca.key is not a valid PEM key")?;
        (
            key,
            fs::read_to_string(path(CA_CERT)).context("reading ca.crt")?,
        )
    } else {
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = ca_params()?.self_signed(&key).context("signing the CA")?;
        write_private(&path(CA_KEY), &key.serialize_pem())?;
        fs::write(path(CA_CERT), cert.pem()).context("writing ca.crt")?;
        (key, cert.pem())
    };

    let sans = serving_sans(bind, extra_sans);
    let sans_text = sans.join("\n");
    let reuse = path(SERVING_CERT).exists()
        && path(SERVING_KEY).exists()
        && fs::read_to_string(path(SERVING_SANS)).ok().as_deref() == Some(sans_text.as_str());
    let (cert_pem, key_pem) = if reuse {
        (
            fs::read_to_string(path(SERVING_CERT)).context("reading the serving certificate")?,
            fs::read_to_string(path(SERVING_KEY)).context("reading the serving key")?,
        )
    } else {
        // The issuer is rebuilt from the stored CA key and the same distinguished name: a
        // certificate chains to a CA by name and key, so this signs exactly as the original did.
        let issuer = ca_params()?
            .self_signed(&ca_key)
            .context("loading the CA")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "skiff-apiserver");
            dn
        };
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .with_context(|| format!("{s:?} is not a valid certificate name")),
            })
            .collect::<Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate().context("generating the serving key")?;
        let cert = params
            .signed_by(&key, &issuer, &ca_key)
            .context("signing the serving certificate")?;
        write_private(&path(SERVING_KEY), &key.serialize_pem())?;
        fs::write(path(SERVING_CERT), cert.pem()).context("writing the serving certificate")?;
        fs::write(path(SERVING_SANS), &sans_text).context("writing apiserver.sans")?;
        (cert.pem(), key.serialize_pem())
    };

    let admin_token = if path(ADMIN_TOKEN).exists() {
        fs::read_to_string(path(ADMIN_TOKEN))
            .context("reading admin.token")?
            .trim()
            .to_string()
    } else {
        let token = random_hex(32)?;
        write_private(&path(ADMIN_TOKEN), &token)?;
        token
    };
    if admin_token.is_empty() {
        anyhow::bail!(
            "{} is empty: delete it to have a new admin token created",
            path(ADMIN_TOKEN).display()
        );
    }
    Ok(Credentials {
        ca_pem,
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem,
        key_pem,
        admin_token,
    })
}

/// The common name of the apiserver's client certificate for node agents (kubeadm's
/// `kube-apiserver-kubelet-client`); agents accept it as the apiserver (`skiff_agent::server`).
pub const NODE_PROXY_CLIENT_CN: &str = "skiff-apiserver-node-proxy";

/// A client certificate (PEM cert, PEM key) for the apiserver's requests to node agents, signed
/// by the CA and valid from a minute ago for `validity`: short-lived, so a copy taken from a
/// compromised node is soon worthless, and never a credential for the API itself.
pub fn node_proxy_client_cert(ca_key_pem: &str, validity: std::time::Duration) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key is not a valid PEM key")?;
    let issuer = ca_params()?.self_signed(&ca_key).context("loading the CA")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, NODE_PROXY_CLIENT_CN);
        dn
    };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + validity;
    let key = KeyPair::generate().context("generating the node-proxy client key")?;
    let cert = params.signed_by(&key, &issuer, &ca_key).context("signing the node-proxy client certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn rustls_config(creds: &Credentials) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![
        CertificateDer::from_pem_slice(creds.cert_pem.as_bytes())
            .context("parsing the serving certificate")?,
        CertificateDer::from_pem_slice(creds.ca_pem.as_bytes()).context("parsing the CA")?,
    ];
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes())
        .context("parsing the serving key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
    .with_safe_default_protocol_versions()
    .context("choosing TLS versions")?
    .with_client_cert_verifier(client_verifier(&creds.ca_pem, provider.clone())?)
    .with_single_cert(certs, key)
    .context("loading the serving certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client certificates are asked for but not required (tokens and anonymous discovery still
/// work); one that is sent must chain to the cluster CA and be valid now, or the handshake fails.
fn client_verifier(
    ca_pem: &str,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("parsing the CA")?)
        .context("trusting the CA for client certificates")?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")
}

/// A client certificate (PEM cert, PEM key) signed by the cluster CA for `user` in `groups`
/// (CN and O, which is how the apiserver reads a certificate's identity), valid for `validity`.
pub fn client_cert(ca_key_pem: &str, user: &str, groups: &[&str], validity: std::time::Duration) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating a client key")?;
    let cert = sign_client(ca_key_pem, &key, user, groups, validity)?;
    Ok((cert, key.serialize_pem()))
}

/// Signs a client certificate for `key`'s public key.
pub(crate) fn sign_client(
    ca_key_pem: &str,
    key: &impl rcgen::PublicKeyData,
    user: &str,
    groups: &[&str],
    validity: std::time::Duration,
) -> Result<String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key is not a valid PEM key")?;
    let issuer = ca_params()?.self_signed(&ca_key).context("loading the CA")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user);
    for g in groups {
        dn.push(DnType::OrganizationName, *g);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    // Backdated for clock skew, by at most a tenth of the validity: a holder that rotates at
    // 70-90% of notBefore..notAfter (the agent, as kubelet) must not find a short certificate
    // mostly in the past.
    let backdate = std::time::Duration::from_secs(300).min(validity / 10);
    params.not_before = now - backdate;
    params.not_after = now + validity;
    let cert = params.signed_by(key, &issuer, &ca_key).context("signing the client certificate")?;
    Ok(cert.pem())
}

/// The admin kubeconfig for a server reachable at `server_url`.
pub fn kubeconfig_text(server_url: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: skiff
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: skiff
  context:
    cluster: skiff
    user: admin
current-context: skiff
preferences: {{}}
"
    )
}

/// A kubeconfig that authenticates by a client certificate (PEM cert and key inline).
pub fn cert_kubeconfig_text(server_url: &str, ca_pem: &str, user: &str, cert_pem: &str, key_pem: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: skiff
  cluster:
    server: {server_url}
    certificate-authority-data: {}
users:
- name: {user}
  user:
    client-certificate-data: {}
    client-key-data: {}
contexts:
- name: skiff
  context:
    cluster: skiff
    user: {user}
current-context: skiff
preferences: {{}}
",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
}

/// Writes the controller-manager's and the scheduler's kubeconfigs with certificates issued now,
/// valid a year (re-issued at every start, so a server that restarts now and then never holds
/// an expired one).
pub fn write_component_kubeconfigs(data_dir: &Path, server_url: &str, creds: &Credentials) -> Result<()> {
    let year = std::time::Duration::from_secs(365 * 24 * 3600);
    for (file, user) in [(CONTROLLER_MANAGER_KUBECONFIG, CONTROLLER_MANAGER_USER), (SCHEDULER_KUBECONFIG, SCHEDULER_USER)] {
        let (cert, key) = client_cert(&creds.ca_key_pem, user, &[], year)?;
        write_private(&data_dir.join(file), &cert_kubeconfig_text(server_url, &creds.ca_pem, user, &cert, &key))?;
    }
    Ok(())
}

pub fn write_kubeconfig(data_dir: &Path, text: &str) -> Result<()> {
    write_private(&data_dir.join(KUBECONFIG), text)
}
