//! Configuration: the TOML file types (unknown keys rejected) and their resolution into typed
//! settings. Loading reports *every* problem with its place (`route[2].fields[1]: ...`) before
//! failing, and never echoes file contents (the file may hold secrets).
//!
//! Relative file paths are taken relative to the working directory.
//! `config/reference.toml` documents every option and its default.

pub mod auth;
pub mod keys;
pub mod pattern;
pub mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::envelope::context::RESERVED_PREFIX;
use crate::transform::field_path::FieldPath;
pub use auth::{Access, Action, Mask, Quota, Requirement, RouteAuth};
pub use keys::{CacheLimits, KeyRef, MasterKeySource, ResilienceSettings};
pub use pattern::PathPattern;
pub use template::{Source, Template};

// ---------------------------------------------------------------------------------------------
// File types: exactly what a user writes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    /// Optional when `unix_socket` is set (a socket-only sidecar).
    listen: Option<String>,
    #[serde(default)]
    tls: Option<FileTls>,
    max_body_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    max_json_depth: Option<usize>,
    upstream_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    upstream_ca_file: Option<PathBuf>,
    /// The routes' default `auth` ("none", "mtls", "jwt", "trusted-header").
    auth: Option<String>,
    /// A unix socket to serve on as well (sidecars: the app reaches the proxy through a
    /// shared volume).
    unix_socket: Option<PathBuf>,
    /// Its permissions, octal (default "0600").
    unix_socket_mode: Option<String>,
    /// `text` (default) or `json`; read by the logger before the config loads
    /// (`crate::logging::Format::choose`), checked here.
    log_format: Option<String>,
    /// OTLP/HTTP traces URL; read by the logger before the config loads
    /// (`crate::telemetry::endpoint`), checked here.
    otlp_endpoint: Option<String>,
    header_read_timeout_ms: Option<u64>,
    max_header_bytes: Option<u64>,
    max_connections: Option<u64>,
    max_requests: Option<u64>,
    h2_keepalive_interval_ms: Option<u64>,
    h2_keepalive_timeout_ms: Option<u64>,
    shutdown_delay_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    readiness_interval_ms: Option<u64>,
    readiness_failures: Option<u64>,
    config_poll_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// Client certificates are verified against these CAs (PEM) when presented; routes with
    /// `auth = "mtls"` require one.
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: String,
    token_file: Option<PathBuf>,
    /// How callers of the admin API (`/v1/...`) authenticate: "jwt", "mtls", or "none"
    /// (loopback only; the caller is `anonymous`). Unset: no admin API.
    auth: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyring {
    path: PathBuf,
    master_key_file: Option<PathBuf>,
    master_key_env: Option<String>,
    #[serde(default)]
    create_missing_keys: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileCache {
    max_age_secs: Option<u64>,
    max_messages: Option<u64>,
    max_bytes: Option<u64>,
    max_entries: Option<u64>,
    open_ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    path: PathBuf,
    key_file: Option<PathBuf>,
    checkpoint_every: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKmsBackend {
    #[allow(dead_code)]
    kind: String,
    region: Option<String>,
    endpoint: Option<String>,
    profile: Option<String>,
    credentials_file: Option<PathBuf>,
    call_timeout_ms: Option<u64>,
    retries: Option<u32>,
    failure_threshold: Option<u32>,
    open_for_secs: Option<u64>,
}

/// A backend the program embedding envelope-proxy supplies (`server::Builder::provider`). It
/// is used as given: deadlines, retries and circuit breaking are the provider's own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEmbeddedBackend {
    #[allow(dead_code)]
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePkcs11Backend {
    #[allow(dead_code)]
    kind: String,
    module: PathBuf,
    token_label: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    call_timeout_ms: Option<u64>,
    retries: Option<u32>,
    failure_threshold: Option<u32>,
    open_for_secs: Option<u64>,
}

/// The outage settings shared by every remote backend kind.
struct FileResilience {
    call_timeout_ms: Option<u64>,
    retries: Option<u32>,
    failure_threshold: Option<u32>,
    open_for_secs: Option<u64>,
}

macro_rules! resilience_of {
    ($b:expr) => {
        FileResilience {
            call_timeout_ms: $b.call_timeout_ms,
            retries: $b.retries,
            failure_threshold: $b.failure_threshold,
            open_for_secs: $b.open_for_secs,
        }
    };
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDemoStore {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: String,
    path: String,
    upstream: String,
    /// "json" (default) or "s3".
    kind: Option<String>,
    #[serde(default)]
    passthrough: bool,
    s3: Option<FileS3>,
    #[serde(default)]
    dangerous_allow_plaintext_reads: bool,
    key: Option<String>,
    keys: Option<Vec<String>>,
    #[serde(default)]
    fields: Vec<String>,
    #[serde(default)]
    response_documents: Vec<String>,
    #[serde(default)]
    context: BTreeMap<String, String>,
    #[serde(default)]
    message_context: BTreeMap<String, String>,
    on_decrypt_error: Option<String>,
    #[serde(default)]
    case_insensitive_upstream: bool,
    #[serde(default)]
    dangerous_opaque_responses: bool,
    #[serde(default)]
    allow_query_params: Vec<String>,
    #[serde(default)]
    dangerous_shadows_encrypted_routes: bool,
    auth: Option<String>,
    #[serde(default)]
    require: BTreeMap<String, String>,
    #[serde(default)]
    mask: BTreeMap<String, auth::FileMask>,
    quota: Option<auth::FileQuota>,
    token_format: Option<String>,
    key_vault: Option<FileVault>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVault {
    /// "rest" (records on the route's upstream) or "dir" (a local directory).
    kind: String,
    path: Option<String>,
    create: Option<String>,
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileS3 {
    region: String,
    #[serde(default)]
    virtual_host_suffixes: Vec<String>,
    #[serde(default)]
    path_style_hosts: Vec<String>,
    clear_metadata: Option<String>,
    #[serde(default)]
    refuse_unbound_objects: bool,
    upstream_checksum: Option<bool>,
    upstream_access_key_id_env: Option<String>,
    upstream_access_key_id_file: Option<PathBuf>,
    upstream_secret_access_key_env: Option<String>,
    upstream_secret_access_key_file: Option<PathBuf>,
    #[serde(default)]
    client: Vec<FileS3Client>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileS3Client {
    access_key_id: String,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    identity: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// Resolved configuration.

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub admin: Option<AdminSettings>,
    /// The local keyring (backend `local`). `None`: a stateless pod whose keys are all on
    /// remote backends (KMS, HSM); then no route may use a local key, and the audit chain and
    /// grants need their own keys (`audit.key_file`, `grants.token_key_file` + `grants.path`).
    pub keyring: Option<KeyringSettings>,
    /// Remote root-key backends by name (the keyring, when configured, is there as `local`).
    pub backends: Vec<BackendConfig>,
    pub cache: CacheLimits,
    pub audit_path: Option<PathBuf>,
    /// The secret the audit chain's key is derived from (default: the keyring master key).
    pub audit_key: Option<SecretSource>,
    /// Lines between audit checkpoints (default 1000).
    pub audit_checkpoint_every: u64,
    pub demo_store: Option<SocketAddr>,
    pub routes: Vec<Route>,
    /// Authenticators, key policies, grants, quotas, masking.
    pub access: Access,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The TCP listener; `None` serves the unix socket only (`unix_socket` is then set).
    pub listen: Option<SocketAddr>,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Largest request body a transformed route accepts (default 1 MiB; bounds memory per request).
    pub max_body_bytes: u64,
    /// Largest upstream response a transformed route decrypts (default 16 MiB).
    pub max_response_bytes: u64,
    /// Deepest JSON nesting accepted (default 64; deep nesting is a stack/CPU DoS vector).
    pub max_json_depth: usize,
    /// Time allowed for the upstream to answer (default 30 s) → 504 after.
    pub upstream_timeout: Duration,
    /// Time allowed to connect to the upstream (default 5 s) → 502 after.
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) trusted for https upstreams, beside the webpki roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// Client certificates presented are verified against these CAs (`auth = "mtls"`).
    pub client_ca_file: Option<PathBuf>,
    /// Also serve on this unix socket (created at start with `unix_socket_mode`).
    pub unix_socket: Option<PathBuf>,
    pub unix_socket_mode: u32,
    /// Listener limits (data and admin listeners).
    pub limits: ListenerLimits,
    /// After SIGTERM/SIGINT: `/readyz` fails at once, then this wait before the listeners
    /// stop accepting (default 0; 5 s on Kubernetes lets endpoints drop the pod first).
    pub shutdown_delay: Duration,
    /// Then in-flight requests get this long to finish (default 25 s, below Kubernetes' 30 s
    /// grace period); those still running are cut.
    pub drain_timeout: Duration,
    /// The routes' keys are probed in the background this often (default 5 s); `/readyz`
    /// reads the result, never calls a backend itself.
    pub readiness_interval: Duration,
    /// A key counts as unusable after this many probes in a row failed (default 3).
    pub readiness_failures: u32,
    /// The config file is read this often and reloaded when its content changed (default
    /// 2 s; zero: off, SIGHUP still reloads). See `crate::server` (reload).
    pub config_poll: Duration,
}

/// Limits of the listeners: each bounds what one client can hold (slowloris, floods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time a client has to send a request's head (default 10 s; HTTP/1.1 also waits at most
    /// this long for the next request on an idle keep-alive connection). Slowloris defence.
    pub header_read_timeout: Duration,
    /// Largest request head (start line + headers, default 64 KiB; HTTP/2: the header list)
    /// → 431 above.
    pub max_header_bytes: usize,
    /// Open connections at most (default 4096): a connection beyond is closed at once.
    pub max_connections: usize,
    /// Requests handled at once at most (default 1024): one beyond gets 503 + Retry-After.
    pub max_requests: usize,
    /// HTTP/2: a PING after this long without frames (default 30 s; zero: no pings).
    pub h2_keepalive_interval: Duration,
    /// HTTP/2: a peer that does not answer a PING within this (default 20 s) is disconnected.
    pub h2_keepalive_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> ListenerLimits {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_connections: 4096,
            max_requests: 1024,
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KeyringSettings {
    pub path: PathBuf,
    pub master_key: MasterKeySource,
    pub create_missing_keys: bool,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    pub kind: BackendKind,
    pub resilience: ResilienceSettings,
}

#[derive(Debug, Clone)]
pub enum BackendKind {
    AwsKms(KmsSettings),
    Pkcs11(Pkcs11Settings),
    /// A `RootKeyProvider` the embedding program registers under this name
    /// (`server::Builder::provider`); the `envelope-proxy` binary has none.
    Embedded,
}

#[derive(Debug, Clone)]
pub struct KmsSettings {
    /// Default: the SDK's region chain (AWS_REGION, profile).
    pub region: Option<String>,
    /// VPC endpoints and test peers; plain http:// only for loopback addresses.
    pub endpoint: Option<String>,
    /// A profile in the shared config/credentials files (default: the SDK's chain:
    /// environment, profile, web identity, container and instance metadata).
    pub profile: Option<String>,
    /// A credentials file to read `profile` from instead of ~/.aws/credentials.
    pub credentials_file: Option<PathBuf>,
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// A bearer token file: `/metrics` and `/readyz`'s details need `Authorization: Bearer`.
    /// Required when `listen` is not a loopback address.
    pub token: Option<SecretSource>,
    /// How callers of the admin API (`/v1/keys`, `/v1/grants`) authenticate; `None`: the API
    /// is off. `RouteAuth::None` only on a loopback address (the caller is `anonymous`, and
    /// key policies decide what it may do).
    pub api_auth: Option<RouteAuth>,
}

#[derive(Debug, Clone)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone)]
pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub token_label: String,
    pub pin: SecretSource,
    /// Sessions kept open (default 4).
    pub sessions: usize,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub pattern: PathPattern,
    pub upstream: Upstream,
    pub kind: RouteKind,
    /// A pass-through or S3 route placed before an encrypting route it overlaps: first match
    /// wins, so the overlap is not encrypted (or not as that route would). Refused unless set.
    pub dangerous_shadows_encrypted_routes: bool,
    /// How clients authenticate (route `auth`, else `[server] auth`; S3 routes: SigV4).
    pub auth: RouteAuth,
    /// Request values that must equal a value of the principal (403 otherwise).
    pub require: Vec<Requirement>,
    /// Request quota per principal on this route (`[quota]` unless the route sets its own).
    pub quota: Quota,
}

#[derive(Debug, Clone)]
pub enum RouteKind {
    /// Explicitly configured: bodies stream through unchanged.
    Passthrough,
    /// Configured JSON fields are encrypted on write and decrypted on read.
    JsonFields(JsonRoute),
    /// An S3 gateway: object bodies are stored encrypted.
    S3(S3RouteConfig),
}

impl RouteKind {
    /// The root keys the route encrypts with (none for pass-through routes).
    pub fn keys(&self) -> &[KeyRef] {
        match self {
            RouteKind::JsonFields(jr) => &jr.keys,
            RouteKind::S3(s3) => &s3.keys,
            RouteKind::Passthrough => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3RouteConfig {
    pub keys: Vec<KeyRef>,
    pub key_context: Vec<(String, Template)>,
    pub region: String,
    pub virtual_host_suffixes: Vec<String>,
    /// Host names (besides IP literals, `localhost` and the suffixes themselves) that clients
    /// use for path-style requests. Any other Host is refused.
    pub path_style_hosts: Vec<String>,
    /// What to do with metadata S3 stores in clear (user metadata, tags, Content-Disposition).
    pub clear_metadata: ClearMetadata,
    /// Refuse legacy (v1) objects, not bound to their bucket and key (FORMAT.md §9), instead of
    /// serving them counted in `envelope_proxy_unbound_object_reads_total`.
    pub refuse_unbound_objects: bool,
    /// Sealed uploads go upstream aws-chunked with a trailing CRC32 of the ciphertext (default
    /// true): the storage verifies what it stores, and Object Lock buckets accept the write.
    /// `false` for a store that does not take aws-chunked uploads.
    pub upstream_checksum: bool,
    pub upstream_access_key_id: SecretSource,
    pub upstream_secret_access_key: SecretSource,
    pub clients: Vec<S3ClientConfig>,
    /// Objects without the proxy's metadata (written before it) are served as they are
    /// (migrations only; counted in metrics and audited).
    pub dangerous_allow_plaintext_reads: bool,
}

/// `[route.s3] clear_metadata`: S3 keeps user metadata (`x-amz-meta-*`), object tags and
/// `Content-Disposition` beside the object, unencrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearMetadata {
    /// Stored as the client sends them, in clear (default; documented).
    Allow,
    /// Requests that would store any of them are refused (400 InvalidArgument).
    Refuse,
}

#[derive(Debug, Clone)]
pub struct S3ClientConfig {
    pub access_key_id: String,
    pub secret_access_key: SecretSource,
    pub identity: String,
    /// The principal's attributes (`principal.NAME` in contexts, `require` and policies).
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDecryptError {
    /// 502 with a JSON error (default).
    Error,
    /// The field becomes `null` and the response goes on (`x-envelope-redacted` counts them).
    Redact,
}

/// How a JSON route writes sealed values (every route reads both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenFormat {
    /// `enc:v1:`: self-contained (the wrapped keys in every token).
    #[default]
    V1,
    /// `enc:v2:`: compact, naming a data-key record kept in the route's key vault.
    V2,
}

/// Where a route keeps its data-key records (format v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVault {
    /// A REST resource on the route's upstream: `path` has `{id}` as its last segment.
    Rest { path: String, create: VaultCreate },
    /// One file per record in a local directory (single-node setups, tests).
    Dir { dir: PathBuf },
}

/// How a REST vault creates a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultCreate {
    /// `PUT path/{id}` (stores that create on PUT).
    Put,
    /// `POST` to the collection (the path without `/{id}`) with the id in the document
    /// (json-server and other stores that create on POST only).
    Post,
}

impl KeyVault {
    /// The vault's name: where its records go. Partitions the data-key caches, names the
    /// vault in errors, and is how the key service finds the store.
    pub fn label(&self, upstream: &Upstream) -> String {
        match self {
            KeyVault::Rest { path, .. } => format!(
                "rest:{}://{}{}{path}",
                upstream.scheme, upstream.authority, upstream.base_path
            ),
            KeyVault::Dir { dir } => format!("dir:{}", dir.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JsonRoute {
    pub token_format: TokenFormat,
    pub key_vault: Option<KeyVault>,
    /// [`KeyVault::label`] of `key_vault`.
    pub vault_label: Option<String>,
    pub keys: Vec<KeyRef>,
    pub fields: Vec<FieldPath>,
    /// Whether two of `fields` may match nested values (`$.profile`, `$.profile.name`):
    /// such routes take the DOM path (decided once, here, from the paths alone).
    pub fields_may_nest: bool,
    pub documents: Vec<FieldPath>,
    pub key_context: Vec<(String, Template)>,
    pub message_context: Vec<(String, Template)>,
    pub on_decrypt_error: OnDecryptError,
    /// The store matches member names without regard to case (Go's `encoding/json`, some
    /// .NET settings): a write with a case variant of an encrypted field's name (`SSN`,
    /// `ſsn` for `ssn`) is refused, since the store would take it as that field, in clear.
    pub case_insensitive_upstream: bool,
    /// Successful responses that are not JSON are passed to the client as they are (tokens
    /// included) instead of being refused with 502. Only for routes whose store serves
    /// non-JSON representations the client knows to be sealed data.
    pub dangerous_opaque_responses: bool,
    /// Query parameter names that name an encrypted field but may pass (case-folded).
    pub allow_query_params: Vec<String>,
    /// What a query parameter would call the encrypted fields: the last member name of each
    /// field path, case-folded (`*` when a path has none, like `$.*`).
    pub query_names: Vec<String>,
    /// How each of `fields` is shown to a principal allowed `open-masked` only (same order;
    /// `null` for fields without a rule).
    pub masks: Vec<Mask>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Prefix put before the request path (no trailing slash), often empty.
    pub base_path: String,
}

impl Config {
    /// Routes that authenticate nobody but listen beyond loopback: allowed (a sidecar behind a
    /// network policy), said out loud.
    pub fn warnings(&self) -> Vec<String> {
        let cfg = self;
        // The unix socket is no network exposure: only a TCP listener beyond loopback is.
        let Some(listen) = cfg.server.listen.filter(|l| !l.ip().is_loopback()) else {
            return Vec::new();
        };
        cfg.routes
        .iter()
        .filter(|r| r.auth == RouteAuth::None)
        .map(|r| {
            format!(
                "route {:?} has auth = \"none\" and the listener {} is not a loopback address: anyone who can reach it acts as \"anonymous\"",
                r.name, listen
            )
        })
        .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Every problem found, each with its place.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
    parse(&text)
}

pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            // `e.message()` and a position only: toml's Display quotes the offending line.
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            return Err(ConfigErrors(vec![format!("{at}{}", e.message())]));
        }
    };

    for key in table.keys() {
        if ![
            "server",
            "admin",
            "keyring",
            "backend",
            "cache",
            "audit",
            "demo_store",
            "route",
            "auth",
            "key_policy",
            "grants",
            "quota",
            "masking",
        ]
        .contains(&key.as_str())
        {
            errors.push(format!("unknown section [{key}]"));
        }
    }

    let server: Option<FileServer> = section(&table, "server", &mut errors, true);
    let admin: Option<FileAdmin> = section(&table, "admin", &mut errors, false);
    let keyring: Option<FileKeyring> = section(&table, "keyring", &mut errors, false);
    let cache: Option<FileCache> = section(&table, "cache", &mut errors, false);
    let audit: Option<FileAudit> = section(&table, "audit", &mut errors, false);
    if audit.as_ref().and_then(|a| a.checkpoint_every) == Some(0) {
        errors.push("audit.checkpoint_every: must be greater than 0".into());
    }
    let demo: Option<FileDemoStore> = section(&table, "demo_store", &mut errors, false);

    let server = server.map(|s| resolve_server(s, &mut errors));
    let demo_store = demo.and_then(|d| socket_addr("demo_store.listen", &d.listen, &mut errors));
    let keyring_missing = keyring.is_none();
    let keyring = keyring.and_then(|k| resolve_keyring(k, &mut errors));
    let cache = resolve_cache(cache.unwrap_or_default(), &mut errors);

    let backends = resolve_backends(table.get("backend"), &mut errors);
    let backend_names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
    let access = auth::resolve_access(&table, &backend_names, &mut errors);
    let client_ca = server
        .as_ref()
        .is_some_and(|s| s.0.client_ca_file.is_some());
    let admin = admin.and_then(|a| resolve_admin(a, &access, client_ca, &mut errors));
    let facts = RouteFacts {
        backends: &backend_names,
        default_auth: server.as_ref().and_then(|s| s.1),
        access: &access,
        client_ca,
    };

    let mut routes = Vec::new();
    match table.get("route") {
        None => errors.push("no [[route]] defined: the proxy would refuse every request".into()),
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let place = format!("route[{i}]");
                match item.clone().try_into::<FileRoute>() {
                    Ok(r) => {
                        if let Some(route) = resolve_route(&place, r, &facts, &mut errors) {
                            routes.push(route);
                        }
                    }
                    Err(e) => errors.push(format!("{place}: {}", e.message())),
                }
            }
        }
        Some(_) => errors.push("route: use [[route]] (an array of tables)".into()),
    }
    let mut names = std::collections::HashSet::new();
    for r in &routes {
        if !names.insert(r.name.clone()) {
            errors.push(format!("route {:?}: the name is used twice", r.name));
        }
    }
    check_shadowing(&routes, &mut errors);
    check_vault_exposure(&routes, &mut errors);
    if keyring_missing {
        check_stateless(
            &routes,
            &access,
            admin.as_ref(),
            audit.as_ref(),
            &mut errors,
        );
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    match (server, keyring.is_some() || keyring_missing) {
        (Some((server, _)), true) => Ok(Config {
            server,
            access,
            admin,
            keyring,
            backends,
            cache,
            audit_checkpoint_every: audit
                .as_ref()
                .and_then(|a| a.checkpoint_every)
                .unwrap_or(1000),
            audit_key: audit
                .as_ref()
                .and_then(|a| a.key_file.clone())
                .map(SecretSource::File),
            audit_path: audit.map(|a| a.path),
            demo_store,
            routes,
        }),
        _ => Err(ConfigErrors(vec!["incomplete configuration".into()])),
    }
}

/// Without `[keyring]` (a stateless pod, keys on remote backends), whatever needs the keyring
/// is refused, each with its fix: routes on local keys, the admin API (it manages the local
/// keyring), an audit chain without its own key, grants without their own file and key.
fn check_stateless(
    routes: &[Route],
    access: &Access,
    admin: Option<&AdminSettings>,
    audit: Option<&FileAudit>,
    errors: &mut Vec<String>,
) {
    for r in routes {
        for k in r.kind.keys() {
            if k.backend == KeyRef::DEFAULT_BACKEND {
                errors.push(format!(
                    "route {:?}: key {:?} is in the local keyring, and there is no [keyring] \
                     section: add [keyring] (path, master_key_file) or use a key on a configured \
                     backend (e.g. \"kms:alias/NAME\")",
                    r.name, k.key_id
                ));
            }
        }
    }
    if admin.is_some_and(|a| a.api_auth.is_some()) {
        errors.push(
            "admin.auth: the admin API manages the local keyring, and there is no [keyring] \
             section: add [keyring] or remove admin.auth"
                .into(),
        );
    }
    if let Some(a) = audit
        && a.key_file.is_none()
    {
        errors.push(
            "audit.key_file: without [keyring] the audit chain's key cannot come from the master \
             key: set audit.key_file (a secret of 32+ characters, mode 0600)"
                .into(),
        );
    }
    let g = &access.grants;
    match (&g.path, &g.token_key) {
        (None, None) | (Some(_), Some(_)) => {}
        (None, Some(_)) => errors.push(
            "grants.path: without [keyring] the grants file has no default place: set \
             grants.path (or remove [grants]: no grants)"
                .into(),
        ),
        (Some(_), None) => errors.push(
            "grants.token_key_file: without [keyring] the grants' key cannot come from the \
             master key: set grants.token_key_file (or remove [grants]: no grants)"
                .into(),
        ),
    }
}

/// First match wins: a pass-through route before an encrypting one whose paths it can also
/// match (ignoring case, as stores route) takes those requests, in clear; an S3 route before
/// a JSON route would store its bodies as opaque objects. Refused unless the earlier route
/// says `dangerous_shadows_encrypted_routes = true`. A catch-all after the encrypting routes
/// is the safe way to write "encrypt these, pass the rest".
fn check_shadowing(routes: &[Route], errors: &mut Vec<String>) {
    for (i, a) in routes.iter().enumerate() {
        if a.dangerous_shadows_encrypted_routes {
            continue;
        }
        for b in &routes[i + 1..] {
            let shadows = matches!(
                (&a.kind, &b.kind),
                (
                    RouteKind::Passthrough,
                    RouteKind::JsonFields(_) | RouteKind::S3(_)
                ) | (RouteKind::S3(_), RouteKind::JsonFields(_))
            );
            if shadows && a.pattern.intersects(&b.pattern) {
                errors.push(format!(
                    "route {:?}.path: {:?} comes before the encrypting route {:?} ({:?}) and \
                     matches some of the same paths, which would then not be encrypted; move it \
                     after, narrow it, or set dangerous_shadows_encrypted_routes = true",
                    a.name,
                    a.pattern.source(),
                    b.name,
                    b.pattern.source()
                ));
            }
        }
    }
}

/// A REST key vault lives on a store the proxy forwards to: a route that would forward a
/// client's request to the vault's paths (a catch-all pass-through, say) lets clients delete
/// or replace data-key records, and with them every value under those keys. Refused.
fn check_vault_exposure(routes: &[Route], errors: &mut Vec<String>) {
    const SAMPLE_ID: &str = "0123456789abcdef0123456789abcdef";
    for v in routes {
        let RouteKind::JsonFields(JsonRoute {
            key_vault: Some(KeyVault::Rest { path, .. }),
            ..
        }) = &v.kind
        else {
            continue;
        };
        let record = format!(
            "{}{}",
            v.upstream.base_path,
            path.replace("{id}", SAMPLE_ID)
        );
        let collection = format!(
            "{}{}",
            v.upstream.base_path,
            path.strip_suffix("/{id}").unwrap_or(path)
        );
        for r in routes {
            let same_store = r.upstream.scheme == v.upstream.scheme
                && r.upstream
                    .authority
                    .as_str()
                    .eq_ignore_ascii_case(v.upstream.authority.as_str());
            if !same_store {
                continue;
            }
            let reaches = [&record, &collection].into_iter().any(|upstream_path| {
                upstream_path
                    .strip_prefix(&r.upstream.base_path)
                    .filter(|p| p.starts_with('/'))
                    .is_some_and(|p| {
                        r.pattern.matches(p).is_some()
                            || r.pattern.matches(&p.to_ascii_uppercase()).is_some()
                    })
            });
            if reaches {
                errors.push(format!(
                    "route {:?}.path: {:?} forwards requests to the key vault of route {:?} ({path:?} on the same store): clients could delete or replace data-key records; narrow the route or move the vault",
                    r.name,
                    r.pattern.source(),
                    v.name
                ));
            }
        }
    }
}

fn section<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
    errors: &mut Vec<String>,
    required: bool,
) -> Option<T> {
    match table.get(name) {
        None => {
            if required {
                errors.push(format!("[{name}] section is missing"));
            }
            None
        }
        Some(v) => match v.clone().try_into::<T>() {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("{name}: {}", e.message()));
                None
            }
        },
    }
}

/// The admin endpoints have no other protection than where they listen: anything but a
/// loopback address needs a bearer token file.
///
/// The admin API (`auth`) needs an authenticated caller: `jwt` (an `[auth.jwt]` section),
/// `mtls` (`[server] tls` with `client_ca_file`; the admin listener then speaks TLS with the
/// server's certificate), or `none` on a loopback address only.
fn resolve_admin(
    a: FileAdmin,
    access: &Access,
    client_ca: bool,
    errors: &mut Vec<String>,
) -> Option<AdminSettings> {
    let listen = socket_addr("admin.listen", &a.listen, errors)?;
    let api_auth = match a.auth.as_deref() {
        None => None,
        Some(s) => match RouteAuth::parse(s) {
            Some(RouteAuth::None) if !listen.ip().is_loopback() => {
                errors.push(format!(
                    "admin.auth: \"none\" would let anyone who reaches {listen} manage keys and \
                     grants; use \"jwt\" or \"mtls\", or bind the admin listener to 127.0.0.1"
                ));
                None
            }
            Some(RouteAuth::Jwt) if access.auth.jwt.is_none() => {
                errors.push("admin.auth: \"jwt\" needs an [auth.jwt] section".into());
                None
            }
            Some(RouteAuth::Mtls) if !client_ca => {
                errors.push("admin.auth: \"mtls\" needs [server] tls with client_ca_file".into());
                None
            }
            Some(m @ (RouteAuth::None | RouteAuth::Jwt | RouteAuth::Mtls)) => Some(m),
            _ => {
                errors.push(format!(
                    "admin.auth: {s:?} is not one of \"jwt\", \"mtls\", \"none\""
                ));
                None
            }
        },
    };
    if !listen.ip().is_loopback() && a.token_file.is_none() {
        errors.push(format!(
            "admin.listen: {listen} is not a loopback address and the admin endpoints would be \
             open to the network; bind 127.0.0.1 (or ::1), or set admin.token_file to a bearer \
             token file (mode 0600)"
        ));
        return None;
    }
    Some(AdminSettings {
        listen,
        token: a.token_file.map(SecretSource::File),
        api_auth,
    })
}

fn socket_addr(place: &str, s: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(format!(
                "{place}: {s:?} is not an address like 127.0.0.1:8080"
            ));
            None
        }
    }
}

/// The longest `[server] unix_socket` path accepted: the kernel's 107 bytes less what binding
/// in a private directory beside it adds (`/.xxxxxx/s` in place of the file name).
pub const UNIX_SOCKET_MAX_LEN: usize = 96;

fn resolve_server(s: FileServer, errors: &mut Vec<String>) -> (ServerSettings, Option<RouteAuth>) {
    let auth = s.auth.as_deref().and_then(|a| match RouteAuth::parse(a) {
        Some(RouteAuth::SigV4) | None => {
            errors.push(format!(
                "server.auth: {a:?} is not one of \"none\", \"mtls\", \"jwt\", \"trusted-header\""
            ));
            None
        }
        some => some,
    });
    let listen = match &s.listen {
        Some(l) => socket_addr("server.listen", l, errors),
        None => {
            if s.unix_socket.is_none() {
                errors.push("server.listen: required (unless unix_socket is set)".into());
            }
            None
        }
    };
    let positive = |place: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>| match v {
        Some(0) => {
            errors.push(format!("{place}: must be greater than 0"));
            default
        }
        Some(v) => v,
        None => default,
    };
    let max_json_depth = match s.max_json_depth {
        Some(d) if d == 0 || d > 128 => {
            errors.push("server.max_json_depth: must be between 1 and 128".into());
            64
        }
        Some(d) => d,
        None => 64,
    };
    let client_ca_file = s.tls.as_ref().and_then(|t| t.client_ca_file.clone());
    let unix_socket_mode = match s.unix_socket_mode.as_deref() {
        None => 0o600,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 && v & 0o007 == 0 => v,
            _ => {
                errors.push(format!(
                    "server.unix_socket_mode: {m:?} must be octal permissions without access for others, like \"0600\" or \"0660\""
                ));
                0o600
            }
        },
    };
    if let Some(f) = &s.log_format
        && !matches!(f.trim(), "text" | "json")
    {
        errors.push(format!(
            "server.log_format: {f:?} is not \"text\" or \"json\""
        ));
    }
    if let Some(e) = &s.otlp_endpoint
        && !e.trim().is_empty()
        && !crate::telemetry::valid_endpoint(e.trim())
    {
        errors.push(format!(
            "server.otlp_endpoint: {e:?} is not an http(s) URL (e.g. \"http://otel-collector:4318/v1/traces\")"
        ));
    }
    if s.unix_socket_mode.is_some() && s.unix_socket.is_none() {
        errors.push("server.unix_socket_mode: only with unix_socket".into());
    }
    if let Some(p) = &s.unix_socket {
        // The kernel takes 107 bytes; the proxy binds first in a private directory beside the
        // path (a few bytes longer), so that the socket is never open with the umask's mode.
        let len = p.as_os_str().len();
        if len == 0 || len > UNIX_SOCKET_MAX_LEN {
            errors.push(format!(
                "server.unix_socket: {} must be a path of 1 to {UNIX_SOCKET_MAX_LEN} bytes",
                p.display()
            ));
        }
    }
    // A bounded value or the default; out of range is a config error naming the range.
    let bounded = |place: &str,
                   v: Option<u64>,
                   default: u64,
                   range: std::ops::RangeInclusive<u64>,
                   errors: &mut Vec<String>| match v {
        Some(v) if !range.contains(&v) => {
            errors.push(format!(
                "server.{place}: must be between {} and {}",
                range.start(),
                range.end()
            ));
            default
        }
        Some(v) => v,
        None => default,
    };
    let defaults = ListenerLimits::default();
    let limits = ListenerLimits {
        header_read_timeout: Duration::from_millis(bounded(
            "header_read_timeout_ms",
            s.header_read_timeout_ms,
            defaults.header_read_timeout.as_millis() as u64,
            100..=300_000,
            errors,
        )),
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        max_header_bytes: bounded(
            "max_header_bytes",
            s.max_header_bytes,
            defaults.max_header_bytes as u64,
            8192..=1 << 20,
            errors,
        ) as usize,
        max_connections: bounded(
            "max_connections",
            s.max_connections,
            defaults.max_connections as u64,
            1..=1_000_000,
            errors,
        ) as usize,
        max_requests: bounded(
            "max_requests",
            s.max_requests,
            defaults.max_requests as u64,
            1..=1_000_000,
            errors,
        ) as usize,
        h2_keepalive_interval: Duration::from_millis(bounded(
            "h2_keepalive_interval_ms",
            s.h2_keepalive_interval_ms,
            defaults.h2_keepalive_interval.as_millis() as u64,
            0..=3_600_000,
            errors,
        )),
        h2_keepalive_timeout: Duration::from_millis(bounded(
            "h2_keepalive_timeout_ms",
            s.h2_keepalive_timeout_ms,
            defaults.h2_keepalive_timeout.as_millis() as u64,
            100..=600_000,
            errors,
        )),
    };
    let shutdown_delay = Duration::from_millis(bounded(
        "shutdown_delay_ms",
        s.shutdown_delay_ms,
        0,
        0..=300_000,
        errors,
    ));
    let drain_timeout = Duration::from_millis(bounded(
        "drain_timeout_ms",
        s.drain_timeout_ms,
        25_000,
        0..=3_600_000,
        errors,
    ));
    let readiness_interval = Duration::from_millis(bounded(
        "readiness_interval_ms",
        s.readiness_interval_ms,
        5_000,
        100..=3_600_000,
        errors,
    ));
    let readiness_failures = bounded(
        "readiness_failures",
        s.readiness_failures,
        3,
        1..=100,
        errors,
    ) as u32;
    let config_poll = Duration::from_millis(bounded(
        "config_poll_ms",
        s.config_poll_ms,
        2_000,
        0..=3_600_000,
        errors,
    ));
    let settings = ServerSettings {
        config_poll,
        readiness_interval,
        readiness_failures,
        limits,
        shutdown_delay,
        drain_timeout,
        unix_socket: s.unix_socket,
        unix_socket_mode,
        listen,
        client_ca_file,
        tls: s.tls.map(|t| (t.cert_file, t.key_file)),
        max_body_bytes: positive("server.max_body_bytes", s.max_body_bytes, 1 << 20, errors),
        max_response_bytes: positive(
            "server.max_response_bytes",
            s.max_response_bytes,
            16 << 20,
            errors,
        ),
        max_json_depth,
        upstream_timeout: Duration::from_millis(positive(
            "server.upstream_timeout_ms",
            s.upstream_timeout_ms,
            30_000,
            errors,
        )),
        connect_timeout: Duration::from_millis(positive(
            "server.connect_timeout_ms",
            s.connect_timeout_ms,
            5_000,
            errors,
        )),
        upstream_ca_file: s.upstream_ca_file,
    };
    (settings, auth)
}

