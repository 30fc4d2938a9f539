//! Test harness: real peers (json-server) started per test, the proxy started in-process on
//! 127.0.0.1:0, and a small HTTP client.
#![allow(dead_code)]

pub mod jwt;
pub mod pki;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// json-server 0.17 on a temp db, with `/tenants/:tenant/<resource>` rewritten to `/<resource>`.
pub struct JsonServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl JsonServer {
    pub fn binary() -> PathBuf {
        let bin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/node_modules/.bin/json-server");
        assert!(
            bin.exists(),
            "json-server is not installed at {}: run scripts/test.sh (it runs `npm ci` in tests/peers)",
            bin.display()
        );
        bin
    }

    pub fn start() -> JsonServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("db.json"),
            r#"{"users": [], "page": {}, "envelope-keys": []}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("routes.json"),
            r#"{"/tenants/:tenant/users": "/users", "/tenants/:tenant/users/:id": "/users/:id", "/tenants/:tenant/page": "/page"}"#,
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(Self::binary())
            .arg(dir.path().join("db.json"))
            .args(["--routes", dir.path().join("routes.json").to_str().unwrap()])
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--quiet",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start json-server");
        let server = JsonServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "json-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The store's file on disk: what reached storage.
    pub fn db_file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("db.json")).unwrap()
    }
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy running in this process.
pub struct Proxy {
    pub running: Option<envelope_proxy::server::Running>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Proxy {
    /// Start with `routes` (TOML for the [[route]] tables) and extra top-level TOML.
    /// `{DIR}` in either is replaced with the proxy's temp directory.
    pub async fn start(routes: &str, extra: &str) -> Proxy {
        Self::start_with_files(routes, extra, &[]).await
    }

    /// As [`start`](Self::start), with secret files (mode 0600) written into the proxy's
    /// directory first: `(name, contents)`, named in the config as `{DIR}/name`.
    pub async fn start_with_files(routes: &str, extra: &str, files: &[(&str, &str)]) -> Proxy {
        // TEST_LOG=debug shows the proxy's logs (off by default).
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            s3::secret_file(dir.path(), name, contents);
        }
        Self::start_in(dir, routes, extra).await
    }

