//! S3 routes: list a bucket (prefix) upstream with the route's upstream credentials, HEAD
//! each object raw to read its envelope header (`x-amz-meta-ep-envelope`), and re-seal stale
//! ones THROUGH THE GATEWAY by a CopyObject onto itself (metadata directive COPY, so user
//! metadata is kept; `x-amz-copy-source-if-match` = the ETag seen, so a concurrent write makes
//! the copy fail with 412: a conflict). The gateway re-seals a copy onto itself of an object
//! not under the current key versions, streamed, multipart sources included (src/s3/copy.rs).
//! Each rewritten object is verified: stored under the current versions, and its plaintext
//! (SHA-256, read through the gateway before and after) unchanged.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::json::{after, encode_segment};
use super::{ItemResult, Outcome, Progress, Run, for_each_ordered};
use crate::body::full_body;
use crate::config::{RouteKind, S3RouteConfig};
use crate::envelope::Header;
use crate::s3::gateway::{META_ENVELOPE, META_MULTIPART};
use crate::s3::sign::{UpstreamCredentials, sign_request};

struct Creds {
    upstream: UpstreamCredentials,
    client: UpstreamCredentials,
    region: String,
}

fn s3_config(run: &Run) -> Result<&S3RouteConfig, String> {
    match &run.route.kind {
        RouteKind::S3(s3) => Ok(s3),
        _ => Err(format!("route {} is not an S3 route", run.route.name)),
    }
}

fn creds(run: &Run) -> Result<Creds, String> {
    let s3 = s3_config(run)?;
    let read = crate::secret::read_secret;
    let upstream = UpstreamCredentials::new(
        read(&s3.upstream_access_key_id)?.to_string(),
        read(&s3.upstream_secret_access_key)?,
    );
    let client = match &run.args.access_key_id {
        Some(id) => {
            let secret = match (
                &run.args.secret_access_key_env,
                s3.clients.iter().find(|c| &c.access_key_id == id),
            ) {
                (Some(var), _) => read(&crate::config::SecretSource::Env(var.clone()))?,
                (None, Some(c)) => read(&c.secret_access_key)?,
                (None, None) => {
                    return Err(format!(
                        "--access-key-id {id}: not a client of route {}; give --secret-access-key-env",
                        run.route.name
                    ));
                }
            };
            UpstreamCredentials::new(id.clone(), secret)
        }
        None => {
            let c = s3.clients.first().ok_or_else(|| {
                format!(
                    "route {} has no S3 client: give --access-key-id",
                    run.route.name
                )
            })?;
            let secret = match &run.args.secret_access_key_env {
                Some(var) => read(&crate::config::SecretSource::Env(var.clone()))?,
                None => read(&c.secret_access_key)?,
            };
            UpstreamCredentials::new(c.access_key_id.clone(), secret)
        }
    };
    Ok(Creds {
        upstream,
        client,
        region: s3.region.clone(),
    })
}