fn resolve_keyring(k: FileKeyring, errors: &mut Vec<String>) -> Option<KeyringSettings> {
    let master_key = match (k.master_key_file, k.master_key_env) {
        (Some(f), None) => MasterKeySource::File(f),
        (None, Some(e)) => MasterKeySource::Env(e),
        (Some(_), Some(_)) => {
            errors.push("keyring: set master_key_file or master_key_env, not both".into());
            return None;
        }
        (None, None) => {
            errors.push("keyring: master_key_file or master_key_env is required".into());
            return None;
        }
    };
    Some(KeyringSettings {
        path: k.path,
        master_key,
        create_missing_keys: k.create_missing_keys,
    })
}

fn resolve_cache(c: FileCache, errors: &mut Vec<String>) -> CacheLimits {
    let d = CacheLimits::default();
    let mut check = |place: &str, v: Option<u64>| {
        if v == Some(0) {
            errors.push(format!("cache.{place}: must be greater than 0"));
        }
        v.filter(|v| *v > 0)
    };
    CacheLimits {
        max_age: check("max_age_secs", c.max_age_secs)
            .map(Duration::from_secs)
            .unwrap_or(d.max_age),
        max_messages: check("max_messages", c.max_messages).unwrap_or(d.max_messages),
        max_bytes: check("max_bytes", c.max_bytes).unwrap_or(d.max_bytes),
        max_entries: check("max_entries", c.max_entries).unwrap_or(d.max_entries),
        open_ttl: check("open_ttl_secs", c.open_ttl_secs)
            .map(Duration::from_secs)
            .unwrap_or(d.open_ttl),
    }
}

