//! CopyObject and UploadPartCopy through the encrypting gateway.
//!
//! A stored object is bound to its key context (e.g. its bucket), to its object id, to its
//! bucket and key (format v2, FORMAT.md §9) and, for an object written in parts, to its part
//! layout. So:
//!
//! - **Server-side copy** only for a copy of a v2 single-part object onto itself (e.g. a
//!   `REPLACE` copy that changes its metadata) whose envelope header is under the current
//!   version of every key of the route: upstream copies the ciphertext, still in its place, and
//!   our reserved metadata (a `REPLACE` copy gets the source's put back). A copy onto itself of
//!   an object under an older key version (or a key the route no longer names) is re-sealed:
//!   how `envelope-proxy reencrypt` moves objects off a version.
//! - **Re-encrypting copy** otherwise (another key, another bucket's context, a multipart
//!   source, a legacy v1 source, which becomes v2) and for every UploadPartCopy (a part is bound to its upload's object id and part number): the
//!   source is read through the gateway, decrypted under *its* key context, and written as a
//!   new object (or part) sealed under the destination's, streamed in constant memory. A source
//!   byte that fails authentication aborts the read, and so the write: nothing is committed.
//!   The client gets the answer S3 gives for a copy (`CopyObjectResult` / `CopyPartResult`).
//!
//! `x-amz-copy-source-if-*` conditions and `x-amz-copy-source-range` apply to the source read.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use s3s::{Body, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

use super::gateway::{
    Ctx, META_ENVELOPE, META_FORMAT, META_OBJECT_ID, ObjectFormat, Target, internal,
    remove_headers_where, strip_request_headers, unmark_conditionals,
};
use super::{etag, multipart};
use crate::config::template::Source;

/// The `x-amz-copy-source` of a request: `bucket/key` (URL-encoded), maybe `?versionId=`.
struct CopySource {
    /// The header as the client sent it (forwarded for a server-side copy).
    header: String,
    /// `/bucket/key`, still URL-encoded, as an upstream path.
    path: String,
    query: Option<String>,
    bucket: String,
    key: String,
}

impl CopySource {
    fn parse(headers: &HeaderMap) -> S3Result<CopySource> {
        let header = headers
            .get("x-amz-copy-source")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| s3_error!(InvalidArgument, "x-amz-copy-source is missing"))?
            .to_string();
        let with_slash = if header.starts_with('/') {
            header.clone()
        } else {
            format!("/{header}")
        };
        let (path, query) = match with_slash.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (with_slash, None),
        };
        // A copy source names an object (or one version of it), never a subresource
        // (`?acl`, `?uploadId=…`) whose answer would be copied as the object's content.
        if let Some(q) = &query
            && form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k != "versionId")
        {
            return Err(s3_error!(
                InvalidArgument,
                "x-amz-copy-source may only carry a versionId"
            ));
        }
        let decode =
            |s: &str| crate::config::pattern::percent_decode(s).map(std::borrow::Cow::into_owned);
        let (bucket, key) = path
            .trim_start_matches('/')
            .split_once('/')
            .and_then(|(b, k)| Some((decode(b)?, decode(k)?)))
            .filter(|(b, k)| !b.is_empty() && !k.is_empty() && !b.contains('/'))
            .ok_or_else(|| {
                s3_error!(
                    InvalidArgument,
                    "x-amz-copy-source must be bucket/key (URL-encoded)"
                )
            })?;
        Ok(CopySource {
            header,
            path,
            query,
            bucket,
            key,
        })
    }
}

/// Request headers that describe an object's content and user metadata: what a `COPY`
/// directive takes from the source and a `REPLACE` directive from the request.
fn is_object_metadata(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-amz-meta-")
        || matches!(
            n,
            "content-type"
                | "content-encoding"
                | "content-disposition"
                | "content-language"
                | "cache-control"
                | "expires"
                | "x-amz-website-redirect-location"
        )
}

