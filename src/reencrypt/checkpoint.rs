//! The `--resume` checkpoint: where a run stopped (the last item completed in listing order,
//! with every item before it completed too) and its counts so far. Written atomically (a
//! temporary file in the same directory, synced, renamed over the old one), so an interrupted
//! run leaves either the previous checkpoint or the new one, never half of one.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Summary;

pub const FORMAT: &str = "envelope-proxy.reencrypt-checkpoint.v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: String,
    /// The route and what was walked (`json:/tenants/acme/users`, `s3:bucket/prefix`): a
    /// checkpoint of another walk is refused, not silently applied.
    pub route: String,
    pub target: String,
    /// The last record id / object key completed (every earlier one is done too).
    pub last: Option<String>,
    pub summary: Summary,
}

/// The checkpoint at `path`, if there is one.
pub fn load(path: &Path) -> Result<Option<Checkpoint>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let cp: Checkpoint =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if cp.format != FORMAT {
        return Err(format!(
            "{}: not a reencrypt checkpoint ({:?})",
            path.display(),
            cp.format
        ));
    }
    Ok(Some(cp))
}

/// Replace the checkpoint at `path` atomically.
pub fn save(path: &Path, cp: &Checkpoint) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path).map_err(err)?;
    let json = serde_json::to_vec_pretty(cp).map_err(|e| e.to_string())?;
    tmp.1.write_all(&json).map_err(err)?;
    tmp.1.sync_all().map_err(err)?;
    std::fs::rename(&tmp.0, path).map_err(err)?;
    Ok(())
}

fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    Ok((tmp, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_files() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = dir.path().join("cp.json");
        assert!(load(&p).unwrap().is_none());
        let cp = Checkpoint {
            format: FORMAT.into(),
            route: "users".into(),
            target: "json:/t/users".into(),
            last: Some("7".into()),
            summary: Summary::default(),
        };
        save(&p, &cp).unwrap();
        let back = load(&p).unwrap().unwrap();
        assert_eq!(back.last.as_deref(), Some("7"));
        std::fs::write(
            &p,
            r#"{"format":"x","route":"","target":"","last":null,"summary":{}}"#,
        )
        .unwrap();
        assert!(load(&p).is_err());
    }
}
