//! A tamper-evident audit log: one JSON line per request that used a key or was refused.
//!
//! Lines never carry plaintext, keys, tokens or query strings.
//!
//! ## What the log proves (keyed chain, `envelope-proxy.audit.v2`)
//!
//! Each line carries `seq` (1, 2, 3, ...), `prev` (the previous line's `mac`) and its own
//! `mac`, an HMAC-SHA-256 under the **audit key**, a key that is not stored with the log
//! (derived from the keyring master key, or read from `[audit] key_file`):
//!
//! ```text
//! body = the line's JSON without its "mac" member      ({"ts_ms":…,…,"seq":N,"prev":"…"})
//! mac  = HMAC-SHA-256(audit key, "envelope-proxy.audit.v2 line\n" ‖ body)
//! line = body with ,"mac":"<64 hex>" before its closing brace
//! ```
//!
//! Without the audit key nobody can change, insert, reorder or delete a line in the middle and
//! recompute a chain that verifies (`envelope-proxy audit-verify FILE`). What a chain alone
//! cannot show is lines cut off the **end** (or the whole file replaced by an older copy):
//! that is what checkpoints are for. Every `checkpoint_every` lines, and when the log closes,
//! the writer emits a checkpoint, MACed the same way under its own label:
//!
//! ```text
//! {"checkpoint":"envelope-proxy.audit.v2","seq":N,"head":"<mac of line N>","ts_ms":…,"mac":"…"}
//! ```
//!
//! It is appended to `FILE.checkpoints` and written to the process log (tracing target
//! `audit_checkpoint`), so a log shipper takes it off the host. `audit-verify FILE
//! --checkpoints COPY` then proves the log still holds every line up to the newest checkpoint
//! in COPY. Lines written after the last shipped checkpoint can still be cut undetected.
//!
//! Logs written before keyed chains (lines with `prev` = SHA-256 of the previous line, no
//! `mac`) are still read: `audit-verify` checks their hash chain and reports them as unkeyed
//! (anyone can recompute such a chain). A keyed chain continuing an unkeyed log starts with
//! `prev` = SHA-256 of the last unkeyed line.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    /// `seal` (values encrypted on the way to storage), `open` (decrypted on the way back),
    /// `reject` (refused before anything was forwarded), `pass` (no key used); admin API calls
    /// (route `admin`): `admin:` and the operation (`admin:create-grant`, `admin:rotate`, ...).
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
    /// The root-key versions the request sealed or opened under, `BACKEND:KEY:VERSION` (JSON
    /// routes; absent when none, and in lines written before it existed): what `keys usage`
    /// counts per version.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_versions: Vec<String>,
    pub values: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The authenticated principal (`anonymous` on `auth = "none"` routes); absent when
    /// authentication failed or was never tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// What allowed each key use: `statement:SID`, `grant:ID` or `no-policy`; on a policy
    /// refusal, the deny statement (`deny:SID`) or `no-allow`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub basis: Vec<String>,
    /// The grant an admin call created, retired or revoked (its id; never its token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts_ms: u128,
    #[serde(flatten)]
    event: &'a AuditEvent,
    seq: u64,
    prev: &'a str,
}

#[derive(Serialize)]
struct Checkpoint<'a> {
    checkpoint: &'static str,
    seq: u64,
    head: &'a str,
    ts_ms: u128,
}

const VERSION: &str = "envelope-proxy.audit.v2";
const LINE_LABEL: &[u8] = b"envelope-proxy.audit.v2 line\n";
const CHECKPOINT_LABEL: &[u8] = b"envelope-proxy.audit.v2 checkpoint\n";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `,"mac":"` + 64 hex + `"}`.
const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;

/// The key the chain is MACed under. Zeroized on drop; `Debug` never prints it.
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([SENSITIVE])")
    }
}

impl AuditKey {
    /// The audit key derived from a secret (the keyring master key, or an audit key file's
    /// content): `HMAC-SHA-256(secret, "envelope-proxy.audit.v2 key")`. The secret itself is
    /// never used as the key, so the audit key opens nothing else.
    /// The label the audit key is derived under (from a secret or the keyring master key).
    pub const LABEL: &'static [u8] = b"envelope-proxy.audit.v2 key";

