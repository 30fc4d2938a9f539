//! The embedded local keyring: the default root-key backend, needing no outside service.
//!
//! Root keys are 256-bit AES keys with versions. New data keys are wrapped by the newest
//! version; every version still unwraps, so rotation never rewrites data. The file holding them
//! is sealed under a master key:
//!
//! ```text
//! keyring file = {"format": "envelope-proxy.keyring.v1", "nonce": b64(12), "sealed": b64(ct‖tag)}
//! sealed       = AES-256-GCM(master key, nonce, aad = "envelope-proxy.keyring.v1", inner JSON)
//! ```
//!
//! A wrapped data key (EDK blob) is `nonce (12) ‖ AES-256-GCM(root key version, nonce,
//! aad = wrap_aad(key id, version, key context), data key) (32 + 16)`, 60 bytes.
//!
//! Files are written atomically (temp file, fsync, rename, fsync of the directory) under an
//! advisory lock, and refused when group- or world-accessible. A running proxy polls the file
//! and picks up `keys create` / `keys rotate` from the CLI within a second.
//!
//! Rollback protection: the sealed document carries a `generation`, raised by every write (a
//! keyring written before generations existed reads as generation 0 and is upgraded by its next
//! write). Nobody without the master key can change it. Next to the keyring, `PATH.generation`
//! holds the highest generation seen, MACed under a key derived from the master key so it
//! cannot be rewritten to a lower number:
//!
//! ```text
//! PATH.generation = {"format": "envelope-proxy.keyring-generation.v1", "generation": N,
//!                    "mac": hex(HMAC-SHA-256(HMAC-SHA-256(master key, LABEL), LABEL ‖ u64be(N)))}
//! ```
//!
//! Opening (CLI or proxy) a keyring whose generation is below that mark is refused with an
//! error naming the fix (`keys accept-generation N` to go back to a backup on purpose). A
//! running proxy also keeps the highest generation it has loaded in memory: a reload to a lower
//! generation is refused (the keys in memory stay), logged as an error and counted
//! (`envelope_proxy_keyring_rollbacks_refused`). What this does not stop: someone who can
//! replace both files with older copies (or delete the mark) and restart the proxy. The mark
//! defends against restoring the keyring file alone; keep backups of the mark with the
//! keyring's and treat write access to the directory as access to the keys' states.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use zeroize::{Zeroize, Zeroizing};

use super::{BackendError, DataKey, KeyDescription, RootKeyProvider};
use crate::envelope::{Context, WrappedKey, fill_random};

mod import;
mod lifecycle;

pub use import::ImportParams;
pub use lifecycle::{DAY, KeyInfo, KeyState, date, parse_date, validate_alias};

const FORMAT: &str = "envelope-proxy.keyring.v1";
const WRAP_LABEL: &[u8] = b"envelope-proxy.local-wrap.v1";
const BLOB_LEN: usize = 12 + 32 + 16;
const MARK_FORMAT: &str = "envelope-proxy.keyring-generation.v1";
const KEYRING_NAME: &str = "local";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkDoc {
    format: String,
    generation: u64,
    mac: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn mark_path(keyring: &Path) -> PathBuf {
    let mut p = keyring.as_os_str().to_owned();
    p.push(".generation");
    PathBuf::from(p)
}

/// HMAC-SHA-256 of the mark under a key derived from the master key (never the master key
/// itself): `HMAC(HMAC(master, LABEL), LABEL ‖ u64be(generation))`.
fn mark_hmac(master: &[u8; 32], generation: u64) -> hmac::Hmac<sha2::Sha256> {
    use hmac::{KeyInit, Mac};
    let mut derive = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(master)
        .expect("HMAC takes any key length");
    derive.update(MARK_FORMAT.as_bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&derive.finalize().into_bytes());
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_ref())
        .expect("HMAC takes any key length");
    mac.update(MARK_FORMAT.as_bytes());
    mac.update(&generation.to_be_bytes());
    mac
}

fn mark_mac_into(master: &[u8; 32], generation: u64, out: &mut [u8; 32]) {
    use hmac::Mac;
    out.copy_from_slice(&mark_hmac(master, generation).finalize().into_bytes());
}

/// Whether `given` is the mark's MAC (constant time).
fn mark_mac(master: &[u8; 32], generation: u64, given: Option<&[u8]>) -> bool {
    use hmac::Mac;
    given.is_some_and(|g| mark_hmac(master, generation).verify_slice(g).is_ok())
}

