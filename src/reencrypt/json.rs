//! JSON routes: list a collection (the store's pagination or a file of ids), judge each
//! document by the tokens it stores (read raw from the route's upstream), and rewrite stale
//! ones through the proxy: read (plaintext), check nothing changed, write back conditionally,
//! then read back raw (every token current) and through the proxy (same plaintext).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use serde_json::Value;

use super::{ItemResult, Outcome, Progress, Run, for_each_ordered};
use crate::body::full_body;
use crate::envelope::token::{PREFIX, ParsedToken};

pub async fn walk(run: &Arc<Run>, progress: &mut Progress) -> Result<(), String> {
    let ids = match &run.args.ids {
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => list(run).await?,
    };
    let ids = after(ids, progress.after.as_deref());
    progress.listed(ids.len() as u64);
    for_each_ordered(run, progress, ids, |run, id| async move {
        let outcome = match item(&run, &id).await {
            Ok(r) => r,
            Err(e) => (Vec::new(), false, Outcome::Error(e)),
        };
        ItemResult {
            id,
            versions: outcome.0,
            stale: outcome.1,
            outcome: outcome.2,
        }
    })
    .await
}

/// The items after `last` (all of them when it is not among them: a rerun judges each anew).
pub fn after(items: Vec<String>, last: Option<&str>) -> Vec<String> {
    match last.and_then(|l| items.iter().position(|i| i == l)) {
        Some(p) => items.into_iter().skip(p + 1).collect(),
        None => items,
    }
}

fn collection(run: &Run) -> String {
    run.args
        .collection
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string()
}

fn raw_url(run: &Run, path_and_query: &str) -> String {
    let u = &run.route.upstream;
    format!(
        "{}://{}{}{}",
        u.scheme, u.authority, u.base_path, path_and_query
    )
}

fn record_path(run: &Run, id: &str) -> String {
    format!("{}/{}", collection(run), encode_segment(id))
}

/// Percent-encode one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn get(
    run: &Run,
    url: &str,
    proxy: bool,
) -> Result<(StatusCode, Option<String>, Bytes), String> {
    let mut req = Request::builder().method(Method::GET).uri(url);
    if proxy {
        for (n, v) in &run.args.headers {
            req = req.header(n.as_str(), v.as_str());
        }
    }
    let req = req
        .header(header::ACCEPT, "application/json")
        .body(full_body(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (parts, body) = run.send(req).await?;
    let etag = parts
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((parts.status, etag, body))
}

/// Every record id of the collection, page by page (raw from the store).
async fn list(run: &Run) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let limit = run.args.limit.max(1);
    for page in 1u64.. {
        let url = raw_url(
            run,
            &format!(
                "{}?{}={page}&{}={limit}",
                collection(run),
                encode_segment(&run.args.page_param),
                encode_segment(&run.args.limit_param)
            ),
        );
        let (status, _, body) = get(run, &url, false).await?;
        if !status.is_success() {
            return Err(format!(
                "listing {}: the store answered {status}",
                collection(run)
            ));
        }
        let docs: Vec<Value> = serde_json::from_slice(&body)
            .map_err(|e| format!("listing {}: not a JSON array ({e})", collection(run)))?;
        let n = docs.len();
        for d in docs {
            ids.push(id_of(&d, &run.args.id_field).ok_or_else(|| {
                format!(
                    "listing {}: a record without {:?}",
                    collection(run),
                    run.args.id_field
                )
            })?);
        }
        if n < limit as usize {
            break;
        }
    }
    Ok(ids)
}

fn id_of(doc: &Value, field: &str) -> Option<String> {
    match doc.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The tokens a stored document holds, with the top-level member each is under.
fn tokens<'a>(v: &'a Value, top: Option<&'a str>, out: &mut Vec<(Option<&'a str>, &'a str)>) {
    match v {
        Value::String(s) if s.starts_with(PREFIX) => out.push((top, s)),
        Value::Array(a) => a.iter().for_each(|x| tokens(x, top, out)),
        Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| tokens(x, Some(top.unwrap_or(k)), out)),
        _ => {}
    }
}

/// Judge a stored document: its `key:version`s and whether any token is stale.
fn judge(run: &Run, doc: &Value) -> Result<(Vec<String>, bool), String> {
    let mut found = Vec::new();
    tokens(doc, None, &mut found);
    let mut versions = Vec::new();
    let mut stale = false;
    for (_, t) in found {
        let parsed = ParsedToken::parse(t).map_err(|e| format!("a stored token: {e}"))?;
        let (current, names) = run.judge(&parsed.header);
        stale |= !current;
        for n in names {
            if !versions.contains(&n) {
                versions.push(n);
            }
        }
    }
    Ok((versions, stale))
}

