//! Managing a vault's records: rewrap (new root-key versions or backends, without touching
//! data), crypto-shredding of a key context (scheduled, cancellable, then deleted), and export
//! for offline decryption. What `envelope-proxy keys rewrap|shred|vault-export` run; time is a
//! parameter so the window can be tested.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{STATE_ACTIVE, STATE_PENDING_SHRED, Stored, Vault, VaultDoc, VaultError, VaultStore};
use crate::envelope::record::{self, Record, RecordKey};
use crate::envelope::{Context, Header};
use crate::keys::{BackendError, KeyRef, KeyService};

/// Shortest and longest shredding windows (days), as for scheduled key deletion.
pub const MIN_SHRED_DAYS: u32 = 7;
pub const MAX_SHRED_DAYS: u32 = 30;
const DAY: u64 = 86_400;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct RewrapReport {
    pub rewrapped: usize,
    pub current: usize,
    pub conflicts: usize,
    /// Records left alone: another key context's names, or no EDK under the route's keys
    /// (nor under `from`): another route's records in a shared vault, or ones only a key the
    /// route no longer names can open.
    pub skipped: usize,
    pub failed: Vec<String>,
}

/// Which records a rewrap may touch, and with which keys it may open them.
pub struct RewrapScope<'a> {
    /// The route's keys: the records are wrapped again under these.
    pub route_keys: &'a [KeyRef],
    /// Other keys whose EDKs may be opened too (a route moved to another key or backend).
    pub from: &'a [KeyRef],
    /// The names of the route's key context, in order: a record of other names is another
    /// route's.
    pub context_names: &'a [&'a str],
}

/// Each route key's current version (0: the backend has none, or could not say), looked up
/// once per rewrap rather than once per record.
async fn current_versions(keys: &KeyService, route_keys: &[KeyRef]) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(route_keys.len());
    for k in route_keys {
        out.push(keys.describe(k).await.ok().map(|d| d.current_version));
    }
    out
}

/// Whether `header` holds exactly one EDK per key of `route_keys`, each at its current version
/// (`current`, from [`current_versions`]; backends without versions count as current).
fn is_current(
    keys: &KeyService,
    header: &Header,
    route_keys: &[KeyRef],
    current: &[Option<u32>],
) -> bool {
    header.edks.len() == route_keys.len()
        && route_keys.iter().zip(current).all(|(k, v)| {
            header
                .edks
                .iter()
                .find(|e| e.backend == k.backend && keys.same_key(k, &e.key_id))
                .is_some_and(|edk| matches!(v, Some(v) if *v == 0 || *v == edk.key_version))
        })
}

/// Re-wrap the route's records of `vault` under its keys (their current versions): the data
/// key is unwrapped through an EDK under the route's keys or `scope.from` only, checked against
/// the record's commitment, and wrapped again; id, commitment and key context stay. Records of
/// another key context's names, or without an EDK under those keys, are skipped: in a vault
/// that routes share, one route's rewrap never takes another's records. Each replacement is
/// conditional on the record being unchanged since it was read.
pub async fn rewrap(
    keys: &KeyService,
    vault: &Vault,
    scope: &RewrapScope<'_>,
    force: bool,
) -> Result<RewrapReport, VaultError> {
    let route_keys = scope.route_keys;
    let allowed: Vec<KeyRef> = route_keys.iter().chain(scope.from).cloned().collect();
    // Names resolved first (a KMS alias's key ARN), so stored EDKs can be matched against
    // them below: a key that cannot be resolved (an outage) fails the run rather than leave
    // its records "skipped".
    for k in &allowed {
        let backend = keys
            .backend(&k.backend)
            .map_err(|e| VaultError::Unavailable(e.to_string()))?;
        if !backend.resolved(&k.key_id) {
            backend
                .resolve_key(&k.key_id)
                .await
                .map_err(|e| VaultError::Unavailable(format!("{k}: {e}")))?;
        }
    }
    let mut report = RewrapReport::default();
    let current = current_versions(keys, route_keys).await;
    for listed in vault.list().await? {
        let Some(id) = listed.doc.id() else {
            report
                .failed
                .push(format!("{:?}: not a record id", listed.doc.id));
            continue;
        };
        // Read it again for its version (listings may not carry one).
        let Some(stored) = vault.get(&id).await? else {
            continue;
        };
        let rec = match stored.doc.record() {
            Ok(r) => r,
            Err(e) => {
                report.failed.push(format!("{id}: {e}"));
                continue;
            }
        };
        let names_match = rec
            .key_context
            .iter()
            .map(|(k, _)| k)
            .eq(scope.context_names.iter().copied());
        let under_allowed = rec.header.edks.iter().any(|e| {
            allowed
                .iter()
                .any(|k| k.backend == e.backend && keys.same_key(k, &e.key_id))
        });
        if !names_match || !under_allowed {
            report.skipped += 1;
            continue;
        }
        if !force && is_current(keys, &rec.header, route_keys, &current) {
            report.current += 1;
            continue;
        }
        match rewrap_one(keys, &rec, route_keys, &allowed).await {
            Ok(new) => {
                let mut doc =
                    VaultDoc::new(&new).map_err(|e| VaultError::Malformed(format!("{id}: {e}")))?;
                doc.state = stored.doc.state.clone();
                doc.shred_after = stored.doc.shred_after;
                // Read once more just before writing: a shredding scheduled or cancelled while
                // the key was re-wrapped must not be undone by this write. Stores that honour
                // `If-Match` make the write itself conditional; on others this leaves only
                // the moment between this read and the write.
                match vault.get(&id).await {
                    Ok(Some(now)) if now.doc == stored.doc => {}
                    Ok(_) => {
                        report.conflicts += 1;
                        continue;
                    }
                    Err(e) => {
                        report.failed.push(format!("{id}: {e}"));
                        continue;
                    }
                }
                match vault.replace(&stored, &doc).await {
                    Ok(()) => report.rewrapped += 1,
                    Err(VaultError::Conflict(_)) => report.conflicts += 1,
                    Err(e) => report.failed.push(format!("{id}: {e}")),
                }
            }
            Err(e) => report.failed.push(format!("{id}: {e}")),
        }
    }
    Ok(report)
}

