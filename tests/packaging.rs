//! The container image: `Containerfile` builds with podman and the image runs.
//!
//! This sandbox reaches no container registry and cannot run containers (crun: `setrlimit`,
//! cgroups hybrid mode), so the test
//! - makes the runtime base itself: a glibc root filesystem from Debian's mirror (mmdebstrap,
//!   only base-files, libc6, libgcc-s1, netbase: no shell), `podman import`ed once and cached
//!   in podman's image store as [`BASE`];
//! - builds the real Containerfile's `prebuilt` target, feeding it the binary this suite built (the release build with LTO happens in the Containerfile's builder stage for
//!   real users; here it would cost more than the whole suite);
//! - exports the image's root filesystem and runs its entrypoint under `chroot` as the image's
//!   user: `--version`, then the proxy with its demo store, a POST and a PUT through it,
//!   tokens at rest, plaintext back, and nothing written outside the data volume.
//!
//! Needs root (mmdebstrap, chroot) and podman; scripts/test.sh installs podman and mmdebstrap.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The cached runtime base (a stand-in for distroless/cc-debian12: glibc, libgcc_s, no shell).
const BASE: &str = "localhost/envelope-proxy-test/runtime-base:bookworm";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn podman() -> Command {
    Command::new("podman")
}

fn require_tools() {
    let podman_ok = podman()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        podman_ok,
        "podman is not installed: the image test needs it (scripts/test.sh installs it with apt)"
    );
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the image test runs mmdebstrap and chroot: run the suite as root"
    );
}

/// Build the runtime base once (about 15 MB; seconds from the Debian mirror).
fn ensure_base() {
    if podman()
        .args(["image", "exists", BASE])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("rootfs.tar");
    run(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--mode=root",
            "--variant=extract",
            "--include=base-files,libc6,libgcc-s1,netbase",
            "bookworm",
        ])
        .arg(&tar));
    run(podman().arg("import").arg(&tar).arg(BASE));
}

/// Removes the test's image and container however the test ends (removing the tagged image
/// removes its intermediate layers: the `prebuilt` target copies from no other stage, so no
/// untagged stage image is left behind).
struct Cleanup {
    image: String,
    container: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", &self.container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = podman()
            .args(["rmi", "-f", &self.image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Build the image from the real Containerfile with this suite's binary; return its root
/// filesystem (extracted into `into`) and its config (User, Entrypoint, Cmd, Env).
fn build_and_export(into: &Path, cleanup: &Cleanup) -> Value {
    let context = tempfile::tempdir().unwrap();
    std::fs::create_dir(context.path().join("prebuilt")).unwrap();
    let binary = context.path().join("prebuilt/envelope-proxy");
    // The debug binary is mostly debug info: drop it (the release profile strips it all).
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_envelope-proxy"))
        .arg(&binary)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_envelope-proxy"), &binary).unwrap();
    }
    let containerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Containerfile");
    run(podman()
        .args([
            "build",
            "--pull=never",
            "--quiet",
            "--target",
            "prebuilt",
            "-f",
        ])
        .arg(&containerfile)
        .args(["--build-arg", &format!("RUNTIME_IMAGE={BASE}")])
        .args(["-t", &cleanup.image])
        .arg(context.path()));
    let inspect = run(podman().args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &cleanup.image,
    ]));
    let config: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    run(podman().args(["create", "--name", &cleanup.container, &cleanup.image]));
    let tar = context.path().join("rootfs.tar");
    run(podman()
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&cleanup.container));
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(into));
    config
}

/// The image's command line under chroot as its user, with its environment.
fn chroot_cmd(rootfs: &Path, config: &Value, args: &[&str]) -> Command {
    let user = config["User"].as_str().unwrap();
    let mut cmd = Command::new("chroot");
    cmd.arg(format!("--userspec={user}")).arg(rootfs);
    for part in config["Entrypoint"].as_array().unwrap() {
        cmd.arg(part.as_str().unwrap());
    }
    cmd.args(args);
    cmd.env_clear();
    for kv in config["Env"].as_array().unwrap() {
        let (k, v) = kv.as_str().unwrap().split_once('=').unwrap();
        cmd.env(k, v);
    }
    cmd
}

