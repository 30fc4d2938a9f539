//! Readiness off the request path: the routes' root keys are probed in the background every
//! `[server] readiness_interval_ms`; `/readyz` reads the last result and never calls a
//! backend itself (a probe storm cannot become a KMS storm, and a KMS blip does not take every
//! replica out of its Service at once).
//!
//! The proxy is ready unless it cannot serve: while shutting down, or when no route's key is
//! usable (a key is usable once a probe succeeded and until `readiness_failures` probes in a
//! row failed) and no data key is cached either. A backend that is down while cached keys
//! still serve is reported in the detail (`problems`, `backends`), not as not-ready.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::keys::KeyRef;
use crate::pipeline::AppState;

/// The last probe's findings.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Whether a probe has run yet.
    pub probed: bool,
    /// The routes' distinct keys, and how many of them are usable.
    pub keys: usize,
    pub usable: usize,
    /// What is wrong, one line each (key names and backend errors, never secrets).
    pub problems: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Readiness {
    last: RwLock<Arc<Snapshot>>,
    /// Probe rounds run so far (reported to an authorized caller of `/readyz`).
    rounds: AtomicU64,
    /// Per key: (probes failed in a row, ever succeeded).
    record: tokio::sync::Mutex<HashMap<String, (u32, bool)>>,
}

impl Readiness {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.last.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Whether the proxy can serve: a usable key, or cached data keys, or no keys needed.
    pub fn ready(&self, state: &AppState) -> bool {
        let s = self.snapshot();
        s.keys == 0 || (s.probed && s.usable > 0) || state.keys.cache().holds_keys()
    }

    /// Probe again every `[server] readiness_interval_ms` until `stop`, with the state
    /// current at each round (the first probe runs at start, before the listeners:
    /// [`Readiness::probe`]).
    pub async fn run(
        self: Arc<Self>,
        live: std::sync::Weak<super::reload::Live>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let Some(interval) = live
                .upgrade()
                .map(|l| l.load().config.server.readiness_interval)
            else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            let Some(st) = live.upgrade().map(|l| l.load()) else {
                return;
            };
            self.probe(&st).await;
        }
    }

    /// One probe round: every route key described once.
    pub async fn probe(&self, state: &AppState) {
        let mut record = self.record.lock().await;
        let threshold = state.config.server.readiness_failures;
        let mut keys: Vec<&KeyRef> = state
            .config
            .routes
            .iter()
            .flat_map(|r| r.kind.keys())
            .collect();
        keys.sort_by_key(|k| k.to_string());
        keys.dedup_by_key(|k| k.to_string());
        let mut snapshot = Snapshot {
            probed: true,
            keys: keys.len(),
            ..Snapshot::default()
        };
        for k in keys {
            let name = k.to_string();
            let entry = record.entry(name.clone()).or_insert((0, false));
            match state.keys.describe(k).await {
                Ok(_) => *entry = (0, true),
                Err(e) => {
                    entry.0 = entry.0.saturating_add(1);
                    snapshot.problems.push(format!("{name}: {e}"));
                }
            }
            if entry.1 && entry.0 < threshold {
                snapshot.usable += 1;
            }
        }
        self.rounds.fetch_add(1, Ordering::Relaxed);
        match self.last.write() {
            Ok(mut last) => *last = Arc::new(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(snapshot),
        }
    }
}
