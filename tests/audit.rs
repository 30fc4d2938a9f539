//! The audit log's keyed chain and checkpoints: what someone who can edit the log file (but
//! does not hold the audit key) can and cannot do unnoticed.

use std::path::Path;
use std::time::Duration;

use envelope_proxy::audit::{AuditEvent, AuditKey, AuditLog, checkpoint_path, verify};
use sha2::{Digest, Sha256};

fn key() -> AuditKey {
    AuditKey::derive(b"a secret that is not stored with the log")
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        action: "open",
        outcome: "ok",
        route: "users".into(),
        method: "GET".into(),
        path: format!("/users/{i}"),
        status: 200,
        client: "127.0.0.1".into(),
        keys: vec!["local:users".into()],
        values: 1,
        reason: None,
        ..Default::default()
    }
}

/// Write `n` events, close the log and wait for its closing checkpoint (at `n` plus the lines
/// already in the log).
async fn write_log(path: &Path, n: usize, checkpoint_every: u64) {
    let before = std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| l.contains("\"mac\"")).count())
        .unwrap_or(0);
    let log = AuditLog::to_file(path, key(), checkpoint_every).unwrap();
    for i in 0..n {
        log.record(event(i)).await;
    }
    drop(log);
    let cp = checkpoint_path(path);
    let want = format!("\"seq\":{}", before + n);
    for _ in 0..100 {
        if std::fs::read_to_string(&cp).is_ok_and(|t| t.contains(&want)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no closing checkpoint");
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What defeated the old chain: delete a line, then recompute every later `prev` as the
/// SHA-256 of the line before it. `strip_macs` also drops the MACs, posing as an old log.
fn delete_and_recompute(path: &Path, index: usize, strip_macs: bool) {
    let mut docs: Vec<serde_json::Value> = lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    docs.remove(index);
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, mut d) in docs.into_iter().enumerate() {
        if strip_macs {
            let o = d.as_object_mut().unwrap();
            o.remove("mac");
            o.remove("seq");
            d["prev"] = prev.clone().into();
        } else if i >= index {
            d["prev"] = prev.clone().into();
            d["seq"] = (i as u64 + 1).into();
        }
        let line = serde_json::to_string(&d).unwrap();
        prev = hex::encode(Sha256::digest(line.as_bytes()));
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

#[tokio::test]
async fn an_intact_log_verifies_and_names_its_extent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 5, 2).await;
    let cp = checkpoint_path(&path);
    let r = verify(&path, Some(&key()), Some(&cp)).unwrap();
    assert_eq!((r.keyed, r.unkeyed, r.last_seq), (5, 0, 5));
    assert_eq!(r.checkpoint_seq, 5);
    assert_eq!(r.checkpoints, 3, "after lines 2 and 4, and at close");
    // Continuing the chain after a restart.
    write_log(&path, 2, 1000).await;
    let r = verify(&path, Some(&key()), Some(&cp)).unwrap();
    assert_eq!(r.last_seq, 7);
    // Another key does not verify it.
    let other = AuditKey::derive(b"another secret");
    assert!(verify(&path, Some(&other), None).is_err());
    assert!(
        AuditLog::to_file(&path, other, 10).is_err(),
        "a log is not continued under another key"
    );
}

#[tokio::test]
async fn deleting_a_middle_line_and_recomputing_the_chain_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 5, 1000).await;
    let original = std::fs::read(&path).unwrap();

    delete_and_recompute(&path, 2, false);
    let e = verify(&path, Some(&key()), None).unwrap_err();
    assert!(e.contains("line 3"), "{e}");

    // Posing as an old, unkeyed log: the SHA-256 chain is intact, so it reads as unkeyed
    // (reported as such) -- and the checkpoints show that keyed lines are missing.
    std::fs::write(&path, &original).unwrap();
    delete_and_recompute(&path, 2, true);
    let r = verify(&path, Some(&key()), None).unwrap();
    assert_eq!((r.keyed, r.unkeyed), (0, 4));
    let e = verify(&path, Some(&key()), Some(&checkpoint_path(&path))).unwrap_err();
    assert!(e.contains("cut off"), "{e}");

    // Changing one value in a line.
    let text = String::from_utf8(original).unwrap();
    std::fs::write(&path, text.replacen("\"status\":200", "\"status\":403", 1)).unwrap();
    let e = verify(&path, Some(&key()), None).unwrap_err();
    assert!(e.contains("line 1: MAC"), "{e}");
}

