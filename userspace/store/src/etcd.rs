//! etcd backend: the same model on a real etcd (v3 API), for clusters that outgrow one machine.
//!
//! Every key lives under a prefix (for example `/skiff/`), so one etcd can hold several
//! clusters. etcd's revisions are used 1:1: a skiff revision is an etcd revision, which is
//! global to the whole etcd (writes outside the prefix advance it too).
//!
//! Compare-and-swap is an etcd transaction comparing `create_revision` / `mod_revision`; when it
//! fails, the `else` branch reads the key in the same transaction to tell `NotFound` from
//! `Conflict` without a race. etcd acknowledges a write only once its raft log is fsynced on a
//! quorum, which is the durability the trait promises.
//!
//! A request that times out or loses its connection is reported as `Backend`, but (as with any
//! remote store) such a write may still have been applied; the caller re-reads to find out.

use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::{KeyValue, ListResult, Result, Revision, Store, StoreError, WatchEvent, WatchStream};

/// How long one unary request may take before it is reported as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before re-sending a request that was refused before it was sent (a member down).
const NOT_SENT_RETRY_DELAY: Duration = Duration::from_millis(20);
/// How long to keep re-sending such a request: long enough for the channel to pick a live
/// member many times over, short enough that with every member down the caller hears so soon.
const NOT_SENT_RETRY_BUDGET: Duration = Duration::from_secs(2);
/// Keys per range request when listing (keeps each response far below gRPC's 4 MiB limit).
const LIST_PAGE: i64 = 500;