fn resolve_upstream(place: &str, s: &str, errors: &mut Vec<String>) -> Option<Upstream> {
    let uri: http::Uri = match s.parse() {
        Ok(u) => u,
        Err(_) => {
            errors.push(format!("{place}.upstream: {s:?} is not a URL"));
            return None;
        }
    };
    let scheme = uri.scheme().cloned();
    let authority = uri.authority().cloned();
    match (scheme, authority) {
        (Some(scheme), Some(authority))
            if scheme == http::uri::Scheme::HTTP || scheme == http::uri::Scheme::HTTPS =>
        {
            if uri.query().is_some() {
                errors.push(format!("{place}.upstream: must not have a query string"));
            }
            Some(Upstream {
                scheme,
                authority,
                base_path: uri.path().trim_end_matches('/').to_string(),
            })
        }
        _ => {
            errors.push(format!(
                "{place}.upstream: {s:?} must be an http:// or https:// URL"
            ));
            None
        }
    }
}

fn resolve_backends(value: Option<&toml::Value>, errors: &mut Vec<String>) -> Vec<BackendConfig> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(table) = value.as_table() else {
        errors.push("backend: use [backend.NAME] tables".into());
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, v) in table {
        let place = format!("backend.{name}");
        if name == KeyRef::DEFAULT_BACKEND {
            errors.push(format!(
                "{place}: \"local\" is the embedded keyring ([keyring]); choose another name"
            ));
            continue;
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            errors.push(format!("{place}: names use A-Z a-z 0-9 - _"));
            continue;
        }
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let resolved = match kind {
            "aws-kms" => match v.clone().try_into::<FileKmsBackend>() {
                Ok(k) => {
                    if let Some(ep) = &k.endpoint {
                        check_kms_endpoint(&place, ep, errors);
                    }
                    if k.credentials_file.is_some() && k.profile.is_none() {
                        errors.push(format!("{place}.credentials_file: also set profile"));
                    }
                    Some((
                        BackendKind::AwsKms(KmsSettings {
                            region: k.region,
                            endpoint: k.endpoint,
                            profile: k.profile,
                            credentials_file: k.credentials_file,
                        }),
                        resilience_of!(k),
                    ))
                }
                Err(e) => {
                    errors.push(format!("{place}: {}", e.message()));
                    None
                }
            },
            "pkcs11" => match v.clone().try_into::<FilePkcs11Backend>() {
                Ok(p) => {
                    let resilience = resilience_of!(p);
                    let pin = match (p.pin_file, p.pin_env) {
                        (Some(f), None) => Some(SecretSource::File(f)),
                        (None, Some(e)) => Some(SecretSource::Env(e)),
                        _ => {
                            errors.push(format!("{place}: set exactly one of pin_file, pin_env (the PIN never goes in the config)"));
                            None
                        }
                    };
                    let sessions = p.sessions.unwrap_or(4);
                    if sessions == 0 || sessions > 256 {
                        errors.push(format!("{place}.sessions: must be between 1 and 256"));
                    }
                    pin.map(|pin| {
                        (
                            BackendKind::Pkcs11(Pkcs11Settings {
                                module: p.module,
                                token_label: p.token_label,
                                pin,
                                sessions,
                            }),
                            resilience,
                        )
                    })
                }
                Err(e) => {
                    errors.push(format!("{place}: {}", e.message()));
                    None
                }
            },
            "embedded" => match v.clone().try_into::<FileEmbeddedBackend>() {
                Ok(_) => Some((
                    BackendKind::Embedded,
                    FileResilience {
                        call_timeout_ms: None,
                        retries: None,
                        failure_threshold: None,
                        open_for_secs: None,
                    },
                )),
                Err(e) => {
                    errors.push(format!("{place}: {}", e.message()));
                    None
                }
            },
            "" => {
                errors.push(format!(
                    "{place}.kind: missing (\"aws-kms\", \"pkcs11\" or \"embedded\")"
                ));
                None
            }
            other => {
                errors.push(format!(
                    "{place}.kind: {other:?} is not one of \"aws-kms\", \"pkcs11\", \"embedded\""
                ));
                None
            }
        };
        if let Some((kind, r)) = resolved {
            let d = ResilienceSettings::default();
            out.push(BackendConfig {
                name: name.clone(),
                kind,
                resilience: ResilienceSettings {
                    call_timeout: r
                        .call_timeout_ms
                        .map(Duration::from_millis)
                        .unwrap_or(d.call_timeout),
                    retries: r.retries.unwrap_or(d.retries).min(10),
                    backoff: d.backoff,
                    failure_threshold: r.failure_threshold.unwrap_or(d.failure_threshold).max(1),
                    open_for: r
                        .open_for_secs
                        .map(Duration::from_secs)
                        .unwrap_or(d.open_for),
                },
            });
        }
    }
    out
}

