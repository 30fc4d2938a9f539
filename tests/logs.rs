//! Logs and request ids (issue 10, observability): the real binary with JSON logs at debug,
//! every line parses as JSON, one access line per request with its fields, the request id goes
//! upstream and back, and no line carries a value, a token or a signature. And a response body
//! cut mid-stream (a tampered S3 object) is counted and audited as an error.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Http, JsonServer};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_access_lines_and_no_secrets() {
    let js = JsonServer::start();
    // An upstream that answers `{}` and keeps every request it saw.
    let (echo_port, seen) = common::recording_server("200 OK", "application/json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let port = common::free_port();
    let admin = common::free_port();
    const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
    common::s3::secret_file(dir.path(), "admin.token", ADMIN_TOKEN);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"
log_format = "json"

[admin]
listen = "127.0.0.1:{admin}"
token_file = "{d}/admin.token"

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

[audit]
path = "{d}/audit.log"

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}

[[route]]
name = "echo"
path = "/echo/**"
upstream = "http://127.0.0.1:{echo_port}"
passthrough = true
"#,
        upstream = js.url()
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &config).unwrap();
    // ENVELOPE_PROXY_LOG_FORMAT is not set: the config's log_format chooses JSON.
    let mut child = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["--config", config_path.to_str().unwrap(), "serve"])
        .env("ENVELOPE_PROXY_LOG", "debug")
        .env_remove("ENVELOPE_PROXY_LOG_FORMAT")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let http = Http::default();
    let base = format!("http://127.0.0.1:{port}");
    const SSN: &str = "987-65-4321";
    const BEARER: &str = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl";
    const SIGNATURE: &str =
        "X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    let r = http
        .post_json(
            &format!("{base}/tenants/acme/users"),
            &[("authorization", BEARER), ("x-request-id", "client-id-42")],
            &serde_json::json!({ "id": "u1", "ssn": SSN }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.headers.get("x-request-id").unwrap(), "client-id-42");
    let r = http
        .get(&format!("{base}/tenants/acme/users/u1"), &[])
        .await;
    assert_eq!(r.json()["ssn"], SSN);
    let generated = r
        .headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 32, "a fresh id: {generated}");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = http
        .get(
            &format!("{base}/echo/thing?{SIGNATURE}&X-Amz-Credential=AKIAEXAMPLE"),
            &[("x-request-id", "echo-id-7"), ("traceparent", traceparent)],
        )
        .await;
    assert_eq!(r.status, 200);
    // The request id and the trace context reached the upstream.
    let heads: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h.clone())
        .collect();
    let head = heads
        .last()
        .expect("the upstream saw the request")
        .to_lowercase();
    assert!(head.contains("x-request-id: echo-id-7"), "{head}");
    assert!(
        head.contains(&format!("traceparent: {traceparent}")),
        "{head}"
    );

    // An admin request: an access line too (route `admin`), its token never logged.
    let r = http
        .get(
            &format!("http://127.0.0.1:{admin}/metrics"),
            &[
                ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
                ("x-request-id", "scrape-9"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("x-request-id").unwrap(), "scrape-9");

    // Stop the proxy and read everything it logged.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = child.wait();
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}")))
        .collect();
    assert!(lines.len() > 3, "{stderr}");
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "envelope_proxy::access")
        .collect();
    assert_eq!(access.len(), 4, "one access line per request: {access:?}");
    let scrape = access
        .iter()
        .find(|l| l["request_id"] == "scrape-9")
        .unwrap();
    assert_eq!(scrape["route"], "admin", "{scrape}");
    assert_eq!(scrape["path"], "/metrics");
    assert_eq!(scrape["status"], 200);
    assert!(scrape["bytes_out"].as_u64().unwrap() > 100, "{scrape}");
    let post = access
        .iter()
        .find(|l| l["request_id"] == "client-id-42")
        .unwrap();
    assert_eq!(post["route"], "users");
    assert_eq!(post["method"], "POST");
    assert_eq!(post["path"], "/tenants/acme/users");
    assert_eq!(post["status"], 201);
    assert_eq!(post["outcome"], "ok");
    assert!(post["bytes_in"].as_u64().unwrap() > 10, "{post}");
    assert!(post["bytes_out"].as_u64().unwrap() > 10, "{post}");
    assert!(post["duration_ms"].as_f64().unwrap() > 0.0, "{post}");
    assert_eq!(post["principal"], "anonymous", "{post}");
    let get = access
        .iter()
        .find(|l| l["request_id"] == generated.as_str())
        .unwrap();
    assert_eq!(get["status"], 200);
    let echo = access
        .iter()
        .find(|l| l["request_id"] == "echo-id-7")
        .unwrap();
    assert_eq!(echo["path"], "/echo/thing", "no query string: {echo}");
    assert_eq!(echo["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // Nothing secret anywhere, at debug, dependencies included.
    for secret in [
        SSN,
        "eyJhbGciOiJIUzI1NiJ9",
        "c2VjcmV0LXBheWxvYWQ",
        "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        "AKIAEXAMPLE",
        ADMIN_TOKEN,
    ] {
        assert!(!stderr.contains(secret), "{secret} was logged:\n{stderr}");
    }
}

/// A stored object that fails authentication mid-stream: the client gets a cut body, the
/// access line says `aborted`, the audit log has an error line for it, and it is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_mid_stream_is_audited_as_an_error() {
    let moto = common::Moto::start();
    let secrets = tempfile::tempdir().unwrap();
    let proxy = common::s3::gateway(&moto, secrets.path(), "").await;
    let endpoint = format!("http://{}", proxy.addr);
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers/venv/bin/python")
        .display()
        .to_string();
    let script = format!(
        r#"
import boto3, os
from botocore.config import Config
cfg = Config(s3={{'addressing_style': 'path'}}, retries={{'total_max_attempts': 1}})
gw = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{ak}', aws_secret_access_key='{sk}', region_name='us-east-1', config=cfg)
raw = boto3.client('s3', endpoint_url='{moto}', aws_access_key_id='testing', aws_secret_access_key='testing', region_name='us-east-1', config=cfg)
gw.create_bucket(Bucket='cut')
gw.put_object(Bucket='cut', Key='big', Body=os.urandom(300000))
stored = raw.get_object(Bucket='cut', Key='big')
body = bytearray(stored['Body'].read())
body[250000] ^= 1
raw.put_object(Bucket='cut', Key='big', Body=bytes(body), Metadata=stored['Metadata'])
try:
    got = gw.get_object(Bucket='cut', Key='big')['Body'].read()
    print('READ', len(got))
except Exception as e:
    print('CUT', type(e).__name__)
"#,
        ak = common::s3::CLIENT_KEY,
        sk = common::s3::CLIENT_SECRET,
        moto = moto.endpoint(),
    );
    let out = common::s3::run(&python, &["-c", &script], &[]).await;
    assert!(
        out.contains("CUT"),
        "the tampered body must not read back whole: {out}"
    );
    let line = proxy.audit_for("/cut/big", 200).await;
    let lines = proxy.audit_lines();
    let cut: Vec<&Value> = lines
        .iter()
        .filter(|l| l["path"] == "/cut/big" && l["reason"] == "response_body_aborted")
        .collect();
    assert_eq!(cut.len(), 1, "{lines:?} (first: {line})");
    assert_eq!(cut[0]["outcome"], "error");
    let m = &proxy.state().metrics;
    assert!(m.bodies_aborted_of("objects") >= 1);
    assert!(m.transformed_of("objects", "sealed") >= 300_000);
    assert!(m.transformed_of("objects", "opened") > 0);
    let exposed = m.encode();
    for name in [
        "envelope_proxy_build_info{",
        "envelope_proxy_requests_in_flight",
        "envelope_proxy_transformed_bytes_total{",
        "envelope_proxy_response_bodies_aborted_total{",
        "envelope_proxy_backend_call_seconds_bucket{",
    ] {
        assert!(exposed.contains(name), "{name} missing:\n{exposed}");
    }
}