/// A store on etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (for example `http://127.0.0.1:2379`) and keeps every
    /// key under `prefix` (for example `/skiff/`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend(
                "no etcd endpoints given; pass at least one URL such as http://127.0.0.1:2379"
                    .into(),
            ));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client =
            tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
                .map_err(|_| {
                    StoreError::Backend(format!(
                        "connecting to etcd at {} timed out; is etcd running there?",
                        endpoints.join(",")
                    ))
                })?
                .map_err(|e| {
                    StoreError::Backend(format!(
                        "connecting to etcd at {} failed: {e}; is etcd running there?",
                        endpoints.join(",")
                    ))
                })?;
        let store = EtcdStore {
            client,
            prefix: prefix.to_owned(),
            endpoints: endpoints.to_vec(),
        };
        // Fail now, not at the first request, when nothing answers.
        store.current_revision().await?;
        Ok(store)
    }

    /// The prefix every key is stored under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The start of the etcd range holding every key under `prefix` (etcd refuses an empty
    /// key; "\0" starts the whole keyspace).
    fn range_start(&self, prefix: &str) -> Vec<u8> {
        let full = self.full_key(prefix);
        if full.is_empty() { vec![0] } else { full }
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(self.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn error(&self, what: &str, error: etcd_client::Error) -> StoreError {
        StoreError::Backend(format!(
            "etcd {what} at {} failed: {error}",
            self.endpoints.join(",")
        ))
    }

    fn timeout(&self, what: &str) -> StoreError {
        StoreError::Backend(format!(
            "etcd {what} at {} did not answer within {}s (the write may or may not have been \
             applied; re-read before retrying)",
            self.endpoints.join(","),
            REQUEST_TIMEOUT.as_secs()
        ))
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<etcd_client::TxnResponse> {
        let started = tokio::time::Instant::now();
        let deadline = started + REQUEST_TIMEOUT;
        loop {
            let mut kv = self.client.kv_client();
            match tokio::time::timeout_at(deadline, kv.txn(txn.clone()))
                .await
                .map_err(|_| self.timeout(what))?
            {
                // Refused before it was sent: safe to send again, even a write.
                Err(e) if never_sent(&e) && started.elapsed() < NOT_SENT_RETRY_BUDGET => {
                    tokio::time::sleep(NOT_SENT_RETRY_DELAY).await;
                }
                result => return result.map_err(|e| self.error(what, e)),
            }
        }
    }

    async fn range(
        &self,
        what: &str,
        key: Vec<u8>,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse> {
        let started = tokio::time::Instant::now();
        let deadline = started + REQUEST_TIMEOUT;
        loop {
            let mut kv = self.client.kv_client();
            match tokio::time::timeout_at(deadline, kv.get(key.clone(), Some(options.clone())))
                .await
                .map_err(|_| self.timeout(what))?
            {
                Err(e) if never_sent(&e) && started.elapsed() < NOT_SENT_RETRY_BUDGET => {
                    tokio::time::sleep(NOT_SENT_RETRY_DELAY).await;
                }
                result => return result.map_err(|e| self.error(what, e)),
            }
        }
    }

    fn convert(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        let key = kv.key();
        let key = key.strip_prefix(self.prefix.as_bytes()).ok_or_else(|| {
            StoreError::Backend(format!(
                "etcd returned key {:?} outside the prefix {:?}",
                String::from_utf8_lossy(key),
                self.prefix
            ))
        })?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| {
            StoreError::Backend(format!(
                "etcd key {:?} under {:?} is not UTF-8; something other than skiff wrote it",
                String::from_utf8_lossy(key),
                self.prefix
            ))
        })?;
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    fn revision_of(&self, response: &etcd_client::TxnResponse) -> Result<Revision> {
        response
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| StoreError::Backend("etcd answered without a response header".into()))
    }

    /// The key as the `else` branch of a failed transaction read it.
    fn else_get(&self, response: &etcd_client::TxnResponse) -> Result<Option<KeyValue>> {
        for op in response.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                return get.kvs().first().map(|kv| self.convert(kv)).transpose();
            }
        }
        Err(StoreError::Backend(
            "etcd transaction answered without its read".into(),
        ))
    }

    /// Converts one etcd event. `Err(None)`: etcd no longer has the value it replaced (the
    /// watch started right at a compaction); the caller reports that as `Compacted`.
    fn event(&self, event: &etcd_client::Event) -> Result<WatchEvent, Option<StoreError>> {
        let kv = event
            .kv()
            .ok_or_else(|| Some(StoreError::Backend("etcd watch event without a key".into())))?;
        let prev = event
            .prev_kv()
            .map(|kv| self.convert(kv))
            .transpose()
            .map_err(Some)?;
        match event.event_type() {
            EventType::Put => {
                // version 1 is a creation: nothing was replaced.
                if prev.is_none() && kv.version() > 1 {
                    return Err(None);
                }
                Ok(WatchEvent::Put {
                    kv: self.convert(kv).map_err(Some)?,
                    prev,
                })
            }
            EventType::Delete => match prev {
                Some(prev) => Ok(WatchEvent::Delete {
                    revision: kv.mod_revision(),
                    prev,
                }),
                None => Err(None),
            },
        }
    }
}

/// etcd's answer when a revision is gone.
/// Whether a request failed before it reached any etcd: the balanced channel picked a member
/// whose TCP connect was refused (one that is down). Nothing was sent, so the request, a write
/// too, may be sent again. etcd-client's balanced channel keeps picking a dead member for a
/// share of requests: in tests/faults_etcd_cluster.rs (one of three members down for 4 s, twice)
/// 5-9% of all write attempts of a run failed this way before this retry, and the apiserver
/// answered each with a 500; with it, none do.
fn never_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}", status.code()) == "Unavailable" && status.message() == "tcp connect error"
        }
        _ => false,
    }
}

fn is_compacted(error: &etcd_client::Error) -> bool {
    error
        .to_string()
        .contains("required revision has been compacted")
}