fn parse(body: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("{what}: not JSON ({e})"))
}

async fn item(run: &Run, id: &str) -> Result<(Vec<String>, bool, Outcome), String> {
    let path = record_path(run, id);
    let raw = raw_url(run, &path);
    let proxied = format!("{}{path}", run.proxy);
    let (status, _, body) = get(run, &raw, false).await?;
    if status == StatusCode::NOT_FOUND {
        // Deleted since it was listed: nothing to rewrite.
        return Ok((Vec::new(), false, Outcome::Current));
    }
    if !status.is_success() {
        return Err(format!("raw read: the store answered {status}"));
    }
    let stored = parse(&body, "raw read")?;
    let (versions, stale) = judge(run, &stored)?;
    if !stale {
        return Ok((versions, false, Outcome::Current));
    }
    if run.args.dry_run {
        return Ok((versions, true, Outcome::WouldRewrite));
    }
    let done = |o| Ok((versions.clone(), true, o));

    // The plaintext, as the route serves it.
    let (status, etag, body) = get(run, &proxied, true).await?;
    if !status.is_success() {
        return done(Outcome::Error(format!("read through the proxy: {status}")));
    }
    let plain = parse(&body, "read through the proxy")?;
    if run.args.pause_before_write_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(
            run.args.pause_before_write_ms,
        ))
        .await;
    }
    // Unchanged since it was judged? (json-server has no ETags: compare what is stored.)
    let (status, _, body) = get(run, &raw, false).await?;
    if !status.is_success() || parse(&body, "raw re-read")? != stored {
        return done(Outcome::Conflict("changed since it was read".into()));
    }

    run.write_slot().await;
    let (method, doc) = if run.args.patch {
        let mut found = Vec::new();
        tokens(&stored, None, &mut found);
        let mut patch = serde_json::Map::new();
        for (top, _) in found {
            if let Some(name) = top
                && let Some(v) = plain.get(name)
            {
                patch.insert(name.to_string(), v.clone());
            }
        }
        (Method::PATCH, Value::Object(patch))
    } else {
        (Method::PUT, plain.clone())
    };
    let mut req = Request::builder()
        .method(method.clone())
        .uri(&proxied)
        .header(header::CONTENT_TYPE, "application/json");
    for (n, v) in &run.args.headers {
        req = req.header(n.as_str(), v.as_str());
    }
    if let Some(etag) = &etag {
        req = req.header(header::IF_MATCH, etag.as_str());
    }
    let bytes = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
    let req = req
        .body(full_body(Bytes::from(bytes)))
        .map_err(|e| e.to_string())?;
    let (parts, _) = run.send(req).await?;
    if parts.status == StatusCode::PRECONDITION_FAILED {
        return done(Outcome::Conflict(
            "the store refused the conditional write (412)".into(),
        ));
    }
    if !parts.status.is_success() {
        return done(Outcome::Error(format!(
            "{method} through the proxy: {}",
            parts.status
        )));
    }

    // Verify: stored under the current versions, and the same plaintext.
    let (status, _, body) = get(run, &raw, false).await?;
    if !status.is_success() {
        return done(Outcome::Error(format!("raw read-back: {status}")));
    }
    let (_, still_stale) = judge(run, &parse(&body, "raw read-back")?)?;
    if still_stale {
        return done(Outcome::Error(
            "still not under the current version after the write".into(),
        ));
    }
    let (status, _, body) = get(run, &proxied, true).await?;
    if !status.is_success() || parse(&body, "read-back through the proxy")? != plain {
        return done(Outcome::Error(
            "read back through the proxy, the value differs from what was read".into(),
        ));
    }
    done(Outcome::Rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_after_the_last_item() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(after(v(&["1", "2", "3"]), Some("2")), v(&["3"]));
        assert_eq!(after(v(&["1", "2", "3"]), None), v(&["1", "2", "3"]));
        assert_eq!(after(v(&["1", "3"]), Some("2")), v(&["1", "3"]));
    }

    #[test]
    fn finds_tokens_under_their_top_member() {
        let doc = serde_json::json!({"id": 1, "ssn": "enc:v1:AA", "x": {"y": ["enc:v1:BB"]}});
        let mut found = Vec::new();
        tokens(&doc, None, &mut found);
        assert_eq!(
            found,
            vec![(Some("ssn"), "enc:v1:AA"), (Some("x"), "enc:v1:BB")]
        );
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }
}