/// `a/b c` → `a/b%20c`: each segment of an object key percent-encoded.
fn encode_key(key: &str) -> String {
    key.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

fn upstream_base(run: &Run) -> String {
    let u = &run.route.upstream;
    format!("{}://{}{}", u.scheme, u.authority, u.base_path)
}

async fn signed(
    run: &Run,
    creds: &UpstreamCredentials,
    region: &str,
    method: Method,
    url: &str,
    headers: &[(&str, String)],
) -> Result<(http::response::Parts, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (n, v) in headers {
        req = req.header(*n, v.as_str());
    }
    let mut req = req
        .body(full_body(Bytes::new()))
        .map_err(|e| e.to_string())?;
    sign_request(&mut req, creds, region)?;
    run.send(req).await
}

pub async fn walk(run: &Arc<Run>, progress: &mut Progress) -> Result<(), String> {
    let creds = Arc::new(creds(run)?);
    let keys = list(run, &creds).await?;
    let keys = after(keys, progress.after.as_deref());
    progress.listed(keys.len() as u64);
    for_each_ordered(run, progress, keys, move |run, key| {
        let creds = creds.clone();
        async move {
            let outcome = match item(&run, &creds, &key).await {
                Ok(r) => r,
                Err(e) => (Vec::new(), false, Outcome::Error(e)),
            };
            ItemResult {
                id: key,
                versions: outcome.0,
                stale: outcome.1,
                outcome: outcome.2,
            }
        }
    })
    .await
}

/// Every key under the bucket/prefix (ListObjectsV2 upstream, page by page).
async fn list(run: &Run, creds: &Creds) -> Result<Vec<String>, String> {
    let bucket = run.args.bucket.as_deref().unwrap_or("");
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!(
            "{}/{}?list-type=2",
            upstream_base(run),
            encode_segment(bucket)
        );
        if let Some(t) = &token {
            url.push_str(&format!("&continuation-token={}", encode_segment(t)));
        }
        if let Some(p) = &run.args.prefix {
            url.push_str(&format!("&prefix={}", encode_segment(p)));
        }
        let (parts, body) =
            signed(run, &creds.upstream, &creds.region, Method::GET, &url, &[]).await?;
        if !parts.status.is_success() {
            return Err(format!(
                "listing bucket {bucket}: the store answered {}",
                parts.status
            ));
        }
        let xml = std::str::from_utf8(&body).map_err(|_| "listing: not UTF-8".to_string())?;
        for contents in elements(xml, "Contents") {
            if let Some(k) = elements(contents, "Key").first() {
                keys.push(unescape(k)?);
            }
        }
        let truncated = elements(xml, "IsTruncated").first() == Some(&"true");
        token = match elements(xml, "NextContinuationToken").first() {
            Some(t) if truncated => Some(unescape(t)?),
            _ => break,
        };
    }
    Ok(keys)
}

/// The text of each `<name>...</name>` element in `xml` (not nested in itself).
fn elements<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

fn unescape(s: &str) -> Result<String, String> {
    quick_xml::escape::unescape(s)
        .map(|c| c.into_owned())
        .map_err(|e| format!("listing: {e}"))
}

/// The envelope header in an object's reserved metadata.
fn header_of(headers: &HeaderMap) -> Option<Header> {
    let raw = URL_SAFE_NO_PAD
        .decode(headers.get(META_ENVELOPE)?.as_bytes())
        .ok()?;
    Header::decode(&raw).ok().map(|(h, _)| h)
}

/// The SHA-256 of the object's plaintext, read through the gateway (if it still has `etag`).
async fn plaintext_digest(
    run: &Run,
    creds: &Creds,
    url: &str,
    etag: &str,
) -> Result<Result<[u8; 32], StatusCode>, String> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .header(header::IF_MATCH, etag)
        .body(full_body(Bytes::new()))
        .map_err(|e| e.to_string())?;
    sign_request(&mut req, &creds.client, &creds.region)?;
    let resp = run
        .client
        .send(req)
        .await
        .map_err(|e| format!("GET through the gateway: {e}"))?;
    if !resp.status().is_success() {
        return Ok(Err(resp.status()));
    }
    let mut body = resp.into_body();
    let mut sha = Sha256::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("GET through the gateway: {e}"))?;
        if let Ok(data) = frame.into_data() {
            sha.update(&data);
        }
    }
    Ok(Ok(sha.finalize().into()))
}

