//! Authentication: who a request is, as Kubernetes' `user.Info` (name, uid, groups).
//!
//! Authenticators, tried in Kubernetes' order:
//! - an X.509 client certificate the TLS layer verified against the cluster CA: the subject's
//!   CommonName is the user, each Organization a group (as kube-apiserver's x509 authenticator);
//! - a bearer token: the admin token (`system:admin` in `system:masters`), a bootstrap token
//!   (`system:bootstrap:<id>` in `system:bootstrappers`, see `bootstrap_token`), or a
//!   service-account token (a JWT the apiserver signed, see `sa_token`).
//!
//! A bearer token that is sent but not valid is a 401 even when a certificate is presented too
//! (a client that sends a stale token should learn about it, not fall back silently); no
//! credential at all is a 401 except on the public paths (`http::handle_inner`).

use http::{HeaderMap, header};

use crate::State;

pub const GROUP_AUTHENTICATED: &str = "system:authenticated";
pub const GROUP_MASTERS: &str = "system:masters";
pub const GROUP_NODES: &str = "system:nodes";
pub const GROUP_BOOTSTRAPPERS: &str = "system:bootstrappers";
pub const NODE_USER_PREFIX: &str = "system:node:";
pub const ADMIN_USER: &str = "system:admin";

/// Who a request authenticated as (Kubernetes' `user.Info`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// Extra attributes (a service-account token's pod: `authentication.kubernetes.io/pod-name`).
    pub extra: Vec<(String, Vec<String>)>,
}

impl UserInfo {
    pub fn new(name: impl Into<String>, groups: &[&str]) -> UserInfo {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == GROUP_AUTHENTICATED) {
            groups.push(GROUP_AUTHENTICATED.to_string());
        }
        UserInfo { name: name.into(), groups, ..Default::default() }
    }

    pub fn admin() -> UserInfo {
        UserInfo::new(ADMIN_USER, &[GROUP_MASTERS])
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node name when this is a node's identity (`system:node:<name>` in `system:nodes`).
    pub fn node_name(&self) -> Option<&str> {
        let name = self.name.strip_prefix(NODE_USER_PREFIX)?;
        (!name.is_empty() && self.in_group(GROUP_NODES)).then_some(name)
    }

    /// `(namespace, name)` when this is a service account (`system:serviceaccount:<ns>:<name>`).
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.name.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

/// The user a verified client certificate names: CN the user, O the groups. None when the
/// certificate has no CommonName (Kubernetes refuses those too).
pub fn user_from_certificate(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    if name.is_empty() {
        return None;
    }
    let orgs: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    let refs: Vec<&str> = orgs.iter().map(String::as_str).collect();
    Some(UserInfo::new(name, &refs))
}

/// The credential a request carries, checked.
pub enum Outcome {
    User(UserInfo),
    /// No credential at all.
    Anonymous,
    /// A credential that is unknown, expired or tampered with.
    Refused,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Authenticates a request from its headers and the connection's verified client certificate.
pub(crate) async fn authenticate(state: &State, headers: &HeaderMap, cert_user: Option<&UserInfo>) -> Outcome {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim));
    match bearer {
        // An Authorization header that is not a readable bearer token is a bad credential.
        Some(None) | Some(Some("")) => Outcome::Refused,
        Some(Some(token)) => match token_user(state, token).await {
            Some(user) => Outcome::User(user),
            None => Outcome::Refused,
        },
        None => match cert_user {
            Some(user) => Outcome::User(user.clone()),
            None => Outcome::Anonymous,
        },
    }
}

async fn token_user(state: &State, token: &str) -> Option<UserInfo> {
    // Constant-time compare: the token is the cluster's admin credential.
    if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) {
        return Some(UserInfo::admin());
    }
    if crate::bootstrap_token::parse_token(token).is_some() {
        return crate::bootstrap_token::authenticate(state, token).await;
    }
    crate::sa_token::authenticate(state, token).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_subject_is_the_user() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "system:node:n1");
        dn.push(rcgen::DnType::OrganizationName, "system:nodes");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let user = user_from_certificate(cert.der()).expect("a user");
        assert_eq!(user.name, "system:node:n1");
        assert_eq!(user.groups, vec!["system:nodes".to_string(), GROUP_AUTHENTICATED.to_string()]);
        assert_eq!(user.node_name(), Some("n1"));
        assert_eq!(UserInfo::new("system:node:n1", &[]).node_name(), None, "a node name without the group is no node");
        assert!(user_from_certificate(b"not der").is_none());
    }

    #[test]
    fn service_account_names() {
        let u = UserInfo::new("system:serviceaccount:ns1:default", &[]);
        assert_eq!(u.service_account(), Some(("ns1", "default")));
        assert_eq!(UserInfo::admin().service_account(), None);
    }
}
