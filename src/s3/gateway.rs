//! The S3 gateway: s3s authenticates, we route, encrypt and forward.
//!
//! s3s verifies each client's SigV4 (header and presigned, aws-chunked chunk signatures and
//! trailers) and decodes aws-chunked bodies. Its custom-route hook then hands us every
//! authenticated request ([`GatewayRoute::call`]); we never let s3s's own operation handlers
//! run. From there:
//!
//! - object bodies (PutObject, UploadPart) are sealed as they stream, under a data key for the
//!   key context (e.g. the bucket), with a random object id bound into the message;
//! - GetObject streams the decryption, ranges fetch whole chunks only;
//! - HeadObject, listings and ListParts report plaintext sizes by arithmetic;
//! - everything else passes through, re-signed with the proxy's upstream credentials.
//!
//! The envelope header (EDKs) and the C2SP header (salt, commitment) live in reserved
//! `x-amz-meta-ep-*` metadata; the stored body is the bare C2SP message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use s3s::auth::{S3Auth, SecretKey};
use s3s::route::S3Route;
use s3s::{Body, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

use super::sign::{UpstreamCredentials, sign_request};
use super::{checksum, etag, guard, listing, range, stored_checksum, upstream_body};
use crate::config::template::{Lookup, Source};
use crate::config::{Route, RouteKind, S3RouteConfig};
use crate::envelope::chunked;
use crate::envelope::stream::{Opener, Sealer};
use crate::envelope::{Context, Header, binding};
use crate::pipeline::{AppState, BoxError, ClientInfo, ProxyBody};
use crate::secret::read_secret;

/// Reserved metadata: the envelope header ‖ the C2SP header, base64url.
pub const META_ENVELOPE: &str = "x-amz-meta-ep-envelope";
/// Reserved metadata: the random object id bound into every message of the object.
pub const META_OBJECT_ID: &str = "x-amz-meta-ep-object";
/// Reserved metadata: `1` on objects written by a multipart upload (one message per part; the
/// envelope metadata then holds the envelope header only, each part carries its C2SP header).
pub const META_MULTIPART: &str = "x-amz-meta-ep-multipart";
const RESERVED_META_PREFIX: &str = "x-amz-meta-ep-";
pub(super) use crate::transform::s3_object::{META_FORMAT, ObjectFormat};

/// Per-request data the pipeline hands through s3s (as a request extension).
#[derive(Clone)]
pub struct RequestInfo {
    pub state: Arc<AppState>,
    pub route: usize,
    pub client: ClientInfo,
    /// Filled by the gateway for the pipeline's audit line.
    pub outcome: Arc<Mutex<S3Outcome>>,
}

/// What the gateway learnt of a request, for the audit line.
#[derive(Debug, Default)]
pub struct S3Outcome {
    pub principal: Option<String>,
    /// What allowed each key use, or the refusal (`deny:SID`, `no-allow`).
    pub basis: Vec<String>,
    /// `seal` or `open` once a key was used for it.
    pub action: Option<&'static str>,
    /// Why access was refused (`require` or policy), for the audit reason.
    pub denied: Option<String>,
}

/// One S3 route's s3s service.
pub struct Gateway {
    pub service: s3s::service::S3Service,
}

impl Gateway {
    pub fn build(cfg: &S3RouteConfig) -> Result<Gateway, String> {
        let mut secrets = HashMap::new();
        let mut identities = HashMap::new();
        for c in &cfg.clients {
            let secret = read_secret(&c.secret_access_key)?;
            secrets.insert(c.access_key_id.clone(), SecretKey::from(secret.as_str()));
            identities.insert(c.access_key_id.clone(), c.clone());
        }
        let upstream = UpstreamCredentials::new(
            read_secret(&cfg.upstream_access_key_id)?.to_string(),
            read_secret(&cfg.upstream_secret_access_key)?,
        );
        let mut builder = s3s::service::S3ServiceBuilder::new(NoOperations);
        builder.set_auth(ClientAuth { secrets });
        builder.set_host(VirtualHosts {
            suffixes: cfg.virtual_host_suffixes.clone(),
            path_style_hosts: cfg.path_style_hosts.clone(),
        });
        builder.set_route(GatewayRoute {
            identities,
            upstream: Arc::new(upstream),
            suffixes: cfg.virtual_host_suffixes.clone(),
            path_style_hosts: cfg.path_style_hosts.clone(),
        });
        Ok(Gateway {
            service: builder.build(),
        })
    }
}

/// Host-based addressing, checked before authentication: `bucket.suffix[:port]` is
/// virtual-host style, the gateway's own names are path-style, and any other Host is refused
/// ([`guard::host_bucket`]). s3s's `MultiDomain` would match the Host with its port, and pass
/// unknown names as path-style.
struct VirtualHosts {
    suffixes: Vec<String>,
    path_style_hosts: Vec<String>,
}

impl s3s::host::S3Host for VirtualHosts {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<s3s::host::VirtualHost<'a>> {
        Ok(
            match guard::host_bucket(host, &self.suffixes, &self.path_style_hosts)? {
                Some(bucket) => s3s::host::VirtualHost::new(host).with_bucket(bucket),
                None => s3s::host::VirtualHost::new(host),
            },
        )
    }
}

/// Client credentials the proxy accepts (from `[[route.s3.client]]`).
struct ClientAuth {
    secrets: HashMap<String, SecretKey>,
}

#[async_trait::async_trait]
impl S3Auth for ClientAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        self.secrets
            .get(access_key)
            .cloned()
            .ok_or_else(|| s3_error!(InvalidAccessKeyId))
    }
}

/// s3s's typed operations are never reached: every request goes to [`GatewayRoute`].
struct NoOperations;

#[async_trait::async_trait]
impl s3s::S3 for NoOperations {}

struct GatewayRoute {
    identities: HashMap<String, crate::config::S3ClientConfig>,
    upstream: Arc<UpstreamCredentials>,
    suffixes: Vec<String>,
    path_style_hosts: Vec<String>,
}

#[async_trait::async_trait]
impl S3Route for GatewayRoute {
    fn is_match(&self, _: &Method, _: &http::Uri, _: &HeaderMap, _: &mut http::Extensions) -> bool {
        true
    }

    /// Every request must be signed, except a CORS preflight (answered by the storage as S3
    /// answers it, see [`GatewayRoute::preflight`]). Anonymous requests are refused as S3
    /// refuses them on a private bucket: the gateway must know the client to choose the key
    /// and the context.
    async fn check_access(&self, req: &mut S3Request<Body>) -> S3Result<()> {
        if req.credentials.is_some() || is_cors_preflight(&req.method, &req.headers) {
            Ok(())
        } else {
            if let Some(info) = req.extensions.get::<RequestInfo>()
                && let Ok(mut o) = info.outcome.lock()
            {
                o.denied = Some("anonymous (unsigned) request".into());
            }
            Err(S3Error::with_message(
                S3ErrorCode::AccessDenied,
                "Access Denied: the encrypting gateway serves signed requests only",
            ))
        }
    }

