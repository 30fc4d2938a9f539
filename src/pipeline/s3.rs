//! An S3 route through the pipeline's stages. s3s checks the request's SigV4 signature (it
//! must see the raw request, so it runs first), then calls the gateway, which runs the same
//! stages as a JSON route, from this module's functions:
//!
//! 2. identity: the verified access key → [`super::identity::sigv4_principal`], then the
//!    route's `require` rules ([`super::identity::check_requirements`]);
//! 3. context: the route's key context from the bucket, headers and principal;
//! 4. policy and quota: [`super::authorize::authorize`] before any key is used (seal for
//!    PutObject, UploadPart and a copy's destination; open for GetObject, HeadObject and a
//!    copy's source);
//! 5. data key, transform, upstream: `crate::s3` (the S3 protocol) with
//!    `crate::transform::s3_object` (the object format);
//!
//! and the request is audited here, with what the gateway recorded in [`S3Outcome`].

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::{AppState, BoxError, ClientInfo, ProxyBody, full_body};
use crate::audit::AuditEvent;
use crate::config::{Route, S3RouteConfig};
use crate::error::ProxyError;
pub use crate::s3::gateway::S3Outcome;

pub async fn handle<B>(
    state: &Arc<AppState>,
    route: &Route,
    s3: &S3RouteConfig,
    req: Request<B>,
    client: ClientInfo,
    note: &mut super::access::AccessNote,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let outcome = Arc::new(Mutex::new(S3Outcome::default()));
    let client_ip = client.label();
    let resp = gateway(state, route, req, client, &outcome).await;
    let status = resp.status();
    let o = std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()));
    note.principal.clone_from(&o.principal);
    state
        .audit
        .record(AuditEvent {
            action: match (o.action, o.denied.is_some()) {
                (_, true) => "reject",
                (Some(a), false) => a,
                (None, false) => "pass",
            },
            outcome: if o.denied.is_some() {
                "denied"
            } else if status.is_client_error() || status.is_server_error() {
                "error"
            } else {
                "ok"
            },
            principal: o.principal,
            basis: o.basis,
            route: route.name.clone(),
            method,
            path,
            status: status.as_u16(),
            client: client_ip,
            keys: s3.keys.iter().map(|k| k.to_string()).collect(),
            key_versions: Vec::new(),
            values: 0,
            reason: o.denied.map(|d| format!("access_denied: {d}")),
            grant: None,
        })
        .await;
    resp
}

/// Hand the request to the route's s3s service (signature check, then the gateway).
async fn gateway<B>(
    state: &Arc<AppState>,
    route: &crate::config::Route,
    req: Request<B>,
    client: ClientInfo,
    outcome: &Arc<std::sync::Mutex<crate::s3::gateway::S3Outcome>>,
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
    if let crate::config::RouteKind::S3(cfg) = &route.kind
        && let Some(e) = crate::s3::preauth::prepare(&mut parts, cfg)
    {
        let mut r = Response::new(full_body(Bytes::from(e.to_xml())));
        *r.status_mut() = e.status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/xml"),
        );
        return r;
    }
    parts.extensions.insert(crate::s3::gateway::RequestInfo {
        state: state.clone(),
        route: index,
        client,
        outcome: outcome.clone(),
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
