//! CRUD on stored objects: get, list, create, update, patch, delete, and the status, scale and
//! binding subresources.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::{Method, header};
use serde_json::{Value, json};
use skiff_api::patch::{self, PatchError, PatchType};
use skiff_api::selector::{FieldSelector, LabelSelector};
use skiff_store::{KeyValue, StoreError};

use crate::State;
use crate::http::{Ctx, Resp, Target, json_response};
use crate::services;
use skiff_api::admission::{self, FieldValidation};
use skiff_api::registry::{self, ResourceInfo};
use skiff_api::status::ApiError;
use skiff_api::table::{self, IncludeObject};

/// How many times a write retries against a newer revision when the client did not pin one.
/// How often a read-modify-write without a client precondition is retried when another writer got
/// in between (Kubernetes' GuaranteedUpdate retries until the request times out). Each retry
/// waits a little longer (`retry_pause`), so contending writers spread out instead of colliding
/// again at once.
const WRITE_RETRIES: usize = 64;

async fn retry_pause(attempt: usize) {
    if attempt > 0 {
        let millis = (attempt as u64).min(20);
        tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    }
}

pub fn group_segment(info: &ResourceInfo) -> &'static str {
    if info.group.is_empty() {
        "core"
    } else {
        info.group
    }
}

/// The store prefix of a collection, ending in `/`.
pub fn prefix(info: &ResourceInfo, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if info.namespaced => {
            format!("/registry/{}/{}/{ns}/", group_segment(info), info.plural)
        }
        _ => format!("/registry/{}/{}/", group_segment(info), info.plural),
    }
}

pub fn key(info: &ResourceInfo, namespace: Option<&str>, name: &str) -> String {
    format!("{}{name}", prefix(info, namespace))
}

pub fn now() -> DateTime<Utc> {
    Utc::now()
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A stored object as clients see it: `metadata.resourceVersion` is the key's mod revision.
pub fn decode_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!("stored object {} is not valid JSON: {e}", kv.key))
    })?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

pub fn set_rv(v: &mut Value, rev: i64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rev.to_string()));
    }
}

/// The bytes stored for an object: never its resourceVersion.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted { requested, oldest } => {
            ApiError::expired(format!("too old resource version: {requested} ({oldest})"))
        }
        other => ApiError::internal(format!("the store failed: {other}")),
    }
}

pub fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn has_str(v: &Value, ptr: &str) -> bool {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
}

fn finalizers_empty(v: &Value) -> bool {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
}

fn is_kind(info: &ResourceInfo, group: &str, kind: &str) -> bool {
    info.group == group && info.kind == kind
}

/// Whether an object marked for deletion may go now: no finalizers left (for a Namespace, no
/// spec finalizers either) and, for a pod bound to a node, its grace period is over.
pub fn ready_to_remove(info: &ResourceInfo, v: &Value, now: DateTime<Utc>) -> bool {
    let Some(ts) = v
        .pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
    else {
        return false;
    };
    if !finalizers_empty(v) {
        return false;
    }
    if is_kind(info, "", "Namespace")
        && !v
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    {
        return false;
    }
    if is_kind(info, "", "Pod") && has_str(v, "/spec/nodeName") {
        let due = DateTime::parse_from_rfc3339(ts).map(|t| t.with_timezone(&Utc));
        return due.is_ok_and(|due| due <= now)
            || v.pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                == Some(0);
    }
    true
}

