#![cfg(feature = "aws-kms")]
//! `/readyz` off the request path, against moto's KMS: keys are probed in the background; a
//! KMS outage with a warm cache stays ready; no cache and no backend is not ready; probing does
//! not follow `/readyz` calls.

mod common;

use std::time::{Duration, Instant};

use common::{Http, JsonServer, Moto, Proxy};
use serde_json::json;

/// The proxy with moto's KMS and a users route on `kms:alias/users` in front of json-server,
/// its admin listener on loopback; `server` goes into `[server]`.
async fn proxy(moto: &Moto, js: &JsonServer, server: &str) -> (Proxy, tempfile::TempDir, String) {
    let creds = tempfile::tempdir().unwrap();
    let cred_file = creds.path().join("credentials");
    std::fs::write(
        &cred_file,
        "[moto]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let routes = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[backend.kms]
kind = "aws-kms"
region = "us-east-1"
endpoint = "{endpoint}"
profile = "moto"
credentials_file = "{creds}"
call_timeout_ms = 300
retries = 0
failure_threshold = 2
open_for_secs = 1

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
        creds = cred_file.display(),
        upstream = js.url(),
    );
    let p = Proxy::start(&routes, server).await;
    let admin = format!("http://{}", p.running.as_ref().unwrap().admin_addr.unwrap());
    (p, creds, admin)
}

/// Poll `/readyz` until it answers `status` (or fail after 15 s); its body.
async fn readyz_becomes(http: &Http, admin: &str, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http.get(&format!("{admin}/readyz"), &[]).await;
        if r.status.as_u16() == status {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} ({}), expected {status}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_kms_outage_with_a_warm_cache_stays_ready() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (p, _creds, admin) = proxy(
        &moto,
        &js,
        "readiness_interval_ms = 200\nreadiness_failures = 2",
    )
    .await;
    let http = Http::default();
    readyz_becomes(&http, &admin, 200).await;
    let doc = json!({"id": "a1", "ssn": "123"});
    let w = http
        .post_json(&p.url("/tenants/acme/users"), &[], &doc)
        .await;
    assert_eq!(w.status, 201, "{}", w.text());
    let r = http.get(&p.url("/tenants/acme/users/a1"), &[]).await;
    assert_eq!(r.status, 200);

    moto.signal("-STOP");
    // Wait for the probes to see the outage (the key is no longer usable) ...
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = http.get(&format!("{admin}/readyz"), &[]).await;
        // ... while the cached keys keep it ready all along.
        assert_eq!(
            body.status,
            200,
            "not ready with a warm cache: {}",
            body.text()
        );
        let body = body.json();
        if body["usable_keys"] == 0 {
            assert!(!body["problems"].as_array().unwrap().is_empty(), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the probes never saw the outage: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it does serve: the cached read still works.
    let r = http.get(&p.url("/tenants/acme/users/a1"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    moto.signal("-CONT");
}

#[tokio::test]
async fn no_cache_and_no_backend_is_not_ready_until_it_is_back() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (_p, _creds, admin) = proxy(
        &moto,
        &js,
        "readiness_interval_ms = 200\nreadiness_failures = 2",
    )
    .await;
    let http = Http::default();
    readyz_becomes(&http, &admin, 200).await;
    moto.signal("-STOP");
    let body = readyz_becomes(&http, &admin, 503).await;
    assert_eq!(body["usable_keys"], 0, "{body}");
    moto.signal("-CONT");
    readyz_becomes(&http, &admin, 200).await;
}

#[tokio::test]
async fn readyz_calls_do_not_probe() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (_p, _creds, admin) = proxy(&moto, &js, "readiness_interval_ms = 600000").await;
    let http = Http::default();
    let first = readyz_becomes(&http, &admin, 200).await;
    let probes = first["probes"].as_u64().unwrap();
    assert_eq!(probes, 1, "{first}");
    for _ in 0..50 {
        let r = http.get(&format!("{admin}/readyz"), &[]).await;
        assert_eq!(r.status, 200);
    }
    let last = http.get(&format!("{admin}/readyz"), &[]).await.json();
    assert_eq!(last["probes"].as_u64(), Some(probes), "{last}");
    // Nor is KMS needed to answer: frozen, /readyz still answers at once from the last probe.
    moto.signal("-STOP");
    let t = Instant::now();
    let r = http.get(&format!("{admin}/readyz"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    moto.signal("-CONT");
}
