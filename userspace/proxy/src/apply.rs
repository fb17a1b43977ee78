//! Executing frontend changes on the datapath (blocking map syscalls: called from
//! `spawn_blocking`), and the stale-UDP-socket sweep that has to enter other network namespaces.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use skiff_datapath::{Datapath, DatapathError, MapOp, Proto, ServiceSpec, plan};
use skiff_ebpf_common::{raw_to_ip4, raw_to_port};
use tracing::{debug, warn};

use crate::ledger::{Changes, ServiceRef};
use crate::translate::{Frontend, FrontendKey};

/// What happened to one frontend.
#[derive(Debug)]
pub(crate) enum Outcome {
    Upserted(Frontend),
    UpsertFailed(FrontendKey),
    Deleted(FrontendKey),
    DeleteFailed(FrontendKey),
}

#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub ops: usize,
    pub errors: usize,
    /// A backend was deleted: connected UDP sockets may point at it (sweep them).
    pub backends_removed: bool,
    pub outcomes: Vec<(ServiceRef, Outcome)>,
}

impl Applied {
    fn count(&mut self, ops: &[MapOp]) {
        self.ops += ops.len();
        if ops.iter().any(|o| matches!(o, MapOp::DeleteBackend { .. })) {
            self.backends_removed = true;
        }
    }
}

fn bare_spec(key: FrontendKey) -> ServiceSpec {
    ServiceSpec {
        vip: key.vip,
        port: key.port,
        proto: key.proto,
        backends: vec![],
        affinity_timeout: None,
        external_traffic_local: false,
    }
}

/// Removes one frontend. External ones (and ones in an unknown state) go through
/// `delete_nodeport`, which also drops their Maglev table. Returns the map operations done.
fn delete_frontend(
    dp: &mut Datapath,
    key: FrontendKey,
    external: bool,
) -> Result<Vec<MapOp>, DatapathError> {
    let spec = bare_spec(key);
    let ops = plan::plan_delete(&plan::service_key(&spec)?, dp.cached_state());
    if external {
        dp.delete_nodeport(&spec)?;
    } else {
        dp.delete_service(key.vip, key.port, key.proto)?;
    }
    Ok(ops)
}

fn upsert_frontend(dp: &mut Datapath, f: &Frontend) -> Result<Vec<MapOp>, DatapathError> {
    if f.kind.is_external() {
        dp.upsert_nodeport(&f.spec)
    } else {
        dp.upsert_service(&f.spec)
    }
}

/// Applies a batch: every delete first (that frees frontends and ids for what follows), then
/// every upsert. A failure is logged and reported per frontend; the rest still goes ahead.
pub(crate) fn apply_changes(dp: &mut Datapath, batch: Vec<(ServiceRef, Changes)>) -> Applied {
    let mut out = Applied::default();
    for (svc, changes) in &batch {
        for (key, was) in &changes.deletes {
            let external = was.as_ref().is_none_or(|f| f.kind.is_external());
            match delete_frontend(dp, *key, external) {
                Ok(ops) => {
                    out.count(&ops);
                    debug!(service = %svc, frontend = %key, ops = ops.len(), "frontend deleted");
                    out.outcomes.push((svc.clone(), Outcome::Deleted(*key)));
                }
                Err(e) => {
                    warn!(service = %svc, frontend = %key, error = %e, "deleting frontend failed (will retry)");
                    out.errors += 1;
                    out.outcomes
                        .push((svc.clone(), Outcome::DeleteFailed(*key)));
                }
            }
        }
    }
    for (svc, changes) in batch {
        for f in changes.upserts {
            match upsert_frontend(dp, &f) {
                Ok(ops) => {
                    out.count(&ops);
                    debug!(service = %svc, frontend = %f.key(), ops = ops.len(), "frontend programmed");
                    out.outcomes.push((svc.clone(), Outcome::Upserted(f)));
                }
                Err(e) => {
                    warn!(service = %svc, frontend = %f.key(), error = %e, "programming frontend failed (will retry)");
                    out.errors += 1;
                    out.outcomes
                        .push((svc.clone(), Outcome::UpsertFailed(f.key())));
                }
            }
        }
    }
    out
}

/// The key of a SERVICES entry as a frontend key (None for a protocol the proxy never writes,
/// or an address that is not IPv4-mapped, e.g. a key an older agent wrote with IPv4 in `w[0]`:
/// such keys are deleted by their raw key and the frontend re-added).
fn frontend_key_of(k: &skiff_ebpf_common::ServiceKey) -> Option<FrontendKey> {
    if !k.addr.is_v4() {
        return None;
    }
    Some(FrontendKey {
        vip: IpAddr::from(raw_to_ip4(k.addr.v4_word())),
        port: raw_to_port(k.port),
        proto: Proto::from_number(k.proto)?,
    })
}

