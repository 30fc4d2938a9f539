//! Outage handling around a remote root-key backend: a deadline per call, bounded retries with
//! exponential backoff and full jitter for retryable errors, and a circuit breaker so a dead
//! backend fails fast (and `/readyz` can say so) instead of holding every request for the full
//! timeout. Recovery is automatic: after the cool-down one trial call goes through.
//!
//! Only retryable errors ([`BackendError::Unavailable`], [`BackendError::Credentials`]) count
//! as failures: a wrong context or a disabled key is an answer, not an outage.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use super::{BackendError, DataKey, GeneratedKey, KeyDescription, RootKeyProvider};
use crate::envelope::{Context, WrappedKey};

pub use crate::config::keys::ResilienceSettings;

/// What `/readyz` reports for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Circuit open: calls fail fast until the cool-down ends.
    Down,
    /// Cool-down over; the next call is a trial.
    Recovering,
}

struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

pub struct Resilient<P> {
    inner: P,
    settings: ResilienceSettings,
    breaker: Mutex<Breaker>,
}

impl<P: RootKeyProvider> Resilient<P> {
    pub fn new(inner: P, settings: ResilienceSettings) -> Self {
        Resilient {
            inner,
            settings,
            breaker: Mutex::new(Breaker {
                consecutive_failures: 0,
                open_until: None,
            }),
        }
    }

    pub fn health(&self) -> Health {
        let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match b.open_until {
            Some(t) if Instant::now() < t => Health::Down,
            Some(_) => Health::Recovering,
            None => Health::Up,
        }
    }

    fn admit(&self) -> Result<(), BackendError> {
        match self.health() {
            Health::Down => Err(BackendError::Unavailable(format!(
                "backend {} is failing; circuit open",
                self.inner.name()
            ))),
            _ => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            if b.open_until.is_some() {
                tracing::info!(backend = self.inner.name(), "key backend recovered");
            }
            b.consecutive_failures = 0;
            b.open_until = None;
        } else {
            b.consecutive_failures += 1;
            let trial_failed = b.open_until.is_some();
            if trial_failed || b.consecutive_failures >= self.settings.failure_threshold {
                if !trial_failed {
                    tracing::error!(
                        backend = self.inner.name(),
                        "key backend failing; opening the circuit"
                    );
                }
                b.open_until = Some(Instant::now() + self.settings.open_for);
            }
        }
    }

    async fn call<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, BackendError>>,
    {
        self.admit()?;
        let mut attempt = 0;
        loop {
            let result = match tokio::time::timeout(self.settings.call_timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::Unavailable(format!(
                    "backend {} did not answer within {:?}",
                    self.inner.name(),
                    self.settings.call_timeout
                ))),
            };
            match result {
                Err(e) if e.retryable() => {
                    if attempt >= self.settings.retries {
                        self.record(false);
                        return Err(e);
                    }
                    attempt += 1;
                    tokio::time::sleep(jittered(self.settings.backoff, attempt)).await;
                }
                other => {
                    self.record(true);
                    return other;
                }
            }
        }
    }
}

/// Full jitter: uniform in [0, base · 2^(attempt-1)].
fn jittered(base: Duration, attempt: u32) -> Duration {
    let cap = base.saturating_mul(1 << (attempt - 1).min(10));
    let mut r = [0u8; 8];
    crate::envelope::fill_random(&mut r);
    let frac = (u64::from_le_bytes(r) >> 11) as f64 / (1u64 << 53) as f64;
    cap.mul_f64(frac)
}

#[async_trait]
impl<P: RootKeyProvider> RootKeyProvider for Resilient<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &Context,
    ) -> Result<GeneratedKey, BackendError> {
        self.call(|| self.inner.generate_data_key(key_id, ctx))
            .await
    }

    async fn wrap_data_key(
        &self,
        key_id: &str,
        key: &DataKey,
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        self.call(|| self.inner.wrap_data_key(key_id, key, ctx))
            .await
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &Context,
    ) -> Result<DataKey, BackendError> {
        self.call(|| self.inner.unwrap_data_key(wrapped, ctx)).await
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
        self.call(|| self.inner.describe_key(key_id)).await
    }

    async fn resolve_key(&self, key_id: &str) -> Result<(), BackendError> {
        self.call(|| self.inner.resolve_key(key_id)).await
    }

    fn resolved(&self, key_id: &str) -> bool {
        self.inner.resolved(key_id)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.changes()
    }

    fn health(&self) -> Health {
        Resilient::health(self)
    }

    fn same_key(&self, configured: &str, wrapped_key_id: &str) -> bool {
        self.inner.same_key(configured, wrapped_key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        calls: AtomicU32,
        fail_first: u32,
    }

    #[async_trait]
    impl RootKeyProvider for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn generate_data_key(
            &self,
            _: &str,
            _: &Context,
        ) -> Result<GeneratedKey, BackendError> {
            Err(BackendError::KeyNotFound("x".into()))
        }
        async fn wrap_data_key(
            &self,
            _: &str,
            _: &DataKey,
            _: &Context,
        ) -> Result<WrappedKey, BackendError> {
            Err(BackendError::KeyNotFound("x".into()))
        }
        async fn unwrap_data_key(
            &self,
            _: &WrappedKey,
            _: &Context,
        ) -> Result<DataKey, BackendError> {
            Err(BackendError::KeyNotFound("x".into()))
        }
        async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first {
                return Err(BackendError::Unavailable("down".into()));
            }
            Ok(KeyDescription {
                key_id: key_id.into(),
                enabled: true,
                current_version: 0,
            })
        }
    }

    fn settings() -> ResilienceSettings {
        ResilienceSettings {
            call_timeout: Duration::from_millis(100),
            retries: 2,
            backoff: Duration::from_millis(1),
            failure_threshold: 2,
            open_for: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn retries_hide_a_blip() {
        let r = Resilient::new(
            Flaky {
                calls: AtomicU32::new(0),
                fail_first: 2,
            },
            settings(),
        );
        assert!(r.describe_key("k").await.is_ok());
        assert_eq!(r.inner.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_fails_fast_and_recovers() {
        let r = Resilient::new(
            Flaky {
                calls: AtomicU32::new(0),
                fail_first: 6,
            },
            settings(),
        );
        assert!(r.describe_key("k").await.is_err()); // 3 calls, failure 1
        assert!(r.describe_key("k").await.is_err()); // 3 calls, failure 2 → open
        assert_eq!(r.health(), Health::Down);
        let before = r.inner.calls.load(Ordering::SeqCst);
        assert!(r.describe_key("k").await.is_err());
        assert_eq!(
            r.inner.calls.load(Ordering::SeqCst),
            before,
            "open circuit: no call"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(r.health(), Health::Recovering);
        assert!(r.describe_key("k").await.is_ok(), "trial call succeeds");
        assert_eq!(r.health(), Health::Up);
    }
}
