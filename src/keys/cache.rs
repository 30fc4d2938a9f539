//! The data-key cache, modelled on the AWS Encryption SDK's caching materials manager.
//!
//! - **Sealing side**: one data key per (root keys, key context), reused until it is older than
//!   `max_age`, has sealed `max_messages` messages or `max_bytes` bytes, whichever comes first.
//!   Key contexts partition the cache: one tenant's data key never seals another's data.
//! - **Opening side**: (wrapped key, key context) → data key, for `open_ttl`.
//! - **Records** (v2 tokens): (vault, record id, key context) → the record's key, for
//!   `open_ttl`, behind a plain map that answers repeated hits without moka's per-read
//!   bookkeeping (same lifetime, cleared with it).
//! - **Single-flight**: concurrent misses on one entry share one backend call (moka's
//!   `try_get_with` coalesces initialisers).
//! - **Invalidation** ([`DataKeyCache::invalidate_all`]: a root key disabled, rotated, scheduled
//!   for deletion, a record shredded) is final: every entry is stamped with the cache's
//!   generation as it was when its fetch began, and an entry whose fetch began before the last
//!   invalidation is never served, even one inserted after it (moka's `invalidate_all` hides
//!   only what was there when it ran).
//! - Evicted keys are zeroized when their last user drops them ([`DataKey`] zeroizes on drop).
//! - Authorization is not the cache's business: callers check it on every request, hit or miss.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use moka::future::Cache;

use super::{BackendError, DataKey, KeyRef, OpenRecord, SealingKey};
use crate::envelope::{Context, WrappedKey};

pub use crate::config::keys::CacheLimits;

struct SealEntry {
    /// The cache's generation when this key's making began.
    generation: u64,
    key: Arc<SealingKey>,
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// A cached value with the cache's generation as it was when its fetch began.
#[derive(Clone)]
struct Stamped<V> {
    generation: u64,
    value: V,
}

pub struct DataKeyCache {
    limits: CacheLimits,
    /// Bumped by every invalidation, before the caches are emptied.
    generation: AtomicU64,
    seal: Cache<Vec<u8>, Arc<SealEntry>>,
    open: Cache<Vec<u8>, Stamped<Arc<DataKey>>>,
    /// (vault, record id, key context, route keys) → the record's key, for v2 tokens.
    records: Cache<Vec<u8>, Stamped<Arc<OpenRecord>>>,
    /// In front of `records`: what was read from it lately, each until `open_ttl` after its
    /// record was opened (as `records` keeps it), at most `max_entries` (cleared when full),
    /// cleared by [`DataKeyCache::invalidate_all`]. A hit here costs a map lookup.
    front: RwLock<Front>,
}

#[derive(Default)]
struct Front {
    /// Bumped by every invalidation: a fetch that began before one is not remembered here.
    generation: u64,
    entries: HashMap<Vec<u8>, Arc<OpenRecord>>,
}

impl DataKeyCache {
    pub fn new(limits: CacheLimits) -> Self {
        let seal = Cache::builder()
            .max_capacity(limits.max_entries)
            .time_to_live(limits.max_age)
            .build();
        let open = Cache::builder()
            .max_capacity(limits.max_entries)
            .time_to_live(limits.open_ttl)
            .build();
        let records = Cache::builder()
            .max_capacity(limits.max_entries)
            .time_to_live(limits.open_ttl)
            .build();
        DataKeyCache {
            limits,
            generation: AtomicU64::new(0),
            seal,
            open,
            records,
            front: RwLock::default(),
        }
    }

