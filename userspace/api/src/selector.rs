//! Label and field selectors (`?labelSelector=` / `?fieldSelector=`), parsed and matched the way
//! `k8s.io/apimachinery/pkg/labels` and `pkg/fields` do. Pure: no I/O.
//!
//! Label selector grammar (comma-separated requirements, whitespace allowed around tokens):
//! `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`, `key`
//! (exists), `!key` (does not exist), and Kubernetes' numeric `key>5`, `key<5`. The empty string
//! selects everything. Hand-written because no maintained Rust crate parses this grammar
//! (kube-rs only builds selector strings).
//!
//! Field selector grammar: comma-separated `field=value`, `field==value`, `field!=value`, where
//! `\`, `,` and `=` in values are escaped with a backslash.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use serde_json::Value;

/// Why a selector could not be parsed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SelectorError {
    /// The label selector string does not follow the grammar.
    #[error(
        "invalid label selector {selector:?}: {reason} (write requirements like \"app=web,tier in (a,b),!canary\")"
    )]
    LabelSyntax { selector: String, reason: String },

    /// A label key that is not a valid qualified name.
    #[error("invalid label key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    /// A label value that Kubernetes would not accept.
    #[error("invalid label value {value:?} for key {key:?}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },

    /// A `matchExpressions` entry that is not valid.
    #[error("invalid matchExpressions entry for key {key:?}: {reason}")]
    InvalidExpression { key: String, reason: String },

    /// The field selector string does not follow the grammar.
    #[error(
        "invalid field selector {selector:?}: {reason} (write terms like \"metadata.name=web,status.phase!=Succeeded\")"
    )]
    FieldSyntax { selector: String, reason: String },
}

/// A label selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `=`, `==`, `in`.
    In,
    /// `!=`, `notin`.
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
    /// Sorted and de-duplicated, so `Display` is canonical. Empty for (Does)Exist(s).
    values: Vec<String>,
    /// Whether the requirement was written with `=`/`!=` (one value) rather than `in`/`notin`;
    /// only affects `Display`.
    equality: bool,
}