    async fn call(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let info = req
            .extensions
            .get::<RequestInfo>()
            .cloned()
            .ok_or_else(|| s3_error!(InternalError, "request info missing"))?;
        let route = &info.state.config.routes[info.route];
        let RouteKind::S3(cfg) = &route.kind else {
            return Err(s3_error!(InternalError, "not an S3 route"));
        };
        if req.credentials.is_none() && is_cors_preflight(&req.method, &req.headers) {
            return self.preflight(&info, route, &req).await;
        }
        // 2. Identity: the client s3s verified by its access key.
        let principal = req
            .credentials
            .as_ref()
            .and_then(|c| self.identities.get(&c.access_key))
            .map(|c| Arc::new(crate::pipeline::identity::sigv4_principal(c)))
            .ok_or_else(|| s3_error!(AccessDenied))?;
        if let Ok(mut o) = info.outcome.lock() {
            o.principal = Some(principal.name.clone());
        }
        guard::check_signed_headers(&req.method, &req.uri, &req.headers)?;
        let target = self.locate(&req)?;
        check_route(&info, route, &target)?;
        let mut req = req;
        let grant_tokens = crate::pipeline::authorize::take_grant_tokens(&mut req.headers);
        let ctx = Ctx {
            state: info.state.clone(),
            route,
            cfg,
            principal,
            target,
            upstream: self.upstream.clone(),
            grant_tokens: Arc::new(grant_tokens),
            outcome: info.outcome.clone(),
        };
        // The route's `require` rules, on the bucket and headers of this request.
        let lookup = S3Lookup {
            bucket: ctx.target.bucket.as_deref(),
            principal: &ctx.principal,
            headers: &req.headers,
        };
        if let Err(e) = crate::pipeline::identity::check_requirements(
            &info.state,
            route,
            &ctx.principal,
            &lookup,
        ) {
            if let Ok(mut o) = ctx.outcome.lock() {
                o.denied = Some(e.to_string());
            }
            return Err(S3Error::with_message(
                S3ErrorCode::AccessDenied,
                e.to_string(),
            ));
        }
        if cfg.clear_metadata == crate::config::ClearMetadata::Refuse {
            guard::check_clear_metadata(
                &req.method,
                ctx.target.key.is_some(),
                req.uri.query(),
                &req.headers,
            )?;
        }
        let op = Op::classify(
            &req.method,
            &req.uri,
            &req.headers,
            ctx.target.key.is_some(),
        );
        match op {
            Op::PutObject => ctx.put_object(req).await,
            Op::GetObject => ctx.get_object(req, false).await,
            Op::HeadObject => ctx.get_object(req, true).await,
            Op::CopyObject => ctx.copy_object(req).await,
            Op::ListObjects => ctx.listing(req).await,
            Op::Multipart => ctx.multipart(req).await,
            Op::ObjectAttributes => ctx.object_attributes(req).await,
            Op::Other => ctx.passthrough(req).await,
            Op::Refused => Err(S3Error::with_message(
                S3ErrorCode::NotImplemented,
                "this object operation is not available through the encrypting gateway",
            )),
        }
    }
}

/// Routes are chosen by path; a virtual-host request's bucket is not in its path. The route
/// serving it must be the one its path-style form selects, or a Host would let a client reach
/// another route's buckets with this route's keys and credentials.
fn check_route(info: &RequestInfo, route: &Route, target: &Target) -> S3Result<()> {
    match crate::pipeline::route::select(&info.state.config.routes, &target.upstream_path) {
        Ok((r, _)) if std::ptr::eq(r, route) => Ok(()),
        _ => Err(S3Error::with_message(
            S3ErrorCode::AccessDenied,
            "this bucket is not served by the route the request reached",
        )),
    }
}

/// A CORS preflight: an `OPTIONS` naming the origin and the method to come. Browsers send it
/// without credentials (before a presigned upload, say); S3 answers it from the bucket's CORS
/// configuration, unauthenticated.
fn is_cors_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The headers of a preflight that reach storage: the CORS request headers, nothing else.
const PREFLIGHT_HEADERS: [HeaderName; 3] = [
    header::ORIGIN,
    header::ACCESS_CONTROL_REQUEST_METHOD,
    header::ACCESS_CONTROL_REQUEST_HEADERS,
];

/// Bucket and key of a request, and the raw (still percent-encoded) path to send upstream.
pub(super) struct Target {
    pub(super) bucket: Option<String>,
    pub(super) key: Option<String>,
    pub(super) upstream_path: String,
}

impl GatewayRoute {
    /// Answer a CORS preflight as the storage does: the request goes upstream unsigned with its
    /// CORS headers only (no body, no query: nothing in it reads or writes data), and the
    /// storage's answer comes back. It names no principal and uses no key.
    async fn preflight(
        &self,
        info: &RequestInfo,
        route: &Route,
        req: &S3Request<Body>,
    ) -> S3Result<S3Response<Body>> {
        let target = self.locate(req)?;
        check_route(info, route, &target)?;
        let uri = http::Uri::builder()
            .scheme(route.upstream.scheme.clone())
            .authority(route.upstream.authority.clone())
            .path_and_query(format!(
                "{}{}",
                route.upstream.base_path, target.upstream_path
            ))
            .build()
            .map_err(|_| s3_error!(InvalidURI))?;
        let mut up = http::Request::new(crate::pipeline::full_body(Bytes::new()));
        *up.method_mut() = Method::OPTIONS;
        *up.uri_mut() = uri;
        for h in PREFLIGHT_HEADERS {
            for v in req.headers.get_all(&h) {
                up.headers_mut().append(h.clone(), v.clone());
            }
        }
        let resp = info.state.upstream.send(up).await.map_err(|e| {
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, format!("upstream: {e}"))
        })?;
        Ok(Ctx::forward(resp))
    }

    fn locate(&self, req: &S3Request<Body>) -> S3Result<Target> {
        let raw_path = req.uri.path();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        let vh_bucket = guard::host_bucket(host, &self.suffixes, &self.path_style_hosts)?;
        let decode = |s: &str| {
            crate::config::pattern::percent_decode(s)
                .map(std::borrow::Cow::into_owned)
                .ok_or_else(|| s3_error!(InvalidURI))
        };
        if let Some(bucket) = vh_bucket {
            let key = raw_path.strip_prefix('/').filter(|k| !k.is_empty());
            return Ok(Target {
                bucket: Some(bucket.to_string()),
                key: key.map(decode).transpose()?,
                upstream_path: format!("/{bucket}{raw_path}"),
            });
        }
        let rest = raw_path.strip_prefix('/').unwrap_or(raw_path);
        let (bucket, key) = match rest.split_once('/') {
            Some((b, k)) => (b, Some(k).filter(|k| !k.is_empty())),
            None => (rest, None),
        };
        // Bucket names are [a-z0-9.-]: an escape here (`%2F`) would split differently in s3s
        // and upstream than here, and could turn an object PUT into a pass-through.
        if bucket.contains('%') {
            return Err(s3_error!(InvalidBucketName));
        }
        Ok(Target {
            bucket: Some(bucket)
                .filter(|b| !b.is_empty())
                .map(decode)
                .transpose()?,
            key: key.map(decode).transpose()?,
            upstream_path: raw_path.to_string(),
        })
    }
}

/// The operations the gateway treats specially; everything else passes through re-signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    PutObject,
    GetObject,
    HeadObject,
    CopyObject,
    ListObjects,
    Multipart,
    /// GetObjectAttributes: answered as HEAD is ([`super::attributes`]).
    ObjectAttributes,
    Other,
    /// An object request the gateway cannot handle without risking plaintext at rest.
    Refused,
}

