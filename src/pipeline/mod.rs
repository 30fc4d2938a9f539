//! The data path, one stage per module, in the order a request meets them, for both kinds of
//! route:
//!
//! 1. [`route`]: check the path, pick the route (unmatched → 404, never forwarded).
//! 2. [`identity`]: who is calling: the route's authenticator (`crate::auth`: mTLS, JWT, a
//!    trusted proxy's header, none; S3: the SigV4 access key s3s verified) → a `Principal`
//!    (401 without one); then the route's `require` rules (403).
//! 3. context: the key context from path captures, headers, the bucket and the principal
//!    ([`crate::transform::json_fields::key_context`]; S3: the gateway's `key_context`).
//! 4. [`authorize`]: the key policies and grants (`crate::policy`) allow this use of the
//!    route's keys under this context, and the principal's [`quota`] has room (403 / 429),
//!    before any key is used. Reads are shown plain, masked or withheld.
//! 5. data key: [`crate::keys::KeyService`] (cache, then backend).
//! 6. transform: [`crate::transform`] (JSON fields; S3 object bodies in `crate::s3` with
//!    `crate::transform::s3_object`).
//! 7. [`upstream`]: forward to storage, then the response transform on the way back
//!    ([`json`]; [`s3`]).
//!
//! [`handle`] reads top to bottom; every error becomes a response in one place
//! ([`ProxyError::to_response`]; S3 errors as S3 XML) and every request that used a key or was
//! refused is audited with its principal and what allowed or refused it.

pub mod access;
pub mod authorize;
pub mod identity;
pub mod json;
pub mod quota;
pub mod route;
pub mod s3;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{Config, RouteKind};
use crate::error::ProxyError;
use crate::keys::KeyService;
use crate::metrics::Metrics;
pub use upstream::{ClientInfo, UpstreamClient};

pub use crate::body::{BoxError, ProxyBody, full_body};

/// Everything a request needs, shared by all connections.
pub struct AppState {
    pub config: Config,
    /// One s3s service per S3 route, by route name.
    pub gateways: std::collections::HashMap<String, crate::s3::gateway::Gateway>,
    pub keys: Arc<KeyService>,
    pub upstream: UpstreamClient,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<crate::policy::Policies>,
    pub authenticators: crate::auth::Authenticators,
    /// The key of `hash` masks (`[masking] hash_key_file`).
    pub mask_key: Option<crate::transform::mask::MaskKey>,
    pub quotas: quota::Quotas,
}

pub async fn handle<B>(
    state: Arc<AppState>,
    req: Request<B>,
    client: ClientInfo,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    // botocore sends `Expect: 100-continue` even with an empty body. hyper sends no interim
    // `100 Continue` when there is no body to read; botocore then takes the final response on
    // its "server refused the body" path, which leaves its connection unusable: the next
    // request's response is missed and it waits out its read timeout (60 s). Closing the
    // connection after such a request makes the client's next request start clean.
    let empty_expect = req
        .headers()
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    // A request answered before its body was read to the end (an early refusal) leaves the
    // connection in an unknown state: the client may still send the rest (after a timeout, if
    // it waited for `100 Continue`), which would be read as the next request. Closing it after
    // this response (with the lingering close of `server`) keeps every client's next request
    // on a clean connection.
    let (mut parts, body) = req.into_parts();
    let ids = access::ids(&mut parts.headers);
    state.metrics.in_flight(1);
    let pending = access::Pending {
        state: state.clone(),
        ids,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        client: client.clone(),
        started: Instant::now(),
        request: Arc::new(access::Progress::default()),
        admin: false,
    };
    pending
        .request
        .finished
        .store(body.is_end_stream(), Ordering::Relaxed);
    let body = Tracked {
        inner: body,
        progress: pending.request.clone(),
    };
    // The trace span of the request (`crate::telemetry`; a disabled no-op without an
    // exporter): a child of the caller's span when it sent a valid `traceparent`.
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "request",
        http.request.method = %parts.method,
        route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        request_id = pending.ids.request_id(),
    );
    crate::telemetry::set_parent(&span, &parts.headers);
    let mut note = access::AccessNote::default();
    let mut resp = tracing::Instrument::instrument(
        handle_request(
            state.clone(),
            Request::from_parts(parts, body),
            client,
            &mut note,
        ),
        span.clone(),
    )
    .await;
    if !span.is_disabled() {
        span.record("http.response.status_code", resp.status().as_u16());
        if let Some(r) = note.route.and_then(|i| pending.state.config.routes.get(i)) {
            span.record("route", r.name.as_str());
        }
    }
    if empty_expect || !pending.request.finished.load(Ordering::Relaxed) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    access::Logged::wrap(resp, pending, note)
}

