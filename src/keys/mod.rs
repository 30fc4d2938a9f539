//! Root keys and data keys.
//!
//! - [`RootKeyProvider`]: the one extension point for root-key backends (the embedded
//!   [`keyring`] today; AWS KMS and PKCS#11 plug in beside it). Chosen from config at run time,
//!   so it is a trait object.
//! - [`cache::DataKeyCache`]: the data-key cache (AWS Encryption SDK style limits, single-flight).
//! - [`KeyService`]: what the pipeline calls: "a data key for this route and key context" and
//!   "the data key inside this header", over the configured backends and the cache.

#[cfg(feature = "aws-kms")]
pub mod aws_kms;
pub mod cache;
pub mod currency;
pub use currency::{key_version_label, key_version_labels};
pub mod keyring;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod resilience;
pub mod vault;

pub use crate::config::keys::KeyRef;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::envelope::record::{self, Record, RecordId, RecordKey};
use crate::envelope::{Context, Header, WrappedKey};
use crate::metrics::Metrics;
pub use cache::{CacheLimits, DataKeyCache};

/// A 256-bit data key. Zeroized on drop; `Debug` never prints it; read it through [`expose`].
///
/// [`expose`]: DataKey::expose
pub struct DataKey {
    key: Zeroizing<[u8; 32]>,
    /// The key prepared for per-message key derivation, once per data key.
    prf: crate::envelope::chunked::Prf,
}

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let key = Zeroizing::new(bytes);
        let prf = crate::envelope::chunked::Prf::new(&key);
        DataKey { key, prf }
    }

    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        crate::envelope::fill_random(key.as_mut());
        let prf = crate::envelope::chunked::Prf::new(&key);
        DataKey { key, prf }
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.key
    }

    pub fn prf(&self) -> &crate::envelope::chunked::Prf {
        &self.prf
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([SENSITIVE])")
    }
}

/// A new data key together with its wrapped form.
#[derive(Debug)]
pub struct GeneratedKey {
    pub plaintext: DataKey,
    pub wrapped: WrappedKey,
}

/// What a backend says about one of its root keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDescription {
    pub key_id: String,
    pub enabled: bool,
    /// Newest version, for backends that expose versions.
    pub current_version: u32,
}

/// Errors from a root-key backend. Each says whose fault it is and whether a retry may help.
///
/// Only [`InvalidCiphertext`](Self::InvalidCiphertext) says anything about the stored data: it
/// is the one answer that proves a wrapped key bad, and so the only one that may lead to a
/// value being redacted or reported as tampering. Every other variant is about the backend
/// (an outage, credentials, a key's state or policy) and fails the request as what it is:
/// an outage must never look like bad data, or a client writing back what it read loses it.
///
/// Key names can come from stored data (the key id in an EDK), so they are printed quoted and
/// escaped (`{:?}`): a crafted name cannot forge log or audit lines.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("root key {0:?} not found")]
    KeyNotFound(String),
    /// Disabled, pending deletion or import, or not usable for wrapping.
    #[error("root key {0:?} is disabled")]
    KeyDisabled(String),
    /// The key is in a state that allows no use (KMS's KMSInvalidStateException): pending
    /// deletion, pending import (no material), destroyed. `state` is its name
    /// (`pending_deletion`, ...), `detail` what it means (the deletion date, what to do).
    #[error("root key {key:?} is {state}: {detail}")]
    KeyState {
        key: String,
        state: &'static str,
        detail: String,
    },
    #[error("access to root key {0:?} denied")]
    AccessDenied(String),
    /// The wrapped key did not unwrap: tampered, foreign, or a different key context. The
    /// backend proved it (the one error that blames the ciphertext).
    #[error("wrapped data key is invalid for this key and context")]
    InvalidCiphertext,
    #[error("no configured backend named {0:?}")]
    UnknownBackend(String),
    /// The backend did not accept the proxy's credentials (expired or not yet valid tokens,
    /// unrecognized access keys, signature errors). Retryable: the credential chain refreshes.
    #[error("backend credentials rejected: {0:?}")]
    Credentials(String),
    /// The backend refused the request for a reason that is not the ciphertext and that a
    /// retry will not fix (a parameter it will not take, a key not meant for encryption).
    #[error("backend refused the request: {0:?}")]
    Refused(String),
    /// The backend could not be reached, throttled us, or failed; a retry may help.
    #[error("backend unavailable: {0:?}")]
    Unavailable(String),
    /// A v2 token names a data-key record its route's vault does not hold (deleted, shredded,
    /// not replicated yet, or no vault configured). Never redaction: the value may be fine.
    #[error("data-key record missing: {0}")]
    RecordMissing(String),
    /// A data-key record that is not what its id promises: tampered, moved from another id or
    /// key context, or its EDKs unwrap to another key than it committed to.
    #[error("data-key record invalid: {0}")]
    RecordInvalid(String),
}

