//! Grants: runtime delegation of key use, as AWS KMS grants work.
//!
//! A [`Grant`] lets one principal (the grantee) do some data-key operations
//! ([`Action::grantable`]) with one key, optionally only under encryption contexts that equal,
//! or contain, given pairs. Grants are created, listed, retired (by the grantee or the retiring
//! principal) and revoked (by an administrator) through the admin API or the CLI.
//!
//! ## The grants file
//!
//! Replicas share one JSON file (default `grants.json` beside the keyring file;
//! `[grants] path` overrides). Every change is a read-modify-write under an exclusive lock on
//! `PATH.lock`, written atomically (temp file 0600, fsync, rename, fsync of the directory), so
//! replicas sharing the file do not lose each other's changes. Each replica reads the file
//! again every `[grants] reload_secs` and bumps [`Grants::generation`] when it changed (cached
//! policy decisions made before are not reused).
//!
//! ```text
//! {"format": "envelope-proxy.grants.v1",
//!  "body": {"revision": N, "grants": [Grant...], "revoked": {"<id>": forget_after_unix}},
//!  "mac": hex(HMAC-SHA-256(file key, "envelope-proxy.grants-file.v1\n" ‖ JSON(body)))}
//! ```
//!
//! The MAC (under a key derived like the token key) makes a file changed by hand, or by
//! anyone without the key, refused: granting oneself access takes the key. A file whose
//! `revision` is lower than one already loaded (a restored copy, which would bring revoked
//! grants back) is refused by a running replica, which keeps what it has.
//!
//! Revoked and retired grants are removed from `grants` and their ids remembered in `revoked`
//! for as long as a token issued before could still be accepted, so every replica that has
//! read the file refuses their tokens.
//!
//! ## Grant tokens
//!
//! Creating a grant returns a token carrying the grant itself, so a replica that has not read
//! the file yet accepts it (as KMS grant tokens bridge its eventual consistency):
//!
//! ```text
//! token = "ept1." b64url(payload) "." b64url(HMAC-SHA-256(token key, "envelope-proxy.grant-token.v1\n" ‖ payload))
//! payload = JSON {"v": 1, "iat": unix secs, "grant": Grant}
//! ```
//!
//! A token is refused when longer than [`MAX_TOKEN_BYTES`] (before any decoding), when its MAC
//! does not verify (constant time), when it was issued more than `token_lifetime` ago (or more
//! than a minute in the future), past the grant's own expiry, or when the grant is revoked in
//! the file as this replica last read it. The token key is HKDF-SHA-256 of `[grants]
//! token_key_file` (at least 32 characters), else of a key the keyring derives from its master key, with its own
//! label: every replica sharing the keyring has it, and it opens nothing else. Clients send
//! tokens in [`GRANT_TOKEN_HEADER`] (several comma-separated). Tokens are never logged.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::auth::Principal;
use crate::config::Action;
use crate::config::auth::GrantSettings;
use crate::envelope::{Context, fill_random};
use crate::keys::KeyRef;

/// The request header carrying grant tokens (one or more, comma-separated).
pub const GRANT_TOKEN_HEADER: &str = "x-envelope-grant-token";
/// Every grant token starts with this (the format's version).
pub const TOKEN_PREFIX: &str = "ept1.";
/// Longer tokens are refused before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// At most this many tokens of one request are looked at.
pub const MAX_TOKENS: usize = 10;
/// The longest token lifetime a configuration may set (`token_lifetime_secs`).
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 3600;
/// Clock skew allowed on a token's issue time.
const ISSUE_SKEW_SECS: u64 = 60;
/// Grants one file may hold.
pub const MAX_GRANTS: usize = 50_000;
const MAX_CONSTRAINT_PAIRS: usize = 32;
const MAX_NAME_LEN: usize = 512;

const FILE_FORMAT: &str = "envelope-proxy.grants.v1";
const TOKEN_LABEL: &[u8] = b"envelope-proxy.grant-token.v1\n";
const FILE_LABEL: &[u8] = b"envelope-proxy.grants-file.v1\n";
const HKDF_SALT: &[u8] = b"envelope-proxy.grants.v1";
const TOKEN_KEY_INFO: &[u8] = b"grant-token key";
const FILE_KEY_INFO: &[u8] = b"grants-file key";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Grants.

/// Context constraints of a grant (KMS `EncryptionContextEquals` / `EncryptionContextSubset`):
/// at most one is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// The request's context must be exactly these pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<BTreeMap<String, String>>,
    /// The request's context must contain these pairs (and may hold more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<BTreeMap<String, String>>,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.equals.is_none() && self.subset.is_none()
    }

    /// Whether `context` satisfies the constraints.
    pub fn holds(&self, context: &Context) -> bool {
        if let Some(eq) = &self.equals
            && (context.len() != eq.len()
                || !eq.iter().all(|(k, v)| context.get(k) == Some(v.as_str())))
        {
            return false;
        }
        if let Some(sub) = &self.subset
            && !sub.iter().all(|(k, v)| context.get(k) == Some(v.as_str()))
        {
            return false;
        }
        true
    }
}

