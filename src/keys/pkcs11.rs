//! PKCS#11 HSM root keys: the root key is an AES secret-key object on a token, found by its
//! label, and never leaves the HSM. Data keys are wrapped with `CKM_AES_KEY_WRAP_PAD`
//! (RFC 5649), which every mainstream HSM and SoftHSM2 support (SoftHSM2 cannot wrap with
//! AES-GCM). Key wrap has no associated data, so the key context is bound by wrapping a derived
//! secret instead of the bare data key:
//!
//! ```text
//! binding = SHA-256("envelope-proxy.pkcs11-wrap.v1" ‖ u32be(len key_id) ‖ key_id ‖
//!                   canonical(key context))                                      (32 bytes)
//! secret  = data key (32) ‖ binding (32)                                         (64 bytes)
//! blob    = C_WrapKey(CKM_AES_KEY_WRAP_PAD, root key, secret)                    (72 bytes)
//! EDK     = { backend: NAME, key_id: CKA_LABEL of the root key, key_version: 0, blob }
//! ```
//!
//! `secret` reaches the HSM as a temporary session object (`CKO_SECRET_KEY`,
//! `CKK_GENERIC_SECRET`, `CKA_TOKEN` false, `CKA_PRIVATE` true, `CKA_SENSITIVE` false,
//! `CKA_EXTRACTABLE` true), is wrapped under the root key and destroyed at once. Unwrapping is
//! the reverse: `C_UnwrapKey` into a temporary session object of the same template, read
//! `CKA_VALUE`, destroy the object, require 64 bytes and compare the trailing 32 with the binding
//! recomputed for the claimed key id and context in constant time. Anything else is
//! [`BackendError::InvalidCiphertext`]: a blob moved to another key, another key context or
//! another label does not open. RFC 5649 is deterministic: the same data key under the same
//! root key, key id and context gives the same blob (data keys are random, so this reveals
//! nothing in practice).
//!
//! The root key is the one object with `CKA_CLASS` = `CKO_SECRET_KEY`, `CKA_KEY_TYPE` = `CKK_AES`
//! and `CKA_LABEL` = key id, looked up in the session each call uses (object handles are per
//! session in some HSMs, and a re-created key gets a new handle). It needs `CKA_WRAP` and
//! `CKA_UNWRAP`; it should be `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`.
//!
//! Attacker model: `wrapped.blob` is attacker controlled, must be panic-proof (and so are
//! `key_id` and `key_version`, which come from the same stored header). The blob must be exactly
//! 72 bytes and the version 0 before the HSM sees anything. Only errors in which the token
//! refuses the wrapped bytes (`CKR_WRAPPED_KEY_INVALID`, `CKR_WRAPPED_KEY_LEN_RANGE`,
//! `CKR_ENCRYPTED_DATA_*`, `CKR_DATA_*`) prove the blob bad (`InvalidCiphertext`); session,
//! device and every other error is an outage (`Unavailable`), so an outage never redacts a
//! value. Some tokens (SoftHSM2) report a failed RFC 5649 integrity check as
//! `CKR_GENERAL_ERROR`, which a failing device says too: after a general error (or
//! `CKR_FUNCTION_FAILED`) on unwrap, a control round trip (wrap and unwrap a fresh random secret
//! under the same key in the same session) decides: it works, so the blob was bad; it fails, so
//! the token is, and the session is discarded. `key_id` only selects which AES key the token tries,
//! and is bound into the wrapped secret, so pointing an EDK at another key does not open it.
//!
//! Operation: the PIN comes from a file (refused when group- or world-accessible) or an
//! environment variable, is kept in a zeroizing secret and never logged. `sessions` sessions are
//! opened and logged in at start. PKCS#11 calls block, so each runs on the blocking pool with a
//! session taken from the pool; at most `sessions` calls run at once. A session that fails with a
//! device or session error (token removed, device error, session closed, user logged out, ...)
//! yields [`BackendError::Unavailable`] (retryable, counted by the circuit breaker) and is
//! discarded (closed, or, when the token has already forgotten its handle, dropped without a
//! call that could hit a reused handle); the next call opens and logs in a fresh one, so the
//! backend recovers by itself after a device reset. A PIN the token rejects at such a re-login
//! is never tried again (a retry loop would lock the token): the backend then answers
//! `AccessDenied` until restarted.

use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11 as Module};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::{Zeroize, Zeroizing};