fn is_future_revision(error: &etcd_client::Error) -> bool {
    error
        .to_string()
        .contains("required revision is a future revision")
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let response = self
            .range("get", self.full_key(key), GetOptions::new())
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| self.convert(kv))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let full_prefix = self.range_start(prefix);
        let range_end = crate::prefix_end(&self.full_key(prefix)).unwrap_or_else(|| vec![0]);
        let mut items = Vec::new();
        let mut revision: Revision = 0;
        let mut from = full_prefix.clone();
        // Page through the range, every page at the revision of the first one, so the whole
        // list is one consistent snapshot.
        loop {
            let mut options = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self.range("list", from.clone(), options).await?;
            if revision == 0 {
                revision = response
                    .header()
                    .map(|header| header.revision())
                    .ok_or_else(|| {
                        StoreError::Backend("etcd answered without a response header".into())
                    })?;
            }
            for kv in response.kvs() {
                items.push(self.convert(kv)?);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult { items, revision })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(full, value, None)]);
        let response = self.txn("create", txn).await?;
        if response.succeeded() {
            self.revision_of(&response)
        } else {
            Err(StoreError::AlreadyExists(key.to_owned()))
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let full = self.full_key(key);
        // create_revision > 0: a missing key has mod_revision 0, which must not let
        // `update(key, _, 0)` create it.
        let txn = Txn::new()
            .when([
                Compare::create_revision(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(full.clone(), CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::put(full.clone(), value, Some(PutOptions::new()))])
            .or_else([TxnOp::get(full, None)]);
        let response = self.txn("update", txn).await?;
        if response.succeeded() {
            return self.revision_of(&response);
        }
        match self.else_get(&response)? {
            None => Err(StoreError::NotFound(key.to_owned())),
            Some(current) => Err(StoreError::Conflict {
                key: key.to_owned(),
                expected,
                actual: current.mod_revision,
            }),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let full = self.full_key(key);
        let mut compares = vec![Compare::create_revision(
            full.clone(),
            CompareOp::Greater,
            0,
        )];
        if let Some(expected) = expected {
            compares.push(Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                expected,
            ));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::delete(
                full.clone(),
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(full, None)]);
        let response = self.txn("delete", txn).await?;
        if response.succeeded() {
            let revision = self.revision_of(&response)?;
            for op in response.op_responses() {
                if let TxnOpResponse::Delete(deleted) = op
                    && let Some(prev) = deleted.prev_kvs().first()
                {
                    return Ok((revision, self.convert(prev)?));
                }
            }
            return Err(StoreError::Backend(
                "etcd delete succeeded without returning the deleted value".into(),
            ));
        }
        match (self.else_get(&response)?, expected) {
            (None, _) => Err(StoreError::NotFound(key.to_owned())),
            (Some(current), Some(expected)) => Err(StoreError::Conflict {
                key: key.to_owned(),
                expected,
                actual: current.mod_revision,
            }),
            (Some(_), None) => Err(StoreError::Backend(
                "etcd refused an unconditional delete of an existing key".into(),
            )),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .range(
                "reading the revision",
                self.range_start(""),
                GetOptions::new().with_count_only(),
            )
            .await?;
        response
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| StoreError::Backend("etcd answered without a response header".into()))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let full_prefix = self.range_start(prefix);
        let start = after.saturating_add(1).max(1);
        // Ask up front whether `start` is still held, so a compacted watch fails at call time
        // (a range at a compacted revision is refused, one in the future means "not compacted").
        if after > 0 {
            let probe = GetOptions::new().with_count_only().with_revision(start);
            let mut kv = self.client.kv_client();
            match tokio::time::timeout(REQUEST_TIMEOUT, kv.get(full_prefix.clone(), Some(probe)))
                .await
                .map_err(|_| self.timeout("watch"))?
            {
                Ok(_) => {}
                Err(e) if is_future_revision(&e) => {}
                Err(e) if is_compacted(&e) => {
                    let oldest = self.compacted_revision_hint().await;
                    return Err(StoreError::Compacted {
                        requested: after,
                        oldest,
                    });
                }
                Err(e) => return Err(self.error("watch", e)),
            }
        }
        let range_end = crate::prefix_end(&self.full_key(prefix)).unwrap_or_else(|| vec![0]);
        let options = WatchOptions::new()
            .with_range(range_end)
            .with_start_revision(start)
            .with_prev_key();
        let mut watch_client = self.client.watch_client();
        let stream = tokio::time::timeout(
            REQUEST_TIMEOUT,
            watch_client.watch(full_prefix, Some(options)),
        )
        .await
        .map_err(|_| self.timeout("watch"))?
        .map_err(|e| self.error("watch", e))?;
        let state = EtcdWatch {
            store: self.clone(),
            stream,
            after,
            buffered: std::collections::VecDeque::new(),
            pending_error: None,
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
        let current = self.current_revision().await?;
        if revision > current {
            return Err(StoreError::Backend(format!(
                "cannot compact at revision {revision}: the newest revision is {current}"
            )));
        }
        if revision <= 0 {
            return Ok(());
        }
        // etcd's compact(r) keeps the state at r, so every event after r still has its prev_kv
        // (the trait promises complete events from `after >= r`).
        let target = revision;
        let mut kv = self.client.kv_client();
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            kv.compact(target, Some(CompactionOptions::new().with_physical())),
        )
        .await
        .map_err(|_| self.timeout("compact"))?
        {
            Ok(_) => Ok(()),
            // Already compacted at or past it: nothing to do.
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) => Err(self.error("compact", e)),
        }
    }
}