pub async fn dispatch(state: &Arc<State>, ctx: &Ctx, target: Target) -> Result<Resp, ApiError> {
    let info = target.info;
    let ns = target.namespace.as_deref();
    match (target.name.as_deref(), target.sub.as_deref()) {
        (None, _) => match ctx.method {
            Method::GET if ctx.query.flag("watch") => {
                crate::watch::serve(state, ctx, info, ns).await
            }
            Method::GET => list(state, ctx, info, ns).await,
            Method::POST if info.namespaced && ns.is_none() => Err(ApiError::method_not_allowed(
                "POST to the all-namespaces collection; post to /namespaces/{namespace}/... instead",
            )),
            Method::POST => create(state, ctx, info, ns).await,
            Method::DELETE => delete_collection(state, ctx, info, ns).await,
            _ => Err(ApiError::method_not_allowed(ctx.method.as_str())),
        },
        (Some(name), None) => match ctx.method {
            Method::GET => get(state, ctx, info, ns, name).await,
            Method::PUT => update(state, ctx, info, ns, name, None).await,
            Method::PATCH => patch_object(state, ctx, info, ns, name, None).await,
            Method::DELETE => delete(state, ctx, info, ns, name).await,
            _ => Err(ApiError::method_not_allowed(ctx.method.as_str())),
        },
        (Some(name), Some(sub)) => {
            if !info.has_subresource(sub) {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("{} has no subresource {sub:?}", info.plural),
                ));
            }
            match (sub, &ctx.method) {
                ("status", &Method::GET) => get(state, ctx, info, ns, name).await,
                ("status", &Method::PUT) => {
                    update(state, ctx, info, ns, name, Some("status")).await
                }
                ("status", &Method::PATCH) => {
                    patch_object(state, ctx, info, ns, name, Some("status")).await
                }
                ("scale", &Method::GET) => scale_get(state, info, ns, name).await,
                ("scale", &Method::PUT | &Method::PATCH) => {
                    scale_write(state, ctx, info, ns, name).await
                }
                ("binding", &Method::POST) => bind(state, ctx, info, ns, name).await,
                ("token", &Method::POST) => {
                    let review = crate::sa_token::token_request(state, ns.unwrap_or(""), name, &ctx.decode_body()?).await?;
                    Ok(json_response(201, &review, &[]))
                }
                ("finalize", &Method::PUT) => {
                    update(state, ctx, info, ns, name, Some("finalize")).await
                }
                ("log" | "exec" | "attach" | "portforward", _) => {
                    // A missing pod is a 404 as usual; an existing one needs its node agent.
                    state
                        .store
                        .get(&key(info, ns, name))
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| ApiError::not_found(info.plural, name))?;
                    let what = if sub == "log" {
                        "logs are"
                    } else {
                        "exec, attach and port-forward are"
                    };
                    Err(ApiError::bad_request(format!(
                        "pods/{sub} for {name:?}: {what} served by the node agent, which is not connected yet"
                    )))
                }
                _ => Err(ApiError::method_not_allowed(ctx.method.as_str())),
            }
        }
    }
}

fn single_response(
    ctx: &Ctx,
    info: &ResourceInfo,
    code: u16,
    obj: &Value,
    warnings: &[String],
) -> Resp {
    if ctx.wants_table() {
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let include = IncludeObject::parse(ctx.query.get("includeObject"));
        return json_response(
            code,
            &table::to_table(info, std::slice::from_ref(obj), include, rv, now()),
            warnings,
        );
    }
    json_response(code, obj, warnings)
}

async fn get(
    state: &State,
    ctx: &Ctx,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let kv = state
        .store
        .get(&key(info, ns, name))
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(info.plural, name))?;
    Ok(single_response(ctx, info, 200, &decode_kv(&kv)?, &[]))
}

/// Field selectors Kubernetes supports per kind (metadata.name/namespace everywhere).
fn supported_field(info: &ResourceInfo, field: &str) -> bool {
    if matches!(field, "metadata.name" | "metadata.namespace") {
        return true;
    }
    let extra: &[&str] = match (info.group, info.kind) {
        ("", "Pod") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "Event") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
        ("", "Secret") => &["type"],
        ("", "Namespace") => &["status.phase"],
        ("", "Node") => &["spec.unschedulable"],
        ("apps", "ReplicaSet") => &["status.replicas"],
        ("batch", "Job") => &["status.successful"],
        _ => &[],
    };
    extra.contains(&field)
}

/// The label and field selectors of a request; unsupported fields are a 400 as in Kubernetes.
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn from_ctx(ctx: &Ctx, info: &ResourceInfo) -> Result<Selectors, ApiError> {
        let labels = LabelSelector::parse(ctx.query.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(ctx.query.get("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid field selector: {e}")))?;
        if let Some(bad) = fields.fields().find(|f| !supported_field(info, f)) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {bad}"
            )));
        }
        Ok(Selectors { labels, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(obj)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

async fn list(
    state: &State,
    ctx: &Ctx,
    info: &ResourceInfo,
    ns: Option<&str>,
) -> Result<Resp, ApiError> {
    use base64::Engine as _;
    let selectors = Selectors::from_ctx(ctx, info)?;
    let limit = match ctx.query.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?,
        ),
        None => None,
    }
    .filter(|l| *l > 0);
    let token = match ctx.query.get("continue") {
        Some(t) => {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .map_err(|_| {
                    ApiError::bad_request("continue key is not valid: request a new list")
                })?;
            Some(
                serde_json::from_slice::<ContinueToken>(&bytes).map_err(|_| {
                    ApiError::bad_request("continue key is not valid: request a new list")
                })?,
            )
        }
        None => None,
    };
    let listed = state
        .store
        .list(&prefix(info, ns))
        .await
        .map_err(store_error)?;
    let rv = token.as_ref().map_or(listed.revision, |t| t.rv);
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    let mut remaining = 0usize;
    for kv in &listed.items {
        if token.as_ref().is_some_and(|t| kv.key <= t.start) {
            continue;
        }
        let obj = decode_kv(kv)?;
        if !selectors.matches(&obj) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            remaining += 1;
            continue;
        }
        if limit.is_some_and(|l| items.len() + 1 == l) {
            next = Some(kv.key.clone());
        }
        items.push(obj);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0
        && let Some(start) = next
    {
        let t = serde_json::to_vec(&ContinueToken { rv, start }).unwrap_or_default();
        metadata["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t));
        metadata["remainingItemCount"] = json!(remaining);
    }
    if ctx.wants_table() {
        let include = IncludeObject::parse(ctx.query.get("includeObject"));
        let mut t = table::to_table(info, &items, include, &rv.to_string(), now());
        t["metadata"] = metadata;
        return Ok(json_response(200, &t, &[]));
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", info.kind),
            "apiVersion": info.api_version(),
            "metadata": metadata,
            "items": items,
        }),
        &[],
    ))
}

