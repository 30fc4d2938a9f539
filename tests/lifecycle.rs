//! The key lifecycle of the local keyring, end to end (issue 11): aliases re-pointed with old
//! data still readable, scheduled deletion (refusals, the alarm metric, audit lines, destruction
//! after the window), imported key material (openssl-wrapped, expiry, re-import of the same
//! bytes only) and scheduled rotation. A proxy in this process in front of json-server (and
//! moto for S3); the CLI binary changes the keyring as an operator would; the running proxy
//! picks changes up within a second. Time is injected through `Keyring::apply_due(now)`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Http, JsonServer, Proxy};
use envelope_proxy::keys::keyring::{DAY, KeyState, Keyring, MasterKeySource};
use serde_json::{Value, json};

fn cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, out) = cli(dir, args);
    assert!(success, "{args:?}: {out}");
    out
}

/// `keys import byok --material M --token T [--expires E]`.
fn import(dir: &Path, material: &Path, token: &Path, expires: Option<&str>) -> (bool, String) {
    let mut args = vec![
        "keys",
        "import",
        "byok",
        "--material",
        material.to_str().unwrap(),
        "--token",
        token.to_str().unwrap(),
    ];
    if let Some(e) = expires {
        args.extend(["--expires", e]);
    }
    cli(dir, &args)
}

fn keyring(dir: &Path) -> Arc<Keyring> {
    Keyring::open(
        "local",
        &dir.join("keyring.json"),
        &MasterKeySource::File(dir.join("master.key")),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn route(js: &JsonServer, key: &str) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{}"
key = "{key}"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#,
        js.url()
    )
}