pub use crate::config::keys::MasterKeySource;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("root key {0} not found")]
    NotFound(String),
    #[error("root key {0} already exists")]
    Exists(String),
    /// The keyring file is older than one already seen: a backup was restored over it.
    #[error(
        "{path}: keyring generation {found} is older than generation {seen} already seen ({mark}): \
         an older copy of the keyring was restored, which would re-enable disabled keys or undo \
         rotations. Restore the newest keyring; to go back to this copy on purpose, run \
         `envelope-proxy keys accept-generation {found}` and restart the proxies"
    )]
    Rollback {
        path: PathBuf,
        mark: String,
        found: u64,
        seen: u64,
    },
}

fn file_err(path: &Path, message: impl Into<String>) -> KeyringError {
    KeyringError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// One version of a root key.
struct Version {
    created: u64,
    material: Zeroizing<[u8; 32]>,
}

struct RootKey {
    state: KeyState,
    created: u64,
    versions: BTreeMap<u32, Version>,
    life: lifecycle::Life,
}

impl RootKey {
    fn current(&self) -> Option<(u32, &Version)> {
        self.versions.iter().next_back().map(|(v, k)| (*v, k))
    }

    fn enabled(&self) -> bool {
        self.state == KeyState::Enabled
    }
}

/// A line of `keys list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    pub name: String,
    pub enabled: bool,
    pub state: KeyState,
    pub created: u64,
    pub current_version: u32,
    pub versions: usize,
}

// The sealed inner document. Key material is base64 in `material` and wiped after parsing.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InnerDoc {
    /// Raised by every write; absent (0) in keyrings written before rollback protection.
    #[serde(default, skip_serializing_if = "is_zero")]
    generation: u64,
    keys: BTreeMap<String, InnerKey>,
    /// `alias/NAME` → key name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    aliases: BTreeMap<String, String>,
    /// `alias/NAME` → the keys it pointed to before: a route naming the alias still opens
    /// what was sealed under them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    alias_history: BTreeMap<String, std::collections::BTreeSet<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InnerKey {
    state: String,
    created: u64,
    versions: Vec<InnerVersion>,
    #[serde(default, skip_serializing_if = "lifecycle::InnerLife::is_empty")]
    life: lifecycle::InnerLife,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InnerVersion {
    version: u32,
    created: u64,
    material: String,
}