    pub fn derive(secret: &[u8]) -> AuditKey {
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .expect("HMAC takes a key of any length");
        m.update(Self::LABEL);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&m.finalize().into_bytes());
        AuditKey(key)
    }

    fn mac(&self, label: &[u8], body: &[u8]) -> hmac::Hmac<Sha256> {
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_ref())
            .expect("HMAC takes a key of any length");
        m.update(label);
        m.update(body);
        m
    }

    /// `body` (a JSON object) with its MAC appended as the last member.
    fn seal(&self, label: &[u8], mut body: Vec<u8>) -> (Vec<u8>, String) {
        let mac = hex::encode(self.mac(label, &body).finalize().into_bytes());
        body.pop(); // the closing brace
        body.extend_from_slice(format!(",\"mac\":\"{mac}\"}}").as_bytes());
        (body, mac)
    }

    /// The body of a sealed line and its MAC if the MAC verifies (constant time).
    fn open(&self, label: &[u8], line: &[u8]) -> Option<(Vec<u8>, String)> {
        let (body, mac) = split_mac(line)?;
        let given = hex::decode(mac).ok()?;
        self.mac(label, &body).verify_slice(&given).ok()?;
        Some((body, mac.to_string()))
    }
}

/// A line ending in `,"mac":"<64 hex>"}`: the body (with its closing brace back) and the MAC.
fn split_mac(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    if line.len() < MAC_SUFFIX_LEN + 2 {
        return None;
    }
    let (head, suffix) = line.split_at(line.len() - MAC_SUFFIX_LEN);
    let mac = suffix.strip_prefix(b",\"mac\":\"")?.strip_suffix(b"\"}")?;
    if !mac.iter().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut body = head.to_vec();
    body.push(b'}');
    Some((body, std::str::from_utf8(mac).ok()?))
}

/// The audit key for `config`: derived from `[audit] key_file` when set (a secret of at least
/// 32 characters, mode 0600), else from the keyring master key.
pub fn key_for(
    config: &crate::config::Config,
    keyring: &crate::keys::keyring::Keyring,
) -> Result<AuditKey, String> {
    key_of(config, Some(keyring))
}

/// [`key_for`] where there may be no keyring (a stateless pod): then `[audit] key_file` is
/// the only source.
pub fn key_of(
    config: &crate::config::Config,
    keyring: Option<&crate::keys::keyring::Keyring>,
) -> Result<AuditKey, String> {
    match &config.audit_key {
        Some(source) => {
            let secret =
                crate::secret::read_secret(source).map_err(|e| format!("audit.key_file: {e}"))?;
            if secret.len() < 32 {
                return Err("audit.key_file: the key must be at least 32 characters \
                     (e.g. `openssl rand -hex 32`)"
                    .into());
            }
            Ok(AuditKey::derive(secret.as_bytes()))
        }
        None => match keyring {
            Some(keyring) => Ok(AuditKey(keyring.derive_key(AuditKey::LABEL))),
            None => Err("audit.key_file: required without [keyring]".into()),
        },
    }
}

#[derive(Clone)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Msg>>,
}

/// What the writer thread is told. Events are nearly every message: boxing them would cost an
/// allocation each to save the size of a rare `Reopen`.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(AuditEvent),
    /// Open the path again (SIGHUP after logrotate renamed the file).
    Reopen,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// `FILE.checkpoints`: where the writer appends its checkpoints.
pub fn checkpoint_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".checkpoints");
    PathBuf::from(p)
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

impl AuditLog {
    /// Audit events go to the tracing log (target `audit`) only.
    pub fn to_tracing() -> Self {
        AuditLog { tx: None }
    }