/// One grant, as stored in the file and carried by its tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub id: String,
    #[serde(with = "key_ref")]
    pub key: KeyRef,
    /// The principal name the grant is for.
    pub grantee: String,
    /// Grantable actions only.
    #[serde(with = "action_names")]
    pub operations: Vec<Action>,
    #[serde(default, skip_serializing_if = "Constraints::is_empty")]
    pub constraints: Constraints,
    /// Who besides the grantee may retire it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_principal: Option<String>,
    /// Unix seconds after which the grant allows nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub created_at: u64,
    pub created_by: String,
}

impl Grant {
    fn live(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }

    /// Whether the grant lets `principal` do `action` with `key` under `context` at `now`.
    pub fn allows(
        &self,
        principal: &str,
        key: &KeyRef,
        action: Action,
        context: &Context,
        now: u64,
    ) -> bool {
        self.grantee == principal
            && self.key == *key
            && self.operations.contains(&action)
            && self.constraints.holds(context)
            && self.live(now)
    }
}

mod key_ref {
    use crate::keys::KeyRef;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &KeyRef, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyRef, D::Error> {
        let s = String::deserialize(d)?;
        KeyRef::parse(&s).ok_or_else(|| serde::de::Error::custom("not a key reference"))
    }
}

mod action_names {
    use crate::config::Action;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &[Action], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(a.iter().map(|a| a.name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Action>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| {
                Action::parse(n)
                    .filter(|a| a.grantable())
                    .ok_or_else(|| serde::de::Error::custom("not a grantable action"))
            })
            .collect()
    }
}

/// What creating a grant takes (the id and creation facts are added by [`Grants::create`]).
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub key: KeyRef,
    pub grantee: String,
    pub operations: Vec<Action>,
    pub constraints: Constraints,
    pub retiring_principal: Option<String>,
    /// Unix seconds; must be in the future.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    #[error("grant {0} not found")]
    NotFound(String),
    /// The caller may not do this to the grant (403).
    #[error("{0}")]
    NotAllowed(String),
    /// The grants file could not be read or written (500); details for the log.
    #[error("grants file: {0}")]
    Storage(String),
    #[error("grants are not enabled on this proxy")]
    Disabled,
}

/// Why a token was refused (for debug logs and tests; clients are told nothing more than
/// "no permission").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("not a grant token")]
    Malformed,
    #[error("token MAC does not verify")]
    BadMac,
    #[error("token expired")]
    Expired,
    #[error("token issued in the future")]
    NotYetValid,
    #[error("the grant has expired")]
    GrantExpired,
    #[error("the grant was revoked or retired")]
    Revoked,
}

// ---------------------------------------------------------------------------------------------
// Keys.

/// The keys of grant tokens and of the grants file's MAC. Zeroized on drop; `Debug` never
/// prints them.
pub struct GrantKeys {
    token: Zeroizing<[u8; 32]>,
    file: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for GrantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantKeys([SENSITIVE])")
    }
}

impl GrantKeys {
    /// HKDF-SHA-256 of `secret` (a key derived from the keyring master key, or a token key file's content) with
    /// the grants' own salt and labels: the secret itself is never used as a key.
    pub fn derive(secret: &[u8]) -> GrantKeys {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let expand = |info: &[u8]| {
            let mut out = Zeroizing::new([0u8; 32]);
            // 32 bytes is one HKDF-SHA-256 block: neither step can fail.
            if let Ok(okm) = prk.expand(&[info], ring::hkdf::HKDF_SHA256) {
                let _ = okm.fill(out.as_mut());
            }
            out
        };
        GrantKeys {
            token: expand(TOKEN_KEY_INFO),
            file: expand(FILE_KEY_INFO),
        }
    }

    /// The keys every replica sharing the keyring derives: from a key the keyring derives
    /// from its master key for grants alone ([`Keyring::derive_key`](crate::keys::keyring::Keyring::derive_key)).
    pub fn from_keyring(keyring: &crate::keys::keyring::Keyring) -> GrantKeys {
        GrantKeys::derive(
            keyring
                .derive_key(b"envelope-proxy.grants.v1 master")
                .as_ref(),
        )
    }