use super::{BackendError, DataKey, KeyDescription, RootKeyProvider};
use crate::config::{Pkcs11Settings, SecretSource};
use crate::envelope::{Context, WrappedKey};

const WRAP_LABEL: &[u8] = b"envelope-proxy.pkcs11-wrap.v1";
/// Data key and binding hash: what gets wrapped.
const SECRET_LEN: usize = 32 + 32;
/// RFC 5649 output for a 64-byte input: one extra 8-byte semiblock.
pub const BLOB_LEN: usize = SECRET_LEN + 8;
/// Longest key id (CKA_LABEL) accepted; matches `KeyRef`.
const MAX_KEY_ID: usize = 255;

/// A PKCS#11 token holding root keys.
pub struct Pkcs11 {
    name: String,
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
}

struct Inner {
    name: String,
    token_label: String,
    module: Module,
    slot: Slot,
    pin: AuthPin,
    /// Logged-in sessions not in use.
    idle: Mutex<Vec<Session>>,
    /// Set when the token rejected the PIN on a re-login: never try it again.
    pin_rejected: AtomicBool,
}

impl fmt::Debug for Pkcs11 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11")
            .field("name", &self.name)
            .field("token", &self.inner.token_label)
            .field("slot", &self.inner.slot)
            .finish_non_exhaustive()
    }
}

impl Pkcs11 {
    /// Load the module, find the token by label, log in and open `settings.sessions` sessions.
    /// Every failure is a startup error naming what to fix.
    pub fn connect(name: &str, settings: &Pkcs11Settings) -> Result<Pkcs11, String> {
        let pin = read_pin(name, &settings.pin)?;
        let path = &settings.module;
        let module = Module::new(path).map_err(|e| {
            if (path.is_absolute() || path.components().count() > 1) && !path.exists() {
                format!(
                    "backend {name}: PKCS#11 module {} does not exist (set module in [backend.{name}])",
                    path.display()
                )
            } else {
                format!(
                    "backend {name}: cannot load PKCS#11 module {}: {e}",
                    path.display()
                )
            }
        })?;
        match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another backend (or library) in this process already initialized the module.
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(format!(
                    "backend {name}: PKCS#11 module {} failed to initialize: {e}",
                    path.display()
                ));
            }
        }
        let wanted = settings.token_label.trim();
        let slots = module
            .get_slots_with_token()
            .map_err(|e| format!("backend {name}: cannot list PKCS#11 slots: {e}"))?;
        let mut found = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            let Ok(info) = module.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim().to_string();
            if label == wanted {
                matching.push(slot);
            }
            found.push(format!("{label:?}"));
        }
        let slot = match matching.as_slice() {
            [slot] => *slot,
            [] => {
                let list = if found.is_empty() {
                    "no tokens found".to_string()
                } else {
                    format!("tokens found: {}", found.join(", "))
                };
                return Err(format!(
                    "backend {name}: no PKCS#11 token labelled {wanted:?} in {} ({list})",
                    path.display()
                ));
            }
            _ => {
                return Err(format!(
                    "backend {name}: {} tokens are labelled {wanted:?}; token labels must be unique",
                    matching.len()
                ));
            }
        };
        match module.get_mechanism_list(slot) {
            Ok(list) if !list.contains(&MechanismType::AES_KEY_WRAP_PAD) => {
                return Err(format!(
                    "backend {name}: token {wanted:?} does not support CKM_AES_KEY_WRAP_PAD (RFC 5649), \
                     which this backend wraps data keys with"
                ));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(backend = name, error = %e, "cannot list the token's mechanisms; assuming CKM_AES_KEY_WRAP_PAD");
            }
        }
        let sessions = settings.sessions.max(1);
        let inner = Arc::new(Inner {
            name: name.to_string(),
            token_label: wanted.to_string(),
            module,
            slot,
            pin,
            idle: Mutex::new(Vec::with_capacity(sessions)),
            pin_rejected: AtomicBool::new(false),
        });
        for _ in 0..sessions {
            let session = inner.open_session().map_err(|e| {
                let what = match e {
                    OpenError::Pin(RvError::PinIncorrect) => {
                        return format!("backend {name}: wrong PIN for token {wanted:?}");
                    }
                    OpenError::Pin(RvError::PinLocked) => "the PIN is locked".to_string(),
                    OpenError::Pin(RvError::PinExpired) => "the PIN has expired".to_string(),
                    OpenError::Pin(rv) => format!("login failed: {rv:?}"),
                    OpenError::PinRejectedBefore => "the PIN was rejected".to_string(),
                    OpenError::Other(e) => short(&e),
                };
                format!("backend {name}: token {wanted:?}: {what}")
            })?;
            inner.put_back(session);
        }
        tracing::info!(backend = name, token = wanted, slot = %slot, sessions, "PKCS#11 token ready");
        Ok(Pkcs11 {
            name: name.to_string(),
            inner,
            permits: Arc::new(Semaphore::new(sessions)),
        })
    }

    /// Run `op` with a pooled session on the blocking pool. The permit moves into the blocking
    /// task, so a caller that gives up (deadline) does not let more than `sessions` calls run.
    async fn run<T, F>(&self, op: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Use) -> Result<T, BackendError> + Send + 'static,
    {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| {
            BackendError::Unavailable(format!("backend {} is shut down", self.name))
        })?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let result = inner.with_session(op);
            drop(permit);
            result
        })
        .await
        .map_err(|e| BackendError::Unavailable(format!("PKCS#11 call failed: {e}")))?
    }

    async fn wrap(
        &self,
        key_id: &str,
        data_key: &[u8; 32],
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        check_key_id(key_id)?;
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        secret[..32].copy_from_slice(data_key);
        secret[32..].copy_from_slice(&binding(key_id, ctx));
        let label = key_id.to_string();
        let blob = self
            .run(move |inner, s| inner.wrap_secret(s, &label, &secret))
            .await?;
        Ok(WrappedKey {
            backend: self.name.clone(),
            key_id: key_id.to_string(),
            key_version: 0,
            blob,
        })
    }
}

