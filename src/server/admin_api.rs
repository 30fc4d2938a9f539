//! The admin API under `/v1/` on the admin listener: root keys and grants.
//!
//! ```text
//! GET    /v1/keys                         list (the keys the caller may `list`)
//! GET    /v1/keys/{key}                   describe
//! POST   /v1/keys            {"name"}     create (local keyring)
//! POST   /v1/keys/{key}/rotate|enable|disable
//! POST   /v1/grants          {key, grantee, operations, constraints, retiring_principal,
//!                             expires_in_secs}  → {grant_id, grant_token, grant}
//! GET    /v1/grants?key=K[&grantee=P]     list-grants (without key: the caller's own grants)
//! POST   /v1/grants/{id}/retire           the grantee or the retiring principal
//! DELETE /v1/grants/{id}                  revoke-grant
//! POST   /v1/routes/{route}/shred  {"context", "days"}  schedule shredding of a key context's
//!                                  data-key records (format v2), as `keys shred`
//! POST   /v1/routes/{route}/shred/cancel  {"context"}   cancel it
//! ```
//!
//! Every call needs an authenticated principal (`[admin] auth`), is authorized by the key
//! policies ([`Policies::decide`] with the key-management action, as KMS key policies govern
//! its management calls; a key without a policy is open to every authenticated caller) and is
//! audited with the principal, the outcome and the grant id. Errors are JSON
//! `{"error": {"code", "message"}}`; 401 when the caller is not authenticated, 403 when the
//! policy does not allow the action. Grant tokens appear in the create response only, never in
//! logs or audit lines.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit::AuditEvent;
use crate::auth::{AuthError, Authenticators, Peer, Principal};
use crate::body::json_response;
use crate::config::{Action, RouteAuth};
use crate::envelope::Context;
use crate::keys::keyring::{Keyring, KeyringError};
use crate::keys::{BackendError, KeyRef};
use crate::pipeline::{AppState, ProxyBody};
use crate::policy::grants::{Constraints, Grant, GrantError, NewGrant};
use crate::policy::{Decision, Policies};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;
/// Longest grant lifetime accepted (10 years).
const MAX_EXPIRES_IN: u64 = 10 * 365 * 86_400;

/// What the admin API needs beside the proxy's state.
pub struct AdminApi {
    /// The proxy's state, swapped on reload.
    pub live: Arc<super::reload::Live>,
    /// The local keyring (keys are created, rotated, enabled and disabled there).
    pub keyring: Arc<Keyring>,
    /// `[admin] auth`.
    pub auth: RouteAuth,
}

impl AdminApi {
    /// The state now (each call: the current one).
    fn state(&self) -> Arc<AppState> {
        self.live.load()
    }

    fn policies(&self) -> Arc<Policies> {
        self.state().policies.clone()
    }
}

/// An API refusal: status, stable code, message for the caller.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> ApiError {
        match e {
            GrantError::Invalid(m) => ApiError::bad_request(m),
            GrantError::NotFound(_) => ApiError::not_found(e.to_string()),
            GrantError::NotAllowed(m) => ApiError::new(StatusCode::FORBIDDEN, "access_denied", m),
            GrantError::Disabled => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "grants_disabled",
                e.to_string(),
            ),
            GrantError::Storage(m) => {
                tracing::error!(error = %m, "grants file");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the grants file could not be read or written",
                )
            }
        }
    }
}

impl From<KeyringError> for ApiError {
    fn from(e: KeyringError) -> ApiError {
        match e {
            KeyringError::NotFound(_) => ApiError::not_found(e.to_string()),
            KeyringError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            KeyringError::Invalid(m) => ApiError::bad_request(m),
            other => {
                tracing::error!(error = %other, "keyring");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the keyring could not be read or written",
                )
            }
        }
    }
}

fn backend_error(e: BackendError) -> ApiError {
    match e {
        BackendError::KeyNotFound(_) | BackendError::UnknownBackend(_) => {
            ApiError::not_found(e.to_string())
        }
        e if e.retryable() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "key_backend_unavailable",
            "the key backend is unavailable; retry later",
        ),
        e => ApiError::new(StatusCode::BAD_GATEWAY, "key_backend", e.to_string()),
    }
}

fn error_response(e: &ApiError) -> Response<ProxyBody> {
    json_response(
        e.status,
        &json!({ "error": { "code": e.code, "message": e.message } }),
    )
}

