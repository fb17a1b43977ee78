//! SQLite backend: a revision log in one table, like k3s's kine.
//!
//! Every write appends one row to `log`; the row's `id` (AUTOINCREMENT, so never reused) is the
//! write's revision. A key's current value is its newest row unless that row is a tombstone
//! (`deleted = 1`). Rows keep the value they replaced (`old_value`), so a watch can replay
//! history with `prev` values even after the replaced row has been compacted away.
//!
//! Writes go through one dedicated writer thread that owns the only writing connection. It
//! takes every request that is waiting, applies them in one `BEGIN IMMEDIATE` transaction and
//! commits once (group commit: one fsync for the batch, which is what lets concurrent writers
//! scale). With `journal_mode=WAL` and `synchronous=FULL`, COMMIT returns only after the WAL is
//! fsynced, and only then are callers answered, so no write is acknowledged before it is
//! durable. If anything in a batch fails at the SQL level the whole transaction rolls back and
//! every caller in it gets [`StoreError::Backend`]: nothing is half-written.
//!
//! Reads use a small pool of read-only connections on tokio's blocking threads; WAL gives each
//! read transaction a consistent snapshot, which is what makes a list consistent with its
//! revision.
//!
//! Watches: after committing, the writer publishes the batch's events, in revision order, on a
//! tokio broadcast channel. A watch subscribes first and then reads the log up to the revision
//! it sees committed (catch-up); live events at or below what catch-up delivered are skipped,
//! so there is neither a gap nor a duplicate. A watcher that lags behind the broadcast buffer
//! re-subscribes and catches up from the log again; if the history it needs has been compacted
//! meanwhile, it gets [`StoreError::Compacted`] and the stream ends. Nothing is skipped silently.
//!
//! One process owns a database file at a time (an exclusive `flock` on `<db>.lock`), because
//! watchers only learn about writes made through this process's writer.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use crate::{
    CompactionPolicy, KeyValue, ListResult, Result, Revision, Store, StoreError, WatchEvent,
    WatchStream,
};

/// How many queued writes one transaction takes at most.
const MAX_BATCH: usize = 256;
/// Events the broadcast channel buffers before a slow watcher lags (it then catches up from the
/// log, so this only trades memory against extra reads).
const EVENT_BUFFER: usize = 4096;
/// Rows a catching-up watcher reads per query.
const CATCH_UP_PAGE: i64 = 512;
/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name BLOB NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    value BLOB NOT NULL,
    old_value BLOB
);
CREATE INDEX IF NOT EXISTS log_name_id ON log (name, id);
CREATE UNIQUE INDEX IF NOT EXISTS log_name_prev_revision ON log (name, prev_revision);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Refuse writes that would grow the database past this size (like etcd's
    /// `--quota-backend-bytes`); such writes fail with `Backend` and change nothing. `None`: no
    /// limit but the disk's.
    pub max_database_bytes: Option<u64>,
}

/// The embedded store. Cheap to clone; the database closes when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Option<std::sync::mpsc::Sender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What reads and watch streams need; watch streams keep it alive, not the writer.
struct Shared {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    events: broadcast::WeakSender<Arc<WatchEvent>>,
}

