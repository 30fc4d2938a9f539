//! The S3 gateway against real clients and a real S3 server: boto3 (from the test peers'
//! virtualenv) talks to the proxy, moto server stores the objects, and the suite reads what
//! moto holds directly to check it is ciphertext, then tampers with it.

mod common;

use std::path::{Path, PathBuf};

use common::{Moto, Proxy};

const CLIENT_KEY: &str = "AKIAAPPEXAMPLE";
const CLIENT_SECRET: &str = "app-secret-for-tests-only";

fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

async fn gateway(moto: &Moto, secrets: &Path, extra_route: &str) -> Proxy {
    let routes = format!(
        r#"
[[route]]
name = "objects"
kind = "s3"
path = "/**"
upstream = "{upstream}"
key = "objects"
context = {{ bucket = "{{s3.bucket}}" }}
{extra_route}
[route.s3]
region = "us-east-1"
upstream_access_key_id_file = "{ak}"
upstream_secret_access_key_file = "{sk}"
[[route.s3.client]]
access_key_id = "{CLIENT_KEY}"
secret_access_key_file = "{client}"
identity = "app"
"#,
        upstream = moto.endpoint(),
        ak = secret_file(secrets, "up-ak", "testing").display(),
        sk = secret_file(secrets, "up-sk", "testing").display(),
        client = secret_file(secrets, "client-sk", CLIENT_SECRET).display(),
    );
    Proxy::start(&routes, "").await
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/venv/bin/python");
    assert!(
        p.exists(),
        "the test peers' virtualenv is missing: run scripts/test.sh"
    );
    p
}

async fn run_suite(proxy: &Proxy, moto: &Moto, bucket: &str, checksums: &str) {
    let out = tokio::process::Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/boto3_suite.py"))
        .env("PROXY_URL", format!("http://{}", proxy.addr))
        .env("MOTO_URL", moto.endpoint())
        .env("CLIENT_KEY", CLIENT_KEY)
        .env("CLIENT_SECRET", CLIENT_SECRET)
        .env("BUCKET", bucket)
        .env("CHECKSUMS", checksums)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boto3 suite failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.trim_end().ends_with("passed, 0 failed"), "{stdout}");
    println!("{}", stdout.trim_end());
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_round_trips_ranges_listings_copies_and_tampering() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    run_suite(&proxy, &moto, "suite-checksums", "when_supported").await;
    // The audit log names the key for each object written and read, and never the data.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    envelope_proxy::audit::verify(&proxy.dir.path().join("audit.log")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_without_checksums() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    run_suite(&proxy, &moto, "suite-plain", "when_required").await;
}
