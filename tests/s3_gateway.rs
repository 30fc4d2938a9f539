//! The S3 gateway against real clients and a real S3 server: boto3 (from the test peers'
//! virtualenv) talks to the proxy, moto server stores the objects, and the suite reads what
//! moto holds directly to check it is ciphertext, then tampers with it.

mod common;

use std::path::{Path, PathBuf};

use common::s3::{CLIENT_KEY, CLIENT_SECRET, gateway, secret_file};
use common::{Moto, Proxy};

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/venv/bin/python");
    assert!(
        p.exists(),
        "the test peers' virtualenv is missing: run scripts/test.sh"
    );
    p
}

async fn run_suite(proxy: &Proxy, moto: &Moto, bucket: &str, checksums: &str) {
    run_suite_at(
        &format!("http://{}", proxy.addr),
        None,
        &moto.endpoint(),
        bucket,
        checksums,
    )
    .await
}

async fn run_suite_at(url: &str, ca: Option<&Path>, upstream: &str, bucket: &str, checksums: &str) {
    run_script("boto3_suite.py", url, ca, upstream, bucket, checksums, &[]).await
}

/// Run one of the boto3 suites (tests/s3/*.py) against the proxy at `url`.
async fn run_script(
    script: &str,
    url: &str,
    ca: Option<&Path>,
    upstream: &str,
    bucket: &str,
    checksums: &str,
    env: &[(&str, &str)],
) {
    let out_dir = std::env::temp_dir().join(format!("ep-{bucket}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = tokio::process::Command::new(python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/s3")
                .join(script),
        )
        .env("PROXY_URL", url)
        .env(
            "CA_BUNDLE",
            ca.map(|p| p.display().to_string()).unwrap_or_default(),
        )
        .env("MOTO_URL", upstream)
        .env("CLIENT_KEY", CLIENT_KEY)
        .env("CLIENT_SECRET", CLIENT_SECRET)
        .env("BUCKET", bucket)
        .env("CHECKSUMS", checksums)
        .env("OUT_DIR", &out_dir)
        .env_remove("AWS_CA_BUNDLE")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("passed, 0 failed"), "{stdout}");
    println!("{}", stdout.trim_end());
}

/// `decrypt-object` opens the stored body and metadata a suite left in its out dir (fetched
/// straight from storage) to the plaintext, under the bucket's context only; a flipped byte in
/// the stored body fails.
fn check_offline_decrypt(proxy: &Proxy, bucket: &str) {
    let out_dir = std::env::temp_dir().join(format!("ep-{bucket}"));
    let stored = std::fs::read(out_dir.join("stored.bin")).unwrap();
    let key = std::fs::read_to_string(out_dir.join("key.txt")).unwrap();
    let decrypt = |context: &str, body: &[u8]| {
        let body_file = out_dir.join("body-under-test.bin");
        std::fs::write(&body_file, body).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .args([
                "--config",
                proxy.config_path.to_str().unwrap(),
                "decrypt-object",
            ])
            .args([
                "--context",
                context,
                "--metadata",
                out_dir.join("meta.json").to_str().unwrap(),
                "--bucket",
                bucket,
                "--key",
                &key,
            ])
            .stdin(std::fs::File::open(body_file).unwrap())
            .output()
            .unwrap()
    };
    let own = format!("bucket={bucket}");
    let out = decrypt(&own, &stored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == std::fs::read(out_dir.join("plain.bin")).unwrap(),
        "decrypt-object gave other bytes"
    );
    let out = decrypt("bucket=another-bucket", &stored);
    assert!(
        !out.status.success(),
        "another bucket's context must not decrypt"
    );
    let mut tampered = stored.clone();
    let at = tampered.len() - 20;
    tampered[at] ^= 1;
    let out = decrypt(&own, &tampered);
    assert!(!out.status.success(), "a flipped byte must not decrypt");
    let out = decrypt(&own, &stored[..stored.len() - 16]);
    assert!(!out.status.success(), "a cut body must not decrypt");
}

