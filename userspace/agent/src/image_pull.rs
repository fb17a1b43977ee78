//! Images on demand, as kubelet's image manager: `imagePullPolicy` (Always / IfNotPresent /
//! Never, defaulted as Kubernetes does when the API server left it unset), pulls through
//! [`ContainerRuntime::pull`] with the pod's `imagePullSecrets` (dockerconfigjson / dockercfg),
//! `Pulling` / `Pulled` / `Failed` / `BackOff` Events, and a per-pod, per-image back-off so a
//! failing pull waits as `ImagePullBackOff` between tries (10s doubling to 5 minutes, kubelet's
//! numbers, scaled by the agent's back-off base).
//!
//! `Always` pulls once per pod (the first start of its containers); kubelet pulls again on every
//! container start, which a one-second sync loop cannot tell apart from a re-check.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::api::Api;
use tracing::{info, warn};

use crate::runtime::{ContainerRuntime, ImageInfo, RuntimeError};

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Bound on remembered (pod, image) pairs: the oldest are forgotten first.
const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The container's policy; unset: `Always` for `:latest` or no tag, `IfNotPresent` otherwise (a
/// digest without a tag included), as the API server's defaulting does.
pub fn pull_policy(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Never") => PullPolicy::Never,
        _ => {
            let image = c.image.as_deref().unwrap_or_default();
            match skiff_runtime::Reference::parse(image) {
                Ok(r) if r.tag.as_deref() == Some("latest") => PullPolicy::Always,
                Ok(_) => PullPolicy::IfNotPresent,
                Err(_) => PullPolicy::Always,
            }
        }
    }
}

/// Why a container waits for its image: the waiting reason and message for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageWait {
    /// `ErrImagePull`, `ImagePullBackOff`, `ErrImageNeverPull`, `InvalidImageName`.
    pub reason: String,
    pub message: String,
}

/// An Event to post about the pod: (type, reason, message).
pub type PodEvent = (&'static str, &'static str, String);

#[derive(Default)]
struct Entry {
    /// A pull (or the first presence check) succeeded for this pod: use the store from now on.
    done: bool,
    failures: u32,
    next_try: Option<Instant>,
    last_error: String,
    touched: Option<Instant>,
}

#[derive(Default)]
struct Puller {
    entries: Mutex<HashMap<(String, String), Entry>>,
    /// One pull of an image at a time: the second pod waiting for it then finds it stored.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

static PULLER: LazyLock<Puller> = LazyLock::new(Puller::default);

fn with_entry<T>(key: &(String, String), f: impl FnOnce(&mut Entry) -> T) -> T {
    let mut map = PULLER.entries.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
        let oldest = map.iter().min_by_key(|(_, e)| e.touched).map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            map.remove(&k);
        }
    }
    let e = map.entry(key.clone()).or_default();
    e.touched = Some(Instant::now());
    f(e)
}

fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// The image of container `c` of `pod`, pulled if its policy says so. Events are returned for
/// the caller to post (so they go out through the agent's one event path).
pub async fn ensure_image(
    client: &kube::Client,
    runtime: &Arc<dyn ContainerRuntime>,
    pod: &Pod,
    c: &Container,
    backoff_base: Duration,
) -> (Result<ImageInfo, ImageWait>, Vec<PodEvent>) {
    let image = c.image.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let key = (uid, image.clone());
    let mut events = Vec::new();
    if skiff_runtime::Reference::parse(&image).is_err() {
        let message = format!("Failed to apply default image tag {image:?}: couldn't parse image name {image:?}");
        events.push(("Warning", "InspectFailed", message.clone()));
        return (Err(ImageWait { reason: "InvalidImageName".into(), message }), events);
    }
    let policy = pull_policy(c);
    let local = inspect(runtime, &image).await;
    let done = with_entry(&key, |e| e.done);
    match (&local, policy) {
        (Ok(info), PullPolicy::Never | PullPolicy::IfNotPresent) => {
            if !done {
                with_entry(&key, |e| e.done = true);
                events.push(("Normal", "Pulled", format!("Container image {image:?} already present on machine")));
            }
            return (Ok(info.clone()), events);
        }
        (Ok(info), PullPolicy::Always) if done => return (Ok(info.clone()), events),
        (Err(RuntimeError::ImageNotFound(_)), PullPolicy::Never) => {
            let message = format!("Container image {image:?} is not present with pull policy of Never");
            events.push(("Warning", "ErrImageNeverPull", message.clone()));
            return (Err(ImageWait { reason: "ErrImageNeverPull".into(), message }), events);
        }
        (Err(RuntimeError::ImageNotFound(_)), _) | (Ok(_), PullPolicy::Always) => {}
        (Err(e), _) => {
            return (Err(ImageWait { reason: "ErrImagePull".into(), message: format!("inspecting image {image:?}: {e}") }), events);
        }
    }

    // A pull is due, unless the last one failed recently.
    let now = Instant::now();
    if let Some(last) = with_entry(&key, |e| e.next_try.filter(|t| now < *t).map(|_| e.last_error.clone())) {
        return (
            Err(ImageWait { reason: "ImagePullBackOff".into(), message: format!("Back-off pulling image {image:?}: {last}") }),
            events,
        );
    }
    let configs = pull_secrets(client, pod).await;
    let gate = {
        let mut m = PULLER.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(image.clone()).or_default().clone()
    };
    let _pulling = gate.lock().await;
    events.push(("Normal", "Pulling", format!("Pulling image {image:?}")));
    let started = Instant::now();
    let rt = runtime.clone();
    let img = image.clone();
    let result = tokio::task::spawn_blocking(move || rt.pull(&img, &configs))
        .await
        .unwrap_or_else(|e| Err(RuntimeError::Failed(format!("the pull task failed: {e}"))));
    match result {
        Ok(info) => {
            with_entry(&key, |e| {
                e.done = true;
                e.failures = 0;
                e.next_try = None;
            });
            let took = started.elapsed();
            info!(image = %image, id = %info.id, ?took, "pulled image");
            events.push(("Normal", "Pulled", format!("Successfully pulled image {image:?} in {:.3}s", took.as_secs_f64())));
            (Ok(info), events)
        }
        Err(e) => {
            let message = format!("Failed to pull image {image:?}: {e}");
            warn!(image = %image, "{message}");
            let wait = with_entry(&key, |en| {
                en.failures += 1;
                let wait = backoff(backoff_base, en.failures);
                en.next_try = Some(Instant::now() + wait);
                en.last_error = e.to_string();
                wait
            });
            events.push(("Warning", "Failed", message.clone()));
            events.push(("Warning", "Failed", "Error: ErrImagePull".into()));
            events.push(("Normal", "BackOff", format!("Back-off pulling image {image:?} (next try in {}s)", wait.as_secs())));
            (Err(ImageWait { reason: "ErrImagePull".into(), message }), events)
        }
    }
}