/// Object subresources the gateway passes through, per method: none of them carries an object
/// body in either direction. Any other subresource on an object key is refused (fail closed):
/// S3 servers store the body of an unknown PUT as the object, in clear.
const OBJECT_SUBRESOURCES: [&str; 9] = [
    "acl",
    "tagging",
    "legal-hold",
    "retention",
    "torrent",
    "attributes",
    "restore",
    "select",
    "versioning",
];

fn subresource_allowed(method: &Method, name: &str) -> bool {
    match *method {
        Method::PUT => matches!(name, "acl" | "tagging" | "retention" | "legal-hold"),
        Method::GET | Method::HEAD => {
            matches!(
                name,
                "acl" | "tagging" | "retention" | "legal-hold" | "attributes" | "torrent"
            )
        }
        Method::DELETE => name == "tagging",
        Method::POST => name == "restore",
        _ => false,
    }
}

impl Op {
    fn classify(method: &Method, uri: &http::Uri, headers: &HeaderMap, has_key: bool) -> Op {
        let query: Vec<(String, String)> = uri
            .query()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let has = |name: &str| query.iter().any(|(k, _)| k == name);
        if has_key {
            if has("uploads") || has("uploadId") {
                return Op::Multipart;
            }
            if has("attributes") && *method == Method::GET {
                return Op::ObjectAttributes;
            }
            if let Some(sub) = OBJECT_SUBRESOURCES.iter().find(|s| has(s)) {
                return if subresource_allowed(method, sub) {
                    Op::Other
                } else {
                    Op::Refused
                };
            }
            return match *method {
                Method::PUT if headers.contains_key("x-amz-copy-source") => Op::CopyObject,
                Method::PUT => Op::PutObject,
                Method::GET => Op::GetObject,
                Method::HEAD => Op::HeadObject,
                Method::DELETE | Method::OPTIONS => Op::Other,
                // No other method on a key carries no object body: a POST or PATCH could
                // reach a store that writes what it is given. Refused, never forwarded.
                _ => Op::Refused,
            };
        }
        // POST on a bucket is DeleteObjects (`?delete`) or a browser-form upload (POST Object),
        // whose file would pass through in clear: refused.
        if *method == Method::POST && !has("delete") {
            return Op::Refused;
        }
        if *method == Method::GET {
            let listing = query.is_empty()
                || has("list-type")
                || has("versions")
                || (!has("uploads")
                    && query.iter().all(|(k, _)| {
                        [
                            "prefix",
                            "delimiter",
                            "marker",
                            "max-keys",
                            "encoding-type",
                            "continuation-token",
                            "start-after",
                            "fetch-owner",
                        ]
                        .contains(&k.as_str())
                    }));
            if listing && !has("uploads") {
                return Op::ListObjects;
            }
        }
        Op::Other
    }
}

pub(super) struct Ctx<'a> {
    pub(super) state: Arc<AppState>,
    pub(super) route: &'a Route,
    pub(super) cfg: &'a S3RouteConfig,
    pub(super) principal: Arc<crate::auth::Principal>,
    pub(super) target: Target,
    pub(super) upstream: Arc<UpstreamCredentials>,
    /// Grant tokens the client presented (`x-envelope-grant-token`), taken off its headers.
    pub(super) grant_tokens: Arc<Vec<String>>,
    pub(super) outcome: Arc<Mutex<S3Outcome>>,
}

struct S3Lookup<'a> {
    bucket: Option<&'a str>,
    principal: &'a crate::auth::Principal,
    headers: &'a HeaderMap,
}

impl Lookup for S3Lookup<'_> {
    fn lookup(&self, source: &Source) -> Option<String> {
        match source {
            Source::S3Bucket => self.bucket.map(str::to_string),
            Source::Identity | Source::Claim(_) | Source::Principal(_) => {
                self.principal.value(source)
            }
            Source::Header(name) => {
                let mut values = self.headers.get_all(name).iter();
                let first = values.next()?;
                // A repeated header is ambiguous (which one would the reader send?).
                if values.next().is_some() {
                    return None;
                }
                first.to_str().ok().map(str::to_string)
            }
            Source::Path(_) | Source::Json(_) => None,
        }
    }
}

pub(super) fn internal(e: impl std::fmt::Display) -> S3Error {
    tracing::warn!(error = %e, "S3 gateway error");
    s3_error!(InternalError)
}

/// Client headers that must never reach the upstream: authentication, and anything that
/// describes the plaintext body (checksums, aws-chunked framing) or forges our metadata.
pub(super) fn strip_request_headers(headers: &mut HeaderMap) {
    crate::pipeline::upstream::strip_hop_by_hop(headers);
    checksum::strip_checksum_headers(headers);
    for h in [
        header::AUTHORIZATION.as_str(),
        "x-amz-date",
        "x-amz-content-sha256",
        "x-amz-security-token",
        "x-amz-decoded-content-length",
        "host",
        "content-length",
        "expect",
    ] {
        headers.remove(h);
    }
    if let Some(ce) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        let kept: Vec<&str> = ce
            .split(',')
            .map(str::trim)
            .filter(|e| !e.eq_ignore_ascii_case("aws-chunked") && !e.is_empty())
            .collect();
        if kept.is_empty() {
            headers.remove(header::CONTENT_ENCODING);
        } else if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(header::CONTENT_ENCODING, v);
        }
    }
    remove_headers_where(headers, |k| k.as_str().starts_with(RESERVED_META_PREFIX));
}

/// The client's query string without its presigned-URL authentication (SigV4 `X-Amz-*` auth
/// parameters, SigV2 `AWSAccessKeyId`/`Signature`/`Expires`): the client's signature ends at
/// the proxy; forwarded, it would sit in the storage's access logs as a replayable capability.
pub(super) fn strip_auth_params(query: &str) -> String {
    const AUTH: [&str; 10] = [
        "x-amz-algorithm",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-signedheaders",
        "x-amz-signature",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "expires",
    ];
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            !AUTH.iter().any(|a| name.eq_ignore_ascii_case(a))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Remove every header whose name `matches`.
pub(super) fn remove_headers_where(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|k| matches(k)).cloned().collect();
    for k in names {
        headers.remove(k);
    }
}

/// Upstream response headers the client must not see: checksums of ciphertext, our metadata.
pub(super) fn clean_response_headers(headers: &mut HeaderMap) {
    crate::pipeline::upstream::strip_hop_by_hop(headers);
    checksum::strip_checksum_headers(headers);
    remove_headers_where(headers, |k| k.as_str().starts_with(RESERVED_META_PREFIX));
    if let Some(v) = headers.get(header::ETAG).and_then(|v| v.to_str().ok())
        && let Ok(marked) = HeaderValue::from_str(&etag::mark(v))
    {
        headers.insert(header::ETAG, marked);
    }
}

pub(super) fn unmark_conditionals(headers: &mut HeaderMap) {
    for h in [
        "if-match",
        "if-none-match",
        "x-amz-copy-source-if-match",
        "x-amz-copy-source-if-none-match",
    ] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok())
            && let Ok(u) = HeaderValue::from_str(&etag::unmark_list(v))
        {
            headers.insert(h, u);
        }
    }
}