#[async_trait]
impl RootKeyProvider for Pkcs11 {
    fn name(&self) -> &str {
        &self.name
    }

    async fn wrap_data_key(
        &self,
        key_id: &str,
        data_key: &DataKey,
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        self.wrap(key_id, data_key.expose(), ctx).await
    }

    /// `wrapped` is attacker controlled: lengths are checked before the HSM sees the blob, and
    /// nothing here panics.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &Context,
    ) -> Result<DataKey, BackendError> {
        if wrapped.blob.len() != BLOB_LEN
            || wrapped.key_version != 0
            || wrapped.key_id.is_empty()
            || wrapped.key_id.len() > MAX_KEY_ID
        {
            return Err(BackendError::InvalidCiphertext);
        }
        let expected = binding(&wrapped.key_id, ctx);
        let label = wrapped.key_id.clone();
        let blob = wrapped.blob.clone();
        let secret = self
            .run(move |inner, s| inner.unwrap_secret(s, &label, &blob))
            .await?;
        let (key, tag) = secret.split_at(32);
        if !bool::from(tag.ct_eq(&expected)) {
            return Err(BackendError::InvalidCiphertext);
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(key);
        Ok(DataKey::from_bytes(*bytes))
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
        check_key_id(key_id)?;
        let label = key_id.to_string();
        let enabled = self
            .run(move |inner, s| {
                let key = inner.find_key(s, &label)?;
                let attrs = s
                    .session
                    .get_attributes(key, &[AttributeType::Wrap, AttributeType::Unwrap])
                    .map_err(|e| inner.op_error(s, &label, e, Op::Describe))?;
                let wrap = attrs.iter().any(|a| matches!(a, Attribute::Wrap(true)));
                let unwrap = attrs.iter().any(|a| matches!(a, Attribute::Unwrap(true)));
                Ok(wrap && unwrap)
            })
            .await?;
        Ok(KeyDescription {
            key_id: key_id.to_string(),
            enabled,
            current_version: 0,
        })
    }
}

/// A session lent to one operation; `discard` set means it does not go back to the pool.
struct Use {
    session: Session,
    discard: Option<Discard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    /// Close it (C_CloseSession); its session objects go with it.
    Close,
    /// The token already forgot the handle (reset, removal, re-initialization). Closing it could
    /// close an unrelated session that reuses the number, so the handle is dropped without a call.
    Forget,
}