/// A request body that records when it has been read to its end, and how many bytes it had.
struct Tracked<B> {
    inner: B,
    progress: Arc<access::Progress>,
}

impl<B: Body + Unpin> Body for Tracked<B>
where
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            self.progress
                .bytes
                .fetch_add(bytes::Buf::remaining(d) as u64, Ordering::Relaxed);
        }
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.progress.finished.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn handle_request<B>(
    state: Arc<AppState>,
    req: Request<B>,
    client: ClientInfo,
    note: &mut access::AccessNote,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    // 1. Route match.
    let (route, captures) = match route::select(&state.config.routes, req.uri().path()) {
        Ok(found) => found,
        Err(e) => {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let mut resp = e.to_response();
            finish(&state, None, &mut resp, started, note);
            state
                .audit
                .record(AuditEvent {
                    action: "reject",
                    outcome: "error",
                    route: "-".into(),
                    method,
                    path,
                    status: resp.status().as_u16(),
                    client: client.label(),
                    reason: Some(e.code().to_string()),
                    ..Default::default()
                })
                .await;
            return resp;
        }
    };

    match &route.kind {
        // S3: s3s verifies the client's signature, then the same stages run inside the
        // gateway (see `s3`).
        RouteKind::S3(s3) => {
            // Boxed, as the JSON path below: their state machines are large, and unboxed they
            // would make every request's future (moved into place by hyper) as large.
            let mut resp = Box::pin(s3::handle(&state, route, s3, req, client.clone(), note)).await;
            finish(&state, Some(route), &mut resp, started, note);
            resp
        }
        // Explicit pass-through: stream both ways, nothing read or changed.
        RouteKind::Passthrough => {
            // Kept as they are (no copies) until an audit event needs them as text.
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let (mut parts, body) = req.into_parts();
            let principal = match identity::identify(&state, route, &parts.headers, &client)
                .await
                .and_then(|p| {
                    let meta = crate::transform::json_fields::RequestMeta {
                        captures: &captures,
                        headers: &parts.headers,
                        given: None,
                        principal: Some(&p),
                    };
                    identity::check_requirements(&state, route, &p, &meta).map(|()| p)
                }) {
                Ok(p) => p,
                Err(e) => {
                    let mut resp = e.to_response();
                    finish(&state, Some(route), &mut resp, started, note);
                    state
                        .audit
                        .record(AuditEvent {
                            action: "reject",
                            outcome: "error",
                            route: route.name.clone(),
                            method: method.to_string(),
                            path: uri.path().to_string(),
                            status: resp.status().as_u16(),
                            client: client.label(),
                            reason: Some(audit_reason(&e)),
                            ..Default::default()
                        })
                        .await;
                    return resp;
                }
            };
            note.principal = Some(principal.name.clone());
            drop(principal);
            // Credentials for the proxy never reach storage, on pass-through routes too.
            identity::strip_credentials(&state, route, &mut parts.headers);
            authorize::take_grant_tokens(&mut parts.headers);
            let body = body.map_err(Into::into).boxed();
            let result = match upstream::request(&route.upstream, &parts, body, client, None) {
                Ok(up) => tracing::Instrument::instrument(
                    state.upstream.send(up),
                    tracing::info_span!(target: crate::telemetry::TARGET, "upstream"),
                )
                .await
                .map(|resp| {
                    let (mut rparts, rbody) = resp.into_parts();
                    upstream::strip_hop_by_hop(&mut rparts.headers);
                    // The upstream's own address never reaches the client; redirects elsewhere
                    // (a login page) are the store's business on a pass-through route.
                    upstream::rewrite_locations(
                        &mut rparts.headers,
                        &route.upstream,
                        upstream::ForeignUrls::Keep,
                        |path| route::serves(&state.config.routes, &route.name, path),
                    );
                    Response::from_parts(rparts, rbody.map_err(Into::into).boxed())
                }),
                Err(e) => Err(e),
            };
            let mut resp = result.unwrap_or_else(|e| e.to_response());
            finish(&state, Some(route), &mut resp, started, note);
            resp
        }
        // 2–6. Context, data key, transform, upstream, response transform.
        RouteKind::JsonFields(jr) => {
            // Kept as they are (no copies) until an audit event needs them as text.
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let mut outcome = json::Outcome::default();
            let mut who = None;
            let result = match identity::identify(&state, route, req.headers(), &client).await {
                Ok(principal) => {
                    who = Some(principal.name.clone());
                    Box::pin(json::handle(
                        &state,
                        route,
                        jr,
                        captures,
                        req,
                        client.clone(),
                        &principal,
                        &mut outcome,
                    ))
                    .await
                }
                Err(e) => Err(e),
            };
            let (mut resp, error) = match result {
                Ok(resp) => (resp, None),
                Err(e) => {
                    if let ProxyError::DecryptFailed(f, place) = &e {
                        state.metrics.decrypt_failure(&route.name);
                        tracing::warn!(route = %route.name, reason = %f, at = %place, "decryption failed");
                    } else if e.status().is_server_error() {
                        tracing::warn!(route = %route.name, error = %e, "request failed");
                    }
                    (e.to_response(), Some(e))
                }
            };
            state
                .metrics
                .fields(&route.name, outcome.sealed, outcome.opened);
            note.principal.clone_from(&who);
            finish(&state, Some(route), &mut resp, started, note);
            state
                .audit
                .record_with(|| AuditEvent {
                    action: if outcome.sealed > 0 {
                        "seal"
                    } else if outcome.opened > 0 || error.is_none() {
                        "open"
                    } else {
                        "reject"
                    },
                    outcome: match (&error, outcome.redacted, outcome.masked, outcome.withheld) {
                        (Some(e), ..) if is_denial(e) => "denied",
                        (Some(_), ..) => "error",
                        (None, 0, 0, 0) => "ok",
                        (None, r, ..) if r > 0 => "redacted",
                        (None, _, m, _) if m > 0 => "masked",
                        (None, ..) => "withheld",
                    },
                    principal: who,
                    basis: match &error {
                        Some(ProxyError::PolicyDenied(d)) => vec![match &d.statement {
                            Some(s) => format!("deny:{s}"),
                            None => "no-allow".into(),
                        }],
                        _ => outcome.basis.iter().map(|b| b.to_string()).collect(),
                    },
                    route: route.name.clone(),
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    status: resp.status().as_u16(),
                    client: client.label(),
                    keys: jr.keys.iter().map(|k| k.to_string()).collect(),
                    key_versions: outcome.key_versions.iter().map(|v| v.to_string()).collect(),
                    values: outcome.sealed + outcome.opened,
                    reason: error.as_ref().map(audit_reason),
                    grant: None,
                })
                .await;
            resp
        }
    }
}

/// A refusal by authentication, `require`, a key policy or a quota.
pub(crate) fn is_denial(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::Unauthenticated(..)
            | ProxyError::Forbidden(_)
            | ProxyError::PolicyDenied(_)
            | ProxyError::QuotaExceeded(_)
    )
}

/// The audit line's `reason`: the error code, with the detail the client is not told.
pub(crate) fn audit_reason(e: &ProxyError) -> String {
    match e {
        ProxyError::DecryptFailed(f, place) => format!("decrypt_failed: {f} ({place})"),
        ProxyError::Unauthenticated(a, _) => format!("{}: {a}", e.code()),
        ProxyError::Forbidden(m) => format!("{}: {m}", e.code()),
        ProxyError::PolicyDenied(d) => format!("{}: {d}", e.code()),
        other => other.code().to_string(),
    }
}

/// Count the request in the metrics, and note its route for the access line.
fn finish(
    state: &AppState,
    route: Option<&crate::config::Route>,
    resp: &mut Response<ProxyBody>,
    started: Instant,
    note: &mut access::AccessNote,
) {
    note.route = route.and_then(|r| state.config.routes.iter().position(|c| std::ptr::eq(c, r)));
    state.metrics.request(
        route.map_or("-", |r| r.name.as_str()),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
}