/// What one call did, for its audit line.
struct Audit {
    op: &'static str,
    key: Option<KeyRef>,
    grant: Option<String>,
}

/// Authenticate the caller of an admin API request (`/v1/...`), then answer it. Credentials
/// that are missing or refused get 401 (with the authenticator's challenge), an authenticator
/// that cannot check them now 503; both are audited.
pub async fn serve(
    api: &AdminApi,
    req: Request<hyper::body::Incoming>,
    peer: Peer,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let principal = match authenticate(api, &parts.headers, &peer).await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let (status, code) = match e {
                AuthError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable"),
                _ => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            };
            tracing::info!(reason = %e, "admin API caller not authenticated");
            let err = ApiError::new(
                status,
                code,
                match status {
                    StatusCode::UNAUTHORIZED => {
                        format!("authenticate with {} to use the admin API", api.auth.name())
                    }
                    _ => "credentials cannot be checked now; retry later".to_string(),
                },
            );
            let mut resp = error_response(&err);
            if status == StatusCode::UNAUTHORIZED
                && let Some(c) = Authenticators::challenge(api.auth, &e)
                && let Ok(v) = HeaderValue::from_str(&c)
            {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
            audit(
                api,
                None,
                &parts.method,
                parts.uri.path(),
                peer.addr,
                &Audit {
                    op: "admin:authenticate",
                    key: None,
                    grant: None,
                },
                status,
                Some(e.kind().to_string()),
            )
            .await;
            return resp;
        }
    };
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(&ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("admin API requests are at most {MAX_BODY} bytes"),
            ));
        }
    };
    handle_admin_api(api, &principal, Request::from_parts(parts, body), peer.addr).await
}

/// The principal of an admin API caller. A request without any credential of the configured
/// kind is refused here (`Missing`), before the authenticator is asked.
async fn authenticate(
    api: &AdminApi,
    headers: &http::HeaderMap,
    peer: &Peer,
) -> Result<Principal, AuthError> {
    match api.auth {
        RouteAuth::Jwt
            if !headers
                .get(http::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes().starts_with(b"Bearer ")) =>
        {
            return Err(AuthError::Missing("bearer token"));
        }
        RouteAuth::Mtls if peer.certs.as_ref().is_none_or(|c| c.is_empty()) => {
            return Err(AuthError::Missing("client certificate"));
        }
        _ => {}
    }
    api.state()
        .authenticators
        .authenticate(api.auth, headers, peer)
        .await
}

/// Answer one admin API request of an authenticated `principal`: authorize it by the key
/// policies, do it, audit it.
pub async fn handle_admin_api(
    api: &AdminApi,
    principal: &Arc<Principal>,
    req: Request<Bytes>,
    client: SocketAddr,
) -> Response<ProxyBody> {
    let mut audit_info = Audit {
        op: "admin:unknown",
        key: None,
        grant: None,
    };
    let result = dispatch(api, principal, &req, &mut audit_info).await;
    let (resp, reason) = match result {
        Ok((status, body)) => (json_response(status, &body), None),
        Err(e) => (error_response(&e), Some(e.code.to_string())),
    };
    audit(
        api,
        Some(principal),
        req.method(),
        req.uri().path(),
        client,
        &audit_info,
        resp.status(),
        reason,
    )
    .await;
    resp
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    api: &AdminApi,
    principal: Option<&Arc<Principal>>,
    method: &Method,
    path: &str,
    client: SocketAddr,
    info: &Audit,
    status: StatusCode,
    reason: Option<String>,
) {
    api.state()
        .audit
        .record(AuditEvent {
            action: info.op,
            outcome: match status.as_u16() {
                200..=299 => "ok",
                401 | 403 => "denied",
                _ => "error",
            },
            route: "admin".into(),
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            client: client.ip().to_string(),
            keys: info.key.iter().map(|k| k.to_string()).collect(),
            values: 0,
            reason,
            principal: principal.map(|p| p.name.clone()),
            grant: info.grant.clone(),
            ..Default::default()
        })
        .await;
}

type Answer = Result<(StatusCode, Value), ApiError>;

