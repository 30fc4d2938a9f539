//! `keys usage NAME [--version V] [--audit FILE]`: how much, and when last, each version of a
//! key was used. Two sources, both shown:
//!
//! - the keyring's usage notes (`KEYRING.usage`, written by every proxy at most once a minute):
//!   the last use of each version, sealing or opening;
//! - the audit log: the requests that used the key (`keys`), counted per version where the
//!   line names them (`key_versions`, `BACKEND:KEY:VERSION`) and as `unknown` for older lines that do not.
//!
//! With the `reencrypt --dry-run` report (values still stored under each version) it tells an
//! operator when a version is no longer used and can be retired (`keys retire-version`).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct VersionUse {
    /// Audit lines (requests) that used this version.
    pub requests: u64,
    /// The newest such line (RFC 3339), if any.
    pub last_request: Option<String>,
    /// The keyring's usage notes: the last use of the version.
    pub last_used: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Usage {
    pub key: String,
    /// By version (`unknown`: audit lines that name the key but not its versions).
    pub versions: BTreeMap<String, VersionUse>,
}

fn rfc3339_ms(ms: u128) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Count the uses of `key` (and its aliases `names`) in the audit log at `audit`.
pub fn from_audit(
    audit: &Path,
    key: &str,
    names: &[String],
    only: Option<u32>,
    usage: &mut Usage,
) -> Result<(), String> {
    let file = std::fs::File::open(audit).map_err(|e| format!("{}: {e}", audit.display()))?;
    let mut last: BTreeMap<String, u128> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("{}: {e}", audit.display()))?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if !matches!(v["action"].as_str(), Some("seal" | "open")) || v["outcome"] == "error" {
            continue;
        }
        // Audit lines name keys as BACKEND:KEY (`local:users`).
        let named = |s: &str| {
            let s = s.strip_prefix("local:").unwrap_or(s);
            s == key || names.iter().any(|n| n == s)
        };
        let uses_key = v["keys"]
            .as_array()
            .is_some_and(|ks| ks.iter().filter_map(|k| k.as_str()).any(named));
        let versions: Vec<String> = v["key_versions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .filter_map(|x| x.rsplit_once(':'))
                    .filter(|(k, _)| k.split_once(':').map_or(*k, |(_, name)| name) == key)
                    .map(|(_, ver)| ver.to_string())
                    .collect()
            })
            .unwrap_or_default();
        if !uses_key && versions.is_empty() {
            continue;
        }
        let ts = v["ts_ms"].as_u64().unwrap_or(0) as u128;
        let labels = if versions.is_empty() {
            vec!["unknown".to_string()]
        } else {
            versions
        };
        for label in labels {
            if only.is_some_and(|o| label != o.to_string() && label != "unknown") {
                continue;
            }
            usage.versions.entry(label.clone()).or_default().requests += 1;
            let l = last.entry(label).or_default();
            *l = (*l).max(ts);
        }
    }
    for (label, ts) in last {
        if let Some(u) = usage.versions.get_mut(&label) {
            u.last_request = Some(rfc3339_ms(ts));
        }
    }
    Ok(())
}

/// `keys usage`: print the usage of `name` (every version, or `version`).
pub fn command(
    keyring: &crate::keys::keyring::Keyring,
    name: &str,
    version: Option<u32>,
    audit: Option<&Path>,
    json: bool,
) -> Result<(), String> {
    let info = keyring.describe(name).map_err(|e| e.to_string())?;
    let mut usage = Usage {
        key: info.name.clone(),
        ..Usage::default()
    };
    for v in &info.versions {
        if version.is_none_or(|o| o == v.version) {
            usage
                .versions
                .entry(v.version.to_string())
                .or_default()
                .last_used = v.last_used.clone();
        }
    }
    if let Some(o) = version
        && !usage.versions.contains_key(&o.to_string())
    {
        return Err(format!("{name} has no version {o}"));
    }
    if let Some(audit) = audit {
        from_audit(audit, &info.name, &info.aliases, version, &mut usage)?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&usage).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:<9} {:>9}  {:<22}  LAST USED (keyring notes)",
        "VERSION", "REQUESTS", "LAST REQUEST (audit)"
    );
    for (v, u) in &usage.versions {
        println!(
            "{:<9} {:>9}  {:<22}  {}",
            v,
            if audit.is_some() {
                u.requests.to_string()
            } else {
                "-".into()
            },
            u.last_request.as_deref().unwrap_or("-"),
            u.last_used.as_deref().unwrap_or("never")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_version_and_unknown() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = dir.path().join("audit.log");
        std::fs::write(
            &p,
            concat!(
                r#"{"ts_ms":1000,"action":"seal","outcome":"ok","keys":["users"],"key_versions":["local:users:1"]}"#, "\n",
                r#"{"ts_ms":2000,"action":"open","outcome":"ok","keys":["users"],"key_versions":["local:users:1","local:users:2"]}"#, "\n",
                r#"{"ts_ms":3000,"action":"open","outcome":"ok","keys":["users"]}"#, "\n",
                r#"{"ts_ms":4000,"action":"open","outcome":"ok","keys":["other"],"key_versions":["local:other:1"]}"#, "\n",
                r#"{"checkpoint":"x"}"#, "\n",
            ),
        )
        .unwrap();
        let mut u = Usage::default();
        from_audit(&p, "users", &[], None, &mut u).unwrap();
        assert_eq!(u.versions["1"].requests, 2);
        assert_eq!(u.versions["2"].requests, 1);
        assert_eq!(u.versions["unknown"].requests, 1);
        assert_eq!(
            u.versions["1"].last_request.as_deref(),
            Some("1970-01-01T00:00:02Z")
        );
    }
}