impl Requirement {
    fn new(key: String, op: Op, mut values: Vec<String>, equality: bool) -> Requirement {
        values.sort();
        values.dedup();
        Requirement {
            key,
            op,
            values,
            equality,
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            Op::In => value.is_some_and(|v| self.values.contains(v)),
            Op::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
            Op::GreaterThan | Op::LessThan => {
                // Kubernetes: the label must exist and parse as an integer.
                let (Some(have), Some(want)) = (
                    value.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|v| v.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.op == Op::GreaterThan {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.values.join(",");
        match self.op {
            Op::Exists => write!(f, "{}", self.key),
            Op::DoesNotExist => write!(f, "!{}", self.key),
            Op::In if self.equality => write!(f, "{}={}", self.key, values),
            Op::NotIn if self.equality => write!(f, "{}!={}", self.key, values),
            Op::In => write!(f, "{} in ({})", self.key, values),
            Op::NotIn => write!(f, "{} notin ({})", self.key, values),
            Op::GreaterThan => write!(f, "{}>{}", self.key, values),
            Op::LessThan => write!(f, "{}<{}", self.key, values),
        }
    }
}

/// A parsed label selector: all requirements must hold (logical AND).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// Sorted by key (stable), as Kubernetes does, so `Display` is canonical.
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses a `labelSelector` query string. The empty (or all-blank) string selects everything.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let syntax = |reason: String| SelectorError::LabelSyntax {
            selector: s.to_string(),
            reason,
        };
        let tokens = lex(s).map_err(syntax)?;
        let mut parser = Parser { tokens, pos: 0 };
        let mut requirements = Vec::new();
        if parser.peek() == &Tok::End {
            return Ok(LabelSelector::default());
        }
        loop {
            requirements.push(parser.requirement(s)?);
            match parser.next() {
                Tok::End => break,
                Tok::Comma => continue,
                other => {
                    return Err(syntax(format!(
                        "found {}, expected ',' or the end of the selector",
                        other.describe()
                    )));
                }
            }
        }
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector { requirements })
    }

    /// A selector requiring exactly these labels, as a Service's `spec.selector` or a
    /// ReplicationController's map selector means.
    pub fn from_match_labels(labels: &BTreeMap<String, String>) -> Result<Self, SelectorError> {
        let mut requirements = Vec::with_capacity(labels.len());
        for (key, value) in labels {
            validate_key(key)?;
            validate_value(key, value)?;
            requirements.push(Requirement::new(
                key.clone(),
                Op::In,
                vec![value.clone()],
                true,
            ));
        }
        // BTreeMap iteration is already sorted by key.
        Ok(LabelSelector { requirements })
    }

    /// Converts a `metav1.LabelSelector` (as in Deployment `spec.selector`): `matchLabels` and
    /// `matchExpressions` (`In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector selects
    /// everything; whether a *missing* selector selects nothing is the caller's decision.
    pub fn from_label_selector(sel: &metav1::LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in sel.match_labels.iter().flatten() {
            validate_key(key)?;
            validate_value(key, value)?;
            requirements.push(Requirement::new(
                key.clone(),
                Op::In,
                vec![value.clone()],
                true,
            ));
        }
        for expr in sel.match_expressions.iter().flatten() {
            validate_key(&expr.key)?;
            let values = expr.values.clone().unwrap_or_default();
            let invalid = |reason: &str| SelectorError::InvalidExpression {
                key: expr.key.clone(),
                reason: reason.to_string(),
            };
            let op = match expr.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(invalid(&format!(
                        "operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                    )));
                }
            };
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(invalid("operator In and NotIn need at least one value"));
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(invalid("operator Exists and DoesNotExist take no values"));
                }
                _ => {}
            }
            for value in &values {
                validate_value(&expr.key, value)?;
            }
            requirements.push(Requirement::new(expr.key.clone(), op, values, false));
        }
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector { requirements })
    }

    /// Whether a set of labels satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement (no labels = empty set;
    /// non-string label values are ignored).
    pub fn matches_object(&self, obj: &Value) -> bool {
        if self.requirements.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = obj
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        self.matches(&labels)
    }

    /// True when the selector has no requirements (it selects everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for LabelSelector {
    /// The canonical form: requirements sorted by key, joined by `,`; `==` is written `=`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Bang,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("{s:?}"),
            Tok::Bang => "'!'".into(),
            Tok::Eq => "'='".into(),
            Tok::DoubleEq => "'=='".into(),
            Tok::NotEq => "'!='".into(),
            Tok::Gt => "'>'".into(),
            Tok::Lt => "'<'".into(),
            Tok::Open => "'('".into(),
            Tok::Close => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::End => "the end of the selector".into(),
        }
    }
}