impl Use {
    fn broken(&mut self, rv: Option<RvError>) {
        let how = match rv {
            Some(
                RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::CryptokiNotInitialized
                | RvError::TokenNotPresent
                | RvError::DeviceRemoved,
            ) => Discard::Forget,
            _ => Discard::Close,
        };
        if self.discard != Some(Discard::Forget) {
            self.discard = Some(how);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Wrap,
    Unwrap,
    Describe,
}

enum OpenError {
    /// C_Login refused the PIN.
    Pin(RvError),
    PinRejectedBefore,
    Other(CkError),
}

impl Inner {
    fn open_session(&self) -> Result<Session, OpenError> {
        if self.pin_rejected.load(Ordering::Relaxed) {
            return Err(OpenError::PinRejectedBefore);
        }
        // Read-only is enough: the backend only creates session objects.
        let session = match self.module.open_ro_session(self.slot) {
            Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {
                // Something finalized the module (a reset path in some stacks): bring it back.
                match self
                    .module
                    .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                {
                    Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                    Err(e) => return Err(OpenError::Other(e)),
                }
                self.module.open_ro_session(self.slot)
            }
            other => other,
        }
        .map_err(OpenError::Other)?;
        match session.login(UserType::User, Some(&self.pin)) {
            // Login state is per application and token: other sessions may have logged in.
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinLocked
                | RvError::PinExpired),
                _,
            )) => {
                self.pin_rejected.store(true, Ordering::Relaxed);
                Err(OpenError::Pin(rv))
            }
            Err(e) => Err(OpenError::Other(e)),
        }
    }

    fn put_back(&self, session: Session) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(session);
    }

    /// Take an idle session (or open one), run `op`, and return the session to the pool unless
    /// the operation broke it. Any `Unavailable` result breaks the session too.
    fn with_session<T>(
        &self,
        op: impl FnOnce(&Inner, &mut Use) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let session = match idle {
            Some(s) => s,
            None => self.open_session().map_err(|e| match e {
                OpenError::Pin(_) | OpenError::PinRejectedBefore => {
                    tracing::error!(backend = %self.name, token = %self.token_label, "the token rejected the PIN; not trying it again until restart");
                    BackendError::AccessDenied(format!("token {} (PIN rejected)", self.token_label))
                }
                OpenError::Other(e) => BackendError::Unavailable(format!(
                    "PKCS#11 token {}: cannot open a session: {e}",
                    self.token_label
                )),
            })?,
        };
        let mut lent = Use {
            session,
            discard: None,
        };
        let result = op(self, &mut lent);
        if lent.discard.is_none() && matches!(result, Err(BackendError::Unavailable(_))) {
            lent.discard = Some(Discard::Close);
        }
        match lent.discard {
            None => self.put_back(lent.session),
            Some(how) => {
                if let Err(e) = &result {
                    tracing::warn!(backend = %self.name, error = %e, "discarding PKCS#11 session; the next call opens a new one");
                }
                match how {
                    Discard::Close => drop(lent.session),
                    // Leaks a few bytes per lost session, once per device reset.
                    Discard::Forget => std::mem::forget(lent.session),
                }
            }
        }
        result
    }

    /// The root key's handle in this session.
    fn find_key(&self, s: &mut Use, key_id: &str) -> Result<ObjectHandle, BackendError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ];
        let found = s
            .session
            .find_objects(&template)
            .map_err(|e| self.op_error(s, key_id, e, Op::Describe))?;
        match found.as_slice() {
            [key] => Ok(*key),
            // Root keys are private objects: a session that lost its login (another part of
            // the application logged out, the token was re-initialized) finds none. That is an
            // outage, not a missing key.
            [] if !self.logged_in(s) => {
                s.broken(None);
                Err(BackendError::Unavailable(format!(
                    "PKCS#11 token {}: the session is no longer logged in",
                    self.token_label
                )))
            }
            [] => Err(BackendError::KeyNotFound(key_id.to_string())),
            many => Err(BackendError::Unavailable(format!(
                "token {} holds {} AES keys labelled {key_id:?}; labels must be unique",
                self.token_label,
                many.len()
            ))),
        }
    }

    fn wrap_secret(
        &self,
        s: &mut Use,
        key_id: &str,
        secret: &[u8; SECRET_LEN],
    ) -> Result<Vec<u8>, BackendError> {
        let root = self.find_key(s, key_id)?;
        let mut template = temp_key_template();
        template.push(Attribute::Value(secret.to_vec()));
        let created = s.session.create_object(&template);
        wipe(&mut template);
        let object = created.map_err(|e| self.op_error(s, key_id, e, Op::Wrap))?;
        let wrapped = s.session.wrap_key(&Mechanism::AesKeyWrapPad, root, object);
        self.destroy(s, object);
        let blob = wrapped.map_err(|e| self.op_error(s, key_id, e, Op::Wrap))?;
        if blob.len() != BLOB_LEN {
            return Err(BackendError::Unavailable(format!(
                "token {} returned a {}-byte key wrap; expected {BLOB_LEN} (RFC 5649)",
                self.token_label,
                blob.len()
            )));
        }
        Ok(blob)
    }

    fn unwrap_secret(
        &self,
        s: &mut Use,
        key_id: &str,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let root = self.find_key(s, key_id)?;
        let object = s
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, root, blob, &temp_key_template())
            .map_err(|e| self.op_error(s, key_id, e, Op::Unwrap))?;
        let attrs = s.session.get_attributes(object, &[AttributeType::Value]);
        self.destroy(s, object);
        // The blob unwrapped: from here on, errors are the token's, not the blob's.
        let mut attrs = attrs.map_err(|e| self.op_error(s, key_id, e, Op::Describe))?;
        let mut value = None;
        for attr in &mut attrs {
            if let Attribute::Value(v) = attr {
                value = Some(Zeroizing::new(std::mem::take(v)));
            }
        }
        wipe(&mut attrs);
        let Some(value) = value else {
            // CKA_VALUE withheld although the template asked for CKA_SENSITIVE false: a token
            // policy (forced sensitivity) this backend cannot work with.
            tracing::error!(backend = %self.name, token = %self.token_label, "the token will not reveal unwrapped data keys (CKA_VALUE is sensitive); check its policy");
            return Err(BackendError::AccessDenied(key_id.to_string()));
        };
        if value.len() != SECRET_LEN {
            return Err(BackendError::InvalidCiphertext);
        }
        Ok(value)
    }

    /// Destroy a temporary object. If that fails, the session is discarded: closing it destroys
    /// its session objects.
    fn destroy(&self, s: &mut Use, object: ObjectHandle) {
        if let Err(e) = s.session.destroy_object(object) {
            tracing::warn!(backend = %self.name, error = %e, "cannot destroy a temporary PKCS#11 object; closing its session");
            s.broken(None);
        }
    }

    /// Map a PKCS#11 error to a [`BackendError`], marking the session broken when it is at fault.
    fn op_error(&self, s: &mut Use, key_id: &str, e: CkError, op: Op) -> BackendError {
        let rv = match &e {
            CkError::Pkcs11(rv, _) => *rv,
            // Not an answer from the token (conversion, missing function): the blob cannot
            // cause these since lengths are checked first.
            _ => {
                return BackendError::Unavailable(format!(
                    "PKCS#11 token {}: {e}",
                    self.token_label
                ));
            }
        };
        if is_session_or_device_error(rv) {
            s.broken(Some(rv));
            return BackendError::Unavailable(format!(
                "PKCS#11 token {}: {}",
                self.token_label,
                short(&e)
            ));
        }
        if rv == RvError::KeyFunctionNotPermitted {
            // The root key lacks CKA_WRAP / CKA_UNWRAP: usable for nothing here.
            return BackendError::KeyDisabled(key_id.to_string());
        }
        match op {
            // The token looked at the blob and refused it: proof it is bad.
            Op::Unwrap if proves_blob_invalid(rv) => BackendError::InvalidCiphertext,
            Op::Unwrap if matches!(rv, RvError::GeneralError | RvError::FunctionFailed) => {
                // Some tokens (SoftHSM2) report a failed RFC 5649 integrity check as a general
                // error, which is also what a failing device says. A general error proves
                // nothing by itself; a control round trip does: wrap and unwrap a fresh random
                // secret under the same root key in the same session. If that works, the token
                // and the key are fine and it was the blob; if not, it is an outage.
                match self.control_round_trip(s, key_id) {
                    Ok(()) => BackendError::InvalidCiphertext,
                    Err(why) => {
                        s.broken(None);
                        BackendError::Unavailable(format!(
                            "PKCS#11 token {}: {} (control round trip: {why})",
                            self.token_label,
                            short(&e)
                        ))
                    }
                }
            }
            // Anything else (a template or attribute the token will not take, a handle it
            // lost, an unexpected code) is the token's, not the blob's: an outage, so the
            // value is never redacted or reported as tampered.
            Op::Unwrap | Op::Wrap | Op::Describe => BackendError::Unavailable(format!(
                "PKCS#11 token {}: {}",
                self.token_label,
                short(&e)
            )),
        }
    }

    /// Whether the session still acts for the logged-in user.
    fn logged_in(&self, s: &Use) -> bool {
        matches!(
            s.session.get_session_info().map(|i| i.session_state()),
            Ok(SessionState::RoUser | SessionState::RwUser)
        )
    }

    /// Wrap a fresh random secret under `key_id` and unwrap it again, in this session. `Ok`
    /// only when the same bytes come back: the token, the session and the root key all work.
    fn control_round_trip(&self, s: &mut Use, key_id: &str) -> Result<(), String> {
        let root = self.find_key(s, key_id).map_err(|e| e.to_string())?;
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        crate::envelope::fill_random(secret.as_mut());
        let mut template = temp_key_template();
        template.push(Attribute::Value(secret.to_vec()));
        let created = s.session.create_object(&template);
        wipe(&mut template);
        let object = created.map_err(|e| short(&e))?;
        let wrapped = s.session.wrap_key(&Mechanism::AesKeyWrapPad, root, object);
        self.destroy(s, object);
        let blob = wrapped.map_err(|e| short(&e))?;
        let back = s
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, root, &blob, &temp_key_template())
            .map_err(|e| short(&e))?;
        let attrs = s.session.get_attributes(back, &[AttributeType::Value]);
        self.destroy(s, back);
        let mut attrs = attrs.map_err(|e| short(&e))?;
        let same = attrs.iter().any(|a| {
            matches!(a, Attribute::Value(v) if bool::from(v.as_slice().ct_eq(secret.as_slice())))
        });
        wipe(&mut attrs);
        if same {
            Ok(())
        } else {
            Err("the secret did not come back".into())
        }
    }
}