impl Drop for InnerVersion {
    fn drop(&mut self) {
        self.material.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OuterDoc {
    format: String,
    nonce: String,
    sealed: String,
}

/// The keys and aliases of a keyring, as read from (and written to) its file.
#[derive(Default)]
struct Keys {
    keys: BTreeMap<String, RootKey>,
    aliases: BTreeMap<String, String>,
    alias_history: BTreeMap<String, std::collections::BTreeSet<String>>,
}

pub struct Keyring {
    name: String,
    path: PathBuf,
    master: Zeroizing<[u8; 32]>,
    keys: RwLock<Keys>,
    /// When each key version was last used by this process (`key/version` → unix seconds);
    /// written to `PATH.usage` at most once a minute ([`lifecycle`]).
    usage: std::sync::Mutex<lifecycle::Usage>,
    stamp: std::sync::Mutex<Option<(SystemTime, u64)>>,
    changes: watch::Sender<u64>,
    /// The highest generation this process has loaded (never goes down).
    seen: std::sync::Mutex<u64>,
    /// Where refused rollbacks are counted (set by the server).
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl Keyring {
    /// Open the keyring at `path`, creating an empty one (and, if the keyring is new, the master
    /// key file) when missing.
    pub fn open(
        name: &str,
        path: &Path,
        master: &MasterKeySource,
    ) -> Result<Arc<Keyring>, KeyringError> {
        let fresh = !path.exists();
        let master_key = load_master_key(master, fresh)?;
        let keyring = Keyring {
            name: name.to_string(),
            path: path.to_path_buf(),
            master: master_key,
            keys: RwLock::new(Keys::default()),
            usage: std::sync::Mutex::new(lifecycle::Usage::default()),
            stamp: std::sync::Mutex::new(None),
            changes: watch::channel(0).0,
            seen: std::sync::Mutex::new(0),
            metrics: std::sync::OnceLock::new(),
        };
        if fresh {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                create_private_dir(dir)?;
            }
            let _lock = keyring.lock()?;
            if !path.exists() {
                let generation = keyring.high_water()? + 1;
                keyring.write(&Keys::default(), generation)?;
                keyring.write_high_water(generation)?;
                tracing::warn!(path = %path.display(), "created a new, empty keyring");
            }
        }
        keyring.reload()?;
        Ok(Arc::new(keyring))
    }

    /// Count refused rollbacks in `metrics`.
    pub fn report_to(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// A key for another purpose, derived from the master key (which it cannot reveal):
    /// HMAC-SHA-256(master, `label`). Each purpose has its own label (the audit chain's key,
    /// grant tokens), so no derived key says anything about another or about the master.
    pub fn derive_key(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use hmac::{KeyInit, Mac};
        let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(self.master.as_ref())
            .expect("HMAC takes a key of any length");
        m.update(label);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&m.finalize().into_bytes());
        key
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keyring's generation as loaded.
    pub fn generation(&self) -> u64 {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-read the file if it changed on disk; tell the cache when it did. A file older than
    /// what was loaded before is refused (the keys in memory stay) and not re-read until it
    /// changes again.
    pub fn reload_if_changed(&self) -> Result<bool, KeyringError> {
        let stamp = file_stamp(&self.path)?;
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == Some(stamp) {
            return Ok(false);
        }
        if let Err(e) = self.reload() {
            if matches!(e, KeyringError::Rollback { .. }) {
                *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
                if let Some(m) = self.metrics.get() {
                    m.keyring_rollback_refused();
                }
            }
            return Err(e);
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Poll the file every `every` until the keyring is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // A read-only keyring (a mounted Secret) cannot take scheduled changes or usage
            // notes: said once a minute, not every second. Keys past their deletion date stay
            // refused meanwhile (their state already refuses every use).
            let mut quiet_until = std::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(k) = weak.upgrade() else { break };
                let loud = std::time::Instant::now() >= quiet_until;
                let mut failed = false;
                // Scheduled deletion, expiry of imported material, scheduled rotation.
                if let Err(e) = k.apply_due(unix_now()) {
                    failed = true;
                    if loud {
                        tracing::error!(error = %e, "cannot apply the keyring's scheduled changes");
                    }
                }
                if let Err(e) = k.flush_usage(false) {
                    failed = true;
                    if loud {
                        tracing::warn!(error = %e, "cannot record key usage");
                    }
                }
                if failed && loud {
                    quiet_until = std::time::Instant::now() + Duration::from_secs(60);
                }
                match k.reload_if_changed() {
                    Ok(true) => tracing::info!(path = %k.path.display(), "keyring reloaded"),
                    Ok(false) => {}
                    Err(e @ KeyringError::Rollback { .. }) => {
                        tracing::error!(error = %e, "keyring rollback refused; keeping the keys in memory")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "keyring reload failed; keeping the keys in memory")
                    }
                }
            }
        });
    }

    fn reload(&self) -> Result<(), KeyringError> {
        let stamp = file_stamp(&self.path)?;
        let (keys, generation) = self.read()?;
        let high_water = self.high_water()?;
        let seen = self.generation().max(high_water);
        if generation < seen {
            return Err(KeyringError::Rollback {
                path: self.path.clone(),
                mark: if high_water == seen {
                    self.mark_path().display().to_string()
                } else {
                    "in this process's memory".into()
                },
                found: generation,
                seen,
            });
        }
        if generation > high_water
            && let Err(e) = self.write_high_water(generation)
        {
            // A read-only keyring (a mounted Secret): memory still protects this process.
            tracing::warn!(error = %e, "cannot record the keyring generation; rollback protection is in memory only");
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = Some(stamp);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = generation;
        Ok(())
    }

    /// `PATH.generation`: the highest generation recorded next to the keyring.
    fn mark_path(&self) -> PathBuf {
        mark_path(&self.path)
    }

    /// The recorded high-water mark (0 when there is none yet). A mark whose MAC does not
    /// verify under this master key is an error, never ignored.
    fn high_water(&self) -> Result<u64, KeyringError> {
        let path = self.mark_path();
        let raw = match fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(file_err(&path, e.to_string())),
        };
        let doc: MarkDoc = serde_json::from_slice(&raw)
            .map_err(|_| file_err(&path, "is not a keyring generation mark (malformed JSON)"))?;
        let mac = hex::decode(&doc.mac).unwrap_or_default();
        if doc.format != MARK_FORMAT || !mark_mac(&self.master, doc.generation, Some(&mac)) {
            return Err(file_err(
                &path,
                "the keyring generation mark does not verify under this master key (modified, \
                 or from another keyring); restore it, or run `envelope-proxy keys \
                 accept-generation N` with the keyring's generation",
            ));
        }
        Ok(doc.generation)
    }

    fn write_high_water(&self, generation: u64) -> Result<(), KeyringError> {
        let mut mac = [0u8; 32];
        mark_mac_into(&self.master, generation, &mut mac);
        let doc = MarkDoc {
            format: MARK_FORMAT.into(),
            generation,
            mac: hex::encode(mac),
        };
        let json =
            serde_json::to_vec_pretty(&doc).map_err(|e| KeyringError::Invalid(e.to_string()))?;
        write_atomically(&self.mark_path(), &json)
    }

    /// Knowingly go back to the keyring file as it is (a restored backup): set the mark to its
    /// generation, which must be `expected`. Running proxies keep refusing it until restarted.
    pub fn accept_generation(
        path: &Path,
        master: &MasterKeySource,
        expected: u64,
    ) -> Result<(), KeyringError> {
        let keyring = Keyring {
            name: KEYRING_NAME.into(),
            path: path.to_path_buf(),
            master: load_master_key(master, false)?,
            keys: RwLock::new(Keys::default()),
            usage: std::sync::Mutex::new(lifecycle::Usage::default()),
            stamp: std::sync::Mutex::new(None),
            changes: watch::channel(0).0,
            seen: std::sync::Mutex::new(0),
            metrics: std::sync::OnceLock::new(),
        };
        let _lock = keyring.lock()?;
        let (_, generation) = keyring.read()?;
        if generation != expected {
            return Err(KeyringError::Invalid(format!(
                "{}: the keyring is generation {generation}, not {expected}",
                path.display()
            )));
        }
        keyring.write_high_water(generation)
    }

    pub fn list(&self) -> Vec<KeySummary> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.keys
            .iter()
            .map(|(name, k)| KeySummary {
                name: name.clone(),
                enabled: k.enabled(),
                state: k.state,
                created: k.created,
                current_version: k.current().map(|(v, _)| v).unwrap_or(0),
                versions: k.versions.len(),
            })
            .collect()
    }