    /// As [`start`](Self::start), in a directory prepared beforehand (a keyring made there
    /// first: `{dir}/keyring.json`, master key `{dir}/master.key`).
    pub async fn start_in(dir: tempfile::TempDir, routes: &str, extra: &str) -> Proxy {
        let d = dir.path().display().to_string();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
{extra_server}

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

[audit]
path = "{d}/audit.log"

{routes}
"#,
            extra_server = extra.replace("{DIR}", &d),
            routes = routes.replace("{DIR}", &d),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = envelope_proxy::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let running = envelope_proxy::server::start(config).await.unwrap();
        Proxy {
            addr: running.addr.expect("the test proxy listens on TCP"),
            running: Some(running),
            dir,
            config_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Check the audit log's keyed chain with the proxy's own audit key.
    pub fn verify_audit(&self) -> envelope_proxy::audit::Report {
        let config = envelope_proxy::config::load(&self.config_path).unwrap();
        let keyring = envelope_proxy::keys::keyring::Keyring::open(
            "local",
            &config.keyring.as_ref().unwrap().path,
            &config.keyring.as_ref().unwrap().master_key,
        )
        .unwrap();
        let key = envelope_proxy::audit::key_for(&config, &keyring).unwrap();
        envelope_proxy::audit::verify(&self.dir.path().join("audit.log"), Some(&key), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The newest audit line for `path` (lines are written off the request path: wait up to
    /// 2 s for one). With several requests to one path, use [`audit_for`](Self::audit_for).
    pub async fn audit_of(&self, path: &str) -> Value {
        self.audit_where(|l| l["path"] == path, path).await
    }

    /// The newest audit line for `path` with `status`.
    pub async fn audit_for(&self, path: &str, status: u16) -> Value {
        self.audit_where(|l| l["path"] == path && l["status"] == status, path)
            .await
    }

    async fn audit_where(&self, found: impl Fn(&Value) -> bool, what: &str) -> Value {
        for _ in 0..100 {
            if let Some(l) = self.audit_lines().into_iter().rev().find(|l| found(l)) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no audit line for {what}")
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    pub fn state(&self) -> std::sync::Arc<envelope_proxy::pipeline::AppState> {
        self.running.as_ref().unwrap().state()
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Http {
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = self.client.request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }

    pub async fn post_json(&self, url: &str, headers: &[(&str, &str)], doc: &Value) -> Reply {
        let mut h = headers.to_vec();
        h.push(("content-type", "application/json"));
        self.send(Method::POST, url, &h, doc.to_string()).await
    }

    pub async fn put_json(&self, url: &str, doc: &Value) -> Reply {
        self.send(
            Method::PUT,
            url,
            &[("content-type", "application/json")],
            doc.to_string(),
        )
        .await
    }
}

/// moto server on a free port, from the test peers' virtualenv.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers/venv/bin/moto_server");
        assert!(
            bin.exists(),
            "moto server is not installed at {}: run scripts/test.sh (it sets up tests/peers/venv)",
            bin.display()
        );
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freeze or thaw the process: a backend that hangs, then comes back with its state.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    #[cfg(feature = "aws-kms")]
    pub fn admin(&self) -> aws_sdk_kms::Client {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let conf = aws_sdk_kms::config::Builder::new()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .http_client(http)
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// A symmetric key with an alias; returns its ARN.
    #[cfg(feature = "aws-kms")]
    pub async fn create_key(&self, alias: &str) -> String {
        let kms = self.admin();
        let key = kms.create_key().send().await.unwrap();
        let meta = key.key_metadata().unwrap();
        kms.create_alias()
            .alias_name(alias)
            .target_key_id(meta.key_id())
            .send()
            .await
            .unwrap();
        meta.arn().unwrap().to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// S3 gateway fixtures shared by the S3 client suites.
/// Each request a [`recording_server`] got: its head and its body.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An HTTP server that answers every request with `status` (and `{}` when given a content
/// type, else an empty body), keeping each request's head and body.
pub fn recording_server(status: &'static str, content_type: &'static str) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let keep = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = std::io::Read::read_exact(&mut reader, &mut body);
                    keep.lock().unwrap().push((head, body));
                    let mut w = stream.try_clone().unwrap();
                    let reply = if content_type.is_empty() {
                        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n")
                    } else {
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: 2\r\n\r\n{{}}"
                        )
                    };
                    let _ = std::io::Write::write_all(&mut w, reply.as_bytes());
                }
            });
        }
    });
    (port, seen)
}

pub mod s3 {
    use std::path::{Path, PathBuf};

    use super::{Moto, Proxy};

    pub const CLIENT_KEY: &str = "AKIAAPPEXAMPLE";
    pub const CLIENT_SECRET: &str = "app-secret-for-tests-only";

    /// A presigned URL made by boto3 for the test client (path-style, against `endpoint`):
    /// `version` is botocore's `s3v4` or `s3` (SigV2), `method` a client method name.
    pub fn presign(endpoint: &str, version: &str, method: &str, bucket: &str, key: &str) -> String {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/venv/bin/python");
        let script = format!(
            "import boto3; from botocore.config import Config\n\
             c = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{CLIENT_KEY}', \
             aws_secret_access_key='{CLIENT_SECRET}', region_name='us-east-1', \
             config=Config(signature_version='{version}', s3={{'addressing_style': 'path'}}))\n\
             print(c.generate_presigned_url('{method}', Params={{'Bucket': '{bucket}', 'Key': '{key}'}}, ExpiresIn=300))"
        );
        let out = std::process::Command::new(&python)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, value).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// The proxy with one S3 route in front of `moto` (key context: the bucket).
    pub async fn gateway(moto: &Moto, secrets: &Path, server: &str) -> Proxy {
        gateway_with(moto, secrets, server, "").await
    }

    /// As [`gateway`], with extra `[route.s3]` settings.
    pub async fn gateway_with(moto: &Moto, secrets: &Path, server: &str, s3_extra: &str) -> Proxy {
        gateway_at(&moto.endpoint(), secrets, server, s3_extra).await
    }

    /// The gateway in front of any S3 endpoint whose credentials are testing/testing.
    pub async fn gateway_at(upstream: &str, secrets: &Path, server: &str, s3_extra: &str) -> Proxy {
        let routes = route("objects", "/**", upstream, secrets, s3_extra);
        Proxy::start(&routes, server).await
    }

    /// An S3 route (`name`, `path`) to `upstream` (credentials testing/testing) with the test
    /// client, key `objects` and the bucket as key context; secrets are written to `secrets`.
    pub fn route(name: &str, path: &str, upstream: &str, secrets: &Path, s3_extra: &str) -> String {
        format!(
            r#"
[[route]]
name = "{name}"
kind = "s3"
path = "{path}"
upstream = "{upstream}"
key = "objects"
context = {{ bucket = "{{s3.bucket}}" }}
[route.s3]
region = "us-east-1"
{s3_extra}
upstream_access_key_id_file = "{ak}"
upstream_secret_access_key_file = "{sk}"
[[route.s3.client]]
access_key_id = "{CLIENT_KEY}"
secret_access_key_file = "{client}"
identity = "app"
"#,
            ak = secret_file(secrets, "up-ak", "testing").display(),
            sk = secret_file(secrets, "up-sk", "testing").display(),
            client = secret_file(secrets, "client-sk", CLIENT_SECRET).display(),
        )
    }

    /// GET an object straight from storage (signed as moto's own user): what reached it.
    pub async fn raw_get(
        moto: &Moto,
        bucket: &str,
        encoded_key: &str,
    ) -> (http::StatusCode, bytes::Bytes) {
        use http_body_util::BodyExt;
        let creds = envelope_proxy::s3::sign::UpstreamCredentials::new(
            "testing".into(),
            zeroize::Zeroizing::new("testing".to_string()),
        );
        let mut req = http::Request::get(format!("{}/{bucket}/{encoded_key}", moto.endpoint()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        envelope_proxy::s3::sign::sign_request(&mut req, &creds, "us-east-1").unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// Run a client program to completion (off the runtime's threads); panics with its output
    /// on failure, naming the install step when the program is missing.
    pub async fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("SSL_CERT_FILE");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = match cmd.output().await {
            Ok(o) => o,
            Err(e) => panic!("{program} is not available ({e}): scripts/test.sh installs it"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{stdout}\n{stderr}"
        );
        if envs.iter().any(|(k, _)| *k == "CAPTURE_STDERR") {
            return format!("{stdout}{stderr}");
        }
        stdout
    }
}

/// s3s-fs 0.14.1 (scripts/test.sh installs it into tests/peers/cargo): an S3 server that checks
/// SigV4 and checksums, unlike moto. Credentials testing/testing.
pub struct S3sFs {
    child: Child,
    pub port: u16,
    _root: tempfile::TempDir,
}

impl S3sFs {
    pub fn start() -> S3sFs {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/cargo/bin/s3s-fs");
        assert!(
            bin.exists(),
            "s3s-fs is not installed at {}: run scripts/test.sh",
            bin.display()
        );
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "testing", "--secret-key", "testing"])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3sFs {
            child,
            port,
            _root: root,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
