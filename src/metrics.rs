//! Prometheus metrics, served on the admin listener at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendErrorLabels {
    pub backend: String,
    pub operation: String,
    /// [`crate::keys::BackendError::kind`]: `unavailable`, `credentials`, `key_disabled`, ...
    pub kind: String,
}

/// An access refusal: `route`, `key` (`-` when no key was involved), `reason`
/// (`unauthenticated-missing`, `unauthenticated-invalid`, `require`, `no-allow`,
/// `explicit-deny`, `quota`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub route: String,
    pub key: String,
    pub reason: String,
}

/// A key use refused for the key's state (`pending_deletion`, `pending_import`, `destroyed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabels {
    pub key: String,
    pub state: String,
}

/// `build_info{version, revision}` (always 1).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub revision: String,
}

/// Bytes through a route's transform: `direction` is `sealed` or `opened`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub route: String,
    pub direction: String,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

/// A listener: `data` (TCP and unix socket) or `admin`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendNameLabels {
    pub backend: String,
}

/// Label sets reused by the counters every request touches: a lookup fills these instead of
/// building new `String`s (a family clones its key only when it creates a series).
#[derive(Default)]
struct Scratch {
    request: RequestLabels,
    route: RouteLabels,
    bytes: BytesLabels,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `f` with this thread's [`Scratch`], or a fresh one if it is unavailable (in use further up
/// the stack, or the thread is exiting).
fn with_scratch<R>(mut f: impl FnMut(&mut Scratch) -> R) -> R {
    SCRATCH
        .try_with(|cell| cell.try_borrow_mut().ok().map(|mut s| f(&mut s)))
        .ok()
        .flatten()
        .unwrap_or_else(|| f(&mut Scratch::default()))
}

fn set(buf: &mut String, value: &str) {
    buf.clear();
    buf.push_str(value);
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    cache_hits: Counter,
    cache_misses: Counter,
    backend_calls: Family<BackendLabels, Counter>,
    backend_errors: Family<BackendErrorLabels, Counter>,
    keyring_rollbacks: Counter,
    fields_sealed: Family<RouteLabels, Counter>,
    fields_opened: Family<RouteLabels, Counter>,
    decrypt_failures: Family<RouteLabels, Counter>,
    plaintext_reads: Family<RouteLabels, Counter>,
    unbound_object_reads: Family<RouteLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    key_state_refusals: Family<KeyStateLabels, Counter>,
    backend_latency: Family<BackendLabels, Histogram>,
    in_flight: Gauge,
    bytes: Family<BytesLabels, Counter>,
    aborted_bodies: Family<RouteLabels, Counter>,
    config_reloads: Counter,
    config_reload_failures: Counter,
    config_last_reload_success: Gauge,
    connections_refused: Family<ListenerLabels, Counter>,
    requests_shed: Family<ListenerLabels, Counter>,
    circuit_state: Family<BackendNameLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("envelope_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        // 50 µs to ~3.5 min: small JSON requests and S3 transfers of minutes alike.
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 23))
        });
        // Root-key backend calls: 50 µs (a local unwrap) to ~100 s (retries against a slow
        // KMS or HSM).
        let backend_latency = Family::<BackendLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
        });
        let in_flight = Gauge::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let aborted_bodies = Family::<RouteLabels, Counter>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                revision: env!("ENVELOPE_PROXY_GIT_REV").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running build: version and git revision (always 1)",
            build_info,
        );
        registry.register(
            "backend_call_seconds",
            "Duration of root-key backend calls, by backend and operation (errors included)",
            backend_latency.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being handled, their response bodies included",
            in_flight.clone(),
        );
        registry.register_with_unit(
            "transformed",
            "Plaintext bytes sealed on the way to storage and opened on the way back, by route",
            prometheus_client::registry::Unit::Bytes,
            bytes.clone(),
        );
        registry.register(
            "response_bodies_aborted",
            "Response bodies that ended before their end: a stored object that failed \
             authentication mid-stream, storage that stopped sending, or a client that went away",
            aborted_bodies.clone(),
        );
        let config_reloads = Counter::default();
        let config_reload_failures = Counter::default();
        let config_last_reload_success = Gauge::default();
        registry.register(
            "config_reloads",
            "Config reloads applied (SIGHUP or a changed config file)",
            config_reloads.clone(),
        );
        registry.register(
            "config_reload_failures",
            "Config reloads refused (the config did not load or validate); the previous config serves on",
            config_reload_failures.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config in use was loaded (start or the last reload applied), Unix time",
            config_last_reload_success.clone(),
        );
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        let requests_shed = Family::<ListenerLabels, Counter>::default();
        let circuit_state = Family::<BackendNameLabels, Gauge>::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because the listener had max_connections open, by listener",
            connections_refused.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests answered 503 because max_requests were in flight, by listener",
            requests_shed.clone(),
        );
        registry.register(
            "backend_circuit_state",
            "Circuit breaker of a remote key backend: 0 closed, 1 open (calls fail fast), \
             2 half-open (the next call is a trial)",
            circuit_state.clone(),
        );
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let backend_calls = Family::<BackendLabels, Counter>::default();
        let backend_errors = Family::<BackendErrorLabels, Counter>::default();
        let keyring_rollbacks = Counter::default();
        let fields_sealed = Family::<RouteLabels, Counter>::default();
        let fields_opened = Family::<RouteLabels, Counter>::default();
        let decrypt_failures = Family::<RouteLabels, Counter>::default();
        let plaintext_reads = Family::<RouteLabels, Counter>::default();
        let unbound_object_reads = Family::<RouteLabels, Counter>::default();
        let denials = Family::<DenialLabels, Counter>::default();
        let key_state_refusals = Family::<KeyStateLabels, Counter>::default();
        registry.register(
            "key_state_refusals",
            "Key uses refused for the key's state (pending_deletion: data still needs a key \
             scheduled for deletion), by key and state",
            key_state_refusals.clone(),
        );
        registry.register(
            "access_denials",
            "Requests refused by authentication, route requirements, key policies or quotas, by route, key and reason",
            denials.clone(),
        );
        registry.register(
            "requests",
            "Requests handled, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time to handle a request, by route",
            latency.clone(),
        );
        registry.register(
            "data_key_cache_hits",
            "Data-key cache hits",
            cache_hits.clone(),
        );
        registry.register(
            "data_key_cache_misses",
            "Data-key cache misses",
            cache_misses.clone(),
        );
        registry.register(
            "backend_calls",
            "Root-key backend calls",
            backend_calls.clone(),
        );
        registry.register(
            "backend_errors",
            "Root-key backend errors, by backend, operation and kind",
            backend_errors.clone(),
        );
        registry.register(
            "keyring_rollbacks_refused",
            "Keyring reloads refused because the file's generation went backwards",
            keyring_rollbacks.clone(),
        );
        registry.register(
            "fields_sealed",
            "JSON values encrypted",
            fields_sealed.clone(),
        );
        registry.register(
            "fields_opened",
            "JSON values decrypted",
            fields_opened.clone(),
        );
        registry.register(
            "decrypt_failures",
            "Stored values that did not decrypt",
            decrypt_failures.clone(),
        );
        registry.register(
            "plaintext_reads",
            "Unencrypted objects served (dangerous_allow_plaintext_reads)",
            plaintext_reads.clone(),
        );
        registry.register(
            "unbound_object_reads",
            "Legacy (v1) S3 objects served that are not bound to their bucket and key",
            unbound_object_reads.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            cache_hits,
            cache_misses,
            backend_calls,
            backend_errors,
            keyring_rollbacks,
            fields_sealed,
            fields_opened,
            decrypt_failures,
            plaintext_reads,
            unbound_object_reads,
            denials,
            key_state_refusals,
            backend_latency,
            in_flight,
            bytes,
            aborted_bodies,
            config_reloads,
            config_reload_failures,
            config_last_reload_success,
            connections_refused,
            requests_shed,
            circuit_state,
        }
    }

    /// A connection closed at once: `listener` had `max_connections` open.
    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// A request shed (503): `listener` had `max_requests` in flight.
    pub fn request_shed(&self, listener: &str) {
        self.requests_shed
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// A backend's circuit state now: 0 closed, 1 open, 2 half-open (set when scraped: the
    /// state changes with time alone, open → half-open).
    pub fn circuit_state(&self, backend: &str, state: i64) {
        self.circuit_state
            .get_or_create(&BackendNameLabels {
                backend: backend.to_string(),
            })
            .set(state);
    }

    /// The config in use was loaded now (at start, or a reload was applied: `reloaded`).
    pub fn config_loaded(&self, reloaded: bool) {
        if reloaded {
            self.config_reloads.inc();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.config_last_reload_success
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// A reload was refused: the previous config serves on.
    pub fn config_reload_failed(&self) {
        self.config_reload_failures.inc();
    }

    /// How long one backend call took.
    pub fn backend_seconds(&self, backend: &str, operation: &str, seconds: f64) {
        self.backend_latency
            .get_or_create(&BackendLabels {
                backend: backend.into(),
                operation: operation.into(),
            })
            .observe(seconds);
    }

    /// A request started (`+1`) or its response body ended (`-1`).
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.get()
    }

    /// Plaintext bytes sealed or opened on `route`.
    pub fn transformed(&self, route: &str, direction: &'static str, bytes: u64) {
        with_scratch(|s| {
            set(&mut s.bytes.route, route);
            set(&mut s.bytes.direction, direction);
            self.bytes.get_or_create(&s.bytes).inc_by(bytes);
        });
    }

    pub fn transformed_of(&self, route: &str, direction: &'static str) -> u64 {
        self.bytes
            .get_or_create(&BytesLabels {
                route: route.to_string(),
                direction: direction.to_string(),
            })
            .get()
    }

    /// A response body that ended early on `route`.
    pub fn body_aborted(&self, route: &str) {
        self.aborted_bodies
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }

    pub fn bodies_aborted_of(&self, route: &str) -> u64 {
        self.aborted_bodies
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .get()
    }

    /// A key use refused for the key's state.
    pub fn key_state_refused(&self, key: &str, state: &str) {
        self.key_state_refusals
            .get_or_create(&KeyStateLabels {
                key: key.to_string(),
                state: state.to_string(),
            })
            .inc();
    }

    pub fn key_state_refusals_of(&self, key: &str, state: &str) -> u64 {
        self.key_state_refusals
            .get_or_create(&KeyStateLabels {
                key: key.to_string(),
                state: state.to_string(),
            })
            .get()
    }

    pub fn denial(&self, route: &str, key: &str, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                route: route.to_string(),
                key: key.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn denials_of(&self, route: &str, key: &str, reason: &str) -> u64 {
        self.denials
            .get_or_create(&DenialLabels {
                route: route.to_string(),
                key: key.to_string(),
                reason: reason.to_string(),
            })
            .get()
    }

    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        with_scratch(|s| {
            set(&mut s.request.route, route);
            s.request.status = status;
            self.requests.get_or_create(&s.request).inc();
            set(&mut s.route.route, route);
            self.latency.get_or_create(&s.route).observe(seconds);
        });
    }

    pub fn record_cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    pub fn backend_call(&self, backend: &str, operation: &str) {
        self.backend_calls
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
                operation: operation.to_string(),
            })
            .inc();
    }

    pub fn backend_error(&self, backend: &str, operation: &str, kind: &str) {
        self.backend_errors
            .get_or_create(&BackendErrorLabels {
                backend: backend.to_string(),
                operation: operation.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Backend errors of one kind so far (every operation).
    pub fn backend_errors_of(&self, backend: &str, kind: &str) -> u64 {
        ["generate", "wrap", "unwrap", "resolve"]
            .iter()
            .map(|op| {
                self.backend_errors
                    .get_or_create(&BackendErrorLabels {
                        backend: backend.into(),
                        operation: (*op).into(),
                        kind: kind.into(),
                    })
                    .get()
            })
            .sum()
    }

    pub fn keyring_rollback_refused(&self) {
        self.keyring_rollbacks.inc();
    }

    /// Calls made to one backend so far (generate, wrap and unwrap).
    pub fn backend_calls_for(&self, backend: &str) -> u64 {
        ["generate", "wrap", "unwrap"]
            .iter()
            .map(|op| {
                self.backend_calls
                    .get_or_create(&BackendLabels {
                        backend: backend.into(),
                        operation: (*op).into(),
                    })
                    .get()
            })
            .sum()
    }

    pub fn fields(&self, route: &str, sealed: usize, opened: usize) {
        if sealed == 0 && opened == 0 {
            return;
        }
        with_scratch(|s| {
            set(&mut s.route.route, route);
            if sealed > 0 {
                self.fields_sealed
                    .get_or_create(&s.route)
                    .inc_by(sealed as u64);
            }
            if opened > 0 {
                self.fields_opened
                    .get_or_create(&s.route)
                    .inc_by(opened as u64);
            }
        });
    }

    pub fn plaintext_read(&self, route: &str) {
        self.plaintext_reads
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }

    pub fn unbound_read(&self, route: &str) {
        self.unbound_object_reads
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }

    pub fn decrypt_failure(&self, route: &str) {
        self.decrypt_failures
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