/// A KMS endpoint must be https, except on loopback (the test peer, a local tunnel).
fn check_kms_endpoint(place: &str, endpoint: &str, errors: &mut Vec<String>) {
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        errors.push(format!("{place}.endpoint: {endpoint:?} is not a URL"));
        return;
    };
    let host = uri
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        Some("http") => errors.push(format!(
            "{place}.endpoint: plain http:// is only accepted for loopback addresses; use https://"
        )),
        _ => errors.push(format!("{place}.endpoint: must be an https:// URL")),
    }
}

fn resolve_keys(
    place: &str,
    key: Option<String>,
    keys: Option<Vec<String>>,
    backends: &[&str],
    errors: &mut Vec<String>,
) -> Vec<KeyRef> {
    let key_strings = match (key, keys) {
        (Some(k), None) => vec![k],
        (None, Some(ks)) if !ks.is_empty() => ks,
        (None, Some(_)) => {
            errors.push(format!("{place}.keys: must list at least one key"));
            vec![]
        }
        (Some(_), Some(_)) => {
            errors.push(format!("{place}: set key or keys, not both"));
            vec![]
        }
        (None, None) => {
            errors.push(format!(
                "{place}: needs key (or keys) to encrypt with; for a route without encryption set passthrough = true"
            ));
            vec![]
        }
    };
    let mut keys = Vec::new();
    for (i, k) in key_strings.iter().enumerate() {
        match KeyRef::parse(k) {
            Some(kr) if kr.backend == KeyRef::DEFAULT_BACKEND => {
                match keys::validate_key_name(&kr.key_id) {
                    Ok(()) => keys.push(kr),
                    Err(e) => errors.push(format!("{place}.keys[{i}]: {e}")),
                }
            }
            Some(kr) if backends.contains(&kr.backend.as_str()) => keys.push(kr),
            Some(kr) => errors.push(format!(
                "{place}.keys[{i}]: unknown backend {:?} (configured: local{})",
                kr.backend,
                backends
                    .iter()
                    .map(|b| format!(", {b}"))
                    .collect::<String>()
            )),
            None => errors.push(format!(
                "{place}.keys[{i}]: {k:?} is not a key reference like \"name\" or \"backend:key\""
            )),
        }
    }
    keys
}