    /// The keys for `settings`: from `token_key_file` (at least 32 characters, mode 0600) when
    /// set, else from the keyring's master key.
    pub fn for_settings(
        settings: &GrantSettings,
        keyring: Option<&crate::keys::keyring::Keyring>,
    ) -> Result<GrantKeys, String> {
        match &settings.token_key {
            Some(source) => {
                let secret = crate::secret::read_secret(source)
                    .map_err(|e| format!("grants.token_key_file: {e}"))?;
                if secret.len() < 32 {
                    return Err(
                        "grants.token_key_file: the key must be at least 32 characters \
                         (e.g. `openssl rand -hex 32`)"
                            .into(),
                    );
                }
                Ok(GrantKeys::derive(secret.as_bytes()))
            }
            None => match keyring {
                Some(keyring) => Ok(GrantKeys::from_keyring(keyring)),
                None => Err("grants.token_key_file: required without [keyring]".into()),
            },
        }
    }

    fn mac(key: &[u8; 32], label: &[u8], body: &[u8]) -> hmac::Hmac<Sha256> {
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .expect("HMAC takes a key of any length");
        m.update(label);
        m.update(body);
        m
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenPayload {
    v: u8,
    iat: u64,
    grant: Grant,
}

fn encode_token(keys: &GrantKeys, grant: &Grant, issued_at: u64) -> Result<String, GrantError> {
    let payload = serde_json::to_vec(&TokenPayload {
        v: 1,
        iat: issued_at,
        grant: grant.clone(),
    })
    .map_err(|e| GrantError::Invalid(e.to_string()))?;
    let tag = GrantKeys::mac(&keys.token, TOKEN_LABEL, &payload)
        .finalize()
        .into_bytes();
    let token = format!(
        "{TOKEN_PREFIX}{}.{}",
        B64URL.encode(&payload),
        B64URL.encode(tag)
    );
    if token.len() > MAX_TOKEN_BYTES {
        return Err(GrantError::Invalid(format!(
            "the grant is too large for a grant token ({MAX_TOKEN_BYTES} bytes at most): use fewer or shorter constraints"
        )));
    }
    Ok(token)
}

/// The token's grant and issue time if its MAC verifies (nothing else checked).
fn decode_token(keys: &GrantKeys, token: &str) -> Result<(Grant, u64), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Malformed)?;
    let (payload, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = B64URL.decode(payload).map_err(|_| TokenError::Malformed)?;
    let tag = B64URL.decode(tag).map_err(|_| TokenError::Malformed)?;
    GrantKeys::mac(&keys.token, TOKEN_LABEL, &payload)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadMac)?;
    let p: TokenPayload = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
    if p.v != 1 {
        return Err(TokenError::Malformed);
    }
    Ok((p.grant, p.iat))
}

