//! A directory vault: one `ID.json` per record. Creation is atomic and never overwrites (a
//! temporary file hard-linked into place); replacement and deletion run under an exclusive lock
//! on `.lock` and compare the content first, so two rewraps cannot lose one another's work.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Stored, VaultDoc, VaultError, VaultStore};
use crate::envelope::record::RecordId;

pub struct DirVault {
    dir: PathBuf,
    label: String,
}

impl DirVault {
    pub fn new(dir: &Path, label: String) -> DirVault {
        DirVault {
            dir: dir.to_path_buf(),
            label,
        }
    }

    fn path(&self, id: &RecordId) -> PathBuf {
        self.dir.join(format!("{}.json", id.hex()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(PathBuf) -> Result<T, VaultError> + Send + 'static,
    ) -> Result<T, VaultError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(dir))
            .await
            .map_err(|_| VaultError::Unavailable("vault task failed".into()))?
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> VaultError {
    VaultError::Unavailable(format!("{what} {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Option<Stored>, VaultError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path, e)),
    };
    let doc: VaultDoc = serde_json::from_slice(&bytes)
        .map_err(|_| VaultError::Malformed(format!("{}: not a vault document", path.display())))?;
    Ok(Some(Stored {
        doc,
        version: Some(hex::encode(Sha256::digest(&bytes))),
    }))
}

fn ensure_dir(dir: &Path) -> Result<(), VaultError> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io("create", dir, e)),
    }
}

/// Write `doc` to a new temporary file in `dir` (0600, synced); returns its path.
fn write_temp(dir: &Path, doc: &VaultDoc) -> Result<PathBuf, VaultError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = [0u8; 8];
    crate::envelope::fill_random(&mut name);
    let tmp = dir.join(format!(".tmp-{}-{}", doc.id, hex::encode(name)));
    let bytes = serde_json::to_vec(doc).map_err(|e| VaultError::Malformed(e.to_string()))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io("write", &tmp, e))?;
    Ok(tmp)
}

fn sync_dir(dir: &Path) -> Result<(), VaultError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))
}

fn lock(dir: &Path) -> Result<File, VaultError> {
    let path = dir.join(".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("open", &path, e))?;
    f.lock().map_err(|e| io("lock", &path, e))?;
    Ok(f)
}

#[async_trait]
impl VaultStore for DirVault {
    fn label(&self) -> &str {
        &self.label
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Stored>, VaultError> {
        let path = self.path(id);
        self.blocking(move |_| read(&path)).await
    }

    async fn create(&self, doc: &VaultDoc) -> Result<(), VaultError> {
        let doc = doc.clone();
        let id = doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let path = self.path(&id);
        self.blocking(move |dir| {
            ensure_dir(&dir)?;
            let tmp = write_temp(&dir, &doc)?;
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            linked.map_err(|e| io("create", &path, e))?;
            sync_dir(&dir)
        })
        .await
    }

    async fn replace(&self, current: &Stored, doc: &VaultDoc) -> Result<(), VaultError> {
        let doc = doc.clone();
        let expected = current.version.clone();
        let id = doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let path = self.path(&id);
        self.blocking(move |dir| {
            let _lock = lock(&dir)?;
            let now = read(&path)?;
            if now.and_then(|s| s.version) != expected {
                return Err(VaultError::Conflict(doc.id.clone()));
            }
            let tmp = write_temp(&dir, &doc)?;
            fs::rename(&tmp, &path).map_err(|e| io("rename", &path, e))?;
            sync_dir(&dir)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Stored>, VaultError> {
        self.blocking(|dir| {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io("list", &dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io("list", &dir, e))?;
                let name = entry.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                if RecordId::parse_hex(stem).is_none() {
                    continue;
                }
                if let Some(s) = read(&entry.path())? {
                    out.push(s);
                }
            }
            out.sort_by(|a, b| a.doc.id.cmp(&b.doc.id));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, current: &Stored) -> Result<(), VaultError> {
        let id = current
            .doc
            .id()
            .ok_or_else(|| VaultError::Malformed("record id".into()))?;
        let expected = current.version.clone();
        let name = current.doc.id.clone();
        let path = self.path(&id);
        self.blocking(move |dir| {
            let _lock = lock(&dir)?;
            match read(&path)? {
                None => return Ok(()),
                Some(now) if now.version != expected => return Err(VaultError::Conflict(name)),
                Some(_) => {}
            }
            match fs::remove_file(&path) {
                Ok(()) => sync_dir(&dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io("delete", &path, e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_changed_since_it_was_read_is_not_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = DirVault::new(&tmp.path().join("v"), "dir:test".into());
        let rec = crate::envelope::record::sample_record("acme");
        vault.create(&VaultDoc::new(&rec).unwrap()).await.unwrap();
        let read_before = vault.get(&rec.id).await.unwrap().unwrap();
        // Changed meanwhile (a shredding cancelled, a rewrap): the earlier reading is stale.
        let mut changed = read_before.doc.clone();
        changed.state = "pending_shred".into();
        vault.replace(&read_before, &changed).await.unwrap();
        assert!(matches!(
            vault.delete(&read_before).await,
            Err(VaultError::Conflict(_))
        ));
        let current = vault.get(&rec.id).await.unwrap().expect("still there");
        vault.delete(&current).await.unwrap();
        assert!(vault.get(&rec.id).await.unwrap().is_none());
        // Absent is fine.
        vault.delete(&current).await.unwrap();
    }
}