/// Sets (or, for v1, removes) the object format marker on an upstream write.
pub(super) fn set_format_marker(headers: &mut HeaderMap, format: ObjectFormat) {
    headers.remove(META_FORMAT);
    if let Some(v) = format.marker() {
        headers.insert(
            HeaderName::from_static(META_FORMAT),
            HeaderValue::from_static(v),
        );
    }
}

pub(super) fn boxed_stream<S>(s: S) -> ProxyBody
where
    S: futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + Sync + 'static,
{
    BodyExt::boxed(StreamBody::new(s.map_ok(Frame::data)))
}

/// The plaintext size of a stored object from its stored size and ETag (multipart: `-N`).
pub(super) fn plaintext_size(stored: u64, etag_value: Option<&str>) -> Option<u64> {
    match etag_value.and_then(etag::multipart_parts) {
        Some(parts) => listing::multipart_plaintext_len(stored, parts),
        None => chunked::plaintext_len(stored),
    }
}

/// The plaintext length of an upload body and the verifier of the client's checksums.
/// aws-chunked uploads (boto3 and the aws cli over TLS) announce the plaintext length in
/// x-amz-decoded-content-length and may send no Content-Length at all.
pub(super) fn upload_prelude(headers: &HeaderMap) -> S3Result<(u64, checksum::Verifier)> {
    let plain_len: u64 = ["x-amz-decoded-content-length", "content-length"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| s3_error!(MissingContentLength))?;
    let verifier = checksum::Verifier::from_headers(headers).map_err(|e| {
        S3Error::with_message(
            e.s3_code().parse().unwrap_or(S3ErrorCode::InvalidDigest),
            e.to_string(),
        )
    })?;
    Ok((plain_len, verifier))
}

/// Upstream headers for a sealed upload (PutObject, UploadPart): the client's, minus what
/// describes the plaintext or authenticates the client, with ETag conditions unmarked.
pub(super) fn upload_headers(client: &HeaderMap) -> HeaderMap {
    let mut headers = client.clone();
    strip_request_headers(&mut headers);
    unmark_conditionals(&mut headers);
    headers
}

