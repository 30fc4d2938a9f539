//! Hot reload of the real binary: the config file is polled (content hash, through symbolic
//! links as Kubernetes mounts ConfigMaps) and SIGHUP reloads at once; a reload under load fails
//! no request; a broken config is refused and the old one serves on (metric, `/readyz`
//! detail, log); SIGHUP reopens the audit file after logrotate renamed it; a reload that names
//! another certificate serves it to new connections.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Http, JsonServer};
use serde_json::{Value, json};

/// The users route on the local key `users`, in front of json-server; `fields` its list.
fn users_route(upstream: &str, fields: &str) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
key = "users"
fields = {fields}
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#
    )
}

/// A route that appears with a reload: json-server's `/page` document, passed through.
fn page_route(upstream: &str) -> String {
    format!(
        "\n[[route]]\nname = \"page\"\npath = \"/tenants/{{tenant}}/page\"\nupstream = \"{upstream}\"\npassthrough = true\n"
    )
}

/// The proxy binary, serving from a config file it polls every 100 ms (unless told otherwise).
struct Served {
    child: Option<Child>,
    port: u16,
    admin: u16,
    dir: tempfile::TempDir,
    /// The file the proxy was started with (`serve --config`).
    config: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Served {
    fn new() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        Served {
            child: None,
            port: common::free_port(),
            admin: common::free_port(),
            dir,
            config,
        }
    }

    fn d(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// A whole config: `server` goes into `[server]`, then `rest` (routes).
    fn render(&self, server: &str, rest: &str) -> String {
        let d = self.d();
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nauth = \"none\"\n{server}\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [keyring]\npath = \"{d}/keyring.json\"\nmaster_key_file = \"{d}/master.key\"\n\
             create_missing_keys = true\n\n\
             [audit]\npath = \"{d}/audit.log\"\n{rest}",
            port = self.port,
            admin = self.admin,
        )
    }

    /// Replace the config file by rename (as editors and deploy tools do).
    fn write(&self, text: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Start the binary on `self.config` (written beforehand) and wait until it is ready.
    async fn start(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("proxy.log")).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
                .args(["serve", "--config", self.config.to_str().unwrap()])
                .current_dir(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.admin)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the proxy did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.readyz().await.0, 200, "not ready: {}", self.log());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// `/readyz` (status and body; the admin listener is on loopback without a token, so the
    /// detail is shown).
    async fn readyz(&self) -> (u16, Value) {
        let r = Http::default().get(&self.admin_url("/readyz"), &[]).await;
        (r.status.as_u16(), r.json())
    }

    /// `(applied, refused)` reloads so far.
    async fn reloads(&self) -> (u64, u64) {
        let (_, body) = self.readyz().await;
        let r = &body["config_reload"];
        (
            r["applied"].as_u64().expect("config_reload.applied"),
            r["refused"].as_u64().expect("config_reload.refused"),
        )
    }