/// The grant tokens a request carries in [`GRANT_TOKEN_HEADER`] (every such header, split on
/// commas, blanks dropped; at most [`MAX_TOKENS`]).
pub fn tokens_from(headers: &http::HeaderMap) -> Vec<&str> {
    headers
        .get_all(GRANT_TOKEN_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .take(MAX_TOKENS)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The file.

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    revision: u64,
    grants: Vec<Grant>,
    /// Revoked or retired ids → unix seconds after which no token for them can be valid.
    revoked: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    format: String,
    body: Body,
    mac: String,
}

/// What a replica has loaded, indexed for `find`.
#[derive(Default)]
struct Loaded {
    body: Body,
    by_grantee: HashMap<String, Vec<Arc<Grant>>>,
    /// SHA-256 of the file's bytes as last read (`None`: no file).
    digest: Option<[u8; 32]>,
}

impl Loaded {
    fn new(body: Body, digest: Option<[u8; 32]>) -> Loaded {
        let mut by_grantee: HashMap<String, Vec<Arc<Grant>>> = HashMap::new();
        for g in &body.grants {
            by_grantee
                .entry(g.grantee.clone())
                .or_default()
                .push(Arc::new(g.clone()));
        }
        Loaded {
            body,
            by_grantee,
            digest,
        }
    }
}

struct Store {
    path: PathBuf,
    keys: GrantKeys,
    token_lifetime: u64,
    loaded: RwLock<Loaded>,
}

impl Store {
    fn lock_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn lock(&self) -> Result<File, GrantError> {
        let lock_path = self.lock_path();
        let mut opts = OpenOptions::new();
        opts.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let f = opts
            .open(&lock_path)
            .map_err(|e| GrantError::Storage(format!("{}: {e}", lock_path.display())))?;
        f.lock()
            .map_err(|e| GrantError::Storage(format!("{}: {e}", lock_path.display())))?;
        Ok(f)
    }

    /// The file's body and digest (an empty body when there is no file).
    fn read(&self) -> Result<(Body, Option<[u8; 32]>), GrantError> {
        let path = &self.path;
        let raw = match fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Body::default(), None));
            }
            Err(e) => return Err(GrantError::Storage(format!("{}: {e}", path.display()))),
        };
        crate::keys::keyring::check_private(path)
            .map_err(|e| GrantError::Storage(e.to_string()))?;
        let digest: [u8; 32] = Sha256::digest(&raw).into();
        let doc: FileDoc = serde_json::from_slice(&raw).map_err(|_| {
            GrantError::Storage(format!(
                "{}: is not a grants file (malformed JSON)",
                path.display()
            ))
        })?;
        if doc.format != FILE_FORMAT {
            return Err(GrantError::Storage(format!(
                "{}: unsupported format {:?}",
                path.display(),
                doc.format
            )));
        }
        let body_bytes =
            serde_json::to_vec(&doc.body).map_err(|e| GrantError::Storage(e.to_string()))?;
        let mac = hex::decode(&doc.mac).unwrap_or_default();
        GrantKeys::mac(&self.keys.file, FILE_LABEL, &body_bytes)
            .verify_slice(&mac)
            .map_err(|_| {
                GrantError::Storage(format!(
                    "{}: the MAC does not verify under the grants key (changed by hand, or \
                     another keyring / token key)",
                    path.display()
                ))
            })?;
        Ok((doc.body, Some(digest)))
    }

    fn write(&self, body: &Body) -> Result<[u8; 32], GrantError> {
        let body_bytes =
            serde_json::to_vec(body).map_err(|e| GrantError::Storage(e.to_string()))?;
        let mac = GrantKeys::mac(&self.keys.file, FILE_LABEL, &body_bytes)
            .finalize()
            .into_bytes();
        let doc = FileDoc {
            format: FILE_FORMAT.into(),
            body: body.clone(),
            mac: hex::encode(mac),
        };
        let bytes =
            serde_json::to_vec_pretty(&doc).map_err(|e| GrantError::Storage(e.to_string()))?;
        crate::keys::keyring::write_atomically(&self.path, &bytes)
            .map_err(|e| GrantError::Storage(e.to_string()))?;
        Ok(Sha256::digest(&bytes).into())
    }

    /// Read the file again if its bytes changed; `Ok(true)` when what is loaded changed.
    fn reload_if_changed(&self) -> Result<bool, GrantError> {
        let (body, digest) = self.read()?;
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if loaded.digest == digest {
            return Ok(false);
        }
        if body.revision < loaded.body.revision {
            return Err(GrantError::Storage(format!(
                "{}: revision {} is older than revision {} already loaded (an older copy was \
                 restored, which would bring revoked grants back); keeping the grants in memory",
                self.path.display(),
                body.revision,
                loaded.body.revision
            )));
        }
        *loaded = Loaded::new(body, digest);
        Ok(true)
    }

    /// Read-modify-write under the file lock; the change sees the file as it is now.
    fn modify<T>(
        &self,
        change: impl FnOnce(&mut Body, u64) -> Result<T, GrantError>,
    ) -> Result<T, GrantError> {
        let _lock = self.lock()?;
        let (mut body, _) = self.read()?;
        let now = unix_now();
        let seen = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .body
            .revision;
        if body.revision < seen {
            return Err(GrantError::Storage(format!(
                "{}: revision {} is older than revision {seen} already loaded (an older copy \
                 was restored); restore the newest file",
                self.path.display(),
                body.revision
            )));
        }
        let out = change(&mut body, now)?;
        // What no token can need any more: expired grants, ids whose tokens all expired.
        body.grants.retain(|g| g.live(now));
        body.revoked.retain(|_, forget_after| *forget_after >= now);
        body.revision += 1;
        let digest = self.write(&body)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Loaded::new(body, Some(digest));
        Ok(out)
    }

    fn remove(
        &self,
        id: &str,
        check: impl FnOnce(&Grant) -> Result<(), GrantError>,
    ) -> Result<Grant, GrantError> {
        self.modify(|body, now| {
            let i = body
                .grants
                .iter()
                .position(|g| g.id == id)
                .ok_or_else(|| GrantError::NotFound(id.to_string()))?;
            check(&body.grants[i])?;
            let g = body.grants.remove(i);
            body.revoked.insert(
                g.id.clone(),
                now + MAX_TOKEN_LIFETIME_SECS + ISSUE_SKEW_SECS,
            );
            Ok(g)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The store.

/// The grants a proxy knows: the grants file as last read, plus the grants presented tokens
/// carry. [`Grants::disabled`] knows none.
pub struct Grants {
    store: Option<Store>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl Default for Grants {
    fn default() -> Self {
        Grants::disabled()
    }
}

impl Grants {
    /// No grants at all.
    pub fn disabled() -> Grants {
        Grants {
            store: None,
            generation: AtomicU64::new(0),
        }
    }

    /// The grants of a proxy (or the CLI) using `keyring`: the file is `settings.path`, else
    /// `grants.json` beside the keyring file; the keys come from `settings.token_key`, else
    /// from the keyring's master key. The file is read now (a missing file is no grants yet);
    /// call [`watch`](Self::watch) to pick up other replicas' changes.
    pub fn open(
        settings: &GrantSettings,
        keyring: &crate::keys::keyring::Keyring,
    ) -> Result<Grants, String> {
        let path = match &settings.path {
            Some(p) => p.clone(),
            None => default_path(keyring.path()),
        };
        let keys = GrantKeys::for_settings(settings, Some(keyring))?;
        Grants::open_with(path, keys, settings.token_lifetime)
    }

    /// The grants of a proxy that may have no keyring (a stateless pod): with one, as
    /// [`open`](Self::open); without, `settings.path` and `settings.token_key` are the file and
    /// key (config validation requires both or neither; neither: no grants).
    pub fn for_proxy(
        settings: &GrantSettings,
        keyring: Option<&crate::keys::keyring::Keyring>,
    ) -> Result<Grants, String> {
        if let Some(keyring) = keyring {
            return Grants::open(settings, keyring);
        }
        match (&settings.path, &settings.token_key) {
            (None, None) => Ok(Grants::disabled()),
            (Some(path), Some(_)) => Grants::open_with(
                path.clone(),
                GrantKeys::for_settings(settings, None)?,
                settings.token_lifetime,
            ),
            _ => Err(
                "grants: without [keyring], set both grants.path and grants.token_key_file".into(),
            ),
        }
    }

    /// [`open`](Self::open) with the file and keys given.
    pub fn open_with(
        path: PathBuf,
        keys: GrantKeys,
        token_lifetime: Duration,
    ) -> Result<Grants, String> {
        let store = Store {
            path,
            keys,
            token_lifetime: token_lifetime.as_secs().clamp(1, MAX_TOKEN_LIFETIME_SECS),
            loaded: RwLock::new(Loaded::default()),
        };
        store.reload_if_changed().map_err(|e| e.to_string())?;
        Ok(Grants {
            store: Some(store),
            generation: AtomicU64::new(1),
        })
    }

    /// The grants file (`None` when disabled).
    pub fn path(&self) -> Option<&Path> {
        self.store.as_ref().map(|s| s.path.as_path())
    }

    /// Bumped on every change seen, so cached decisions made before it are not reused.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn store(&self) -> Result<&Store, GrantError> {
        self.store.as_ref().ok_or(GrantError::Disabled)
    }

    /// Read the file again if it changed (other replicas' creates, retires and revokes).
    pub fn reload_if_changed(&self) -> Result<bool, GrantError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let changed = store.reload_if_changed()?;
        if changed {
            self.bump();
        }
        Ok(changed)
    }

    /// Poll the file every `every` until the grants are dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if self.store.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(g) = weak.upgrade() else { break };
                match g.reload_if_changed() {
                    Ok(true) => tracing::info!(path = ?g.path(), "grants reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "grants reload failed; keeping the grants in memory")
                    }
                }
            }
        });
    }

    /// The id of a live grant that lets `principal` do `action` with `key` under `context`:
    /// from the file as last read, or carried by one of `tokens`.
    pub fn find(
        &self,
        principal: &Principal,
        key: &KeyRef,
        action: Action,
        context: &Context,
        tokens: &[&str],
    ) -> Option<Arc<str>> {
        let store = self.store.as_ref()?;
        let now = unix_now();
        {
            let loaded = store.loaded.read().unwrap_or_else(|e| e.into_inner());
            if let Some(g) = loaded.by_grantee.get(&principal.name).and_then(|gs| {
                gs.iter()
                    .find(|g| g.allows(&principal.name, key, action, context, now))
            }) {
                return Some(g.id.as_str().into());
            }
        }
        for t in tokens.iter().take(MAX_TOKENS) {
            match self.verify_token_at(t, now) {
                Ok(g) if g.allows(&principal.name, key, action, context, now) => {
                    return Some(g.id.as_str().into());
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(reason = %e, "grant token refused"),
            }
        }
        None
    }

    /// The grant a token carries if it is valid now (MAC, lifetime, grant expiry, not
    /// revoked); whether it fits a request is [`Grant::allows`].
    pub fn verify_token(&self, token: &str) -> Result<Grant, TokenError> {
        self.verify_token_at(token, unix_now())
    }

    fn verify_token_at(&self, token: &str, now: u64) -> Result<Grant, TokenError> {
        let Some(store) = &self.store else {
            return Err(TokenError::Malformed);
        };
        let (grant, iat) = decode_token(&store.keys, token)?;
        if iat > now + ISSUE_SKEW_SECS {
            return Err(TokenError::NotYetValid);
        }
        if now >= iat.saturating_add(store.token_lifetime) {
            return Err(TokenError::Expired);
        }
        if !grant.live(now) {
            return Err(TokenError::GrantExpired);
        }
        let loaded = store.loaded.read().unwrap_or_else(|e| e.into_inner());
        if loaded.body.revoked.contains_key(&grant.id) {
            return Err(TokenError::Revoked);
        }
        Ok(grant)
    }

    /// A token for `grant` issued at `issued_at` (unix seconds). [`create`](Self::create)
    /// returns one; this is for issuing another (a client whose token expired before every
    /// replica read the file). Refused for a grant revoked in the file as last read.
    pub fn issue_token(&self, grant: &Grant, issued_at: u64) -> Result<String, GrantError> {
        let store = self.store()?;
        if store
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .body
            .revoked
            .contains_key(&grant.id)
        {
            return Err(GrantError::NotFound(grant.id.clone()));
        }
        encode_token(&store.keys, grant, issued_at)
    }

    /// Create a grant; returns it and its token. `created_by` is the caller's principal name.
    pub fn create(&self, new: NewGrant, created_by: &str) -> Result<(Grant, String), GrantError> {
        let store = self.store()?;
        let now = unix_now();
        validate(&new, now)?;
        let mut id = [0u8; 16];
        fill_random(&mut id);
        let mut operations = new.operations;
        operations.sort();
        operations.dedup();
        let grant = Grant {
            id: hex::encode(id),
            key: new.key,
            grantee: new.grantee,
            operations,
            constraints: new.constraints,
            retiring_principal: new.retiring_principal,
            expires_at: new.expires_at,
            created_at: now,
            created_by: created_by.to_string(),
        };
        // Checks the size before anything is stored.
        let token = encode_token(&store.keys, &grant, now)?;
        store.modify(|body, _| {
            if body.grants.len() >= MAX_GRANTS {
                return Err(GrantError::Invalid(format!(
                    "the grants file holds {MAX_GRANTS} grants already; retire or revoke some"
                )));
            }
            body.grants.push(grant.clone());
            Ok(())
        })?;
        self.bump();
        Ok((grant, token))
    }

    /// The grant `id` as the file holds it now (read again first).
    pub fn get(&self, id: &str) -> Result<Option<Grant>, GrantError> {
        let store = self.store()?;
        self.reload_if_changed()?;
        let loaded = store.loaded.read().unwrap_or_else(|e| e.into_inner());
        Ok(loaded.body.grants.iter().find(|g| g.id == id).cloned())
    }

    /// Live grants as the file holds them now, by key and/or grantee.
    pub fn list(
        &self,
        key: Option<&KeyRef>,
        grantee: Option<&str>,
    ) -> Result<Vec<Grant>, GrantError> {
        let store = self.store()?;
        self.reload_if_changed()?;
        let now = unix_now();
        let loaded = store.loaded.read().unwrap_or_else(|e| e.into_inner());
        Ok(loaded
            .body
            .grants
            .iter()
            .filter(|g| g.live(now))
            .filter(|g| key.is_none_or(|k| g.key == *k))
            .filter(|g| grantee.is_none_or(|p| g.grantee == p))
            .cloned()
            .collect())
    }

    /// Retire grant `id`: only its grantee or its retiring principal may.
    pub fn retire(&self, id: &str, by: &str) -> Result<Grant, GrantError> {
        let g = self.store()?.remove(id, |g| {
            if g.grantee == by || g.retiring_principal.as_deref() == Some(by) {
                Ok(())
            } else {
                Err(GrantError::NotAllowed(format!(
                    "{by} is neither the grantee nor the retiring principal of grant {id}"
                )))
            }
        })?;
        self.bump();
        Ok(g)
    }

    /// Revoke grant `id` (an administrator's act; the caller authorizes it).
    pub fn revoke(&self, id: &str) -> Result<Grant, GrantError> {
        let g = self.store()?.remove(id, |_| Ok(()))?;
        self.bump();
        Ok(g)
    }
}