/// Kubernetes' lexer: identifiers run until whitespace or one of `=!(),<>`.
fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let is_special = |c: char| matches!(c, '=' | '!' | '(' | ')' | ',' | '<' | '>');
    let mut tokens = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if is_special(c) {
            chars.next();
            let next_is_eq = chars.peek().is_some_and(|&(_, n)| n == '=');
            let tok = match c {
                '=' if next_is_eq => {
                    chars.next();
                    Tok::DoubleEq
                }
                '=' => Tok::Eq,
                '!' if next_is_eq => {
                    chars.next();
                    Tok::NotEq
                }
                '!' => Tok::Bang,
                '(' => Tok::Open,
                ')' => Tok::Close,
                ',' => Tok::Comma,
                '<' => Tok::Lt,
                _ => Tok::Gt,
            };
            tokens.push(tok);
            continue;
        }
        let mut end = s.len();
        while let Some(&(i, c)) = chars.peek() {
            if c.is_whitespace() || is_special(c) {
                end = i;
                break;
            }
            chars.next();
        }
        tokens.push(Tok::Ident(s[start..end].to_string()));
    }
    tokens.push(Tok::End);
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.tokens.get(self.pos).unwrap_or(&Tok::End)
    }

    fn next(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        tok
    }

    fn requirement(&mut self, selector: &str) -> Result<Requirement, SelectorError> {
        let syntax = |reason: String| SelectorError::LabelSyntax {
            selector: selector.to_string(),
            reason,
        };
        let negated = self.peek() == &Tok::Bang;
        if negated {
            self.next();
        }
        let key = match self.next() {
            Tok::Ident(k) => k,
            other => {
                let expected = if negated {
                    "a label key after '!'"
                } else {
                    "a label key or '!'"
                };
                return Err(syntax(format!(
                    "found {}, expected {expected}",
                    other.describe()
                )));
            }
        };
        validate_key(&key)?;
        if matches!(self.peek(), Tok::Comma | Tok::End) {
            let op = if negated {
                Op::DoesNotExist
            } else {
                Op::Exists
            };
            return Ok(Requirement::new(key, op, Vec::new(), false));
        }
        if negated {
            return Err(syntax(format!(
                "'!{key}' must stand alone (it means: no label {key:?}); found {} after it",
                self.peek().describe()
            )));
        }
        let op_tok = self.next();
        let (op, equality) = match &op_tok {
            Tok::Eq | Tok::DoubleEq => (Op::In, true),
            Tok::NotEq => (Op::NotIn, true),
            Tok::Gt => (Op::GreaterThan, true),
            Tok::Lt => (Op::LessThan, true),
            Tok::Ident(w) if w == "in" => (Op::In, false),
            Tok::Ident(w) if w == "notin" => (Op::NotIn, false),
            other => {
                return Err(syntax(format!(
                    "found {} after key {key:?}, expected one of '=', '==', '!=', 'in', 'notin', '>', '<', ',' or the end",
                    other.describe()
                )));
            }
        };
        let values = if equality {
            // `key=` (empty value) is allowed, as in Kubernetes.
            match self.peek() {
                Tok::Comma | Tok::End => vec![String::new()],
                Tok::Ident(_) => match self.next() {
                    Tok::Ident(v) => vec![v],
                    _ => Vec::new(),
                },
                other => {
                    return Err(syntax(format!(
                        "found {} after '{key}{}', expected a value",
                        other.describe(),
                        op_text(&op_tok)
                    )));
                }
            }
        } else {
            self.value_set(&key, selector)?
        };
        for value in &values {
            validate_value(&key, value)?;
        }
        if matches!(op, Op::GreaterThan | Op::LessThan) {
            let v = values.first().map(String::as_str).unwrap_or("");
            if v.parse::<i64>().is_err() {
                return Err(SelectorError::InvalidValue {
                    key,
                    value: v.to_string(),
                    reason: "'>' and '<' need an integer value".to_string(),
                });
            }
        }
        Ok(Requirement::new(key, op, values, equality))
    }

    /// `( v1, v2, ... )` after `in` / `notin`. An empty element (`(a,)`) and `()` are the empty
    /// value, as in Kubernetes.
    fn value_set(&mut self, key: &str, selector: &str) -> Result<Vec<String>, SelectorError> {
        let syntax = |reason: String| SelectorError::LabelSyntax {
            selector: selector.to_string(),
            reason,
        };
        match self.next() {
            Tok::Open => {}
            other => {
                return Err(syntax(format!(
                    "found {} after 'in'/'notin' for key {key:?}, expected '('",
                    other.describe()
                )));
            }
        }
        if self.peek() == &Tok::Close {
            // Kubernetes reads `()` as the set holding only the empty value.
            self.next();
            return Ok(vec![String::new()]);
        }
        let mut values = Vec::new();
        loop {
            match self.next() {
                Tok::Ident(v) => {
                    values.push(v);
                    match self.next() {
                        Tok::Comma => continue,
                        Tok::Close => break,
                        other => {
                            return Err(syntax(format!(
                                "found {} in the value set for key {key:?}, expected ',' or ')'",
                                other.describe()
                            )));
                        }
                    }
                }
                Tok::Comma => values.push(String::new()),
                Tok::Close => {
                    values.push(String::new());
                    break;
                }
                other => {
                    return Err(syntax(format!(
                        "found {} in the value set for key {key:?}, expected a value or ')'",
                        other.describe()
                    )));
                }
            }
        }
        Ok(values)
    }
}