/// The key names in the EDKs of user `id`'s stored `ssn` token.
fn stored_keys(js: &JsonServer, id: &str) -> Vec<(String, u32)> {
    let db: Value = serde_json::from_str(&js.db_file()).unwrap();
    let user = db["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == id)
        .unwrap_or_else(|| panic!("no user {id} stored: {db}"));
    let token = user["ssn"].as_str().unwrap();
    assert!(token.starts_with("enc:"), "stored in clear: {token}");
    let parsed = envelope_proxy::envelope::token::ParsedToken::parse(token).unwrap();
    parsed
        .header
        .edks
        .iter()
        .map(|e| (e.key_id.clone(), e.key_version))
        .collect()
}

async fn stored(js: &JsonServer, id: &str) {
    for _ in 0..100 {
        if js.db_file().contains(&format!("\"{id}\"")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} never reached json-server");
}

async fn post(http: &Http, proxy: &Proxy, id: &str, ssn: &str) -> common::Reply {
    http.post_json(
        &format!("http://{}/tenants/acme/users", proxy.addr),
        &[],
        &json!({ "id": id, "ssn": ssn }),
    )
    .await
}

async fn get(http: &Http, proxy: &Proxy, id: &str) -> common::Reply {
    http.get(
        &format!("http://{}/tenants/acme/users/{id}", proxy.addr),
        &[],
    )
    .await
}

/// Whether new writes (`v0`, `v1`, ...) come to be sealed under `key` version `version` within
/// about five seconds (the proxy reloads the keyring every second).
async fn writes_reach(
    http: &Http,
    proxy: &Proxy,
    js: &JsonServer,
    key: &str,
    version: u32,
) -> bool {
    for i in 0..50 {
        let id = format!("v{i}");
        assert_eq!(post(http, proxy, &id, "222-22-2222").await.status, 201);
        stored(js, &id).await;
        if stored_keys(js, &id) == [(key.to_string(), version)] {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Wait until the proxy answers `id` with `status` (it reloads the keyring every second).
async fn until_status(http: &Http, proxy: &Proxy, id: &str, status: u16) -> common::Reply {
    for _ in 0..60 {
        let r = get(http, proxy, id).await;
        if r.status.as_u16() == status {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = get(http, proxy, id).await;
    panic!(
        "GET {id}: {} {}, not {status}",
        r.status,
        String::from_utf8_lossy(&r.body)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_repointed_keeps_old_data_readable() {
    let js = JsonServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kr = keyring(dir.path());
    kr.create_key("users-2026").unwrap();
    kr.create_key("users-2027").unwrap();
    kr.set_alias("alias/users", "users-2026", false).unwrap();
    let proxy = Proxy::start_in(dir, &route(&js, "alias/users"), "").await;
    let d = proxy.dir.path().to_path_buf();
    let http = Http::default();

    let r = post(&http, &proxy, "u1", "111-11-1111").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    stored(&js, "u1").await;
    // The EDK names the key, never the alias.
    assert_eq!(stored_keys(&js, "u1"), [("users-2026".to_string(), 1)]);

    let out = ok(
        &d,
        &["keys", "alias", "update", "alias/users", "users-2027"],
    );
    assert!(out.contains("alias/users -> users-2027"), "{out}");
    // New writes use the new key once the proxy has reloaded (its cached data key for the
    // alias is dropped with the change).
    assert!(
        writes_reach(&http, &proxy, &js, "users-2027", 1).await,
        "new writes never used the re-pointed alias"
    );
    // Both read back.
    assert_eq!(get(&http, &proxy, "u1").await.json()["ssn"], "111-11-1111");
    let list = ok(&d, &["keys", "alias", "list"]);
    assert!(
        list.contains("alias/users") && list.contains("users-2027"),
        "{list}"
    );
    let described: Value =
        serde_json::from_str(&ok(&d, &["keys", "describe", "users-2027", "--json"])).unwrap();
    assert_eq!(described["aliases"], json!(["alias/users"]));
    // Last use reaches the usage file (the proxy writes it at most once a minute: the first
    // use of users-2026 went out at once).
    let mut last_used = Value::Null;
    for _ in 0..50 {
        let d2: Value =
            serde_json::from_str(&ok(&d, &["keys", "describe", "users-2026", "--json"])).unwrap();
        if d2["versions"][0]["last_used"].is_string() {
            last_used = d2["last_used"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_used.is_string(), "last use is never recorded");
    // Bad input: an alias to a missing key, a key named like an alias, a malformed alias.
    let (success, out) = cli(&d, &["keys", "alias", "create", "alias/x", "nope"]);
    assert!(!success && out.contains("not found"), "{out}");
    let (success, out) = cli(&d, &["keys", "create", "alias/sneaky"]);
    assert!(!success && out.contains("alias"), "{out}");
    let (success, out) = cli(&d, &["keys", "alias", "create", "users", "users-2026"]);
    assert!(!success && out.contains("invalid alias"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_pending_deletion_is_refused_counted_and_then_destroyed() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&route(&js, "users"), "").await;
    let d = proxy.dir.path().to_path_buf();
    let http = Http::default();
    assert_eq!(post(&http, &proxy, "u1", "123-45-6789").await.status, 201);
    stored(&js, "u1").await;
    assert_eq!(get(&http, &proxy, "u1").await.status, 200);

    // Bad input first: a waiting period out of range changes nothing.
    for days in ["6", "31", "0"] {
        let (success, out) = cli(&d, &["keys", "schedule-deletion", "users", "--days", days]);
        assert!(!success && out.contains("7 to 30 days"), "{days}: {out}");
    }
    let out = ok(&d, &["keys", "schedule-deletion", "users", "--days", "7"]);
    assert!(out.contains("pending deletion"), "{out}");

    // Reads and writes are refused with the state named, audited and counted.
    let r = until_status(&http, &proxy, "u1", 409).await;
    let body = r.json();
    assert_eq!(body["error"]["code"], "key_pending_deletion", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("pending deletion"), "{message}");
    assert!(message.contains("scheduled for deletion on"), "{message}");
    let w = post(&http, &proxy, "u2", "999-99-9999").await;
    assert_eq!(w.status, 409, "{}", String::from_utf8_lossy(&w.body));
    assert!(
        !js.db_file().contains("999-99-9999"),
        "nothing reaches storage"
    );
    let line = proxy.audit_for("/tenants/acme/users/u1", 409).await;
    assert_eq!(line["outcome"], "error", "{line}");
    assert!(
        line.to_string().contains("pending_deletion"),
        "the audit line names the state: {line}"
    );
    let counted = proxy
        .state()
        .metrics
        .key_state_refusals_of("users", "pending_deletion");
    assert!(counted >= 2, "the alarm counter: {counted}");
    let metrics = proxy.state().metrics.encode();
    assert!(
        metrics.contains(
            "envelope_proxy_key_state_refusals_total{key=\"users\",state=\"pending_deletion\"}"
        ),
        "{metrics}"
    );

    // Cancelled: disabled (as in KMS), then enabled: readable again.
    let out = ok(&d, &["keys", "cancel-deletion", "users"]);
    assert!(out.contains("disabled"), "{out}");
    let r = until_status(&http, &proxy, "u1", 403).await;
    assert_eq!(r.json()["error"]["code"], "key_disabled");
    ok(&d, &["keys", "enable", "users"]);
    assert_eq!(
        until_status(&http, &proxy, "u1", 200).await.json()["ssn"],
        "123-45-6789"
    );

    // Scheduled again; before the date nothing is destroyed, after it the material is gone.
    ok(&d, &["keys", "schedule-deletion", "users", "--days", "7"]);
    let kr = keyring(&d);
    assert!(kr.apply_due(now() + 6 * DAY).unwrap().is_empty());
    let done = kr.apply_due(now() + 7 * DAY + 1).unwrap();
    assert_eq!(done, ["destroyed root key users"]);
    let r = until_status(&http, &proxy, "u1", 409).await;
    assert_eq!(r.json()["error"]["code"], "key_destroyed");
    let described: Value =
        serde_json::from_str(&ok(&d, &["keys", "describe", "users", "--json"])).unwrap();
    assert_eq!(described["state"], "destroyed");
    assert_eq!(described["versions"], json!([]));
    // Nothing brings it back: not enable, not cancel, not a new key of the same name.
    assert!(!cli(&d, &["keys", "enable", "users"]).0);
    assert!(!cli(&d, &["keys", "cancel-deletion", "users"]).0);
    assert!(!cli(&d, &["keys", "create", "users"]).0);
    // The stored token is still there, unreadable for good.
    assert!(js.db_file().contains("enc:v1:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn imported_key_material_byok() {
    let js = JsonServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    // The key is made through the CLI; its route needs it usable to start, so it is imported
    // before the proxy starts (which then writes its own config.toml), then serves with it.
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"{0}/keyring.json\"\nmaster_key_file = \"{0}/master.key\"\n\
         [[route]]\nname = \"health\"\npath = \"/health\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n",
        d.display()
    );
    std::fs::write(d.join("config.toml"), cfg).unwrap();
    let out = ok(&d, &["keys", "create", "byok", "--origin", "external"]);
    assert!(out.contains("pending import"), "{out}");
    let params = d.join("params");
    ok(
        &d,
        &[
            "keys",
            "import-params",
            "byok",
            "--out",
            params.to_str().unwrap(),
        ],
    );
    let pem = std::fs::read_to_string(params.join("wrapping-key.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");

    let material = d.join("key.bin");
    std::fs::write(&material, [7u8; 32]).unwrap();
    let wrap = |out: &Path, params: &Path| {
        let status = std::process::Command::new("openssl")
            .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
            .arg(params.join("wrapping-key.pem"))
            .args([
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha256",
                "-in",
            ])
            .arg(&material)
            .arg("-out")
            .arg(out)
            .status()
            .expect("openssl is installed (Debian package openssl)");
        assert!(status.success());
    };
    let wrapped = d.join("wrapped.bin");
    wrap(&wrapped, &params);
    let token = params.join("import-token.bin");
    // A token for another key, or a tampered token, is refused.
    let mut bad = std::fs::read(&token).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(d.join("bad-token.bin"), &bad).unwrap();
    let (success, out) = import(&d, &wrapped, &d.join("bad-token.bin"), None);
    assert!(!success && out.contains("does not verify"), "{out}");
    let expires = "2099-06-30";
    let (success, out) = import(&d, &wrapped, &token, Some(expires));
    assert!(
        success && out.contains("imported key material into byok"),
        "{out}"
    );
    // Parameters are used once.
    let (success, out) = import(&d, &wrapped, &token, None);
    assert!(!success && out.contains("used already"), "{out}");
    // Imported keys are not rotated by the proxy.
    let (success, out) = cli(&d, &["keys", "rotate", "byok"]);
    assert!(!success && out.contains("imported"), "{out}");

    let proxy = Proxy::start_in(dir, &route(&js, "byok"), "").await;
    let http = Http::default();
    assert_eq!(post(&http, &proxy, "u1", "555-55-5555").await.status, 201);
    stored(&js, "u1").await;
    assert_eq!(stored_keys(&js, "u1"), [("byok".to_string(), 1)]);
    assert_eq!(get(&http, &proxy, "u1").await.json()["ssn"], "555-55-5555");

    // The material expires: the key waits for it again, and nothing decrypts meanwhile.
    let kr = keyring(&d);
    let done = kr.apply_due(2_000_000_000_000).unwrap();
    assert!(done[0].contains("expired"), "{done:?}");
    assert_eq!(
        kr.list().iter().find(|k| k.name == "byok").unwrap().state,
        KeyState::PendingImport
    );
    let r = until_status(&http, &proxy, "u1", 409).await;
    assert_eq!(r.json()["error"]["code"], "key_pending_import");

    // Different bytes are refused; the same bytes are accepted and the old data reads again.
    let params2 = d.join("params2");
    ok(
        &d,
        &[
            "keys",
            "import-params",
            "byok",
            "--out",
            params2.to_str().unwrap(),
        ],
    );
    std::fs::write(&material, [8u8; 32]).unwrap();
    let other = d.join("other.bin");
    wrap(&other, &params2);
    let (success, out) = import(&d, &other, &params2.join("import-token.bin"), None);
    assert!(!success && out.contains("not the key material"), "{out}");
    std::fs::write(&material, [7u8; 32]).unwrap();
    let again = d.join("again.bin");
    wrap(&again, &params2);
    let (success, out) = import(&d, &again, &params2.join("import-token.bin"), None);
    assert!(success, "{out}");
    assert_eq!(
        until_status(&http, &proxy, "u1", 200).await.json()["ssn"],
        "555-55-5555"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_rotation_and_retiring_a_version() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&route(&js, "users"), "").await;
    let d = proxy.dir.path().to_path_buf();
    let http = Http::default();
    assert_eq!(post(&http, &proxy, "u1", "123-45-6789").await.status, 201);
    stored(&js, "u1").await;

    for bad in ["89", "2561"] {
        let (success, out) = cli(&d, &["keys", "set-rotation", "users", "--days", bad]);
        assert!(!success && out.contains("90 to 2560"), "{out}");
    }
    ok(&d, &["keys", "set-rotation", "users", "--days", "90"]);
    let described: Value =
        serde_json::from_str(&ok(&d, &["keys", "describe", "users", "--json"])).unwrap();
    assert_eq!(described["rotation_period_days"], 90);
    assert!(described["next_rotation"].is_string(), "{described}");
    let kr = keyring(&d);
    assert!(kr.apply_due(now() + 89 * DAY).unwrap().is_empty());
    assert_eq!(
        kr.apply_due(now() + 90 * DAY + 1).unwrap(),
        ["rotated root key users (scheduled)"]
    );
    let described: Value =
        serde_json::from_str(&ok(&d, &["keys", "describe", "users", "--json"])).unwrap();
    assert_eq!(described["current_version"], 2, "{described}");
    // New writes use version 2 once the proxy reloaded; version 1 still decrypts.
    assert!(writes_reach(&http, &proxy, &js, "users", 2).await);
    assert_eq!(get(&http, &proxy, "u1").await.json()["ssn"], "123-45-6789");

    // Retiring version 1 is refused while the proxy still uses it (its usage notes), and the
    // current version never.
    let mut refused = None;
    for _ in 0..30 {
        let (success, out) = cli(&d, &["keys", "retire-version", "users", "--version", "1"]);
        if !success && out.contains("was used on") {
            refused = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        refused.is_some(),
        "retiring a version in use was not refused"
    );
    let (success, out) = cli(&d, &["keys", "retire-version", "users", "--version", "2"]);
    assert!(!success && out.contains("current version"), "{out}");
}

/// The S3 gateway answers a key pending deletion with the KMS error S3 clients know.
#[tokio::test(flavor = "multi_thread")]
async fn s3_reads_of_a_key_pending_deletion_are_refused() {
    let moto = common::Moto::start();
    let secrets = tempfile::tempdir().unwrap();
    let proxy = common::s3::gateway(&moto, secrets.path(), "").await;
    let d = proxy.dir.path().to_path_buf();
    let endpoint = format!("http://{}", proxy.addr);
    let http = Http::default();
    // Write through the gateway with boto3 (the test client).
    common::s3::run(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers/venv/bin/python")
            .display()
            .to_string(),
        &[
            "-c",
            &format!(
                "import boto3; c = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{}', \
                 aws_secret_access_key='{}', region_name='us-east-1'); c.create_bucket(Bucket='lifecycle'); \
                 c.put_object(Bucket='lifecycle', Key='k', Body=b'object body')",
                common::s3::CLIENT_KEY,
                common::s3::CLIENT_SECRET
            ),
        ],
        &[],
    )
    .await;
    ok(&d, &["keys", "schedule-deletion", "objects", "--days", "7"]);
    let url = common::s3::presign(&endpoint, "s3v4", "get_object", "lifecycle", "k");
    let mut last = None;
    for _ in 0..50 {
        let r = http.get(&url, &[]).await;
        if r.status == 409 {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = last.expect("the gateway never refused the key pending deletion");
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        text.contains("<Code>KMS.KMSInvalidStateException</Code>"),
        "{text}"
    );
    assert!(text.contains("pending deletion"), "{text}");
    assert!(
        proxy
            .state()
            .metrics
            .key_state_refusals_of("objects", "pending_deletion")
            >= 1
    );
}
