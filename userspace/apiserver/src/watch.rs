//! `?watch=true`: newline-delimited JSON events from the store's revisions.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Response, header};
use serde_json::{Value, json};
use skiff_store::{StoreError, WatchEvent};
use tokio_stream::wrappers::ReceiverStream;

use crate::State;
use crate::http::{Ctx, Resp};
use crate::objects::{Selectors, decode_kv, now, prefix, set_rv, store_error};
use skiff_api::registry::ResourceInfo;
use skiff_api::status::ApiError;
use skiff_api::table::{self, IncludeObject};

struct Renderer {
    info: &'static ResourceInfo,
    table: bool,
    include: IncludeObject,
}

impl Renderer {
    fn line(&self, ty: &str, obj: Value) -> Bytes {
        let object = if self.table && ty != "BOOKMARK" && ty != "ERROR" {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            table::to_table(self.info, &[obj], self.include, &rv, now())
        } else {
            obj
        };
        let mut out =
            serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
        out.push(b'\n');
        Bytes::from(out)
    }

    fn bookmark(&self, rev: i64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line(
            "BOOKMARK",
            json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": metadata}),
        )
    }

    fn error(&self, err: &ApiError) -> Bytes {
        self.line("ERROR", err.to_status())
    }
}

/// Turns a store event into a watch event for this selector: an object that stops matching is
/// DELETED for this watcher, one that starts matching is ADDED, as Kubernetes does.
fn translate(
    ev: WatchEvent,
    selectors: &Selectors,
) -> Result<Option<(&'static str, Value)>, ApiError> {
    match ev {
        WatchEvent::Put { kv, prev } => {
            let new = decode_kv(&kv)?;
            let now_matches = selectors.matches(&new);
            let before = match prev {
                Some(p) => Some(selectors.matches(&decode_kv(&p)?)),
                None => None,
            };
            Ok(match (before, now_matches) {
                (None | Some(false), true) => Some(("ADDED", new)),
                (Some(true), true) => Some(("MODIFIED", new)),
                (Some(true), false) => Some(("DELETED", new)),
                (_, false) => None,
            })
        }
        WatchEvent::Delete { revision, prev } => {
            let mut old = decode_kv(&prev)?;
            set_rv(&mut old, revision);
            Ok(selectors.matches(&old).then_some(("DELETED", old)))
        }
    }
}

pub async fn serve(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
) -> Result<Resp, ApiError> {
    let selectors = Selectors::from_ctx(ctx, info)?;
    let send_initial = ctx.query.flag("sendInitialEvents");
    let bookmarks = ctx.query.flag("allowWatchBookmarks");
    let timeout = match ctx.query.get("timeoutSeconds") {
        Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds {t:?} is not a number"))
        })?)),
        None => None,
    };
    let renderer = Renderer {
        info,
        table: ctx.wants_table(),
        include: IncludeObject::parse(ctx.query.get("includeObject")),
    };
    let prefix = prefix(info, ns);
    let rv = ctx.query.get("resourceVersion").unwrap_or("");
    let (initial, start) = if send_initial || rv.is_empty() || rv == "0" {
        let listed = state.store.list(&prefix).await.map_err(store_error)?;
        let mut objs = Vec::new();
        for kv in &listed.items {
            let obj = decode_kv(kv)?;
            if selectors.matches(&obj) {
                objs.push(obj);
            }
        }
        (objs, listed.revision)
    } else {
        let n = rv.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {rv:?} is not a resource version this server issued"
            ))
        })?;
        (Vec::new(), n)
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let store_watch = state.store.watch(&prefix, start).await;
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { tx.send(Ok(b)).await.is_ok() }
        };
        let mut events = match store_watch {
            Ok(events) => events,
            Err(e) => {
                let _ = send(renderer.error(&store_error(e))).await;
                return;
            }
        };
        for obj in initial {
            if !send(renderer.line("ADDED", obj)).await {
                return;
            }
        }
        if send_initial && !send(renderer.bookmark(start, true)).await {
            return;
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = start;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending::<()>().await } } => return,
                _ = ticker.tick(), if bookmarks => {
                    if !send(renderer.bookmark(last, false)).await { return; }
                }
                ev = events.next() => match ev {
                    None => return,
                    Some(Err(e)) => {
                        let err = match e {
                            StoreError::Compacted { .. } => store_error(e),
                            other => ApiError::internal(format!("the store watch failed: {other}")),
                        };
                        let _ = send(renderer.error(&err)).await;
                        return;
                    }
                    Some(Ok(ev)) => {
                        last = ev.revision();
                        match translate(ev, &selectors) {
                            Ok(Some((ty, obj))) => {
                                if !send(renderer.line(ty, obj)).await { return; }
                            }
                            Ok(None) => {}
                            Err(err) => {
                                let _ = send(renderer.error(&err)).await;
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