fn admit_body(
    ctx: &Ctx,
    info: &ResourceInfo,
    ns: Option<&str>,
    body: Value,
) -> Result<admission::Admitted, ApiError> {
    let mode = FieldValidation::parse(ctx.query.get("fieldValidation"))?;
    admission::admit(info, ns, body, mode)
}

async fn check_namespace(
    state: &State,
    info: &ResourceInfo,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let nsinfo = registry::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not registered"))?;
    let kv = state
        .store
        .get(&key(nsinfo, None, ns))
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("namespaces", ns))?;
    let obj = decode_kv(&kv)?;
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        let mut e = ApiError::forbidden(format!(
            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
            info.plural
        ));
        e.details = Some(
            json!({"name": name, "kind": info.plural, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
        );
        return Err(e);
    }
    Ok(())
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut buf = [0u8; 5];
    if getrandom::fill(&mut buf).is_err() {
        buf = uuid::Uuid::new_v4().as_bytes()[..5]
            .try_into()
            .unwrap_or([0; 5]);
    }
    buf.iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// ResourceQuota admission: refuses (403, Kubernetes' message) a create that would take a
/// quota of the namespace over its `spec.hard`, else charges it: the quotas' `status.used` grow
/// by the object's usage (compare-and-swap, so concurrent creates cannot both take the last
/// unit); the controller-manager's quota loop recomputes `used` from what exists.
async fn admit_quota(
    state: &State,
    info: &ResourceInfo,
    ns: &str,
    name: &str,
    obj: &Value,
    dry_run: bool,
) -> Result<(), ApiError> {
    use skiff_controllers::quota;
    let Some(quota_info) = registry::find("", "v1", "resourcequotas") else {
        return Ok(());
    };
    let requested = quota::object_usage(info.group, info.plural, obj);
    let pod = is_kind(info, "", "Pod")
        .then(|| serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(obj.clone()).ok())
        .flatten();
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let listed = state
            .store
            .list(&prefix(quota_info, Some(ns)))
            .await
            .map_err(store_error)?;
        if listed.items.is_empty() {
            return Ok(());
        }
        let mut quotas = Vec::new();
        for kv in &listed.items {
            let q = serde_json::from_value(decode_kv(kv)?)
                .map_err(|e| ApiError::internal(format!("a stored ResourceQuota does not decode: {e}")))?;
            quotas.push((q, kv));
        }
        let only: Vec<_> = quotas.iter().map(|(q, _)| q).cloned().collect();
        let charged = quota::check(&only, &requested, pod.as_ref()).map_err(|message| {
            ApiError::forbidden(format!("{} \"{name}\" is forbidden: {message}", info.plural))
        })?;
        if dry_run {
            return Ok(());
        }
        let mut raced = false;
        for next in charged {
            let Some((_, kv)) = quotas.iter().find(|(q, _)| q.metadata.name == next.metadata.name) else {
                continue;
            };
            let value = serde_json::to_value(&next).map_err(|e| ApiError::internal(e.to_string()))?;
            match write_update(state, quota_info, &kv.key, kv, value, false).await {
                Ok(_) => {}
                Err(WriteFail::Conflict) => {
                    raced = true;
                    break;
                }
                Err(WriteFail::Api(e)) => return Err(e),
            }
        }
        if !raced {
            return Ok(());
        }
    }
    Err(ApiError::conflict(
        "resourcequotas",
        ns,
        "the namespace's quotas kept changing; try again",
    ))
}

