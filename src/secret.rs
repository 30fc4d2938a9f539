//! Secrets the proxy reads at start (S3 client credentials, the admin bearer token): one
//! reader, so every secret file gets the same checks. A file must not be accessible by group or
//! others (the error names the `chmod` that fixes it); surrounding whitespace (a trailing
//! newline) is trimmed; the value is zeroized when dropped and never logged.

use zeroize::Zeroizing;

use crate::config::SecretSource;

/// Read a secret from its file or environment variable.
pub fn read_secret(source: &SecretSource) -> Result<Zeroizing<String>, String> {
    match source {
        SecretSource::Env(var) => std::env::var(var)
            .map(Zeroizing::new)
            .map_err(|_| format!("environment variable {var} is not set")),
        SecretSource::File(path) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "{}: is accessible by group or others; run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    ));
                }
            }
            std::fs::read_to_string(path)
                .map(|s| Zeroizing::new(s.trim().to_string()))
                .map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}