async fn dispatch(
    api: &AdminApi,
    principal: &Arc<Principal>,
    req: &Request<Bytes>,
    audit: &mut Audit,
) -> Answer {
    let path = req.uri().path();
    let rest = path.strip_prefix("/v1/").unwrap_or("");
    let method = req.method();
    if let Some(keys) = rest.strip_prefix("keys") {
        let keys = keys.strip_prefix('/').unwrap_or(keys);
        return match (method, keys) {
            (&Method::GET, "") => {
                audit.op = "admin:list";
                list_keys(api, principal)
            }
            (&Method::POST, "") => {
                audit.op = "admin:create";
                create_key(api, principal, req.body(), audit).await
            }
            (&Method::POST, k) if k.ends_with("/rotate") => {
                audit.op = "admin:rotate";
                change_key(api, principal, k, "/rotate", Action::Rotate, audit).await
            }
            (&Method::POST, k) if k.ends_with("/enable") => {
                audit.op = "admin:enable";
                change_key(api, principal, k, "/enable", Action::Enable, audit).await
            }
            (&Method::POST, k) if k.ends_with("/disable") => {
                audit.op = "admin:disable";
                change_key(api, principal, k, "/disable", Action::Disable, audit).await
            }
            (&Method::POST, k) if k.ends_with("/schedule-deletion") => {
                audit.op = "admin:schedule-deletion";
                schedule_deletion(api, principal, k, req.body(), audit).await
            }
            (&Method::POST, k) if k.ends_with("/cancel-deletion") => {
                audit.op = "admin:cancel-deletion";
                change_key(
                    api,
                    principal,
                    k,
                    "/cancel-deletion",
                    Action::CancelDeletion,
                    audit,
                )
                .await
            }
            (&Method::GET, k) => {
                audit.op = "admin:describe";
                describe_key(api, principal, k, audit).await
            }
            _ => Err(not_an_operation()),
        };
    }
    if let Some(route) = rest.strip_prefix("routes/") {
        return match (method, route) {
            (&Method::POST, r) if r.ends_with("/shred/cancel") => {
                audit.op = "admin:cancel-shred";
                shred(
                    api,
                    principal,
                    r.trim_end_matches("/shred/cancel"),
                    req.body(),
                    true,
                    audit,
                )
                .await
            }
            (&Method::POST, r) if r.ends_with("/shred") => {
                audit.op = "admin:shred";
                shred(
                    api,
                    principal,
                    r.trim_end_matches("/shred"),
                    req.body(),
                    false,
                    audit,
                )
                .await
            }
            _ => Err(not_an_operation()),
        };
    }
    if let Some(grants) = rest.strip_prefix("grants") {
        let grants = grants.strip_prefix('/').unwrap_or(grants);
        return match (method, grants) {
            (&Method::POST, "") => {
                audit.op = "admin:create-grant";
                create_grant(api, principal, req.body(), audit).await
            }
            (&Method::GET, "") => {
                audit.op = "admin:list-grants";
                list_grants(api, principal, req.uri().query(), audit).await
            }
            (&Method::POST, g) if g.ends_with("/retire") => {
                audit.op = "admin:retire-grant";
                let id = g.trim_end_matches("/retire");
                retire_grant(api, principal, id, audit).await
            }
            (&Method::DELETE, id) if !id.is_empty() && !id.contains('/') => {
                audit.op = "admin:revoke-grant";
                revoke_grant(api, principal, id, audit).await
            }
            _ => Err(not_an_operation()),
        };
    }
    Err(not_an_operation())
}

fn not_an_operation() -> ApiError {
    ApiError::not_found("no such admin API operation")
}

/// The policies' decision for a management call (no encryption context, no grant tokens).
fn authorize(
    api: &AdminApi,
    principal: &Arc<Principal>,
    key: &KeyRef,
    action: Action,
) -> Result<(), ApiError> {
    match api
        .policies()
        .decide(principal, key, action, &Context::new(), &[])
    {
        // A key without a policy is open to the routes' principals for data, never for
        // management: an API caller must be allowed by name.
        Decision::Allow(crate::policy::Basis::NoPolicy) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_denied",
            format!(
                "{} may not {action} key {key}: the key has no key policy, and the admin API manages only keys whose policy allows it",
                principal.name
            ),
        )),
        Decision::Allow(_) => Ok(()),
        Decision::Deny(d) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_denied",
            format!("{} may not {} key {}", d.principal, d.action, d.key),
        )),
    }
}