/// Creates an admitted object: name, namespace checks, server metadata, defaults, allocation.
pub async fn create_object(
    state: &State,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    mut obj: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let name = match obj.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(g) if !g.is_empty() => {
                let n = format!("{g}{}", random_suffix());
                obj["metadata"]["name"] = json!(n);
                n
            }
            _ => {
                return Err(ApiError::invalid(
                    info.kind,
                    "",
                    &[(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
        },
    };
    admission::validate_name(info, &name)?;
    if info.namespaced {
        check_namespace(state, info, ns.unwrap_or(""), &name).await?;
    }
    admission::prepare_create(info, &mut obj, now());
    admission::validate(info, &obj)?;
    if let Some(ns) = ns.filter(|_| info.namespaced) {
        admit_quota(state, info, ns, &name, &obj, dry_run).await?;
    }
    let key = key(info, ns, &name);
    let _guard = if services::is_service(info) {
        let guard = state.service_lock.lock().await;
        services::allocate(state, &mut obj, None).await?;
        Some(guard)
    } else {
        None
    };
    if dry_run {
        return Ok(obj);
    }
    let rev = match state.store.create(&key, encode(&obj)).await {
        Ok(rev) => rev,
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ApiError::already_exists(info.plural, &name));
        }
        Err(e) => return Err(store_error(e)),
    };
    set_rv(&mut obj, rev);
    if info.group.is_empty() && info.kind == "Namespace" {
        ensure_default_service_account(state, &name).await?;
    }
    Ok(obj)
}

/// The `default` ServiceAccount every namespace has (pods run as it unless they name another).
pub(crate) async fn ensure_default_service_account(state: &State, ns: &str) -> Result<(), ApiError> {
    let info = registry::find("", "v1", "serviceaccounts").ok_or_else(|| ApiError::internal("serviceaccounts are not registered"))?;
    if state.store.get(&key(info, Some(ns), "default")).await.map_err(store_error)?.is_some() {
        return Ok(());
    }
    match Box::pin(create_object(state, info, Some(ns), crate::sa_token::default_service_account(ns), false)).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn create(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let mut admitted = admit_body(ctx, info, ns, ctx.decode_body()?)?;
    if info.group == "certificates.k8s.io" && info.kind == "CertificateSigningRequest" {
        crate::csr::admit_create(state, ctx.user.as_ref(), &mut admitted.object)?;
    }
    confirm_no_escalation(state, ctx, info, ns, &admitted.object, None).await?;
    let obj = create_object(state, info, ns, admitted.object, dry_run).await?;
    Ok(single_response(ctx, info, 201, &obj, &admitted.warnings))
}

/// RBAC objects grant no more than their writer holds (`escalation`); other kinds pass.
async fn confirm_no_escalation(
    state: &State,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    new: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    if info.group != "rbac.authorization.k8s.io" {
        return Ok(());
    }
    crate::escalation::confirm(state, ctx.user.as_ref(), info.plural, ns.unwrap_or(""), new, old).await
}

/// Why a write attempt did not land.
pub enum WriteFail {
    Api(ApiError),
    /// The key changed under us: read again and retry (unless the client pinned a version).
    Conflict,
}

impl From<ApiError> for WriteFail {
    fn from(e: ApiError) -> Self {
        WriteFail::Api(e)
    }
}

/// Replaces the object at `key` (read as `current`) by `new`, or removes it when it is marked
/// for deletion and nothing holds it any more. Returns the object as stored.
pub async fn write_update(
    state: &State,
    info: &ResourceInfo,
    key: &str,
    current: &KeyValue,
    mut new: Value,
    dry_run: bool,
) -> Result<Value, WriteFail> {
    let old = decode_kv(current)?;
    if ready_to_remove(info, &new, now()) {
        if dry_run {
            return Ok(new);
        }
        return match state.store.delete(key, Some(current.mod_revision)).await {
            Ok((rev, _)) => {
                set_rv(&mut new, rev);
                Ok(new)
            }
            Err(StoreError::Conflict { .. }) => Err(WriteFail::Conflict),
            Err(StoreError::NotFound(_)) => {
                Err(ApiError::not_found(info.plural, name_of(&old)).into())
            }
            Err(e) => Err(store_error(e).into()),
        };
    }
    let _guard = if services::is_service(info) {
        let guard = state.service_lock.lock().await;
        services::allocate(state, &mut new, Some(&old)).await?;
        Some(guard)
    } else {
        None
    };
    if dry_run {
        set_rv(&mut new, current.mod_revision);
        return Ok(new);
    }
    match state
        .store
        .update(key, encode(&new), current.mod_revision)
        .await
    {
        Ok(rev) => {
            set_rv(&mut new, rev);
            Ok(new)
        }
        Err(StoreError::Conflict { .. }) => Err(WriteFail::Conflict),
        Err(StoreError::NotFound(_)) => Err(ApiError::not_found(info.plural, name_of(&old)).into()),
        Err(e) => Err(store_error(e).into()),
    }
}

/// An update may have removed the last finalizer of an object being deleted: let the reaper look.
fn wake_reaper_if_deleting(state: &State, obj: &Value) {
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        state.reaper_wake.notify_one();
    }
}

fn conflict(info: &ResourceInfo, name: &str) -> ApiError {
    ApiError::conflict(
        info.plural,
        name,
        "the object has been modified; please apply your changes to the latest version and try again",
    )
}

/// Whether a patch document sets or tests `metadata.resourceVersion` (an optimistic-concurrency
/// precondition from the client).
fn patch_names_resource_version(ty: PatchType, doc: &Value) -> bool {
    match ty {
        PatchType::Json => doc.as_array().is_some_and(|ops| {
            ops.iter().any(|op| {
                op.get("path").and_then(Value::as_str) == Some("/metadata/resourceVersion")
            })
        }),
        PatchType::Merge | PatchType::Strategic | PatchType::Apply => doc
            .pointer("/metadata/resourceVersion")
            .is_some_and(|v| !v.is_null()),
    }
}

fn requested_rv(obj: &Value) -> Result<Option<i64>, ApiError> {
    match obj.pointer("/metadata/resourceVersion") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse::<i64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion {s:?} is not a resource version this server issued"
            ))
        }),
        Some(_) => Err(ApiError::bad_request(
            "metadata.resourceVersion must be a string",
        )),
    }
}