impl Ctx<'_> {
    /// The key context of this request, once the key policies allow `action` under it
    /// (stage 4, before any key is used): 403 AccessDenied otherwise.
    pub(super) fn authorized_context(
        &self,
        headers: &HeaderMap,
        action: crate::config::Action,
    ) -> S3Result<Context> {
        let ctx = self.key_context(headers)?;
        let tokens: Vec<&str> = self.grant_tokens.iter().map(String::as_str).collect();
        let decided = crate::pipeline::authorize::authorize(
            &self.state,
            self.route,
            &self.principal,
            &self.cfg.keys,
            action,
            &ctx,
            &tokens,
        );
        let mut o = self.outcome.lock().map_err(internal)?;
        match decided {
            Ok(bases) => {
                o.basis.extend(bases.iter().map(|b| b.to_string()));
                o.action = Some(match action {
                    crate::config::Action::Seal => "seal",
                    _ => "open",
                });
                Ok(ctx)
            }
            Err(e) => {
                if let crate::error::ProxyError::PolicyDenied(d) = &e {
                    o.basis.push(match &d.statement {
                        Some(s) => format!("deny:{s}"),
                        None => "no-allow".into(),
                    });
                }
                o.denied = Some(e.to_string());
                Err(match e {
                    // Throttling as S3 clients know it: SDKs back off and retry on SlowDown.
                    crate::error::ProxyError::QuotaExceeded(secs) => {
                        let mut err = S3Error::with_message(S3ErrorCode::SlowDown, e.to_string());
                        err.set_status_code(StatusCode::TOO_MANY_REQUESTS);
                        let mut h = HeaderMap::new();
                        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                        err.set_headers(h);
                        err
                    }
                    _ => S3Error::with_message(S3ErrorCode::AccessDenied, e.to_string()),
                })
            }
        }
    }

    pub(super) fn key_context(&self, headers: &HeaderMap) -> S3Result<Context> {
        let lookup = S3Lookup {
            bucket: self.target.bucket.as_deref(),
            principal: &self.principal,
            headers,
        };
        let mut ctx = Context::new();
        for (name, t) in &self.cfg.key_context {
            let v = t.render(&lookup).map_err(|missing| {
                S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    format!("missing {missing}, needed for the encryption context"),
                )
            })?;
            ctx.insert(name.clone(), v);
        }
        Ok(ctx)
    }

    /// The message context of this request's object (before any `ep:part`): see
    /// [`ObjectFormat::object_context`]. The bucket and key are this request's own (decoded, as
    /// sent upstream), never read from storage.
    pub(super) fn object_context(
        &self,
        format: ObjectFormat,
        key_ctx: &Context,
        object_id: &str,
    ) -> S3Result<Context> {
        let (Some(bucket), Some(key)) = (self.target.bucket.as_deref(), self.target.key.as_deref())
        else {
            return Err(internal("an object request without a bucket and key"));
        };
        Ok(format.object_context(key_ctx, object_id, bucket, key))
    }

    /// The format of a stored object from its (upstream) headers. A v1 object (not bound to its
    /// name) is refused on routes with `refuse_unbound_objects`, and otherwise served, counted
    /// and logged: storage could have copied it here from another key.
    pub(super) fn read_format(&self, headers: &HeaderMap) -> S3Result<ObjectFormat> {
        let format = ObjectFormat::of(headers).map_err(decrypt_error)?;
        if format == ObjectFormat::Unbound {
            if self.cfg.refuse_unbound_objects {
                return Err(S3Error::with_message(
                    S3ErrorCode::AccessDenied,
                    "this object was written in the legacy format that is not bound to its key, \
                     and the route refuses such objects (refuse_unbound_objects)",
                ));
            }
            tracing::warn!(
                route = %self.route.name,
                "serving a legacy (v1) object not bound to its bucket and key; \
                 copy it onto itself through the gateway to re-seal it"
            );
            self.state.metrics.unbound_read(&self.route.name);
        }
        Ok(format)
    }

    pub(super) fn upstream_uri(&self, uri: &http::Uri) -> S3Result<http::Uri> {
        self.upstream_uri_with_query(uri.query())
    }

    /// The upstream URI of this request's bucket and key with another (raw) query string.
    pub(super) fn upstream_uri_with_query(&self, query: Option<&str>) -> S3Result<http::Uri> {
        let mut pq = format!(
            "{}{}",
            self.route.upstream.base_path, self.target.upstream_path
        );
        let query = query.map(strip_auth_params);
        if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
            pq.push('?');
            pq.push_str(q);
        }
        http::Uri::builder()
            .scheme(self.route.upstream.scheme.clone())
            .authority(self.route.upstream.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| s3_error!(InvalidURI))
    }

    /// [`send`](Self::send) for requests without a body.
    pub(super) async fn send_empty(
        &self,
        method: Method,
        uri: http::Uri,
        headers: HeaderMap,
    ) -> S3Result<http::Response<hyper::body::Incoming>> {
        self.send(
            method,
            uri,
            headers,
            crate::pipeline::full_body(Bytes::new()),
        )
        .await
    }

    pub(super) async fn send(
        &self,
        method: Method,
        uri: http::Uri,
        headers: HeaderMap,
        body: ProxyBody,
    ) -> S3Result<http::Response<hyper::body::Incoming>> {
        let mut up = http::Request::new(body);
        *up.method_mut() = method;
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;
        sign_request(&mut up, &self.upstream, &self.cfg.region).map_err(internal)?;
        let (method, uri) = (up.method().clone(), up.uri().clone());
        let resp = self.state.upstream.send(up).await.map_err(|e| {
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, format!("upstream: {e}"))
        })?;
        tracing::debug!(%method, %uri, status = %resp.status(), "upstream S3 call");
        Ok(resp)
    }

    /// Forward an upstream response as it is (errors included), minus ciphertext details.
    pub(super) fn forward(resp: http::Response<hyper::body::Incoming>) -> S3Response<Body> {
        let (mut parts, body) = resp.into_parts();
        clean_response_headers(&mut parts.headers);
        let mut out = S3Response::new(Body::http_body(body.map_err(|e| Box::new(e) as BoxError)));
        out.status = Some(parts.status);
        out.headers = parts.headers;
        out
    }

    pub(super) async fn passthrough(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let mut headers = req.headers.clone();
        // The body is forwarded unchanged, so its Content-MD5 and x-amz-checksum-* headers still
        // describe it, and S3 requires one on some operations (DeleteObjects, bucket
        // lifecycle, object lock). Checksums announced as aws-chunked trailers are not kept:
        // s3s consumed the trailer, and the body goes upstream decoded.
        let trailer = headers.contains_key("x-amz-trailer");
        let kept: Vec<(HeaderName, HeaderValue)> = headers
            .iter()
            .filter(|(k, _)| {
                !trailer && checksum::is_checksum_header(k) && k.as_str() != "x-amz-trailer"
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        strip_request_headers(&mut headers);
        unmark_conditionals(&mut headers);
        for (k, v) in kept {
            headers.insert(k, v);
        }
        let uri = self.upstream_uri(&req.uri)?;
        // Only small documents of known subresources pass (never object data): read them
        // whole, bounded, and check what they are before anything goes upstream.
        let want = guard::pass_body(&req.method, self.target.key.is_some(), req.uri.query());
        let body = http_body_util::Limited::new(req.input, guard::MAX_PASSTHROUGH_BODY)
            .collect()
            .await
            .map_err(|_| {
                S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    "the request body is too large for this operation, or failed",
                )
            })?
            .to_bytes();
        guard::check_pass_body(want, &body)?;
        if !body.is_empty() || matches!(req.method, Method::PUT | Method::POST) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let resp = self
            .send(
                req.method.clone(),
                uri,
                headers,
                crate::pipeline::full_body(body),
            )
            .await?;
        Ok(Self::forward(resp))
    }

    pub(super) async fn put_object(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let (plain_len, verifier) = upload_prelude(&req.headers)?;
        let key_ctx = self.authorized_context(&req.headers, crate::config::Action::Seal)?;
        let sealing = self
            .state
            .keys
            .sealing_key(&self.cfg.keys, &key_ctx, 1, plain_len)
            .await
            .map_err(backend_error)?;
        let mut object_id = [0u8; 16];
        crate::envelope::fill_random(&mut object_id);
        let object_id = hex::encode(object_id);
        let msg_ctx = self.object_context(ObjectFormat::Bound, &key_ctx, &object_id)?;
        let env_header = sealing.header.encode().map_err(internal)?;
        let sealer = Sealer::new(sealing.data_key.expose(), &binding(&env_header, &msg_ctx));
        let mut meta = env_header.clone();
        meta.extend_from_slice(&sealer.header());

        let mut headers = upload_headers(&req.headers);
        headers.insert(
            HeaderName::from_static(META_ENVELOPE),
            HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(&meta)).map_err(internal)?,
        );
        headers.insert(
            HeaderName::from_static(META_OBJECT_ID),
            HeaderValue::from_str(&object_id).map_err(internal)?,
        );
        set_format_marker(&mut headers, ObjectFormat::Bound);
        // A checksum known before the body is kept with the object (sealed): GET and HEAD
        // with ChecksumMode return it. The upload fails if it does not match the body.
        if let Some((algorithm, value)) = verifier.announced() {
            let sealed = stored_checksum::seal(
                sealing.data_key.expose(),
                &env_header,
                &msg_ctx,
                algorithm,
                &value,
            );
            headers.insert(
                HeaderName::from_static(stored_checksum::META_CHECKSUM),
                HeaderValue::from_str(&sealed).map_err(internal)?,
            );
        }
        let uri = self.upstream_uri(&req.uri)?;
        let (resp, verified) = self
            .send_sealed(uri, headers, req, sealer, verifier, plain_len)
            .await?;
        Self::forward_upload(resp, &verified)
    }

    /// PUT the request's body upstream sealed by `sealer` (PutObject, UploadPart), with
    /// `Content-Length` set to the sealed size. The final chunk only goes out once the client's
    /// body ended with `plain_len` bytes and every checksum and trailer verified; otherwise the
    /// upstream request is aborted (nothing is committed) and the reason is returned. With the
    /// upstream answer comes what was verified, for the client's answer: S3 echoes the
    /// flexible checksum (`x-amz-checksum-*`) of what it stored.
    pub(super) async fn send_sealed(
        &self,
        uri: http::Uri,
        mut headers: HeaderMap,
        req: S3Request<Body>,
        sealer: Sealer,
        verifier: checksum::Verifier,
        plain_len: u64,
    ) -> S3Result<(http::Response<hyper::body::Incoming>, checksum::Verified)> {
        let sealed_len = chunked::ciphertext_len(plain_len);
        let failure = Arc::new(Mutex::new(None::<S3Error>));
        let verified = Arc::new(Mutex::new(None));
        let body = seal_stream(
            req.input,
            sealer,
            verifier,
            plain_len,
            req.trailing_headers,
            failure.clone(),
            verified.clone(),
        );
        let body = if self.cfg.upstream_checksum {
            // The storage checks a CRC32 of what it stores (and Object Lock buckets require it).
            upstream_body::set_headers(&mut headers, sealed_len);
            boxed_stream(upstream_body::encode(body))
        } else {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(sealed_len));
            boxed_stream(body)
        };
        let result = self.send(Method::PUT, uri, headers, body).await;
        if let Some(e) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The body was refused before its last chunk: nothing was committed upstream.
            return Err(e);
        }
        let resp = result?;
        if resp.status().is_success() {
            self.state
                .metrics
                .transformed(&self.route.name, "sealed", plain_len);
        }
        let verified = verified.lock().unwrap_or_else(|e| e.into_inner()).take();
        match verified {
            Some(v) => Ok((resp, v)),
            // Upstream answered before the sealed body ended: an error of its own (which the
            // client gets as it is); a success here would be a bug.
            None if !resp.status().is_success() => Ok((resp, checksum::Verified::default())),
            None => Err(internal("upstream accepted an upload before its end")),
        }
    }

    /// A decrypted download body, counted: plaintext bytes opened, and a stored object that
    /// fails authentication mid-stream (an integrity failure, logged by the stream).
    pub(super) fn counted_open<S>(
        &self,
        stream: S,
    ) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + Sync + 'static
    where
        S: futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + Sync + 'static,
    {
        let metrics = self.state.metrics.clone();
        let route = self.route.name.clone();
        stream.inspect(move |item| match item {
            Ok(b) => metrics.transformed(&route, "opened", b.len() as u64),
            Err(_) => metrics.decrypt_failure(&route),
        })
    }

    /// The upstream answer to a sealed upload, for the client: with the verified flexible
    /// checksum as S3 echoes it.
    pub(super) fn forward_upload(
        resp: http::Response<hyper::body::Incoming>,
        verified: &checksum::Verified,
    ) -> S3Result<S3Response<Body>> {
        let mut out = Self::forward(resp);
        if out.status.is_some_and(|s| s.is_success())
            && let Some((name, value)) = verified.response_header()
        {
            out.headers
                .insert(name, HeaderValue::from_str(&value).map_err(internal)?);
        }
        Ok(out)
    }

    pub(super) async fn get_object(
        &self,
        req: S3Request<Body>,
        head: bool,
    ) -> S3Result<S3Response<Body>> {
        // `?partNumber=N`: S3 serves one part of a multipart object. Upstream never sees it (it
        // would count stored bytes); the part's plaintext range is computed from the layout.
        let part = super::multipart::part_number_query(&req.uri)?;
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        unmark_conditionals(&mut headers);
        headers.remove(header::RANGE);
        let range_value = req
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if part.is_some() && range_value.is_some() {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                "Cannot specify both Range header and partNumber query parameter",
            ));
        }
        let requested = if head {
            None
        } else {
            range_value.as_deref().and_then(range::parse)
        };
        let base_headers = headers.clone();
        if let Some(spec) = &requested {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&range::upstream_range_header(spec)).map_err(internal)?,
            );
        }
        let uri = match part {
            Some(_) => self.upstream_uri_with_query(
                super::multipart::without_query_param(req.uri.query(), "partNumber").as_deref(),
            )?,
            None => self.upstream_uri(&req.uri)?,
        };
        // A part of an object is served from a HEAD first (the object may be multipart).
        let method = if head || part.is_some() {
            Method::HEAD
        } else {
            Method::GET
        };
        let mut resp = self
            .send_empty(method.clone(), uri.clone(), headers)
            .await?;
        if let Some(n) = part
            && !super::multipart::is_multipart(resp.headers())
        {
            // Not a multipart object: part 1 is the whole object, as in S3.
            if resp.status().is_success() && n != 1 {
                return Err(super::multipart::invalid_part_number());
            }
            if !head {
                // Read it with a GET (errors then come with their XML body).
                resp = self
                    .send_empty(Method::GET, uri.clone(), base_headers.clone())
                    .await?;
            }
        }
        let status = resp.status();
        let content_range = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(range::parse_content_range);
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            let plain = match content_range {
                Some(c) => self.plaintext_total(&uri, &base_headers, c.total).await,
                None => None,
            };
            return Err(invalid_range(plain));
        }
        if !(status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT) {
            return Ok(Self::forward(resp));
        }
        let Some(meta) = resp
            .headers()
            .get(META_ENVELOPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return self.plaintext_object(resp);
        };
        let object_id = resp
            .headers()
            .get(META_OBJECT_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let format = self.read_format(resp.headers())?;
        let etag_value = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_length: Option<u64> = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        // What the upstream sent: [fetched_start, fetched_end] of a stored object of `stored_total`.
        let (fetched_start, stored_total) = match (status, content_range) {
            (StatusCode::PARTIAL_CONTENT, Some(cr)) => {
                (cr.range.map(|r| r.0).unwrap_or(0), cr.total)
            }
            (StatusCode::OK, _) => (
                0,
                content_length.ok_or_else(|| internal("upstream sent no length"))?,
            ),
            _ => return Err(internal("upstream 206 without Content-Range")),
        };
        if super::multipart::is_multipart(resp.headers()) {
            // The whole stored object is in `resp` only for a plain full GET.
            let whole_body = !head
                && part.is_none()
                && requested.is_none()
                && status == StatusCode::OK
                && method == Method::GET;
            return self
                .get_multipart(super::multipart::MultipartGet {
                    client_headers: &req.headers,
                    uri,
                    base_headers,
                    resp,
                    whole_body,
                    meta,
                    object_id,
                    format,
                    etag: etag_value,
                    stored_total,
                    requested: requested.map(|spec| (spec, range_value.unwrap_or_default())),
                    part,
                    head,
                })
                .await;
        }
        let fetched_len = if head { 0 } else { content_length.unwrap_or(0) };
        let plain_total = chunked::plaintext_len(stored_total)
            .ok_or_else(|| decrypt_error("impossible stored size"))?;

        // The key context comes from this request; the object id from the object.
        let key_ctx = self.authorized_context(&req.headers, crate::config::Action::Open)?;
        let (raw, used, data_key) = self.open_envelope(&meta, &key_ctx).await?;
        let c2sp: [u8; chunked::HEADER_LEN] = raw[used..]
            .try_into()
            .map_err(|_| decrypt_error("bad envelope metadata length"))?;
        let msg_ctx = self.object_context(format, &key_ctx, &object_id)?;
        let bind = binding(&raw[..used], &msg_ctx);
        // The client's checksum of the whole object, when it asked for it (and one is kept).
        let whole = requested.is_none() && part.is_none();
        let checksum = match resp.headers().get(stored_checksum::META_CHECKSUM) {
            Some(v) if whole && stored_checksum::requested(&req.headers) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| {
                        stored_checksum::open(data_key.expose(), &raw[..used], &msg_ctx, v)
                    })
                    .ok_or_else(|| decrypt_error("the stored checksum does not open"))?,
            ),
            _ => None,
        };

        let (mut parts, body) = resp.into_parts();
        clean_response_headers(&mut parts.headers);
        if let Some((algorithm, value)) = checksum {
            parts.headers.insert(
                HeaderName::from_static(algorithm.header_name()),
                HeaderValue::from_str(&value).map_err(internal)?,
            );
            parts.headers.insert(
                HeaderName::from_static("x-amz-checksum-type"),
                HeaderValue::from_static("FULL_OBJECT"),
            );
        }
        parts
            .headers
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let resolved = match &requested {
            Some(spec) => Some(
                spec.resolve(plain_total, range_value.as_deref().unwrap_or(""))
                    .map_err(|_| invalid_range(Some(plain_total)))?,
            ),
            None => None,
        };
        let (opener, len, skip, stored_front, stored_len) = match resolved {
            Some(r) => {
                let plan = r.chunk_plan();
                let fetched_end = fetched_start + fetched_len.saturating_sub(1);
                let (front, back) = plan
                    .discard(fetched_start, fetched_end)
                    .ok_or_else(|| internal("upstream returned another range than asked"))?;
                let opener = Opener::range(
                    data_key.expose(),
                    &bind,
                    &c2sp,
                    plan.first_chunk,
                    plan.last_chunk,
                    plan.ends_at_final_chunk,
                );
                parts.headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&r.content_range()).map_err(internal)?,
                );
                parts.status = StatusCode::PARTIAL_CONTENT;
                (
                    opener,
                    r.len(),
                    plan.skip,
                    front,
                    fetched_len - front - back,
                )
            }
            None => {
                parts.headers.remove(header::CONTENT_RANGE);
                parts.status = StatusCode::OK;
                let header_len = chunked::HEADER_LEN as u64;
                let opener = Opener::new(data_key.expose(), &bind, &c2sp);
                (
                    opener,
                    plain_total,
                    0,
                    header_len,
                    fetched_len.saturating_sub(header_len),
                )
            }
        };
        let opener = opener.map_err(|_| decrypt_error("key commitment mismatch"))?;
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let body = if head {
            Body::empty()
        } else {
            Body::http_body(boxed_stream(self.counted_open(open_stream(
                body,
                opener,
                stored_front,
                stored_len,
                skip,
                len,
            ))))
        };
        let mut out = S3Response::new(body);
        out.status = Some(parts.status);
        out.headers = parts.headers;
        Ok(out)
    }

    /// The plaintext size of an object after an upstream 416, for `Content-Range: bytes */P`:
    /// the 416 gives the stored size but not the ETag a multipart object's size needs.
    async fn plaintext_total(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        stored_total: u64,
    ) -> Option<u64> {
        let head = self
            .send_empty(Method::HEAD, uri.clone(), headers.clone())
            .await
            .ok()
            .filter(|r| r.status().is_success());
        let etag_value = head
            .as_ref()
            .and_then(|r| r.headers().get(header::ETAG))
            .and_then(|v| v.to_str().ok());
        plaintext_size(stored_total, etag_value)
    }

    /// Decode an object's envelope metadata (base64url: envelope header, then whatever the
    /// object kind stores after it) and unwrap its data key under this request's key context.
    /// Returns the raw metadata, the header's length in it, and the data key.
    pub(super) async fn open_envelope(
        &self,
        meta: &str,
        key_ctx: &Context,
    ) -> S3Result<(Vec<u8>, usize, Arc<crate::keys::DataKey>)> {
        let raw = URL_SAFE_NO_PAD
            .decode(meta.as_bytes())
            .map_err(|_| decrypt_error("bad envelope metadata"))?;
        let (header, used) =
            Header::decode(&raw).map_err(|_| decrypt_error("bad envelope header"))?;
        let data_key = self
            .state
            .keys
            .opening_key_for(&header, key_ctx, &self.cfg.keys)
            .await
            .map_err(|e| match e {
                crate::keys::BackendError::InvalidCiphertext => {
                    decrypt_error("data key does not unwrap for this context")
                }
                other => backend_error(other),
            })?;
        Ok((raw, used, data_key))
    }

    /// An object without our metadata: written before the proxy, or around it.
    pub(super) fn plaintext_object(
        &self,
        resp: http::Response<hyper::body::Incoming>,
    ) -> S3Result<S3Response<Body>> {
        if self.cfg.dangerous_allow_plaintext_reads {
            tracing::warn!(route = %self.route.name, "serving an unencrypted object (dangerous_allow_plaintext_reads)");
            self.state.metrics.plaintext_read(&self.route.name);
            return Ok(Self::forward(resp));
        }
        Err(S3Error::with_message(
            S3ErrorCode::AccessDenied,
            "this object was not written through the encrypting gateway (no envelope metadata); \
             reading unencrypted objects requires dangerous_allow_plaintext_reads on the route",
        ))
    }

    async fn listing(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        let uri = self.upstream_uri(&req.uri)?;
        let resp = self.send_empty(Method::GET, uri, headers).await?;
        self.rewrite_xml(resp, |body| {
            listing::rewrite(body, plaintext_size)
                .map(|r| r.body)
                .map_err(internal)
        })
        .await
    }

    /// Read a (bounded) XML response, rewrite it, and answer; errors pass through as they are.
    pub(super) async fn rewrite_xml(
        &self,
        resp: http::Response<hyper::body::Incoming>,
        rewrite: impl FnOnce(&[u8]) -> S3Result<Vec<u8>>,
    ) -> S3Result<S3Response<Body>> {
        if !resp.status().is_success() {
            return Ok(Self::forward(resp));
        }
        let (mut parts, body) = resp.into_parts();
        let bytes = http_body_util::Limited::new(body, 64 << 20)
            .collect()
            .await
            .map_err(internal)?
            .to_bytes();
        if let Some(err) = super::xml_error::parse_error(&bytes) {
            // 200 with <Error> inside (CopyObject, CompleteMultipartUpload): an error.
            return Err(S3Error::with_message(
                err.code.parse().unwrap_or(S3ErrorCode::InternalError),
                err.message.clone(),
            ));
        }
        let out = rewrite(&bytes)?;
        clean_response_headers(&mut parts.headers);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        let mut r = S3Response::new(Body::from(out));
        r.status = Some(parts.status);
        r.headers = parts.headers;
        Ok(r)
    }
}

