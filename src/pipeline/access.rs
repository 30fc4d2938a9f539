//! Request ids and the access log: one line per request, written when its response body ends
//! (so it carries the bytes sent and how the body ended), on target `envelope_proxy::access`.
//!
//! - **Request id**: the client's `x-request-id` when it is 1–128 visible ASCII characters (one
//!   value), else a fresh random one; it goes upstream in `x-request-id` and back to the
//!   client in the response's.
//! - **Trace context**: a valid W3C `traceparent` passes upstream unchanged and its trace id
//!   goes in the line; an invalid one is dropped (never forwarded half-parsed).
//! - **The line**: request id, trace id, route, method, path (never the query string: presigned
//!   URLs carry signatures and credentials there), status, request and response body bytes,
//!   duration, principal, client, outcome (`ok`, `aborted`: the body failed mid-stream,
//!   `client_gone`: the client left before the end). Never values, tokens, signatures or keys.
//! - The admin listener's requests get lines too (route `admin`; `bytes_in` from
//!   `Content-Length`); they are not counted in `requests_in_flight` nor audited here (the
//!   admin API audits its own calls).
//! - A response body that ends early is also counted (`response_bodies_aborted_total`) and
//!   audited as an error: its audit line said `ok` when the headers went out.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

use super::{AppState, BoxError, ProxyBody};
use crate::audit::AuditEvent;

pub const REQUEST_ID: &str = "x-request-id";
const TRACEPARENT: &str = "traceparent";
const MAX_ID_LEN: usize = 128;

/// What the pipeline learnt of a request, for its access line (a response extension).
#[derive(Debug, Clone, Default)]
pub struct AccessNote {
    pub route: String,
    pub principal: Option<String>,
}

/// The request's id and trace context, as the headers carry them (no copies).
#[derive(Debug, Clone)]
pub struct Ids {
    pub request_id: HeaderValue,
    /// A valid `traceparent`.
    pub traceparent: Option<HeaderValue>,
}

impl Ids {
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    /// The trace id of the `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id)
    }
}

fn valid_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_ID_LEN && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; ids not all zero).
fn trace_id(v: &str) -> Option<&str> {
    let mut parts = v.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = is_hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || parts.next().is_none())
        && is_hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && is_hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && is_hex(flags, 2);
    ok.then_some(trace)
}

