//! JSON field encryption: values at configured JSONPaths become tokens on the way to storage and
//! come back as the original JSON values on the way out.
//!
//! Order matters when configured paths overlap (`$.profile` and `$.profile.name`): sealing runs
//! the paths in config order and opening in reverse, so nesting unwinds exactly. Within one
//! path, matches are handled shallowest first and a match inside an already handled one is
//! skipped (`$..a` on `{"a": {"a": 1}}` seals the outer `a` once).
//!
//! Each token binds the message context: the key context, the route's `message_context` for
//! this document (e.g. its record id), and the field's *configured* path (not its array index,
//! so reordering an array keeps values readable while moving a token to another field fails).

use std::collections::HashMap;

use http::HeaderMap;
use jsonpath_rust::parser::model::JpQuery;
use serde_json::Value;

use crate::config::template::{Lookup, Source};
use crate::config::{JsonRoute, OnDecryptError};
use crate::envelope::Context;
use crate::envelope::context::FIELD_KEY;
use crate::envelope::token::{self, ParsedToken};
use crate::error::{DecryptFailure, ProxyError};
use crate::keys::{BackendError, KeyService, SealingKey};

/// A configured JSONPath. Filters, slices and functions are refused: whether they select a value
/// can depend on other (possibly encrypted) values, so a write and a read could disagree.
#[derive(Debug, Clone)]
pub struct FieldPath {
    source: String,
    query: JpQuery,
}

/// One step of a normalized location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

impl FieldPath {
    pub fn parse(source: &str) -> Result<FieldPath, String> {
        if !source.starts_with('$') {
            return Err(format!("{source:?} must start with '$'"));
        }
        if source.trim() == "$" {
            return Err("\"$\" would encrypt the whole document; name the fields".into());
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        for c in source.chars() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '\'' | '"' => quote = Some(c),
                    '?' | '(' | ':' | '@' => {
                        return Err(format!(
                            "{source:?}: filters, slices and functions are not supported in encrypted field paths"
                        ));
                    }
                    _ => {}
                },
            }
        }
        let query = jsonpath_rust::parser::parse_json_path(source)
            .map_err(|e| format!("{source:?} is not a valid JSONPath: {e}"))?;
        Ok(FieldPath {
            source: source.to_string(),
            query,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Locations of the matches in `doc`, shallowest first, none inside another.
    pub fn locate(&self, doc: &Value) -> Vec<Vec<Step>> {
        let Ok(found) = jsonpath_rust::query::js_path_process(&self.query, doc) else {
            return Vec::new();
        };
        let mut locations: Vec<Vec<Step>> = found
            .into_iter()
            .filter_map(|r| parse_normalized(&r.path))
            .collect();
        locations.sort_by_key(|l| l.len());
        let mut out: Vec<Vec<Step>> = Vec::with_capacity(locations.len());
        for loc in locations {
            if !out.iter().any(|o| loc.starts_with(o)) {
                out.push(loc);
            }
        }
        out
    }

    pub fn matches_any(&self, doc: &Value) -> bool {
        !self.locate(doc).is_empty()
    }
}

/// Parse a normalized path as jsonpath-rust prints it: `$`, then `['name']` or `[3]` steps.
fn parse_normalized(path: &str) -> Option<Vec<Step>> {
    let mut rest = path.strip_prefix('$')?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        rest = rest.strip_prefix('[')?;
        if let Some(r) = rest.strip_prefix('\'') {
            let mut name = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\'' => break i,
                    '\\' => {
                        let (_, e) = chars.next()?;
                        match e {
                            'b' => name.push('\u{8}'),
                            'f' => name.push('\u{c}'),
                            'n' => name.push('\n'),
                            'r' => name.push('\r'),
                            't' => name.push('\t'),
                            'u' => {
                                let hex: String = (0..4)
                                    .filter_map(|_| chars.next().map(|(_, c)| c))
                                    .collect();
                                name.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                            }
                            other => name.push(other),
                        }
                    }
                    c => name.push(c),
                }
            };
            rest = r[end + 1..].strip_prefix(']')?;
            steps.push(Step::Key(name));
        } else {
            let end = rest.find(']')?;
            steps.push(Step::Index(rest[..end].parse().ok()?));
            rest = &rest[end + 1..];
        }
    }
    Some(steps)
}