impl BackendError {
    /// Whether a retry may help (counted by the circuit breaker; 503 with `Retry-After`).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable(_) | BackendError::Credentials(_)
        )
    }

    /// Whether the backend proved the ciphertext invalid (the only error that may redact).
    pub fn proves_invalid(&self) -> bool {
        matches!(self, BackendError::InvalidCiphertext)
    }

    /// A stable name for metrics and audit lines.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::KeyNotFound(_) => "key_not_found",
            BackendError::KeyDisabled(_) => "key_disabled",
            BackendError::KeyState { .. } => "key_state",
            BackendError::AccessDenied(_) => "access_denied",
            BackendError::InvalidCiphertext => "invalid_ciphertext",
            BackendError::UnknownBackend(_) => "unknown_backend",
            BackendError::Credentials(_) => "credentials",
            BackendError::Refused(_) => "refused",
            BackendError::Unavailable(_) => "unavailable",
            BackendError::RecordMissing(_) => "record_missing",
            BackendError::RecordInvalid(_) => "record_invalid",
        }
    }

    /// Which of two errors from the EDKs of one message to report: an outage first (a retry
    /// may open the message), then any other backend error, and "invalid" only when nothing
    /// else went wrong.
    fn rank(&self) -> u8 {
        match self {
            e if e.retryable() => 3,
            BackendError::InvalidCiphertext => 0,
            BackendError::UnknownBackend(_) => 1,
            _ => 2,
        }
    }
}

/// A root-key backend: generates data keys wrapped under a root key, and unwraps them.
///
/// The root key never leaves the backend. The key context is passed on every call and must be
/// bound to the wrapped key (AWS KMS EncryptionContext, AAD, or a MAC): unwrapping under any
/// other context must fail with [`BackendError::InvalidCiphertext`].
///
/// `wrapped.blob` in [`unwrap_data_key`](Self::unwrap_data_key) comes from storage and is fully
/// attacker controlled, so implementations must be panic-proof on any input.
#[async_trait]
pub trait RootKeyProvider: Send + Sync + 'static {
    /// The backend's configured name; stored in each EDK it produces.
    fn name(&self) -> &str;

    /// Generate a fresh data key and wrap it under the newest enabled version of `key_id`. By
    /// default the key comes from the OS CSPRNG and is wrapped with
    /// [`wrap_data_key`](Self::wrap_data_key); a backend that generates keys itself (KMS)
    /// overrides this.
    async fn generate_data_key(
        &self,
        key_id: &str,
        key_context: &Context,
    ) -> Result<GeneratedKey, BackendError> {
        let plaintext = DataKey::generate();
        let wrapped = self.wrap_data_key(key_id, &plaintext, key_context).await?;
        Ok(GeneratedKey { plaintext, wrapped })
    }

    /// Wrap an existing data key under `key_id` (the second and later keys of a multi-key
    /// route wrap the data key generated by the first).
    async fn wrap_data_key(
        &self,
        key_id: &str,
        data_key: &DataKey,
        key_context: &Context,
    ) -> Result<WrappedKey, BackendError>;

    /// Unwrap a data key this backend wrapped.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        key_context: &Context,
    ) -> Result<DataKey, BackendError>;

    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError>;

    /// A channel that ticks whenever the backend's keys change (rotation, disable, ...) so the
    /// cache can drop data keys at once. Backends without local state return `None`.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether `wrapped_key_id` (from a stored EDK) names the key configured as `configured`.
    /// Backends whose keys have several names (KMS aliases, ids, ARNs) override this.
    fn same_key(&self, configured: &str, wrapped_key_id: &str) -> bool {
        configured == wrapped_key_id
    }

    /// Learn what [`same_key`](Self::same_key) needs to know about the configured `key_id`
    /// (KMS: an alias's key ARN). Called before stored EDKs are matched against configured
    /// keys; a backend whose names are final does nothing.
    async fn resolve_key(&self, key_id: &str) -> Result<(), BackendError> {
        let _ = key_id;
        Ok(())
    }

    /// Whether [`resolve_key`](Self::resolve_key) has nothing left to learn about `key_id`
    /// (checked first, so a known name costs no call and passes an open circuit breaker).
    fn resolved(&self, key_id: &str) -> bool {
        let _ = key_id;
        true
    }

    /// Whether the backend is reachable, as far as the caller can tell (for `/readyz`).
    fn health(&self) -> resilience::Health {
        resilience::Health::Up
    }
}

