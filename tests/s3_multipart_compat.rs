//! Multipart uploads as S3 clients retry and resume them (issue 13): boto3 from the test peers'
//! virtualenv against the gateway, moto server behind it (tests/s3/boto3_multipart_compat.py).

mod common;

use std::path::Path;

use common::Moto;
use common::s3::{CLIENT_KEY, CLIENT_SECRET, gateway};

async fn run(url: &str, ca: Option<&Path>, moto: &Moto, bucket: &str, checksums: &str) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/venv/bin/python");
    assert!(
        python.exists(),
        "the test peers' virtualenv is missing: run scripts/test.sh"
    );
    let out = tokio::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/boto3_multipart_compat.py"))
        .env("PROXY_URL", url)
        .env(
            "CA_BUNDLE",
            ca.map(|p| p.display().to_string()).unwrap_or_default(),
        )
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
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("passed, 0 failed"), "{stdout}");
    println!("{}", stdout.trim_end());
}

/// Complete twice, a part uploaded twice, EntityTooSmall, ids from ListMultipartUploads, and
/// the part checksum in the UploadPart answer.
#[tokio::test(flavor = "multi_thread")]
async fn multipart_retries_and_resumes_like_s3() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run(&url, None, &moto, "mpu-compat", "when_supported").await;
}

/// The same without flexible checksums unless asked for (Content-MD5 only where required).
#[tokio::test(flavor = "multi_thread")]
async fn multipart_retries_and_resumes_like_s3_without_checksums() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run(&url, None, &moto, "mpu-compat-plain", "when_required").await;
}