/// Errors in which the token refuses the wrapped bytes themselves.
fn proves_blob_invalid(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
    )
}

/// Errors that say the session, login or device is gone, not the input.
fn is_session_or_device_error(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::HostMemory
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::SessionCount
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            | RvError::OperationActive
            | RvError::OperationNotInitialized
            | RvError::FunctionCanceled
            | RvError::Cancel
            | RvError::CantLock
            | RvError::MutexBad
            | RvError::MutexNotLocked
    )
}

/// `C_WrapKey: CKR_…` without cryptoki's paragraph-long description.
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
}

/// The temporary object holding `secret`: a private, extractable, non-sensitive session object.
fn temp_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// Zeroize every value attribute in `attrs`.
fn wipe(attrs: &mut [Attribute]) {
    for attr in attrs {
        if let Attribute::Value(v) = attr {
            v.zeroize();
        }
    }
}

fn binding(key_id: &str, ctx: &Context) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(WRAP_LABEL);
    h.update((key_id.len() as u32).to_be_bytes());
    h.update(key_id.as_bytes());
    h.update(ctx.canonical());
    h.finalize().into()
}

fn check_key_id(key_id: &str) -> Result<(), BackendError> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID {
        return Err(BackendError::KeyNotFound(key_id.to_string()));
    }
    Ok(())
}

