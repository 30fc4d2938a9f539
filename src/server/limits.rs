//! Listener hardening: what one client may hold of the proxy.
//!
//! - **Header-read timeout** (hyper's own, which needs a timer: without one it is off; each
//!   connection gets its own, `conn_timer`, so that arming it costs no timer-wheel entry): a
//!   client sending its request head byte by byte (slowloris) is disconnected after
//!   `header_read_timeout`. On HTTP/1.1 hyper starts that timer whenever it waits for a request
//!   head, so an idle keep-alive connection is closed after the same time.
//! - **Request head size**: `max_header_bytes` bounds hyper's HTTP/1 read buffer (431 above)
//!   and the HTTP/2 header list.
//! - **Connections**: at most `max_connections` open; one beyond is accepted and closed at
//!   once. Accepting and closing (rather than leaving it in the kernel's backlog) keeps the
//!   backlog empty, so a client within the limit is never queued behind a flood, and the
//!   refused client learns at once instead of waiting for its connect timeout.
//! - **Requests**: at most `max_requests` handled at once (TCP and unix socket together); one
//!   beyond is shed with 503 and `Retry-After: 1` (JSON, or S3 XML `SlowDown` on an S3 route)
//!   before any work is done. A request counts until its response head is sent.
//! - Refusals and sheds are counted: `connections_refused_total{listener}`,
//!   `requests_shed_total{listener}` (`data`: TCP and unix socket; `admin`).
//! - **HTTP/2 keep-alive**: a PING every `h2_keepalive_interval` of silence; a peer that does
//!   not answer within `h2_keepalive_timeout` is disconnected (dead peers, half-open
//!   connections). HTTP/1.1 idle connections close after `header_read_timeout` (above).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{ListenerLimits, Route, RouteKind};
use crate::metrics::Metrics;
use crate::pipeline::{ProxyBody, full_body};

/// The shared counters of one server's listeners.
pub struct Limits {
    pub settings: ListenerLimits,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// `data` or `admin`: the label of the refusals counted in `metrics`.
    listener: &'static str,
    metrics: Arc<Metrics>,
}

impl Limits {
    pub fn new(settings: ListenerLimits, listener: &'static str, metrics: Arc<Metrics>) -> Limits {
        Limits {
            settings,
            connections: Arc::default(),
            requests: Arc::default(),
            listener,
            metrics,
        }
    }

    /// A slot for a new connection, held while it is open; `None`: at the limit (counted).
    pub fn connection(&self) -> Option<Slot> {
        let slot = Slot::take(&self.connections, self.settings.max_connections);
        if slot.is_none() {
            self.metrics.connection_refused(self.listener);
        }
        slot
    }

    /// A slot for a request, held until its response head; `None`: shed it (counted).
    pub fn request(&self) -> Option<Slot> {
        let slot = Slot::take(&self.requests, self.settings.max_requests);
        if slot.is_none() {
            self.metrics.request_shed(self.listener);
        }
        slot
    }

    /// A connection builder (HTTP/1.1 and h2) with the timer, timeouts and sizes set: one per
    /// connection (its HTTP/1 timer is the connection's own, see `conn_timer`).
    pub fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(super::conn_timer::ConnTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_buf_size(self.settings.max_header_bytes);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.settings.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(self.settings.h2_keepalive_interval).filter(|d| !d.is_zero()))
            .keep_alive_timeout(self.settings.h2_keepalive_timeout);
        b
    }

    /// An HTTP/1.1-only builder (the admin listener) with the same timeouts and sizes.
    pub fn http1_builder(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(super::conn_timer::ConnTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_buf_size(self.settings.max_header_bytes);
        b
    }
}

/// One of at most `limit` places counted in a shared counter, given back when dropped. A
/// counter, not a semaphore: nothing ever waits for a place (one beyond the limit is refused
/// at once), and taking and giving back are one atomic operation each on every request.
pub struct Slot {
    count: Arc<AtomicUsize>,
}

impl Slot {
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                count: count.clone(),
            })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a request shed for load: 503, `Retry-After: 1`, in the route's dialect
/// (S3 XML `SlowDown` on an S3 route, JSON otherwise).
pub fn overloaded(routes: &[Route], path: &str) -> Response<ProxyBody> {
    let s3 = crate::pipeline::route::select(routes, path)
        .is_ok_and(|(route, _)| matches!(route.kind, RouteKind::S3(_)));
    let (ctype, body) = if s3 {
        (
            "application/xml",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
             <Message>Please reduce your request rate.</Message></Error>"
                .to_string(),
        )
    } else {
        (
            "application/json",
            serde_json::json!({ "error": { "code": "overloaded",
                "message": "the proxy is handling as many requests as it may; retry shortly" } })
            .to_string(),
        )
    };
    let mut resp = Response::new(full_body(Bytes::from(body)));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_counted_and_given_back() {
        let count = std::sync::Arc::default();
        let a = super::Slot::take(&count, 2).unwrap();
        let b = super::Slot::take(&count, 2).unwrap();
        assert!(super::Slot::take(&count, 2).is_none());
        drop(a);
        let c = super::Slot::take(&count, 2).unwrap();
        assert!(super::Slot::take(&count, 2).is_none());
        drop((b, c));
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
