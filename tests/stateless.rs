//! Stateless KMS-only pods: without `[keyring]`, a proxy whose keys are all in AWS KMS (moto)
//! serves, and writes nothing to disk (its working directory and home stay empty); what would
//! need the keyring is a config error that names the fix.

mod common;

#[cfg(feature = "aws-kms")]
#[tokio::test]
async fn kms_only_proxy_without_keyring_serves_and_writes_nothing() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use common::{Http, JsonServer, Moto};
    use serde_json::json;

    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    // The config and credentials: read only.
    let etc = tempfile::tempdir().unwrap();
    let creds = etc.path().join("credentials");
    std::fs::write(
        &creds,
        "[moto]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let (port, admin) = (common::free_port(), common::free_port());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"

[admin]
listen = "127.0.0.1:{admin}"

[backend.kms]
kind = "aws-kms"
region = "us-east-1"
endpoint = "{endpoint}"
profile = "moto"
credentials_file = "{creds}"

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
keys = ["kms:alias/users"]
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#,
        endpoint = moto.endpoint(),
        creds = creds.display(),
        upstream = js.url(),
    );
    let config_path = etc.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let before: Vec<_> = listing(etc.path());

    // The working directory and home: must stay empty (read-only for a non-root user too).
    let work = tempfile::tempdir().unwrap();
    set_mode(work.path(), 0o555);
    let mut child = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .current_dir(work.path())
        .env("HOME", work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the proxy exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let http = Http::default();
    let base = format!("http://127.0.0.1:{port}/tenants/acme/users");
    let r = http
        .post_json(&base, &[], &json!({ "id": "u1", "ssn": "123-45-6789" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let stored = http
        .get(&format!("{}/users/u1", js.url()), &[])
        .await
        .json();
    let token = stored["ssn"].as_str().unwrap();
    assert!(
        token.starts_with("enc:"),
        "sealed under the KMS key: {stored}"
    );
    let r = http.get(&format!("{base}/u1"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ssn"], "123-45-6789");
    let r = http
        .get(&format!("http://127.0.0.1:{admin}/readyz"), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let _ = child.kill();
    let _ = child.wait();
    set_mode(work.path(), 0o755);
    assert_eq!(
        listing(work.path()),
        Vec::<String>::new(),
        "nothing written to the working directory or home"
    );
    assert_eq!(
        listing(etc.path()),
        before,
        "nothing written beside the config"
    );
}

#[cfg(feature = "aws-kms")]
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(feature = "aws-kms")]
fn set_mode(dir: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Without `[keyring]`, each thing that needs it is refused with its fix, all at once.
#[test]
fn without_keyring_what_needs_it_is_a_config_error_naming_the_fix() {
    let config = r#"
[server]
listen = "127.0.0.1:0"
auth = "none"

[admin]
listen = "127.0.0.1:0"
auth = "none"

[audit]
path = "audit.log"

[grants]
path = "grants.json"

[backend.kms]
kind = "aws-kms"
region = "us-east-1"

[[route]]
name = "users"
path = "/users/{id?}"
upstream = "http://127.0.0.1:9"
keys = ["kms:alias/users", "users"]
fields = ["$.ssn"]
context = { table = "users" }
message_context = { id = "{path.id|json.id}" }
"#;
    let errors = envelope_proxy::config::parse(config).unwrap_err().0;
    let find = |what: &str| {
        errors
            .iter()
            .find(|e| e.contains(what))
            .unwrap_or_else(|| panic!("no error about {what}: {errors:#?}"))
            .clone()
    };
    let route = find("route \"users\"");
    assert!(
        route.contains("\"users\" is in the local keyring")
            && route.contains("add [keyring]")
            && route.contains("kms:alias/NAME"),
        "{route}"
    );
    assert!(find("admin.auth").contains("add [keyring] or remove admin.auth"));
    assert!(find("audit.key_file").contains("set audit.key_file"));
    assert!(find("grants.token_key_file").contains("set grants.token_key_file"));
    assert_eq!(errors.len(), 4, "{errors:#?}");

    // With their own keys, the audit chain and grants need no keyring; KMS keys only: valid.
    let fixed = config
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n",
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
        )
        .replace(
            "path = \"audit.log\"\n",
            "path = \"audit.log\"\nkey_file = \"audit.key\"\n",
        )
        .replace(
            "path = \"grants.json\"\n",
            "path = \"grants.json\"\ntoken_key_file = \"grants.key\"\n",
        )
        .replace(r#"["kms:alias/users", "users"]"#, r#"["kms:alias/users"]"#);
    let parsed = envelope_proxy::config::parse(&fixed).unwrap_or_else(|e| panic!("{e}"));
    assert!(parsed.keyring.is_none());
}