/// A new request id: 32 hex digits, unique in this process and unpredictable enough to tell
/// processes apart (a random per-process prefix, then a counter mixed by a randomly keyed
/// hash). No system call per request: ids are labels, not secrets.
fn fresh_id() -> String {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    static STATE: OnceLock<(u64, std::collections::hash_map::RandomState)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (prefix, hasher) = STATE.get_or_init(|| {
        let mut raw = [0u8; 8];
        crate::envelope::fill_random(&mut raw);
        (
            u64::from_be_bytes(raw),
            std::collections::hash_map::RandomState::new(),
        )
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:016x}{:016x}", hasher.hash_one(n))
}

/// Settle the request's ids on its headers: keep or make `x-request-id`, keep a valid
/// `traceparent`, drop an invalid one.
pub fn ids(headers: &mut HeaderMap) -> Ids {
    let mut given = headers.get_all(REQUEST_ID).iter();
    let request_id = match (given.next(), given.next()) {
        (Some(v), None) if valid_id(v.as_bytes()) => v.clone(),
        _ => {
            let v = HeaderValue::from_str(&fresh_id()).unwrap_or(HeaderValue::from_static("-"));
            headers.insert(REQUEST_ID, v.clone());
            v
        }
    };
    let mut traces = headers.get_all(TRACEPARENT).iter();
    let traceparent = match (traces.next(), traces.next()) {
        (Some(v), None) if v.to_str().ok().and_then(trace_id).is_some() => Some(v.clone()),
        (None, _) => None,
        _ => {
            headers.remove(TRACEPARENT);
            None
        }
    };
    Ids {
        request_id,
        traceparent,
    }
}

/// What the line needs, held until the response body ends.
pub struct Pending {
    pub state: Arc<AppState>,
    pub ids: Ids,
    pub method: http::Method,
    /// The request URI (only its path is ever logged).
    pub uri: http::Uri,
    pub client: super::ClientInfo,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// A request of the admin listener (see the module notes).
    pub admin: bool,
}

/// The response body, counted; the access line goes out when it ends or is dropped.
pub struct Logged {
    inner: ProxyBody,
    pending: Option<Pending>,
    note: AccessNote,
    status: u16,
    sent: u64,
}

impl Logged {
    pub fn wrap(resp: http::Response<ProxyBody>, pending: Pending) -> http::Response<ProxyBody> {
        let note = resp
            .extensions()
            .get::<AccessNote>()
            .cloned()
            .unwrap_or_default();
        let status = resp.status().as_u16();
        let (mut parts, body) = resp.into_parts();
        parts
            .headers
            .insert(REQUEST_ID, pending.ids.request_id.clone());
        let logged = Logged {
            inner: body,
            pending: Some(pending),
            note,
            status,
            sent: 0,
        };
        http::Response::from_parts(parts, http_body_util::BodyExt::boxed(logged))
    }

    fn finish(&mut self, outcome: &'static str) {
        let Some(p) = self.pending.take() else {
            return;
        };
        if !p.admin {
            p.state.metrics.in_flight(-1);
        }
        let route = if self.note.route.is_empty() {
            "-"
        } else {
            self.note.route.as_str()
        };
        tracing::info!(
            target: "envelope_proxy::access",
            request_id = p.ids.request_id(),
            trace_id = p.ids.trace_id().unwrap_or("-"),
            route,
            method = %p.method,
            path = p.uri.path(),
            status = self.status,
            bytes_in = p.request_bytes.load(Ordering::Relaxed),
            bytes_out = self.sent,
            duration_ms = p.started.elapsed().as_secs_f64() * 1000.0,
            principal = self.note.principal.as_deref().unwrap_or("-"),
            client = %p.client.label(),
            outcome,
            "request"
        );
        if outcome != "ok" && !p.admin {
            p.state.metrics.body_aborted(route);
            // The request's audit line said how it began; this one says it did not finish.
            let event = AuditEvent {
                action: "pass",
                outcome: "error",
                principal: self.note.principal.clone(),
                route: route.to_string(),
                method: p.method.to_string(),
                path: p.uri.path().to_string(),
                status: self.status,
                client: p.client.label(),
                reason: Some(format!("response_body_{outcome}")),
                ..Default::default()
            };
            let state = p.state.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { state.audit.record(event).await });
            }
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish("ok");
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish("aborted"),
            Poll::Ready(None) => self.finish("ok"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A HEAD answer, or a body with nothing left, ended as it should; anything else was
        // cut short by the client (or the connection) going away.
        let complete = self
            .pending
            .as_ref()
            .is_some_and(|p| p.method == http::Method::HEAD)
            || self.inner.is_end_stream();
        self.finish(if complete { "ok" } else { "client_gone" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(ids(&mut h).request_id(), "abc-123");
        for bad in ["", "has space", &"x".repeat(129)] {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = ids(&mut h).request_id().to_string();
            assert_eq!(id.len(), 32, "{bad:?} → {id}");
            assert_eq!(h.get(REQUEST_ID).unwrap(), id.as_str());
        }
        let mut h = HeaderMap::new();
        h.append(REQUEST_ID, "a".parse().unwrap());
        h.append(REQUEST_ID, "b".parse().unwrap());
        let id = ids(&mut h).request_id().to_string();
        assert!(id != "a" && id != "b");
        assert_eq!(h.get_all(REQUEST_ID).iter().count(), 1);
    }

    #[test]
    fn traceparent_is_kept_only_when_valid() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, good.parse().unwrap());
        assert_eq!(
            ids(&mut h).trace_id(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(h.get(TRACEPARENT).unwrap(), good);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, bad.parse().unwrap());
            assert_eq!(ids(&mut h).trace_id(), None, "{bad}");
            assert!(h.get(TRACEPARENT).is_none(), "{bad} is not forwarded");
        }
    }
}