/// `users`, `local:users`, percent-encoded or not.
fn parse_key(s: &str) -> Result<KeyRef, ApiError> {
    let decoded = percent_decode(s).ok_or_else(|| ApiError::bad_request("malformed key"))?;
    KeyRef::parse(&decoded)
        .filter(|k| !k.key_id.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{decoded:?} is not a key reference like \"name\" or \"backend:key\""
            ))
        })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn local_only(key: &KeyRef) -> Result<(), ApiError> {
    if key.backend == KeyRef::DEFAULT_BACKEND {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{key}: only keys of the local keyring are managed here; manage {} keys with their own service",
            key.backend
        )))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        ))
    })
}

fn key_json(k: &crate::keys::keyring::KeySummary) -> Value {
    json!({
        "key": KeyRef { backend: KeyRef::DEFAULT_BACKEND.into(), key_id: k.name.clone() }.to_string(),
        "enabled": k.enabled,
        "state": k.state.name(),
        "current_version": k.current_version,
        "versions": k.versions,
        "created_at": k.created,
    })
}

fn list_keys(api: &AdminApi, principal: &Arc<Principal>) -> Answer {
    let keys: Vec<Value> = api
        .keyring
        .list()
        .iter()
        .filter(|k| {
            let r = KeyRef {
                backend: KeyRef::DEFAULT_BACKEND.into(),
                key_id: k.name.clone(),
            };
            authorize(api, principal, &r, Action::List).is_ok()
        })
        .map(key_json)
        .collect();
    Ok((StatusCode::OK, json!({ "keys": keys })))
}

async fn describe_key(
    api: &AdminApi,
    principal: &Arc<Principal>,
    k: &str,
    audit: &mut Audit,
) -> Answer {
    let key = parse_key(k)?;
    audit.key = Some(key.clone());
    authorize(api, principal, &key, Action::Describe)?;
    if key.backend == KeyRef::DEFAULT_BACKEND {
        let summary = api
            .keyring
            .list()
            .into_iter()
            .find(|s| s.name == key.key_id)
            .ok_or_else(|| ApiError::not_found(format!("root key {key} not found")))?;
        return Ok((StatusCode::OK, key_json(&summary)));
    }
    let enabled = match api.state().keys.describe(&key).await {
        Ok(_) => true,
        Err(BackendError::KeyDisabled(_)) => false,
        Err(e) => return Err(backend_error(e)),
    };
    Ok((
        StatusCode::OK,
        json!({ "key": key.to_string(), "enabled": enabled }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body: {}",
            e.to_string().replace('\n', " ")
        ))
    })
}

async fn create_key(
    api: &AdminApi,
    principal: &Arc<Principal>,
    body: &Bytes,
    audit: &mut Audit,
) -> Answer {
    let req: CreateKey = parse_body(body)?;
    let key = parse_key(&req.name)?;
    audit.key = Some(key.clone());
    local_only(&key)?;
    authorize(api, principal, &key, Action::Create)?;
    let keyring = api.keyring.clone();
    let summary = blocking(move || Ok(keyring.create_key(&key.key_id)?)).await?;
    Ok((StatusCode::CREATED, key_json(&summary)))
}