    /// Create root key `name` with one fresh version.
    pub fn create_key(&self, name: &str) -> Result<KeySummary, KeyringError> {
        validate_key_name(name)?;
        self.modify(name, |keys| {
            if keys.keys.contains_key(name) {
                return Err(KeyringError::Exists(name.to_string()));
            }
            let now = unix_now();
            let mut versions = BTreeMap::new();
            versions.insert(1, new_version(now));
            keys.keys.insert(
                name.to_string(),
                RootKey {
                    state: KeyState::Enabled,
                    created: now,
                    versions,
                    life: lifecycle::Life::default(),
                },
            );
            Ok(())
        })
    }

    /// Add a new version to `name`; new data keys use it, older versions still unwrap. Keys
    /// with imported material cannot be rotated (as in AWS KMS): make a new key and re-point
    /// the alias.
    pub fn rotate_key(&self, name: &str) -> Result<KeySummary, KeyringError> {
        self.modify(name, |keys| {
            let key = keys
                .keys
                .get_mut(name)
                .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
            lifecycle::rotate(name, key, unix_now())
        })
    }

    /// Disable or enable `name`. A disabled key neither wraps nor unwraps (as in AWS KMS):
    /// data under it is unreadable until it is enabled again. Cached data keys are dropped.
    /// Only an enabled or disabled key changes so (a key pending deletion is cancelled first,
    /// one pending import gets its material).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<KeySummary, KeyringError> {
        self.modify(name, |keys| {
            let key = keys
                .keys
                .get_mut(name)
                .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
            match key.state {
                KeyState::Enabled | KeyState::Disabled => {}
                other => {
                    return Err(KeyringError::Invalid(format!(
                        "root key {name} is {}: {}",
                        other.name(),
                        other.hint()
                    )));
                }
            }
            key.state = if enabled {
                KeyState::Enabled
            } else {
                KeyState::Disabled
            };
            Ok(())
        })
    }

    fn modify(
        &self,
        name: &str,
        change: impl FnOnce(&mut Keys) -> Result<(), KeyringError>,
    ) -> Result<KeySummary, KeyringError> {
        self.modify_all(change)?;
        self.list()
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| KeyringError::NotFound(name.to_string()))
    }

    /// Change the keyring under its lock: re-read, change, write the next generation.
    fn modify_all(
        &self,
        change: impl FnOnce(&mut Keys) -> Result<(), KeyringError>,
    ) -> Result<(), KeyringError> {
        let _lock = self.lock()?;
        // Refuses a rolled-back file before changing anything.
        self.reload()?;
        let (mut keys, generation) = self.read()?;
        change(&mut keys)?;
        let next = generation.max(self.generation()).max(self.high_water()?) + 1;
        self.write(&keys, next)?;
        self.write_high_water(next)?;
        self.reload()?;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    fn lock(&self) -> Result<File, KeyringError> {
        let lock_path = self.path.with_extension("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| file_err(&lock_path, e.to_string()))?;
        f.lock().map_err(|e| file_err(&lock_path, e.to_string()))?;
        Ok(f)
    }

    fn read(&self) -> Result<(Keys, u64), KeyringError> {
        let path = &self.path;
        check_private(path)?;
        let raw = fs::read(path).map_err(|e| file_err(path, e.to_string()))?;
        let outer: OuterDoc = serde_json::from_slice(&raw).map_err(|_| {
            file_err(
                path,
                "is not a keyring file (malformed JSON); restore it from a backup",
            )
        })?;
        if outer.format != FORMAT {
            return Err(file_err(
                path,
                format!("unsupported keyring format {:?}", outer.format),
            ));
        }
        let nonce: [u8; 12] = B64
            .decode(&outer.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| file_err(path, "malformed keyring nonce"))?;
        let mut sealed = Zeroizing::new(
            B64.decode(&outer.sealed)
                .map_err(|_| file_err(path, "malformed keyring body"))?,
        );
        if sealed.len() < 16 {
            return Err(file_err(path, "truncated keyring body"));
        }
        let split = sealed.len() - 16;
        let (body, tag) = sealed.split_at_mut(split);
        let tag: [u8; 16] = (&*tag)
            .try_into()
            .map_err(|_| file_err(path, "truncated keyring body"))?;
        Aes256Gcm::new(&Array::from(*self.master))
            .decrypt_inout_detached(&Array::from(nonce), FORMAT.as_bytes(), body.into(), &Array::from(tag))
            .map_err(|_| {
                file_err(path, "does not open with this master key (wrong master key, or the file was modified)")
            })?;
        let mut inner: InnerDoc = serde_json::from_slice(body)
            .map_err(|_| file_err(path, "sealed keyring content is malformed"))?;
        let generation = inner.generation;
        let mut keys = BTreeMap::new();
        for (name, mut k) in inner.keys {
            let mut versions = BTreeMap::new();
            for v in &k.versions {
                let material = Zeroizing::new(
                    B64.decode(&v.material)
                        .ok()
                        .map(Zeroizing::new)
                        .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
                        .ok_or_else(|| {
                            file_err(
                                path,
                                format!("key {name} version {} is malformed", v.version),
                            )
                        })?,
                );
                versions.insert(
                    v.version,
                    Version {
                        created: v.created,
                        material,
                    },
                );
            }
            let state = KeyState::parse(&k.state).ok_or_else(|| {
                file_err(
                    path,
                    format!("key {name} has an unknown state {:?}", k.state),
                )
            })?;
            let life = lifecycle::Life::read(std::mem::take(&mut k.life))
                .map_err(|e| file_err(path, format!("key {name}: {e}")))?;
            keys.insert(
                name,
                RootKey {
                    state,
                    created: k.created,
                    versions,
                    life,
                },
            );
        }
        Ok((
            Keys {
                keys,
                aliases: std::mem::take(&mut inner.aliases),
                alias_history: std::mem::take(&mut inner.alias_history),
            },
            generation,
        ))
    }

    fn write(&self, keys: &Keys, generation: u64) -> Result<(), KeyringError> {
        let inner = InnerDoc {
            generation,
            aliases: keys.aliases.clone(),
            alias_history: keys.alias_history.clone(),
            keys: keys
                .keys
                .iter()
                .map(|(name, k)| {
                    (
                        name.clone(),
                        InnerKey {
                            state: k.state.name().to_string(),
                            life: k.life.write(),
                            created: k.created,
                            versions: k
                                .versions
                                .iter()
                                .map(|(v, ver)| InnerVersion {
                                    version: *v,
                                    created: ver.created,
                                    material: B64.encode(ver.material.as_ref()),
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
        };
        let mut body = Zeroizing::new(
            serde_json::to_vec(&inner).map_err(|e| KeyringError::Invalid(e.to_string()))?,
        );
        drop(inner);
        let mut nonce = [0u8; 12];
        fill_random(&mut nonce);
        let tag = Aes256Gcm::new(&Array::from(*self.master))
            .encrypt_inout_detached(
                &Array::from(nonce),
                FORMAT.as_bytes(),
                body.as_mut_slice().into(),
            )
            .map_err(|_| KeyringError::Invalid("keyring too large".into()))?;
        body.extend_from_slice(&tag);
        let outer = OuterDoc {
            format: FORMAT.to_string(),
            nonce: B64.encode(nonce),
            sealed: B64.encode(body.as_slice()),
        };
        let json =
            serde_json::to_vec_pretty(&outer).map_err(|e| KeyringError::Invalid(e.to_string()))?;
        write_atomically(&self.path, &json)
    }

    /// Run `f` on key `key_id` (an alias is followed) when its state allows use: only an
    /// enabled key wraps or unwraps. A refusal for the key's state is counted (the alarm on use
    /// of a key pending deletion). `f` gets the key's own name.
    fn with_key<T>(
        &self,
        key_id: &str,
        f: impl FnOnce(&str, &RootKey) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let name = keys.resolve(key_id);
        let key = keys
            .keys
            .get(name)
            .ok_or_else(|| BackendError::KeyNotFound(key_id.to_string()))?;
        if let Err(e) = lifecycle::usable(name, key) {
            if let Some(m) = self.metrics.get() {
                m.key_state_refused(name, key.state.name());
            }
            tracing::warn!(key = %name, state = key.state.name(), "use of a root key refused for its state");
            return Err(e);
        }
        f(name, key)
    }

    fn wrap(
        &self,
        key_id: &str,
        data_key: &DataKey,
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        let wrapped = self.with_key(key_id, |name, key| {
            let (version, material) = key
                .current()
                .ok_or_else(|| BackendError::KeyNotFound(key_id.to_string()))?;
            let mut nonce = [0u8; 12];
            fill_random(&mut nonce);
            let mut blob = Vec::with_capacity(BLOB_LEN);
            blob.extend_from_slice(&nonce);
            blob.extend_from_slice(data_key.expose());
            let tag = Aes256Gcm::new(&Array::from(*material.material))
                .encrypt_inout_detached(
                    &Array::from(nonce),
                    &wrap_aad(name, version, ctx),
                    (&mut blob[12..]).into(),
                )
                .map_err(|_| BackendError::Unavailable("local wrap failed".into()))?;
            blob.extend_from_slice(&tag);
            // The EDK names the key itself, never an alias: re-pointing the alias later leaves
            // what was written under this key readable.
            Ok(WrappedKey {
                backend: self.name.clone(),
                key_id: name.to_string(),
                key_version: version,
                blob,
            })
        })?;
        self.used(&wrapped.key_id, wrapped.key_version);
        Ok(wrapped)
    }
}

#[async_trait]
impl RootKeyProvider for Keyring {
    fn name(&self) -> &str {
        &self.name
    }

    async fn wrap_data_key(
        &self,
        key_id: &str,
        data_key: &DataKey,
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        self.wrap(key_id, data_key, ctx)
    }

    /// `wrapped.blob` is attacker controlled: every length is checked, nothing here panics.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &Context,
    ) -> Result<DataKey, BackendError> {
        let data_key = self.with_key(&wrapped.key_id, |name, key| {
            // An EDK names a key, never an alias (a name that resolves elsewhere is foreign).
            if name != wrapped.key_id {
                return Err(BackendError::InvalidCiphertext);
            }
            let version = key
                .versions
                .get(&wrapped.key_version)
                .ok_or(BackendError::InvalidCiphertext)?;
            if wrapped.blob.len() != BLOB_LEN {
                return Err(BackendError::InvalidCiphertext);
            }
            let nonce: [u8; 12] = wrapped.blob[..12]
                .try_into()
                .map_err(|_| BackendError::InvalidCiphertext)?;
            let tag: [u8; 16] = wrapped.blob[44..]
                .try_into()
                .map_err(|_| BackendError::InvalidCiphertext)?;
            let mut key_bytes = Zeroizing::new([0u8; 32]);
            key_bytes.copy_from_slice(&wrapped.blob[12..44]);
            Aes256Gcm::new(&Array::from(*version.material))
                .decrypt_inout_detached(
                    &Array::from(nonce),
                    &wrap_aad(&wrapped.key_id, wrapped.key_version, ctx),
                    key_bytes.as_mut_slice().into(),
                    &Array::from(tag),
                )
                .map_err(|_| BackendError::InvalidCiphertext)?;
            Ok(DataKey::from_bytes(*key_bytes))
        })?;
        self.used(&wrapped.key_id, wrapped.key_version);
        Ok(data_key)
    }

    /// `key_id` may be an alias: the description is of the key it points to (named so).
    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let name = keys.resolve(key_id);
        let key = keys
            .keys
            .get(name)
            .ok_or_else(|| BackendError::KeyNotFound(key_id.to_string()))?;
        Ok(KeyDescription {
            key_id: name.to_string(),
            enabled: key.enabled(),
            current_version: key.current().map(|(v, _)| v).unwrap_or(0),
        })
    }

    /// A route naming an alias opens what was sealed under any key the alias pointed to (now
    /// or before): re-pointing it leaves old data readable through the same route.
    fn same_key(&self, configured: &str, wrapped_key_id: &str) -> bool {
        if configured == wrapped_key_id {
            return true;
        }
        if !configured.starts_with(lifecycle::ALIAS_PREFIX) {
            return false;
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.aliases
            .get(configured)
            .is_some_and(|k| k == wrapped_key_id)
            || keys
                .alias_history
                .get(configured)
                .is_some_and(|h| h.contains(wrapped_key_id))
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

fn wrap_aad(key_id: &str, version: u32, ctx: &Context) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(WRAP_LABEL);
    aad.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&ctx.canonical());
    aad
}

fn new_version(created: u64) -> Version {
    let mut material = Zeroizing::new([0u8; 32]);
    fill_random(material.as_mut());
    Version { created, material }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn validate_key_name(name: &str) -> Result<(), KeyringError> {
    if name.starts_with(lifecycle::ALIAS_PREFIX) {
        return Err(KeyringError::Invalid(format!(
            "{name:?}: names starting with alias/ are aliases (`keys alias create`)"
        )));
    }
    crate::config::keys::validate_key_name(name).map_err(KeyringError::Invalid)
}

fn file_stamp(path: &Path) -> Result<(SystemTime, u64), KeyringError> {
    let meta = fs::metadata(path).map_err(|e| file_err(path, e.to_string()))?;
    Ok((meta.modified().unwrap_or(UNIX_EPOCH), meta.len()))
}

/// Refuse a secret file that group or others can access.
pub(crate) fn check_private(path: &Path) -> Result<(), KeyringError> {
    #[cfg(unix)]
    {
        crate::secret::check_private(path).map_err(|e| file_err(path, e))?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), KeyringError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| file_err(dir, e.to_string()))
}

fn open_private(path: &Path, create_new: bool) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// temp file in the same directory → write → fsync → rename → fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KeyringError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("keyring"),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut f = open_private(&tmp, true)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| file_err(path, format!("write failed: {e}")))
}

fn load_master_key(
    source: &MasterKeySource,
    may_create: bool,
) -> Result<Zeroizing<[u8; 32]>, KeyringError> {
    match source {
        MasterKeySource::Env(var) => {
            let value = Zeroizing::new(std::env::var(var).map_err(|_| {
                KeyringError::Invalid(format!(
                    "environment variable {var} (the keyring master key) is not set"
                ))
            })?);
            parse_master_key(value.trim().as_bytes()).ok_or_else(|| {
                KeyringError::Invalid(format!(
                    "environment variable {var} must hold 64 hex characters (32 bytes)"
                ))
            })
        }
        MasterKeySource::File(path) => {
            if !path.exists() {
                if !may_create {
                    return Err(file_err(
                        path,
                        "master key file is missing but the keyring exists: restore the master key \
                         (a new one cannot open the existing keyring)",
                    ));
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    create_private_dir(dir)?;
                }
                let mut key = Zeroizing::new([0u8; 32]);
                fill_random(key.as_mut());
                let hex_key = Zeroizing::new(hex::encode(key.as_ref()) + "\n");
                let mut f = open_private(path, true).map_err(|e| file_err(path, e.to_string()))?;
                f.write_all(hex_key.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| file_err(path, e.to_string()))?;
                tracing::warn!(path = %path.display(), "generated a new keyring master key; back it up: without it the keyring cannot be opened");
                return Ok(key);
            }
            check_private(path)?;
            let raw = Zeroizing::new(fs::read(path).map_err(|e| file_err(path, e.to_string()))?);
            parse_master_key(&raw)
                .ok_or_else(|| file_err(path, "must hold 64 hex characters or 32 raw bytes"))
        }
    }
}

fn parse_master_key(raw: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(raw);
        return Some(key);
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    hex::decode_to_slice(text, key.as_mut()).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_tmp(dir: &Path) -> Arc<Keyring> {
        Keyring::open(
            "local",
            &dir.join("keyring.json"),
            &MasterKeySource::File(dir.join("master.key")),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn rotation_keeps_old_versions_unwrapping() {
        let dir = tempfile::tempdir().unwrap();
        let kr = open_tmp(dir.path());
        kr.create_key("users").unwrap();
        let ctx: Context = [("tenant", "acme")].into_iter().collect();
        let g1 = kr.generate_data_key("users", &ctx).await.unwrap();
        assert_eq!(g1.wrapped.key_version, 1);
        kr.rotate_key("users").unwrap();
        let g2 = kr.generate_data_key("users", &ctx).await.unwrap();
        assert_eq!(g2.wrapped.key_version, 2);
        // Reopen from disk: both versions still unwrap.
        let kr2 = open_tmp(dir.path());
        let k1 = kr2.unwrap_data_key(&g1.wrapped, &ctx).await.unwrap();
        assert_eq!(k1.expose(), g1.plaintext.expose());
        let other: Context = [("tenant", "globex")].into_iter().collect();
        assert!(matches!(
            kr2.unwrap_data_key(&g1.wrapped, &other).await,
            Err(BackendError::InvalidCiphertext)
        ));
        let mut bad = g2.wrapped.clone();
        bad.blob[20] ^= 1;
        assert!(kr2.unwrap_data_key(&bad, &ctx).await.is_err());
        bad.blob.truncate(3);
        assert!(kr2.unwrap_data_key(&bad, &ctx).await.is_err());
    }

    #[test]
    fn refuses_world_readable_and_tampered_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kr = open_tmp(dir.path());
        kr.create_key("k").unwrap();
        let path = dir.path().join("keyring.json");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::open(
            "local",
            &path,
            &MasterKeySource::File(dir.path().join("master.key")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("chmod 0400"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let sealed = doc["sealed"].as_str().unwrap().to_string();
        let mut raw = B64.decode(sealed).unwrap();
        raw[3] ^= 1;
        doc["sealed"] = B64.encode(raw).into();
        fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
        let err = Keyring::open(
            "local",
            &path,
            &MasterKeySource::File(dir.path().join("master.key")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("does not open"), "{err}");
        fs::write(&path, b"{not json").unwrap();
        let err = Keyring::open(
            "local",
            &path,
            &MasterKeySource::File(dir.path().join("master.key")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("malformed"), "{err}");
    }

    #[test]
    fn restoring_an_older_keyring_is_refused_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let master = MasterKeySource::File(dir.path().join("master.key"));
        let kr = open_tmp(dir.path());
        kr.create_key("k").unwrap();
        let backup = fs::read(&path).unwrap();
        let old = kr.generation();
        kr.set_enabled("k", false).unwrap();
        assert!(kr.generation() > old);

        // The backup goes back over the file: the running keyring refuses it and keeps the key
        // disabled; a fresh open (CLI, restarted proxy) refuses it, naming the fix.
        fs::write(&path, &backup).unwrap();
        let e = kr.reload_if_changed().unwrap_err();
        assert!(matches!(e, KeyringError::Rollback { .. }), "{e}");
        assert!(!kr.list()[0].enabled, "the disabled key stays disabled");
        assert!(
            !kr.reload_if_changed().unwrap(),
            "refused once, not re-read every second"
        );
        let e = Keyring::open("local", &path, &master)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("keys accept-generation {old}")), "{e}");

        // A mark rewritten to a lower number without the master key does not verify.
        let mark = mark_path(&path);
        let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&mark).unwrap()).unwrap();
        doc["generation"] = old.into();
        fs::write(&mark, serde_json::to_vec(&doc).unwrap()).unwrap();
        let e = Keyring::open("local", &path, &master)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");

        // Knowingly accepting the backup (with the master key) opens it again.
        assert!(Keyring::accept_generation(&path, &master, old + 5).is_err());
        Keyring::accept_generation(&path, &master, old).unwrap();
        let restored = Keyring::open("local", &path, &master).unwrap();
        assert!(restored.list()[0].enabled);
        assert_eq!(restored.generation(), old);
    }

    #[test]
    fn a_keyring_without_a_generation_reads_as_zero_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let kr = open_tmp(dir.path());
        kr.create_key("k").unwrap();
        // As written before generations existed: no field in the sealed document, no mark.
        let keys = kr.read().unwrap().0;
        kr.write(&keys, 0).unwrap();
        fs::remove_file(mark_path(&path)).unwrap();
        let old = open_tmp(dir.path());
        assert_eq!(old.generation(), 0);
        old.rotate_key("k").unwrap();
        assert_eq!(old.generation(), 1);
        assert_eq!(old.high_water().unwrap(), 1);
    }

    #[test]
    fn the_master_key_never_appears_in_the_keyring_file() {
        let dir = tempfile::tempdir().unwrap();
        let kr = open_tmp(dir.path());
        kr.create_key("k").unwrap();
        let master = fs::read_to_string(dir.path().join("master.key")).unwrap();
        let file = fs::read_to_string(dir.path().join("keyring.json")).unwrap();
        assert!(!file.contains(master.trim()));
        assert!(!file.contains("\"k\""), "key names are sealed too");
    }
}