impl Ctx<'_> {
    pub(super) async fn copy_object(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let source = self.copy_source(&req.headers)?;
        let replace = req
            .headers
            .get("x-amz-metadata-directive")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"REPLACE"));
        // The source's key context, rendered as the destination's is but for its bucket.
        let dest_ctx = self.authorized_context(&req.headers, crate::config::Action::Seal)?;
        let src_ctx = self
            .source_ctx(&source)
            .authorized_context(&req.headers, crate::config::Action::Open)?;
        // A v2 object is bound to its bucket and key: a copy anywhere else is re-sealed.
        let onto_itself = self.target.bucket.as_deref() == Some(source.bucket.as_str())
            && self.target.key.as_deref() == Some(source.key.as_str());
        if src_ctx != dest_ctx || !onto_itself {
            return self.copy_reencrypting(req, &source, replace).await;
        }
        // A copy onto itself: HEAD the source. A REPLACE copy needs its reserved metadata, and an
        // object written in parts cannot be copied server-side (the copy loses the `-N` ETag
        // that its layout is read from), so it is re-encrypted as one piece.
        let head = self
            .send_empty(Method::HEAD, self.source_uri(&source)?, HeaderMap::new())
            .await?;
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        unmark_conditionals(&mut headers);
        if head.status().is_success() {
            // Multipart: a server-side copy would lose the part layout. No envelope: an object
            // written around the proxy, which the read refuses (or, with
            // `dangerous_allow_plaintext_reads`, serves to be sealed: a migration).
            // A legacy (v1) object is re-sealed in place as v2: the way to migrate one.
            // A source sealed under an older version of the route's keys (or under a key the
            // route no longer names) is re-sealed under the current ones: the way stored data
            // is moved off a version before it is retired (`envelope-proxy reencrypt`).
            if multipart::is_multipart(head.headers())
                || !head.headers().contains_key(META_ENVELOPE)
                || ObjectFormat::of(head.headers()) != Ok(ObjectFormat::Bound)
                || !self.under_current_keys(head.headers()).await?
            {
                return self.copy_reencrypting(req, &source, replace).await;
            }
            if replace {
                for name in [
                    META_ENVELOPE,
                    META_OBJECT_ID,
                    META_FORMAT,
                    super::stored_checksum::META_CHECKSUM,
                ] {
                    if let Some(v) = head.headers().get(name) {
                        headers.insert(HeaderName::from_static(name), v.clone());
                    }
                }
            }
            // Copy what was checked: an object replaced since the HEAD fails the copy instead.
            if !headers.contains_key("x-amz-copy-source-if-match")
                && let Some(etag) = head.headers().get(header::ETAG)
            {
                headers.insert("x-amz-copy-source-if-match", etag.clone());
            }
        } else if replace {
            return Ok(Self::forward(head));
        }
        // (A COPY copy of a missing source: upstream answers the copy with its error.)
        headers.insert(
            "x-amz-copy-source",
            HeaderValue::from_str(&source.header).map_err(internal)?,
        );
        let uri = self.upstream_uri(&req.uri)?;
        let resp = self.send_empty(Method::PUT, uri, headers).await?;
        self.rewrite_xml(resp, |body| etag::mark_in_xml(body).map_err(internal))
            .await
    }

    /// Whether the stored object's envelope header (its reserved metadata) is under the
    /// current version of every key of this route. Metadata that does not decode is not
    /// current (the re-encrypting copy then refuses it as the read would).
    async fn under_current_keys(&self, stored: &HeaderMap) -> S3Result<bool> {
        let Some(raw) = stored
            .get(META_ENVELOPE)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v.as_bytes()).ok())
        else {
            return Ok(false);
        };
        let Ok((header, _)) = crate::envelope::Header::decode(&raw) else {
            return Ok(false);
        };
        let current = self
            .state
            .keys
            .current_versions(&self.cfg.keys)
            .await
            .map_err(super::gateway::backend_error)?;
        Ok(self.state.keys.is_current(&header, &current))
    }

    /// UploadPartCopy: the source range, decrypted, sealed as this upload's part.
    pub(super) async fn upload_part_copy(
        &self,
        req: S3Request<Body>,
    ) -> S3Result<S3Response<Body>> {
        let source = self.copy_source(&req.headers)?;
        let range = req
            .headers
            .get("x-amz-copy-source-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let read = self
            .read_source(&req.headers, &source, range.as_deref())
            .await?;
        if !read.status.is_none_or(|s| s.is_success()) {
            return Ok(read);
        }
        let mut headers = self.context_headers(&req.headers);
        copy_length(&read.headers, &mut headers)?;
        let part = inner_request(Method::PUT, req.uri.clone(), headers, read.output);
        let written = self.upload_part(part).await.map_err(source_failed)?;
        copy_result("CopyPartResult", written)
    }

    /// CopyObject by reading the source through the gateway and writing a new object.
    async fn copy_reencrypting(
        &self,
        req: S3Request<Body>,
        source: &CopySource,
        replace: bool,
    ) -> S3Result<S3Response<Body>> {
        let read = self.read_source(&req.headers, source, None).await?;
        if !read.status.is_none_or(|s| s.is_success()) {
            return Ok(read);
        }
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        for name in [
            "x-amz-copy-source",
            "x-amz-metadata-directive",
            "x-amz-tagging-directive",
            "content-md5",
        ] {
            headers.remove(name);
        }
        remove_headers_where(&mut headers, |k| {
            k.as_str().starts_with("x-amz-copy-source-")
        });
        if !replace {
            remove_headers_where(&mut headers, is_object_metadata);
            for (k, v) in read.headers.iter().filter(|(k, _)| is_object_metadata(k)) {
                headers.append(k.clone(), v.clone());
            }
        }
        copy_length(&read.headers, &mut headers)?;
        let put = inner_request(Method::PUT, req.uri.clone(), headers, read.output);
        let written = self.put_object(put).await.map_err(source_failed)?;
        copy_result("CopyObjectResult", written)
    }

    /// GET the copy source through the gateway (decrypted under the source's key context),
    /// with the `x-amz-copy-source-if-*` conditions and an optional range. An upstream error
    /// (no such key, a failed condition) comes back as that error's response.
    async fn read_source(
        &self,
        client: &HeaderMap,
        source: &CopySource,
        range: Option<&str>,
    ) -> S3Result<S3Response<Body>> {
        let mut headers = self.context_headers(client);
        for (from, to) in [
            ("x-amz-copy-source-if-match", header::IF_MATCH),
            ("x-amz-copy-source-if-none-match", header::IF_NONE_MATCH),
            (
                "x-amz-copy-source-if-modified-since",
                header::IF_MODIFIED_SINCE,
            ),
            (
                "x-amz-copy-source-if-unmodified-since",
                header::IF_UNMODIFIED_SINCE,
            ),
        ] {
            if let Some(v) = client.get(from) {
                headers.insert(to, v.clone());
            }
        }
        if let Some(r) = range {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(r).map_err(|_| s3_error!(InvalidArgument))?,
            );
        }
        let mut path_and_query = source.path.clone();
        if let Some(q) = &source.query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        let uri = path_and_query
            .parse()
            .map_err(|_| s3_error!(InvalidArgument, "bad x-amz-copy-source"))?;
        let get = inner_request(Method::GET, uri, headers, Body::empty());
        let read = self.source_ctx(source).get_object(get, false).await?;
        if read
            .status
            .is_some_and(|s| s == StatusCode::NOT_MODIFIED || s == StatusCode::PRECONDITION_FAILED)
        {
            // A copy whose source condition fails is a 412 in S3, whichever condition it was.
            return Err(S3Error::with_message(
                S3ErrorCode::PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold",
            ));
        }
        Ok(read)
    }

    /// The request's copy source, which must be served by this same route: routes are how
    /// clients, keys and upstream credentials are scoped, and a copy reads the source with this
    /// route's.
    fn copy_source(&self, headers: &HeaderMap) -> S3Result<CopySource> {
        let source = CopySource::parse(headers)?;
        match crate::pipeline::route::select(&self.state.config.routes, &source.path) {
            Ok((route, _)) if route.name == self.route.name => Ok(source),
            _ => Err(S3Error::with_message(
                S3ErrorCode::AccessDenied,
                "the copy source is not served by this route",
            )),
        }
    }

    /// This request's context on the copy source: its bucket and key as the target.
    fn source_ctx(&self, source: &CopySource) -> Ctx<'_> {
        Ctx {
            state: self.state.clone(),
            route: self.route,
            cfg: self.cfg,
            principal: self.principal.clone(),
            grant_tokens: self.grant_tokens.clone(),
            outcome: self.outcome.clone(),
            target: Target {
                bucket: Some(source.bucket.clone()),
                key: Some(source.key.clone()),
                upstream_path: source.path.clone(),
            },
            upstream: self.upstream.clone(),
        }
    }

    fn source_uri(&self, source: &CopySource) -> S3Result<http::Uri> {
        self.source_ctx(source)
            .upstream_uri_with_query(source.query.as_deref())
    }

    /// The client headers the route's key context reads (`{header.…}`), and nothing else: the
    /// inner requests of a copy must derive the same context as the client's request.
    fn context_headers(&self, client: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (_, t) in &self.cfg.key_context {
            for s in t.sources() {
                if let Source::Header(name) = s {
                    for v in client.get_all(name) {
                        out.append(name.clone(), v.clone());
                    }
                }
            }
        }
        out
    }
}

