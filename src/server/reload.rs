//! Hot reload: on SIGHUP, and when the config file's content changes (read every
//! `[server] config_poll_ms`), the whole state is built again from the new file with the code
//! that builds it at start ([`super::build_state`]: config validation, key checks, backends,
//! authenticators, gateways, audit log), then swapped in at once.
//!
//! - **One snapshot per request.** Every request loads the current `Arc<AppState>` once when
//!   it starts (an atomic load, no lock) and finishes on it: in-flight requests finish on the
//!   state they started with; the old state goes when its last request ends.
//! - **Kubernetes volumes.** ConfigMaps and Secrets are mounted as symbolic links into a
//!   `..data` directory that the kubelet swaps atomically; the link's own mtime never changes.
//!   The poll reads the file through the links and compares a SHA-256 of its content, so a
//!   swap is seen, and an unchanged file is never rebuilt.
//! - **A bad config keeps the old one.** A file that does not parse or validate, a key that is
//!   missing, a certificate that does not load: the reload is refused, the previous state
//!   serves on, and the reason is logged (error), counted (`config_reload_failures_total`)
//!   and shown in `/readyz`'s detail until a reload succeeds. The same content is not tried
//!   again until it changes (or SIGHUP asks).
//! - **Restart-only settings** (listeners and the unix socket, listener limits, the admin
//!   section, the keyring, the demo store, TLS on or off, the audit key while the audit file
//!   stays): a new value is not applied; the reload keeps the running value for it, logs a
//!   warning naming the key, and applies the rest.
//! - **What reloads:** routes, backends and the data-key cache (kept warm when `[backend.*]`
//!   and `[cache]` are unchanged), key policies and grants, authenticators (JWKS, CAs,
//!   SigV4 credentials), masking, quotas (their counters start again), the upstream client,
//!   TLS certificate paths (the listener's [`super::tls::Tls`] switches files; it still
//!   reloads changed files by itself), the audit file (another path opens another file).
//! - **SIGHUP** also reopens the audit file at its path (logrotate: rename, then SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::Config;
use crate::keys::RootKeyProvider;
use crate::keys::keyring::Keyring;
use crate::metrics::Metrics;
use crate::pipeline::AppState;

use super::tls::Tls;

/// What outlives reloads: opened once at start.
pub(super) struct Base {
    /// `None`: no `[keyring]` (a stateless pod).
    pub keyring: Option<Arc<Keyring>>,
    pub metrics: Arc<Metrics>,
    pub providers: Vec<Arc<dyn RootKeyProvider>>,
    /// The data listener's TLS (also the admin listener's with `[admin] auth = "mtls"`).
    pub tls: Option<Arc<Tls>>,
    /// The config file (`None`: started from a `Config` value; nothing to reload from).
    pub path: Option<PathBuf>,
}

/// The outcome of the last reload, for `/readyz`'s detail.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Reloads applied and refused since start.
    pub applied: u64,
    pub refused: u64,
    /// Why the last reload was refused, while no later one succeeded (never secrets: config
    /// messages name places and paths, not values).
    pub last_error: Option<String>,
}

/// The state requests are served with, swapped whole on reload.
pub struct Live {
    current: ArcSwap<AppState>,
    pub(super) base: Base,
    /// Held while a reload runs (SIGHUP and the poll may meet); the hash of the content last
    /// tried, applied or refused.
    tried: tokio::sync::Mutex<Option<[u8; 32]>>,
    status: Mutex<Status>,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: reload even when the file is unchanged (secret files it names may have
    /// changed), and reopen the audit file.
    Signal,
    /// The poll: only when the content changed.
    Poll,
}

impl Live {
    pub(super) fn new(state: AppState, base: Base, hash: Option<[u8; 32]>) -> Live {
        base.metrics.config_loaded(false);
        Live {
            current: ArcSwap::from_pointee(state),
            base,
            tried: tokio::sync::Mutex::new(hash),
            status: Mutex::new(Status::default()),
        }
    }