/// A self-signed certificate for `localhost` in `dir`, and the `[server]` setting using it.
fn tls_server(dir: &Path) -> (PathBuf, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert_file = dir.join("cert.pem");
    let key_file = secret_file(dir, "key.pem", &cert.signing_key.serialize_pem());
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    let setting = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
        cert_file.display(),
        key_file.display()
    );
    (cert_file, setting)
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_round_trips_ranges_listings_copies_and_tampering() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    run_suite(&proxy, &moto, "suite-checksums", "when_supported").await;

    // No lock-in: the offline CLI decrypts what storage holds, with the same keys.
    check_offline_decrypt(&proxy, "suite-checksums");
    // The audit log names the key for each object written and read, and never the data.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    proxy.verify_audit();
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_without_checksums() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    run_suite(&proxy, &moto, "suite-plain", "when_required").await;
}

/// Over TLS, boto3 uploads with `aws-chunked` encoding and a trailing CRC checksum: s3s checks
/// the chunk framing and trailer, the gateway verifies the checksum over the plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_over_tls_with_aws_chunked_trailers() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, tls) = tls_server(dir.path());
    let proxy = gateway(&moto, dir.path(), &tls).await;
    let url = format!("https://localhost:{}", proxy.addr.port());
    run_suite_at(
        &url,
        Some(&cert_file),
        &moto.endpoint(),
        "suite-tls",
        "when_supported",
    )
    .await;
}

async fn run_multipart_suite(
    url: &str,
    ca: Option<&Path>,
    moto: &Moto,
    bucket: &str,
    checksums: &str,
) {
    run_script(
        "boto3_multipart.py",
        url,
        ca,
        &moto.endpoint(),
        bucket,
        checksums,
        &[],
    )
    .await
}

/// Multipart uploads end to end: boto3's managed transfer and explicit calls, ranges and
/// `?partNumber` reads across parts, ListParts, aborts, the part layout rule at Complete, and
/// tampering with the stored parts (flipped byte, swapped parts, a part of another object).
#[tokio::test(flavor = "multi_thread")]
async fn boto3_multipart_uploads() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run_multipart_suite(&url, None, &moto, "multipart-checksums", "when_supported").await;
    check_offline_decrypt(&proxy, "multipart-checksums");
}

/// The same without flexible checksums (Content-MD5 only where required).
#[tokio::test(flavor = "multi_thread")]
async fn boto3_multipart_without_checksums() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), "").await;
    let url = format!("http://{}", proxy.addr);
    run_multipart_suite(&url, None, &moto, "multipart-plain", "when_required").await;
}

/// Over TLS boto3 sends every part `aws-chunked` with a trailing CRC32 (no Content-Length).
#[tokio::test(flavor = "multi_thread")]
async fn boto3_multipart_over_tls_with_aws_chunked_trailers() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, tls) = tls_server(dir.path());
    let proxy = gateway(&moto, dir.path(), &tls).await;
    let url = format!("https://localhost:{}", proxy.addr.port());
    run_multipart_suite(
        &url,
        Some(&cert_file),
        &moto,
        "multipart-tls",
        "when_supported",
    )
    .await;
}

/// The same suites against a second upstream, s3s-fs, which (unlike moto) checks the SigV4
/// signature of every request the proxy sends it and the checksums it is given: what the proxy
/// re-signs and strips must satisfy a strict server.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_suites_against_s3s_fs() {
    let s3s = common::S3sFs::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = common::s3::gateway_at(&s3s.endpoint(), dir.path(), "", "").await;
    let url = format!("http://{}", proxy.addr);
    let env = [("UPSTREAM", "s3s-fs")];
    for (script, bucket) in [
        ("boto3_suite.py", "s3s-fs-suite"),
        ("boto3_multipart.py", "s3s-fs-multipart"),
    ] {
        run_script(
            script,
            &url,
            None,
            &s3s.endpoint(),
            bucket,
            "when_supported",
            &env,
        )
        .await;
    }
}
