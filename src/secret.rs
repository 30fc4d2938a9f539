//! Secrets the proxy reads at start (S3 client credentials, the admin bearer token): one
//! reader, so every secret file gets the same checks. A file must not be accessible by group or
//! others (the error names the `chmod` that fixes it); surrounding whitespace (a trailing
//! newline) is trimmed; the value is zeroized when dropped and never logged.
//!
//! [`check_private`] is the one place a secret file's mode is judged (master key, PINs, tokens,
//! credentials).

use zeroize::Zeroizing;

use crate::config::SecretSource;

/// Read a secret from its file or environment variable.
pub fn read_secret(source: &SecretSource) -> Result<Zeroizing<String>, String> {
    match source {
        SecretSource::Env(var) => std::env::var(var)
            .map(Zeroizing::new)
            .map_err(|_| format!("environment variable {var} is not set")),
        SecretSource::File(path) => {
            check_private(path).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::read_to_string(path)
                .map(|s| Zeroizing::new(s.trim().to_string()))
                .map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Refuse a secret file that others, or a group not ours, can read; the error names the fix.
///
/// Accepted: no access for group or others (`chmod 0400`/`0600`; a Kubernetes Secret volume
/// with `defaultMode: 0400`), or a root-owned file readable by its group when that group is one
/// of this process's (a Secret volume with `defaultMode: 0440` and the pod's `fsGroup`: the
/// kubelet makes such files root-owned, group the fsGroup). Group write or any access for
/// others is refused. The path is followed (Secret volumes link `..data/NAME`).
pub fn check_private(path: &std::path::Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        let mode = meta.mode() & 0o777;
        let private = mode & 0o077 == 0;
        let group_read_by_root =
            mode & 0o037 == 0 && meta.uid() == 0 && our_groups().contains(&meta.gid());
        if !(private || group_read_by_root) {
            return Err(format!(
                "is accessible by group or others (mode {mode:04o}); run `chmod 0400 {}` \
                 (a Kubernetes Secret volume: `defaultMode: 0400`, or `0440` with the pod's \
                 `fsGroup`)",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// This process's group ids (effective and supplementary), from /proc/self/status.
#[cfg(unix)]
fn our_groups() -> Vec<u32> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = Vec::new();
    for line in status.lines() {
        if let Some(ids) = line
            .strip_prefix("Gid:")
            .or_else(|| line.strip_prefix("Groups:"))
        {
            out.extend(ids.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        }
    }
    out
}
