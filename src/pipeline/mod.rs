//! The data path, one stage per module, in the order a request meets them:
//!
//! 1. [`route`]: check the path, pick the route (unmatched → 404, never forwarded).
//! 2. identity and context: [`crate::transform::json_fields::key_context`] from path captures
//!    and headers (the client identity joins here with the S3 gateway).
//! 3. data key: [`crate::keys::KeyService`] (cache, then backend).
//! 4. transform: [`crate::transform`] (JSON fields; S3 object bodies next).
//! 5. [`upstream`]: forward to storage.
//! 6. response transform: decrypt on the way back ([`json`]).
//!
//! [`handle`] reads top to bottom; every error becomes a response in one place
//! ([`ProxyError::to_response`]) and every request that used a key or was refused is audited.

pub mod json;
pub mod route;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::{Config, RouteKind};
use crate::error::ProxyError;
use crate::keys::KeyService;
use crate::metrics::Metrics;
pub use upstream::{ClientInfo, UpstreamClient};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Everything a request needs, shared by all connections.
pub struct AppState {
    pub config: Config,
    /// One s3s service per S3 route, by route name.
    pub gateways: std::collections::HashMap<String, crate::s3::gateway::Gateway>,
    pub keys: Arc<KeyService>,
    pub upstream: UpstreamClient,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
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
    let (parts, body) = req.into_parts();
    let finished = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = Tracked {
        inner: body,
        finished: finished.clone(),
    };
    let mut resp = handle_request(state, Request::from_parts(parts, body), client).await;
    if empty_expect || !finished.load(Ordering::Relaxed) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A request body that records when it has been read to its end.
struct Tracked<B> {
    inner: B,
    finished: Arc<AtomicBool>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.finished.store(true, Ordering::Relaxed);
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
            let resp = e.to_response();
            finish(&state, "-", &resp, started);
            state
                .audit
                .record(AuditEvent {
                    action: "reject",
                    outcome: "error",
                    route: "-".into(),
                    method,
                    path,
                    status: resp.status().as_u16(),
                    client: client.addr.ip().to_string(),
                    keys: vec![],
                    values: 0,
                    reason: Some(e.code().to_string()),
                })
                .await;
            return resp;
        }
    };

    match &route.kind {
        // S3: s3s authenticates the client, then the gateway encrypts and forwards.
        RouteKind::S3(s3) => {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let resp = s3_gateway(&state, route, req, client.clone()).await;
            finish(&state, &route.name, &resp, started);
            let status = resp.status();
            state
                .audit
                .record(AuditEvent {
                    action: match method.as_str() {
                        "PUT" | "POST" => "seal",
                        "GET" | "HEAD" => "open",
                        _ => "pass",
                    },
                    outcome: if status.is_client_error() || status.is_server_error() {
                        "error"
                    } else {
                        "ok"
                    },
                    route: route.name.clone(),
                    method,
                    path,
                    status: status.as_u16(),
                    client: client.addr.ip().to_string(),
                    keys: s3.keys.iter().map(|k| k.to_string()).collect(),
                    values: 0,
                    reason: None,
                })
                .await;
            resp
        }
        // Explicit pass-through: stream both ways, nothing read or changed.
        RouteKind::Passthrough => {
            let (parts, body) = req.into_parts();
            let body = body.map_err(Into::into).boxed();
            let result = match upstream::request(&route.upstream, &parts, body, client, None) {
                Ok(up) => state.upstream.send(up).await.map(|resp| {
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
            let resp = result.unwrap_or_else(|e| e.to_response());
            finish(&state, &route.name, &resp, started);
            resp
        }
        // 2–6. Context, data key, transform, upstream, response transform.
        RouteKind::JsonFields(jr) => {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let mut outcome = json::Outcome::default();
            let result = json::handle(
                &state,
                route,
                jr,
                captures,
                req,
                client.clone(),
                &mut outcome,
            )
            .await;
            let (resp, error) = match result {
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
            finish(&state, &route.name, &resp, started);
            state
                .audit
                .record(AuditEvent {
                    action: if outcome.sealed > 0 {
                        "seal"
                    } else if outcome.opened > 0 || error.is_none() {
                        "open"
                    } else {
                        "reject"
                    },
                    outcome: match (&error, outcome.redacted) {
                        (Some(_), _) => "error",
                        (None, 0) => "ok",
                        (None, _) => "redacted",
                    },
                    route: route.name.clone(),
                    method,
                    path,
                    status: resp.status().as_u16(),
                    client: client.addr.ip().to_string(),
                    keys: jr.keys.iter().map(|k| k.to_string()).collect(),
                    values: outcome.sealed + outcome.opened,
                    reason: error.map(|e| match e {
                        ProxyError::DecryptFailed(f, place) => {
                            format!("decrypt_failed: {f} ({place})")
                        }
                        other => other.code().to_string(),
                    }),
                })
                .await;
            resp
        }
    }
}

async fn s3_gateway<B>(
    state: &Arc<AppState>,
    route: &crate::config::Route,
    req: Request<B>,
    client: ClientInfo,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let Some(gateway) = state.gateways.get(&route.name) else {
        return ProxyError::Internal("no gateway for route".into()).to_response();
    };
    let index = state
        .config
        .routes
        .iter()
        .position(|r| r.name == route.name)
        .unwrap_or(0);
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(crate::s3::gateway::RequestInfo {
        state: state.clone(),
        route: index,
        client,
    });
    let body = s3s::Body::http_body(body.map_err(|e| -> BoxError { e.into() }));
    match gateway.service.call(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(|b| b.map_err(|e| -> BoxError { e }).boxed()),
        Err(e) => {
            tracing::error!(error = ?e, "S3 gateway failed");
            let mut r = Response::new(full_body(Bytes::from_static(
                b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code><Message>internal error</Message></Error>",
            )));
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    }
}

fn finish(state: &AppState, route: &str, resp: &Response<ProxyBody>, started: Instant) {
    state.metrics.request(
        route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
}
