//! skiff-store: the key-value store under the apiserver.
//!
//! One [`Store`] trait, two backends that pass one conformance suite:
//! - [`sqlite::SqliteStore`] (default): an embedded revision log in SQLite, like k3s's kine, so one
//!   machine needs no other process.
//! - [`etcd::EtcdStore`]: a real etcd (v3 API) for clusters that outgrow one machine.
//!
//! The model is etcd's: a global, monotonic `revision` counts every write; each key carries the
//! revision that created it and the one that last modified it. The apiserver uses a key's
//! `mod_revision` as the object's `metadata.resourceVersion`, and a watch resumes from any revision
//! the store still holds (older ones answer [`StoreError::Compacted`], which the apiserver turns into
//! 410 Expired).
//!
//! Invariant: no call returns `Ok` for a write before that write is durable (fsynced / committed by
//! the etcd quorum).
//!
//! Opening one (both are cheap to clone and usable as `Arc<dyn Store>`):
//! - `SqliteStore::open(data_dir.join("store.db")).await?`, then
//!   `store.start_compaction(CompactionPolicy::default())` for automatic compaction;
//! - `EtcdStore::connect(&endpoints, "/skiff/").await?`, then
//!   `spawn_compactor(Arc::downgrade(&store), CompactionPolicy::default())`.
//!
//! [`etcd_server`] starts a throwaway etcd for tests and benchmarks.
//!
//! [`encryption::EncryptedStore`] wraps either backend and keeps the values under a prefix
//! (Secrets) encrypted at rest with AES-GCM, as Kubernetes' `aesgcm` provider does.

use std::pin::Pin;

use futures::Stream;

/// A store revision. Starts at 1 for the first write; 0 means "none".
pub type Revision = i64;

/// A stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (the latest creation, if it was re-created).
    pub create_revision: Revision,
    /// Revision of the write that last changed this key.
    pub mod_revision: Revision,
}

/// One change seen by a watch. Events arrive in revision order, at most one per revision per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or updated. `prev` is the value before, when there was one.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// A key was deleted at `revision`; `prev` is the last value it had.
    Delete { revision: Revision, prev: KeyValue },
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { kv, .. } => &kv.key,
            WatchEvent::Delete { prev, .. } => &prev.key,
        }
    }
}

/// What a list returns: the items under a prefix, and the store revision they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    pub revision: Revision,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0:?} not found")]
    NotFound(String),
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    /// Compare-and-swap failed: the key changed since the revision the caller read.
    #[error("key {key:?} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    /// The requested revision has been compacted away; the caller must re-list.
    /// `requested` is the `after` the caller asked for, `oldest` the smallest `after` a watch can
    /// still start from.
    #[error("revision {requested} is compacted (oldest available is {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The backend is unreachable or failed (disk full, etcd down, ...). Nothing was written.
    #[error("store backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Lists every key starting with `prefix`, in key order, at one consistent revision.
    async fn list(&self, prefix: &str) -> Result<ListResult>;

    /// Creates `key`; fails with `AlreadyExists` if it is there. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;

    /// Replaces `key` if its `mod_revision` is still `expected`; `NotFound` if it is gone,
    /// `Conflict` if it changed. Returns the new revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision>;

    /// Deletes `key` (only if its `mod_revision` is `expected`, when given). Returns the revision of
    /// the delete and the last value.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// The current revision of the whole store.
    async fn current_revision(&self) -> Result<Revision>;

    /// Streams every change under `prefix` with a revision strictly greater than `after`.
    /// Fails with `Compacted` (at call time or as the first stream item) when `after` is older
    /// than what the store still holds: after `compact(c)`, any `after >= c` is served with
    /// complete events (including `prev`), and any `after < c - 1` fails. `after == c - 1` fails
    /// on SQLite; etcd still holds revision `c` itself and may serve it, or fail with `Compacted`
    /// at the first event whose `prev` it no longer has. Either way no event is ever skipped. A stream never skips an event silently: a watcher that falls too far
    /// behind either catches up from the log or gets an error item and the stream ends.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Drops history at and below `revision` (current values stay). Compacting at or below an
    /// already compacted revision does nothing; a revision newer than the store's fails with
    /// `Backend`.
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// When to compact automatically (see [`spawn_compactor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// How often to compact. History younger than one interval is always kept, like the
    /// Kubernetes apiserver's own 5-minute etcd compaction.
    pub interval: std::time::Duration,
    /// Always keep at least this many of the newest revisions, however old they are.
    pub min_retained_revisions: i64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            interval: std::time::Duration::from_secs(300),
            min_retained_revisions: 1000,
        }
    }
}

