//! Stages 3–6 for a JSON-fields route: key context → data key → seal the request body →
//! upstream → open the response body.

use tracing::Instrument as _;

use crate::telemetry::TARGET as TRACE;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use super::authorize::{self, ReadView};
use super::upstream::{self, ClientInfo};
use super::{AppState, BoxError, ProxyBody, full_body, identity};
use crate::auth::Principal;
use crate::config::{Action, JsonRoute, Route, TokenFormat};
use crate::error::ProxyError;
use crate::transform::json_fields::{self, RequestMeta, View};

/// What a JSON route did, for the audit log.
#[derive(Default)]
pub struct Outcome {
    pub sealed: usize,
    pub opened: usize,
    pub redacted: usize,
    pub masked: usize,
    pub withheld: usize,
    /// What allowed each key use (`statement:SID`, `grant:ID`, `no-policy`). Kept as is, and
    /// named only if an audit event is written.
    pub basis: Vec<crate::policy::Basis>,
    /// The root-key versions sealed or opened under (`BACKEND:KEY:VERSION`).
    pub key_versions: Vec<Arc<str>>,
}

#[allow(clippy::too_many_arguments)]
pub async fn handle<B>(
    state: &Arc<AppState>,
    route: &Route,
    jr: &JsonRoute,
    captures: HashMap<String, String>,
    req: Request<B>,
    client: ClientInfo,
    principal: &Arc<Principal>,
    outcome: &mut Outcome,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let settings = &state.config.server;
    let (mut parts, body) = req.into_parts();
    super::route::check_query(jr, parts.uri.query())?;
    let grant_tokens = authorize::take_grant_tokens(&mut parts.headers);
    let tokens: Vec<&str> = grant_tokens.iter().map(String::as_str).collect();
    // The principal is known: its credentials go no further (nor into context values).
    identity::strip_credentials(state, route, &mut parts.headers);
    let meta = RequestMeta {
        captures: &captures,
        headers: &parts.headers,
        given: None,
        principal: Some(principal),
    };
    // Identity and context: derived from this request and its principal alone, never from
    // stored data.
    identity::check_requirements(state, route, principal, &meta)?;
    let key_ctx = json_fields::key_context(jr, &meta)?;
    // Policy: how values come back, decided before anything is forwarded. A read that could
    // show nothing is refused.
    let view = authorize::read_view(state, principal, &jr.keys, &key_ctx, &tokens);
    if let ReadView::Withheld(denial) = &view
        && (parts.method == http::Method::GET || parts.method == http::Method::HEAD)
    {
        return Err(authorize::refuse_withheld(state, route, denial.clone()));
    }
    // A read (a request without a body to seal) counts against the open quota.
    let reads_only = !matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if reads_only && !matches!(view, ReadView::Withheld(_)) {
        authorize::charge(state, route, principal, Action::Open)?;
    }

    // The request body: every byte of it is read, checked and sealed before anything is sent.
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > settings.max_body_bytes
    {
        return Err(ProxyError::BodyTooLarge(settings.max_body_bytes));
    }
    let bytes = read_limited(body, settings.max_body_bytes)
        .await
        .map_err(|e| match e {
            ReadError::TooLarge => ProxyError::BodyTooLarge(settings.max_body_bytes),
            ReadError::Body => ProxyError::ClientBody,
        })?;
    let forwarded = if bytes.is_empty() {
        bytes
    } else {
        if !is_json(&parts.headers) || has_content_encoding(&parts.headers) {
            return Err(ProxyError::UnsupportedMediaType);
        }
        let depth = settings.max_json_depth;
        let doc = json_fields::scan_body(&bytes, depth).map_err(ProxyError::MalformedJson)?;
        let allowed = authorize::authorize(
            state,
            route,
            principal,
            &jr.keys,
            Action::Seal,
            &key_ctx,
            &tokens,
        )?;
        outcome.basis.extend(allowed.iter().cloned());
        let messages = json_fields::estimate_messages_scanned(jr, &doc);
        let size = bytes.len() as u64;
        let key = match (jr.token_format, &jr.vault_label) {
            (TokenFormat::V2, Some(label)) => {
                let vault = state.keys.vault(label).ok_or_else(|| {
                    ProxyError::Internal(format!("key vault {label} is not registered"))
                })?;
                state
                    .keys
                    .sealing_record_key(&vault, &jr.keys, &key_ctx, messages, size)
                    .instrument(tracing::info_span!(target: TRACE, "data_key"))
                    .await?
            }
            _ => {
                state
                    .keys
                    .sealing_key(&jr.keys, &key_ctx, messages, size)
                    .instrument(tracing::info_span!(target: TRACE, "data_key"))
                    .await?
            }
        };
        let (sealed, n) =
            tracing::info_span!(target: TRACE, "transform", values = tracing::field::Empty)
                .in_scope(|| {
                    let sealed = json_fields::seal_scanned(jr, &meta, &key_ctx, &key, &doc, depth);
                    if let Ok((_, n)) = &sealed {
                        tracing::Span::current().record("values", n);
                    }
                    sealed
                })?;
        outcome.sealed = n;
        if n > 0 {
            outcome.key_versions = key.labels.clone();
        }
        Bytes::from(sealed)
    };

    let up_req = upstream::request(
        &route.upstream,
        &parts,
        full_body(forwarded.clone()),
        client,
        Some(forwarded.len()),
    )?;
    let resp = state
        .upstream
        .send(up_req)
        .instrument(tracing::info_span!(target: TRACE, "upstream"))
        .await?;

    // The response: JSON bodies are opened. A successful response that is not JSON would
    // hand stored tokens to the client as data (JSONP, text, a store that dropped the type):
    // refused unless the route says its store serves such representations.
    let (mut rparts, rbody) = resp.into_parts();
    upstream::strip_hop_by_hop(&mut rparts.headers);
    upstream::rewrite_locations(
        &mut rparts.headers,
        &route.upstream,
        upstream::ForeignUrls::Drop,
        |path| super::route::serves(&state.config.routes, &route.name, path),
    );
    if parts.method == http::Method::HEAD {
        rparts.headers.remove(header::CONTENT_LENGTH);
        return Ok(Response::from_parts(
            rparts,
            rbody.map_err(Into::into).boxed(),
        ));
    }
    if !is_json(&rparts.headers) {
        let may_carry_data = rparts.status.is_success()
            && rparts.status != http::StatusCode::NO_CONTENT
            && rparts.status != http::StatusCode::RESET_CONTENT;
        if !may_carry_data || jr.dangerous_opaque_responses {
            return Ok(Response::from_parts(
                rparts,
                rbody.map_err(Into::into).boxed(),
            ));
        }
        // An empty body carries nothing: fine whatever its type says.
        let body = read_response(state, rbody).await?;
        if !body.is_empty() {
            return Err(ProxyError::NonJsonResponse);
        }
        return Ok(Response::from_parts(rparts, full_body(body)));
    }
    if has_content_encoding(&rparts.headers) {
        return Err(ProxyError::UpstreamResponse(
            "compressed JSON response on an encrypting route",
        ));
    }
    let body = read_response(state, rbody).await?;
    let out = if body.is_empty() {
        body
    } else {
        let depth = settings.max_json_depth;
        let doc = json_fields::scan_body(&body, depth)
            .map_err(|_| ProxyError::UpstreamResponse("malformed JSON from upstream"))?;
        let shown = match &view {
            ReadView::Plain(_) => View::Plain,
            ReadView::Masked(_) => View::Masked(state.mask_key.as_ref()),
            ReadView::Withheld(_) => View::Withheld,
        };
        let (opened, report) =
            // Boxed: the future holds the opener and the key service's lookups (kilobytes),
            // which would otherwise be moved into place on every read.
            Box::pin(json_fields::open_scanned_as(
                jr, &meta, &key_ctx, &state.keys, &doc, depth, shown,
            ))
            .instrument(tracing::info_span!(target: TRACE, "transform"))
            .await?;
        outcome.opened = report.opened;
        for v in report.key_versions {
            if !outcome.key_versions.contains(&v) {
                outcome.key_versions.push(v);
            }
        }
        outcome.redacted = report.redacted;
        outcome.masked = report.masked;
        outcome.withheld = report.withheld;
        if report.opened > 0
            && let ReadView::Plain(b) | ReadView::Masked(b) = &view
        {
            outcome.basis.extend(b.iter().cloned());
        }
        if report.withheld > 0 {
            rparts
                .headers
                .insert("x-envelope-withheld", HeaderValue::from(report.withheld));
        }
        if report.redacted > 0 {
            rparts
                .headers
                .insert("x-envelope-redacted", HeaderValue::from(report.redacted));
        }
        Bytes::from(opened)
    };
    rparts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
    Ok(Response::from_parts(rparts, full_body(out)))
}