fn op_text(tok: &Tok) -> &'static str {
    match tok {
        Tok::Eq => "=",
        Tok::DoubleEq => "==",
        Tok::NotEq => "!=",
        Tok::Gt => ">",
        Tok::Lt => "<",
        _ => "",
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters (the name part of a label
/// key, and a non-empty label value).
fn check_label_name_chars(s: &str) -> Option<&'static str> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters");
    }
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    match (bytes.first(), bytes.last()) {
        (Some(&f), Some(&l)) if alnum(f) && alnum(l) => {}
        _ => return Some("must start and end with a letter or digit"),
    }
    if !bytes
        .iter()
        .all(|&b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
    {
        return Some("may contain only letters, digits, '-', '_' and '.'");
    }
    None
}

/// A DNS-1123 subdomain (the optional prefix of a label key).
fn check_dns_subdomain(s: &str) -> Option<&'static str> {
    if s.len() > 253 {
        return Some("the prefix must be no more than 253 characters");
    }
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b.first().is_some_and(|c| c.is_ascii_alphanumeric())
            && b.last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if s.split('.').all(label_ok) {
        None
    } else {
        Some("the prefix must be a lower-case DNS subdomain such as example.com")
    }
}

/// Kubernetes label keys are qualified names: `[prefix/]name`.
fn validate_key(key: &str) -> Result<(), SelectorError> {
    let invalid = |reason: &str| SelectorError::InvalidKey {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err(invalid("the prefix before '/' must not be empty"));
            }
            (Some(prefix), name)
        }
        None => (None, key),
    };
    if name.is_empty() {
        return Err(invalid("the name part must not be empty"));
    }
    if let Some(reason) = prefix.and_then(check_dns_subdomain) {
        return Err(invalid(reason));
    }
    if let Some(reason) = check_label_name_chars(name) {
        return Err(invalid(&format!("the name part {reason}")));
    }
    Ok(())
}

fn validate_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    match check_label_name_chars(value) {
        None => Ok(()),
        Some(reason) => Err(SelectorError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }),
    }
}

/// One `field<op>value` term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed field selector: all terms must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` query string. The empty string selects everything; empty terms
    /// (`a=b,,c=d`) are skipped as in Kubernetes.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let syntax = |reason: String| SelectorError::FieldSyntax {
            selector: s.to_string(),
            reason,
        };
        let mut terms = Vec::new();
        for part in split_unescaped_commas(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            // The first operator wins, checked in Kubernetes' order at each position.
            let Some((at, op)) = part.char_indices().find_map(|(i, _)| {
                ["!=", "==", "="]
                    .into_iter()
                    .find(|op| part[i..].starts_with(op))
                    .map(|op| (i, op))
            }) else {
                return Err(syntax(format!(
                    "term {part:?} has no operator; use field=value, field==value or field!=value"
                )));
            };
            let field = part[..at].trim();
            if field.is_empty() {
                return Err(syntax(format!(
                    "term {part:?} has no field name before {op:?}"
                )));
            }
            // Field names are JSON paths like `spec.nodeName`; anything else is a typo (and
            // would make the selector print ambiguously).
            if let Some(bad) = field
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
            {
                return Err(syntax(format!(
                    "field name {field:?} contains {bad:?}; field names are dotted paths like spec.nodeName"
                )));
            }
            let value = unescape_field_value(part[at + op.len()..].trim())
                .map_err(|reason| syntax(format!("term {part:?}: {reason}")))?;
            terms.push(FieldTerm {
                field: field.to_string(),
                value,
                equal: op != "!=",
            });
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the object satisfies every term. The field is a dotted path into the object
    /// (`spec.nodeName`); a missing field or `null` reads as "" (as Kubernetes' field sets
    /// do for unset fields); numbers and booleans read as their JSON text. A field that is an
    /// object or array has no selectable value: `=` never holds and `!=` always does.
    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|term| {
            let mut cur = Some(obj);
            for part in term.field.split('.') {
                cur = cur.and_then(|v| v.get(part));
            }
            let actual: Option<String> = match cur {
                None | Some(Value::Null) => Some(String::new()),
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Array(_) | Value::Object(_)) => None,
            };
            let equal = actual.is_some_and(|a| a == term.value);
            equal == term.equal
        })
    }

    /// The field names used, so the apiserver can reject fields a kind does not support.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| t.field.as_str())
    }

    /// True when the selector has no terms (it selects everything).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The value a term requires with `=`/`==` on `field`, if any: lets callers serve
    /// `metadata.name=x` or `spec.nodeName=n` by lookup instead of a scan.
    pub fn required_value(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.equal && t.field == field)
            .map(|t| t.value.as_str())
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if t.equal { "=" } else { "!=" };
            write!(f, "{}{}{}", t.field, op, escape_field_value(&t.value))?;
        }
        Ok(())
    }
}

