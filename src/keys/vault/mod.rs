//! Key vaults: where a route's data-key records live (token format v2, `docs/FORMAT.md` §12).
//!
//! A vault is a store that already holds the data, so one backup takes both: a REST resource on
//! the route's upstream ([`rest`]), or a local directory for single-node setups and tests
//! ([`dir`]). Records are created once by the replica that generated the data key (ids are
//! random, so replicas never coordinate), read on a cold cache, replaced only by `keys rewrap`
//! (conditionally where the store can) and deleted only by `keys shred` after its window.
//!
//! A vault document is JSON:
//!
//! ```json
//! {"id": "<32 hex>", "record": "<base64url record>", "state": "active"}
//! ```
//!
//! `state` is `"active"` or `"pending_shred"` (then `shred_after`, Unix seconds, says when the
//! record may be deleted). Management state is not authenticated: whoever can write the vault
//! can already delete records; what it cannot do is make a record open to another key.

pub mod dir;
pub mod manage;
pub mod rest;

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::envelope::record::{Record, RecordError, RecordId};

/// A record as the vault stores it, with its management state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultDoc {
    pub id: String,
    pub record: String,
    #[serde(default = "active")]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shred_after: Option<u64>,
}

fn active() -> String {
    STATE_ACTIVE.to_string()
}

pub const STATE_ACTIVE: &str = "active";
pub const STATE_PENDING_SHRED: &str = "pending_shred";

impl VaultDoc {
    pub fn new(record: &Record) -> Result<VaultDoc, RecordError> {
        Ok(VaultDoc {
            id: record.id.hex(),
            record: URL_SAFE_NO_PAD.encode(record.encode()?),
            state: active(),
            shred_after: None,
        })
    }

    /// The record, checked to be the one the document's id names.
    pub fn record(&self) -> Result<Record, VaultError> {
        let raw = URL_SAFE_NO_PAD
            .decode(&self.record)
            .map_err(|_| VaultError::Malformed(format!("record {}: not base64url", self.id)))?;
        let record = Record::decode(&raw)
            .map_err(|e| VaultError::Malformed(format!("record {}: {e}", self.id)))?;
        if RecordId::parse_hex(&self.id) != Some(record.id) {
            return Err(VaultError::Malformed(format!(
                "record {}: the document's id is not the record's",
                self.id
            )));
        }
        Ok(record)
    }

    pub fn id(&self) -> Option<RecordId> {
        RecordId::parse_hex(&self.id)
    }
}

/// A document read from the vault, with what the store says its version is (an ETag, a
/// content hash) for conditional replacement.
#[derive(Debug, Clone)]
pub struct Stored {
    pub doc: VaultDoc,
    pub version: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum VaultError {
    /// The store could not be reached or failed; a retry may help.
    #[error("key vault unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something that is not a vault document.
    #[error("key vault: {0}")]
    Malformed(String),
    /// A conditional replacement lost a race (someone else changed the record first).
    #[error("key vault: record {0} changed meanwhile")]
    Conflict(String),
}

/// One kind of store. Implementations must be panic-proof on whatever the store returns.
#[async_trait]
pub trait VaultStore: Send + Sync + 'static {
    /// Where records go (`rest:http://host/envelope-keys/{id}`, `dir:/path`): partitions the
    /// caches and names the vault in errors.
    fn label(&self) -> &str;

    async fn get(&self, id: &RecordId) -> Result<Option<Stored>, VaultError>;

    /// Store a new record (ids are random: nothing else writes this id).
    async fn create(&self, doc: &VaultDoc) -> Result<(), VaultError>;

    /// Replace `current` by `doc`, only if it is unchanged where the store can tell
    /// ([`VaultError::Conflict`] otherwise).
    async fn replace(&self, current: &Stored, doc: &VaultDoc) -> Result<(), VaultError>;

    /// Every record.
    async fn list(&self) -> Result<Vec<Stored>, VaultError>;

    /// Delete the record `current` is a reading of, only if it is unchanged where the store
    /// can tell ([`VaultError::Conflict`] otherwise); absent is fine.
    async fn delete(&self, current: &Stored) -> Result<(), VaultError>;
}

pub type Vault = Arc<dyn VaultStore>;

/// The vault a route's config names.
pub fn open(
    config: &crate::config::KeyVault,
    upstream: &crate::config::Upstream,
    settings: &crate::config::ServerSettings,
) -> Result<Vault, String> {
    Ok(match config {
        crate::config::KeyVault::Rest { path, create } => Arc::new(rest::RestVault::new(
            upstream,
            path,
            *create,
            settings,
            config.label(upstream),
        )?),
        crate::config::KeyVault::Dir { dir } => {
            Arc::new(dir::DirVault::new(dir, config.label(upstream)))
        }
    })
}

/// Open the vault of every JSON route that names one and register it with `keys`.
pub fn register_all(
    keys: &super::KeyService,
    config: &crate::config::Config,
) -> Result<(), String> {
    for route in &config.routes {
        if let crate::config::RouteKind::JsonFields(jr) = &route.kind
            && let Some(kv) = &jr.key_vault
        {
            let vault = open(kv, &route.upstream, &config.server)
                .map_err(|e| format!("route {}: key_vault: {e}", route.name))?;
            keys.register_vault(vault);
        }
    }
    Ok(())
}