/// A key backend error as S3 answers it for SSE-KMS, with the same statuses the JSON routes
/// use (src/error.rs): an outage or rejected credentials is `503 ServiceUnavailable` with
/// `Retry-After` (SDKs retry it), access denied is `403 AccessDenied`, a disabled key is `403
/// KMS.DisabledException`, a missing key `500 KMS.NotFoundException`. An invalid wrapped key
/// is the caller's to map (it blames the stored object; see [`decrypt_error`]).
pub(super) fn backend_error(e: crate::keys::BackendError) -> S3Error {
    use crate::keys::BackendError as B;
    let custom = |code: &str, status: http::StatusCode, msg: &str| {
        let mut err =
            S3Error::with_message(S3ErrorCode::Custom(code.to_owned().into()), msg.to_owned());
        err.set_status_code(status);
        err
    };
    match &e {
        B::Unavailable(_) | B::Credentials(_) => {
            tracing::warn!(error = %e, "key backend unavailable");
            let mut err = S3Error::with_message(
                S3ErrorCode::ServiceUnavailable,
                "the key backend is unavailable; retry later",
            );
            let mut h = HeaderMap::new();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            err.set_headers(h);
            err
        }
        B::AccessDenied(_) => {
            tracing::warn!(error = %e, "key backend refused");
            S3Error::with_message(
                S3ErrorCode::AccessDenied,
                "the proxy is not allowed to use the root key",
            )
        }
        B::KeyDisabled(_) => {
            tracing::warn!(error = %e, "root key disabled");
            custom(
                "KMS.DisabledException",
                http::StatusCode::FORBIDDEN,
                "the root key is disabled",
            )
        }
        B::KeyState { state, detail, .. } => {
            tracing::warn!(error = %e, "root key state refuses use");
            custom(
                "KMS.KMSInvalidStateException",
                http::StatusCode::CONFLICT,
                &format!("the root key is {}: {detail}", state.replace('_', " ")),
            )
        }
        // S3 objects carry their wrapped keys (no records): only a bug lands here.
        B::RecordMissing(_) | B::RecordInvalid(_) => {
            tracing::error!(error = %e, "data-key record error on an S3 route");
            custom(
                "InternalError",
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            )
        }
        B::KeyNotFound(_) => {
            tracing::error!(error = %e, "root key not found");
            custom(
                "KMS.NotFoundException",
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "the root key was not found",
            )
        }
        B::InvalidCiphertext => decrypt_error("data key does not unwrap for this context"),
        B::Refused(_) | B::UnknownBackend(_) => {
            tracing::error!(error = %e, "key backend refused");
            S3Error::with_message(S3ErrorCode::InternalError, "the root key cannot be used")
        }
    }
}