fn secret_source(
    place: &str,
    what: &str,
    env: Option<String>,
    file: Option<PathBuf>,
    errors: &mut Vec<String>,
) -> Option<SecretSource> {
    match (env, file) {
        (Some(e), None) => Some(SecretSource::Env(e)),
        (None, Some(f)) => Some(SecretSource::File(f)),
        _ => {
            errors.push(format!(
                "{place}: set exactly one of {what}_env, {what}_file"
            ));
            None
        }
    }
}

struct ResolvedS3 {
    region: String,
    suffixes: Vec<String>,
    path_style_hosts: Vec<String>,
    clear_metadata: ClearMetadata,
    refuse_unbound_objects: bool,
    upstream_checksum: bool,
    ak: SecretSource,
    sk: SecretSource,
    clients: Vec<S3ClientConfig>,
}

/// Host names in `path_style_hosts` and `virtual_host_suffixes`: DNS names, no port, no
/// scheme (matched case-insensitively against the Host header without its port).
fn check_host_names(place: &str, what: &str, names: &[String], errors: &mut Vec<String>) {
    for n in names {
        let ok = !n.is_empty()
            && !n.starts_with('.')
            && !n.ends_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !ok {
            errors.push(format!(
                "{place}.{what}: {n:?} is not a host name (like s3.example.com, without port)"
            ));
        }
    }
}