    /// A sealing key for `messages` messages totalling `bytes` bytes; `make` is called on a
    /// miss. Returns the key and whether it was a cache hit. `scope` partitions the cache by
    /// token format and vault (a v2 key's EDKs are bound to its record id).
    pub async fn sealing_key<F, Fut>(
        &self,
        scope: &[u8],
        keys: &[KeyRef],
        key_context: &Context,
        messages: u64,
        bytes: u64,
        make: F,
    ) -> Result<(Arc<SealingKey>, bool), BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<SealingKey, BackendError>>,
    {
        let cache_key = seal_cache_key(scope, keys, key_context);
        // v2 tokens take random-looking 96-bit nonces: never more than 2^32 per data key.
        let max_messages = if scope.starts_with(b"v2:") {
            self.limits
                .max_messages
                .min(crate::envelope::record::MAX_MESSAGES)
        } else {
            self.limits.max_messages
        };
        // A few rounds: an entry used up by this message (or by racing ones), or made before
        // an invalidation, is replaced.
        for _ in 0..3 {
            let started = self.generation();
            let mut missed = false;
            let entry = self
                .seal
                .try_get_with(cache_key.clone(), async {
                    missed = true;
                    let key = make().await?;
                    // What we seal now is often read back at once (a write's response, a
                    // read-after-write): prime the opening side so that costs no unwrap call.
                    // A v2 key's EDKs are bound to its record id too: its record's key is
                    // primed by the key service instead.
                    let edks = if key.record.is_some() {
                        &[][..]
                    } else {
                        &key.header.edks[..]
                    };
                    for edk in edks {
                        let copy = Arc::new(DataKey::from_bytes(*key.data_key.expose()));
                        self.open
                            .insert(
                                open_cache_key(edk, key_context),
                                Stamped {
                                    generation: started,
                                    value: copy,
                                },
                            )
                            .await;
                    }
                    Ok(Arc::new(SealEntry {
                        generation: started,
                        key: Arc::new(key),
                        messages: AtomicU64::new(0),
                        bytes: AtomicU64::new(0),
                    }))
                })
                .await
                .map_err(|e: Arc<BackendError>| (*e).clone())?;
            if entry.generation != self.generation() {
                // Made before an invalidation: never used, by this request or a later one.
                self.drop_seal_entry(&cache_key, &entry).await;
                continue;
            }
            let used_messages = entry
                .messages
                .fetch_add(messages, Ordering::Relaxed)
                .saturating_add(messages);
            let used_bytes = entry
                .bytes
                .fetch_add(bytes, Ordering::Relaxed)
                .saturating_add(bytes);
            // A v2 key also counts what it really sealed (the estimate above may fall short,
            // e.g. with wildcard paths): one near its nonce limit is replaced, not kept until
            // max_age while every write fails.
            let nonces_left = entry
                .key
                .record
                .as_ref()
                .is_none_or(|r| r.remaining() >= messages);
            if used_messages <= max_messages && used_bytes <= self.limits.max_bytes && nonces_left {
                return Ok((entry.key.clone(), !missed));
            }
            // Used up: drop it and go round again.
            self.drop_seal_entry(&cache_key, &entry).await;
        }
        // A single message larger than max_bytes, or heavy churn: a key of its own.
        Ok((Arc::new(make().await?), false))
    }

    /// The data key inside `edk` under `key_context`; `unwrap` is called on a miss.
    pub async fn opening_key<F, Fut>(
        &self,
        edk: &WrappedKey,
        key_context: &Context,
        unwrap: F,
    ) -> Result<(Arc<DataKey>, bool), BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<DataKey, BackendError>>,
    {
        let cache_key = open_cache_key(edk, key_context);
        self.current(&self.open, cache_key, async {
            unwrap().await.map(Arc::new)
        })
        .await
    }

