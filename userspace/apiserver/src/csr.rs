//! CertificateSigningRequests (certificates.k8s.io/v1) and the node client signer: kubeadm's TLS
//! bootstrap. A joining agent (a bootstrap token, group `system:bootstrappers`) or a node
//! renewing its own certificate posts a CSR for `CN=system:node:<name>, O=system:nodes` with the
//! signer `kubernetes.io/kube-apiserver-client-kubelet`; the apiserver approves and signs it as
//! it is created (what kube-controller-manager's csrapproving and csrsigning controllers do), so
//! the agent reads its certificate back from `status.certificate`.
//!
//! Any other CSR is stored unapproved and left alone (no signer for it here).

use base64::Engine as _;
use serde_json::{Value, json};

use crate::State;
use crate::auth::{GROUP_BOOTSTRAPPERS, GROUP_NODES, NODE_USER_PREFIX, UserInfo};
use skiff_api::status::ApiError;

pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// How long a node client certificate is valid when the CSR does not ask for less
/// (kube-controller-manager's --cluster-signing-duration default).
const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
const MIN_VALIDITY_SECONDS: i64 = 600;

/// Why this CSR is not one the node client signer signs for this requester (None: it is).
fn refusal(user: &UserInfo, spec: &Value, subject_cn: &str, subject_orgs: &[String]) -> Option<String> {
    if spec["signerName"].as_str() != Some(KUBELET_CLIENT_SIGNER) {
        return Some("not the kubelet client signer".into());
    }
    let Some(node) = subject_cn.strip_prefix(NODE_USER_PREFIX).filter(|n| !n.is_empty()) else {
        return Some(format!("the subject's CN {subject_cn:?} is not system:node:<name>"));
    };
    if subject_orgs != [GROUP_NODES.to_string()] {
        return Some(format!("the subject's O must be exactly [system:nodes], not {subject_orgs:?}"));
    }
    let usages: Vec<&str> = spec["usages"].as_array().map(|u| u.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if !usages.contains(&"client auth")
        || usages.iter().any(|u| !matches!(*u, "client auth" | "digital signature" | "key encipherment"))
    {
        return Some(format!("usages {usages:?} are not a node client's (client auth, digital signature, key encipherment)"));
    }
    let renewal = user.node_name() == Some(node);
    if !user.in_group(GROUP_BOOTSTRAPPERS) && !renewal {
        return Some(format!("{} may not ask for the client certificate of node {node}", user.name));
    }
    None
}

/// Fills in who asked (never taken from the client) and, for a node client request this
/// requester may make, the approval and the signed certificate.
pub(crate) fn admit_create(state: &State, user: Option<&UserInfo>, obj: &mut Value) -> Result<(), ApiError> {
    let Some(user) = user else { return Err(ApiError::unauthorized()) };
    obj["spec"]["username"] = json!(user.name);
    obj["spec"]["groups"] = json!(user.groups);
    if !user.uid.is_empty() {
        obj["spec"]["uid"] = json!(user.uid);
    }
    obj["status"] = json!({});
    let request = obj["spec"]["request"].as_str().unwrap_or("");
    let pem = base64::engine::general_purpose::STANDARD
        .decode(request)
        .map_err(|_| ApiError::bad_request("spec.request is not base64"))?;
    let pem = String::from_utf8(pem).map_err(|_| ApiError::bad_request("spec.request is not a PEM CERTIFICATE REQUEST"))?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| ApiError::bad_request(format!("spec.request is not a valid, self-signed certificate request: {e}")))?;
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("spec.request is not PEM: {e}")))?;
    let (cn, orgs) = subject(&der.contents).ok_or_else(|| ApiError::bad_request("spec.request's subject cannot be read"))?;
    if let Some(why) = refusal(user, &obj["spec"], &cn, &orgs) {
        tracing::info!(requester = %user.name, %why, "certificate signing request left pending");
        return Ok(());
    }
    let longest = state.node_client_cert_validity.min(DEFAULT_VALIDITY);
    let validity = match obj["spec"]["expirationSeconds"].as_i64() {
        Some(s) => std::time::Duration::from_secs(s.max(MIN_VALIDITY_SECONDS) as u64).min(longest),
        None => longest,
    };
    let groups: Vec<&str> = orgs.iter().map(String::as_str).collect();
    let cert = crate::tls::sign_client(&state.ca_key_pem, &csr.public_key, &cn, &groups, validity)
        .map_err(|e| ApiError::internal(format!("signing the certificate failed: {e:#}")))?;
    let now = crate::objects::timestamp(crate::objects::now());
    obj["status"] = json!({
        "conditions": [{"type": "Approved", "status": "True", "reason": "AutoApproved",
                        "message": "Auto approving node client certificate (skiff's TLS bootstrap)",
                        "lastUpdateTime": now, "lastTransitionTime": now}],
        "certificate": base64::engine::general_purpose::STANDARD.encode(cert),
    });
    tracing::info!(requester = %user.name, subject = %cn, "signed a node client certificate");
    Ok(())
}

/// The CN and the Organizations of a DER certificate request's subject.
fn subject(der: &[u8]) -> Option<(String, Vec<String>)> {
    use x509_parser::prelude::FromDer as _;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(der).ok()?;
    let subject = &req.certification_request_info.subject;
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let orgs = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some((cn, orgs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(usages: &[&str]) -> Value {
        json!({"signerName": KUBELET_CLIENT_SIGNER, "usages": usages})
    }

    #[test]
    fn who_may_get_a_node_certificate() {
        let nodes = vec![GROUP_NODES.to_string()];
        let usages = ["digital signature", "client auth"];
        let bootstrapper = UserInfo::new("system:bootstrap:abcdef", &[GROUP_BOOTSTRAPPERS]);
        assert_eq!(refusal(&bootstrapper, &spec(&usages), "system:node:n1", &nodes), None);
        let n1 = UserInfo::new("system:node:n1", &[GROUP_NODES]);
        assert_eq!(refusal(&n1, &spec(&usages), "system:node:n1", &nodes), None, "a node renews its own");
        assert!(refusal(&n1, &spec(&usages), "system:node:n2", &nodes).is_some(), "never another node's");
        assert!(refusal(&UserInfo::new("alice", &[]), &spec(&usages), "system:node:n1", &nodes).is_some());
        assert!(refusal(&bootstrapper, &spec(&usages), "system:node:n1", &["system:masters".to_string()]).is_some());
        assert!(refusal(&bootstrapper, &spec(&usages), "admin", &nodes).is_some());
        assert!(refusal(&bootstrapper, &spec(&["server auth", "client auth"]), "system:node:n1", &nodes).is_some());
        let mut other = spec(&usages);
        other["signerName"] = json!("example.com/other");
        assert!(refusal(&bootstrapper, &other, "system:node:n1", &nodes).is_some());
    }
}