/// Where to compact now, given the revision seen one interval ago and the current one; `None`
/// when nothing may be dropped yet.
pub fn compaction_target(
    revision_one_interval_ago: Revision,
    current: Revision,
    already_compacted: Revision,
    min_retained_revisions: i64,
) -> Option<Revision> {
    let target =
        revision_one_interval_ago.min(current.saturating_sub(min_retained_revisions.max(0)));
    (target > already_compacted && target > 0).then_some(target)
}

/// Starts a tokio task that compacts `store` by `policy` until the store is dropped (it holds
/// only a weak reference). Errors are logged and retried at the next tick.
pub fn spawn_compactor<S: Store + ?Sized>(
    store: std::sync::Weak<S>,
    policy: CompactionPolicy,
) -> tokio::task::JoinHandle<()> {
    run_compactor(move || store.upgrade(), policy)
}

/// The compaction loop, over anything that can hand out a strong store handle for one tick.
pub(crate) fn run_compactor<S, D, F>(
    upgrade: F,
    policy: CompactionPolicy,
) -> tokio::task::JoinHandle<()>
where
    S: Store + ?Sized,
    D: std::ops::Deref<Target = S> + Send + 'static,
    F: Fn() -> Option<D> + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(policy.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut previous_sample: Option<Revision> = None;
        let mut compacted: Revision = 0;
        loop {
            ticker.tick().await;
            let Some(store) = upgrade() else { return };
            let current = match store.current_revision().await {
                Ok(current) => current,
                Err(error) => {
                    tracing::warn!(%error, "automatic compaction: reading the current revision failed");
                    continue;
                }
            };
            if let Some(sample) = previous_sample
                && let Some(target) =
                    compaction_target(sample, current, compacted, policy.min_retained_revisions)
            {
                match store.compact(target).await {
                    Ok(()) => {
                        tracing::debug!(revision = target, "automatic compaction done");
                        compacted = target;
                    }
                    Err(error) => {
                        tracing::warn!(%error, revision = target, "automatic compaction failed")
                    }
                }
            }
            previous_sample = Some(current);
            // Hold no strong handle while sleeping, so dropping the store ends this task.
            drop(store);
        }
    })
}

/// The smallest byte string greater than every string starting with `prefix`; `None` when no
/// such bound exists (empty prefix or all 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn compaction_keeps_one_interval_and_the_minimum_history() {
        // One interval ago the store was at 500, now at 2000, keep 1000: compact at 500.
        assert_eq!(compaction_target(500, 2000, 0, 1000), Some(500));
        // The minimum history is the tighter bound.
        assert_eq!(compaction_target(1900, 2000, 0, 1000), Some(1000));
        // Nothing new to drop.
        assert_eq!(compaction_target(500, 2000, 500, 1000), None);
        // Young store: nothing to drop at all.
        assert_eq!(compaction_target(10, 20, 0, 1000), None);
        assert_eq!(compaction_target(0, 0, 0, 0), None);
    }

    #[test]
    fn watch_event_key_and_revision() {
        let kv = KeyValue {
            key: "a".into(),
            value: vec![1],
            create_revision: 3,
            mod_revision: 5,
        };
        let put = WatchEvent::Put {
            kv: kv.clone(),
            prev: None,
        };
        assert_eq!((put.key(), put.revision()), ("a", 5));
        let delete = WatchEvent::Delete {
            revision: 7,
            prev: kv,
        };
        assert_eq!((delete.key(), delete.revision()), ("a", 7));
    }
}

pub mod etcd;
pub mod etcd_server;
pub mod sqlite;
pub mod encryption;
