//! Watches over real HTTPS: from 0, from N, 410 after compaction, bookmarks, initial-events-end,
//! selector transitions, tables, timeoutSeconds.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn watch_from_zero_sends_current_objects_then_changes() {
    let s = start().await;
    s.configmap("default", "w1", json!({"a": "1"})).await;
    let mut w = WatchReader::open(
        &s,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0",
    )
    .await;
    let first = w
        .until(WAIT, |e| e["object"]["metadata"]["name"] == "w1")
        .await;
    assert_eq!(first.last().expect("event")["type"], "ADDED");

    s.configmap("default", "w2", json!({})).await;
    let ev = w
        .until(WAIT, |e| e["object"]["metadata"]["name"] == "w2")
        .await
        .pop()
        .expect("event");
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["kind"], "ConfigMap");
    assert!(rv(&ev["object"]) > 0);

    let r = s
        .patch(
            "/api/v1/namespaces/default/configmaps/w1",
            "application/merge-patch+json",
            r#"{"data":{"a":"2"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = w
        .until(WAIT, |e| e["object"]["metadata"]["name"] == "w1")
        .await
        .pop()
        .expect("event");
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["data"]["a"], "2");

    s.delete("/api/v1/namespaces/default/configmaps/w1").await;
    let ev = w
        .until(WAIT, |e| e["type"] == "DELETED")
        .await
        .pop()
        .expect("event");
    assert_eq!(ev["object"]["metadata"]["name"], "w1");
}

#[tokio::test]
async fn watch_from_a_revision_replays_only_later_events() {
    let s = start().await;
    s.configmap("default", "before", json!({})).await;
    let list = s.get("/api/v1/namespaces/default/configmaps").await;
    let list_rv = list.body["metadata"]["resourceVersion"]
        .as_str()
        .expect("list rv")
        .to_string();
    s.configmap("default", "after", json!({})).await;
    let mut w = WatchReader::open(
        &s,
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={list_rv}"),
    )
    .await;
    let ev = w.next(WAIT).await.expect("an event");
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(
        ev["object"]["metadata"]["name"], "after",
        "only events after the list's revision"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_revision_gets_410_expired() {
    // Compaction goes through the server's own store handle (RunningServer::store()).
    let s = start().await;
    for i in 0..5 {
        s.configmap("default", &format!("c{i}"), json!({})).await;
    }
    let current = rv(&s.get("/api/v1/namespaces/default/configmaps/c4").await.body);
    s.server.store().compact(current).await.expect("compaction");
    let mut w = WatchReader::open(
        &s,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=2",
    )
    .await;
    let ev = w.next(WAIT).await.expect("an ERROR event");
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["kind"], "Status");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert!(
        w.next(Duration::from_secs(5)).await.is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_an_annotated_bookmark() {
    let s = start().await;
    s.configmap("default", "i1", json!({})).await;
    s.configmap("default", "i2", json!({})).await;
    let mut w = WatchReader::open(
        &s,
        "/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
    )
    .await;
    let events = w.until(WAIT, |e| e["type"] == "BOOKMARK").await;
    let added: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "ADDED")
        .filter_map(|e| e["object"]["metadata"]["name"].as_str())
        .collect();
    assert!(added.contains(&"i1") && added.contains(&"i2"), "{events:?}");
    let bookmark = events.last().expect("bookmark");
    assert_eq!(
        bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert!(rv(&bookmark["object"]) > 0);
    assert_eq!(bookmark["object"]["kind"], "ConfigMap");
}

#[tokio::test]
async fn bookmarks_arrive_periodically_when_allowed() {
    let s = start().await;
    let current =
        s.get("/api/v1/namespaces/default/configmaps").await.body["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
    let mut w = WatchReader::open(
        &s,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={current}&allowWatchBookmarks=true"),
    )
    .await;
    // Two bookmarks (not just one sent at the start), each carrying only the resourceVersion.
    for _ in 0..2 {
        let ev = w
            .next(Duration::from_secs(70))
            .await
            .expect("a bookmark within a minute");
        assert_eq!(ev["type"], "BOOKMARK");
        assert_eq!(ev["object"]["kind"], "ConfigMap");
        assert!(
            ev["object"]["metadata"]["resourceVersion"]
                .as_str()
                .is_some()
        );
        assert!(
            ev["object"].get("data").is_none(),
            "bookmarks carry only the resourceVersion"
        );
    }
}

#[tokio::test]
async fn timeout_seconds_ends_the_stream() {
    let s = start().await;
    let mut w = WatchReader::open(
        &s,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&timeoutSeconds=1",
    )
    .await;
    let started = std::time::Instant::now();
    while w.next(Duration::from_secs(10)).await.is_some() {}
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the watch ended by its timeout"
    );
}

#[tokio::test]
async fn selector_watches_see_objects_enter_and_leave() {
    let s = start().await;
    let current =
        s.get("/api/v1/namespaces/default/configmaps").await.body["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
    let mut w = WatchReader::open(
        &s,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={current}&labelSelector=app%3Dweb"),
    )
    .await;
    // Created outside the selector: nothing. Labelled into it: ADDED. Out again: DELETED.
    s.configmap("default", "sel", json!({})).await;
    s.configmap("default", "other", json!({})).await;
    s.patch(
        "/api/v1/namespaces/default/configmaps/sel",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"app":"web"}}}"#,
    )
    .await;
    let ev = w.next(WAIT).await.expect("event");
    assert_eq!(ev["type"], "ADDED", "{ev}");
    assert_eq!(ev["object"]["metadata"]["name"], "sel");
    s.patch(
        "/api/v1/namespaces/default/configmaps/sel",
        "application/merge-patch+json",
        r#"{"data":{"x":"1"}}"#,
    )
    .await;
    let ev = w.next(WAIT).await.expect("event");
    assert_eq!(ev["type"], "MODIFIED", "{ev}");
    s.patch(
        "/api/v1/namespaces/default/configmaps/sel",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"app":"db"}}}"#,
    )
    .await;
    let ev = w.next(WAIT).await.expect("event");
    assert_eq!(ev["type"], "DELETED", "{ev}");
    assert_eq!(ev["object"]["metadata"]["name"], "sel");
}

#[tokio::test]
async fn table_watches_send_one_row_tables() {
    let s = start().await;
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let mut w = WatchReader::open_with(
        &s,
        s.request(
            Method::GET,
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0",
        )
        .header("Accept", accept),
    )
    .await;
    s.configmap("default", "tbl", json!({"a": "1"})).await;
    let ev = w
        .until(WAIT, |e| e["object"]["rows"][0]["cells"][0] == "tbl")
        .await
        .pop()
        .expect("event");
    assert_eq!(ev["object"]["kind"], "Table");
    assert_eq!(ev["object"]["rows"].as_array().map(|r| r.len()), Some(1));
}