async fn inspect(runtime: &Arc<dyn ContainerRuntime>, image: &str) -> Result<ImageInfo, RuntimeError> {
    let rt = runtime.clone();
    let img = image.to_string();
    tokio::task::spawn_blocking(move || rt.image(&img))
        .await
        .unwrap_or_else(|e| Err(RuntimeError::Failed(format!("the image task failed: {e}"))))
}

/// The docker config json payloads of the pod's `imagePullSecrets` (missing or foreign-typed
/// Secrets are skipped with a warning, as kubelet does).
async fn pull_secrets(client: &kube::Client, pod: &Pod) -> Vec<Vec<u8>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let names: Vec<String> = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .map(|v| v.iter().map(|r| r.name.clone()).filter(|n| !n.is_empty()).collect())
        .unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    for name in names {
        match api.get_opt(&name).await {
            Ok(Some(s)) => match docker_config_of(&s) {
                Some(json) => out.push(json),
                None => warn!(secret = %name, "imagePullSecret is neither kubernetes.io/dockerconfigjson nor kubernetes.io/dockercfg"),
            },
            Ok(None) => warn!(secret = %name, namespace = %ns, "imagePullSecret not found; pulling without it"),
            Err(e) => warn!(secret = %name, "reading imagePullSecret: {e}"),
        }
    }
    out
}

/// `.dockerconfigjson` as is; the legacy `.dockercfg` (the `auths` map alone) wrapped into one.
fn docker_config_of(s: &Secret) -> Option<Vec<u8>> {
    let data = s.data.as_ref()?;
    match s.type_.as_deref() {
        Some("kubernetes.io/dockerconfigjson") => data.get(".dockerconfigjson").map(|b| b.0.clone()),
        Some("kubernetes.io/dockercfg") => {
            let auths: serde_json::Value = serde_json::from_slice(&data.get(".dockercfg")?.0).ok()?;
            serde_json::to_vec(&serde_json::json!({ "auths": auths })).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn container(image: &str, policy: Option<&str>) -> Container {
        Container { name: "c".into(), image: Some(image.into()), image_pull_policy: policy.map(Into::into), ..Default::default() }
    }

    #[test]
    fn policy_defaults_like_kubernetes() {
        assert_eq!(pull_policy(&container("skiff/echo", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&container("skiff/echo:latest", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&container("skiff/echo:1.0", None)), PullPolicy::IfNotPresent);
        let d = format!("skiff/echo@sha256:{}", "a".repeat(64));
        assert_eq!(pull_policy(&container(&d, None)), PullPolicy::IfNotPresent);
        assert_eq!(pull_policy(&container("127.0.0.1:5000/a/b", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&container("skiff/echo:1.0", Some("Always"))), PullPolicy::Always);
        assert_eq!(pull_policy(&container("skiff/echo", Some("Never"))), PullPolicy::Never);
        assert_eq!(pull_policy(&container("skiff/echo", Some("IfNotPresent"))), PullPolicy::IfNotPresent);
    }

    #[test]
    fn backoff_doubles_from_the_base_to_five_minutes() {
        let b = Duration::from_secs(10);
        assert_eq!(backoff(b, 1), Duration::from_secs(10));
        assert_eq!(backoff(b, 2), Duration::from_secs(20));
        assert_eq!(backoff(b, 5), Duration::from_secs(160));
        assert_eq!(backoff(b, 6), MAX_BACKOFF);
        assert_eq!(backoff(b, 1000), MAX_BACKOFF);
    }

    #[test]
    fn secrets_of_both_docker_types() {
        let mut s = Secret { type_: Some("kubernetes.io/dockerconfigjson".into()), ..Default::default() };
        s.data = Some([(".dockerconfigjson".to_string(), ByteString(br#"{"auths":{}}"#.to_vec()))].into());
        assert_eq!(docker_config_of(&s), Some(br#"{"auths":{}}"#.to_vec()));
        let mut s = Secret { type_: Some("kubernetes.io/dockercfg".into()), ..Default::default() };
        s.data = Some([(".dockercfg".to_string(), ByteString(br#"{"r.example":{"auth":"eDp5"}}"#.to_vec()))].into());
        let v: serde_json::Value = serde_json::from_slice(&docker_config_of(&s).expect("wrapped")).expect("json");
        assert_eq!(v["auths"]["r.example"]["auth"], "eDp5");
        let s = Secret { type_: Some("Opaque".into()), ..Default::default() };
        assert_eq!(docker_config_of(&s), None);
    }
}