fn resolve_s3(place: &str, s3: FileS3, errors: &mut Vec<String>) -> Option<ResolvedS3> {
    let place = format!("{place}.s3");
    let ak = secret_source(
        &place,
        "upstream_access_key_id",
        s3.upstream_access_key_id_env,
        s3.upstream_access_key_id_file,
        errors,
    );
    let sk = secret_source(
        &place,
        "upstream_secret_access_key",
        s3.upstream_secret_access_key_env,
        s3.upstream_secret_access_key_file,
        errors,
    );
    let mut clients = Vec::new();
    for (i, c) in s3.client.into_iter().enumerate() {
        let secret = secret_source(
            &place,
            &format!("client[{i}].secret_access_key"),
            c.secret_access_key_env,
            c.secret_access_key_file,
            errors,
        );
        if c.access_key_id.is_empty() || c.identity.is_empty() {
            errors.push(format!(
                "{place}.client[{i}]: access_key_id and identity must not be empty"
            ));
        }
        if let Some(secret_access_key) = secret {
            clients.push(S3ClientConfig {
                access_key_id: c.access_key_id,
                secret_access_key,
                identity: c.identity,
                attributes: c.attributes,
            });
        }
    }
    if clients.is_empty() {
        errors.push(format!(
            "{place}: list at least one [[route.s3.client]] allowed to call the proxy"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &clients {
        if !seen.insert(c.access_key_id.clone()) {
            errors.push(format!(
                "{place}.client: access key {} is listed twice",
                c.access_key_id
            ));
        }
    }
    check_host_names(
        &place,
        "virtual_host_suffixes",
        &s3.virtual_host_suffixes,
        errors,
    );
    check_host_names(&place, "path_style_hosts", &s3.path_style_hosts, errors);
    let clear_metadata = match s3.clear_metadata.as_deref() {
        None | Some("allow") => ClearMetadata::Allow,
        Some("refuse") => ClearMetadata::Refuse,
        Some(other) => {
            errors.push(format!(
                "{place}.clear_metadata: {other:?} is not one of \"allow\", \"refuse\""
            ));
            ClearMetadata::Allow
        }
    };
    Some(ResolvedS3 {
        region: s3.region,
        suffixes: s3.virtual_host_suffixes,
        path_style_hosts: s3.path_style_hosts,
        clear_metadata,
        refuse_unbound_objects: s3.refuse_unbound_objects,
        upstream_checksum: s3.upstream_checksum.unwrap_or(true),
        ak: ak?,
        sk: sk?,
        clients,
    })
}

/// What route resolution needs from the rest of the file.
struct RouteFacts<'a> {
    backends: &'a [&'a str],
    default_auth: Option<RouteAuth>,
    access: &'a Access,
    client_ca: bool,
}

/// A route's `auth`: its own, else the listener's; S3 routes authenticate with SigV4. The
/// authenticator it names must be configured.
fn route_auth(
    place: &str,
    own: Option<&str>,
    s3: bool,
    facts: &RouteFacts,
    errors: &mut Vec<String>,
) -> RouteAuth {
    let auth = match own.map(|a| (a, RouteAuth::parse(a))) {
        Some((_, Some(a))) => a,
        Some((a, None)) => {
            errors.push(format!(
                "{place}.auth: {a:?} is not one of \"none\", \"mtls\", \"jwt\", \"trusted-header\", \"sigv4\""
            ));
            return RouteAuth::None;
        }
        None if s3 => RouteAuth::SigV4,
        None => match facts.default_auth {
            Some(a) => a,
            None => {
                errors.push(format!(
                    "{place}.auth: not set; say how clients authenticate (\"jwt\", \"mtls\", \"trusted-header\"), \
                     or auth = \"none\" for a route only trusted callers can reach (here or as [server] auth)"
                ));
                return RouteAuth::None;
            }
        },
    };
    match auth {
        RouteAuth::SigV4 if !s3 => {
            errors.push(format!("{place}.auth: \"sigv4\" is for kind = \"s3\" routes"))
        }
        a if s3 && a != RouteAuth::SigV4 => errors.push(format!(
            "{place}.auth: S3 routes authenticate clients by SigV4 ([[route.s3.client]]); {:?} is not available there",
            a.name()
        )),
        RouteAuth::Jwt if facts.access.auth.jwt.is_none() => {
            errors.push(format!("{place}.auth: \"jwt\" needs an [auth.jwt] section"))
        }
        RouteAuth::Mtls if !facts.client_ca => errors.push(format!(
            "{place}.auth: \"mtls\" needs [server] tls with client_ca_file"
        )),
        RouteAuth::TrustedHeader if facts.access.auth.trusted_header.is_none() => errors.push(
            format!("{place}.auth: \"trusted-header\" needs an [auth.trusted_header] section"),
        ),
        _ => {}
    }
    auth
}

/// Principal sources must be there to read: `claim.*` only on JWT routes, none on
/// `auth = "none"` routes.
fn check_principal_sources<'t>(
    place: &str,
    auth: RouteAuth,
    templates: impl Iterator<Item = &'t Template>,
    errors: &mut Vec<String>,
) {
    for t in templates {
        for s in t.sources() {
            match s {
                Source::Claim(_) if auth != RouteAuth::Jwt => errors.push(format!(
                    "{place}: {s} is only known on routes with auth = \"jwt\""
                )),
                Source::Identity | Source::Principal(_) if auth == RouteAuth::None => {
                    errors.push(format!(
                        "{place}: {s} is unknown on a route with auth = \"none\" (nobody is authenticated)"
                    ))
                }
                _ => {}
            }
        }
    }
}

