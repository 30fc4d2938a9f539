//! Issue #8, item 6: no log level prints a credential or a signature. The real binary runs
//! with `ENVELOPE_PROXY_LOG=trace` through header-signed and presigned S3 requests, a failed
//! signature (s3s logged the signature it expected: a signing oracle) and a tampered
//! presigned URL; its logs are then searched for every secret the test used.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::s3::{CLIENT_KEY, CLIENT_SECRET, presign, raw_get, secret_file};
use common::{Http, Moto, free_port};
use envelope_proxy::s3::sign::{UpstreamCredentials, sign_request};
use http_body_util::BodyExt;

const UPSTREAM_KEY: &str = "AKIAUPSTREAMLOGTEST";
const UPSTREAM_SECRET: &str = "upstream-secret-never-logged";

/// Send `req` signed with `secret`; returns the status and the Authorization header sent.
async fn send_signed(
    method: http::Method,
    url: &str,
    secret: &str,
    body: &'static [u8],
) -> (http::StatusCode, String) {
    let creds = UpstreamCredentials::new(
        CLIENT_KEY.into(),
        zeroize::Zeroizing::new(secret.to_string()),
    );
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::Full::new(Bytes::from_static(body)))
        .unwrap();
    sign_request(&mut req, &creds, "us-east-1").unwrap();
    let auth = req.headers()[http::header::AUTHORIZATION]
        .to_str()
        .unwrap()
        .to_string();
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    (status, auth)
}

/// Runs of exactly 64 hex digits: SigV4 signatures (client, expected, upstream).
fn hex64_runs(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_hexdigit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - start == 64 {
                out.push(&text[start..i]);
            }
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_carry_no_credentials_or_signatures() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let routes = common::s3::route("objects", "/**", &moto.endpoint(), d, "");
    // Distinct upstream credentials (moto accepts any), so the logs can be searched for them.
    secret_file(d, "up-ak", UPSTREAM_KEY);
    secret_file(d, "up-sk", UPSTREAM_SECRET);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"
[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true
[audit]
path = "{d}/audit.log"
{routes}
"#,
        d = d.display()
    );
    let config_path = d.join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let log_path = d.join("proxy.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .env(
            "ENVELOPE_PROXY_LOG",
            "trace,s3s=trace,aws_sigv4=trace,hyper=trace",
        )
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut authorizations = Vec::new();
    let (status, auth) = send_signed(
        http::Method::PUT,
        &format!("{endpoint}/log-bucket"),
        CLIENT_SECRET,
        b"",
    )
    .await;
    assert_eq!(status, 200);
    authorizations.push(auth);
    let (status, auth) = send_signed(
        http::Method::PUT,
        &format!("{endpoint}/log-bucket/doc.txt"),
        CLIENT_SECRET,
        b"logged nowhere",
    )
    .await;
    assert_eq!(status, 200);
    authorizations.push(auth);
    // A wrong secret: s3s computes the right signature for this request and compares.
    let (status, auth) = send_signed(
        http::Method::PUT,
        &format!("{endpoint}/log-bucket/forged.txt"),
        "not-the-secret",
        b"forged",
    )
    .await;
    assert_eq!(status, 403);
    authorizations.push(auth);
    assert_eq!(raw_get(&moto, "log-bucket", "forged.txt").await.0, 404);
    // A presigned URL, and a tampered one.
    let http = Http::default();
    let url = presign(&endpoint, "s3v4", "get_object", "log-bucket", "doc.txt");
    let r = http.get(&url, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url_signature = url.split("X-Amz-Signature=").nth(1).unwrap().to_string();
    let tampered = presign(&endpoint, "s3v4", "get_object", "log-bucket", "doc.txt")
        .replace("X-Amz-Signature=", "X-Amz-Signature=0");
    let tampered = tampered[..tampered.len() - 1].to_string();
    let r = http.get(&tampered, &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());

    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    // The logs are at trace level (the gateway's own debug events are there).
    assert!(logs.contains("upstream S3 call"), "not at debug: {logs}");
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.into(),
        UPSTREAM_KEY.into(),
        UPSTREAM_SECRET.into(),
        url_signature,
        "X-Amz-Signature".into(),
        "Signature=".into(),
        "AWS4-HMAC-SHA256 Credential".into(),
    ];
    for a in &authorizations {
        secrets.push(a.clone());
        secrets.push(a.rsplit("Signature=").next().unwrap().to_string());
    }
    for s in &secrets {
        assert!(
            !logs.to_ascii_lowercase().contains(&s.to_ascii_lowercase()),
            "the logs contain {s:?}"
        );
    }
    let runs = hex64_runs(&logs);
    assert!(
        runs.is_empty(),
        "the logs contain 64-hex-digit values (signatures?): {runs:?}"
    );
}