async fn change_key(
    api: &AdminApi,
    principal: &Arc<Principal>,
    k: &str,
    suffix: &str,
    action: Action,
    audit: &mut Audit,
) -> Answer {
    let key = parse_key(k.strip_suffix(suffix).unwrap_or(k))?;
    audit.key = Some(key.clone());
    local_only(&key)?;
    authorize(api, principal, &key, action)?;
    let keyring = api.keyring.clone();
    let summary = blocking(move || {
        match action {
            Action::Rotate => drop(keyring.rotate_key(&key.key_id)?),
            Action::Enable => drop(keyring.set_enabled(&key.key_id, true)?),
            Action::CancelDeletion => drop(keyring.cancel_deletion(&key.key_id)?),
            _ => drop(keyring.set_enabled(&key.key_id, false)?),
        }
        Ok(keyring.describe(&key.key_id)?)
    })
    .await?;
    Ok((StatusCode::OK, key_info_json(&summary)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ScheduleDeletion {
    /// The waiting period, 7..=30 days (default 30).
    days: Option<u32>,
}

/// `POST /v1/keys/{key}/schedule-deletion` `{"days": 7}`: as `keys schedule-deletion`.
async fn schedule_deletion(
    api: &AdminApi,
    principal: &Arc<Principal>,
    k: &str,
    body: &Bytes,
    audit: &mut Audit,
) -> Answer {
    let key = parse_key(k.strip_suffix("/schedule-deletion").unwrap_or(k))?;
    audit.key = Some(key.clone());
    local_only(&key)?;
    let req: ScheduleDeletion = if body.is_empty() {
        ScheduleDeletion::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    authorize(api, principal, &key, Action::ScheduleDeletion)?;
    let keyring = api.keyring.clone();
    let info = blocking(move || {
        keyring.schedule_deletion(&key.key_id, req.days.unwrap_or(30), now())?;
        Ok(keyring.describe(&key.key_id)?)
    })
    .await?;
    Ok((StatusCode::OK, key_info_json(&info)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shred {
    context: std::collections::BTreeMap<String, String>,
    days: Option<u32>,
}

/// `POST /v1/routes/{route}/shred` `{"context": {"tenant": "acme"}, "days": 7}` (or
/// `.../shred/cancel`): crypto-shredding of one key context's data-key records, as
/// `keys shred`. Allowed by `schedule-deletion` (`cancel-deletion`) on every key of the route.
async fn shred(
    api: &AdminApi,
    principal: &Arc<Principal>,
    route_name: &str,
    body: &Bytes,
    cancel: bool,
    audit: &mut Audit,
) -> Answer {
    use crate::config::RouteKind;
    use crate::keys::vault::manage;
    let req: Shred = parse_body(body)?;
    let state = api.state();
    let route = state
        .config
        .routes
        .iter()
        .find(|r| r.name == route_name)
        .ok_or_else(|| ApiError::not_found(format!("no route named {route_name:?}")))?;
    let (jr, label) = match &route.kind {
        RouteKind::JsonFields(jr) => match &jr.vault_label {
            Some(l) => (jr, l),
            None => return Err(ApiError::bad_request("the route has no key_vault")),
        },
        _ => return Err(ApiError::bad_request("not a JSON-fields route")),
    };
    audit.key = jr.keys.first().cloned();
    let action = if cancel {
        Action::CancelDeletion
    } else {
        Action::ScheduleDeletion
    };
    for k in &jr.keys {
        authorize(api, principal, k, action)?;
    }
    let mut names: Vec<&str> = jr.key_context.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    if names != req.context.keys().map(String::as_str).collect::<Vec<_>>() {
        return Err(ApiError::bad_request(format!(
            "context must name exactly the route's key context: {}",
            names.join(", ")
        )));
    }
    let ctx: Context = req.context.into_iter().collect();
    let vault = state.keys.vault(label).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the route's key vault is not open",
        )
    })?;
    let report = if cancel {
        manage::cancel_shred(&vault, &ctx).await
    } else {
        manage::schedule_shred(&vault, &ctx, req.days.unwrap_or(30), now()).await
    }
    .map_err(|e| match e {
        manage::ShredError::Invalid(m) => ApiError::bad_request(m),
        manage::ShredError::Vault(v) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "key_vault_unavailable",
            v.to_string(),
        ),
    })?;
    // This replica stops opening (and sealing under) those records at once; others do when
    // their cached keys expire (`open_ttl_secs`, `max_age_secs`).
    state.keys.cache().invalidate_all();
    Ok((
        StatusCode::OK,
        json!({
            "records": report.records,
            "shred_after": report.shred_after.map(crate::keys::keyring::date),
        }),
    ))
}

fn key_info_json(info: &crate::keys::keyring::KeyInfo) -> Value {
    let mut v = serde_json::to_value(info).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "key".into(),
            Value::String(
                KeyRef {
                    backend: KeyRef::DEFAULT_BACKEND.into(),
                    key_id: info.name.clone(),
                }
                .to_string(),
            ),
        );
        o.insert(
            "enabled".into(),
            Value::Bool(info.state == crate::keys::keyring::KeyState::Enabled),
        );
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGrant {
    key: String,
    grantee: String,
    operations: Vec<String>,
    #[serde(default)]
    constraints: Constraints,
    retiring_principal: Option<String>,
    expires_in_secs: Option<u64>,
}

fn grant_json(g: &Grant) -> Value {
    serde_json::to_value(g).unwrap_or(Value::Null)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn create_grant(
    api: &AdminApi,
    principal: &Arc<Principal>,
    body: &Bytes,
    audit: &mut Audit,
) -> Answer {
    let req: CreateGrant = parse_body(body)?;
    let key = parse_key(&req.key)?;
    audit.key = Some(key.clone());
    let mut operations = Vec::new();
    for o in &req.operations {
        operations.push(
            Action::parse(o).ok_or_else(|| {
                ApiError::bad_request(format!("operations: {o:?} is not an action"))
            })?,
        );
    }
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(s) if s == 0 || s > MAX_EXPIRES_IN => {
            return Err(ApiError::bad_request(format!(
                "expires_in_secs: between 1 and {MAX_EXPIRES_IN}"
            )));
        }
        Some(s) => Some(now() + s),
    };
    authorize(api, principal, &key, Action::CreateGrant)?;
    // The key must exist (a grant for a key that does not is a typo).
    if key.backend == KeyRef::DEFAULT_BACKEND {
        if !api.keyring.list().iter().any(|s| s.name == key.key_id) {
            return Err(ApiError::not_found(format!("root key {key} not found")));
        }
    } else {
        match api.state().keys.describe(&key).await {
            Ok(_) | Err(BackendError::KeyDisabled(_)) => {}
            Err(e) => return Err(backend_error(e)),
        }
    }
    let new = NewGrant {
        key,
        grantee: req.grantee,
        operations,
        constraints: req.constraints,
        retiring_principal: req.retiring_principal,
        expires_at,
    };
    let grants = api.policies().grants().clone();
    let by = principal.name.clone();
    let (grant, token) = blocking(move || Ok(grants.create(new, &by)?)).await?;
    audit.grant = Some(grant.id.clone());
    Ok((
        StatusCode::CREATED,
        json!({ "grant_id": grant.id, "grant_token": token, "grant": grant_json(&grant) }),
    ))
}

async fn list_grants(
    api: &AdminApi,
    principal: &Arc<Principal>,
    query: Option<&str>,
    audit: &mut Audit,
) -> Answer {
    let (mut key, mut grantee) = (None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "key" => key = Some(v.into_owned()),
            "grantee" => grantee = Some(v.into_owned()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (key, grantee)"
                )));
            }
        }
    }
    let key = match key {
        Some(k) => {
            let k = parse_key(&k)?;
            audit.key = Some(k.clone());
            authorize(api, principal, &k, Action::ListGrants)?;
            Some(k)
        }
        // Without a key: a principal's own grants only.
        None if grantee.as_deref() == Some(principal.name.as_str()) => None,
        None => {
            return Err(ApiError::bad_request(
                "give key=KEY (needs list-grants on it), or grantee=<your own name>",
            ));
        }
    };
    let grants = api.policies().grants().clone();
    let list = blocking(move || Ok(grants.list(key.as_ref(), grantee.as_deref())?)).await?;
    Ok((
        StatusCode::OK,
        json!({ "grants": list.iter().map(grant_json).collect::<Vec<_>>() }),
    ))
}