async fn item(run: &Run, creds: &Creds, key: &str) -> Result<(Vec<String>, bool, Outcome), String> {
    let bucket = run.args.bucket.as_deref().unwrap_or("");
    let path = format!("/{}/{}", encode_segment(bucket), encode_key(key));
    let raw = format!("{}{path}", upstream_base(run));
    let proxied = format!("{}{path}", run.proxy);
    let head = |run, url| async move {
        signed(run, &creds.upstream, &creds.region, Method::HEAD, url, &[]).await
    };
    let (parts, _) = head(run, &raw).await?;
    if parts.status == StatusCode::NOT_FOUND {
        return Ok((Vec::new(), false, Outcome::Current));
    }
    if !parts.status.is_success() {
        return Err(format!("raw HEAD: the store answered {}", parts.status));
    }
    let Some(envelope) = header_of(&parts.headers) else {
        return Err("no envelope metadata (written around the proxy?)".into());
    };
    let (current, versions) = run.judge(&envelope);
    if current {
        return Ok((versions, false, Outcome::Current));
    }
    if run.args.dry_run {
        return Ok((versions, true, Outcome::WouldRewrite));
    }
    let done = |o| Ok((versions.clone(), true, o));
    let etag = parts
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .ok_or("the store gave no ETag")?
        .to_string();
    let multipart = parts.headers.contains_key(META_MULTIPART);

    let before = match plaintext_digest(run, creds, &proxied, &etag).await? {
        Ok(d) => d,
        Err(StatusCode::PRECONDITION_FAILED) | Err(StatusCode::NOT_FOUND) => {
            return done(Outcome::Conflict("changed since it was listed".into()));
        }
        Err(s) => return done(Outcome::Error(format!("GET through the gateway: {s}"))),
    };
    if run.args.pause_before_write_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(
            run.args.pause_before_write_ms,
        ))
        .await;
    }

    run.write_slot().await;
    let source = format!("/{}/{}", encode_segment(bucket), encode_key(key));
    let (parts, body) = signed(
        run,
        &creds.client,
        &creds.region,
        Method::PUT,
        &proxied,
        &[
            ("x-amz-copy-source", source),
            ("x-amz-metadata-directive", "COPY".into()),
            ("x-amz-copy-source-if-match", etag.clone()),
        ],
    )
    .await?;
    if parts.status == StatusCode::PRECONDITION_FAILED || parts.status == StatusCode::NOT_FOUND {
        return done(Outcome::Conflict(format!(
            "changed since it was read (copy: {})",
            parts.status
        )));
    }
    // CopyObject can fail with 200 and an error document.
    if !parts.status.is_success() || !elements(&String::from_utf8_lossy(&body), "Error").is_empty()
    {
        return done(Outcome::Error(format!(
            "copy onto itself through the gateway: {}",
            parts.status
        )));
    }

    // Verify: under the current versions upstream, same plaintext through the gateway.
    let (parts, _) = head(run, &raw).await?;
    let now_current = header_of(&parts.headers).is_some_and(|h| run.judge(&h).0);
    if !parts.status.is_success() || !now_current {
        return done(Outcome::Error(format!(
            "not under the current version after the copy{}",
            if multipart { " (multipart source)" } else { "" }
        )));
    }
    let new_etag = parts
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*")
        .to_string();
    match plaintext_digest(run, creds, &proxied, &new_etag).await? {
        Ok(after) if after == before => done(Outcome::Rewritten),
        Ok(_) => done(Outcome::Error(
            "read back through the gateway, the plaintext differs".into(),
        )),
        Err(StatusCode::PRECONDITION_FAILED) => done(Outcome::Conflict(
            "replaced by another writer right after the copy".into(),
        )),
        Err(s) => done(Outcome::Error(format!(
            "read-back through the gateway: {s}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_keys_from_xml() {
        let xml = "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>a&amp;b</Key><ETag>&quot;x&quot;</ETag></Contents><Contents><Key>c/d e</Key></Contents><NextContinuationToken>t1</NextContinuationToken></ListBucketResult>";
        let keys: Vec<_> = elements(xml, "Contents")
            .into_iter()
            .map(|c| unescape(elements(c, "Key")[0]).unwrap())
            .collect();
        assert_eq!(keys, ["a&b", "c/d e"]);
        assert_eq!(elements(xml, "NextContinuationToken"), ["t1"]);
        assert_eq!(encode_key("c/d e"), "c/d%20e");
    }
}
