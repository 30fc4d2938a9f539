//! Plain data about root keys that the configuration names: key references, the data-key
//! cache's limits, a remote backend's outage settings, where the master key comes from.
//! `crate::keys` uses them (and re-exports them under their old paths).

use std::path::PathBuf;
use std::time::Duration;

/// A reference to a root key: `backend:key_id` (a bare name means the local keyring).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub backend: String,
    pub key_id: String,
}

impl KeyRef {
    pub const DEFAULT_BACKEND: &'static str = "local";

    pub fn parse(s: &str) -> Option<KeyRef> {
        let (backend, key_id) = match s.split_once(':') {
            Some((b, k)) => (b, k),
            None => (Self::DEFAULT_BACKEND, s),
        };
        if backend.is_empty() || key_id.is_empty() || backend.len() > 64 || key_id.len() > 255 {
            return None;
        }
        Some(KeyRef {
            backend: backend.to_string(),
            key_id: key_id.to_string(),
        })
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.backend, self.key_id)
    }
}

/// Cache limits. The defaults stay far inside NIST's limits for AES-GCM under one key
/// (each message also gets its own HKDF-derived key, so these bound exposure, not nonce reuse).
#[derive(Debug, Clone)]
pub struct CacheLimits {
    /// Age after which a sealing key is dropped (default 5 minutes).
    pub max_age: Duration,
    /// Messages one sealing key may seal (default 2^20).
    pub max_messages: u64,
    /// Plaintext bytes one sealing key may seal (default 4 GiB).
    pub max_bytes: u64,
    /// Entries per side before least-recently-used eviction (default 10,000; bounds memory).
    pub max_entries: u64,
    /// How long an unwrapped data key is kept for opening (default 5 minutes).
    pub open_ttl: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_age: Duration::from_secs(300),
            max_messages: 1 << 20,
            max_bytes: 4 << 30,
            max_entries: 10_000,
            open_ttl: Duration::from_secs(300),
        }
    }
}

/// How a remote backend rides out outages: deadline, retries, circuit breaker.
#[derive(Debug, Clone)]
pub struct ResilienceSettings {
    /// Deadline for one backend call (default 2 s).
    pub call_timeout: Duration,
    /// Retries after the first attempt for retryable errors (default 2).
    pub retries: u32,
    /// First backoff; doubles each retry, with full jitter (default 50 ms).
    pub backoff: Duration,
    /// Consecutive failures that open the circuit (default 5).
    pub failure_threshold: u32,
    /// How long the circuit stays open before a trial call (default 10 s).
    pub open_for: Duration,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        ResilienceSettings {
            call_timeout: Duration::from_secs(2),
            retries: 2,
            backoff: Duration::from_millis(50),
            failure_threshold: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// Where the master key comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// A file holding 64 hex characters (or 32 raw bytes); created on first start.
    File(PathBuf),
    /// An environment variable holding 64 hex characters.
    Env(String),
}

/// Local keyring key names: 1-64 characters from A-Z a-z 0-9 - _ . /
pub fn validate_key_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid key name {name:?}: use 1-64 characters from A-Z a-z 0-9 - _ . /"
        ))
    }
}
