//! Leader election through a coordination.k8s.io/v1 Lease, as client-go's `leaderelection`
//! with a `LeaseLock` does it: the leader renews `spec.renewTime` every `retry_period`; a
//! candidate takes the Lease over once it has seen no change to it for `leaseDurationSeconds`;
//! a leader that could not renew for `renew_deadline` stops its work (before anyone else may
//! take over, since `renew_deadline < lease_duration`); on shutdown the leader releases the
//! Lease so a standby takes over at its next try instead of waiting out the duration.
//!
//! Why hand-written: kube-runtime 4.2 has no leader election, and kube-lease-manager 0.12 (its
//! kube 4 line) takes the Lease with server-side apply and relies on the apiserver's
//! field-manager conflicts to keep a second candidate out. skiff serves apply as a merge patch
//! without managed fields, so with it two candidates could both win. This elector uses only
//! what skiff implements exactly: a read and a compare-and-swap write (PUT with the
//! resourceVersion read), which is also client-go's lock.
//!
//! Expiry is timed on this process's clock from when it last saw the Lease change, never by
//! comparing `renewTime` with the local clock, so clock skew between machines does not matter
//! (client-go does the same).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

/// A future that completes when the work must stop (leadership lost or shutdown).
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Which Lease to hold and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    pub namespace: String,
    pub name: String,
    /// This candidate's `holderIdentity`; unique per process.
    pub identity: String,
    /// `leaseDurationSeconds` written on the Lease: how long others wait after its last change.
    pub lease_duration: Duration,
    /// How long the leader keeps working without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderElection {
    /// Kubernetes' defaults (15 s / 10 s / 2 s) and a fresh identity.
    pub fn new(namespace: &str, name: &str) -> Self {
        LeaderElection {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// `kube-system/skiff-controller-manager`.
    pub fn controller_manager() -> Self {
        Self::new("kube-system", "skiff-controller-manager")
    }

    /// `kube-system/skiff-scheduler`.
    pub fn scheduler() -> Self {
        Self::new("kube-system", "skiff-scheduler")
    }

    /// The timing rules client-go enforces, so a leader always stops before a standby starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.lease_duration < Duration::from_secs(1) {
            anyhow::bail!(
                "leader election lease duration must be at least 1s (it is written in whole seconds)"
            );
        }
        if self.renew_deadline >= self.lease_duration {
            anyhow::bail!(
                "leader election renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline,
                self.lease_duration
            );
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            anyhow::bail!(
                "leader election retry period ({:?}) must be above zero and shorter than the renew deadline ({:?})",
                self.retry_period,
                self.renew_deadline
            );
        }
        if self.identity.is_empty() {
            anyhow::bail!("leader election identity must not be empty");
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// `<hostname>_<16 hex digits>`: the hostname says where the leader runs; the suffix keeps two
/// processes on one host apart (Kubernetes uses hostname + a UUID).
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "skiff".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64 finalizer: spreads the bits so near-equal inputs give unrelated suffixes.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{host}_{x:016x}")
}

/// The Lease spec to write to take or keep the Lease, or None while another holder's Lease
/// is live. `unchanged_for` is how long this process has seen the Lease unchanged.
pub(crate) fn next_spec(
    current: Option<&LeaseSpec>,
    identity: &str,
    lease_seconds: i32,
    unchanged_for: Duration,
    now: Timestamp,
) -> Option<LeaseSpec> {
    let holder = current
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    let ours = holder == Some(identity);
    if let Some(spec) = current
        && holder.is_some()
        && !ours
    {
        let their_seconds = spec.lease_duration_seconds.unwrap_or(lease_seconds).max(1);
        if unchanged_for < Duration::from_secs(their_seconds as u64) {
            return None;
        }
    }
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    Some(LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_seconds),
        renew_time: Some(MicroTime(now)),
        acquire_time: if ours {
            current
                .and_then(|s| s.acquire_time.clone())
                .or(Some(MicroTime(now)))
        } else {
            Some(MicroTime(now))
        },
        lease_transitions: Some(if ours || current.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    })
}