pub(super) fn decrypt_error(reason: &str) -> S3Error {
    tracing::warn!(reason, "stored object did not decrypt");
    S3Error::with_message(
        S3ErrorCode::InternalError,
        "the stored object could not be decrypted for this request",
    )
}

pub(super) fn invalid_range(plain_total: Option<u64>) -> S3Error {
    let mut e = S3Error::with_message(
        S3ErrorCode::InvalidRange,
        "The requested range is not satisfiable",
    );
    if let Some(total) = plain_total
        && let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}"))
    {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, v);
        e.set_headers(h);
    }
    e
}

/// The sealed upload body. It never emits the final chunk before the client's body ended with
/// the announced length and every checksum and trailer verified: on any failure the stream
/// errors instead, the upstream request is aborted, and nothing is committed.
fn seal_stream(
    input: Body,
    sealer: Sealer,
    verifier: checksum::Verifier,
    expected: u64,
    trailers: Option<s3s::TrailingHeaders>,
    failure: Arc<Mutex<Option<S3Error>>>,
    verified: Arc<Mutex<Option<checksum::Verified>>>,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    struct State {
        input: Body,
        sealer: Option<Sealer>,
        verifier: Option<checksum::Verifier>,
        expected: u64,
        seen: u64,
        trailers: Option<s3s::TrailingHeaders>,
        failure: Arc<Mutex<Option<S3Error>>>,
        verified: Arc<Mutex<Option<checksum::Verified>>>,
        started: bool,
    }
    impl State {
        /// Record why, stop sealing, and error the stream (which aborts the upstream request).
        fn fail(mut self, e: S3Error) -> Option<(Result<Bytes, BoxError>, State)> {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            self.sealer = None;
            Some((Err("upload refused before its final chunk".into()), self))
        }
    }
    let state = State {
        input,
        sealer: Some(sealer),
        verifier: Some(verifier),
        expected,
        seen: 0,
        trailers,
        failure,
        verified,
        started: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if !st.started {
            st.started = true;
            let header = st.sealer.as_ref()?.header();
            return Some((Ok(Bytes::copy_from_slice(&header)), st));
        }
        st.sealer.as_ref()?;
        loop {
            match st.input.next().await {
                Some(Ok(bytes)) => {
                    st.seen += bytes.len() as u64;
                    if st.seen > st.expected {
                        return st
                            .fail(s3_error!(IncompleteBody, "body longer than Content-Length"));
                    }
                    if let Some(v) = st.verifier.as_mut() {
                        v.update(&bytes);
                    }
                    let mut out = Vec::new();
                    if let Some(sealer) = st.sealer.as_mut() {
                        out.reserve_exact(sealer.output_bound(bytes.len()));
                        sealer.push(&bytes, &mut out);
                    }
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), st));
                    }
                }
                Some(Err(_)) => {
                    return st.fail(S3Error::with_message(
                        S3ErrorCode::IncompleteBody,
                        "the request body failed (chunk signature or connection)",
                    ));
                }
                None => {
                    if st.seen != st.expected {
                        return st.fail(s3_error!(IncompleteBody));
                    }
                    let trailers = st.trailers.take().and_then(|t| t.take());
                    if let Some(v) = st.verifier.take() {
                        match v.finish(trailers.as_ref()) {
                            Ok(verified) => {
                                *st.verified.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(verified);
                            }
                            Err(e) => {
                                return st.fail(S3Error::with_message(
                                    e.s3_code().parse().unwrap_or(S3ErrorCode::BadDigest),
                                    e.to_string(),
                                ));
                            }
                        }
                    }
                    let sealer = st.sealer.take()?;
                    let mut out = Vec::with_capacity(sealer.output_bound(0));
                    sealer.finish(&mut out);
                    return Some((Ok(Bytes::from(out)), st));
                }
            }
        }
    })
}

