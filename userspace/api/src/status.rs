//! API errors as `metav1.Status`, with the codes and reasons Kubernetes uses.

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The `metav1.CauseType` Kubernetes gives a field error, read from the start of its message
/// (field errors are worded "Required value", "Duplicate value: ...", and so on).
fn cause_reason(message: &str) -> &'static str {
    const REASONS: [(&str, &str); 6] = [
        ("Required value", "FieldValueRequired"),
        ("Duplicate value", "FieldValueDuplicate"),
        ("Unsupported value", "FieldValueNotSupported"),
        ("Forbidden", "FieldValueForbidden"),
        ("Too long", "FieldValueTooLong"),
        ("Too many", "FieldValueTooMany"),
    ];
    REASONS
        .iter()
        .find(|(prefix, _)| message.starts_with(prefix))
        .map_or("FieldValueInvalid", |(_, reason)| reason)
}

fn details(name: &str, kind: &str) -> Option<Value> {
    Some(json!({"name": name, "kind": kind}))
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    /// `resource` is the plural (`pods`), as Kubernetes words it.
    pub fn not_found(resource: &str, name: &str) -> Self {
        ApiError {
            details: details(name, resource),
            ..Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
        }
    }

    pub fn already_exists(resource: &str, name: &str) -> Self {
        ApiError {
            details: details(name, resource),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            )
        }
    }

    pub fn conflict(resource: &str, name: &str, why: &str) -> Self {
        ApiError {
            details: details(name, resource),
            ..Self::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
            )
        }
    }

    /// 422 with one cause per field error (`field`, `message`).
    pub fn invalid(kind: &str, name: &str, causes: &[(String, String)]) -> Self {
        let text: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let causes: Vec<Value> = causes
            .iter()
            .map(|(f, m)| json!({"reason": cause_reason(m), "message": m, "field": f}))
            .collect();
        ApiError {
            details: Some(json!({"name": name, "kind": kind, "causes": causes})),
            ..Self::new(
                422,
                "Invalid",
                format!("{kind} \"{name}\" is invalid: {}", text.join(", ")),
            )
        }
    }

    /// 422 as Kubernetes words it for a resource of a named group: the message says
    /// `Deployment.apps "web" is invalid: ...` and details carry the group.
    pub fn invalid_for(
        info: &crate::registry::ResourceInfo,
        name: &str,
        causes: &[(String, String)],
    ) -> Self {
        let mut e = Self::invalid(info.kind, name, causes);
        if !info.group.is_empty() {
            e.message = format!(
                "{}.{}{}",
                info.kind,
                info.group,
                &e.message[info.kind.len()..]
            );
            if let Some(d) = e.details.as_mut().and_then(Value::as_object_mut) {
                d.insert("group".into(), json!(info.group));
            }
        }
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?})"
            ),
        )
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

/// A `metav1.Status` of success (`{"status":"Success"}`), as Kubernetes answers a DELETE of a
/// collection or of an object that is already gone; `details` (`{name, kind, uid}`) when known.
pub fn success_status(details: Option<Value>) -> Value {
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}