/// The startup sync: make the pinned maps hold exactly `desired`, applying only the difference
/// (an agent restart over maps that already match applies nothing and drops no flow).
/// Frontends no Service wants any more are deleted with their Maglev tables; then one
/// `sync_services` writes what differs; then external frontends get their Maglev tables
/// (rewritten only where they differ).
pub(crate) fn startup_sync(dp: &mut Datapath, desired: Vec<(ServiceRef, Frontend)>) -> Applied {
    let mut out = Applied::default();
    if let Err(e) = dp.refresh() {
        warn!(error = %e, "re-reading the service maps before the startup sync failed");
    }
    let wanted: BTreeSet<FrontendKey> = desired.iter().map(|(_, f)| f.key()).collect();
    let stale: Vec<skiff_ebpf_common::ServiceKey> = dp
        .cached_state()
        .services
        .keys()
        .filter(|k| frontend_key_of(k).is_none_or(|fk| !wanted.contains(&fk)))
        .copied()
        .collect();
    for k in stale {
        let result = match frontend_key_of(&k) {
            Some(fk) => delete_frontend(dp, fk, true),
            // Not a protocol this proxy writes: delete the entry by its raw key.
            None => {
                let ops = plan::plan_delete(&k, dp.cached_state());
                dp.apply(&ops).map(|()| ops)
            }
        };
        match result {
            Ok(ops) => out.count(&ops),
            Err(e) => {
                warn!(error = %e, "deleting a stale frontend at startup failed");
                out.errors += 1;
            }
        }
    }
    let specs: Vec<ServiceSpec> = desired.iter().map(|(_, f)| f.spec.clone()).collect();
    match dp.sync_services(&specs) {
        Ok(ops) => {
            out.count(&ops);
            for (svc, f) in desired {
                if f.kind.is_external() {
                    // The service entries match now; this writes the Maglev table if it differs.
                    match dp.upsert_nodeport(&f.spec) {
                        Ok(ops) => out.count(&ops),
                        Err(e) => {
                            warn!(service = %svc, frontend = %f.key(), error = %e, "writing maglev table failed");
                            out.errors += 1;
                            out.outcomes.push((svc, Outcome::UpsertFailed(f.key())));
                            continue;
                        }
                    }
                }
                out.outcomes.push((svc, Outcome::Upserted(f)));
            }
        }
        Err(e) => {
            // One bad spec must not keep every other service unprogrammed: go one by one.
            warn!(error = %e, "startup sync failed as a whole; programming services one by one");
            let batch: Vec<(ServiceRef, Changes)> = desired
                .into_iter()
                .map(|(svc, f)| {
                    (
                        svc,
                        Changes {
                            upserts: vec![f],
                            ..Changes::default()
                        },
                    )
                })
                .collect();
            let rest = apply_changes(dp, batch);
            out.ops += rest.ops;
            out.errors += rest.errors;
            out.backends_removed |= rest.backends_removed;
            out.outcomes.extend(rest.outcomes);
        }
    }
    out
}

/// Destroys stale connected UDP sockets in each network namespace of `netns_paths` (see
/// `skiff_datapath::sockdiag`). sock_diag works in the caller's namespace, so each sweep runs on
/// a short-lived thread that setns()'s into one namespace and ends there (the namespace of no
/// other thread changes). Returns how many sockets were destroyed.
pub(crate) fn sweep_udp(datapath: &Mutex<Datapath>, netns_paths: &[PathBuf]) -> usize {
    let mut total = 0;
    for path in netns_paths {
        let result = std::thread::scope(|s| {
            s.spawn(|| -> Result<usize, String> {
                let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
                // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread's netns.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "setns {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    ));
                }
                let dp = datapath.lock().unwrap_or_else(|e| e.into_inner());
                dp.destroy_stale_udp_sockets().map_err(|e| e.to_string())
            })
            .join()
        });
        match result {
            Ok(Ok(n)) => {
                if n > 0 {
                    debug!(netns = %path.display(), destroyed = n, "stale udp sockets destroyed");
                }
                total += n;
            }
            // A pod that went away meanwhile takes its namespace with it: nothing to sweep.
            Ok(Err(e)) => debug!(netns = %path.display(), error = %e, "udp socket sweep skipped"),
            Err(_) => warn!(netns = %path.display(), "udp socket sweep thread panicked"),
        }
    }
    total
}