/// What identifies one state of the Lease: (holderIdentity, renewTime).
type LeaseRecord = (Option<String>, Option<Timestamp>);

struct Elector {
    api: Api<Lease>,
    election: LeaderElection,
    /// The Lease's (holder, renewTime) as last seen, and when it was first seen so.
    observed: Option<(LeaseRecord, Instant)>,
}

impl Elector {
    fn observe(&mut self, lease: &Lease) -> Duration {
        let spec = lease.spec.as_ref();
        let record = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
        );
        match &self.observed {
            Some((seen, since)) if *seen == record => since.elapsed(),
            _ => {
                self.observed = Some((record, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// One attempt: true when this candidate holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let e = &self.election;
        let now = Timestamp::now();
        let current = match self.api.get_opt(&e.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(e.name.clone()),
                        namespace: Some(e.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: next_spec(None, &e.identity, e.lease_seconds(), Duration::ZERO, now),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        self.observe(&created);
                        Ok(true)
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(err) => Err(err),
                };
            }
        };
        let unchanged_for = self.observe(&current);
        let e = &self.election;
        let Some(spec) = next_spec(
            current.spec.as_ref(),
            &e.identity,
            e.lease_seconds(),
            unchanged_for,
            now,
        ) else {
            return Ok(false);
        };
        let mut lease = current;
        lease.spec = Some(spec);
        // The resourceVersion read above makes this a compare-and-swap: of two candidates
        // writing the same version, one gets 409.
        match self
            .api
            .replace(&self.election.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the Lease up if this candidate still holds it (holder cleared, duration 1 s), so
    /// a standby takes over at its next try.
    async fn release(&mut self) {
        let e = &self.election;
        let Ok(Some(mut lease)) = self.api.get_opt(&e.name).await else {
            return;
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(e.identity.as_str()) {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self
            .api
            .replace(&e.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(
                "{}: released leader lease {}/{}",
                e.identity,
                e.namespace,
                e.name
            ),
            Err(err) => tracing::warn!(
                "{}: releasing leader lease {}/{} failed: {err}",
                e.identity,
                e.namespace,
                e.name
            ),
        }
    }
}

/// How long a leader's work gets to stop after its StopSignal before it is dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Aborts the work task when dropped, so dropping (aborting) the elector never leaves the
/// work running unelected.
struct AbortOnDrop(tokio::task::JoinHandle<anyhow::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Leading {
    Shutdown,
    Lost,
    WorkEnded(Result<anyhow::Result<()>, tokio::task::JoinError>),
}

/// Runs `work` only while this process holds the Lease, until `shutdown` completes.
///
/// `work` is called each time leadership is acquired, with a [`StopSignal`] that completes
/// when leadership is lost or on shutdown; it must then return promptly. Losing the Lease
/// stops the work and goes back to waiting for it. On shutdown the work is stopped and the
/// Lease released. Returns `work`'s error if it fails while leading (after releasing).
pub async fn run_leader_elected<F, Fut>(
    client: Client,
    election: LeaderElection,
    shutdown: impl Future<Output = ()>,
    mut work: F,
) -> anyhow::Result<()>
where
    F: FnMut(StopSignal) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    election.validate()?;
    let who = format!(
        "{} ({}/{})",
        election.identity, election.namespace, election.name
    );
    let mut elector = Elector {
        api: Api::namespaced(client, &election.namespace),
        election: election.clone(),
        observed: None,
    };
    tokio::pin!(shutdown);
    loop {
        // Candidate: try every retry period until the Lease is ours.
        tracing::info!("{who}: waiting to become leader");
        loop {
            let attempt = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = tokio::time::timeout(election.renew_deadline, elector.try_acquire_or_renew()) => r,
            };
            match attempt {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!("{who}: acquiring the leader lease failed: {e}"),
                Err(_) => tracing::warn!("{who}: acquiring the leader lease timed out"),
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(election.retry_period) => {}
            }
        }
        tracing::info!("{who}: became leader");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop: StopSignal = Box::pin(async move {
            let _ = stop_rx.await;
        });
        let mut task = AbortOnDrop(tokio::spawn(work(stop)));
        let mut renewed = Instant::now();
        let why = loop {
            tokio::select! {
                _ = &mut shutdown => break Leading::Shutdown,
                r = &mut task.0 => break Leading::WorkEnded(r),
                _ = tokio::time::sleep(election.retry_period) => {}
            }
            let left = election.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, elector.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!("{who}: another candidate holds the leader lease");
                    break Leading::Lost;
                }
                Ok(Err(e)) => tracing::warn!("{who}: renewing the leader lease failed: {e}"),
                Err(_) => {}
            }
            if renewed.elapsed() >= election.renew_deadline {
                tracing::warn!(
                    "{who}: could not renew the leader lease for {:?}",
                    election.renew_deadline
                );
                break Leading::Lost;
            }
        };
        match why {
            Leading::Shutdown | Leading::Lost => {
                let _ = stop_tx.send(());
                match tokio::time::timeout(STOP_TIMEOUT, &mut task.0).await {
                    Ok(Ok(Err(e))) => tracing::warn!("{who}: work ended with an error: {e:#}"),
                    Ok(_) => {}
                    Err(_) => {
                        tracing::warn!(
                            "{who}: work did not stop within {STOP_TIMEOUT:?}; aborting it"
                        );
                        task.0.abort();
                    }
                }
                if matches!(why, Leading::Shutdown) {
                    elector.release().await;
                    return Ok(());
                }
                tracing::warn!("{who}: stopped leading");
            }
            Leading::WorkEnded(result) => {
                elector.release().await;
                return match result {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!(
                        "{who}: work panicked or was cancelled: {e}"
                    )),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn held_by(who: &str, seconds: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.to_string()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(at(100))),
            acquire_time: Some(MicroTime(at(50))),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_lease_is_taken_with_zero_transitions() {
        let s = next_spec(None, "me", 15, Duration::ZERO, at(10)).expect("taken");
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(0));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.acquire_time, Some(MicroTime(at(10))));
    }

    #[test]
    fn a_live_lease_of_another_holder_is_left_until_unchanged_for_its_duration() {
        let theirs = held_by("other", 15, 3);
        assert!(next_spec(Some(&theirs), "me", 10, Duration::from_secs(14), at(200)).is_none());
        // Their duration counts, not ours.
        let s =
            next_spec(Some(&theirs), "me", 10, Duration::from_secs(15), at(200)).expect("expired");
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(at(200))));
        assert_eq!(s.lease_duration_seconds, Some(10));
    }

    #[test]
    fn renewing_keeps_acquire_time_and_transitions() {
        let mine = held_by("me", 15, 3);
        let s = next_spec(Some(&mine), "me", 15, Duration::ZERO, at(300)).expect("renewed");
        assert_eq!(s.acquire_time, Some(MicroTime(at(50))));
        assert_eq!(s.renew_time, Some(MicroTime(at(300))));
        assert_eq!(s.lease_transitions, Some(3));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut released = held_by("other", 1, 2);
        released.holder_identity = None;
        let s = next_spec(Some(&released), "me", 15, Duration::ZERO, at(400)).expect("free");
        assert_eq!(s.holder_identity.as_deref(), Some("me"));
        assert_eq!(s.lease_transitions, Some(3));
    }

    #[test]
    fn timing_rules_are_enforced() {
        let mut e = LeaderElection::controller_manager();
        assert!(e.validate().is_ok());
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            ("kube-system", "skiff-controller-manager")
        );
        e.renew_deadline = e.lease_duration;
        assert!(e.validate().is_err());
        let mut e = LeaderElection::scheduler();
        e.retry_period = e.renew_deadline;
        assert!(e.validate().is_err());
        assert_ne!(
            default_identity(),
            default_identity(),
            "identities differ per call"
        );
    }
}