/// A vault's failure as the key service reports it: an outage is an outage, a document that is
/// not a record is an invalid record.
fn vault_error(e: vault::VaultError) -> BackendError {
    match e {
        vault::VaultError::Unavailable(m) | vault::VaultError::Conflict(m) => {
            BackendError::Unavailable(m)
        }
        vault::VaultError::Malformed(m) => BackendError::RecordInvalid(m),
    }
}

/// The record cache's key: the vault, the record, the key context and the root keys the
/// record was checked against. A record is opened only through EDKs under the route's keys;
/// two routes sharing a vault with different keys must not find each other's opened records.
fn record_cache_key(vault: &str, id: &RecordId, key_context: &Context, keys: &[KeyRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vault.len() + 20 + 64);
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    put(&mut out, vault.as_bytes());
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        put(&mut out, k.backend.as_bytes());
        put(&mut out, k.key_id.as_bytes());
    }
    out.extend_from_slice(&id.0);
    key_context.canonical_into(&mut out);
    out
}

/// Open the local keyring (when `[keyring]` is configured) and connect every configured
/// backend, each remote one behind [`resilience::Resilient`]. Returns the keyring too (the
/// server watches and fills it).
pub async fn connect_backends(
    config: &crate::config::Config,
) -> Result<(Option<Arc<keyring::Keyring>>, Vec<Arc<dyn RootKeyProvider>>), String> {
    connect_backends_with(config, &[]).await
}

/// [`connect_backends`], with the providers a program embedding envelope-proxy supplies for
/// its `kind = "embedded"` backends (matched by name; both sides must match: a provider the
/// config does not name, or an embedded backend without a provider, is an error).
pub async fn connect_backends_with(
    config: &crate::config::Config,
    embedded: &[Arc<dyn RootKeyProvider>],
) -> Result<(Option<Arc<keyring::Keyring>>, Vec<Arc<dyn RootKeyProvider>>), String> {
    let keyring = open_keyring(config)?;
    let backends = connect_backends_beside(config, embedded, keyring.as_ref()).await?;
    Ok((keyring, backends))
}