fn get_mut<'a>(mut v: &'a mut Value, steps: &[Step]) -> Option<&'a mut Value> {
    for s in steps {
        v = match (s, v) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

fn get<'a>(mut v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    for s in steps {
        v = match (s, v) {
            (Step::Key(k), Value::Object(m)) => m.get(k)?,
            (Step::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// What the request says, for context values.
pub struct RequestMeta<'a> {
    pub captures: &'a HashMap<String, String>,
    pub headers: &'a HeaderMap,
    /// Context values given by name (the offline `decrypt` command); they win over templates.
    pub given: Option<&'a HashMap<String, String>>,
}

fn render(
    meta: &RequestMeta,
    name: &str,
    t: &crate::config::Template,
    lookup: &dyn Lookup,
) -> Result<String, ProxyError> {
    if let Some(v) = meta.given.and_then(|g| g.get(name)) {
        return Ok(v.clone());
    }
    t.render(lookup).map_err(|missing| match meta.given {
        Some(_) => ProxyError::MissingContext(format!(
            "context value {name} (from {missing}); pass --context {name}=..."
        )),
        None => ProxyError::MissingContext(missing),
    })
}

struct DocLookup<'a> {
    meta: &'a RequestMeta<'a>,
    doc: Option<&'a Value>,
}

impl Lookup for DocLookup<'_> {
    fn lookup(&self, source: &Source) -> Option<String> {
        match source {
            Source::Path(name) => self.meta.captures.get(name).cloned(),
            Source::Header(name) => {
                let mut values = self.meta.headers.get_all(name).iter();
                let first = values.next()?;
                // A repeated header is ambiguous: which one would the reader send? Refuse it.
                if values.next().is_some() {
                    return None;
                }
                first.to_str().ok().map(str::to_string)
            }
            // Only S3 routes know these; config validation keeps them off JSON routes.
            Source::S3Bucket | Source::Identity => None,
            Source::Json(member) => match self.doc?.get(member)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            },
        }
    }
}

/// The key context of a request: coarse values, passed to the backend and partitioning the cache.
pub fn key_context(route: &JsonRoute, meta: &RequestMeta) -> Result<Context, ProxyError> {
    let lookup = DocLookup { meta, doc: None };
    let mut ctx = Context::new();
    for (name, t) in &route.key_context {
        ctx.insert(name.clone(), render(meta, name, t, &lookup)?);
    }
    Ok(ctx)
}

fn message_context(
    route: &JsonRoute,
    meta: &RequestMeta,
    doc: &Value,
    key_ctx: &Context,
) -> Result<Context, ProxyError> {
    let lookup = DocLookup {
        meta,
        doc: Some(doc),
    };
    let mut ctx = key_ctx.clone();
    for (name, t) in &route.message_context {
        ctx.insert(name.clone(), render(meta, name, t, &lookup)?);
    }
    Ok(ctx)
}

/// The documents in a body: a top-level array's elements, else the body itself, and whatever
/// `response_documents` selects (wrapped lists). Writes and reads use the same documents, so a
/// wrapped bulk write is sealed exactly as its reads open.
fn documents(route: &JsonRoute, body: &Value) -> Vec<Vec<Step>> {
    let mut out = match body {
        Value::Array(items) => (0..items.len()).map(|i| vec![Step::Index(i)]).collect(),
        _ => vec![vec![]],
    };
    {
        for d in &route.documents {
            for loc in d.locate(body) {
                if let Some(Value::Array(items)) = get(body, &loc) {
                    out.extend((0..items.len()).map(|i| {
                        let mut l = loc.clone();
                        l.push(Step::Index(i));
                        l
                    }));
                } else {
                    out.push(loc);
                }
            }
        }
    }
    out
}

/// An upper bound on the values one body will seal, for the data-key cache's message limit.
pub fn estimate_messages(route: &JsonRoute, body: &Value) -> u64 {
    let docs = match body {
        Value::Array(items) => items.len().max(1),
        _ => 1,
    };
    (docs * route.fields.len()) as u64
}

/// Seal every configured field in `body`; returns how many values were sealed.
pub fn seal_body(
    route: &JsonRoute,
    meta: &RequestMeta,
    key_ctx: &Context,
    key: &SealingKey,
    body: &mut Value,
) -> Result<usize, ProxyError> {
    let mut sealed = 0;
    let header_bytes = key
        .header
        .encode()
        .map_err(|e| ProxyError::Internal(format!("header: {e}")))?;
    for doc_loc in documents(route, body) {
        let Some(doc) = get_mut(body, &doc_loc) else {
            continue;
        };
        let msg_ctx = message_context(route, meta, doc, key_ctx)?;
        for field in &route.fields {
            let mut ctx = msg_ctx.clone();
            ctx.insert(FIELD_KEY, field.source());
            for loc in field.locate(doc) {
                let Some(value) = get_mut(doc, &loc) else {
                    continue;
                };
                let plaintext = zeroize::Zeroizing::new(
                    serde_json::to_vec(value)
                        .map_err(|_| ProxyError::Internal("serialize".into()))?,
                );
                let t = token::seal_with(&header_bytes, key.data_key.prf(), &ctx, &plaintext)
                    .map_err(|e| ProxyError::Internal(format!("header: {e}")))?;
                *value = Value::String(t);
                sealed += 1;
            }
        }
    }
    Ok(sealed)
}

/// How opening a body went.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenReport {
    pub opened: usize,
    pub redacted: usize,
}

