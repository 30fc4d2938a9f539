//! Whether a stored envelope header is sealed under the *current* version of a route's root
//! keys: what `reencrypt` and the gateway's copy onto itself judge stored data by.
//!
//! A header is current when, for every key the route names, it carries an EDK of that key
//! (the backend's [`same_key`](super::RootKeyProvider::same_key) decides, so KMS aliases and
//! ARNs match) whose version is the one the backend reports now
//! ([`describe_key`](super::RootKeyProvider::describe_key)`.current_version`). An EDK of an
//! older version, or a missing EDK (the route was re-pointed to another key or backend), makes
//! it stale. EDKs of keys the route no longer names are ignored: the route's own EDKs decide.

use super::{BackendError, KeyRef, KeyService};
use crate::envelope::Header;

/// Each of a route's keys with the key it names now (an alias's target: the backend's
/// `describe_key` id) and that key's current version, asked of their backends once per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentVersions(pub Vec<(KeyRef, String, u32)>);

/// How an EDK's key and version are named in the audit log: `BACKEND:KEY:VERSION`.
pub fn key_version_label(edk: &crate::envelope::WrappedKey) -> String {
    format!("{}:{}:{}", edk.backend, edk.key_id, edk.key_version)
}

/// [`key_version_label`] of each of a header's EDKs, in order: formatted once per data key
/// (held with it in the cache), shared by every request that uses it.
pub fn key_version_labels(header: &Header) -> Vec<std::sync::Arc<str>> {
    header
        .edks
        .iter()
        .map(|edk| key_version_label(edk).into())
        .collect()
}

impl KeyService {
    /// Whether the stored EDK key id `wrapped_key_id` is of the configured key `k`.
    pub fn same_key(&self, k: &KeyRef, wrapped_key_id: &str) -> bool {
        self.backends
            .get(&k.backend)
            .is_some_and(|b| b.same_key(&k.key_id, wrapped_key_id))
    }

    /// Ask each key's backend for its current version (resolving names first, so stored EDKs
    /// can be matched against it).
    pub async fn current_versions(&self, keys: &[KeyRef]) -> Result<CurrentVersions, BackendError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let backend = self.backend(&k.backend)?;
            if !backend.resolved(&k.key_id) {
                backend.resolve_key(&k.key_id).await?;
            }
            let d = backend.describe_key(&k.key_id).await?;
            out.push((k.clone(), d.key_id, d.current_version));
        }
        Ok(CurrentVersions(out))
    }

    /// Whether `header` is sealed under the current version of every key in `current`.
    pub fn is_current(&self, header: &Header, current: &CurrentVersions) -> bool {
        current.0.iter().all(|(k, now, version)| {
            let Some(backend) = self.backends.get(&k.backend) else {
                return false;
            };
            // EDKs of this route key: of the key it names now, or (an alias re-pointed)
            // of a key it named before.
            let mut of_key = header
                .edks
                .iter()
                .filter(|e| {
                    e.backend == k.backend
                        && (backend.same_key(&k.key_id, &e.key_id)
                            || backend.same_key(now, &e.key_id))
                })
                .peekable();
            of_key.peek().is_some()
                && of_key.all(|e| {
                    (e.key_id == *now || backend.same_key(now, &e.key_id))
                        && e.key_version == *version
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::WrappedKey;
    use crate::keys::{CacheLimits, keyring::Keyring};
    use crate::metrics::Metrics;
    use std::sync::Arc;

    fn edk(backend: &str, key: &str, version: u32) -> WrappedKey {
        WrappedKey {
            backend: backend.into(),
            key_id: key.into(),
            key_version: version,
            blob: vec![1; 8],
        }
    }

    #[tokio::test]
    async fn stale_when_any_route_key_is_old_or_missing() {
        let dir = tempfile::tempdir().unwrap();
        let master = crate::keys::keyring::MasterKeySource::File(dir.path().join("master.key"));
        let keyring = Keyring::open("local", &dir.path().join("k.json"), &master).unwrap();
        let keys = KeyService::new(
            vec![keyring as Arc<dyn crate::keys::RootKeyProvider>],
            CacheLimits::default(),
            Arc::new(Metrics::new()),
        );
        let a = KeyRef::parse("a").unwrap();
        let b = KeyRef::parse("b").unwrap();
        let current = CurrentVersions(vec![(a, "a".into(), 2), (b, "b".into(), 1)]);
        let h = |edks: Vec<WrappedKey>| Header { edks };
        assert!(keys.is_current(
            &h(vec![edk("local", "a", 2), edk("local", "b", 1)]),
            &current
        ));
        assert!(!keys.is_current(
            &h(vec![edk("local", "a", 1), edk("local", "b", 1)]),
            &current
        ));
        assert!(
            !keys.is_current(&h(vec![edk("local", "a", 2)]), &current),
            "b missing"
        );
        assert!(!keys.is_current(&h(vec![edk("kms", "a", 2), edk("local", "b", 1)]), &current));
        assert!(keys.is_current(
            &h(vec![
                edk("local", "a", 2),
                edk("local", "b", 1),
                edk("local", "old", 1)
            ]),
            &current
        ));
    }
}