    /// The current state: a request takes it once and keeps it to its end.
    #[inline]
    pub fn load(&self) -> Arc<AppState> {
        self.current.load_full()
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Read the config file and, when it changed (or on SIGHUP), build and swap in the new
    /// state. `Ok(true)`: applied; `Ok(false)`: nothing to do; `Err`: refused (already logged
    /// and counted), the previous state serves on.
    pub async fn reload(&self, trigger: Trigger) -> Result<bool, String> {
        let mut tried = self.tried.lock().await;
        let old = self.load();
        if trigger == Trigger::Signal {
            old.audit.reopen().await;
        }
        let Some(path) = self.base.path.clone() else {
            if trigger == Trigger::Signal {
                tracing::warn!(
                    "SIGHUP: the proxy was not started from a config file; nothing to reload"
                );
            }
            return Ok(false);
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                // Reported once; the poll looks again and takes the file when it is back.
                if trigger == Trigger::Poll && *tried == Some(UNREADABLE) {
                    return Ok(false);
                }
                *tried = Some(UNREADABLE);
                return Err(self.refused(format!("{}: {e}", path.display())));
            }
        };
        let hash = hash_of(&bytes);
        if trigger == Trigger::Poll && *tried == Some(hash) {
            return Ok(false);
        }
        *tried = Some(hash);
        match self.rebuild(&path, bytes, &old).await {
            Ok(state) => {
                self.current.store(Arc::new(state));
                self.base.metrics.config_loaded(true);
                let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
                status.applied += 1;
                status.last_error = None;
                tracing::info!(path = %path.display(), ?trigger, "config reloaded; new requests use it");
                Ok(true)
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    fn refused(&self, error: String) -> String {
        tracing::error!(error = %error, "config reload refused; the previous config serves on");
        self.base.metrics.config_reload_failed();
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.refused += 1;
        status.last_error = Some(error.clone());
        error
    }

    async fn rebuild(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        old: &AppState,
    ) -> Result<AppState, String> {
        let text =
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        let mut config = crate::config::parse(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        for key in keep_restart_only(&mut config, &old.config) {
            tracing::warn!(
                key,
                "config reload: this setting changed but needs a restart; the running value stays"
            );
        }
        // TLS files: built (validated) now, installed only once everything else is built.
        let tls_switch = match (&self.base.tls, &config.server.tls) {
            (Some(_), Some((cert, key)))
                if old.config.server.tls.as_ref() != Some(&(cert.clone(), key.clone()))
                    || old.config.server.client_ca_file != config.server.client_ca_file =>
            {
                let built =
                    super::tls::server_config(cert, key, config.server.client_ca_file.as_deref())?;
                Some((cert.clone(), key.clone(), built))
            }
            _ => None,
        };
        let state = super::build_state(config, &self.base, Some(old)).await?;
        if let (Some(tls), Some((cert, key, built))) = (&self.base.tls, tls_switch) {
            tls.install(
                &cert,
                &key,
                state.config.server.client_ca_file.as_deref(),
                built,
            );
            tracing::info!(cert = %cert.display(), "TLS certificate files switched; new connections use them");
        }
        Ok(state)
    }

    /// Poll the config file every `[server] config_poll_ms` (read from the current state, so
    /// a reload can change it; zero: off) until `stop`.
    pub(super) async fn poll(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let every = self.load().config.server.config_poll;
            let wait = if every.is_zero() {
                Duration::from_secs(1)
            } else {
                every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if every.is_zero() || self.load().config.server.config_poll.is_zero() {
                continue;
            }
            let _ = self.reload(Trigger::Poll).await;
        }
    }
}

/// Put the running value back into `new` for each setting a reload cannot apply, and name
/// those that differed.
fn keep_restart_only(new: &mut Config, old: &Config) -> Vec<&'static str> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        // Compared, never shown: Debug of secret sources prints their place, not the secret.
        format!("{a:?}") != format!("{b:?}")
    }
    let mut kept = Vec::new();
    let mut keep = |name: &'static str, changed: bool| {
        if changed {
            kept.push(name);
        }
        changed
    };
    if keep("server.listen", new.server.listen != old.server.listen) {
        new.server.listen = old.server.listen;
    }
    if keep(
        "server.unix_socket",
        new.server.unix_socket != old.server.unix_socket,
    ) {
        new.server.unix_socket = old.server.unix_socket.clone();
    }
    if keep(
        "server.unix_socket_mode",
        new.server.unix_socket_mode != old.server.unix_socket_mode,
    ) {
        new.server.unix_socket_mode = old.server.unix_socket_mode;
    }
    if keep(
        "server (header_read_timeout_ms, max_header_bytes, max_connections, max_requests, h2_keepalive_*)",
        new.server.limits != old.server.limits,
    ) {
        new.server.limits = old.server.limits;
    }
    if keep(
        "server.tls (turning TLS on or off)",
        new.server.tls.is_some() != old.server.tls.is_some(),
    ) {
        new.server.tls = old.server.tls.clone();
        new.server.client_ca_file = old.server.client_ca_file.clone();
    }
    if keep("admin", differs(&new.admin, &old.admin)) {
        new.admin = old.admin.clone();
    }
    if keep("keyring", differs(&new.keyring, &old.keyring)) {
        new.keyring = old.keyring.clone();
    }
    if keep("demo_store", new.demo_store != old.demo_store) {
        new.demo_store = old.demo_store;
    }
    if new.audit_path == old.audit_path
        && keep(
            "audit.key_file (while audit.path stays)",
            differs(&new.audit_key, &old.audit_key),
        )
    {
        new.audit_key = old.audit_key.clone();
    }
    kept
}

/// What `tried` holds while the file cannot be read (no SHA-256 of a config is all zeros).
const UNREADABLE: [u8; 32] = [0; 32];

/// The hash the poll compares: SHA-256 of the file's content.
pub(super) fn hash_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
