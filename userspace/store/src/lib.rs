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
    Put { kv: KeyValue, prev: Option<KeyValue> },
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
    Conflict { key: String, expected: Revision, actual: Revision },
    /// The requested revision has been compacted away; the caller must re-list.
    #[error("revision {requested} is compacted (oldest available is {oldest})")]
    Compacted { requested: Revision, oldest: Revision },
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
    /// than what the store still holds.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Drops history at and below `revision` (current values stay).
    async fn compact(&self, revision: Revision) -> Result<()>;
}

pub mod etcd;
pub mod sqlite;
