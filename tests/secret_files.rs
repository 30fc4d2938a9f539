//! Secret file modes: what Kubernetes Secret volumes produce is accepted (`defaultMode: 0400`,
//! root-owned `0440` with the pod's fsGroup, behind the `..data` symlinks), anything readable by
//! others or by a group not ours is refused with an error naming the fix.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;

use envelope_proxy::config::SecretSource;
use envelope_proxy::secret::{check_private, read_secret};

fn secret(dir: &Path, name: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

#[test]
fn kubernetes_secret_volume_modes_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // defaultMode: 0400 (and the classic 0600).
    for mode in [0o400, 0o600] {
        let p = secret(dir.path(), &format!("m{mode:o}"), mode);
        check_private(&p).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
    }
    // A Secret volume: NAME -> ..data/NAME -> ..2024_01_01/NAME.
    let real = dir.path().join("..2024_01_01");
    std::fs::create_dir(&real).unwrap();
    secret(&real, "token", 0o400);
    std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
    let value = read_secret(&SecretSource::File(dir.path().join("token"))).unwrap();
    assert_eq!(value.len(), 32);
}

#[test]
fn root_owned_group_readable_needs_one_of_our_groups() {
    assert!(
        running_as_root(),
        "this test makes root-owned files of another group: run it as root (the test machines do)"
    );
    let dir = tempfile::tempdir().unwrap();
    // defaultMode: 0440 with fsGroup = our group: root-owned, group ours → accepted.
    let ours = secret(dir.path(), "ours", 0o440);
    chown(&ours, Some(0), Some(0)).unwrap();
    check_private(&ours).unwrap();
    // The same mode, a group that is not ours → refused.
    let theirs = secret(dir.path(), "theirs", 0o440);
    chown(&theirs, Some(0), Some(54321)).unwrap();
    let e = check_private(&theirs).unwrap_err();
    assert!(e.contains("chmod 0400") && e.contains("defaultMode"), "{e}");
    // Group-writable is never accepted.
    let writable = secret(dir.path(), "writable", 0o460);
    chown(&writable, Some(0), Some(0)).unwrap();
    assert!(check_private(&writable).is_err());
    // Not root-owned: group-readable is refused (only the kubelet's root-owned files count).
    let other_owner = secret(dir.path(), "other", 0o440);
    chown(&other_owner, Some(54321), Some(0)).unwrap();
    assert!(check_private(&other_owner).is_err());
}

#[test]
fn readable_by_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o604, 0o444] {
        let p = secret(dir.path(), &format!("m{mode:o}"), mode);
        let e = read_secret(&SecretSource::File(p.clone())).unwrap_err();
        assert!(
            e.contains(&format!("chmod 0400 {}", p.display())),
            "{mode:o}: {e}"
        );
        assert!(e.contains("defaultMode: 0400"), "{e}");
        assert!(
            !e.contains("0123456789abcdef"),
            "the value is never shown: {e}"
        );
    }
}