    /// Drop the sealing entry `entry` of `cache_key` (only if it is still that one).
    async fn drop_seal_entry(&self, cache_key: &[u8], entry: &Arc<SealEntry>) {
        if let Some(current) = self.seal.get(cache_key).await
            && Arc::ptr_eq(&current, entry)
        {
            self.seal.invalidate(cache_key).await;
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// `cache[cache_key]`, or what `fetch` gives on a miss (concurrent misses share one
    /// fetch), never an entry whose fetch began before the last invalidation. Returns the
    /// value and whether it was a hit.
    async fn current<V, Fut>(
        &self,
        cache: &Cache<Vec<u8>, Stamped<V>>,
        cache_key: Vec<u8>,
        fetch: Fut,
    ) -> Result<(V, bool), BackendError>
    where
        V: Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<V, BackendError>>,
    {
        let started = self.generation();
        if let Some(entry) = cache.get(&cache_key).await {
            if entry.generation == started {
                return Ok((entry.value, true));
            }
            // Fetched before an invalidation and inserted after it.
            cache.invalidate(&cache_key).await;
        }
        let mut missed = false;
        let entry = cache
            .try_get_with(cache_key.clone(), async {
                missed = true;
                fetch.await.map(|value| Stamped {
                    generation: started,
                    value,
                })
            })
            .await
            .map_err(|e: Arc<BackendError>| (*e).clone())?;
        if entry.generation != self.generation() {
            // An invalidation came while it was fetched: kept for no one else.
            cache.invalidate(&cache_key).await;
        }
        if entry.generation < started {
            // Another caller's fetch from before an invalidation, inserted between the check
            // above and this call: not for a request that began after it.
            return Err(BackendError::Unavailable(
                "the key cache was invalidated meanwhile; retry".into(),
            ));
        }
        Ok((entry.value, !missed))
    }

    /// The key of a data-key record; `fetch` is called on a miss (single-flight).
    pub async fn record<F, Fut>(
        &self,
        cache_key: Vec<u8>,
        fetch: F,
    ) -> Result<(Arc<OpenRecord>, bool), BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<OpenRecord, BackendError>>,
    {
        if let Some(entry) = self.front_get(&cache_key) {
            return Ok((entry, true));
        }
        let generation = self.front_generation();
        let (entry, hit) = self
            .current(&self.records, cache_key.clone(), async {
                fetch().await.map(Arc::new)
            })
            .await?;
        self.front_put(generation, cache_key, &entry);
        Ok((entry, hit))
    }

    fn front_get(&self, cache_key: &[u8]) -> Option<Arc<OpenRecord>> {
        let front = self.front.read().unwrap_or_else(|e| e.into_inner());
        let entry = front.entries.get(cache_key)?;
        (entry.opened_at.elapsed() < self.limits.open_ttl).then(|| entry.clone())
    }

    fn front_generation(&self) -> u64 {
        self.front
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    fn front_put(&self, generation: u64, cache_key: Vec<u8>, entry: &Arc<OpenRecord>) {
        if entry.opened_at.elapsed() >= self.limits.open_ttl {
            return;
        }
        let mut front = self.front.write().unwrap_or_else(|e| e.into_inner());
        if front.generation != generation {
            return;
        }
        if front.entries.len() as u64 >= self.limits.max_entries.max(1) {
            let now = Instant::now();
            let ttl = self.limits.open_ttl;
            front
                .entries
                .retain(|_, e| now.saturating_duration_since(e.opened_at) < ttl);
            if front.entries.len() as u64 >= self.limits.max_entries.max(1) {
                front.entries.clear();
            }
        }
        front.entries.insert(cache_key, entry.clone());
    }

    /// Remember a record's key (the sealing side primes the opening side).
    pub async fn insert_record(&self, cache_key: Vec<u8>, entry: Arc<OpenRecord>) {
        let stamped = Stamped {
            generation: self.generation(),
            value: entry,
        };
        self.records.insert(cache_key, stamped).await;
    }

    /// Drop every cached key (a root key was rotated, disabled or scheduled for deletion).
    /// Whether any data key is cached (sealing or opening): requests on those keys can be
    /// served without the backend (for readiness).
    pub fn holds_keys(&self) -> bool {
        self.seal.iter().next().is_some()
            || self.open.iter().next().is_some()
            || self.records.iter().next().is_some()
    }

    pub fn invalidate_all(&self) {
        // First: a fetch that begins from now on sees the backend's new state, and what a
        // fetch that began before brings is not served.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.seal.invalidate_all();
        self.open.invalidate_all();
        self.records.invalidate_all();
        // After `records`: a read that found an entry there before it went either put it in
        // the front before this clears it, or sees the new generation and does not.
        let mut front = self.front.write().unwrap_or_else(|e| e.into_inner());
        front.generation += 1;
        front.entries.clear();
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn seal_cache_key(scope: &[u8], keys: &[KeyRef], key_context: &Context) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, scope);
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        put(&mut out, k.backend.as_bytes());
        put(&mut out, k.key_id.as_bytes());
    }
    out.extend_from_slice(&key_context.canonical());
    out
}

fn open_cache_key(edk: &WrappedKey, key_context: &Context) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, edk.backend.as_bytes());
    put(&mut out, edk.key_id.as_bytes());
    out.extend_from_slice(&edk.key_version.to_be_bytes());
    put(&mut out, &edk.blob);
    out.extend_from_slice(&key_context.canonical());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Header;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn fake_key() -> SealingKey {
        SealingKey {
            data_key: DataKey::generate(),
            header: Header { edks: vec![] },
            record: None,
            labels: vec![],
        }
    }

