//! The admin listener: open only on loopback, or behind a bearer token.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Http, JsonServer, Proxy};
use http::StatusCode;

const ROUTE: &str = r#"
[[route]]
name = "users"
path = "/users/{id?}"
upstream = "UPSTREAM"
key = "users"
fields = ["$.ssn"]
"#;

fn config(admin: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
[keyring]
path = "k.json"
master_key_file = "m.key"
{admin}
{}
"#,
        ROUTE.replace("UPSTREAM", "http://127.0.0.1:9")
    )
}

#[test]
fn a_non_loopback_admin_address_without_a_token_is_refused() {
    let e = envelope_proxy::config::parse(&config("[admin]\nlisten = \"0.0.0.0:9090\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.listen"), "{e}");
    assert!(
        e.contains("admin.token_file"),
        "the error names the fix: {e}"
    );
    // check-config says the same.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config("[admin]\nlisten = \"0.0.0.0:9090\"\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.token_file"));
    // Loopback needs nothing; a token makes any address acceptable.
    for ok in [
        "[admin]\nlisten = \"127.0.0.1:9090\"\n",
        "[admin]\nlisten = \"[::1]:9090\"\n",
        "[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_file = \"admin.token\"\n",
    ] {
        envelope_proxy::config::parse(&config(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[tokio::test]
async fn with_a_token_metrics_need_it_and_probes_stay_open() {
    let js = JsonServer::start();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin.token");
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = Proxy::start(
        &ROUTE.replace("UPSTREAM", &js.url()),
        &format!(
            "[admin]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .await;
    let port = proxy.running.as_ref().unwrap().admin_addr.unwrap().port();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let http = Http::default();

    let r = http.get(&url("/metrics"), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.text().contains("envelope_proxy_"));
    let wrong = format!("Bearer {}", "0".repeat(token.len()));
    let r = http
        .get(&url("/metrics"), &[("authorization", &wrong)])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let right = format!("Bearer {token}");
    let r = http
        .get(&url("/metrics"), &[("authorization", &right)])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("envelope_proxy_"));

    // Probes: status without a token, details only with it.
    assert_eq!(http.get(&url("/healthz"), &[]).await.status, StatusCode::OK);
    let r = http.get(&url("/readyz"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("backends").is_none(), "{}", r.text());
    let r = http
        .get(&url("/readyz"), &[("authorization", &right)])
        .await;
    assert!(r.json().get("backends").is_some(), "{}", r.text());
}

#[tokio::test]
async fn a_readable_token_file_is_refused_at_start() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin.token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"{d}/k.json\"\nmaster_key_file = \"{d}/m.key\"\ncreate_missing_keys = true\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{}",
        token_file.display(),
        ROUTE.replace("UPSTREAM", "http://127.0.0.1:9")
    );
    let config = envelope_proxy::config::parse(&text).unwrap();
    let e = envelope_proxy::server::start(config).await.err().unwrap();
    assert!(e.contains("chmod 0400"), "{e}");
}