impl EtcdStore {
    /// The oldest `after` a watch may use, as far as we can tell (0 if unknown): etcd tells the
    /// compact revision only to a watch that starts before it.
    async fn compacted_revision_hint(&self) -> Revision {
        let options = WatchOptions::new().with_start_revision(1);
        let mut watch_client = self.client.watch_client();
        let Ok(Ok(mut stream)) = tokio::time::timeout(
            REQUEST_TIMEOUT,
            watch_client.watch(self.full_key("\u{0}compaction-probe"), Some(options)),
        )
        .await
        else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(Some(response))) = tokio::time::timeout_at(deadline, stream.message()).await
        {
            if response.compact_revision() > 0 {
                return response.compact_revision() - 1;
            }
            if response.canceled() {
                break;
            }
        }
        0
    }
}

struct EtcdWatch {
    store: EtcdStore,
    /// Owns the request side too: dropping it would end the watch on the server.
    stream: etcd_client::WatchStream,
    after: Revision,
    buffered: std::collections::VecDeque<WatchEvent>,
    /// An error to report once the events before it are delivered.
    pending_error: Option<StoreError>,
    finished: bool,
}

impl EtcdWatch {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Some(Ok(event));
            }
            if let Some(error) = self.pending_error.take() {
                return Some(Err(error));
            }
            if self.finished {
                return None;
            }
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    self.finished = true;
                    return Some(Err(StoreError::Backend(
                        "etcd closed the watch stream; watch again from the last revision seen"
                            .into(),
                    )));
                }
                Err(e) => {
                    self.finished = true;
                    return Some(Err(self.store.error("watch", e)));
                }
            };
            if response.compact_revision() > 0 {
                self.finished = true;
                return Some(Err(StoreError::Compacted {
                    requested: self.after,
                    oldest: response.compact_revision() - 1,
                }));
            }
            if response.canceled() {
                self.finished = true;
                return Some(Err(StoreError::Backend(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ))));
            }
            for event in response.events() {
                match self.store.event(event) {
                    Ok(event) => {
                        self.after = event.revision();
                        self.buffered.push_back(event);
                    }
                    Err(error) => {
                        // Deliver what came before, then the error: nothing is skipped.
                        self.finished = true;
                        let error = error.unwrap_or(StoreError::Compacted {
                            requested: self.after,
                            oldest: event.kv().map_or(self.after + 1, |kv| kv.mod_revision()),
                        });
                        self.pending_error = Some(error);
                        break;
                    }
                }
            }
        }
    }
}