enum WriteOp {
    Create {
        key: String,
        value: Vec<u8>,
    },
    Update {
        key: String,
        value: Vec<u8>,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

enum WriteOutcome {
    Revision(Revision),
    Deleted(Revision, KeyValue),
    Compacted,
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop after the batch in flight; joining makes the
        // database (and its lock) closed when the last handle is gone, so the same process can
        // reopen it right away.
        drop(self.writer.take());
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

fn backend(path: &Path, what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!(
        "sqlite {what} on {} failed: {error}",
        path.display()
    ))
}

impl SqliteStore {
    /// Opens (creating if needed) the store in the SQLite file at `path`. The file is locked
    /// for this process until the last handle is dropped.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with_options(path, SqliteOptions::default()).await
    }

    /// [`SqliteStore::open`] with options.
    pub async fn open_with_options(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, options))
            .await
            .map_err(|e| StoreError::Backend(format!("opening the sqlite store panicked: {e}")))?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<SqliteStore> {
        let lock_path = lock_path(&path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| backend(&path, "opening the lock file", e))?;
        // Another handle of this process may be closing the same file right now: give it a
        // moment before reporting the file as taken.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Backend(format!(
                        "sqlite store {} is in use by another process (lock {} is held); stop it \
                         or use another --data-dir",
                        path.display(),
                        lock_path.display()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(backend(&path, "locking", e));
                }
            }
        }

        let conn = Connection::open(&path).map_err(|e| backend(&path, "open", e))?;
        let journal_mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(|e| backend(&path, "setting WAL mode", e))?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "sqlite store {} cannot use WAL mode (got {journal_mode:?}); put it on a local \
                 filesystem",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(|e| backend(&path, "creating the schema", e))?;
        if let Some(max_bytes) = options.max_database_bytes {
            let page_size: i64 = conn
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .map_err(|e| backend(&path, "reading the page size", e))?;
            let max_pages = i64::try_from(max_bytes).unwrap_or(i64::MAX) / page_size.max(1);
            // SQLite answers with the limit it applied (never below the current size).
            conn.query_row(
                &format!("PRAGMA max_page_count = {}", max_pages.max(1)),
                [],
                |_| Ok(()),
            )
            .map_err(|e| backend(&path, "setting the size limit", e))?;
        }

        let (events_tx, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            path: path.clone(),
            readers: Mutex::new(Vec::new()),
            events: events_tx.downgrade(),
        });
        let (writer_tx, writer_rx) = std::sync::mpsc::channel();
        let writer_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("skiff-store-sqlite-writer".into())
            .spawn(move || {
                // The lock lives exactly as long as the writer.
                let _lock = lock;
                writer_loop(&writer_path, &conn, &writer_rx, &events_tx);
            })
            .map_err(|e| backend(&path, "starting the writer thread", e))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Some(writer_tx),
                writer_thread: Some(thread),
                shared,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// The revision history has been compacted up to (0: never).
    pub async fn compacted_revision(&self) -> Result<Revision> {
        self.read(|conn| compact_revision(conn)).await
    }

    /// Starts automatic compaction by `policy` on the current tokio runtime. It stops when the
    /// last handle of this store is dropped.
    pub fn start_compaction(&self, policy: CompactionPolicy) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        crate::run_compactor(
            move || weak.upgrade().map(|inner| Box::new(SqliteStore { inner })),
            policy,
        )
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, answer) = oneshot::channel();
        let writer = self
            .inner
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::Backend("sqlite store is closed".into()))?;
        writer.send(WriteRequest { op, reply }).map_err(|_| {
            StoreError::Backend("sqlite writer thread has stopped; restart the process".into())
        })?;
        answer.await.map_err(|_| {
            StoreError::Backend("sqlite writer thread stopped before answering".into())
        })?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.inner.shared.clone().read(f).await
    }
}

impl Shared {
    async fn read<T: Send + 'static>(
        self: Arc<Self>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(move || {
            let mut conn = self.reader()?;
            let result = f(&mut conn).map_err(|e| backend(&self.path, "read", e));
            if result.is_ok()
                && let Ok(mut idle) = self.readers.lock()
                && idle.len() < MAX_IDLE_READERS
            {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite read task failed: {e}")))?
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(conn) = self.readers.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| backend(&self.path, "opening a reader", e))?;
        conn.execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(|e| backend(&self.path, "configuring a reader", e))?;
        Ok(conn)
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// One row of the log.
#[derive(Debug, Clone)]
struct Row {
    id: Revision,
    name: Vec<u8>,
    created: bool,
    deleted: bool,
    create_revision: Revision,
    prev_revision: Revision,
    value: Vec<u8>,
    old_value: Option<Vec<u8>>,
}

const ROW_COLUMNS: &str =
    "id, name, created, deleted, create_revision, prev_revision, value, old_value";

impl Row {
    fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        Ok(Row {
            id: row.get(0)?,
            name: row.get(1)?,
            created: row.get(2)?,
            deleted: row.get(3)?,
            create_revision: row.get(4)?,
            prev_revision: row.get(5)?,
            value: row.get(6)?,
            old_value: row.get(7)?,
        })
    }

    /// A created row stores 0 and means itself: its id is only known after the insert.
    fn create_rev(&self) -> Revision {
        if self.created {
            self.id
        } else {
            self.create_revision
        }
    }

    fn key(&self) -> rusqlite::Result<String> {
        String::from_utf8(self.name.clone()).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, Box::new(e))
        })
    }

    fn kv(&self) -> rusqlite::Result<KeyValue> {
        Ok(KeyValue {
            key: self.key()?,
            value: self.value.clone(),
            create_revision: self.create_rev(),
            mod_revision: self.id,
        })
    }

    /// The value this row replaced, if it replaced one.
    fn prev_kv(&self) -> rusqlite::Result<Option<KeyValue>> {
        if self.created || self.prev_revision == 0 {
            return Ok(None);
        }
        Ok(Some(KeyValue {
            key: self.key()?,
            value: self.old_value.clone().unwrap_or_default(),
            create_revision: self.create_revision,
            mod_revision: self.prev_revision,
        }))
    }

    fn event(&self) -> rusqlite::Result<WatchEvent> {
        if self.deleted {
            let prev = self.prev_kv()?.unwrap_or(KeyValue {
                key: self.key()?,
                value: Vec::new(),
                create_revision: self.create_revision,
                mod_revision: self.prev_revision,
            });
            Ok(WatchEvent::Delete {
                revision: self.id,
                prev,
            })
        } else {
            Ok(WatchEvent::Put {
                kv: self.kv()?,
                prev: self.prev_kv()?,
            })
        }
    }
}