/// The local keyring of `config`, `None` without `[keyring]` (a stateless pod).
pub fn open_keyring(
    config: &crate::config::Config,
) -> Result<Option<Arc<keyring::Keyring>>, String> {
    let Some(settings) = &config.keyring else {
        return Ok(None);
    };
    keyring::Keyring::open(
        KeyRef::DEFAULT_BACKEND,
        &settings.path,
        &settings.master_key,
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

/// The backends of `config` beside an open `keyring` (first in the list, when there is one):
/// a config reload connects them again with the keyring it started with.
pub async fn connect_backends_beside(
    config: &crate::config::Config,
    embedded: &[Arc<dyn RootKeyProvider>],
    keyring: Option<&Arc<keyring::Keyring>>,
) -> Result<Vec<Arc<dyn RootKeyProvider>>, String> {
    use crate::config::BackendKind;
    for (i, p) in embedded.iter().enumerate() {
        if embedded[..i].iter().any(|q| q.name() == p.name()) {
            return Err(format!("provider {:?}: given twice", p.name()));
        }
        let configured = config
            .backends
            .iter()
            .any(|b| b.name == p.name() && matches!(b.kind, BackendKind::Embedded));
        if !configured {
            return Err(format!(
                "provider {:?}: the config has no [backend.{}] with kind = \"embedded\"",
                p.name(),
                p.name()
            ));
        }
    }
    let mut backends: Vec<Arc<dyn RootKeyProvider>> = Vec::new();
    if let Some(keyring) = keyring {
        backends.push(keyring.clone());
    }
    for b in &config.backends {
        match b.kind {
            BackendKind::Embedded => match embedded.iter().find(|p| p.name() == b.name) {
                Some(p) => backends.push(p.clone()),
                None => {
                    return Err(format!(
                        "backend {}: kind = \"embedded\" needs a provider from the program embedding envelope-proxy (server::Builder::provider); the envelope-proxy binary has none",
                        b.name
                    ));
                }
            },
            _ => backends.push(connect_one(b).await?),
        }
    }
    Ok(backends)
}

async fn connect_one(b: &crate::config::BackendConfig) -> Result<Arc<dyn RootKeyProvider>, String> {
    use crate::config::BackendKind;
    #[cfg_attr(all(feature = "aws-kms", feature = "pkcs11"), allow(unused_variables))]
    let missing = |feature: &str| {
        format!(
            "backend {}: this build does not include it (cargo feature {feature})",
            b.name
        )
    };
    match &b.kind {
        BackendKind::AwsKms(settings) => {
            #[cfg(feature = "aws-kms")]
            return Ok(Arc::new(resilience::Resilient::new(
                aws_kms::AwsKms::connect(&b.name, settings).await?,
                b.resilience.clone(),
            )));
            #[cfg(not(feature = "aws-kms"))]
            {
                let _ = settings;
                Err(missing("aws-kms"))
            }
        }
        BackendKind::Pkcs11(settings) => {
            #[cfg(feature = "pkcs11")]
            return Ok(Arc::new(resilience::Resilient::new(
                pkcs11::Pkcs11::connect(&b.name, settings)?,
                b.resilience.clone(),
            )));
            #[cfg(not(feature = "pkcs11"))]
            {
                let _ = settings;
                Err(missing("pkcs11"))
            }
        }
        BackendKind::Embedded => Err(format!(
            "backend {}: kind = \"embedded\" needs a provider (server::Builder::provider)",
            b.name
        )),
    }
}

/// A data key ready to seal messages: the key and the header carrying its wrapped forms, and
/// for v2 tokens the key derived for its record (already written to the vault).
pub struct SealingKey {
    pub data_key: DataKey,
    pub header: Header,
    pub record: Option<Arc<RecordKey>>,
    /// [`key_version_labels`] of `header`, for the audit log.
    pub labels: Vec<Arc<str>>,
}

/// A record's key for opening v2 tokens, with the record's header (its EDKs, for the audit
/// log's key versions).
pub struct OpenRecord {
    pub key: Arc<RecordKey>,
    pub header: Header,
    /// [`key_version_labels`] of `header`, for the audit log.
    pub labels: Vec<Arc<str>>,
    /// When the record was opened (or written): the data-key cache keeps it `open_ttl` from
    /// then.
    pub opened_at: std::time::Instant,
}

impl OpenRecord {
    pub fn new(key: Arc<RecordKey>, header: Header) -> Self {
        let labels = key_version_labels(&header);
        OpenRecord {
            key,
            header,
            labels,
            opened_at: std::time::Instant::now(),
        }
    }
}

/// The pipeline's view of keys: backends by name, behind the data-key cache.
pub struct KeyService {
    backends: HashMap<String, Arc<dyn RootKeyProvider>>,
    /// Key vaults by label ([`crate::config::KeyVault::label`]).
    vaults: std::sync::RwLock<HashMap<String, vault::Vault>>,
    cache: DataKeyCache,
    metrics: Arc<Metrics>,
}

impl KeyService {
    pub fn new(
        backends: Vec<Arc<dyn RootKeyProvider>>,
        limits: CacheLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let service = Arc::new(KeyService {
            backends: backends
                .into_iter()
                .map(|b| (b.name().to_string(), b))
                .collect(),
            cache: DataKeyCache::new(limits),
            vaults: Default::default(),
            metrics,
        });
        // Drop cached data keys as soon as a backend's keys change (rotation, disable).
        for backend in service.backends.values() {
            if let Some(mut changes) = backend.changes() {
                let weak = Arc::downgrade(&service);
                tokio::spawn(async move {
                    while changes.changed().await.is_ok() {
                        match weak.upgrade() {
                            Some(s) => s.cache.invalidate_all(),
                            None => break,
                        }
                    }
                });
            }
        }
        service
    }

    /// Make `vault` the store of the routes whose vault label is its label (a later one
    /// replaces an earlier one of the same label).
    pub fn register_vault(&self, vault: vault::Vault) {
        let mut vaults = self.vaults.write().unwrap_or_else(|p| p.into_inner());
        vaults.insert(vault.label().to_string(), vault);
    }

    /// The vault named `label`, if one was registered.
    pub fn vault(&self, label: &str) -> Option<vault::Vault> {
        let vaults = self.vaults.read().unwrap_or_else(|p| p.into_inner());
        vaults.get(label).cloned()
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Result<&Arc<dyn RootKeyProvider>, BackendError> {
        self.backends
            .get(name)
            .ok_or_else(|| BackendError::UnknownBackend(name.to_string()))
    }

    /// A data key for sealing `messages` messages of `bytes` bytes in all under `keys` (the
    /// first generates, every other one wraps too) and `key_context`. Served from the cache
    /// within its limits; concurrent misses share one backend call.
    pub async fn sealing_key(
        &self,
        keys: &[KeyRef],
        key_context: &Context,
        messages: u64,
        bytes: u64,
    ) -> Result<Arc<SealingKey>, BackendError> {
        let (key, hit) = self
            .cache
            .sealing_key(b"v1", keys, key_context, messages, bytes, || {
                self.new_sealing_key(keys, key_context)
            })
            .await?;
        self.metrics.record_cache(hit);
        Ok(key)
    }

    /// [`sealing_key`](Self::sealing_key) for v2 tokens: a data key with a record in `vault`.
    /// A new key's record is written to the vault before the key is returned, so no token
    /// names a record that is not stored. The cache is partitioned by vault.
    pub async fn sealing_record_key(
        &self,
        vault: &vault::Vault,
        keys: &[KeyRef],
        key_context: &Context,
        messages: u64,
        bytes: u64,
    ) -> Result<Arc<SealingKey>, BackendError> {
        let scope = [b"v2:".as_slice(), vault.label().as_bytes()].concat();
        let (key, hit) = self
            .cache
            .sealing_key(&scope, keys, key_context, messages, bytes, || {
                self.new_record_key(vault, keys, key_context)
            })
            .await?;
        self.metrics.record_cache(hit);
        Ok(key)
    }

    async fn new_record_key(
        &self,
        vault: &vault::Vault,
        keys: &[KeyRef],
        key_context: &Context,
    ) -> Result<SealingKey, BackendError> {
        let id = RecordId::generate();
        let bound = record::backend_context(key_context, &id);
        let mut key = self.new_sealing_key(keys, &bound).await?;
        let rec = Record {
            id,
            commitment: record::commitment(key.data_key.expose(), &id),
            key_context: key_context.clone(),
            header: key.header.clone(),
        };
        let doc = vault::VaultDoc::new(&rec)
            .map_err(|e| BackendError::Refused(format!("record: {e}")))?;
        let started = std::time::Instant::now();
        let written = vault.create(&doc).await;
        self.metrics
            .backend_seconds("vault", "create", started.elapsed().as_secs_f64());
        written.map_err(|e| {
            self.metrics.backend_error("vault", "create", "unavailable");
            vault_error(e)
        })?;
        let record_key = Arc::new(RecordKey::new(key.data_key.expose(), id));
        // What is written is often read back at once: the opening side has it already.
        self.cache
            .insert_record(
                record_cache_key(vault.label(), &id, key_context, keys),
                Arc::new(OpenRecord::new(record_key.clone(), key.header.clone())),
            )
            .await;
        key.record = Some(record_key);
        Ok(key)
    }

    /// The key of record `id` in `vault` under `key_context`, using only EDKs under `allowed`:
    /// from the cache, else read from the vault, unwrapped and checked against the record's
    /// commitment.
    pub async fn opening_record_key(
        &self,
        vault: &vault::Vault,
        id: &RecordId,
        key_context: &Context,
        allowed: &[KeyRef],
    ) -> Result<Arc<OpenRecord>, BackendError> {
        let (entry, hit) = self
            .cache
            .record(
                record_cache_key(vault.label(), id, key_context, allowed),
                || self.fetch_record(vault, id, key_context, allowed),
            )
            .await?;
        self.metrics.record_cache(hit);
        Ok(entry)
    }

    async fn fetch_record(
        &self,
        vault: &vault::Vault,
        id: &RecordId,
        key_context: &Context,
        allowed: &[KeyRef],
    ) -> Result<OpenRecord, BackendError> {
        let started = std::time::Instant::now();
        let got = vault.get(id).await;
        self.metrics
            .backend_seconds("vault", "get", started.elapsed().as_secs_f64());
        let stored = got
            .map_err(vault_error)?
            .ok_or_else(|| BackendError::RecordMissing(format!("{id} in {}", vault.label())))?;
        if stored.doc.state == vault::STATE_PENDING_SHRED {
            // The alarm: data under a key context about to be shredded is still read.
            self.metrics
                .key_state_refused(&format!("vault:{}", vault.label()), "pending_shred");
            return Err(BackendError::KeyState {
                key: format!("data-key record {id}"),
                state: "pending_shred",
                detail: format!(
                    "scheduled to be shredded{}; `keys shred --cancel` keeps it",
                    stored
                        .doc
                        .shred_after
                        .map(|t| format!(" after {}", keyring::date(t)))
                        .unwrap_or_default()
                ),
            });
        }
        if stored.doc.state != vault::STATE_ACTIVE {
            // A state this version does not know (a typo, or one a newer version wrote) is
            // not taken for "active".
            return Err(BackendError::RecordInvalid(format!(
                "record {id} is in an unknown state (not \"active\")"
            )));
        }
        let rec = stored.doc.record().map_err(vault_error)?;
        if rec.id != *id {
            return Err(BackendError::RecordInvalid(format!(
                "the vault answered record {} for {id}",
                rec.id
            )));
        }
        if rec.key_context != *key_context {
            return Err(BackendError::RecordInvalid(format!(
                "record {id} belongs to another key context"
            )));
        }
        let bound = record::backend_context(key_context, id);
        let data_key = self
            .opening_key_for(&rec.header, &bound, allowed)
            .await
            .map_err(|e| match e {
                BackendError::InvalidCiphertext => BackendError::RecordInvalid(format!(
                    "no wrapped key of record {id} unwraps under this route's keys and context"
                )),
                other => other,
            })?;
        let key = RecordKey::open(data_key.expose(), &rec).ok_or_else(|| {
            BackendError::RecordInvalid(format!(
                "record {id}: the data key does not match its commitment"
            ))
        })?;
        Ok(OpenRecord::new(Arc::new(key), rec.header))
    }

    async fn new_sealing_key(
        &self,
        keys: &[KeyRef],
        key_context: &Context,
    ) -> Result<SealingKey, BackendError> {
        let (first, rest) = keys
            .split_first()
            .ok_or_else(|| BackendError::KeyNotFound("(no keys configured)".into()))?;
        self.metrics.backend_call(&first.backend, "generate");
        let backend = self.backend(&first.backend)?;
        let generated = self
            .timed(
                &first.backend,
                "generate",
                backend.generate_data_key(&first.key_id, key_context),
            )
            .await
            .inspect_err(|e| {
                self.metrics
                    .backend_error(&first.backend, "generate", e.kind())
            })?;
        let mut edks = vec![generated.wrapped];
        for other in rest {
            self.metrics.backend_call(&other.backend, "wrap");
            let backend = self.backend(&other.backend)?;
            let wrapped = self
                .timed(
                    &other.backend,
                    "wrap",
                    backend.wrap_data_key(&other.key_id, &generated.plaintext, key_context),
                )
                .await
                .inspect_err(|e| self.metrics.backend_error(&other.backend, "wrap", e.kind()))?;
            edks.push(wrapped);
        }
        let header = Header { edks };
        Ok(SealingKey {
            data_key: generated.plaintext,
            labels: key_version_labels(&header),
            header,
            record: None,
        })
    }

    /// Wrap an existing data key under every one of `keys` (their current versions) and
    /// `key_context`: the header a rewrapped record gets.
    pub async fn wrap_all(
        &self,
        keys: &[KeyRef],
        data_key: &DataKey,
        key_context: &Context,
    ) -> Result<Header, BackendError> {
        if keys.is_empty() {
            return Err(BackendError::KeyNotFound("(no keys configured)".into()));
        }
        let mut edks = Vec::with_capacity(keys.len());
        for k in keys {
            self.metrics.backend_call(&k.backend, "wrap");
            let backend = self.backend(&k.backend)?;
            let wrapped = self
                .timed(
                    &k.backend,
                    "wrap",
                    backend.wrap_data_key(&k.key_id, data_key, key_context),
                )
                .await
                .inspect_err(|e| self.metrics.backend_error(&k.backend, "wrap", e.kind()))?;
            edks.push(wrapped);
        }
        Ok(Header { edks })
    }

    /// Run one backend call, recording how long it took (`backend_call_seconds`).
    async fn timed<T>(
        &self,
        backend: &str,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics
            .backend_seconds(backend, operation, started.elapsed().as_secs_f64());
        result
    }

    /// The data key inside `header`, considering only EDKs under one of `allowed` (the route's
    /// keys). EDK names come from storage: without this, a stored header could make the proxy
    /// unwrap with any key any backend lets it use (a confused deputy), and cost a backend call
    /// per listed EDK.
    pub async fn opening_key_for(
        &self,
        header: &Header,
        key_context: &Context,
        allowed: &[KeyRef],
    ) -> Result<Arc<DataKey>, BackendError> {
        // Names the backend has not resolved yet (a KMS alias before its ARN is known) are
        // resolved first, so the filter below compares exact names. A key that cannot be
        // resolved (an outage) matches nothing, but then the message is not "invalid": if no
        // other EDK opens it, the resolution error is what the caller gets.
        let mut unresolved: Option<BackendError> = None;
        for k in allowed {
            if header.edks.iter().any(|edk| edk.backend == k.backend)
                && let Ok(backend) = self.backend(&k.backend)
                && !backend.resolved(&k.key_id)
                && let Err(e) = backend.resolve_key(&k.key_id).await
            {
                self.metrics.backend_error(&k.backend, "resolve", e.kind());
                if unresolved.as_ref().is_none_or(|w| e.rank() > w.rank()) {
                    unresolved = Some(e);
                }
            }
        }
        let edks: Vec<WrappedKey> = header
            .edks
            .iter()
            .filter(|edk| {
                allowed.iter().any(|k| {
                    k.backend == edk.backend
                        && self
                            .backends
                            .get(&k.backend)
                            .is_some_and(|b| b.same_key(&k.key_id, &edk.key_id))
                })
            })
            .cloned()
            .collect();
        if edks.is_empty() {
            return Err(unresolved.unwrap_or(BackendError::InvalidCiphertext));
        }
        match self.opening_key(&Header { edks }, key_context).await {
            Err(e) if e.proves_invalid() => Err(unresolved.unwrap_or(e)),
            other => other,
        }
    }

    /// The data key inside `header`: the first EDK that unwraps wins, so a message stays
    /// readable while any one of its root keys is reachable. Trusts every EDK the header
    /// names: the data path uses [`opening_key_for`](Self::opening_key_for) instead.
    pub async fn opening_key(
        &self,
        header: &Header,
        key_context: &Context,
    ) -> Result<Arc<DataKey>, BackendError> {
        // The message is invalid only if every EDK was proved invalid: one EDK refused as
        // invalid and another hit by an outage is an outage (a retry may open it).
        let mut worst: Option<BackendError> = None;
        for edk in &header.edks {
            let result = match self.backend(&edk.backend) {
                Ok(backend) => {
                    self.cache
                        .opening_key(edk, key_context, || {
                            self.metrics.backend_call(&edk.backend, "unwrap");
                            self.timed(
                                &edk.backend,
                                "unwrap",
                                backend.unwrap_data_key(edk, key_context),
                            )
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok((key, hit)) => {
                    self.metrics.record_cache(hit);
                    return Ok(key);
                }
                Err(e) => {
                    self.metrics.backend_error(&edk.backend, "unwrap", e.kind());
                    if worst.as_ref().is_none_or(|w| e.rank() > w.rank()) {
                        worst = Some(e);
                    }
                }
            }
        }
        Err(worst.unwrap_or(BackendError::InvalidCiphertext))
    }

    /// Whether `key` exists and is usable (for `/readyz`).
    pub async fn describe(&self, key: &KeyRef) -> Result<KeyDescription, BackendError> {
        let d = self
            .backend(&key.backend)?
            .describe_key(&key.key_id)
            .await?;
        if !d.enabled {
            return Err(BackendError::KeyDisabled(key.key_id.clone()));
        }
        Ok(d)
    }

    /// Every backend's name and health, for `/readyz`.
    pub fn backend_health(&self) -> Vec<(String, resilience::Health)> {
        let mut out: Vec<_> = self
            .backends
            .iter()
            .map(|(n, b)| (n.clone(), b.health()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn cache(&self) -> &DataKeyCache {
        &self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that answers every unwrap with one error.
    struct Answers(&'static str, BackendError);

    #[async_trait]
    impl RootKeyProvider for Answers {
        fn name(&self) -> &str {
            self.0
        }
        async fn wrap_data_key(
            &self,
            _: &str,
            _: &DataKey,
            _: &Context,
        ) -> Result<WrappedKey, BackendError> {
            Err(self.1.clone())
        }
        async fn unwrap_data_key(
            &self,
            _: &WrappedKey,
            _: &Context,
        ) -> Result<DataKey, BackendError> {
            Err(self.1.clone())
        }
        async fn describe_key(&self, _: &str) -> Result<KeyDescription, BackendError> {
            Err(self.1.clone())
        }
    }

    fn edk(backend: &str) -> WrappedKey {
        WrappedKey {
            backend: backend.into(),
            key_id: "k".into(),
            key_version: 0,
            blob: vec![1; 40],
        }
    }

    fn service() -> Arc<KeyService> {
        KeyService::new(
            vec![
                Arc::new(Answers("bad", BackendError::InvalidCiphertext)),
                Arc::new(Answers("down", BackendError::Unavailable("x".into()))),
                Arc::new(Answers("off", BackendError::KeyDisabled("k".into()))),
            ],
            CacheLimits::default(),
            Arc::new(Metrics::new()),
        )
    }

    async fn open(s: &KeyService, backends: &[&str]) -> BackendError {
        let header = Header {
            edks: backends.iter().map(|b| edk(b)).collect(),
        };
        s.opening_key(&header, &Context::new()).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_message_is_invalid_only_if_every_edk_proved_it() {
        let s = service();
        for order in [["bad", "down"], ["down", "bad"]] {
            let e = open(&s, &order).await;
            assert!(
                e.retryable(),
                "{order:?}: one outage makes it an outage: {e:?}"
            );
        }
        for order in [["bad", "off"], ["off", "bad"]] {
            let e = open(&s, &order).await;
            assert!(
                matches!(e, BackendError::KeyDisabled(_)),
                "{order:?}: {e:?}"
            );
        }
        let e = open(&s, &["bad", "bad"]).await;
        assert!(e.proves_invalid(), "{e:?}");
        assert_eq!(s.metrics.backend_errors_of("down", "unavailable"), 2);
        assert_eq!(s.metrics.backend_errors_of("bad", "invalid_ciphertext"), 6);
    }
}