    /// Append keyed-chain lines to `path` (created 0600), continuing an existing chain, with a
    /// checkpoint every `checkpoint_every` lines and when the log closes. Refuses a log whose
    /// last line does not verify under `key` (another key, or a modified log).
    pub fn to_file(path: &Path, key: AuditKey, checkpoint_every: u64) -> Result<Self, String> {
        let shown = path.display().to_string();
        let file = open_append(path).map_err(|e| format!("{shown}: {e}"))?;
        let (mut seq, mut prev) = chain_tail(path, &key)?;
        let cp_path = checkpoint_path(path);
        let mut cp_file =
            open_append(&cp_path).map_err(|e| format!("{}: {e}", cp_path.display()))?;
        let (tx, mut rx) = mpsc::channel::<Msg>(65_536);
        let every = checkpoint_every.max(1);
        let log_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                let mut since_checkpoint = 0u64;
                let checkpoint = |out: &mut std::io::BufWriter<std::fs::File>,
                                  cp_file: &mut std::fs::File,
                                  seq: u64,
                                  head: &str| {
                    if let Err(e) = out.flush() {
                        tracing::error!(path = %shown, error = %e, "audit log flush failed");
                    }
                    let body = serde_json::to_vec(&Checkpoint {
                        checkpoint: VERSION,
                        seq,
                        head,
                        ts_ms: now_ms(),
                    })
                    .unwrap_or_default();
                    let (mut bytes, _) = key.seal(CHECKPOINT_LABEL, body);
                    // Off the host through whatever ships the process log.
                    tracing::info!(target: "audit_checkpoint", checkpoint = %String::from_utf8_lossy(&bytes));
                    bytes.push(b'\n');
                    if let Err(e) = cp_file.write_all(&bytes).and_then(|_| cp_file.flush()) {
                        tracing::error!(path = %shown, error = %e, "audit checkpoint write failed");
                    }
                };
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    for msg in &batch {
                        let event = match msg {
                            Msg::Event(event) => event,
                            Msg::Reopen => {
                                // logrotate moved the file away: a checkpoint closes the old
                                // file, and the chain goes on in a new one at the path.
                                if since_checkpoint > 0 {
                                    checkpoint(&mut out, &mut cp_file, seq, &prev);
                                    since_checkpoint = 0;
                                }
                                match (open_append(&log_path), open_append(&cp_path)) {
                                    (Ok(f), Ok(c)) => {
                                        out = std::io::BufWriter::new(f);
                                        cp_file = c;
                                        tracing::info!(path = %shown, seq, "audit log reopened");
                                    }
                                    (Err(e), _) | (_, Err(e)) => tracing::error!(
                                        path = %shown, error = %e,
                                        "audit log reopen failed; still writing to the open file"
                                    ),
                                }
                                continue;
                            }
                        };
                        seq += 1;
                        let body = serde_json::to_vec(&Line {
                            ts_ms: now_ms(),
                            event,
                            seq,
                            prev: &prev,
                        })
                        .unwrap_or_default();
                        let (mut bytes, mac) = key.seal(LINE_LABEL, body);
                        prev = mac;
                        bytes.push(b'\n');
                        if let Err(e) = out.write_all(&bytes) {
                            tracing::error!(path = %shown, error = %e, "audit log write failed");
                        }
                        since_checkpoint += 1;
                        if since_checkpoint >= every {
                            checkpoint(&mut out, &mut cp_file, seq, &prev);
                            since_checkpoint = 0;
                        }
                    }
                    if let Err(e) = out.flush() {
                        tracing::error!(path = %shown, error = %e, "audit log flush failed");
                    }
                }
                if since_checkpoint > 0 {
                    checkpoint(&mut out, &mut cp_file, seq, &prev);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(AuditLog { tx: Some(tx) })
    }

    /// Whether an event recorded now goes anywhere: the audit file, or the `audit` tracing
    /// target at the level [`record`](Self::record) logs it. With neither (no `[audit]` file
    /// and the log filter above `info` for `audit`), an event is dropped unread, and the hot
    /// path need not build one ([`record_with`](Self::record_with)).
    pub fn is_active(&self) -> bool {
        self.tx.is_some() || tracing::enabled!(target: "audit", tracing::Level::INFO)
    }

    /// [`record`](Self::record) the event `make` builds, building it only when the event goes
    /// somewhere ([`is_active`](Self::is_active)).
    pub async fn record_with(&self, make: impl FnOnce() -> AuditEvent) {
        if self.is_active() {
            self.record(make()).await;
        }
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
            && tx.send(Msg::Event(event)).await.is_err()
        {
            tracing::error!("audit writer stopped; event lost");
        }
    }

    /// Write to a new file at the log's path from the next line on (SIGHUP: logrotate renamed
    /// the file). The chain continues across files: `audit verify` checks the rotated files
    /// concatenated in order. Lines queued before this go to the old file.
    pub async fn reopen(&self) {
        if let Some(tx) = &self.tx
            && tx.send(Msg::Reopen).await.is_err()
        {
            tracing::error!("audit writer stopped; cannot reopen");
        }
    }
}

/// Where a new line continues the chain: the last `seq` and the value its `prev` must carry.
fn chain_tail(path: &Path, key: &AuditKey) -> Result<(u64, String), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut last: Option<Vec<u8>> = None;
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if !line.is_empty() {
            last = Some(line);
        }
    }
    let Some(last) = last else {
        return Ok((0, GENESIS.to_string()));
    };
    if split_mac(&last).is_none() {
        // An unkeyed log: the keyed chain starts after it.
        return Ok((0, hex::encode(Sha256::digest(&last))));
    }
    let (body, mac) = key.open(LINE_LABEL, &last).ok_or_else(|| {
        format!(
            "{}: the last line does not verify under the audit key (another key, or the log \
             was modified); run `envelope-proxy audit-verify {}` and move the log aside",
            path.display(),
            path.display()
        )
    })?;
    let seq = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
        .ok_or_else(|| format!("{}: the last line has no seq", path.display()))?;
    Ok((seq, mac))
}

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Lines from before keyed chains: their SHA-256 chain proves nothing against someone
    /// who can rewrite the file.
    pub unkeyed: usize,
    /// Lines whose MAC, sequence number and link verified under the audit key.
    pub keyed: usize,
    /// The last keyed line's sequence number.
    pub last_seq: u64,
    /// Checkpoints checked against the log.
    pub checkpoints: usize,
    /// The newest checkpoint's sequence number.
    pub checkpoint_seq: u64,
}

