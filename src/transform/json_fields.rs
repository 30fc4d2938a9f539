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
use std::sync::Arc;

use http::HeaderMap;
use serde_json::Value;

use crate::config::template::{Lookup, Source};
use crate::config::{JsonRoute, OnDecryptError};
use crate::envelope::Context;
use crate::envelope::compact;
use crate::envelope::context::FIELD_KEY;
use crate::envelope::record::RecordId;
use crate::envelope::token::{self, ParsedToken};
use crate::error::{DecryptFailure, ProxyError, ValuePlace};
use crate::keys::{BackendError, DataKey, KeyService, OpenRecord, SealingKey};
use crate::transform::json_scan::{self, Kind, NodeId, Scanned};
use crate::transform::strict_json::{self, JsonError};

pub use crate::transform::field_path::FieldPath;
pub use crate::transform::json_scan::Step;

/// [`FieldPath::locate`] with the proxy's error: a value the path cannot run on is an error,
/// never "no match" (on the way to storage that would leave a field in clear).
fn locate(path: &FieldPath, doc: &Value) -> Result<Vec<Vec<Step>>, ProxyError> {
    path.locate(doc)
        .map_err(|_| ProxyError::Internal("cannot evaluate a field path on this value".into()))
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
    /// The authenticated principal (`identity`, `claim.*`, `principal.*`).
    pub principal: Option<&'a crate::auth::Principal>,
}

impl Lookup for RequestMeta<'_> {
    /// Request values only (path captures, headers, the principal), as `require` reads them.
    fn lookup(&self, source: &Source) -> Option<String> {
        request_value(self, source)
    }
}

/// How opened values are shown to the caller (decided by the key policies).
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    /// Plaintext.
    Plain,
    /// The route's `mask` rules applied to the plaintext (`hash` masks need the key).
    Masked(Option<&'a crate::transform::mask::MaskKey>),
    /// Not opened at all: every value at a configured path answers `null`; no key is used.
    Withheld,
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

/// A context value from the request (path captures and headers).
fn request_value(meta: &RequestMeta, source: &Source) -> Option<String> {
    match source {
        Source::Path(name) => meta.captures.get(name).cloned(),
        Source::Header(name) => {
            let mut values = meta.headers.get_all(name).iter();
            let first = values.next()?;
            // A repeated header is ambiguous: which one would the reader send? Refuse it.
            if values.next().is_some() {
                return None;
            }
            first.to_str().ok().map(str::to_string)
        }
        // Only S3 routes know these; config validation keeps them off JSON routes; `json.*`
        // comes from the document.
        Source::S3Bucket | Source::Json(_) => None,
        Source::Identity | Source::Claim(_) | Source::Principal(_) => meta.principal?.value(source),
    }
}

impl Lookup for DocLookup<'_> {
    fn lookup(&self, source: &Source) -> Option<String> {
        match source {
            Source::Json(member) => match self.doc?.get(member)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            },
            other => request_value(self.meta, other),
        }
    }
}

/// [`DocLookup`] on a scanned body: the same values (a string member unescaped, a number or
/// boolean as written).
struct ScannedLookup<'a> {
    meta: &'a RequestMeta<'a>,
    doc: &'a Scanned<'a>,
    node: NodeId,
}