fn files_owned_by(dir: &Path, uid: u32, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        if meta.uid() == uid {
            out.push(e.path());
        }
        if meta.is_dir() && !meta.file_type().is_symlink() {
            files_owned_by(&e.path(), uid, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn image_builds_and_serves_from_its_root_filesystem() {
    require_tools();
    ensure_base();
    let id = format!("{}-{}", std::process::id(), rand_suffix());
    let cleanup = Cleanup {
        image: format!("localhost/envelope-proxy-test:{id}"),
        container: format!("envelope-proxy-test-{id}"),
    };
    let root = tempfile::tempdir().unwrap();
    let rootfs = root.path();
    let config = build_and_export(rootfs, &cleanup);

    // What the image promises: a numeric non-root user, the binary as entrypoint, no shell.
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/local/bin/envelope-proxy"])
    );
    assert_eq!(config["Cmd"], json!(["serve"]));
    for shell in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "usr/bin/bash",
        "bin/busybox",
    ] {
        assert!(
            !rootfs.join(shell).exists(),
            "the image has a shell: /{shell}"
        );
    }

    // --version runs as the image's user and names the build's revision.
    let out = run(&mut chroot_cmd(rootfs, &config, &["--version"]));
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("envelope-proxy {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("rev "), "{version}");

    // A round trip. The config comes in read-only (a ConfigMap), the keys and audit log go to
    // the one writable volume (an emptyDir); the rest of the root filesystem is root's.
    let (port, admin, store) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let etc = rootfs.join("etc/envelope-proxy");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("config.toml"),
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"
[admin]
listen = "127.0.0.1:{admin}"
[keyring]
path = "/var/lib/envelope-proxy/keyring.json"
master_key_file = "/var/lib/envelope-proxy/master.key"
create_missing_keys = true
[audit]
path = "/var/lib/envelope-proxy/audit.log"
[demo_store]
listen = "127.0.0.1:{store}"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://127.0.0.1:{store}"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#
        ),
    )
    .unwrap();
    let data = rootfs.join("var/lib/envelope-proxy");
    std::fs::create_dir_all(&data).unwrap();
    run(Command::new("chown").arg("65532:65532").arg(&data));
    let cmd = config["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let log = root.path().join("proxy.log");
    let child = chroot_cmd(rootfs, &config, &cmd)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(root.path().join("proxy.err")).unwrap())
        .spawn()
        .unwrap();
    let mut proxy = KillOnDrop(child);

    let http = common::Http::default();
    let ready = Instant::now();
    loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            panic!(
                "the proxy exited ({status}): {}",
                std::fs::read_to_string(root.path().join("proxy.err")).unwrap_or_default()
            );
        }
        // Connect first: the client helper treats a refused connection as a test failure.
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            let up = http
                .get(&format!("http://127.0.0.1:{admin}/readyz"), &[])
                .await;
            if up.status == 200 {
                break;
            }
        }
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "not ready in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let proxy_url = format!("http://127.0.0.1:{port}/tenants/acme/users");
    let created = http
        .post_json(
            &proxy_url,
            &[],
            &json!({"id": "1", "name": "Ada", "ssn": "123-45-6789"}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let updated = http
        .put_json(
            &format!("{proxy_url}/1"),
            &json!({"id": "1", "name": "Ada", "ssn": "987-65-4321"}),
        )
        .await;
    assert_eq!(updated.status, 200, "{}", updated.text());

    let stored = http
        .get(
            &format!("http://127.0.0.1:{store}/tenants/acme/users/1"),
            &[],
        )
        .await
        .json();
    let token = stored["ssn"].as_str().unwrap();
    assert!(token.starts_with("enc:v1:"), "stored in clear: {stored}");
    assert!(!stored.to_string().contains("987-65-4321"));
    assert_eq!(stored["name"], "Ada");

    let read = http.get(&format!("{proxy_url}/1"), &[]).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json()["ssn"], "987-65-4321");

    drop(proxy);
    // Keys and the audit log landed in the data volume, and nothing else was written: the
    // image is happy with a read-only root filesystem.
    assert!(data.join("keyring.json").exists());
    assert!(data.join("audit.log").exists());
    let mut written = Vec::new();
    files_owned_by(rootfs, 65532, &mut written);
    written.retain(|p| !p.starts_with(&data));
    assert!(
        written.is_empty(),
        "written outside the data volume: {written:?}"
    );
}

fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// The Containerfile keeps the promises the image test cannot see from a prebuilt binary.
#[test]
fn containerfile_builds_release_and_documents_vendor_modules() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Containerfile"))
        .unwrap();
    for needle in [
        "cargo build --release --locked",
        "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot",
        "USER 65532:65532",
        "ENTRYPOINT [\"/usr/local/bin/envelope-proxy\"]",
        "PKCS#11 vendor module",
        "ENVELOPE_PROXY_GIT_REV",
    ] {
        assert!(text.contains(needle), "Containerfile lacks {needle:?}");
    }
    // The runtime stages run nothing: they build without a shell or a container runtime.
    let runtime = text
        .split("FROM ${RUNTIME_IMAGE} AS runtime-base")
        .nth(1)
        .unwrap();
    assert!(
        !runtime.lines().any(|l| l.trim_start().starts_with("RUN")),
        "a runtime stage has a RUN step"
    );
    // The default target is the one with the builder's binary.
    let last = text.lines().rfind(|l| l.starts_with("FROM ")).unwrap();
    assert_eq!(last, "FROM runtime-base AS runtime");
    // The image builds with --no-default-features: its feature list must be cargo's defaults
    // (an image without `otel` would ignore the OTLP endpoint the README tells users to set).
    let image_features: std::collections::BTreeSet<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG CARGO_FEATURES="))
        .expect("Containerfile has ARG CARGO_FEATURES=")
        .split(',')
        .map(str::trim)
        .collect();
    let manifest: toml::Table =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let defaults: std::collections::BTreeSet<&str> = manifest["features"]["default"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        image_features, defaults,
        "the image's CARGO_FEATURES are not cargo's defaults"
    );
}