/// A request the gateway makes of itself (the read and the write a copy becomes): already
/// authorized as the client's copy request, so it carries no credentials.
fn inner_request(
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    input: Body,
) -> S3Request<Body> {
    S3Request {
        input,
        method,
        uri,
        headers,
        extensions: http::Extensions::new(),
        credentials: None,
        region: None,
        service: None,
        trailing_headers: None,
    }
}

/// The write's body is the source read: when it fails, the source did (a stored byte that
/// failed authentication, or storage that broke off), and the write was aborted.
fn source_failed(e: S3Error) -> S3Error {
    if *e.code() == S3ErrorCode::IncompleteBody {
        S3Error::with_message(
            S3ErrorCode::InternalError,
            "the copy source could not be read and decrypted; nothing was written",
        )
    } else {
        e
    }
}

/// `Content-Length` of the write: the plaintext length of what the source read returns.
fn copy_length(read: &HeaderMap, headers: &mut HeaderMap) -> S3Result<()> {
    let len = read
        .get(header::CONTENT_LENGTH)
        .cloned()
        .ok_or_else(|| internal("copy source without a length"))?;
    headers.insert(header::CONTENT_LENGTH, len);
    Ok(())
}

/// S3's answer to a copy, from the answer to the write it became.
fn copy_result(element: &str, written: S3Response<Body>) -> S3Result<S3Response<Body>> {
    if !written.status.is_none_or(|s| s.is_success()) {
        return Ok(written);
    }
    let etag = written
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut modified = Vec::new();
    s3s::dto::Timestamp::from(std::time::SystemTime::now())
        .format(s3s::dto::TimestampFormat::DateTime, &mut modified)
        .map_err(internal)?;
    let modified = String::from_utf8(modified).map_err(internal)?;
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{element} xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LastModified>{}</LastModified><ETag>{}</ETag></{element}>",
        quick_xml::escape::escape(modified.as_str()),
        quick_xml::escape::escape(etag.as_str()),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    for (k, v) in written.headers.iter() {
        let n = k.as_str();
        if n.starts_with("x-amz-server-side-encryption") || n == "x-amz-version-id" {
            headers.insert(k.clone(), v.clone());
        }
    }
    let mut out = S3Response::new(Body::from(Bytes::from(body)));
    out.status = Some(StatusCode::OK);
    out.headers = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> S3Result<CopySource> {
        let mut h = HeaderMap::new();
        h.insert("x-amz-copy-source", HeaderValue::from_str(v).unwrap());
        CopySource::parse(&h)
    }

    #[test]
    fn copy_sources_parse_and_decode() {
        let s = parse("src-bucket/a%20b/%E2%9C%93.txt?versionId=v1").unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.key.as_str()),
            ("src-bucket", "a b/✓.txt")
        );
        assert_eq!(s.path, "/src-bucket/a%20b/%E2%9C%93.txt");
        assert_eq!(s.query.as_deref(), Some("versionId=v1"));
        assert_eq!(parse("/b/k").unwrap().path, "/b/k");
        for bad in ["", "/", "bucket", "bucket/", "/k", "b%2Fx/k"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_headers_are_told_apart() {
        for yes in [
            "x-amz-meta-owner",
            "content-type",
            "cache-control",
            "expires",
        ] {
            assert!(is_object_metadata(&HeaderName::from_static(yes)), "{yes}");
        }
        for no in [
            "x-amz-meta",
            "x-amz-acl",
            "x-amz-storage-class",
            "content-length",
        ] {
            assert!(!is_object_metadata(&HeaderName::from_static(no)), "{no}");
        }
    }
}