fn latest_row(conn: &Connection, name: &[u8]) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(&format!(
        "SELECT {ROW_COLUMNS} FROM log WHERE name = ?1 ORDER BY id DESC LIMIT 1"
    ))?
    .query_row(params![name], Row::from_sql)
    .optional()
}

fn current_revision(conn: &Connection) -> rusqlite::Result<Revision> {
    Ok(conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'log'")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

fn compact_revision(conn: &Connection) -> rusqlite::Result<Revision> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE name = 'compact_revision'")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Rows with `after < id <= upto` under `prefix`, oldest first, at most `limit`.
fn rows_between(
    conn: &Connection,
    prefix: &[u8],
    after: Revision,
    upto: Revision,
    limit: i64,
) -> rusqlite::Result<Vec<Row>> {
    // Prefix filtering happens in Rust when the prefix has no upper bound; otherwise in SQL, so
    // that a watcher on a small prefix does not read everyone's rows.
    let rows = match crate::prefix_end(prefix) {
        Some(end) => conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM log WHERE id > ?1 AND id <= ?2 \
                 AND name >= ?3 AND name < ?4 ORDER BY id LIMIT ?5"
            ))?
            .query_map(params![after, upto, prefix, end, limit], Row::from_sql)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM log WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3"
            ))?
            .query_map(params![after, upto, limit], Row::from_sql)?
            .filter(|row| {
                row.as_ref()
                    .map_or(true, |row| row.name.starts_with(prefix))
            })
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The writer.

/// An SQL failure inside a batch (rolls the batch back) or a refusal of one write (does not).
enum ApplyError {
    Sql(rusqlite::Error),
    Refused(StoreError),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Sql(e)
    }
}

fn writer_loop(
    path: &Path,
    conn: &Connection,
    requests: &std::sync::mpsc::Receiver<WriteRequest>,
    events: &broadcast::Sender<Arc<WatchEvent>>,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        run_batch(path, conn, batch, events);
    }
}

fn run_batch(
    path: &Path,
    conn: &Connection,
    batch: Vec<WriteRequest>,
    events: &broadcast::Sender<Arc<WatchEvent>>,
) {
    let fail_all = |batch: Vec<WriteRequest>, what: &str, error: &dyn std::fmt::Display| {
        let message = format!(
            "sqlite {what} on {} failed: {error}; nothing was written (check free disk space \
             and permissions, then retry)",
            path.display()
        );
        tracing::error!("{message}");
        for request in batch {
            let _ = request
                .reply
                .send(Err(StoreError::Backend(message.clone())));
        }
    };
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        fail_all(batch, "begin", &e);
        return;
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut new_events = Vec::new();
    for request in &batch {
        match apply(conn, &request.op) {
            Ok((outcome, event)) => {
                outcomes.push(Ok(outcome));
                new_events.extend(event);
            }
            Err(ApplyError::Refused(refusal)) => outcomes.push(Err(refusal)),
            Err(ApplyError::Sql(e)) => {
                let _ = conn.execute_batch("ROLLBACK");
                fail_all(batch, "write", &e);
                return;
            }
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        // A failed COMMIT may leave the transaction open; make sure it is gone.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        fail_all(batch, "commit", &e);
        return;
    }
    // Durable now. Publish first, so that a caller who reads its revision and then watches from
    // it finds the event either in the log or on the channel.
    for event in new_events {
        // No receivers is fine: nobody is watching.
        let _ = events.send(Arc::new(event));
    }
    for (request, outcome) in batch.into_iter().zip(outcomes) {
        let _ = request.reply.send(outcome);
    }
}

/// A row about to be appended (its id, the revision, is assigned by the insert).
struct NewRow<'a> {
    name: &'a [u8],
    created: bool,
    deleted: bool,
    create_revision: Revision,
    prev_revision: Revision,
    value: &'a [u8],
    old_value: Option<&'a [u8]>,
}