async fn update(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
    sub: Option<&str>,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let mut admitted = admit_body(ctx, info, ns, ctx.decode_body()?)?;
    match admitted
        .object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
    {
        None | Some("") => admitted.object["metadata"]["name"] = json!(name),
        Some(n) if n == name => {}
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
    }
    let pinned = requested_rv(&admitted.object)?;
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let current = state
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found(info.plural, name))?;
        if pinned.is_some_and(|rv| rv != current.mod_revision) {
            return Err(conflict(info, name));
        }
        let old = decode_kv(&current)?;
        let body_uid = admitted
            .object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty());
        let old_uid = old
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(uid) = body_uid
            && uid != old_uid
        {
            return Err(ApiError::conflict(
                info.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                ),
            ));
        }
        let mut new = admitted.object.clone();
        if sub == Some("finalize") {
            // namespaces/finalize changes only spec.finalizers (how stuck namespaces are freed).
            let finalizers = new.pointer("/spec/finalizers").cloned();
            new = old.clone();
            if let Some(m) = new.as_object_mut() {
                let spec = m.entry("spec").or_insert_with(|| json!({}));
                if let Some(spec) = spec.as_object_mut() {
                    match finalizers {
                        Some(f) => spec.insert("finalizers".into(), f),
                        None => spec.remove("finalizers"),
                    };
                }
            }
            if let Some(resp) = write_checked(
                state,
                ctx,
                info,
                &key,
                &current,
                new,
                &admitted.warnings,
                pinned,
                dry_run,
                name,
            )
            .await?
            {
                return Ok(resp);
            }
            continue;
        }
        admission::prepare_update(info, &old, &mut new, sub)?;
        if sub.is_none() {
            admission::validate(info, &new)?;
            admission::validate_update(info, &old, &new)?;
        }
        confirm_no_escalation(state, ctx, info, ns, &new, Some(&old)).await?;
        if let Some(resp) = write_checked(
            state,
            ctx,
            info,
            &key,
            &current,
            new,
            &admitted.warnings,
            pinned,
            dry_run,
            name,
        )
        .await?
        {
            return Ok(resp);
        }
    }
    Err(conflict(info, name))
}

/// The last step of PUT and PATCH: the compare-and-swap write. `Ok(None)` means the object
/// changed under us and the caller should read it again (unless the client pinned a
/// resourceVersion, which is then a 409).
#[allow(clippy::too_many_arguments)]
async fn write_checked(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    key: &str,
    current: &KeyValue,
    new: Value,
    warnings: &[String],
    pinned: Option<i64>,
    dry_run: bool,
    name: &str,
) -> Result<Option<Resp>, ApiError> {
    match write_update(state, info, key, current, new, dry_run).await {
        Ok(obj) => {
            wake_reaper_if_deleting(state, &obj);
            Ok(Some(single_response(ctx, info, 200, &obj, warnings)))
        }
        Err(WriteFail::Api(e)) => Err(e),
        Err(WriteFail::Conflict) if pinned.is_some() => Err(conflict(info, name)),
        Err(WriteFail::Conflict) => Ok(None),
    }
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::JsonPatchFailed { .. } | PatchError::Strategic { .. } => {
            ApiError::new(422, "Invalid", e.to_string())
        }
        other => ApiError::bad_request(other.to_string()),
    }
}