/// The whole upstream response body, within the route's size limit and the upstream timeout.
async fn read_response<B>(state: &AppState, body: B) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    tokio::time::timeout(
        state.upstream.timeout(),
        read_limited(body, state.config.server.max_response_bytes),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout)?
    .map_err(|e| match e {
        ReadError::TooLarge => {
            ProxyError::UpstreamResponse("response larger than max_response_bytes")
        }
        ReadError::Body => ProxyError::UpstreamUnavailable("response body failed".into()),
    })
}

enum ReadError {
    TooLarge,
    Body,
}

async fn read_limited<B>(body: B, limit: u64) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Err(_) => Err(ReadError::Body),
    }
}

/// `application/json` or any `+json` media type.
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let essence = v.split(';').next().unwrap_or("").trim().as_bytes();
            let prefix = b"application/";
            // JSON Patch bodies are operations, not documents: `{"op": "replace", "path":
            // "/ssn", "value": …}` would slip past the field paths. Refused (415).
            !essence.eq_ignore_ascii_case(b"application/json-patch+json")
                && (essence.eq_ignore_ascii_case(b"application/json")
                    || (essence.len() >= prefix.len() + 5
                        && essence[..prefix.len()].eq_ignore_ascii_case(prefix)
                        && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")))
        })
        .unwrap_or(false)
}

fn has_content_encoding(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.to_str()
            .map(|s| !s.trim().eq_ignore_ascii_case("identity"))
            .unwrap_or(true)
    })
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_media_types_are_recognized_and_patches_refused() {
        let with = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&h)
        };
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/vnd.api+json ",
            "application/merge-patch+json",
            "application/+json",
        ] {
            assert!(with(yes), "{yes}");
        }
        for no in [
            "application/json-patch+json",
            "APPLICATION/JSON-PATCH+JSON;x=1",
            "text/json",
            "application/jsonx",
            "application/xml",
            "json",
            "",
        ] {
            assert!(!with(no), "{no}");
        }
        assert!(!is_json(&http::HeaderMap::new()));
    }
}