#[tokio::test]
async fn truncating_the_tail_is_detected_against_a_shipped_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 5, 2).await;
    // The checkpoints as a log shipper took them off the host.
    let shipped = dir.path().join("shipped.checkpoints");
    std::fs::copy(checkpoint_path(&path), &shipped).unwrap();

    let kept: Vec<String> = lines(&path).into_iter().take(3).collect();
    std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    // The chain alone cannot tell ...
    assert_eq!(verify(&path, Some(&key()), None).unwrap().last_seq, 3);
    // ... the checkpoint can.
    let e = verify(&path, Some(&key()), Some(&shipped)).unwrap_err();
    assert!(
        e.contains("ends at sequence number 3") && e.contains("line 5"),
        "{e}"
    );

    // A forged checkpoint (no key) is refused, not trusted.
    let forged = dir.path().join("forged.checkpoints");
    let t = std::fs::read_to_string(&shipped).unwrap();
    std::fs::write(&forged, t.replace("\"seq\":2", "\"seq\":1")).unwrap();
    assert!(verify(&path, Some(&key()), Some(&forged)).is_err());
}

#[tokio::test]
async fn an_old_unkeyed_log_is_read_and_continued_by_a_keyed_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // Two lines as older versions wrote them: prev = SHA-256 of the previous line.
    let mut prev = "0".repeat(64);
    let mut text = String::new();
    for i in 0..2 {
        let line =
            format!(r#"{{"ts_ms":1,"action":"open","outcome":"ok","n":{i},"prev":"{prev}"}}"#);
        prev = hex::encode(Sha256::digest(line.as_bytes()));
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, &text).unwrap();
    let r = verify(&path, None, None).unwrap();
    assert_eq!((r.unkeyed, r.keyed), (2, 0));

    write_log(&path, 3, 1000).await;
    let r = verify(&path, Some(&key()), None).unwrap();
    assert_eq!((r.unkeyed, r.keyed), (2, 3));
    // Without the key, keyed lines cannot be checked: said so, not passed.
    assert!(verify(&path, None, None).unwrap_err().contains("audit key"));
}

#[tokio::test]
async fn the_cli_verifies_with_the_key_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config_path = dir.path().join("c.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"{d}/k.json\"\nmaster_key_file = \"{d}/m.key\"\n\
             [audit]\npath = \"{d}/audit.log\"\n[[route]]\nname = \"users\"\npath = \"/users/{{id?}}\"\n\
             upstream = \"http://127.0.0.1:9\"\nkey = \"users\"\nfields = [\"$.ssn\"]\n"
        ),
    )
    .unwrap();
    let config = envelope_proxy::config::load(&config_path).unwrap();
    let keyring = envelope_proxy::keys::keyring::Keyring::open(
        "local",
        &config.keyring.as_ref().unwrap().path,
        &config.keyring.as_ref().unwrap().master_key,
    )
    .unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::to_file(
        &path,
        envelope_proxy::audit::key_for(&config, &keyring).unwrap(),
        1000,
    )
    .unwrap();
    for i in 0..4 {
        log.record(event(i)).await;
    }
    drop(log);
    let cp = checkpoint_path(&path);
    for _ in 0..100 {
        if std::fs::read_to_string(&cp).is_ok_and(|t| t.contains("\"seq\":4")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .arg("--config")
            .arg(&config_path)
            .arg("audit-verify")
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("keyed chain intact (sequence 1..4)"),
        "{stdout}"
    );
    assert!(stdout.contains("up to sequence 4"), "{stdout}");

    delete_and_recompute(&path, 1, false);
    let out = run();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