fn apply_patch(ty: PatchType, original: &Value, patch_doc: &Value) -> Result<Value, ApiError> {
    match ty {
        PatchType::Json => patch::json_patch(original, patch_doc),
        PatchType::Merge => patch::json_merge_patch(original, patch_doc),
        PatchType::Strategic => patch::strategic_merge_patch(original, patch_doc),
        // Server-side apply is served as a JSON merge patch of the applied configuration over
        // the live object (create when missing): no managedFields or field ownership yet.
        PatchType::Apply => patch::json_merge_patch(original, patch_doc),
    }
    .map_err(patch_error)
}

fn parse_patch(ctx: &Ctx) -> Result<(PatchType, Value), ApiError> {
    let ct = ctx.header(header::CONTENT_TYPE);
    let ty =
        PatchType::from_content_type(ct).ok_or_else(|| ApiError::unsupported_media_type(ct))?;
    let doc = match ty {
        PatchType::Apply => crate::http::decode("application/yaml", &ctx.body)?,
        _ => serde_json::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?,
    };
    Ok((ty, doc))
}

async fn patch_object(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
    sub: Option<&str>,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let (ty, doc) = parse_patch(ctx)?;
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let Some(current) = state.store.get(&key).await.map_err(store_error)? else {
            if ty == PatchType::Apply && sub.is_none() {
                let mut admitted = admit_body(ctx, info, ns, doc.clone())?;
                if name_of(&admitted.object).is_empty() {
                    admitted.object["metadata"]["name"] = json!(name);
                }
                confirm_no_escalation(state, ctx, info, ns, &admitted.object, None).await?;
                let obj = create_object(state, info, ns, admitted.object, dry_run).await?;
                return Ok(single_response(ctx, info, 201, &obj, &admitted.warnings));
            }
            return Err(ApiError::not_found(info.plural, name));
        };
        let old = decode_kv(&current)?;
        let patched = apply_patch(ty, &old, &doc)?;
        // `old` carries the current resourceVersion, so `patched` does too: it is a
        // precondition only when the patch itself names one. Otherwise a concurrent write (a
        // controller updating status) is retried here, as Kubernetes does, not answered 409.
        let pinned = if patch_names_resource_version(ty, &doc) {
            requested_rv(&patched)?
        } else {
            None
        };
        if pinned.is_some_and(|rv| rv != current.mod_revision) {
            return Err(conflict(info, name));
        }
        let admitted = admit_body(ctx, info, ns, patched)?;
        let mut new = admitted.object;
        if name_of(&new) != name {
            return Err(ApiError::bad_request(format!(
                "the patch changes metadata.name to {:?}; names cannot change",
                name_of(&new)
            )));
        }
        admission::prepare_update(info, &old, &mut new, sub)?;
        if sub.is_none() {
            admission::validate(info, &new)?;
            admission::validate_update(info, &old, &new)?;
        }
        confirm_no_escalation(state, ctx, info, ns, &new, Some(&old)).await?;
        if let Some(resp) = write_checked(
            state,
            ctx,
            info,
            &key,
            &current,
            new,
            &admitted.warnings,
            pinned,
            dry_run,
            name,
        )
        .await?
        {
            return Ok(resp);
        }
    }
    Err(conflict(info, name))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOptions {
    grace_period_seconds: Option<i64>,
    propagation_policy: Option<String>,
    preconditions: Option<Preconditions>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Preconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

fn delete_options(ctx: &Ctx) -> Result<DeleteOptions, ApiError> {
    let mut opts = if ctx.body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        let v = ctx.decode_body()?;
        serde_json::from_value::<DeleteOptions>(v).map_err(|e| {
            ApiError::bad_request(format!("the DeleteOptions body is not valid: {e}"))
        })?
    };
    if let Some(g) = ctx.query.get("gracePeriodSeconds") {
        opts.grace_period_seconds = Some(g.parse().map_err(|_| {
            ApiError::bad_request(format!("gracePeriodSeconds {g:?} is not a number"))
        })?);
    }
    if let Some(p) = ctx.query.get("propagationPolicy") {
        opts.propagation_policy = Some(p.to_string());
    }
    Ok(opts)
}

