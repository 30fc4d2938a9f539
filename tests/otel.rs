//! OpenTelemetry tracing (issue 10): the real binary with an OTLP endpoint exports its spans
//! over OTLP/HTTP (protobuf) to a collector (a recording HTTP server here). A request's spans
//! (`request`, `data_key`, `transform`, `upstream`) arrive under the trace id of the caller's
//! `traceparent`, and no export carries a value, a token, a query string or a credential.
//! Without an endpoint nothing is exported; a bad endpoint is a config error.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Http, recording_server};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Running {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(upstream: u16, otlp: Option<String>) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let port = common::free_port();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://127.0.0.1:{upstream}"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}

[[route]]
name = "echo"
path = "/echo/**"
upstream = "http://127.0.0.1:{upstream}"
passthrough = true
"#
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"));
        cmd.args(["--config", config_path.to_str().unwrap(), "serve"])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("ENVELOPE_PROXY_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(e) = otlp {
            cmd.env("ENVELOPE_PROXY_OTLP_ENDPOINT", e);
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Running {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SSN: &str = "987-65-4321";
const BEARER: &str = "Bearer c2VjcmV0LXRva2VuLWZvci1vdGVs";
const QUERY_SECRET: &str = "X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6";

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_the_collector_under_the_callers_trace_and_carry_no_secrets() {
    let (upstream, stored) = recording_server("200 OK", "application/json");
    let (collector, exports) = recording_server("200 OK", "");
    let proxy = Running::start(
        upstream,
        Some(format!("http://127.0.0.1:{collector}/v1/traces")),
    );
    let http = Http::default();
    let write_trace = "0af7651916cd43dd8448eb211c80319c";
    let read_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let w = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[
                ("authorization", BEARER),
                (
                    "traceparent",
                    &format!("00-{write_trace}-b7ad6b7169203331-01"),
                ),
            ],
            &serde_json::json!({ "id": "u1", "ssn": SSN }),
        )
        .await;
    assert_eq!(w.status, 200, "{}", w.text());
    let r = http
        .get(
            &proxy.url(&format!("/echo/thing?{QUERY_SECRET}")),
            &[(
                "traceparent",
                &format!("00-{read_trace}-00f067aa0ba902b7-01"),
            )],
        )
        .await;
    assert_eq!(r.status, 200);
    // The value reached storage sealed (the spans are beside, not instead of, the proxy's job).
    assert!(
        stored
            .lock()
            .unwrap()
            .iter()
            .all(|(_, body)| !contains(body, SSN.as_bytes()))
    );

    // Batches go out every 100 ms here (OTEL_BSP_SCHEDULE_DELAY).
    let deadline = Instant::now() + Duration::from_secs(15);
    let all = loop {
        let all: Vec<u8> = exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b.clone())
            .collect();
        let done = [b"data_key".as_slice(), b"transform", b"upstream"]
            .iter()
            .all(|n| contains(&all, n))
            && contains(&all, &hex(read_trace));
        if done {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "the collector did not get the spans: {} exports",
            exports.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (head, _) in exports.lock().unwrap().iter() {
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces "), "{head}");
        assert!(
            head.contains("content-type: application/x-protobuf"),
            "{head}"
        );
    }
    // Protobuf strings and ids are raw bytes in the export: the span names, the service, the
    // routes and both callers' trace ids are there...
    for needle in [
        b"request".as_slice(),
        b"data_key",
        b"transform",
        b"upstream",
        b"envelope-proxy",
        b"users",
        b"echo",
    ] {
        assert!(
            contains(&all, needle),
            "{}",
            String::from_utf8_lossy(needle)
        );
    }
    assert!(contains(&all, &hex(write_trace)), "the write's trace id");
    assert!(contains(&all, &hex(read_trace)), "the read's trace id");
    // ... and nothing the request carried that is not the proxy's to tell.
    for secret in [
        SSN,
        BEARER,
        "c2VjcmV0LXRva2VuLWZvci1vdGVs",
        QUERY_SECRET,
        "enc:",
    ] {
        assert!(!contains(&all, secret.as_bytes()), "{secret} was exported");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_endpoint_nothing_is_exported_and_bad_endpoints_are_refused() {
    let (upstream, _) = recording_server("200 OK", "application/json");
    let (collector, exports) = recording_server("200 OK", "");
    let proxy = Running::start(upstream, None);
    let http = Http::default();
    let r = http.get(&proxy.url("/echo/thing"), &[]).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(exports.lock().unwrap().is_empty(), "port {collector}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\notlp_endpoint = \"ftp://collector/v1/traces\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("server.otlp_endpoint"), "{text}");
}