/// Open every token at a configured path in `body`.
///
/// A value at a configured path that does not open (not a token, tampered, foreign, other
/// context) is a [`DecryptFailure`]: per the route, the whole response fails or the value
/// becomes `null`. A backend that is unavailable always fails the response (never redacts:
/// a client writing the redacted document back would lose data).
pub async fn open_body(
    route: &JsonRoute,
    meta: &RequestMeta<'_>,
    key_ctx: &Context,
    keys: &KeyService,
    body: &mut Value,
) -> Result<OpenReport, ProxyError> {
    let mut report = OpenReport::default();
    let mut opened_keys = OpenedKeys::default();
    for doc_loc in documents(route, body) {
        let msg_ctx = match get(body, &doc_loc) {
            Some(doc) => message_context(route, meta, doc, key_ctx),
            None => continue,
        };
        for field in route.fields.iter().rev() {
            let locations = match get(body, &doc_loc) {
                Some(doc) => field.locate(doc),
                None => break,
            };
            for loc in locations {
                let full: Vec<Step> = doc_loc.iter().chain(loc.iter()).cloned().collect();
                let outcome = match &msg_ctx {
                    Ok(ctx) => {
                        open_one(
                            get(body, &full),
                            field,
                            ctx,
                            key_ctx,
                            keys,
                            &route.keys,
                            &mut opened_keys,
                        )
                        .await
                    }
                    Err(_) => Err(DecryptFailure::MissingContext),
                };
                let Some(slot) = get_mut(body, &full) else {
                    continue;
                };
                match outcome {
                    Ok(value) => {
                        *slot = value;
                        report.opened += 1;
                    }
                    Err(DecryptFailure::Backend(e)) if e.retryable() => {
                        return Err(ProxyError::KeyBackend(e));
                    }
                    Err(failure) => match route.on_decrypt_error {
                        OnDecryptError::Error => return Err(ProxyError::DecryptFailed(failure)),
                        OnDecryptError::Redact => {
                            tracing::warn!(field = field.source(), reason = %failure, "value redacted: it did not decrypt");
                            *slot = Value::Null;
                            report.redacted += 1;
                        }
                    },
                }
            }
        }
    }
    Ok(report)
}

/// The data keys one body's tokens opened with, by encoded envelope header: the values of a
/// document are usually sealed under one data key, so its EDKs are looked up once per body.
#[derive(Default)]
struct OpenedKeys(Vec<(Vec<u8>, std::sync::Arc<crate::keys::DataKey>)>);

async fn open_one(
    value: Option<&Value>,
    field: &FieldPath,
    msg_ctx: &Context,
    key_ctx: &Context,
    keys: &KeyService,
    allowed: &[crate::keys::KeyRef],
    opened_keys: &mut OpenedKeys,
) -> Result<Value, DecryptFailure> {
    let Some(Value::String(s)) = value else {
        return Err(DecryptFailure::NotAToken);
    };
    let parsed = ParsedToken::parse(s).map_err(|_| DecryptFailure::NotAToken)?;
    let known = opened_keys
        .0
        .iter()
        .find(|(h, _)| h.as_slice() == parsed.header_bytes())
        .map(|(_, k)| k.clone());
    let data_key = match known {
        Some(k) => k,
        None => {
            let k = keys
                .opening_key_for(&parsed.header, key_ctx, allowed)
                .await
                .map_err(|e| match e {
                    BackendError::InvalidCiphertext => DecryptFailure::WrappedKey,
                    other => DecryptFailure::Backend(other),
                })?;
            opened_keys
                .0
                .push((parsed.header_bytes().to_vec(), k.clone()));
            k
        }
    };
    let mut ctx = msg_ctx.clone();
    ctx.insert(FIELD_KEY, field.source());
    let plaintext = zeroize::Zeroizing::new(
        parsed
            .open_with(data_key.prf(), &ctx)
            .map_err(|_| DecryptFailure::Message)?,
    );
    serde_json::from_slice(&plaintext).map_err(|_| DecryptFailure::Message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalized_paths_round_trip() {
        let doc = json!({"a b": [{"it's": 1}], "x\ny": {"\\": 2}});
        let p = FieldPath::parse("$..*").unwrap();
        let locs = p.locate(&doc);
        assert!(!locs.is_empty());
        for loc in locs {
            assert!(get(&doc, &loc).is_some(), "{loc:?}");
        }
        let p = FieldPath::parse("$['a b'][*]['it\\'s']").unwrap();
        assert_eq!(
            p.locate(&doc),
            vec![vec![
                Step::Key("a b".into()),
                Step::Index(0),
                Step::Key("it's".into())
            ]]
        );
    }

    #[test]
    fn nested_matches_are_taken_once() {
        let doc = json!({"a": {"a": 1}});
        let p = FieldPath::parse("$..a").unwrap();
        assert_eq!(p.locate(&doc), vec![vec![Step::Key("a".into())]]);
    }

    #[test]
    fn filters_and_slices_are_refused() {
        for bad in ["$.a[?(@.b)]", "$.a[0:2]", "a", "$", "$.a[?@.b=='x']"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
        assert!(FieldPath::parse("$['a:b']").is_ok());
    }
}
