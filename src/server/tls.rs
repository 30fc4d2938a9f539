//! TLS for the listener (rustls, ring provider), PEM loading, client-certificate verification
//! and certificate reload.
//!
//! With `client_ca_file`, the handshake verifies a presented client certificate against those
//! CAs (`WebPkiClientVerifier`: chain, validity, `clientAuth` usage) and refuses the connection
//! when it does not verify; a client that presents none is let in at the TLS level, so routes
//! without `auth = "mtls"` keep working, and `auth = "mtls"` routes refuse it (401).
//!
//! Reload: [`Tls::watch`] looks at the certificate, key and client CA files every second; when
//! one changed it builds a new `ServerConfig` for new connections (open ones keep theirs). A
//! file that does not load (half written, a key that does not match) keeps the old config and
//! is reported once per change, by path only: never its contents. A config reload that names
//! other files switches to them ([`Tls::install`]); the watch then follows the new files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

pub use crate::pki::load_certs;

/// The listener's `ServerConfig`: its certificate and key, and with `client_ca` a client
/// certificate verifier that allows clients without one.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = load_certs(cert_file)?;
    // The key's parse error names the file only: rustls-pki-types errors never quote contents.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: bad CA certificate: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An acceptor for the certificate and key (no client certificates).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    Ok(tokio_rustls::TlsAcceptor::from(server_config(
        cert_file, key_file, None,
    )?))
}

/// What identifies one version of a file without reading it: modification time, length and
/// inode (a file replaced by rename keeps neither).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(SystemTime, u64, u64)>);

fn stamp(path: &Path) -> Stamp {
    Stamp(std::fs::metadata(path).ok().map(|m| {
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), ino)
    }))
}

/// The files a [`Tls`] is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn stamps(&self) -> Vec<Stamp> {
        let mut s = vec![stamp(&self.cert_file), stamp(&self.key_file)];
        if let Some(ca) = &self.client_ca {
            s.push(stamp(ca));
        }
        s
    }

    fn build(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        server_config(&self.cert_file, &self.key_file, self.client_ca.as_deref())
    }
}

/// The listener's TLS settings, rebuilt when their files change.
pub struct Tls {
    files: Mutex<Files>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The stamps of the files `current` was built from, and of the last set that failed
    /// (reported once, retried when a file changes again).
    stamps: Mutex<(Vec<Stamp>, Option<Vec<Stamp>>)>,
}

impl Tls {
    /// Load the files; any that does not load is an error (at start, unlike on reload).
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Arc<Tls>, String> {
        let files = Files {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
        };
        let stamps = files.stamps();
        let tls = Tls {
            current: RwLock::new(files.build()?),
            files: Mutex::new(files),
            stamps: Mutex::new((stamps, None)),
        };
        Ok(Arc::new(tls))
    }

    fn files(&self) -> Files {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Switch to other files (a config reload that names them), with `config` already built
    /// from them ([`server_config`]: the reload validates before it installs anything). New
    /// connections use it; open ones keep theirs.
    pub fn install(
        &self,
        cert_file: &Path,
        key_file: &Path,
        client_ca: Option<&Path>,
        config: Arc<rustls::ServerConfig>,
    ) {
        let files = Files {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
        };
        let now = files.stamps();
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        *self.files.lock().unwrap_or_else(PoisonError::into_inner) = files;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        *stamps = (now, None);
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Rebuild the config if a file changed since the last look: `Ok(true)` when it was
    /// replaced, `Err` (once per change) when the new files do not load: the old config stays.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let files = self.files();
        let now = files.stamps();
        {
            let stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
            if stamps.0 == now || stamps.1.as_ref() == Some(&now) {
                return Ok(false);
            }
        }
        let built = files.build();
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if *self.files.lock().unwrap_or_else(PoisonError::into_inner) != files {
            // A reload installed other files meanwhile: theirs stands.
            return Ok(false);
        }
        match built {
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
                *stamps = (now, None);
                Ok(true)
            }
            Err(e) => {
                stamps.1 = Some(now);
                Err(e)
            }
        }
    }

    /// Look for changed files every `every` until the last `Arc` is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(tls) = weak.upgrade() else { break };
                // Reading and parsing a few PEM files: small enough for the runtime thread.
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!(
                        cert = %tls.files().cert_file.display(),
                        "TLS certificate, key or client CA reloaded; new connections use them"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS files changed but do not load; keeping the previous certificate"
                    ),
                }
            }
        });
    }
}
