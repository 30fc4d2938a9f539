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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

use super::{AppState, BoxError, ProxyBody};
use crate::audit::AuditEvent;

pub const REQUEST_ID: &str = "x-request-id";

/// `x-request-id` as a header name built at compile time: inserting a `&str` name that is not
/// a standard header copies it into a new allocation on every call.
fn request_id_header() -> http::HeaderName {
    const { http::HeaderName::from_static(REQUEST_ID) }
}
const TRACEPARENT: &str = "traceparent";
const MAX_ID_LEN: usize = 128;

/// What the pipeline learnt of a request, for its access line.
#[derive(Debug, Clone, Default)]
pub struct AccessNote {
    /// The route's index in the request's config (`None`: no route matched).
    pub route: Option<usize>,
    pub principal: Option<String>,
}

/// How far the request body has been read: shared by the body and the access line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read so far.
    pub bytes: AtomicU64,
    /// Read to its end.
    pub finished: AtomicBool,
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
/// processes apart: a random per-process prefix, then a counter passed through a bijective
/// mix under a random per-process key (ids do not show the request count). No system call
/// per request: ids are labels, not secrets.
fn fresh_id() -> HeaderValue {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (prefix, key) = *KEYS.get_or_init(|| {
        let mut raw = [0u8; 16];
        crate::envelope::fill_random(&mut raw);
        let (a, b) = raw.split_at(8);
        (
            u64::from_be_bytes(a.try_into().unwrap_or_default()),
            u64::from_be_bytes(b.try_into().unwrap_or_default()),
        )
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex digits written in place: one allocation (the header value's own), not a formatted
    // string copied into it.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (i, word) in [prefix, mix(n ^ key)].into_iter().enumerate() {
        for (j, b) in word.to_be_bytes().into_iter().enumerate() {
            id[i * 16 + j * 2] = HEX[usize::from(b >> 4)];
            id[i * 16 + j * 2 + 1] = HEX[usize::from(b & 0xf)];
        }
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("-"))
}

/// SplitMix64's finalizer: a bijection on `u64` (distinct counters give distinct ids).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Settle the request's ids on its headers: keep or make `x-request-id`, keep a valid
/// `traceparent`, drop an invalid one.
pub fn ids(headers: &mut HeaderMap) -> Ids {
    let mut given = headers.get_all(REQUEST_ID).iter();
    let request_id = match (given.next(), given.next()) {
        (Some(v), None) if valid_id(v.as_bytes()) => v.clone(),
        _ => {
            let v = fresh_id();
            headers.insert(request_id_header(), v.clone());
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
    pub request: Arc<Progress>,
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
    pub fn wrap(
        resp: http::Response<ProxyBody>,
        pending: Pending,
        note: AccessNote,
    ) -> http::Response<ProxyBody> {
        let status = resp.status().as_u16();
        let (mut parts, body) = resp.into_parts();
        parts
            .headers
            .insert(request_id_header(), pending.ids.request_id.clone());
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
        let route = if p.admin {
            "admin"
        } else {
            self.note
                .route
                .and_then(|i| p.state.config.routes.get(i))
                .map_or("-", |r| r.name.as_str())
        };
        tracing::info!(
            target: "envelope_proxy::access",
            request_id = p.ids.request_id(),
            trace_id = p.ids.trace_id().unwrap_or("-"),
            route,
            method = %p.method,
            path = p.uri.path(),
            status = self.status,
            bytes_in = p.request.bytes.load(Ordering::Relaxed),
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
    fn fresh_request_ids_are_distinct_hex() {
        let ids: std::collections::HashSet<_> = (0..10_000)
            .map(|_| {
                let v = fresh_id();
                let s = v.to_str().unwrap().to_string();
                assert!(is_hex(&s, 32), "{s}");
                s
            })
            .collect();
        assert_eq!(ids.len(), 10_000);
        // One process prefix, and counters that do not show through.
        let first: Vec<_> = ids.iter().map(|s| &s[..16]).collect();
        assert!(first.iter().all(|p| *p == first[0]));
        let (a, b) = (mix(1), mix(2));
        assert!(a.abs_diff(b) > 1 << 32, "{a:x} {b:x}");
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