/// Deletes one object with Kubernetes' rules: finalizers and Namespaces make it asynchronous
/// (deletionTimestamp first), a pod bound to a node waits out its grace period. Returns the
/// object as it was last stored.
pub async fn delete_object(
    state: &State,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
    grace: Option<i64>,
    preconditions: Option<(&Option<String>, &Option<String>)>,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let current = state
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found(info.plural, name))?;
        let mut obj = decode_kv(&current)?;
        if let Some((uid, rv)) = preconditions {
            let actual_uid = obj.pointer("/metadata/uid").and_then(Value::as_str);
            if uid.as_deref().is_some_and(|u| Some(u) != actual_uid) {
                return Err(ApiError::conflict(
                    info.plural,
                    name,
                    "Precondition failed: UID in precondition does not match the object",
                ));
            }
            if rv
                .as_deref()
                .is_some_and(|r| r != current.mod_revision.to_string())
            {
                return Err(conflict(info, name));
            }
        }
        let now = now();
        let marked = obj
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null());
        let is_pod = is_kind(info, "", "Pod");
        let bound_pod = is_pod && has_str(&obj, "/spec/nodeName");
        let graceful = if is_kind(info, "", "Namespace") {
            if marked {
                return Ok(obj);
            }
            obj["metadata"]["deletionTimestamp"] = json!(timestamp(now));
            if let Some(m) = obj.as_object_mut() {
                let status = m.entry("status").or_insert_with(|| json!({}));
                status["phase"] = json!("Terminating");
            }
            true
        } else if !finalizers_empty(&obj) {
            if marked {
                return Ok(obj);
            }
            obj["metadata"]["deletionTimestamp"] = json!(timestamp(now));
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace.unwrap_or(0));
            true
        } else if bound_pod {
            // Until the node agent exists (a later issue) nothing confirms that a bound pod's
            // containers stopped: the reaper loop removes it when its grace period is over.
            let grace = grace
                .or_else(|| {
                    obj.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0);
            if grace == 0 {
                false
            } else if marked {
                return Ok(obj);
            } else {
                obj["metadata"]["deletionTimestamp"] =
                    json!(timestamp(now + chrono::Duration::seconds(grace)));
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                true
            }
        } else {
            false
        };
        if dry_run {
            return Ok(obj);
        }
        if graceful {
            match write_update(state, info, &key, &current, obj, false).await {
                Ok(obj) => {
                    state.reaper_wake.notify_one();
                    return Ok(obj);
                }
                Err(WriteFail::Api(e)) => return Err(e),
                Err(WriteFail::Conflict) => continue,
            }
        }
        match state.store.delete(&key, Some(current.mod_revision)).await {
            Ok((rev, _)) => {
                set_rv(&mut obj, rev);
                return Ok(obj);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::NotFound(_)) => return Err(ApiError::not_found(info.plural, name)),
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(conflict(info, name))
}

/// `propagationPolicy` Foreground or Orphan: before the object is marked for deletion, it gets
/// the `foregroundDeletion` or `orphan` finalizer (as Kubernetes' apiserver does), so it stays
/// until the controller-manager's garbage collector has deleted (foreground) or released
/// (orphan) its dependents and removed the finalizer. Background (the default) adds nothing: the
/// object goes at once and the collector deletes its dependents afterwards.
async fn add_propagation_finalizer(
    state: &State,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
    policy: Option<&str>,
) -> Result<(), ApiError> {
    let finalizer = match policy {
        None | Some("Background") => return Ok(()),
        Some("Foreground") => "foregroundDeletion",
        Some("Orphan") => "orphan",
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy {other:?} is not one of Background, Foreground, Orphan"
            )));
        }
    };
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let Some(current) = state.store.get(&key).await.map_err(store_error)? else {
            return Ok(()); // delete_object answers the 404
        };
        let mut obj = decode_kv(&current)?;
        if obj
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return Ok(());
        }
        let list = obj["metadata"]
            .as_object_mut()
            .map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
        match list.and_then(Value::as_array_mut) {
            Some(list) if list.iter().any(|f| f.as_str() == Some(finalizer)) => return Ok(()),
            Some(list) => list.push(json!(finalizer)),
            None => return Ok(()),
        }
        match write_update(state, info, &key, &current, obj, false).await {
            Ok(_) => return Ok(()),
            Err(WriteFail::Conflict) => continue,
            Err(WriteFail::Api(e)) => return Err(e),
        }
    }
    Err(conflict(info, name))
}

async fn delete(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let opts = delete_options(ctx)?;
    let pre = opts
        .preconditions
        .as_ref()
        .map(|p| (&p.uid, &p.resource_version));
    if !dry_run {
        add_propagation_finalizer(state, info, ns, name, opts.propagation_policy.as_deref())
            .await?;
    }
    let obj = delete_object(
        state,
        info,
        ns,
        name,
        opts.grace_period_seconds,
        pre,
        dry_run,
    )
    .await?;
    Ok(json_response(200, &obj, &[]))
}