/// Splits at commas not preceded by a backslash escape.
fn split_unescaped_commas(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            ',' => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Kubernetes `fields.UnescapeValue`: `\\`, `\,` and `\=` are escapes; any other escape, and
/// an unescaped `,` or `=`, is an error.
fn unescape_field_value(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            match c {
                '\\' | ',' | '=' => out.push(c),
                other => {
                    return Err(format!(
                        "invalid escape sequence '\\{other}' (only \\\\, \\, and \\= are escapes)"
                    ));
                }
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            ',' | '=' => return Err(format!("unescaped {c:?} in the value; write it as '\\{c}'")),
            other => out.push(other),
        }
    }
    if escaped {
        return Err("the value ends with a lone backslash".to_string());
    }
    Ok(out)
}

fn escape_field_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_matches_like_kubernetes() {
        let sel = LabelSelector::parse("a=b,c!=d,e in (x,y),f notin (z),g,!h").expect("valid");
        let good = labels(&[("a", "b"), ("c", "x"), ("e", "y"), ("f", "q"), ("g", "")]);
        assert!(sel.matches(&good));
        let mut bad = good.clone();
        bad.insert("h".into(), "1".into());
        assert!(!sel.matches(&bad), "!h must reject a present h");
        let mut bad = good.clone();
        bad.insert("c".into(), "d".into());
        assert!(!sel.matches(&bad), "c!=d must reject c=d");
        let mut bad = good.clone();
        bad.remove("g");
        assert!(!sel.matches(&bad), "g must require g");
        let mut bad = good.clone();
        bad.insert("e".into(), "w".into());
        assert!(!sel.matches(&bad), "e in (x,y) must reject e=w");
        let mut bad = good.clone();
        bad.insert("f".into(), "z".into());
        assert!(!sel.matches(&bad), "f notin (z) must reject f=z");
        let mut missing = good.clone();
        missing.remove("c");
        missing.remove("f");
        assert!(
            sel.matches(&missing),
            "!= and notin hold when the label is absent"
        );
    }

    #[test]
    fn double_equals_and_numeric_comparisons() {
        let sel = LabelSelector::parse("tier==web, size>3, rank<10").expect("valid");
        assert!(sel.matches(&labels(&[("tier", "web"), ("size", "4"), ("rank", "9")])));
        assert!(!sel.matches(&labels(&[("tier", "web"), ("size", "3"), ("rank", "9")])));
        assert!(!sel.matches(&labels(&[("tier", "web"), ("size", "x"), ("rank", "9")])));
        assert_eq!(sel.to_string(), "rank<10,size>3,tier=web");
    }

    #[test]
    fn empty_selector_matches_everything() {
        for s in ["", "   "] {
            let sel = LabelSelector::parse(s).expect("empty is valid");
            assert!(sel.is_empty());
            assert!(sel.matches(&BTreeMap::new()));
            assert!(sel.matches_object(&json!({"metadata": {"labels": {"a": "b"}}})));
            assert_eq!(sel.to_string(), "");
        }
    }

    #[test]
    fn display_is_canonical() {
        let sel = LabelSelector::parse(" tier in (b, a,a) ,app = web,!old, x ").expect("valid");
        assert_eq!(sel.to_string(), "app=web,!old,tier in (a,b),x");
        assert_eq!(
            LabelSelector::parse(&sel.to_string()).expect("round trip"),
            sel
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in [
            "a in (",
            "=b",
            "a=b=c",
            "a in (b",
            "a in (b c)",
            "a notin b",
            "!",
            "!a=b",
            "a,,b",
            "a b",
            "a=(b)",
            ",",
            "a=b,",
            "a>b",
            "(a)",
        ] {
            let err = LabelSelector::parse(bad).expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
        let err = LabelSelector::parse("a=b=c").expect_err("double value");
        assert_eq!(
            err.to_string(),
            "invalid label selector \"a=b=c\": found '=', expected ',' or the end of the selector (write requirements like \"app=web,tier in (a,b),!canary\")"
        );
    }

    #[test]
    fn keys_and_values_are_validated() {
        assert!(LabelSelector::parse("app.kubernetes.io/name=web").is_ok());
        assert!(LabelSelector::parse("a=").is_ok(), "empty value is valid");
        let empty_set = LabelSelector::parse("a in ()").expect("() is the empty value");
        assert!(empty_set.matches(&labels(&[("a", "")])));
        assert!(!empty_set.matches(&labels(&[("a", "x")])));
        assert_eq!(empty_set.to_string(), "a in ()");
        assert_eq!(
            LabelSelector::parse("a in (,b)")
                .expect("valid")
                .to_string(),
            "a in (,b)"
        );
        assert!(matches!(
            LabelSelector::parse("Bad_Prefix.com/a=b"),
            Err(SelectorError::InvalidKey { .. })
        ));
        assert!(matches!(
            LabelSelector::parse("/a"),
            Err(SelectorError::InvalidKey { .. })
        ));
        assert!(matches!(
            LabelSelector::parse("a/"),
            Err(SelectorError::InvalidKey { .. })
        ));
        assert!(matches!(
            LabelSelector::parse(&format!("{}=b", "k".repeat(64))),
            Err(SelectorError::InvalidKey { .. })
        ));
        assert!(matches!(
            LabelSelector::parse("a=-b"),
            Err(SelectorError::InvalidValue { .. })
        ));
    }

    #[test]
    fn from_metav1_selector() {
        let sel: metav1::LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["fe", "be"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists"},
                {"key": "env", "operator": "NotIn", "values": ["dev"]}
            ]
        }))
        .expect("valid metav1 selector");
        let sel = LabelSelector::from_label_selector(&sel).expect("convertible");
        assert_eq!(
            sel.to_string(),
            "app=web,!canary,env notin (dev),tier in (be,fe),zone"
        );
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "fe"), ("zone", "a")])));
        assert!(!sel.matches(&labels(&[
            ("app", "web"),
            ("tier", "fe"),
            ("zone", "a"),
            ("env", "dev")
        ])));

        let scale: metav1::LabelSelector =
            serde_json::from_value(json!({"matchLabels": {"app": "web"}})).expect("valid");
        assert_eq!(
            LabelSelector::from_label_selector(&scale)
                .expect("ok")
                .to_string(),
            "app=web"
        );
        assert!(
            LabelSelector::from_label_selector(&metav1::LabelSelector::default())
                .expect("empty")
                .is_empty()
        );
    }

    #[test]
    fn from_service_selector_map() {
        let sel = LabelSelector::from_match_labels(&labels(&[("tier", "fe"), ("app", "web")]))
            .expect("valid");
        assert_eq!(sel.to_string(), "app=web,tier=fe");
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(
            LabelSelector::from_match_labels(&BTreeMap::new())
                .expect("empty")
                .is_empty()
        );
        assert!(LabelSelector::from_match_labels(&labels(&[("app", "not valid")])).is_err());
    }

    #[test]
    fn bad_metav1_expressions_are_rejected() {
        for expr in [
            json!({"key": "a", "operator": "Equals", "values": ["b"]}),
            json!({"key": "a", "operator": "In", "values": []}),
            json!({"key": "a", "operator": "NotIn"}),
            json!({"key": "a", "operator": "Exists", "values": ["b"]}),
            json!({"key": "-a", "operator": "Exists"}),
            json!({"key": "a", "operator": "In", "values": ["not valid"]}),
        ] {
            let sel: metav1::LabelSelector =
                serde_json::from_value(json!({"matchExpressions": [expr.clone()]}))
                    .expect("decodes");
            assert!(LabelSelector::from_label_selector(&sel).is_err(), "{expr}");
        }
    }

    #[test]
    fn matches_object_reads_metadata_labels() {
        let sel = LabelSelector::parse("app=web").expect("valid");
        assert!(sel.matches_object(&json!({"metadata": {"labels": {"app": "web", "x": "y"}}})));
        assert!(!sel.matches_object(&json!({"metadata": {"labels": {"app": "db"}}})));
        assert!(!sel.matches_object(&json!({"metadata": {}})));
        assert!(!sel.matches_object(&json!("not an object")));
        assert!(
            LabelSelector::parse("!app")
                .expect("valid")
                .matches_object(&json!({}))
        );
    }

    fn pod(name: &str, node: Option<&str>, phase: &str) -> Value {
        let mut spec = json!({});
        if let Some(node) = node {
            spec = json!({"nodeName": node});
        }
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec, "status": {"phase": phase}})
    }

    #[test]
    fn field_selectors_filter_like_describe_node() {
        let sel = FieldSelector::parse("spec.nodeName=n1,status.phase!=Succeeded").expect("valid");
        assert!(sel.matches(&pod("a", Some("n1"), "Running")));
        assert!(!sel.matches(&pod("a", Some("n1"), "Succeeded")));
        assert!(!sel.matches(&pod("a", Some("n2"), "Running")));
        assert_eq!(
            sel.fields().collect::<Vec<_>>(),
            vec!["spec.nodeName", "status.phase"]
        );
        assert_eq!(sel.required_value("spec.nodeName"), Some("n1"));
        assert_eq!(sel.required_value("status.phase"), None);

        let unscheduled = FieldSelector::parse("spec.nodeName=").expect("valid");
        assert!(
            unscheduled.matches(&pod("a", None, "Pending")),
            "missing field reads as empty"
        );
        assert!(!unscheduled.matches(&pod("a", Some("n1"), "Pending")));
        let scheduled = FieldSelector::parse("spec.nodeName!=").expect("valid");
        assert!(scheduled.matches(&pod("a", Some("n1"), "Pending")));

        let by_name =
            FieldSelector::parse("metadata.name==a,metadata.namespace=default").expect("valid");
        assert!(by_name.matches(&pod("a", None, "Running")));
        assert!(!by_name.matches(&pod("b", None, "Running")));

        let event = json!({"involvedObject": {"kind": "Pod", "name": "a", "uid": "u1"}, "count": 3, "x": true});
        assert!(
            FieldSelector::parse("involvedObject.kind=Pod,involvedObject.name=a,count=3,x=true")
                .expect("valid")
                .matches(&event)
        );
        assert!(
            !FieldSelector::parse("involvedObject=x")
                .expect("valid")
                .matches(&event)
        );
        assert!(
            FieldSelector::parse("involvedObject!=x")
                .expect("valid")
                .matches(&event)
        );
    }

    #[test]
    fn field_selector_escapes_and_errors() {
        let sel = FieldSelector::parse(r"metadata.name=a\,b\=c\\d").expect("escaped");
        assert!(sel.matches(&json!({"metadata": {"name": r"a,b=c\d"}})));
        assert_eq!(sel.to_string(), r"metadata.name=a\,b\=c\\d");
        assert!(FieldSelector::parse("").expect("empty").is_empty());
        assert!(
            FieldSelector::parse(",a=b,")
                .expect("empty terms skipped")
                .fields()
                .eq(["a"])
        );
        for bad in ["a", "=b", "a=b=c", r"a=\x", "a=b\\", "!=x", "! =x", "a b=c"] {
            assert!(
                matches!(
                    FieldSelector::parse(bad),
                    Err(SelectorError::FieldSyntax { .. })
                ),
                "{bad}"
            );
        }
    }
}