    fn keys() -> Vec<KeyRef> {
        vec![KeyRef::parse("users").unwrap()]
    }

    fn fake_record() -> OpenRecord {
        use crate::envelope::record::{RecordId, RecordKey};
        OpenRecord::new(
            Arc::new(RecordKey::new(&[7; 32], RecordId::generate())),
            Header { edks: vec![] },
        )
    }

    /// Fetches through `cache.record`, counting calls to the vault.
    async fn read(cache: &DataKeyCache, key: &[u8], calls: &AtomicUsize) -> bool {
        let (_, hit) = cache
            .record(key.to_vec(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(fake_record())
            })
            .await
            .unwrap();
        hit
    }

    #[tokio::test]
    async fn records_are_kept_until_invalidated_or_too_old() {
        let cache = DataKeyCache::new(CacheLimits {
            open_ttl: Duration::from_secs(2),
            ..Default::default()
        });
        let calls = AtomicUsize::new(0);
        assert!(!read(&cache, b"a", &calls).await);
        for _ in 0..3 {
            assert!(read(&cache, b"a", &calls).await);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Invalidation (a key disabled, rotated, scheduled for deletion) empties every layer.
        cache.invalidate_all();
        assert!(!read(&cache, b"a", &calls).await);
        assert!(read(&cache, b"a", &calls).await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Past open_ttl from when it was opened, a record is read again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(!read(&cache, b"a", &calls).await);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_record_fetched_across_an_invalidation_is_not_kept() {
        let cache = DataKeyCache::new(CacheLimits::default());
        let calls = AtomicUsize::new(0);
        // The invalidation lands while the vault is being read: what that read returns may
        // predate it (the key's state changed meanwhile), so it is not remembered in front.
        cache
            .record(b"a".to_vec(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                cache.invalidate_all();
                Ok(fake_record())
            })
            .await
            .unwrap();
        assert!(cache.front.read().unwrap().entries.is_empty());
        // Nor behind it: the next read fetches again (moka's invalidate_all hides only what
        // was cached when it ran; this was inserted after).
        assert!(!read(&cache, b"a", &calls).await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(read(&cache, b"a", &calls).await);
    }

    #[tokio::test]
    async fn keys_made_or_unwrapped_across_an_invalidation_are_not_kept() {
        let cache = DataKeyCache::new(CacheLimits::default());
        let calls = AtomicUsize::new(0);
        let ctx = Context::new();
        // Sealing: a key whose making straddles an invalidation is not used, nor kept.
        let make = || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                cache.invalidate_all();
            }
            Ok(fake_key())
        };
        let (first, hit) = cache
            .sealing_key(b"v1", &keys(), &ctx, 1, 1, make)
            .await
            .unwrap();
        assert!(!hit);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "made again after the invalidation"
        );
        let (again, hit) = cache
            .sealing_key(b"v1", &keys(), &ctx, 1, 1, make)
            .await
            .unwrap();
        assert!(hit && Arc::ptr_eq(&first, &again));
        // Opening: the unwrapping caller gets its key; the next one unwraps again.
        let edk = WrappedKey {
            backend: "local".into(),
            key_id: "users".into(),
            key_version: 1,
            blob: vec![1; 8],
        };
        let unwraps = AtomicUsize::new(0);
        let open = |straddle: bool| {
            let (cache, edk, ctx, unwraps) = (&cache, &edk, &ctx, &unwraps);
            async move {
                cache
                    .opening_key(edk, ctx, || async {
                        unwraps.fetch_add(1, Ordering::SeqCst);
                        if straddle {
                            cache.invalidate_all();
                        }
                        Ok(DataKey::generate())
                    })
                    .await
                    .unwrap()
                    .1
            }
        };
        assert!(!open(true).await);
        assert!(!open(false).await);
        assert!(open(false).await);
        assert_eq!(unwraps.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_front_stays_within_max_entries() {
        let cache = DataKeyCache::new(CacheLimits {
            max_entries: 4,
            ..Default::default()
        });
        let calls = AtomicUsize::new(0);
        for i in 0..20u8 {
            read(&cache, &[i], &calls).await;
            assert!(cache.front.read().unwrap().entries.len() <= 4);
        }
    }

    #[tokio::test]
    async fn message_limit_forces_a_new_key() {
        let cache = DataKeyCache::new(CacheLimits {
            max_messages: 2,
            ..Default::default()
        });
        let calls = AtomicUsize::new(0);
        let make = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(fake_key())
        };
        let ctx = Context::new();
        for _ in 0..5 {
            cache
                .sealing_key(b"v1", &keys(), &ctx, 1, 1, make)
                .await
                .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_v2_key_near_its_nonce_limit_is_replaced() {
        use crate::envelope::record::{MAX_MESSAGES, RecordId, RecordKey};
        let cache = DataKeyCache::new(CacheLimits::default());
        let calls = AtomicUsize::new(0);
        let make = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut key = fake_key();
            key.record = Some(Arc::new(RecordKey::new(&[7; 32], RecordId::generate())));
            Ok(key)
        };
        let ctx = Context::new();
        let (first, _) = cache
            .sealing_key(b"v2:test", &keys(), &ctx, 1, 1, make)
            .await
            .unwrap();
        // More was sealed than the cache was told (an estimate that fell short): 2 nonces left.
        let record = first.record.as_ref().unwrap();
        record.count_sealed(MAX_MESSAGES - 2);
        let (same, _) = cache
            .sealing_key(b"v2:test", &keys(), &ctx, 2, 1, make)
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &same));
        let (next, hit) = cache
            .sealing_key(b"v2:test", &keys(), &ctx, 3, 1, make)
            .await
            .unwrap();
        assert!(!hit && !Arc::ptr_eq(&first, &next));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn byte_limit_and_contexts_partition() {
        let cache = DataKeyCache::new(CacheLimits {
            max_bytes: 100,
            ..Default::default()
        });
        let calls = AtomicUsize::new(0);
        let make = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(fake_key())
        };
        let a: Context = [("tenant", "a")].into_iter().collect();
        let b: Context = [("tenant", "b")].into_iter().collect();
        cache
            .sealing_key(b"v1", &keys(), &a, 1, 60, make)
            .await
            .unwrap();
        cache
            .sealing_key(b"v1", &keys(), &b, 1, 60, make)
            .await
            .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "contexts do not share keys"
        );
        cache
            .sealing_key(b"v1", &keys(), &a, 1, 60, make)
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3, "byte limit reached");
        // A message larger than the limit gets a key of its own.
        cache
            .sealing_key(b"v1", &keys(), &a, 1, 1000, make)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_call() {
        let cache = Arc::new(DataKeyCache::new(CacheLimits::default()));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                let make = || {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(fake_key())
                    }
                };
                cache
                    .sealing_key(b"v1", &keys(), &Context::new(), 1, 1, make)
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