/// Check a log: the unkeyed prefix's hash chain, then every keyed line's MAC, sequence number
/// and link, and, with `checkpoints`, that every checkpoint there names a line the log still
/// holds (so lines cut off the end show). Errors name the 1-based line where it breaks.
pub fn verify(
    path: &Path,
    key: Option<&AuditKey>,
    checkpoints: Option<&Path>,
) -> Result<Report, String> {
    let mut expected: BTreeMap<u64, String> = BTreeMap::new();
    let mut report = Report::default();
    if let Some(cp) = checkpoints {
        let key = key.ok_or("checking checkpoints needs the audit key")?;
        let text = std::fs::read(cp).map_err(|e| format!("{}: {e}", cp.display()))?;
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let (body, _) = key.open(CHECKPOINT_LABEL, line).ok_or_else(|| {
                format!(
                    "{} line {}: checkpoint does not verify under the audit key",
                    cp.display(),
                    i + 1
                )
            })?;
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| format!("{} line {}: not JSON", cp.display(), i + 1))?;
            match (
                v.get("seq").and_then(|s| s.as_u64()),
                v.get("head").and_then(|h| h.as_str()),
            ) {
                (Some(seq), Some(head)) => {
                    expected.insert(seq, head.to_string());
                }
                _ => return Err(format!("{} line {}: not a checkpoint", cp.display(), i + 1)),
            }
        }
        report.checkpoints = expected.len();
        report.checkpoint_seq = expected.keys().next_back().copied().unwrap_or(0);
    }

    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut prev = GENESIS.to_string();
    let mut n = 0;
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            continue;
        }
        n += 1;
        if split_mac(&line).is_none() {
            if report.keyed > 0 {
                return Err(format!(
                    "line {n}: an unkeyed line inside the keyed chain (inserted)"
                ));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&line).map_err(|_| format!("line {n}: not JSON"))?;
            if v.get("prev").and_then(|p| p.as_str()) != Some(prev.as_str()) {
                return Err(format!(
                    "line {n}: chain broken (a line before it was changed or removed)"
                ));
            }
            prev = hex::encode(Sha256::digest(&line));
            report.unkeyed += 1;
            continue;
        }
        let key = key.ok_or_else(|| {
            format!("line {n}: a keyed line; verifying it needs the audit key (--config)")
        })?;
        let (body, mac) = key.open(LINE_LABEL, &line).ok_or_else(|| {
            format!("line {n}: MAC does not verify (the line was changed, or another audit key)")
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| format!("line {n}: not JSON"))?;
        let seq = v.get("seq").and_then(|s| s.as_u64());
        if seq != Some(report.last_seq + 1) {
            return Err(format!(
                "line {n}: sequence number {seq:?} where {} was due (lines removed or reordered)",
                report.last_seq + 1
            ));
        }
        if v.get("prev").and_then(|p| p.as_str()) != Some(prev.as_str()) {
            return Err(format!(
                "line {n}: chain broken (a line before it was changed or removed)"
            ));
        }
        report.last_seq += 1;
        report.keyed += 1;
        if let Some(head) = expected.get(&report.last_seq)
            && *head != mac
        {
            return Err(format!(
                "line {n}: does not match the checkpoint for sequence number {} (the log was \
                 rewritten)",
                report.last_seq
            ));
        }
        prev = mac;
    }
    if report.checkpoint_seq > report.last_seq {
        return Err(format!(
            "the log ends at sequence number {} but a checkpoint names line {}: lines were cut \
             off the end",
            report.last_seq, report.checkpoint_seq
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a file, events are built only when the `audit` target logs at `info`.
    #[test]
    fn tracing_only_log_is_active_as_the_filter_says() {
        let at = |filter: &str| {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, || AuditLog::to_tracing().is_active())
        };
        assert!(at("info"));
        assert!(at("warn,audit=info"));
        assert!(!at("warn"));
        assert!(!at("info,audit=warn"));
    }
}