fn resolve_route(
    place: &str,
    r: FileRoute,
    facts: &RouteFacts,
    errors: &mut Vec<String>,
) -> Option<Route> {
    let backends = facts.backends;
    let before = errors.len();
    let place = format!("{place} ({:?})", r.name);
    let auth = route_auth(
        &place,
        r.auth.as_deref(),
        r.kind.as_deref() == Some("s3"),
        facts,
        errors,
    );
    let require = auth::parse_requirements(&place, r.require.clone(), errors);
    for q in &require {
        match &q.subject {
            Source::S3Bucket if r.kind.as_deref() != Some("s3") => errors.push(format!(
                "{place}.require: s3.bucket is only known on kind = \"s3\" routes"
            )),
            Source::Json(_) => errors.push(format!(
                "{place}.require: json.* is not known before the body is read"
            )),
            _ => {}
        }
    }
    check_principal_sources(
        &format!("{place}.require"),
        auth,
        require.iter().map(|q| &q.equals),
        errors,
    );
    if !require.is_empty() && auth == RouteAuth::None {
        errors.push(format!(
            "{place}.require: nobody is authenticated on an auth = \"none\" route"
        ));
    }
    let quota = match r.quota.clone() {
        Some(q) => auth::resolve_quota(&format!("{place}.quota"), q, errors),
        None => facts.access.quota,
    };
    if r.name.is_empty() {
        errors.push(format!("{place}.name: must not be empty"));
    }
    let pattern = PathPattern::parse(&r.path)
        .map_err(|e| errors.push(format!("{place}.path: {e}")))
        .ok();
    for q in &require {
        if let Source::Path(n) = &q.subject
            && pattern.as_ref().is_some_and(|p| !p.has_capture(n))
        {
            errors.push(format!(
                "{place}.require: path.{n} is not a capture of the route's path pattern"
            ));
        }
    }
    let upstream = resolve_upstream(&place, &r.upstream, errors);

    match r.kind.as_deref() {
        None | Some("json") => {
            if r.s3.is_some() {
                errors.push(format!("{place}.s3: only for kind = \"s3\" routes"));
            }
            if r.dangerous_allow_plaintext_reads {
                errors.push(format!(
                    "{place}.dangerous_allow_plaintext_reads: only for kind = \"s3\" routes"
                ));
            }
        }
        Some("s3") => {
            // The gateway sends `/bucket/key` to the storage as it is: under a path prefix,
            // the storage would read `/prefix/bucket` as an object of bucket `prefix`, and a
            // bucket-level request's body would be stored there, in clear.
            if let Some(u) = &upstream
                && !u.base_path.is_empty()
            {
                errors.push(format!(
                    "{place}.upstream: an S3 upstream is the storage's endpoint, without a path \
                     (got {:?}); buckets are named by the clients' requests",
                    u.base_path
                ));
            }
            let keys = resolve_keys(&place, r.key, r.keys, backends, errors);
            let key_context = parse_templates(
                &format!("{place}.context"),
                &r.context,
                pattern.as_ref(),
                Kind::S3,
                errors,
            );
            check_principal_sources(
                &format!("{place}.context"),
                auth,
                key_context.iter().map(|(_, t)| t),
                errors,
            );
            for (what, set) in [
                ("mask", !r.mask.is_empty()),
                ("fields", !r.fields.is_empty()),
                ("response_documents", !r.response_documents.is_empty()),
                ("message_context", !r.message_context.is_empty()),
                ("on_decrypt_error", r.on_decrypt_error.is_some()),
                ("case_insensitive_upstream", r.case_insensitive_upstream),
                ("dangerous_opaque_responses", r.dangerous_opaque_responses),
                ("passthrough", r.passthrough),
                ("allow_query_params", !r.allow_query_params.is_empty()),
                ("token_format", r.token_format.is_some()),
                ("key_vault", r.key_vault.is_some()),
            ] {
                if set {
                    errors.push(format!("{place}.{what}: not used on kind = \"s3\" routes (whole object bodies are encrypted)"));
                }
            }
            let s3 = match r.s3 {
                Some(s3) => resolve_s3(&place, s3, errors),
                None => {
                    errors.push(format!("{place}: kind = \"s3\" needs a [route.s3] table (region, credentials, clients)"));
                    None
                }
            };
            return match (errors.len() == before, s3) {
                (true, Some(s3)) => Some(Route {
                    name: r.name,
                    pattern: pattern.expect("checked"),
                    upstream: upstream.expect("checked"),
                    dangerous_shadows_encrypted_routes: r.dangerous_shadows_encrypted_routes,
                    auth,
                    require,
                    quota,
                    kind: RouteKind::S3(S3RouteConfig {
                        keys,
                        key_context,
                        region: s3.region,
                        virtual_host_suffixes: s3.suffixes,
                        path_style_hosts: s3.path_style_hosts,
                        clear_metadata: s3.clear_metadata,
                        refuse_unbound_objects: s3.refuse_unbound_objects,
                        upstream_checksum: s3.upstream_checksum,
                        upstream_access_key_id: s3.ak,
                        upstream_secret_access_key: s3.sk,
                        clients: s3.clients,
                        dangerous_allow_plaintext_reads: r.dangerous_allow_plaintext_reads,
                    }),
                }),
                _ => None,
            };
        }
        Some(other) => {
            errors.push(format!(
                "{place}.kind: {other:?} is not one of \"json\", \"s3\""
            ));
            return None;
        }
    }

    if r.passthrough {
        for (set, what) in [
            (r.key.is_some() || r.keys.is_some(), "key/keys"),
            (!r.fields.is_empty(), "fields"),
            (!r.response_documents.is_empty(), "response_documents"),
            (!r.context.is_empty(), "context"),
            (!r.message_context.is_empty(), "message_context"),
            (r.on_decrypt_error.is_some(), "on_decrypt_error"),
            (r.case_insensitive_upstream, "case_insensitive_upstream"),
            (r.dangerous_opaque_responses, "dangerous_opaque_responses"),
            (!r.allow_query_params.is_empty(), "allow_query_params"),
            (!r.mask.is_empty(), "mask"),
            (r.token_format.is_some(), "token_format"),
            (r.key_vault.is_some(), "key_vault"),
        ] {
            if set {
                errors.push(format!(
                    "{place}: passthrough = true cannot be combined with {what}"
                ));
            }
        }
        return (errors.len() == before).then(|| Route {
            name: r.name,
            pattern: pattern.expect("checked"),
            upstream: upstream.expect("checked"),
            kind: RouteKind::Passthrough,
            dangerous_shadows_encrypted_routes: r.dangerous_shadows_encrypted_routes,
            auth,
            require,
            quota,
        });
    }

    if r.dangerous_shadows_encrypted_routes {
        errors.push(format!(
            "{place}.dangerous_shadows_encrypted_routes: only for pass-through and S3 routes"
        ));
    }
    let keys = resolve_keys(&place, r.key, r.keys, backends, errors);
    if r.fields.is_empty() {
        errors.push(format!(
            "{place}.fields: list at least one JSONPath to encrypt; for a route without encryption set passthrough = true"
        ));
    }
    let fields = parse_paths(&format!("{place}.fields"), &r.fields, errors);
    let documents = parse_paths(
        &format!("{place}.response_documents"),
        &r.response_documents,
        errors,
    );

    let key_context = parse_templates(
        &format!("{place}.context"),
        &r.context,
        pattern.as_ref(),
        Kind::JsonKey,
        errors,
    );
    let message_context = parse_templates(
        &format!("{place}.message_context"),
        &r.message_context,
        pattern.as_ref(),
        Kind::JsonMessage,
        errors,
    );
    check_principal_sources(
        &format!("{place}.context"),
        auth,
        key_context
            .iter()
            .chain(message_context.iter())
            .map(|(_, t)| t),
        errors,
    );
    let mut masks = vec![Mask::Null; fields.len()];
    for (path, m) in r.mask.clone() {
        let at = format!("{place}.mask.{path:?}");
        let Some(mask) = auth::parse_mask(&at, m, errors) else {
            continue;
        };
        match fields.iter().position(|f| f.source() == path) {
            Some(i) => masks[i] = mask,
            None => errors.push(format!("{at}: not one of the route's fields")),
        }
    }
    if masks.contains(&Mask::Hash) && facts.access.masking.hash_key.is_none() {
        errors.push(format!(
            "{place}.mask: \"hash\" masks need [masking] hash_key_file"
        ));
    }
    for name in r.context.keys() {
        if r.message_context.contains_key(name) {
            errors.push(format!(
                "{place}.message_context.{name}: already defined in context"
            ));
        }
    }
    // A record id read from the document must not itself be encrypted: it would not be there
    // to read back.
    for (name, t) in &message_context {
        for s in t.sources() {
            if let Source::Json(member) = s {
                let probe = serde_json::json!({ member.clone(): 1 });
                if fields.iter().any(|f| f.matches_any(&probe)) {
                    errors.push(format!(
                        "{place}.message_context.{name}: json.{member} is an encrypted field and cannot be part of the context"
                    ));
                }
            }
        }
    }
    let on_decrypt_error = match r.on_decrypt_error.as_deref() {
        None | Some("error") => OnDecryptError::Error,
        Some("redact") => OnDecryptError::Redact,
        Some(other) => {
            errors.push(format!(
                "{place}.on_decrypt_error: {other:?} is not one of \"error\", \"redact\""
            ));
            OnDecryptError::Error
        }
    };
    let key_vault = r
        .key_vault
        .and_then(|v| resolve_vault(&format!("{place}.key_vault"), v, errors));
    let token_format = match r.token_format.as_deref() {
        None | Some("v1") => TokenFormat::V1,
        Some("v2") => {
            if key_vault.is_none() {
                errors.push(format!(
                    "{place}.token_format: \"v2\" needs a key_vault (where the data-key records live), e.g. [route.key_vault] kind = \"rest\", path = \"/envelope-keys/{{id}}\""
                ));
            }
            TokenFormat::V2
        }
        Some(other) => {
            errors.push(format!(
                "{place}.token_format: {other:?} is not one of \"v1\", \"v2\""
            ));
            TokenFormat::V1
        }
    };
    let vault_label = key_vault
        .as_ref()
        .zip(upstream.as_ref())
        .map(|(v, u)| v.label(u));
    let mut query_names = Vec::new();
    for f in &fields {
        let names = f.last_names();
        if names.is_empty() {
            query_names.push("*".to_string());
        }
        query_names.extend(names.iter().map(|n| pattern::fold(n)));
    }
    query_names.sort();
    query_names.dedup();
    let mut allow_query_params = Vec::new();
    for (i, a) in r.allow_query_params.iter().enumerate() {
        if a.is_empty() {
            errors.push(format!(
                "{place}.allow_query_params[{i}]: must not be empty"
            ));
        }
        allow_query_params.push(pattern::fold(a));
    }
    (errors.len() == before).then(|| Route {
        name: r.name,
        pattern: pattern.expect("checked"),
        upstream: upstream.expect("checked"),
        dangerous_shadows_encrypted_routes: false,
        auth,
        require,
        quota,
        kind: RouteKind::JsonFields(JsonRoute {
            token_format,
            vault_label,
            key_vault,
            keys,
            fields_may_nest: FieldPath::any_may_nest(&fields),
            fields,
            documents,
            key_context,
            message_context,
            on_decrypt_error,
            case_insensitive_upstream: r.case_insensitive_upstream,
            dangerous_opaque_responses: r.dangerous_opaque_responses,
            allow_query_params,
            query_names,
            masks,
        }),
    })
}

