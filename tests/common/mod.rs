//! Test harness: real peers (json-server) started per test, the proxy started in-process on
//! 127.0.0.1:0, and a small HTTP client.
#![allow(dead_code)]

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
        std::fs::write(dir.path().join("db.json"), r#"{"users": [], "page": {}}"#).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
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
            addr: running.addr,
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

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    pub fn state(&self) -> &envelope_proxy::pipeline::AppState {
        &self.running.as_ref().unwrap().state
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
