//! The I/O shell: reflectors for Services and EndpointSlices feed a dirty set of Services; each
//! dirty Service is translated again (pure), diffed against what was applied (ledger), and only
//! the differences go to the datapath, whose own plan diffs each frontend against the maps.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use skiff_datapath::Datapath;
use tracing::{debug, info, warn};

use crate::apply::{self, Applied, Outcome};
use crate::health::{HealthCheck, HealthServer, health_check};
use crate::ledger::{Changes, Ledger, ServiceRef};
use crate::translate::{Frontend, NodeView, SERVICE_NAME_LABEL, Skip, translate};
use crate::{ProxyConfig, ProxyError};

/// Runs the proxy until `shutdown` completes: watches Services and EndpointSlices (all
/// namespaces) with `client`, waits for both initial lists, syncs the pinned maps once
/// (applying only the difference), then applies every change as it comes. Watch errors are
/// retried with back-off (the maps keep their last state meanwhile); failed map writes are
/// retried every `retry_interval`. Returns Ok on shutdown.
pub async fn run(
    client: kube::Client,
    datapath: Arc<Mutex<Datapath>>,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    config.validate()?;
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
    let svc_events = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(svc_writer);
    let eps_events = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(eps_writer);
    futures::pin_mut!(svc_events, eps_events);
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;

    let mut shell = Shell {
        node: NodeView {
            node_name: config.node_name.clone(),
            node_ips: config.node_ips.clone(),
        },
        health_server: HealthServer::new(config.node_ips.clone()),
        health: BTreeMap::new(),
        config,
        datapath,
        svc_store,
        eps_store,
        ledger: Ledger::default(),
        slice_owner: BTreeMap::new(),
        service_slices: BTreeMap::new(),
        dirty: BTreeSet::new(),
        retry: BTreeSet::new(),
        svc_listed: false,
        eps_listed: false,
        started: false,
    };
    let mut gc = tokio::time::interval(shell.config.conntrack_gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gc.tick().await; // the first tick is immediate: GC starts one interval after start
    let mut retry = tokio::time::interval(shell.config.retry_interval);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let batch_delay = shell.config.batch_delay;
    // Armed when something became dirty: changes inside the window go out together.
    let mut flush_at: Option<tokio::time::Instant> = None;

    loop {
        let flush_sleep = async {
            match flush_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => {
                info!("service proxy stopping");
                return Ok(());
            }
            Some(ev) = svc_events.next() => match ev {
                Ok(ev) => shell.on_service(ev),
                Err(e) => warn!("watching Services failed (retrying): {e}"),
            },
            Some(ev) = eps_events.next() => match ev {
                Ok(ev) => shell.on_slice(ev),
                Err(e) => warn!("watching EndpointSlices failed (retrying): {e}"),
            },
            _ = flush_sleep => {
                flush_at = None;
                shell.flush().await?;
            }
            _ = gc.tick(), if shell.started => shell.gc().await?,
            _ = retry.tick(), if shell.started && !shell.retry.is_empty() => {
                let again = std::mem::take(&mut shell.retry);
                shell.dirty.extend(again);
            }
        }
        if !shell.started && shell.svc_listed && shell.eps_listed {
            shell.startup().await?;
        }
        if shell.started && !shell.dirty.is_empty() && flush_at.is_none() {
            flush_at = Some(tokio::time::Instant::now() + batch_delay);
        }
    }
}

struct Shell {
    config: ProxyConfig,
    node: NodeView,
    datapath: Arc<Mutex<Datapath>>,
    svc_store: Store<Service>,
    eps_store: Store<EndpointSlice>,
    ledger: Ledger,
    /// The health-check node ports this node serves (Services with spec.healthCheckNodePort).
    health_server: HealthServer,
    /// What each such Service answers now (recomputed with its frontends).
    health: BTreeMap<ServiceRef, HealthCheck>,
    /// (namespace, slice name) -> the Service its label names.
    slice_owner: BTreeMap<(String, String), ServiceRef>,
    /// Service -> names of its slices (same namespace).
    service_slices: BTreeMap<ServiceRef, BTreeSet<String>>,
    dirty: BTreeSet<ServiceRef>,
    retry: BTreeSet<ServiceRef>,
    svc_listed: bool,
    eps_listed: bool,
    started: bool,
}

fn service_ref_of(s: &Service) -> Option<ServiceRef> {
    Some(ServiceRef::new(
        s.metadata.namespace.clone()?,
        s.metadata.name.clone()?,
    ))
}

/// (namespace, slice name) and the Service the slice belongs to, if it names one.
fn slice_ids(s: &EndpointSlice) -> Option<((String, String), Option<ServiceRef>)> {
    let ns = s.metadata.namespace.clone()?;
    let name = s.metadata.name.clone()?;
    let owner = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty())
        .map(|n| ServiceRef::new(ns.clone(), n.clone()));
    Some(((ns, name), owner))
}