fn insert_row(conn: &Connection, row: NewRow<'_>) -> rusqlite::Result<Revision> {
    conn.prepare_cached(
        "INSERT INTO log (name, created, deleted, create_revision, prev_revision, value, \
         old_value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        row.name,
        row.created,
        row.deleted,
        row.create_revision,
        row.prev_revision,
        row.value,
        row.old_value
    ])?;
    Ok(conn.last_insert_rowid())
}

fn apply(
    conn: &Connection,
    op: &WriteOp,
) -> Result<(WriteOutcome, Option<WatchEvent>), ApplyError> {
    match op {
        WriteOp::Create { key, value } => {
            let current = latest_row(conn, key.as_bytes())?;
            if current.as_ref().is_some_and(|row| !row.deleted) {
                return Err(ApplyError::Refused(StoreError::AlreadyExists(key.clone())));
            }
            let prev_revision = current.map_or(0, |row| row.id);
            let id = insert_row(
                conn,
                NewRow {
                    name: key.as_bytes(),
                    created: true,
                    deleted: false,
                    create_revision: 0,
                    prev_revision,
                    value,
                    old_value: None,
                },
            )?;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: id,
                mod_revision: id,
            };
            Ok((
                WriteOutcome::Revision(id),
                Some(WatchEvent::Put { kv, prev: None }),
            ))
        }
        WriteOp::Update {
            key,
            value,
            expected,
        } => {
            let current = match latest_row(conn, key.as_bytes())? {
                Some(row) if !row.deleted => row,
                _ => return Err(ApplyError::Refused(StoreError::NotFound(key.clone()))),
            };
            if current.id != *expected {
                return Err(ApplyError::Refused(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    actual: current.id,
                }));
            }
            let create_revision = current.create_rev();
            let id = insert_row(
                conn,
                NewRow {
                    name: key.as_bytes(),
                    created: false,
                    deleted: false,
                    create_revision,
                    prev_revision: current.id,
                    value,
                    old_value: Some(&current.value),
                },
            )?;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision,
                mod_revision: id,
            };
            let prev = current.kv()?;
            Ok((
                WriteOutcome::Revision(id),
                Some(WatchEvent::Put {
                    kv,
                    prev: Some(prev),
                }),
            ))
        }
        WriteOp::Delete { key, expected } => {
            let current = match latest_row(conn, key.as_bytes())? {
                Some(row) if !row.deleted => row,
                _ => return Err(ApplyError::Refused(StoreError::NotFound(key.clone()))),
            };
            if let Some(expected) = expected
                && current.id != *expected
            {
                return Err(ApplyError::Refused(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    actual: current.id,
                }));
            }
            let id = insert_row(
                conn,
                NewRow {
                    name: key.as_bytes(),
                    created: false,
                    deleted: true,
                    create_revision: current.create_rev(),
                    prev_revision: current.id,
                    value: &[],
                    old_value: Some(&current.value),
                },
            )?;
            let prev = current.kv()?;
            Ok((
                WriteOutcome::Deleted(id, prev.clone()),
                Some(WatchEvent::Delete { revision: id, prev }),
            ))
        }
        WriteOp::Compact { revision } => {
            let current = current_revision(conn)?;
            if *revision > current {
                return Err(ApplyError::Refused(StoreError::Backend(format!(
                    "cannot compact at revision {revision}: the newest revision is {current}"
                ))));
            }
            if *revision <= compact_revision(conn)? {
                return Ok((WriteOutcome::Compacted, None));
            }
            // Record first (same transaction): a catch-up read sees either the old compact
            // revision and every row, or the new one and refuses.
            conn.prepare_cached(
                "INSERT INTO meta (name, value) VALUES ('compact_revision', ?1) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![revision])?;
            // Superseded rows and tombstones at or below the revision go; a key's current row
            // stays whatever its age.
            let removed = conn
                .prepare_cached(
                    "DELETE FROM log WHERE id <= ?1 AND (deleted = 1 OR id < \
                     (SELECT MAX(newer.id) FROM log AS newer WHERE newer.name = log.name))",
                )?
                .execute(params![revision])?;
            tracing::debug!(revision, removed, "sqlite store compacted");
            Ok((WriteOutcome::Compacted, None))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The trait.

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let name = key.as_bytes().to_vec();
        self.read(move |conn| match latest_row(conn, &name)? {
            Some(row) if !row.deleted => row.kv().map(Some),
            _ => Ok(None),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let prefix = prefix.as_bytes().to_vec();
        self.read(move |conn| {
            // One read transaction: the items and the revision come from the same snapshot.
            let tx = conn.transaction()?;
            let revision = current_revision(&tx)?;
            let mut items = Vec::new();
            let sql_latest = format!(
                "SELECT {ROW_COLUMNS} FROM log WHERE id IN (SELECT MAX(id) FROM log \
                 WHERE name >= ?1 {} GROUP BY name) AND deleted = 0 ORDER BY name",
                if crate::prefix_end(&prefix).is_some() {
                    "AND name < ?2"
                } else {
                    ""
                }
            );
            let mut statement = tx.prepare_cached(&sql_latest)?;
            let rows = match crate::prefix_end(&prefix) {
                Some(end) => statement.query_map(params![prefix, end], Row::from_sql)?,
                None => statement.query_map(params![prefix], Row::from_sql)?,
            };
            for row in rows {
                let row = row?;
                if row.name.starts_with(&prefix) {
                    items.push(row.kv()?);
                }
            }
            drop(statement);
            tx.commit()?;
            Ok(ListResult { items, revision })
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        match self
            .write(WriteOp::Create {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            WriteOutcome::Revision(revision) => Ok(revision),
            _ => Err(StoreError::Backend(
                "sqlite writer answered create with another op".into(),
            )),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        match self
            .write(WriteOp::Update {
                key: key.to_owned(),
                value,
                expected,
            })
            .await?
        {
            WriteOutcome::Revision(revision) => Ok(revision),
            _ => Err(StoreError::Backend(
                "sqlite writer answered update with another op".into(),
            )),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        match self
            .write(WriteOp::Delete {
                key: key.to_owned(),
                expected,
            })
            .await?
        {
            WriteOutcome::Deleted(revision, kv) => Ok((revision, kv)),
            _ => Err(StoreError::Backend(
                "sqlite writer answered delete with another op".into(),
            )),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.read(|conn| current_revision(conn)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let shared = self.inner.shared.clone();
        // Subscribe before reading the log: every event committed after our snapshot is then
        // on the channel.
        let live = subscribe(&shared)?;
        let (current, compacted) = shared
            .clone()
            .read(|conn| {
                let tx = conn.transaction()?;
                let state = (current_revision(&tx)?, compact_revision(&tx)?);
                tx.commit()?;
                Ok(state)
            })
            .await?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            });
        }
        let state = WatchState {
            shared,
            prefix: prefix.to_owned(),
            cursor: after,
            catch_up_to: current,
            buffered: VecDeque::new(),
            live,
            finished: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut state| async move {
                let item = state.next().await?;
                Some((item, state))
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.write(WriteOp::Compact { revision }).await? {
            WriteOutcome::Compacted => Ok(()),
            _ => Err(StoreError::Backend(
                "sqlite writer answered compact with another op".into(),
            )),
        }
    }
}

fn subscribe(shared: &Shared) -> Result<broadcast::Receiver<Arc<WatchEvent>>> {
    shared
        .events
        .upgrade()
        .map(|sender| sender.subscribe())
        .ok_or_else(|| StoreError::Backend("sqlite store is closed".into()))
}

struct WatchState {
    shared: Arc<Shared>,
    prefix: String,
    /// Everything at or below this revision has been delivered or skipped as not matching.
    cursor: Revision,
    /// Catch up from the log until the cursor reaches this revision, then go live.
    catch_up_to: Revision,
    buffered: VecDeque<WatchEvent>,
    live: broadcast::Receiver<Arc<WatchEvent>>,
    finished: bool,
}

impl WatchState {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Some(Ok(event));
            }
            if self.finished {
                return None;
            }
            if self.cursor < self.catch_up_to {
                if let Err(error) = self.read_page().await {
                    self.finished = true;
                    return Some(Err(error));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) => {
                    let revision = event.revision();
                    if revision <= self.cursor {
                        continue;
                    }
                    self.cursor = revision;
                    if event.key().starts_with(&self.prefix) {
                        return Some(Ok(WatchEvent::clone(&event)));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Too slow for the channel: re-subscribe, then fetch what was missed from
                    // the log (subscribing first again leaves no gap).
                    tracing::debug!(
                        missed,
                        cursor = self.cursor,
                        "sqlite watcher lagged; catching up from the log"
                    );
                    match subscribe(&self.shared) {
                        Ok(live) => self.live = live,
                        Err(error) => {
                            self.finished = true;
                            return Some(Err(error));
                        }
                    }
                    match self
                        .shared
                        .clone()
                        .read(|conn| current_revision(conn))
                        .await
                    {
                        Ok(current) => self.catch_up_to = current,
                        Err(error) => {
                            self.finished = true;
                            return Some(Err(error));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.finished = true;
                    return Some(Err(StoreError::Backend(
                        "sqlite store was closed; the watch ended".into(),
                    )));
                }
            }
        }
    }

    async fn read_page(&mut self) -> Result<()> {
        let prefix = self.prefix.as_bytes().to_vec();
        let (after, upto) = (self.cursor, self.catch_up_to);
        let (compacted, rows) = self
            .shared
            .clone()
            .read(move |conn| {
                let tx = conn.transaction()?;
                let compacted = compact_revision(&tx)?;
                let rows = if after < compacted {
                    Vec::new()
                } else {
                    rows_between(&tx, &prefix, after, upto, CATCH_UP_PAGE)?
                };
                tx.commit()?;
                Ok((compacted, rows))
            })
            .await?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            });
        }
        let full_page = rows.len() as i64 == CATCH_UP_PAGE;
        for row in &rows {
            let event = row
                .event()
                .map_err(|e| backend(&self.shared.path, "decoding a row", e))?;
            self.buffered.push_back(event);
        }
        self.cursor = match rows.last() {
            Some(last) if full_page => last.id,
            _ => upto,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(created: bool, deleted: bool) -> Row {
        Row {
            id: 9,
            name: b"k".to_vec(),
            created,
            deleted,
            create_revision: if created { 0 } else { 4 },
            prev_revision: 6,
            value: b"new".to_vec(),
            old_value: Some(b"old".to_vec()),
        }
    }

    #[test]
    fn rows_become_events_with_their_previous_value() {
        let created = row(true, false).event().expect("event");
        assert_eq!(
            created,
            WatchEvent::Put {
                kv: KeyValue {
                    key: "k".into(),
                    value: b"new".to_vec(),
                    create_revision: 9,
                    mod_revision: 9
                },
                prev: None
            }
        );
        let updated = row(false, false).event().expect("event");
        let prev = KeyValue {
            key: "k".into(),
            value: b"old".to_vec(),
            create_revision: 4,
            mod_revision: 6,
        };
        assert_eq!(
            updated,
            WatchEvent::Put {
                kv: KeyValue {
                    key: "k".into(),
                    value: b"new".to_vec(),
                    create_revision: 4,
                    mod_revision: 9
                },
                prev: Some(prev.clone())
            }
        );
        assert_eq!(
            row(false, true).event().expect("event"),
            WatchEvent::Delete { revision: 9, prev }
        );
    }

    #[test]
    fn lock_file_sits_beside_the_database() {
        assert_eq!(
            lock_path(Path::new("/d/store.db")),
            PathBuf::from("/d/store.db.lock")
        );
    }
}