    /// Wait (at most 10 s) until `(applied, refused)` reach these counts.
    async fn reloads_reach(&self, applied: u64, refused: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.reloads().await;
            if now.0 >= applied && now.1 >= refused {
                assert_eq!(now, (applied, refused), "more reloads than expected");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "reloads are {now:?}, expected ({applied}, {refused}); log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = Http::default()
            .get(&self.admin_url("/metrics"), &[])
            .await
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([
                &format!("-{sig}"),
                &self.child.as_ref().unwrap().id().to_string(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

/// (a) Clients on loopback keep creating and reading records while the config is rewritten
/// four times (the users route's field list grows, routes appear): every response is 2xx, and
/// each change is seen by the next requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_fails_no_request() {
    let js = JsonServer::start();
    let mut p = Served::new();
    let server = "config_poll_ms = 100";
    let v1 = users_route(&js.url(), r#"["$.ssn"]"#);
    p.write(&p.render(server, &v1));
    p.start().await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..6 {
        let (stop, done, base) = (stop.clone(), done.clone(), p.url("/tenants/acme/users"));
        clients.push(tokio::spawn(async move {
            let http = Http::default();
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let doc = json!({ "id": format!("c{c}-{i}"), "ssn": format!("{c}-{i}") });
                let r = http.post_json(&base, &[], &doc).await;
                if !r.status.is_success() {
                    failures.push(format!("POST {}: {}", r.status, r.text()));
                    continue;
                }
                let r = http.get(&format!("{base}/c{c}-{i}"), &[]).await;
                if !r.status.is_success() || r.json()["ssn"] != doc["ssn"] {
                    failures.push(format!("GET {}: {}", r.status, r.text()));
                }
                done.fetch_add(2, Ordering::Relaxed);
            }
            failures
        }));
    }
    let http = Http::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        404,
        "no page route yet"
    );

    // v2: email is encrypted too.
    let v2 = users_route(&js.url(), r#"["$.ssn", "$.email"]"#);
    p.write(&p.render(server, &v2));
    p.reloads_reach(1, 0).await;
    let r = http
        .post_json(
            &p.url("/tenants/acme/users"),
            &[],
            &json!({ "id": "seen", "ssn": "x", "email": "a@example.com" }),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let stored = http
        .get(&format!("{}/users/seen", js.url()), &[])
        .await
        .json();
    assert!(
        stored["email"].as_str().unwrap().starts_with("enc:"),
        "email sealed after the reload: {stored}"
    );
    let r = http.get(&p.url("/tenants/acme/users/seen"), &[]).await;
    assert_eq!(r.json()["email"], "a@example.com");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // v3: the page route appears.
    let v3 = format!("{v2}{}", page_route(&js.url()));
    p.write(&p.render(server, &v3));
    p.reloads_reach(2, 0).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // v4 and v5: server settings that reload (timeouts), then a route goes away again.
    p.write(&p.render("config_poll_ms = 100\nupstream_timeout_ms = 20000", &v3));
    p.reloads_reach(3, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.write(&p.render(server, &v2));
    p.reloads_reach(4, 0).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        404,
        "the page route is gone"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let done = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(done > 200, "only {done} requests ran");
    assert_eq!(p.metric("envelope_proxy_config_reloads_total").await, 4.0);
    assert_eq!(
        p.metric("envelope_proxy_config_reload_failures_total")
            .await,
        0.0
    );
}

/// (b) A config that does not parse, then one that parses but names a key the keyring lacks:
/// both refused; the old config serves on; the failure is counted, logged and shown by
/// `/readyz` (which stays 200); then a good config is taken and the failure is cleared.
#[tokio::test]
async fn broken_config_is_refused_and_the_old_one_serves() {
    let js = JsonServer::start();
    let mut p = Served::new();
    let server = "config_poll_ms = 100";
    let v1 = users_route(&js.url(), r#"["$.ssn"]"#);
    p.write(&p.render(server, &v1));
    p.start().await;
    let http = Http::default();
    let users = p.url("/tenants/acme/users");
    let before = p
        .metric("envelope_proxy_config_last_reload_success_timestamp_seconds")
        .await;
    assert!(before > 1.0e9, "{before}");

    // Unknown key in a route: a config error.
    let broken = v1.replace("fields =", "fieldz = [\"$.x\"]\nfields =");
    p.write(&p.render(server, &format!("{broken}{}", page_route(&js.url()))));
    p.reloads_reach(0, 1).await;
    let (status, body) = p.readyz().await;
    assert_eq!(status, 200, "the old config serves: {body}");
    let error = body["config_reload"]["error"].as_str().unwrap().to_string();
    assert!(error.contains("fieldz"), "{error}");
    assert_eq!(body["config_reload"]["last_failed"], true);
    assert!(
        body["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("config reload refused")),
        "{body}"
    );
    assert_eq!(
        p.metric("envelope_proxy_config_reload_failures_total")
            .await,
        1.0
    );
    assert!(p.log().contains("config reload refused"), "{}", p.log());
    let r = http
        .post_json(&users, &[], &json!({ "id": "a", "ssn": "1" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        404,
        "nothing of the refused config applies"
    );

    // Valid TOML, but its key is an alias the keyring does not have: refused by the same key
    // check as at start.
    let missing = v1.replace("key = \"users\"", "key = \"alias/nope\"");
    p.write(&p.render(server, &missing));
    p.reloads_reach(0, 2).await;
    let (_, body) = p.readyz().await;
    assert!(
        body["config_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("alias/nope"),
        "{body}"
    );
    let r = http
        .post_json(&users, &[], &json!({ "id": "b", "ssn": "2" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Fixed: taken, and the failure no longer shown.
    p.write(&p.render(server, &format!("{v1}{}", page_route(&js.url()))));
    p.reloads_reach(1, 2).await;
    let (status, body) = p.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(body["config_reload"]["last_failed"], false, "{body}");
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        200
    );
    assert_eq!(p.metric("envelope_proxy_config_reloads_total").await, 1.0);
    assert_eq!(
        p.metric("envelope_proxy_config_reload_failures_total")
            .await,
        2.0
    );
    assert!(
        p.metric("envelope_proxy_config_last_reload_success_timestamp_seconds")
            .await
            >= before
    );
}

/// (c) With polling off, a changed file is not taken until SIGHUP; SIGHUP reloads and reopens
/// the audit file, which logrotate renamed: new lines go to a new file at the path, and the
/// rotated file and the new one form one chain.
#[tokio::test]
async fn sighup_reloads_and_reopens_the_audit_file() {
    let js = JsonServer::start();
    let mut p = Served::new();
    let server = "config_poll_ms = 0";
    let v1 = users_route(&js.url(), r#"["$.ssn"]"#);
    p.write(&p.render(server, &v1));
    p.start().await;
    let http = Http::default();
    let users = p.url("/tenants/acme/users");
    let log = p.dir.path().join("audit.log");
    let rotated = p.dir.path().join("audit.log.1");
    let r = http
        .post_json(&users, &[], &json!({ "id": "a", "ssn": "1" }))
        .await;
    assert_eq!(r.status, 201);
    wait_for(|| audit_lines(&log) >= 1, "the first audit line").await;

    // logrotate: rename, then SIGHUP.
    std::fs::rename(&log, &rotated).unwrap();
    p.write(&p.render(server, &format!("{v1}{}", page_route(&js.url()))));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        404,
        "no polling: the change waits for SIGHUP"
    );
    assert_eq!(p.reloads().await, (0, 0));
    p.signal("HUP");
    p.reloads_reach(1, 0).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        200
    );
    let r = http
        .post_json(&users, &[], &json!({ "id": "b", "ssn": "2" }))
        .await;
    assert_eq!(r.status, 201);
    wait_for(|| audit_lines(&log) >= 1, "an audit line in the new file").await;
    let old_lines = audit_lines(&rotated);
    assert!(old_lines >= 1);

    // One chain across the two files (under the proxy's own audit key).
    let joined = p.dir.path().join("joined.log");
    let mut all = std::fs::read(&rotated).unwrap();
    all.extend(std::fs::read(&log).unwrap());
    std::fs::write(&joined, all).unwrap();
    let config = envelope_proxy::config::load(&p.config).unwrap();
    let keyring = envelope_proxy::keys::keyring::Keyring::open(
        "local",
        &config.keyring.as_ref().unwrap().path,
        &config.keyring.as_ref().unwrap().master_key,
    )
    .unwrap();
    let key = envelope_proxy::audit::key_for(&config, &keyring).unwrap();
    let report =
        envelope_proxy::audit::verify(&joined, Some(&key), None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.keyed, old_lines + audit_lines(&log));

    // Still alive after SIGHUP (its default action would end it).
    assert!(p.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

fn audit_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (d) A ConfigMap volume: `config.toml -> ..data/config.toml`, `..data -> ..v1`; the kubelet
/// swaps `..data` to a new directory atomically. Neither link's mtime changes; the poll sees
/// the new content.
#[tokio::test]
async fn configmap_symlink_swap_is_picked_up_by_polling() {
    use std::os::unix::fs::symlink;
    let js = JsonServer::start();
    let mut p = Served::new();
    let cm = p.dir.path().join("cm");
    std::fs::create_dir_all(cm.join("..v1")).unwrap();
    std::fs::create_dir_all(cm.join("..v2")).unwrap();
    let server = "config_poll_ms = 100";
    let v1 = users_route(&js.url(), r#"["$.ssn"]"#);
    std::fs::write(cm.join("..v1/config.toml"), p.render(server, &v1)).unwrap();
    symlink("..v1", cm.join("..data")).unwrap();
    symlink("..data/config.toml", cm.join("config.toml")).unwrap();
    p.config = cm.join("config.toml");
    p.start().await;
    let http = Http::default();
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        404
    );

    std::fs::write(
        cm.join("..v2/config.toml"),
        p.render(server, &format!("{v1}{}", page_route(&js.url()))),
    )
    .unwrap();
    symlink("..v2", cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::fs::remove_dir_all(cm.join("..v1")).unwrap();
    p.reloads_reach(1, 0).await;
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        200
    );
    // The same content again (another swap, nothing changed): no reload.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(p.reloads().await, (1, 0));
}

/// (e) A reload that points the listener to another certificate: new TLS connections get it.
#[tokio::test]
async fn reload_swaps_the_certificate() {
    let mut p = Served::new();
    let pki = common::pki::Pki::new(p.dir.path(), "reload");
    let (cert_a, key_a) = common::pki::write_leaf(p.dir.path(), "a", &pki.server());
    let leaf_b = pki.server();
    let (cert_b, key_b) = common::pki::write_leaf(p.dir.path(), "b", &leaf_b);
    let tls = |cert: &Path, key: &Path| {
        format!(
            "config_poll_ms = 100\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let rest = "\n[[route]]\nname = \"p\"\npath = \"/p/{id}\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n";
    p.write(&p.render(&tls(&cert_a, &key_a), rest));
    p.start().await;
    let client = common::pki::client_config(&pki.ca_file("reload"), None);
    let served_a = served_cert(p.port, client.clone()).await;
    assert_ne!(served_a, leaf_b.der.to_vec());

    p.write(&p.render(&tls(&cert_b, &key_b), rest));
    p.reloads_reach(1, 0).await;
    assert_eq!(
        served_cert(p.port, client.clone()).await,
        leaf_b.der.to_vec()
    );

    // A key that does not match the certificate: refused, b stays.
    p.write(&p.render(&tls(&cert_a, &key_b), rest));
    p.reloads_reach(1, 1).await;
    assert_eq!(served_cert(p.port, client).await, leaf_b.der.to_vec());
}

/// The certificate a new TLS connection to `port` is served (verified against the test CA).
async fn served_cert(port: u16, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A reload that changes a restart-only setting (the listen address) keeps the running value,
/// says so naming the key, and applies the rest.
#[tokio::test]
async fn restart_only_settings_keep_their_value_and_the_rest_applies() {
    let js = JsonServer::start();
    let mut p = Served::new();
    let v1 = users_route(&js.url(), r#"["$.ssn"]"#);
    p.write(&p.render("config_poll_ms = 100", &v1));
    p.start().await;
    let other = common::free_port();
    let text = p
        .render(
            "config_poll_ms = 100",
            &format!("{v1}{}", page_route(&js.url())),
        )
        .replace(
            &format!("listen = \"127.0.0.1:{}\"", p.port),
            &format!("listen = \"127.0.0.1:{other}\""),
        );
    p.write(&text);
    p.reloads_reach(1, 0).await;
    let http = Http::default();
    assert_eq!(
        http.get(&p.url("/tenants/acme/page"), &[]).await.status,
        200,
        "the new route is served on the running listener"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
        "no listener on the new address"
    );
    let log = p.log();
    assert!(
        log.contains("needs a restart") && log.contains("server.listen"),
        "{log}"
    );
}