impl Shell {
    fn on_service(&mut self, ev: watcher::Event<Service>) {
        match ev {
            watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                if let Some(r) = service_ref_of(&s) {
                    self.dirty.insert(r);
                }
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
            watcher::Event::InitDone => {
                self.svc_listed = true;
                if self.started {
                    // A re-list (after a watch gap): deletions may have gone unseen. Level-
                    // triggered: recompute everything; unchanged services cost no map write.
                    self.dirty_everything();
                }
            }
        }
    }

    fn on_slice(&mut self, ev: watcher::Event<EndpointSlice>) {
        match ev {
            watcher::Event::Apply(s) => {
                if let Some((id, owner)) = slice_ids(&s) {
                    self.unindex_slice(&id);
                    if let Some(o) = owner {
                        self.index_slice(id, o);
                    }
                }
            }
            watcher::Event::Delete(s) => {
                if let Some((id, owner)) = slice_ids(&s) {
                    self.unindex_slice(&id);
                    self.dirty.extend(owner);
                }
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
            watcher::Event::InitDone => {
                self.eps_listed = true;
                self.reindex_slices();
                if self.started {
                    self.dirty_everything();
                }
            }
        }
    }

    fn index_slice(&mut self, id: (String, String), owner: ServiceRef) {
        self.service_slices
            .entry(owner.clone())
            .or_default()
            .insert(id.1.clone());
        self.dirty.insert(owner.clone());
        self.slice_owner.insert(id, owner);
    }

    fn unindex_slice(&mut self, id: &(String, String)) {
        if let Some(old) = self.slice_owner.remove(id) {
            if let Some(set) = self.service_slices.get_mut(&old) {
                set.remove(&id.1);
                if set.is_empty() {
                    self.service_slices.remove(&old);
                }
            }
            self.dirty.insert(old);
        }
    }

    fn reindex_slices(&mut self) {
        self.slice_owner.clear();
        self.service_slices.clear();
        for s in self.eps_store.state() {
            if let Some((id, Some(owner))) = slice_ids(&s) {
                self.index_slice(id, owner);
            }
        }
    }

    fn dirty_everything(&mut self) {
        let all: Vec<ServiceRef> = self
            .svc_store
            .state()
            .iter()
            .filter_map(|s| service_ref_of(s))
            .chain(self.ledger.services().cloned())
            .collect();
        self.dirty.extend(all);
    }

    /// What `svc` wants now (nothing when the Service is gone): its frontends and its health
    /// check, if it has a health-check node port.
    fn desired(&self, svc: &ServiceRef) -> (Vec<Frontend>, Option<HealthCheck>) {
        let Some(service) = self
            .svc_store
            .get(&ObjectRef::new(&svc.name).within(&svc.namespace))
        else {
            return (Vec::new(), None);
        };
        let slices: Vec<Arc<EndpointSlice>> = self
            .service_slices
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.eps_store
                    .get(&ObjectRef::new(name).within(&svc.namespace))
            })
            .collect();
        let slice_refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
        let t = translate(&service, &slice_refs, &self.node);
        let health = health_check(&service, &slice_refs, &self.node.node_name);
        for skip in &t.skipped {
            match skip {
                Skip::UnsupportedProtocol { .. } | Skip::DuplicateFrontend { .. } => {
                    info!(service = %svc, "{skip}")
                }
                _ => debug!(service = %svc, "{skip}"),
            }
        }
        (t.frontends, health)
    }

    fn plan(&mut self, svc: &ServiceRef) -> Changes {
        let (desired, health) = self.desired(svc);
        match health {
            Some(h) => self.health.insert(svc.clone(), h),
            None => self.health.remove(svc),
        };
        let changes = self.ledger.plan(svc, desired);
        for (key, owner) in &changes.conflicts {
            warn!(service = %svc, frontend = %key, owner = %owner,
                  "frontend already belongs to another service: not programmed for this one");
        }
        self.dirty.extend(changes.released_to.iter().cloned());
        changes
    }

    fn record(&mut self, applied: &Applied) {
        for (svc, outcome) in &applied.outcomes {
            match outcome {
                Outcome::Upserted(f) => self.ledger.applied_ok(svc, f.clone()),
                Outcome::Deleted(k) => self.ledger.deleted(svc, *k),
                Outcome::UpsertFailed(k) => {
                    self.ledger.upsert_failed(svc, *k);
                    self.retry.insert(svc.clone());
                }
                Outcome::DeleteFailed(k) => {
                    self.ledger.delete_failed(svc, *k);
                    self.retry.insert(svc.clone());
                }
            }
            self.ledger.forget_if_empty(svc);
        }
        let (services, frontends) = self.ledger.programmed();
        self.config.stats.set_programmed(services, frontends);
    }

    /// After both initial lists: one sync of the pinned maps to everything the API holds.
    async fn startup(&mut self) -> Result<(), ProxyError> {
        let start = Instant::now();
        let mut refs: Vec<ServiceRef> = self
            .svc_store
            .state()
            .iter()
            .filter_map(|s| service_ref_of(s))
            .collect();
        refs.sort();
        let mut desired = Vec::new();
        for r in &refs {
            for f in self.plan(r).upserts {
                desired.push((r.clone(), f));
            }
        }
        // Everything is planned now; what became dirty while listing is covered.
        self.dirty.clear();
        let n = desired.len();
        let dp = self.datapath.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
            apply::startup_sync(&mut dp, desired)
        })
        .await
        .map_err(|e| ProxyError::Task(e.to_string()))?;
        self.record(&applied);
        let elapsed = start.elapsed();
        self.config
            .stats
            .record_sync(elapsed, applied.ops, applied.errors);
        self.config.stats.record_startup(elapsed, applied.ops);
        self.started = true;
        self.health_server.set(self.health.values());
        info!(
            services = refs.len(),
            frontends = n,
            ops = applied.ops,
            errors = applied.errors,
            ms = elapsed.as_millis() as u64,
            "service proxy synced the pinned maps"
        );
        if applied.backends_removed {
            self.sweep().await?;
        }
        Ok(())
    }

    /// Applies what changed for every dirty service.
    async fn flush(&mut self) -> Result<(), ProxyError> {
        if !self.started || self.dirty.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let dirty = std::mem::take(&mut self.dirty);
        let mut batch = Vec::new();
        for svc in &dirty {
            let changes = self.plan(svc);
            if changes.is_empty() {
                self.ledger.forget_if_empty(svc);
            } else {
                batch.push((svc.clone(), changes));
            }
        }
        // Health checks follow the API at once (a count can change with no map write).
        self.health_server.set(self.health.values());
        if batch.is_empty() {
            return Ok(());
        }
        let services = batch.len();
        let dp = self.datapath.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
            apply::apply_changes(&mut dp, batch)
        })
        .await
        .map_err(|e| ProxyError::Task(e.to_string()))?;
        self.record(&applied);
        let elapsed = start.elapsed();
        self.config
            .stats
            .record_sync(elapsed, applied.ops, applied.errors);
        debug!(
            services,
            ops = applied.ops,
            errors = applied.errors,
            us = elapsed.as_micros() as u64,
            "services reconciled"
        );
        if applied.backends_removed {
            self.sweep().await?;
        }
        Ok(())
    }

    async fn sweep(&self) -> Result<(), ProxyError> {
        let Some(lister) = self.config.netns_lister.clone() else {
            return Ok(());
        };
        let dp = self.datapath.clone();
        let destroyed = tokio::task::spawn_blocking(move || {
            let paths = lister();
            apply::sweep_udp(&dp, &paths)
        })
        .await
        .map_err(|e| ProxyError::Task(e.to_string()))?;
        if destroyed > 0 {
            info!(
                destroyed,
                "connected udp sockets to removed backends destroyed"
            );
        }
        self.config.stats.add_udp_destroyed(destroyed);
        Ok(())
    }

    async fn gc(&self) -> Result<(), ProxyError> {
        let dp = self.datapath.clone();
        let (udp, tcp) = (self.config.udp_idle_timeout, self.config.tcp_idle_timeout);
        let result = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
            dp.gc_conntrack(udp, tcp)
        })
        .await
        .map_err(|e| ProxyError::Task(e.to_string()))?;
        match result {
            Ok(s) => {
                debug!(scanned = s.scanned, deleted = s.deleted, "conntrack gc");
                self.config.stats.add_gc(s.deleted);
            }
            Err(e) => warn!(error = %e, "conntrack gc failed"),
        }
        Ok(())
    }
}