fn read_pin(name: &str, source: &SecretSource) -> Result<AuthPin, String> {
    let raw: Zeroizing<String> = match source {
        SecretSource::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| {
            format!("backend {name}: environment variable {var} (the token PIN) is not set")
        })?),
        SecretSource::File(path) => {
            check_private(path).map_err(|m| format!("backend {name}: {}: {m}", path.display()))?;
            let bytes = Zeroizing::new(
                fs::read(path)
                    .map_err(|e| format!("backend {name}: PIN file {}: {e}", path.display()))?,
            );
            Zeroizing::new(
                std::str::from_utf8(&bytes)
                    .map_err(|_| {
                        format!("backend {name}: PIN file {} is not UTF-8", path.display())
                    })?
                    .to_string(),
            )
        }
    };
    // A trailing newline is the file's, not the PIN's.
    let pin = raw.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return Err(format!("backend {name}: the token PIN is empty"));
    }
    Ok(AuthPin::from(pin))
}

/// Refuse a secret file that group or others can access.
fn check_private(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        crate::secret::check_private(path)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_separates_key_ids_and_contexts() {
        let a: Context = [("tenant", "acme")].into_iter().collect();
        let b: Context = [("tenant", "globex")].into_iter().collect();
        assert_ne!(binding("k", &a), binding("k", &b));
        assert_ne!(binding("k", &a), binding("k2", &a));
        assert_eq!(binding("k", &a), binding("k", &a));
    }

    #[test]
    fn pin_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        fs::write(&path, "1234\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_pin("hsm", &SecretSource::File(path.clone()))
            .err()
            .unwrap();
        assert!(err.contains("chmod 0400"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_pin("hsm", &SecretSource::File(path)).is_ok());
    }
}
