//! A tamper-evident audit log: one JSON line per request that used a key or was refused.
//!
//! Each line carries `prev`, the SHA-256 of the previous line's bytes, so editing or deleting a
//! line breaks the chain at that point (`envelope-proxy audit-verify FILE` checks it). Cutting
//! lines off the *end* is only visible against an external copy of the last hash (ship the log
//! off the host). Lines never carry plaintext, keys, tokens or query strings.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// `seal` (values encrypted on the way to storage), `open` (decrypted on the way back),
    /// `reject` (refused before anything was forwarded), `pass` (no key used).
    pub action: &'static str,
    /// `ok`, `redacted` (some values did not open and were nulled), or `error`.
    pub outcome: &'static str,
    pub route: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub client: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    pub values: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts_ms: u128,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<AuditEvent>>,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl AuditLog {
    /// Audit events go to the tracing log (target `audit`) only.
    pub fn to_tracing() -> Self {
        AuditLog { tx: None }
    }

    /// Append hash-chained lines to `path` (created 0600), continuing an existing chain.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(path)?;
        let mut prev = last_line_hash(path)?;
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(65_536);
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    for event in &batch {
                        let line = Line {
                            ts_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
                            event,
                            prev: &prev,
                        };
                        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                        prev = hex::encode(Sha256::digest(&bytes));
                        bytes.push(b'\n');
                        if let Err(e) = out.write_all(&bytes) {
                            tracing::error!(path = %path.display(), error = %e, "audit log write failed");
                        }
                    }
                    if let Err(e) = out.flush() {
                        tracing::error!(path = %path.display(), error = %e, "audit log flush failed");
                    }
                }
            })?;
        Ok(AuditLog { tx: Some(tx) })
    }

    pub async fn record(&self, event: AuditEvent) {
        // With a file, the file is the audit log: the tracing line is for debugging only.
        if self.tx.is_some() {
            tracing::debug!(target: "audit", action = event.action, outcome = event.outcome, route = %event.route,
                status = event.status, values = event.values, reason = event.reason.as_deref().unwrap_or(""));
        } else {
            tracing::info!(target: "audit", action = event.action, outcome = event.outcome, route = %event.route,
                status = event.status, values = event.values, reason = event.reason.as_deref().unwrap_or(""));
        }
        if let Some(tx) = &self.tx
            && tx.send(event).await.is_err()
        {
            tracing::error!("audit writer stopped; event lost");
        }
    }
}

fn last_line_hash(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut last: Option<Vec<u8>> = None;
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line?;
        if !line.is_empty() {
            last = Some(line);
        }
    }
    Ok(last
        .map(|l| hex::encode(Sha256::digest(&l)))
        .unwrap_or_else(|| GENESIS.to_string()))
}

/// Check a log's hash chain. Returns the number of lines, or the 1-based line where it breaks.
pub fn verify(path: &Path) -> Result<usize, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut prev = GENESIS.to_string();
    let mut n = 0;
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            continue;
        }
        n += 1;
        let v: serde_json::Value =
            serde_json::from_slice(&line).map_err(|_| format!("line {n}: not JSON"))?;
        if v.get("prev").and_then(|p| p.as_str()) != Some(prev.as_str()) {
            return Err(format!(
                "line {n}: chain broken (a line before it was changed or removed)"
            ));
        }
        prev = hex::encode(Sha256::digest(&line));
    }
    Ok(n)
}