async fn delete_collection(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let opts = delete_options(ctx)?;
    let selectors = Selectors::from_ctx(ctx, info)?;
    let listed = state
        .store
        .list(&prefix(info, ns))
        .await
        .map_err(store_error)?;
    let mut deleted = Vec::new();
    for kv in &listed.items {
        let obj = decode_kv(kv)?;
        if !selectors.matches(&obj) {
            continue;
        }
        let obj_ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        match delete_object(
            state,
            info,
            obj_ns.as_deref(),
            name_of(&obj),
            opts.grace_period_seconds,
            None,
            dry_run,
        )
        .await
        {
            Ok(o) => deleted.push(o),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", info.kind),
            "apiVersion": info.api_version(),
            "metadata": {"resourceVersion": listed.revision.to_string()},
            "items": deleted,
        }),
        &[],
    ))
}

fn scale_of(info: &ResourceInfo, obj: &Value) -> Result<Value, ApiError> {
    let selector = match obj.pointer("/spec/selector") {
        Some(sel) if info.group == "apps" => {
            let typed: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
                serde_json::from_value(sel.clone()).map_err(|e| {
                    ApiError::internal(format!("stored selector is not valid: {e}"))
                })?;
            LabelSelector::from_label_selector(&typed)
                .map(|s| s.to_string())
                .map_err(|e| ApiError::internal(format!("stored selector is not valid: {e}")))?
        }
        _ => String::new(),
    };
    let meta = &obj["metadata"];
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"), "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    }))
}

async fn scale_get(
    state: &State,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let kv = state
        .store
        .get(&key(info, ns, name))
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(info.plural, name))?;
    Ok(json_response(200, &scale_of(info, &decode_kv(&kv)?)?, &[]))
}

async fn scale_write(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let body = if ctx.method == Method::PUT {
        Some(ctx.decode_body()?)
    } else {
        None
    };
    let patch_doc = if ctx.method == Method::PATCH {
        Some(parse_patch(ctx)?)
    } else {
        None
    };
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let current = state
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found(info.plural, name))?;
        let old = decode_kv(&current)?;
        let scale = scale_of(info, &old)?;
        let new_scale = match (&body, &patch_doc) {
            (Some(b), _) => b.clone(),
            (None, Some((ty, doc))) => apply_patch(*ty, &scale, doc)?,
            (None, None) => scale.clone(),
        };
        let pinned = requested_rv(&new_scale)?;
        if pinned.is_some_and(|rv| rv != current.mod_revision) {
            return Err(conflict(info, name));
        }
        let replicas = new_scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
            .ok_or_else(|| {
                ApiError::invalid(
                    "Scale",
                    name,
                    &[(
                        "spec.replicas".into(),
                        "Invalid value: must be an integer greater than or equal to 0".into(),
                    )],
                )
            })?;
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(replicas);
        admission::prepare_update(info, &old, &mut new, None)?;
        match write_update(state, info, &key, &current, new, dry_run).await {
            Ok(obj) => return Ok(json_response(200, &scale_of(info, &obj)?, &[])),
            Err(WriteFail::Api(e)) => return Err(e),
            Err(WriteFail::Conflict) if pinned.is_some() => return Err(conflict(info, name)),
            Err(WriteFail::Conflict) => continue,
        }
    }
    Err(conflict(info, name))
}

async fn bind(
    state: &Arc<State>,
    ctx: &Ctx,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    name: &str,
) -> Result<Resp, ApiError> {
    let dry_run = ctx.dry_run()?;
    let binding = ctx.decode_body()?;
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "Binding",
                name,
                &[(
                    "target.name".into(),
                    "Required value: the node to bind to".into(),
                )],
            )
        })?
        .to_string();
    let key = key(info, ns, name);
    for attempt in 0..WRITE_RETRIES {
        retry_pause(attempt).await;
        let current = state
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found(info.plural, name))?;
        let old = decode_kv(&current)?;
        if let Some(bound) = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Err(ApiError::conflict(
                "pods/binding",
                name,
                &format!("pod {name} is already assigned to node \"{bound}\""),
            ));
        }
        if old
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return Err(ApiError::conflict(
                "pods/binding",
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        match write_update(state, info, &key, &current, new, dry_run).await {
            Ok(_) => {
                return Ok(json_response(
                    201,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    &[],
                ));
            }
            Err(WriteFail::Api(e)) => return Err(e),
            Err(WriteFail::Conflict) => continue,
        }
    }
    Err(conflict(info, name))
}