async fn rewrap_one(
    keys: &KeyService,
    rec: &Record,
    route_keys: &[KeyRef],
    allowed: &[KeyRef],
) -> Result<Record, BackendError> {
    let bound = record::backend_context(&rec.key_context, &rec.id);
    let data_key = keys.opening_key_for(&rec.header, &bound, allowed).await?;
    if RecordKey::open(data_key.expose(), rec).is_none() {
        return Err(BackendError::RecordInvalid(format!(
            "record {}: the data key does not match its commitment",
            rec.id
        )));
    }
    let header = keys.wrap_all(route_keys, &data_key, &bound).await?;
    Ok(Record {
        header,
        ..rec.clone()
    })
}

/// The records of key context `ctx` (exactly that context).
async fn of_context(vault: &Vault, ctx: &Context) -> Result<Vec<Stored>, VaultError> {
    let mut out = Vec::new();
    for listed in vault.list().await? {
        let Some(id) = listed.doc.id() else { continue };
        let Some(stored) = vault.get(&id).await? else {
            continue;
        };
        if stored.doc.record().is_ok_and(|r| r.key_context == *ctx) {
            out.push(stored);
        }
    }
    Ok(out)
}

/// Why a shredding step was not done: the request (a window out of range, no such records)
/// or the vault.
#[derive(Debug, thiserror::Error)]
pub enum ShredError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// What a shredding step did, record by record.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShredReport {
    pub records: Vec<String>,
    /// When the scheduled records may be deleted (Unix seconds).
    pub shred_after: Option<u64>,
}

/// Schedule every record of key context `ctx` for shredding after `days` days: meanwhile no
/// proxy opens values under them (409 `key_record_pending_shred`, counted), and
/// [`cancel_shred`] puts them back.
pub async fn schedule_shred(
    vault: &Vault,
    ctx: &Context,
    days: u32,
    now: u64,
) -> Result<ShredReport, ShredError> {
    if !(MIN_SHRED_DAYS..=MAX_SHRED_DAYS).contains(&days) {
        return Err(ShredError::Invalid(format!(
            "days = {days}: the waiting period is {MIN_SHRED_DAYS} to {MAX_SHRED_DAYS} days"
        )));
    }
    let after = now + u64::from(days) * DAY;
    let mut report = ShredReport {
        records: Vec::new(),
        shred_after: Some(after),
    };
    for stored in of_context(vault, ctx).await? {
        let mut doc = stored.doc.clone();
        if doc.state == STATE_PENDING_SHRED {
            report.records.push(doc.id.clone());
            continue;
        }
        doc.state = STATE_PENDING_SHRED.into();
        doc.shred_after = Some(after);
        vault.replace(&stored, &doc).await?;
        report.records.push(doc.id);
    }
    if report.records.is_empty() {
        return Err(ShredError::Invalid(
            "no record has that key context (nothing to shred)".into(),
        ));
    }
    Ok(report)
}

