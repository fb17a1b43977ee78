//! The service-account token a pod gets, as kubelet projects it: a token bound to the pod
//! (TokenRequest with boundObjectRef), the cluster CA and the namespace in
//! `/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}`, unless
//! `automountServiceAccountToken` is false (on the pod, else on its ServiceAccount: the pod's
//! setting is the only one read here) or a container mounts something there itself. The token
//! is refreshed when 80% of its life has passed, as kubelet does.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;

pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// kubelet asks for an hour and seven seconds (the seven tell its tokens apart in audits).
const EXPIRATION_SECONDS: i64 = 3607;

/// Whether the pod gets a token mounted.
pub fn wants_token(pod: &Pod) -> bool {
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.automount_service_account_token == Some(false) {
        return false;
    }
    let all = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    !all.flat_map(|c| c.volume_mounts.iter().flatten()).any(|m| m.mount_path.trim_end_matches('/') == MOUNT_PATH)
}

fn write_atomic(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes (or refreshes) the pod's token directory under `pod_dir`; returns it, or None when
/// the pod gets no token.
pub async fn ensure(client: &kube::Client, ca_pem: Option<&str>, pod: &Pod, pod_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !wants_token(pod) {
        return Ok(None);
    }
    let dir = pod_dir.join("serviceaccount");
    let token_path = dir.join("token");
    let fresh = std::fs::metadata(&token_path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < Duration::from_secs((EXPIRATION_SECONDS as u64) * 8 / 10));
    if fresh {
        return Ok(Some(dir));
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(EXPIRATION_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let answer = api
        .create_token_request(&sa, &Default::default(), &request)
        .await
        .map_err(|e| anyhow::anyhow!("requesting a token of service account {ns}/{sa} for pod {name}: {e}"))?;
    let token = answer.status.map(|s| s.token).filter(|t| !t.is_empty()).ok_or_else(|| anyhow::anyhow!("the TokenRequest for {ns}/{sa} came back without a token"))?;
    std::fs::create_dir_all(&dir)?;
    write_atomic(&dir.join("namespace"), ns.as_bytes())?;
    write_atomic(&dir.join("ca.crt"), ca_pem.unwrap_or_default().as_bytes())?;
    write_atomic(&token_path, token.as_bytes())?;
    Ok(Some(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_gets_a_token() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        assert!(wants_token(&pod(serde_json::json!({"spec": {"containers": [{"name": "c"}]}}))));
        assert!(!wants_token(&pod(serde_json::json!({"spec": {"automountServiceAccountToken": false, "containers": [{"name": "c"}]}}))));
        assert!(!wants_token(&pod(serde_json::json!({"spec": {"containers": [{"name": "c",
            "volumeMounts": [{"name": "own", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount/"}]}]}}))));
    }
}