/// The decrypted download body: whole chunks are authenticated before any of their bytes are
/// sent; a failure ends the stream with an error (the client sees an aborted body), never a
/// clean short or garbled response.
fn open_stream(
    body: hyper::body::Incoming,
    opener: Opener,
    stored_front: u64,
    stored_len: u64,
    skip: u64,
    len: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    struct State {
        body: http_body_util::BodyDataStream<hyper::body::Incoming>,
        opener: Option<Opener>,
        /// Stored bytes to drop before the first chunk, then stored bytes to feed.
        stored_front: u64,
        stored_left: u64,
        skip: u64,
        left: u64,
    }
    impl State {
        /// Drop the bytes before the range and after its end.
        fn trim(&mut self, mut plain: Vec<u8>) -> Option<Bytes> {
            let drop = self.skip.min(plain.len() as u64) as usize;
            self.skip -= drop as u64;
            plain.drain(..drop);
            let keep = self.left.min(plain.len() as u64) as usize;
            plain.truncate(keep);
            self.left -= keep as u64;
            (!plain.is_empty()).then(|| Bytes::from(plain))
        }
        fn abort(mut self, why: BoxError) -> Option<(Result<Bytes, BoxError>, State)> {
            tracing::warn!(error = %why, "stored object failed authentication or ended early; aborting the body");
            self.opener = None;
            Some((Err(why), self))
        }
    }
    let state = State {
        body: BodyExt::into_data_stream(body),
        opener: Some(opener),
        stored_front,
        stored_left: stored_len,
        skip,
        left: len,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            st.opener.as_ref()?;
            match st.body.next().await {
                Some(Ok(mut bytes)) => {
                    let front = st.stored_front.min(bytes.len() as u64) as usize;
                    st.stored_front -= front as u64;
                    let _ = bytes.split_to(front);
                    let take = st.stored_left.min(bytes.len() as u64) as usize;
                    bytes.truncate(take);
                    st.stored_left -= take as u64;
                    let cap = st
                        .opener
                        .as_ref()
                        .map_or(0, |o| o.output_bound(bytes.len()));
                    let mut out = Vec::with_capacity(cap);
                    if let Some(Err(e)) = st.opener.as_mut().map(|o| o.push(&bytes, &mut out)) {
                        return st.abort(Box::new(e));
                    }
                    if let Some(b) = st.trim(out) {
                        return Some((Ok(b), st));
                    }
                }
                Some(Err(e)) => return st.abort(Box::new(e)),
                None => {
                    let opener = st.opener.take()?;
                    let mut out = Vec::with_capacity(opener.output_bound(0));
                    if let Err(e) = opener.finish(&mut out) {
                        st.opener = None;
                        return st.abort(Box::new(e));
                    }
                    let last = st.trim(out);
                    if st.left > 0 {
                        return st.abort("stored object shorter than its size".into());
                    }
                    return last.map(|b| (Ok(b), st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::strip_auth_params;

    #[test]
    fn presigned_auth_parameters_never_go_upstream() {
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101&versionId=3&\
                 X-Amz-Date=20260101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&\
                 x-amz-signature=abc&X-Amz-Security-Token=t&partNumber=2";
        assert_eq!(strip_auth_params(q), "versionId=3&partNumber=2");
        assert_eq!(
            strip_auth_params("AWSAccessKeyId=A&Signature=s&Expires=1&acl"),
            "acl"
        );
        assert_eq!(
            strip_auth_params("list-type=2&prefix=a"),
            "list-type=2&prefix=a"
        );
    }
}