fn resolve_vault(place: &str, v: FileVault, errors: &mut Vec<String>) -> Option<KeyVault> {
    let before = errors.len();
    let unused = |errors: &mut Vec<String>, what: &str, set: bool| {
        if set {
            errors.push(format!("{place}.{what}: not used with kind = {:?}", v.kind));
        }
    };
    let out = match v.kind.as_str() {
        "rest" => {
            unused(errors, "dir", v.dir.is_some());
            let create = match v.create.as_deref() {
                None | Some("put") => VaultCreate::Put,
                Some("post") => VaultCreate::Post,
                Some(other) => {
                    errors.push(format!(
                        "{place}.create: {other:?} is not one of \"put\", \"post\""
                    ));
                    VaultCreate::Put
                }
            };
            match v.path {
                Some(path)
                    if path.starts_with('/')
                        && path.ends_with("/{id}")
                        && path.matches('{').count() == 1
                        && path.len() > "/{id}".len()
                        && path.matches('}').count() == 1
                        && !path.contains(['?', '#']) =>
                {
                    Some(KeyVault::Rest { path, create })
                }
                Some(path) => {
                    errors.push(format!(
                        "{place}.path: {path:?} must be an absolute path ending in \"/{{id}}\" with no other placeholder or query, e.g. \"/envelope-keys/{{id}}\""
                    ));
                    None
                }
                None => {
                    errors.push(format!(
                        "{place}.path: a REST vault needs a path, e.g. \"/envelope-keys/{{id}}\""
                    ));
                    None
                }
            }
        }
        "dir" => {
            unused(errors, "path", v.path.is_some());
            unused(errors, "create", v.create.is_some());
            match v.dir {
                Some(dir) if !dir.as_os_str().is_empty() => Some(KeyVault::Dir { dir }),
                _ => {
                    errors.push(format!(
                        "{place}.dir: a directory vault needs dir = \"...\""
                    ));
                    None
                }
            }
        }
        other => {
            errors.push(format!(
                "{place}.kind: {other:?} is not one of \"rest\", \"dir\""
            ));
            None
        }
    };
    if errors.len() == before { out } else { None }
}

fn parse_paths(place: &str, paths: &[String], errors: &mut Vec<String>) -> Vec<FieldPath> {
    paths
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            FieldPath::parse(p)
                .map_err(|e| errors.push(format!("{place}[{i}]: {e}")))
                .ok()
        })
        .collect()
}

/// Which context a template belongs to: it decides the sources allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    JsonKey,
    JsonMessage,
    S3,
}

fn parse_templates(
    place: &str,
    map: &BTreeMap<String, String>,
    pattern: Option<&PathPattern>,
    kind: Kind,
    errors: &mut Vec<String>,
) -> Vec<(String, Template)> {
    let mut out = Vec::new();
    for (name, value) in map {
        let at = format!("{place}.{name}");
        if name.starts_with(RESERVED_PREFIX) || name.starts_with("aws:") || name.is_empty() {
            errors.push(format!(
                "{at}: context keys may not be empty or start with {RESERVED_PREFIX:?} or \"aws:\""
            ));
            continue;
        }
        let template = match Template::parse(value) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let mut ok = true;
        for s in template.sources() {
            match s {
                Source::Path(n) if pattern.is_some_and(|p| !p.has_capture(n)) => {
                    errors.push(format!(
                        "{at}: path.{n} is not a capture of the route's path pattern"
                    ));
                    ok = false;
                }
                Source::Json(_) if kind != Kind::JsonMessage => {
                    errors.push(format!(
                        "{at}: json.* values belong in message_context of JSON routes (the key context must be known before the body is read)"
                    ));
                    ok = false;
                }
                Source::S3Bucket if kind != Kind::S3 => {
                    errors.push(format!("{at}: {s} is only known on kind = \"s3\" routes"));
                    ok = false;
                }
                _ => {}
            }
        }
        if ok {
            out.push((name.clone(), template));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
auth = "none"
[keyring]
path = "data/keyring.json"
master_key_file = "data/master.key"
"#;

    #[test]
    fn reports_every_problem_with_its_place() {
        let text = format!(
            r#"{BASE}
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/**"
upstream = "ftp://x"
key = "users"
fields = ["$.ssn", "$[?(@.a)]"]
context = {{ tenant = "{{path.nope}}", "ep:x" = "y" }}
colour = "blue"

[[route]]
name = "b"
path = "nope"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.a"]
context = {{ id = "{{json.id}}" }}
on_decrypt_error = "shrug"
"#
        );
        let errs = parse(&text).unwrap_err().0;
        let all = errs.join("\n");
        assert!(all.contains("route[0]") && all.contains("colour"), "{all}");
        let text = text.replace("colour = \"blue\"\n", "");
        let errs = parse(&text).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "route[0] (\"users\").upstream",
            "route[0] (\"users\").fields[1]",
            "path.nope is not a capture",
            "context.ep:x",
            "route[1] (\"b\").path",
            "json.* values belong in message_context",
            "on_decrypt_error",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn syntax_errors_do_not_echo_the_file() {
        let err = parse("[server]\nsecret = \"hunter2\" oops\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_pass_through_before_an_encrypting_route_it_overlaps_is_refused() {
        let routes = |first: &str, second: &str| {
            format!(
                r#"{BASE}
[[route]]
{first}

[[route]]
{second}
"#
            )
        };
        let users = r#"name = "users"
path = "/tenants/{tenant}/users/**"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.ssn"]"#;
        let pass = |path: &str, extra: &str| {
            format!(
                "name = \"pass\"\npath = \"{path}\"\nupstream = \"http://127.0.0.1:3000\"\npassthrough = true\n{extra}"
            )
        };
        // "Encrypt these, pass the rest": fine.
        parse(&routes(users, &pass("/**", ""))).unwrap();
        // Before it, overlapping (case-insensitively): refused with both names.
        for p in ["/**", "/tenants/**", "/tenants/*/USERS/{id}"] {
            let all = parse(&routes(&pass(p, ""), users))
                .unwrap_err()
                .0
                .join("\n");
            assert!(
                all.contains("route \"pass\".path") && all.contains("\"users\""),
                "{all}"
            );
            assert!(all.contains("dangerous_shadows_encrypted_routes"), "{all}");
        }
        // Before it but disjoint, or explicitly marked: fine.
        parse(&routes(&pass("/health", ""), users)).unwrap();
        parse(&routes(&pass("/tenants/{t}/orders/**", ""), users)).unwrap();
        parse(&routes(
            &pass("/**", "dangerous_shadows_encrypted_routes = true"),
            users,
        ))
        .unwrap();
        // Only pass-through and S3 routes can be marked.
        let marked = format!("{users}\ndangerous_shadows_encrypted_routes = true");
        let all = parse(&routes(&marked, &pass("/**", "")))
            .unwrap_err()
            .0
            .join("\n");
        assert!(all.contains("only for pass-through and S3 routes"), "{all}");
        // allow_query_params belongs to encrypting JSON routes.
        let all = parse(&routes(users, &pass("/**", "allow_query_params = [\"a\"]")))
            .unwrap_err()
            .0
            .join("\n");
        assert!(all.contains("allow_query_params"), "{all}");
    }

    #[test]
    fn record_ids_cannot_be_encrypted_fields() {
        let text = format!(
            r#"{BASE}
[[route]]
name = "u"
path = "/u/**"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.id"]
message_context = {{ id = "{{json.id}}" }}
"#
        );
        let all = parse(&text).unwrap_err().0.join("\n");
        assert!(all.contains("json.id is an encrypted field"), "{all}");
    }
}
