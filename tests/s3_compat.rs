//! S3 compatibility of the gateway as real clients meet it (issue 13): boto3 from the test
//! peers' virtualenv against the gateway, moto server behind it (tests/s3/boto3_compat.py,
//! tests/s3/boto3_object_lock.py).

mod common;

use std::path::Path;

use common::Moto;
use common::s3::{CLIENT_KEY, CLIENT_SECRET, gateway, gateway_with};

async fn run(script: &str, url: &str, moto: &Moto, bucket: &str, extra: &[(&str, &str)]) -> String {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/venv/bin/python");
    assert!(
        python.exists(),
        "the test peers' virtualenv is missing: run scripts/test.sh"
    );
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/s3")
            .join(script),
    )
    .env("PROXY_URL", url)
    .env("MOTO_URL", moto.endpoint())
    .env("CLIENT_KEY", CLIENT_KEY)
    .env("CLIENT_SECRET", CLIENT_SECRET)
    .env("BUCKET", bucket)
    .env("CHECKSUMS", "when_supported")
    .env_remove("AWS_CA_BUNDLE");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("passed, 0 failed"), "{stdout}");
    println!("{}", stdout.trim_end());
    stdout
}

/// Checksums echoed and kept, GetObjectAttributes, SigV2 bucket requests, presigned expiry,
/// CORS preflight and the refusals, each as S3 answers them.
#[tokio::test(flavor = "multi_thread")]
async fn real_clients_get_what_s3_gives_them() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run("boto3_compat.py", &url, &moto, "s3-compat", &[]).await;
    // The preflight was audited as what it is: no principal, no key use.
    let line = proxy.audit_for("/s3-compat/upload-target", 200).await;
    assert_eq!(line["method"], "OPTIONS", "{line}");
    assert_eq!(line["action"], "pass", "{line}");
    // An anonymous request is audited as refused, and why.
    let line = proxy.audit_for("/s3-compat/anonymous", 403).await;
    assert_eq!(line["outcome"], "denied", "{line}");
    assert!(
        line["reason"].as_str().unwrap_or("").contains("anonymous"),
        "{line}"
    );
}

/// Object Lock buckets take writes through the gateway because it sends a checksum of the
/// ciphertext; without it (upstream_checksum = false) the storage refuses them.
#[tokio::test(flavor = "multi_thread")]
async fn object_lock_buckets_take_sealed_writes() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run(
        "boto3_object_lock.py",
        &url,
        &moto,
        "locked",
        &[("EXPECT", "ok")],
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway_with(&moto, dir.path(), "", "upstream_checksum = false").await;
    let url = format!("http://{}", proxy.addr);
    run(
        "boto3_object_lock.py",
        &url,
        &moto,
        "locked-plain",
        &[("EXPECT", "refused")],
    )
    .await;
}