async fn retire_grant(
    api: &AdminApi,
    principal: &Arc<Principal>,
    id: &str,
    audit: &mut Audit,
) -> Answer {
    audit.grant = Some(id.to_string());
    let grants = api.policies().grants().clone();
    let (id, by) = (id.to_string(), principal.name.clone());
    let g = blocking(move || Ok(grants.retire(&id, &by)?)).await?;
    audit.key = Some(g.key.clone());
    Ok((
        StatusCode::OK,
        json!({ "retired": g.id, "grant": grant_json(&g) }),
    ))
}

async fn revoke_grant(
    api: &AdminApi,
    principal: &Arc<Principal>,
    id: &str,
    audit: &mut Audit,
) -> Answer {
    audit.grant = Some(id.to_string());
    let grants = api.policies().grants().clone();
    let lookup = id.to_string();
    let g = blocking(move || {
        grants
            .get(&lookup)?
            .ok_or(GrantError::NotFound(lookup).into())
    })
    .await?;
    audit.key = Some(g.key.clone());
    authorize(api, principal, &g.key, Action::RevokeGrant)?;
    let grants = api.policies().grants().clone();
    let id = id.to_string();
    let g = blocking(move || Ok(grants.revoke(&id)?)).await?;
    Ok((
        StatusCode::OK,
        json!({ "revoked": g.id, "grant": grant_json(&g) }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_paths() {
        assert_eq!(parse_key("users").unwrap().to_string(), "local:users");
        assert_eq!(
            parse_key("kms%3Aalias%2Fx").unwrap().to_string(),
            "kms:alias/x"
        );
        assert!(parse_key("%zz").is_err());
        assert!(parse_key("local:").is_err());
    }
}