/// Put the records of `ctx` scheduled for shredding back in use.
pub async fn cancel_shred(vault: &Vault, ctx: &Context) -> Result<ShredReport, ShredError> {
    let mut report = ShredReport::default();
    for stored in of_context(vault, ctx).await? {
        if stored.doc.state != STATE_PENDING_SHRED {
            continue;
        }
        let mut doc = stored.doc.clone();
        doc.state = STATE_ACTIVE.into();
        doc.shred_after = None;
        vault.replace(&stored, &doc).await?;
        report.records.push(doc.id);
    }
    Ok(report)
}

/// Carry out every shredding whose window has passed at `now`: delete each due record and
/// every other record of the same key context (records created during the window by replicas
/// whose caches held no key of that context), so that nothing written under that key context
/// stays readable. Each record is read again just before it goes, so a cancel made meanwhile
/// keeps it. Returns the ids deleted.
pub async fn apply_due_shreds(vault: &Vault, now: u64) -> Result<Vec<String>, String> {
    let due =
        |d: &VaultDoc| d.state == STATE_PENDING_SHRED && d.shred_after.is_some_and(|t| t <= now);
    let listed = vault.list().await.map_err(|e| e.to_string())?;
    // The key contexts being shredded now.
    let mut contexts: Vec<Context> = Vec::new();
    for s in &listed {
        if due(&s.doc)
            && let Ok(r) = s.doc.record()
            && !contexts.contains(&r.key_context)
        {
            contexts.push(r.key_context);
        }
    }
    let mut deleted = Vec::new();
    for ctx in contexts {
        let of_ctx: Vec<&Stored> = listed
            .iter()
            .filter(|s| s.doc.record().is_ok_and(|r| r.key_context == ctx))
            .collect();
        // Read again: a cancel since the listing keeps the whole key context. Every record
        // that was due must still be: one put back (a cancel that is under way, or one that
        // stopped halfway) keeps them all.
        let (was_due, others): (Vec<&Stored>, Vec<&Stored>) =
            of_ctx.into_iter().partition(|s| due(&s.doc));
        let expected = was_due.len();
        let mut still_due = Vec::with_capacity(expected);
        for s in was_due {
            let now = match s.doc.id() {
                Some(id) => vault.get(&id).await.map_err(|e| e.to_string())?,
                None => None,
            };
            match now {
                Some(now) if due(&now.doc) => still_due.push(now),
                _ => break,
            }
        }
        if still_due.len() < expected {
            continue;
        }
        // The others first, the due records last: if a deletion finds its record changed
        // (a conditional delete refused), the due records stay and the next run takes the
        // whole key context again.
        for s in others.into_iter().chain(still_due.iter()) {
            match vault.delete(s).await {
                Ok(()) => deleted.push(s.doc.id.clone()),
                Err(VaultError::Conflict(_)) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(deleted)
}

/// A vault's records as one JSON document, for `decrypt --vault-export` (offline, no store).
#[derive(Debug, Serialize, Deserialize)]
pub struct Export {
    pub format: String,
    pub vault: String,
    pub records: Vec<VaultDoc>,
}

pub const EXPORT_FORMAT: &str = "envelope-proxy/vault-export/v1";

pub async fn export(vault: &Vault) -> Result<Export, VaultError> {
    Ok(Export {
        format: EXPORT_FORMAT.into(),
        vault: vault.label().into(),
        records: vault.list().await?.into_iter().map(|s| s.doc).collect(),
    })
}

/// A read-only vault serving an export under the label of the vault it came from.
pub struct ExportVault {
    label: String,
    records: Vec<VaultDoc>,
}

impl ExportVault {
    pub fn new(label: String, export: Export) -> Result<Arc<ExportVault>, String> {
        if export.format != EXPORT_FORMAT {
            return Err(format!(
                "not a vault export ({:?}, expected {EXPORT_FORMAT:?})",
                export.format
            ));
        }
        Ok(Arc::new(ExportVault {
            label,
            records: export.records,
        }))
    }
}

#[async_trait::async_trait]
impl VaultStore for ExportVault {
    fn label(&self) -> &str {
        &self.label
    }
    async fn get(
        &self,
        id: &crate::envelope::record::RecordId,
    ) -> Result<Option<Stored>, VaultError> {
        Ok(self
            .records
            .iter()
            .find(|d| d.id() == Some(*id))
            .map(|d| Stored {
                doc: d.clone(),
                version: None,
            }))
    }
    async fn create(&self, _: &VaultDoc) -> Result<(), VaultError> {
        Err(VaultError::Unavailable(
            "a vault export is read-only".into(),
        ))
    }
    async fn replace(&self, _: &Stored, _: &VaultDoc) -> Result<(), VaultError> {
        Err(VaultError::Unavailable(
            "a vault export is read-only".into(),
        ))
    }
    async fn list(&self) -> Result<Vec<Stored>, VaultError> {
        Ok(self
            .records
            .iter()
            .map(|d| Stored {
                doc: d.clone(),
                version: None,
            })
            .collect())
    }
    async fn delete(&self, _: &Stored) -> Result<(), VaultError> {
        Err(VaultError::Unavailable(
            "a vault export is read-only".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::envelope::record::RecordId;

    /// A vault whose listing is a snapshot taken earlier: what `apply_due_shreds` sees when a
    /// cancel runs between its listing and its second read.
    struct Racing {
        listed: Vec<VaultDoc>,
        now: Mutex<Vec<VaultDoc>>,
        deleted: Mutex<Vec<String>>,
        /// A record changed since it was read: its conditional delete is refused.
        changed: Option<String>,
    }

    #[async_trait::async_trait]
    impl VaultStore for Racing {
        fn label(&self) -> &str {
            "racing"
        }
        async fn get(&self, id: &RecordId) -> Result<Option<Stored>, VaultError> {
            let now = self.now.lock().unwrap();
            Ok(now.iter().find(|d| d.id() == Some(*id)).map(|d| Stored {
                doc: d.clone(),
                version: None,
            }))
        }
        async fn create(&self, _: &VaultDoc) -> Result<(), VaultError> {
            unreachable!("not used")
        }
        async fn replace(&self, _: &Stored, _: &VaultDoc) -> Result<(), VaultError> {
            unreachable!("not used")
        }
        async fn list(&self) -> Result<Vec<Stored>, VaultError> {
            Ok(self
                .listed
                .iter()
                .map(|d| Stored {
                    doc: d.clone(),
                    version: None,
                })
                .collect())
        }
        async fn delete(&self, current: &Stored) -> Result<(), VaultError> {
            if self.changed.as_ref() == Some(&current.doc.id) {
                return Err(VaultError::Conflict(current.doc.id.clone()));
            }
            self.deleted.lock().unwrap().push(current.doc.id.clone());
            Ok(())
        }
    }

    fn doc(tenant: &str, state: &str, after: Option<u64>) -> VaultDoc {
        let mut d = VaultDoc::new(&record::sample_record(tenant)).unwrap();
        d.state = state.into();
        d.shred_after = after;
        d
    }

    #[tokio::test]
    async fn a_cancel_between_the_listing_and_the_deletion_keeps_the_whole_key_context() {
        let due = |t| doc(t, STATE_PENDING_SHRED, Some(100));
        let (a1, a2, other) = (due("acme"), due("acme"), due("globex"));
        // Listed as due; by the time they are read again, one of acme's is back in use.
        let mut a2_cancelled = a2.clone();
        a2_cancelled.state = STATE_ACTIVE.into();
        a2_cancelled.shred_after = None;
        let racing = Arc::new(Racing {
            listed: vec![a1.clone(), a2.clone(), other.clone()],
            now: Mutex::new(vec![a1.clone(), a2_cancelled, other.clone()]),
            deleted: Mutex::new(Vec::new()),
            changed: None,
        });
        let vault: Vault = racing.clone();
        let deleted = apply_due_shreds(&vault, 200).await.unwrap();
        // acme's records stay (one was cancelled: a cancel under way keeps them all);
        // globex's, still due, goes.
        assert_eq!(deleted, vec![other.id.clone()]);
        assert_eq!(*racing.deleted.lock().unwrap(), vec![other.id]);
        // Nothing is due before the window ends.
        assert!(apply_due_shreds(&vault, 99).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_due_records_go_last_so_a_refused_delete_leaves_the_context_to_the_next_run() {
        // acme: one record due, one written during the window (active) that changed since the
        // listing. Its delete is refused: the due record must stay, or nothing would take the
        // rest of acme's records on the next run.
        let due = doc("acme", STATE_PENDING_SHRED, Some(100));
        let during = doc("acme", STATE_ACTIVE, None);
        let racing = Arc::new(Racing {
            listed: vec![due.clone(), during.clone()],
            now: Mutex::new(vec![due.clone(), during.clone()]),
            deleted: Mutex::new(Vec::new()),
            changed: Some(during.id.clone()),
        });
        let vault: Vault = racing.clone();
        assert!(apply_due_shreds(&vault, 200).await.unwrap().is_empty());
        assert!(racing.deleted.lock().unwrap().is_empty());
    }
}