/// `grants.json` beside the keyring file.
pub fn default_path(keyring_path: &Path) -> PathBuf {
    keyring_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("grants.json")
}

fn valid_name(place: &str, s: &str) -> Result<(), GrantError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(char::is_control) {
        return Err(GrantError::Invalid(format!(
            "{place}: 1-{MAX_NAME_LEN} characters without control characters"
        )));
    }
    Ok(())
}

fn validate(g: &NewGrant, now: u64) -> Result<(), GrantError> {
    valid_name("grantee", &g.grantee)?;
    if let Some(r) = &g.retiring_principal {
        valid_name("retiring_principal", r)?;
    }
    if g.operations.is_empty() {
        return Err(GrantError::Invalid("operations: list at least one".into()));
    }
    if let Some(a) = g.operations.iter().find(|a| !a.grantable()) {
        return Err(GrantError::Invalid(format!(
            "operations: {a} cannot be granted (grantable: {})",
            Action::ALL
                .iter()
                .filter(|a| a.grantable())
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let c = &g.constraints;
    if c.equals.is_some() && c.subset.is_some() {
        return Err(GrantError::Invalid(
            "constraints: set at most one of equals, subset".into(),
        ));
    }
    for m in [&c.equals, &c.subset].into_iter().flatten() {
        if m.len() > MAX_CONSTRAINT_PAIRS {
            return Err(GrantError::Invalid(format!(
                "constraints: at most {MAX_CONSTRAINT_PAIRS} pairs"
            )));
        }
        if m.keys().any(|k| k.is_empty()) {
            return Err(GrantError::Invalid(
                "constraints: context names must not be empty".into(),
            ));
        }
    }
    if let Some(e) = g.expires_at
        && e <= now
    {
        return Err(GrantError::Invalid(
            "expires_at: must be in the future".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteAuth;

    fn grants(dir: &Path, secret: &[u8]) -> Grants {
        Grants::open_with(
            dir.join("grants.json"),
            GrantKeys::derive(secret),
            Duration::from_secs(300),
        )
        .unwrap()
    }

    fn new_grant(constraints: Constraints) -> NewGrant {
        NewGrant {
            key: KeyRef::parse("users").unwrap(),
            grantee: "app".into(),
            operations: vec![Action::Open, Action::Seal],
            constraints,
            retiring_principal: Some("ops".into()),
            expires_at: None,
        }
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs.iter().copied().collect()
    }

    #[test]
    fn constraints_equals_and_subset() {
        let eq = Constraints {
            equals: Some([("tenant".to_string(), "acme".to_string())].into()),
            subset: None,
        };
        assert!(eq.holds(&ctx(&[("tenant", "acme")])));
        assert!(!eq.holds(&ctx(&[("tenant", "acme"), ("region", "eu")])));
        assert!(!eq.holds(&ctx(&[("tenant", "globex")])));
        assert!(!eq.holds(&ctx(&[])));
        let sub = Constraints {
            equals: None,
            subset: Some([("tenant".to_string(), "acme".to_string())].into()),
        };
        assert!(sub.holds(&ctx(&[("tenant", "acme"), ("region", "eu")])));
        assert!(!sub.holds(&ctx(&[("region", "eu")])));
        assert!(Constraints::default().holds(&ctx(&[("x", "y")])));
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let g = grants(dir.path(), b"secret");
        let mut n = new_grant(Constraints::default());
        n.operations = vec![Action::Rotate];
        assert!(matches!(g.create(n, "admin"), Err(GrantError::Invalid(_))));
        let mut n = new_grant(Constraints::default());
        n.operations.clear();
        assert!(matches!(g.create(n, "admin"), Err(GrantError::Invalid(_))));
        let both = Constraints {
            equals: Some(BTreeMap::new()),
            subset: Some(BTreeMap::new()),
        };
        assert!(matches!(
            g.create(new_grant(both), "admin"),
            Err(GrantError::Invalid(_))
        ));
        let mut n = new_grant(Constraints::default());
        n.expires_at = Some(unix_now() - 1);
        assert!(matches!(g.create(n, "admin"), Err(GrantError::Invalid(_))));
        // Too large for a token: refused before anything is stored.
        let big: BTreeMap<String, String> = (0..30)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        let n = new_grant(Constraints {
            equals: None,
            subset: Some(big),
        });
        assert!(matches!(g.create(n, "admin"), Err(GrantError::Invalid(_))));
        assert!(g.list(None, None).unwrap().is_empty());
        assert!(!dir.path().join("grants.json").exists());
    }

    #[test]
    fn tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let g = grants(dir.path(), b"secret");
        let (grant, token) = g
            .create(new_grant(Constraints::default()), "admin")
            .unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(g.verify_token(&token).unwrap(), grant);
        // Another key.
        let other_dir = tempfile::tempdir().unwrap();
        let other = grants(other_dir.path(), b"another secret");
        assert_eq!(other.verify_token(&token), Err(TokenError::BadMac));
        // Tampered payload: one character changed.
        let mut bytes = token.clone().into_bytes();
        let i = TOKEN_PREFIX.len() + 10;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(matches!(
            g.verify_token(&tampered),
            Err(TokenError::BadMac | TokenError::Malformed)
        ));
        // Oversized, malformed.
        assert_eq!(
            g.verify_token(&format!("{TOKEN_PREFIX}{}", "A".repeat(MAX_TOKEN_BYTES))),
            Err(TokenError::TooLarge)
        );
        assert_eq!(g.verify_token("ept2.abc.def"), Err(TokenError::Malformed));
        assert_eq!(g.verify_token("ept1.abc"), Err(TokenError::Malformed));
        // Expired and future tokens.
        let now = unix_now();
        let old = g.issue_token(&grant, now - 301).unwrap();
        assert_eq!(g.verify_token(&old), Err(TokenError::Expired));
        let future = g.issue_token(&grant, now + 600).unwrap();
        assert_eq!(g.verify_token(&future), Err(TokenError::NotYetValid));
        // Revoked: refused, and no new token is issued for it.
        g.revoke(&grant.id).unwrap();
        assert_eq!(g.verify_token(&token), Err(TokenError::Revoked));
        assert!(g.issue_token(&grant, now).is_err());
    }

    #[test]
    fn find_matches_grantee_key_action_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let g = grants(dir.path(), b"secret");
        let (grant, token) = g
            .create(
                new_grant(Constraints {
                    equals: None,
                    subset: Some([("tenant".to_string(), "acme".to_string())].into()),
                }),
                "admin",
            )
            .unwrap();
        // A second handle on the same file that has not read it: the token only.
        let fresh = Grants {
            store: Some(Store {
                path: dir.path().join("elsewhere.json"),
                keys: GrantKeys::derive(b"secret"),
                token_lifetime: 300,
                loaded: RwLock::new(Loaded::default()),
            }),
            generation: AtomicU64::new(1),
        };
        let app = Principal::new("app", RouteAuth::Jwt);
        let users = KeyRef::parse("users").unwrap();
        let acme = ctx(&[("tenant", "acme"), ("region", "eu")]);
        for (grants, tokens) in [(&g, vec![]), (&fresh, vec![token.as_str()])] {
            assert_eq!(
                grants
                    .find(&app, &users, Action::Open, &acme, &tokens)
                    .as_deref(),
                Some(grant.id.as_str())
            );
            assert!(
                grants
                    .find(&app, &users, Action::Reencrypt, &acme, &tokens)
                    .is_none()
            );
            assert!(
                grants
                    .find(
                        &app,
                        &users,
                        Action::Open,
                        &ctx(&[("tenant", "globex")]),
                        &tokens
                    )
                    .is_none()
            );
            assert!(
                grants
                    .find(
                        &app,
                        &KeyRef::parse("other").unwrap(),
                        Action::Open,
                        &acme,
                        &tokens
                    )
                    .is_none()
            );
            let bob = Principal::new("bob", RouteAuth::Jwt);
            assert!(
                grants
                    .find(&bob, &users, Action::Open, &acme, &tokens)
                    .is_none()
            );
        }
        assert!(fresh.find(&app, &users, Action::Open, &acme, &[]).is_none());
    }

    #[test]
    fn retire_by_grantee_or_retiring_principal_only() {
        let dir = tempfile::tempdir().unwrap();
        let g = grants(dir.path(), b"secret");
        let (a, _) = g
            .create(new_grant(Constraints::default()), "admin")
            .unwrap();
        let (b, _) = g
            .create(new_grant(Constraints::default()), "admin")
            .unwrap();
        let gen0 = g.generation();
        assert!(matches!(
            g.retire(&a.id, "mallory"),
            Err(GrantError::NotAllowed(_))
        ));
        g.retire(&a.id, "app").unwrap();
        g.retire(&b.id, "ops").unwrap();
        assert!(g.generation() > gen0);
        assert!(matches!(
            g.retire(&a.id, "app"),
            Err(GrantError::NotFound(_))
        ));
        assert!(g.list(None, None).unwrap().is_empty());
    }

    #[test]
    fn a_file_changed_by_hand_or_rolled_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let g = grants(dir.path(), b"secret");
        g.create(new_grant(Constraints::default()), "admin")
            .unwrap();
        let first = fs::read(&path).unwrap();
        let (revoked, _) = g
            .create(new_grant(Constraints::default()), "admin")
            .unwrap();
        g.revoke(&revoked.id).unwrap();
        // Edited: the grantee changed.
        let text = fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"app\"", "\"mallory\"", 1);
        crate::keys::keyring::write_atomically(&path, edited.as_bytes()).unwrap();
        assert!(matches!(g.reload_if_changed(), Err(GrantError::Storage(_))));
        assert!(
            Grants::open_with(
                path.clone(),
                GrantKeys::derive(b"secret"),
                Duration::from_secs(60)
            )
            .is_err()
        );
        // An older copy: refused by a replica that has seen newer.
        crate::keys::keyring::write_atomically(&path, text.as_bytes()).unwrap();
        g.reload_if_changed().unwrap();
        crate::keys::keyring::write_atomically(&path, &first).unwrap();
        assert!(matches!(g.reload_if_changed(), Err(GrantError::Storage(_))));
        assert!(matches!(
            g.create(new_grant(Constraints::default()), "admin"),
            Err(GrantError::Storage(_))
        ));
    }

    #[test]
    fn header_tokens() {
        let mut h = http::HeaderMap::new();
        h.append(GRANT_TOKEN_HEADER, "a, b".parse().unwrap());
        h.append(GRANT_TOKEN_HEADER, " ,c".parse().unwrap());
        assert_eq!(tokens_from(&h), vec!["a", "b", "c"]);
        let many = vec!["t"; 20].join(",");
        h.insert(GRANT_TOKEN_HEADER, many.parse().unwrap());
        assert_eq!(tokens_from(&h).len(), MAX_TOKENS);
    }
}