impl Lookup for ScannedLookup<'_> {
    fn lookup(&self, source: &Source) -> Option<String> {
        match source {
            Source::Json(member) => {
                let n = self.doc.member(self.node, member)?;
                match self.doc.kind(n) {
                    Kind::String => self.doc.string_value(n).map(|s| s.into_owned()),
                    Kind::Number | Kind::Bool => Some(self.doc.raw_str(n).to_string()),
                    _ => None,
                }
            }
            other => request_value(self.meta, other),
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
    message_context_with(route, meta, &lookup, key_ctx)
}

fn message_context_with(
    route: &JsonRoute,
    meta: &RequestMeta,
    lookup: &dyn Lookup,
    key_ctx: &Context,
) -> Result<Context, ProxyError> {
    let mut ctx = key_ctx.clone();
    for (name, t) in &route.message_context {
        ctx.insert(name.clone(), render(meta, name, t, lookup)?);
    }
    Ok(ctx)
}

/// The documents in a body: a top-level array's elements, else the body itself, and whatever
/// `response_documents` selects (wrapped lists). Writes and reads use the same documents, so a
/// wrapped bulk write is sealed exactly as its reads open.
fn documents(route: &JsonRoute, body: &Value) -> Result<Vec<Vec<Step>>, ProxyError> {
    let mut out = match body {
        Value::Array(items) => (0..items.len()).map(|i| vec![Step::Index(i)]).collect(),
        _ => vec![vec![]],
    };
    {
        for d in &route.documents {
            for loc in locate(d, body)? {
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
    Ok(out)
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
    let mut sealer = ValueSealer::new(key)?;
    for doc_loc in documents(route, body)? {
        let Some(doc) = get_mut(body, &doc_loc) else {
            continue;
        };
        let msg_ctx = message_context(route, meta, doc, key_ctx)?;
        for field in &route.fields {
            for loc in locate(field, doc)? {
                let Some(value) = get_mut(doc, &loc) else {
                    continue;
                };
                let plaintext = zeroize::Zeroizing::new(
                    serde_json::to_vec(value)
                        .map_err(|_| ProxyError::Internal("serialize".into()))?,
                );
                let mut t = Vec::new();
                sealer.seal_into(&msg_ctx, field.source(), &plaintext, &mut t)?;
                *value = Value::String(
                    String::from_utf8(t).map_err(|_| ProxyError::Internal("token".into()))?,
                );
                sealed += 1;
            }
        }
    }
    Ok(sealed)
}

/// Seals the values of one body under one data key, in the format the key is for (`enc:v2:`
/// when it has a record, else `enc:v1:`), reusing its buffers from value to value.
struct ValueSealer<'a> {
    key: &'a SealingKey,
    /// v1: the encoded envelope header, once per body.
    header_bytes: Vec<u8>,
    /// v2: the AAD and the sealing buffer.
    aad: Vec<u8>,
    scratch: Vec<u8>,
}

impl<'a> ValueSealer<'a> {
    fn new(key: &'a SealingKey) -> Result<Self, ProxyError> {
        let header_bytes = match key.record {
            Some(_) => Vec::new(),
            None => key
                .header
                .encode()
                .map_err(|e| ProxyError::Internal(format!("header: {e}")))?,
        };
        Ok(ValueSealer {
            key,
            header_bytes,
            aad: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The token of `plaintext`, the value of `field` in a document with `msg_ctx`, appended
    /// to `out`.
    fn seal_into(
        &mut self,
        msg_ctx: &Context,
        field: &str,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        match &self.key.record {
            Some(record) => {
                msg_ctx.canonical_with_into((FIELD_KEY, field), &mut self.aad);
                compact::seal_into(record, &self.aad, plaintext, &mut self.scratch, out)
                    .map_err(|e| ProxyError::Internal(format!("seal: {e}")))
            }
            None => {
                let mut ctx = msg_ctx.clone();
                ctx.insert(FIELD_KEY, field);
                let t =
                    token::seal_with(&self.header_bytes, self.key.data_key.prf(), &ctx, plaintext)
                        .map_err(|e| ProxyError::Internal(format!("header: {e}")))?;
                out.extend_from_slice(t.as_bytes());
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The byte-splicing path: what the proxy runs. The body is scanned once ([`json_scan`]), the
// configured values are found on the scan, and their replacements (tokens on the way to
// storage, plaintexts on the way back) are spliced into the original bytes; the rest of the
// document passes byte for byte. When the matches nest (overlapping field paths such as
// `$.profile` and `$.profile.name`, or a field inside another document), the order of the
// DOM path above is what defines the result, and the body goes through it instead.

/// Scan a body: the same strictness as [`strict_json::parse`] (duplicate keys, depth).
pub fn scan_body(body: &[u8], max_depth: usize) -> Result<Scanned<'_>, JsonError> {
    json_scan::scan(body, max_depth)
}

/// For a store that ignores case in member names: refuse a body with a member named like an
/// encrypted field but for case (`SSN`, `Ssn`, `ſsn` for `ssn`), which the store would take as
/// that field although it was not sealed. Names are compared after Unicode lowercasing, with
/// `ſ` as `s` (Go's `encoding/json` folds it so; the Kelvin sign lowercases to `k`).
fn refuse_case_variants(route: &JsonRoute, doc: &Scanned) -> Result<(), ProxyError> {
    if !route.case_insensitive_upstream {
        return Ok(());
    }
    let fold = |s: &str| -> String {
        s.chars()
            .flat_map(char::to_lowercase)
            .map(|c| if c == 'ſ' { 's' } else { c })
            .collect()
    };
    let names: Vec<&str> = route
        .fields
        .iter()
        .chain(&route.documents)
        .flat_map(|f| f.compiled.names())
        .collect();
    let folded: Vec<String> = names.iter().map(|n| fold(n)).collect();
    for member in doc.member_names() {
        if !names.contains(&member.as_ref()) && folded.contains(&fold(&member)) {
            return Err(ProxyError::CaseVariant);
        }
    }
    Ok(())
}

/// [`estimate_messages`] on a scanned body.
pub fn estimate_messages_scanned(route: &JsonRoute, doc: &Scanned) -> u64 {
    let root = doc.root();
    let docs = match doc.kind(root) {
        Kind::Array => doc.child_ids(root).count().max(1),
        _ => 1,
    };
    (docs * route.fields.len()) as u64
}

/// [`documents`] on a scanned body.
fn scanned_documents(route: &JsonRoute, doc: &Scanned) -> Vec<NodeId> {
    let root = doc.root();
    let mut out: Vec<NodeId> = match doc.kind(root) {
        Kind::Array => doc.child_ids(root).collect(),
        _ => vec![root],
    };
    for d in &route.documents {
        d.compiled.for_each_match(doc, root, |n| match doc.kind(n) {
            Kind::Array => out.extend(doc.child_ids(n)),
            _ => out.push(n),
        });
    }
    out
}

/// One value to seal or open: a match of field `field` in document `doc`.
struct Match {
    node: NodeId,
    field: usize,
    doc: usize,
}

/// The values to replace, or `None` when splicing could differ from the DOM path: two matches
/// nest or coincide, or a match covers a member a document's message context is read from.
fn splice_plan(route: &JsonRoute, doc: &Scanned, docs: &[NodeId]) -> Option<Vec<Match>> {
    // Field paths that may nest (`$.profile`, `$.profile.name`) seal one value inside another's
    // token, which a scan of the stored body cannot see into: those routes take the DOM path.
    if route.fields_may_nest {
        return None;
    }
    let mut matches = Vec::with_capacity(docs.len() * route.fields.len());
    for (di, &d) in docs.iter().enumerate() {
        for (fi, f) in route.fields.iter().enumerate() {
            f.compiled.for_each_match(doc, d, |node| {
                matches.push(Match {
                    node,
                    field: fi,
                    doc: di,
                })
            });
        }
    }
    // Node ids are in document order (pre-order), so a nesting shows between neighbours.
    matches.sort_by_key(|m| m.node);
    if matches
        .windows(2)
        .any(|w| doc.contains(w[0].node, w[1].node))
    {
        return None;
    }
    // No match may cover a member a document's context reads: matches do not nest and are in
    // document order, so only the last one at or before the member can contain it.
    let covered = |m: NodeId| {
        let i = matches.partition_point(|x| x.node <= m);
        i > 0 && doc.contains(matches[i - 1].node, m)
    };
    for &d in docs {
        for (_, t) in &route.message_context {
            for source in t.sources() {
                if let Source::Json(member) = source
                    && let Some(m) = doc.member(d, member)
                    && covered(m)
                {
                    return None;
                }
            }
        }
    }
    Some(matches)
}

fn scanned_context(
    route: &JsonRoute,
    meta: &RequestMeta,
    doc: &Scanned,
    node: NodeId,
    key_ctx: &Context,
) -> Result<Context, ProxyError> {
    let lookup = ScannedLookup { meta, doc, node };
    message_context_with(route, meta, &lookup, key_ctx)
}

/// Seal every configured field of a scanned body; returns the body to forward and how many
/// values were sealed.
pub fn seal_scanned(
    route: &JsonRoute,
    meta: &RequestMeta,
    key_ctx: &Context,
    key: &SealingKey,
    doc: &Scanned,
    max_depth: usize,
) -> Result<(Vec<u8>, usize), ProxyError> {
    refuse_case_variants(route, doc)?;
    let docs = scanned_documents(route, doc);
    let Some(matches) = splice_plan(route, doc, &docs) else {
        let mut body = strict_json::parse(doc.source().as_bytes(), max_depth)
            .map_err(ProxyError::MalformedJson)?;
        let n = seal_body(route, meta, key_ctx, key, &mut body)?;
        let out =
            serde_json::to_vec(&body).map_err(|_| ProxyError::Internal("serialize".into()))?;
        return Ok((out, n));
    };
    // Every document's context renders, whether or not it has values to seal (as on the DOM
    // path): a write whose context is incomplete is refused, not half sealed.
    let contexts = docs
        .iter()
        .map(|&d| scanned_context(route, meta, doc, d, key_ctx))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sealer = ValueSealer::new(key)?;
    // The tokens, quoted, one after another in one buffer: no allocation per value. Reserved
    // for v2 tokens (their size is known); v1 tokens may grow it (they hold no plaintext).
    let mut tokens: Vec<u8> = Vec::with_capacity(
        matches
            .iter()
            .map(|m| {
                compact::PREFIX.len()
                    + (doc.raw(m.node).len() + compact::OVERHEAD).div_ceil(3) * 4
                    + 2
            })
            .sum(),
    );
    let mut ranges = Vec::with_capacity(matches.len());
    for m in &matches {
        let field = &route.fields[m.field];
        // The value's own bytes are its JSON serialization (validated by the scan).
        let start = tokens.len();
        tokens.push(b'"');
        sealer.seal_into(
            &contexts[m.doc],
            field.source(),
            doc.raw(m.node),
            &mut tokens,
        )?;
        tokens.push(b'"');
        ranges.push((doc.span(m.node), start..tokens.len()));
    }
    let mut edits: Vec<(std::ops::Range<usize>, &[u8])> = ranges
        .into_iter()
        .map(|(span, r)| (span, tokens.get(r).unwrap_or_default()))
        .collect();
    let out = json_scan::splice(doc.source().as_bytes(), &mut edits)
        .map_err(|e| ProxyError::Internal(format!("splice: {e}")))?;
    Ok((out, matches.len()))
}

/// Open every token at a configured path of a scanned body, as [`open_body`] does; returns
/// the body to answer with.
pub async fn open_scanned(
    route: &JsonRoute,
    meta: &RequestMeta<'_>,
    key_ctx: &Context,
    keys: &KeyService,
    doc: &Scanned<'_>,
    max_depth: usize,
) -> Result<(Vec<u8>, OpenReport), ProxyError> {
    open_scanned_as(route, meta, key_ctx, keys, doc, max_depth, View::Plain).await
}

/// [`open_scanned`], showing the values as `view` says.
#[allow(clippy::too_many_arguments)]
pub async fn open_scanned_as(
    route: &JsonRoute,
    meta: &RequestMeta<'_>,
    key_ctx: &Context,
    keys: &KeyService,
    doc: &Scanned<'_>,
    max_depth: usize,
    view: View<'_>,
) -> Result<(Vec<u8>, OpenReport), ProxyError> {
    let docs = scanned_documents(route, doc);
    let Some(matches) = splice_plan(route, doc, &docs) else {
        let mut body = strict_json::parse(doc.source().as_bytes(), max_depth)
            .map_err(|_| ProxyError::UpstreamResponse("malformed JSON from upstream"))?;
        let report = open_body_as(route, meta, key_ctx, keys, &mut body, view).await?;
        let out =
            serde_json::to_vec(&body).map_err(|_| ProxyError::Internal("serialize".into()))?;
        return Ok((out, report));
    };
    let mut report = OpenReport::default();
    let mut opener = TokenOpener::new(route, key_ctx, keys);
    let mut validator = json_scan::Validator::default();
    let root_is_list = doc.kind(doc.root()) == Kind::Array;
    let mut contexts: Vec<Option<Result<Context, ProxyError>>> =
        docs.iter().map(|_| None).collect();
    // The plaintexts, one after another in one buffer reserved up front (a plaintext is
    // shorter than its token, so it never grows: no copy is left behind by a reallocation),
    // zeroized when it goes. No allocation per value.
    let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(
        matches.iter().map(|m| doc.span(m.node).len()).sum(),
    ));
    let mut shown: Vec<(std::ops::Range<usize>, Shown)> = Vec::with_capacity(matches.len());
    for m in &matches {
        let field = &route.fields[m.field];
        if let View::Withheld = view {
            shown.push((doc.span(m.node), Shown::Null));
            report.withheld += 1;
            continue;
        }
        let ctx = contexts[m.doc]
            .get_or_insert_with(|| scanned_context(route, meta, doc, docs[m.doc], key_ctx));
        let outcome = match (ctx, doc.kind(m.node)) {
            (Ok(ctx), Kind::String) => {
                let token = doc.string_value(m.node).unwrap_or_default();
                let start = plain.len();
                match opener.open_into(&token, field, ctx, &mut plain).await {
                    // Spliced as it is: it must be exactly one JSON value.
                    Ok(()) => match validator.check(&plain[start..], max_depth) {
                        Ok(_) => Ok(start..plain.len()),
                        Err(_) => {
                            plain.truncate(start);
                            Err(DecryptFailure::Message)
                        }
                    },
                    Err(e) => Err(e),
                }
            }
            (Ok(_), _) => Err(DecryptFailure::NotAToken),
            (Err(_), _) => Err(DecryptFailure::MissingContext),
        };
        match outcome {
            Ok(range) => {
                let value = match view {
                    View::Masked(key) => {
                        report.masked += 1;
                        let masked = crate::transform::mask::apply(
                            &route.masks[m.field],
                            &plain[range.clone()],
                            key,
                        );
                        plain.truncate(range.start);
                        Shown::Owned(masked)
                    }
                    _ => Shown::Plain(range),
                };
                shown.push((doc.span(m.node), value));
                report.opened += 1;
            }
            Err(failure) => {
                let document = list_position(m.doc, docs.len(), root_is_list);
                redact_or_fail(route, field, document, failure)?;
                shown.push((doc.span(m.node), Shown::Null));
                report.redacted += 1;
            }
        }
    }
    let mut edits: Vec<(std::ops::Range<usize>, &[u8])> = shown
        .iter()
        .map(|(span, value)| {
            let bytes: &[u8] = match value {
                Shown::Plain(r) => plain.get(r.clone()).unwrap_or_default(),
                Shown::Owned(v) => v,
                Shown::Null => b"null",
            };
            (span.clone(), bytes)
        })
        .collect();
    let out = json_scan::splice(doc.source().as_bytes(), &mut edits)
        .map_err(|e| ProxyError::Internal(format!("splice: {e}")))?;
    report.key_versions = opener.versions;
    Ok((out, report))
}

/// What a value of a read body is replaced with.
enum Shown {
    /// Its plaintext: a range of the body's plaintext buffer.
    Plain(std::ops::Range<usize>),
    /// Its masked form.
    Owned(zeroize::Zeroizing<Vec<u8>>),
    /// `null` (withheld or redacted).
    Null,
}

/// A value that did not open: `Ok` to redact it (it becomes `null`), per the route, or the
/// error that fails the whole response. Only a value proven bad may be redacted: not a token,
/// a wrapped key its backend refused as invalid, a message that failed authentication. A
/// backend error of any other kind (outage, credentials, access denied, disabled key) and a
/// record whose context is missing say nothing about the value: they fail the response as
/// what they are (a client writing a redacted document back would erase the value for good).
///
/// Redaction is per value: in a list, the other documents and fields open as usual. An error
/// names the document (in a list) and the field, so a client can find the record.
fn redact_or_fail(
    route: &JsonRoute,
    field: &FieldPath,
    document: Option<usize>,
    failure: DecryptFailure,
) -> Result<(), ProxyError> {
    let place = || ValuePlace {
        document,
        field: field.source().to_string(),
    };
    match failure {
        DecryptFailure::Backend(e) => Err(ProxyError::KeyBackend(e)),
        DecryptFailure::MissingContext => Err(ProxyError::DecryptFailed(failure, place())),
        proven @ (DecryptFailure::NotAToken
        | DecryptFailure::WrappedKey
        | DecryptFailure::Message) => match route.on_decrypt_error {
            OnDecryptError::Error => Err(ProxyError::DecryptFailed(proven, place())),
            OnDecryptError::Redact => {
                tracing::warn!(field = field.source(), document, reason = %proven, "value redacted: it did not decrypt");
                Ok(())
            }
        },
    }
}

/// A document's position in a list response, for error messages: the index in a top-level
/// array, or among the documents `response_documents` selects in a wrapped list (whose
/// wrapper, document 0 of [`documents`], is no list item); `None` for a single document.
fn list_position(index: usize, documents: usize, root_is_list: bool) -> Option<usize> {
    if root_is_list {
        Some(index)
    } else if documents > 1 {
        index.checked_sub(1)
    } else {
        None
    }
}

/// How opening a body went.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub opened: usize,
    pub redacted: usize,
    /// Of `opened`, values answered masked.
    pub masked: usize,
    /// Values answered `null` because the caller may not open them.
    pub withheld: usize,
    /// The root-key versions of the tokens opened (`BACKEND:KEY:VERSION`, each once): the
    /// wrapped keys of the route's keys in their headers (for the audit log).
    pub key_versions: Vec<Arc<str>>,
}

/// Open every token at a configured path in `body`.
///
/// A value at a configured path that does not open (not a token, tampered, foreign, other
/// context) is a [`DecryptFailure`]: per the route, the whole response fails or the value
/// becomes `null`. A backend error that does not prove the value bad always fails the
/// response (never redacts: a client writing the redacted document back would lose data).
pub async fn open_body(
    route: &JsonRoute,
    meta: &RequestMeta<'_>,
    key_ctx: &Context,
    keys: &KeyService,
    body: &mut Value,
) -> Result<OpenReport, ProxyError> {
    open_body_as(route, meta, key_ctx, keys, body, View::Plain).await
}

/// [`open_body`], showing the values as `view` says.
pub async fn open_body_as(
    route: &JsonRoute,
    meta: &RequestMeta<'_>,
    key_ctx: &Context,
    keys: &KeyService,
    body: &mut Value,
    view: View<'_>,
) -> Result<OpenReport, ProxyError> {
    let mut report = OpenReport::default();
    let mut opener = TokenOpener::new(route, key_ctx, keys);
    let root_is_list = body.is_array();
    let docs = documents(route, body)?;
    let n_docs = docs.len();
    for (doc_index, doc_loc) in docs.into_iter().enumerate() {
        let msg_ctx = match get(body, &doc_loc) {
            Some(doc) => message_context(route, meta, doc, key_ctx),
            None => continue,
        };
        for (field_index, field) in route.fields.iter().enumerate().rev() {
            let locations = match get(body, &doc_loc) {
                Some(doc) => locate(field, doc)?,
                None => break,
            };
            for loc in locations {
                let full: Vec<Step> = doc_loc.iter().chain(loc.iter()).cloned().collect();
                if let View::Withheld = view {
                    if let Some(slot) = get_mut(body, &full) {
                        *slot = Value::Null;
                        report.withheld += 1;
                    }
                    continue;
                }
                let outcome = match (&msg_ctx, get(body, &full)) {
                    (Ok(ctx), Some(Value::String(token))) => {
                        match opener.open(token, field, ctx).await {
                            Ok(plaintext) => {
                                let shown = match view {
                                    View::Masked(key) => {
                                        report.masked += 1;
                                        crate::transform::mask::apply(
                                            &route.masks[field_index],
                                            &plaintext,
                                            key,
                                        )
                                    }
                                    _ => plaintext,
                                };
                                serde_json::from_slice(&shown).map_err(|_| DecryptFailure::Message)
                            }
                            Err(e) => Err(e),
                        }
                    }
                    (Ok(_), _) => Err(DecryptFailure::NotAToken),
                    (Err(_), _) => Err(DecryptFailure::MissingContext),
                };
                let Some(slot) = get_mut(body, &full) else {
                    continue;
                };
                match outcome {
                    Ok(value) => {
                        *slot = value;
                        report.opened += 1;
                    }
                    Err(failure) => {
                        let document = list_position(doc_index, n_docs, root_is_list);
                        redact_or_fail(route, field, document, failure)?;
                        *slot = Value::Null;
                        report.redacted += 1;
                    }
                }
            }
        }
    }
    report.key_versions = opener.versions;
    Ok(report)
}

/// Opens the tokens of one body under its key context. The values of a body are usually
/// sealed under one data key, so its EDKs are looked up once per body (by encoded header).
struct TokenOpener<'a> {
    key_ctx: &'a Context,
    keys: &'a KeyService,
    /// The route's root keys: only EDKs under these are tried.
    allowed: &'a [crate::keys::KeyRef],
    opened: Vec<(Vec<u8>, Arc<DataKey>)>,
    /// `BACKEND:KEY:VERSION` of the EDKs (of the route's keys) of the headers opened.
    versions: Vec<Arc<str>>,
    /// v2: the route's key vault, the records met in this body, and reused buffers (`buf`
    /// holds plaintext between values: zeroized when the opener goes).
    vault_label: Option<&'a str>,
    records: Vec<(RecordId, Arc<OpenRecord>)>,
    aad: Vec<u8>,
    buf: zeroize::Zeroizing<Vec<u8>>,
}

impl<'a> TokenOpener<'a> {
    fn new(route: &'a JsonRoute, key_ctx: &'a Context, keys: &'a KeyService) -> Self {
        TokenOpener {
            key_ctx,
            keys,
            allowed: &route.keys,
            opened: Vec::new(),
            versions: Vec::new(),
            vault_label: route.vault_label.as_deref(),
            records: Vec::new(),
            aad: Vec::with_capacity(256),
            buf: zeroize::Zeroizing::new(Vec::new()),
        }
    }

    /// The plaintext of `token`, the value of `field` in a document with `msg_ctx`.
    async fn open(
        &mut self,
        token: &str,
        field: &FieldPath,
        msg_ctx: &Context,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, DecryptFailure> {
        let mut out = zeroize::Zeroizing::new(Vec::new());
        self.open_into(token, field, msg_ctx, &mut out).await?;
        Ok(out)
    }

    /// [`TokenOpener::open`], appending the plaintext to `out` (nothing on failure).
    async fn open_into(
        &mut self,
        token: &str,
        field: &FieldPath,
        msg_ctx: &Context,
        out: &mut Vec<u8>,
    ) -> Result<(), DecryptFailure> {
        if token.starts_with(compact::PREFIX) {
            return self.open_compact(token, field, msg_ctx, out).await;
        }
        let parsed = ParsedToken::parse(token).map_err(|_| DecryptFailure::NotAToken)?;
        let data_key = self.data_key(&parsed).await?;
        let mut ctx = msg_ctx.clone();
        ctx.insert(FIELD_KEY, field.source());
        let plaintext = zeroize::Zeroizing::new(
            parsed
                .open_with(data_key.prf(), &ctx)
                .map_err(|_| DecryptFailure::Message)?,
        );
        out.extend_from_slice(&plaintext);
        Ok(())
    }

    /// A v2 token: its record's key (once per record per body), then one AES-GCM open.
    async fn open_compact(
        &mut self,
        token: &str,
        field: &FieldPath,
        msg_ctx: &Context,
        out: &mut Vec<u8>,
    ) -> Result<(), DecryptFailure> {
        let id = compact::record_id(token).map_err(|_| DecryptFailure::NotAToken)?;
        let record = match self.records.iter().find(|(i, _)| *i == id) {
            Some((_, r)) => r.clone(),
            None => {
                let r = self.fetch_record(&id).await?;
                self.records.push((id, r.clone()));
                r
            }
        };
        msg_ctx.canonical_with_into((FIELD_KEY, field.source()), &mut self.aad);
        if self.buf.capacity() < token.len() {
            // A new buffer (the old one is zeroized as it goes) rather than a reallocation,
            // which would copy the previous value's plaintext into memory freed unwiped.
            self.buf = zeroize::Zeroizing::new(Vec::with_capacity(token.len().max(256)));
        }
        let range = compact::open_into(&record.key, &self.aad, token, &mut self.buf)
            .map_err(|_| DecryptFailure::Message)?;
        out.extend_from_slice(&self.buf[range]);
        Ok(())
    }

    async fn fetch_record(&mut self, id: &RecordId) -> Result<Arc<OpenRecord>, DecryptFailure> {
        let vault = self
            .vault_label
            .and_then(|l| self.keys.vault(l))
            .ok_or_else(|| {
                DecryptFailure::Backend(BackendError::RecordMissing(format!(
                    "{id}: this route has no key_vault to read data-key records from"
                )))
            })?;
        let record = self
            .keys
            .opening_record_key(&vault, id, self.key_ctx, self.allowed)
            .await
            .map_err(DecryptFailure::Backend)?;
        self.note_versions(&record.header, Some(&record.labels));
        Ok(record)
    }

    /// Remember the root-key versions of a header's EDKs under the route's keys.
    /// `labels`: the header's [`crate::keys::key_version_labels`], when they are at hand.
    fn note_versions(&mut self, header: &crate::envelope::Header, labels: Option<&[Arc<str>]>) {
        for (i, edk) in header.edks.iter().enumerate() {
            if self
                .allowed
                .iter()
                .any(|a| a.backend == edk.backend && self.keys.same_key(a, &edk.key_id))
            {
                let v: Arc<str> = match labels.and_then(|l| l.get(i)) {
                    Some(l) => l.clone(),
                    None => crate::keys::key_version_label(edk).into(),
                };
                if !self.versions.contains(&v) {
                    self.versions.push(v);
                }
            }
        }
    }

    async fn data_key(&mut self, parsed: &ParsedToken) -> Result<Arc<DataKey>, DecryptFailure> {
        if let Some((_, k)) = self.opened.iter().find(|(h, _)| h == parsed.header_bytes()) {
            return Ok(k.clone());
        }
        let k = self
            .keys
            .opening_key_for(&parsed.header, self.key_ctx, self.allowed)
            .await
            .map_err(|e| match e {
                BackendError::InvalidCiphertext => DecryptFailure::WrappedKey,
                other => DecryptFailure::Backend(other),
            })?;
        self.opened
            .push((parsed.header_bytes().to_vec(), k.clone()));
        self.note_versions(&parsed.header, None);
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalized_paths_round_trip() {
        let doc = json!({"a b": [{"it's": 1}], "x\ny": {"\\": 2}});
        let p = FieldPath::parse("$..*").unwrap();
        let locs = p.locate(&doc).unwrap();
        assert!(!locs.is_empty());
        for loc in locs {
            assert!(get(&doc, &loc).is_some(), "{loc:?}");
        }
        let p = FieldPath::parse("$['a b'][*]['it\\'s']").unwrap();
        assert_eq!(
            p.locate(&doc).unwrap(),
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
        assert_eq!(p.locate(&doc).unwrap(), vec![vec![Step::Key("a".into())]]);
    }

    #[test]
    fn filters_and_slices_are_refused() {
        for bad in ["$.a[?(@.b)]", "$.a[0:2]", "a", "$", "$.a[?@.b=='x']"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
        assert!(FieldPath::parse("$['a:b']").is_ok());
    }
}
