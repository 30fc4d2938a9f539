//! End to end: the proxy in front of a real json-server. What reached storage is read back
//! directly (json-server's HTTP API and its db file) and checked to be ciphertext.

mod common;

use std::time::Duration;

use common::{Http, JsonServer, Proxy};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const FIELDS: &str = r#"["$.ssn", "$.card.number", "$.profile", "$.notes[*].text", "$.active", "$.nickname", "$.tags"]"#;

fn users_route(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
key = "users"
fields = {FIELDS}
context = {{ tenant = "{{path.tenant}}", region = "{{header.x-region}}", table = "users" }}
message_context = {{ id = "{{path.id|json.id}}" }}
{extra}
"#
    )
}

const REGION: (&str, &str) = ("x-region", "eu");

fn sample(id: &str) -> Value {
    json!({
        "id": id,
        "name": "Ada",
        "ssn": "123-45-6789",
        "card": { "number": 4111111111111111u64, "brand": "visa" },
        "profile": { "email": "ada@example.com", "langs": ["en", "fr"] },
        "notes": [ { "text": "likes tea", "at": 1 }, { "text": "allergic to nuts", "at": 2 } ],
        "active": true,
        "nickname": null,
        "tags": [1, "two", 3.5]
    })
}

fn is_token(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.starts_with("enc:v1:"))
}

async fn setup(extra_route: &str) -> (JsonServer, Proxy, Http) {
    let js = JsonServer::start();
    let proxy = Proxy::start(&users_route(&js.url(), extra_route), "").await;
    (js, proxy, Http::default())
}

#[tokio::test]
async fn every_json_type_round_trips_and_storage_holds_only_tokens() {
    let (js, proxy, http) = setup("").await;
    let doc = sample("u1");
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[REGION], &doc)
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    assert_eq!(w.json(), doc, "the write response is decrypted too");

    let r = http
        .get(&proxy.url("/tenants/acme/users/u1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), doc);

    // Straight from the store: every configured value is a token, the rest untouched.
    let raw = http
        .get(&format!("{}/users/u1", js.url()), &[])
        .await
        .json();
    for v in [
        &raw["ssn"],
        &raw["card"]["number"],
        &raw["profile"],
        &raw["notes"][0]["text"],
        &raw["notes"][1]["text"],
        &raw["active"],
        &raw["nickname"],
        &raw["tags"],
    ] {
        assert!(is_token(v), "not a token: {v}");
    }
    assert_eq!(raw["name"], "Ada");
    assert_eq!(raw["card"]["brand"], "visa");
    assert_eq!(raw["notes"][0]["at"], 1);
    let file = js.db_file();
    for secret in [
        "123-45-6789",
        "4111111111111111",
        "ada@example.com",
        "likes tea",
        "allergic",
    ] {
        assert!(!file.contains(secret), "{secret} reached storage in clear");
    }

    // The audit log names the key and the count, and never the plaintext.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let audit = proxy.audit_text();
    assert!(!audit.contains("123-45-6789"));
    let lines = proxy.audit_lines();
    let seal = lines
        .iter()
        .find(|l| l["action"] == "seal")
        .expect("seal event");
    assert_eq!(seal["keys"][0], "local:users");
    assert!(seal["values"].as_u64().unwrap() >= 8, "{seal}");
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "open" && l["outcome"] == "ok")
    );
    proxy.verify_audit();
}

#[tokio::test]
async fn put_and_patch_by_id_bind_the_record_from_the_path() {
    let (js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("e1"))
        .await;
    let url = proxy.url("/tenants/acme/users/e1");
    let ct = ("content-type", "application/json");
    let r = http
        .send(
            Method::PATCH,
            &url,
            &[REGION, ct],
            json!({"ssn": "987-65-4321"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ssn"], "987-65-4321");
    assert_eq!(r.json()["profile"]["email"], "ada@example.com");
    let mut replaced = sample("e1");
    replaced["notes"] = json!([]);
    let r = http
        .send(Method::PUT, &url, &[REGION, ct], replaced.to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = http.get(&url, &[REGION]).await;
    assert_eq!(got.json(), replaced);
    assert!(!js.db_file().contains("987-65-4321"));
    assert!(is_token(
        &http
            .get(&format!("{}/users/e1", js.url()), &[])
            .await
            .json()["ssn"]
    ));
}

#[tokio::test]
async fn lists_and_wrapped_lists_decrypt() {
    let js = JsonServer::start();
    let page_route = format!(
        r#"
[[route]]
name = "page"
path = "/tenants/{{tenant}}/page"
upstream = "{}"
key = "users"
fields = {FIELDS}
response_documents = ["$.items[*]"]
context = {{ tenant = "{{path.tenant}}", region = "{{header.x-region}}", table = "users" }}
message_context = {{ id = "{{json.id}}" }}
"#,
        js.url()
    );
    let proxy = Proxy::start(&format!("{}{page_route}", users_route(&js.url(), "")), "").await;
    let http = Http::default();
    let mut docs = Vec::new();
    for i in 0..3 {
        let d = sample(&format!("l{i}"));
        assert_eq!(
            http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &d)
                .await
                .status,
            201
        );
        docs.push(d);
    }
    let list = http.get(&proxy.url("/tenants/acme/users"), &[REGION]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(list.json(), Value::Array(docs.clone()));

    // A wrapped list, as an API that pages would return it.
    let raw: Value = http.get(&format!("{}/users", js.url()), &[]).await.json();
    let page = json!({ "items": raw, "total": 3 });
    assert_eq!(
        http.put_json(&format!("{}/page", js.url()), &page)
            .await
            .status,
        200
    );
    let got = http.get(&proxy.url("/tenants/acme/page"), &[REGION]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json(), json!({ "items": docs, "total": 3 }));
}

#[tokio::test]
async fn another_tenant_cannot_read() {
    let (_js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("t1"))
        .await;
    let r = http
        .get(&proxy.url("/tenants/globex/users/t1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "decrypt_failed");
    assert!(!r.text().contains("123-45-6789") && !r.text().contains("enc:v1:"));
    // Another region header is another key context too.
    let r = http
        .get(&proxy.url("/tenants/acme/users/t1"), &[("x-region", "us")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = proxy.audit_lines();
    assert!(lines.iter().any(|l| {
        l["outcome"] == "error"
            && l["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("decrypt_failed")
    }));
}

/// Tamper with what json-server holds, straight through its own API.
async fn tamper(js: &JsonServer, http: &Http, id: &str, f: impl FnOnce(&mut Value)) {
    let url = format!("{}/users/{id}", js.url());
    let mut raw = http.get(&url, &[]).await.json();
    f(&mut raw);
    assert_eq!(http.put_json(&url, &raw).await.status, 200);
}

fn flip_byte(token: &str, at: usize) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = "enc:v1:".len() + at;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn tampered_tokens_are_detected_anywhere_in_the_token() {
    let (js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("x1"))
        .await;
    let raw = http
        .get(&format!("{}/users/x1", js.url()), &[])
        .await
        .json();
    let token = raw["ssn"].as_str().unwrap().to_string();
    let body_len = token.len() - "enc:v1:".len();
    // Header (EDK), salt, commitment, ciphertext and tag.
    for at in [3, 20, 90, 110, body_len - 30, body_len - 2] {
        let bad = flip_byte(&token, at);
        tamper(&js, &http, "x1", |d| d["ssn"] = Value::String(bad.clone())).await;
        let r = http
            .get(&proxy.url("/tenants/acme/users/x1"), &[REGION])
            .await;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "flip at {at}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "decrypt_failed");
    }
    // A plaintext value at a configured path is an error too, never passed through.
    tamper(&js, &http, "x1", |d| d["ssn"] = json!("123-45-6789")).await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/x1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(!r.text().contains("123-45-6789"));
}

#[tokio::test]
async fn redact_mode_nulls_what_does_not_decrypt() {
    let (js, proxy, http) = setup(r#"on_decrypt_error = "redact""#).await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("r1"))
        .await;
    tamper(&js, &http, "r1", |d| {
        let t = d["ssn"].as_str().unwrap().to_string();
        d["ssn"] = Value::String(flip_byte(&t, 100));
    })
    .await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/r1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-envelope-redacted"], "1");
    let doc = r.json();
    assert_eq!(doc["ssn"], Value::Null);
    assert_eq!(
        doc["profile"]["email"], "ada@example.com",
        "the rest still decrypts"
    );
}

#[tokio::test]
async fn tokens_moved_to_another_field_or_record_are_rejected() {
    let (js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("m1"))
        .await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("m2"))
        .await;
    let m1 = http
        .get(&format!("{}/users/m1", js.url()), &[])
        .await
        .json();

    // Same record, another field.
    tamper(&js, &http, "m1", |d| {
        d["card"]["number"] = m1["ssn"].clone()
    })
    .await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/m1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());

    // Same field, another record.
    tamper(&js, &http, "m2", |d| d["ssn"] = m1["ssn"].clone()).await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/m2"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());

    // Reordering an array keeps values readable: the index is not bound, the path is.
    tamper(&js, &http, "m1", |d| {
        *d = m1.clone();
        d["notes"].as_array_mut().unwrap().swap(0, 1);
    })
    .await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/m1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["notes"][0]["text"], "allergic to nuts");
    assert_eq!(r.json()["ssn"], "123-45-6789");
}

#[tokio::test]
async fn rotation_keeps_old_records_readable() {
    let (js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("v1"))
        .await;

    // Rotate through the keyring file, as `envelope-proxy keys rotate users` does.
    let kr = envelope_proxy::keys::keyring::Keyring::open(
        "local",
        &proxy.dir.path().join("keyring.json"),
        &envelope_proxy::keys::keyring::MasterKeySource::File(proxy.dir.path().join("master.key")),
    )
    .unwrap();
    assert_eq!(kr.rotate_key("users").unwrap().current_version, 2);
    // The running proxy polls the file every second and drops cached data keys.
    let mut version = 0;
    for i in 0..50 {
        http.post_json(
            &proxy.url("/tenants/acme/users"),
            &[REGION],
            &sample(&format!("v2-{i}")),
        )
        .await;
        let raw = http
            .get(&format!("{}/users/v2-{i}", js.url()), &[])
            .await
            .json();
        let t = envelope_proxy::envelope::token::ParsedToken::parse(raw["ssn"].as_str().unwrap())
            .unwrap();
        version = t.header.edks[0].key_version;
        if version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(version, 2, "new writes use the new version");
    for id in ["v1", "v2-0"] {
        let r = http
            .get(&proxy.url(&format!("/tenants/acme/users/{id}")), &[REGION])
            .await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.json()["ssn"], "123-45-6789");
    }
}

#[tokio::test]
async fn two_hundred_concurrent_writers_and_readers() {
    let (_js, proxy, http) = setup("").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = http.clone();
        let base = proxy.url("");
        tasks.push(tokio::spawn(async move {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let mut doc = sample(&format!("c{i}"));
            doc["ssn"] = json!(format!("ssn-{i}"));
            doc["notes"][0]["text"] = json!(format!("note {i}"));
            let w = http
                .post_json(&format!("{base}/tenants/{tenant}/users"), &[REGION], &doc)
                .await;
            assert_eq!(w.status, 201, "{}", w.text());
            let r = http
                .get(&format!("{base}/tenants/{tenant}/users/c{i}"), &[REGION])
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json(), doc, "record {i} came back mixed up");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Two key contexts (acme, globex): the cache made one data key for each.
    let m = proxy.state().metrics.encode();
    assert!(
        m.contains(r#"envelope_proxy_backend_calls_total{backend="local",operation="generate"} 2"#),
        "{m}"
    );
}

/// method, url, headers, body, expected status, expected error code
type Case<'a> = (
    Method,
    String,
    Vec<(&'a str, &'a str)>,
    String,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_nothing_is_forwarded() {
    let js = JsonServer::start();
    let proxy = Proxy::start(
        &users_route(&js.url(), ""),
        "max_body_bytes = 4096\nmax_json_depth = 8",
    )
    .await;
    let http = Http::default();
    let url = proxy.url("/tenants/acme/users");
    let json_ct = ("content-type", "application/json");
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            url.clone(),
            vec![REGION, ("content-type", "text/plain")],
            sample("b1").to_string(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION],
            sample("b1").to_string(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct, ("content-encoding", "gzip")],
            sample("b1").to_string(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::PATCH,
            proxy.url("/tenants/acme/users/b1"),
            vec![REGION, ("content-type", "application/json-patch+json")],
            r#"[{"op":"replace","path":"/ssn","value":"123-45-6789"}]"#.into(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct],
            r#"{"id":"b1","ssn": 123-45-6789}"#.into(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct],
            r#"{"id":"b1","ssn":"enc:v1:x","ssn":"123-45-6789"}"#.into(),
            400,
            "duplicate_key",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct],
            format!(r#"{{"id":"b1","ssn":"{}"}}"#, "9".repeat(5000)),
            413,
            "body_too_large",
        ),
        (
            Method::POST,
            url.clone(),
            vec![json_ct],
            sample("b1").to_string(),
            400,
            "missing_context",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct],
            r#"{"ssn":"123-45-6789"}"#.into(),
            400,
            "missing_context",
        ),
        (
            Method::POST,
            url.clone(),
            vec![REGION, json_ct],
            r#"{"id":"b1","a":[[[[[[[[[["deep"]]]]]]]]]]}"#.into(),
            400,
            "too_deep",
        ),
        (
            Method::POST,
            proxy.url("/elsewhere"),
            vec![REGION, json_ct],
            sample("b1").to_string(),
            404,
            "no_route",
        ),
        (
            Method::POST,
            proxy.url("/tenants/acme/users/../../users"),
            vec![REGION, json_ct],
            sample("b1").to_string(),
            400,
            "bad_path",
        ),
        (
            Method::POST,
            proxy.url("/tenants/acme/users%2F..%2Fx"),
            vec![REGION, json_ct],
            sample("b1").to_string(),
            400,
            "bad_path",
        ),
    ];
    for (method, u, headers, body, status, code) in cases {
        let r = http.send(method, &u, &headers, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{u} {headers:?}: {}", r.text());
        assert_eq!(r.error_code(), code, "{}", r.text());
        assert!(
            !r.text().contains("6789"),
            "the error echoes the body: {}",
            r.text()
        );
        assert_eq!(r.headers["content-type"], "application/json");
        // Refused before its body was read: the connection is closed after the answer, so
        // the unread body can never be taken for the client's next request.
        if ["body_too_large", "no_route", "bad_path"].contains(&code) {
            assert_eq!(
                r.headers.get("connection").map(|v| v.as_bytes()),
                Some(&b"close"[..]),
                "{u}: {code}"
            );
        }
    }
    assert!(!js.db_file().contains("b1"), "nothing may reach the store");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rejects = proxy
        .audit_lines()
        .iter()
        .filter(|l| l["outcome"] == "error")
        .count();
    assert!(rejects >= 12, "every refusal is audited ({rejects})");
}

#[tokio::test]
async fn upstream_down_or_slow() {
    // Down: nothing listens there.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    // Slow: accepts and never answers.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}", slow.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = slow.accept().await {
            held.push(s);
        }
    });
    let routes = format!(
        "{}\n{}",
        users_route(&dead, ""),
        users_route(&slow_url, "")
            .replace("name = \"users\"", "name = \"slow\"")
            .replace("/tenants/", "/slow/")
    );
    let proxy = Proxy::start(&routes, "upstream_timeout_ms = 300").await;
    let http = Http::default();
    let r = http
        .get(&proxy.url("/tenants/acme/users/1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "upstream_unavailable");
    let r = http.get(&proxy.url("/slow/acme/users/1"), &[REGION]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "upstream_timeout");
}

#[tokio::test]
async fn passthrough_routes_stream_unchanged_and_show_ciphertext() {
    let js = JsonServer::start();
    let routes = format!(
        "{}\n[[route]]\nname = \"db\"\npath = \"/db\"\nupstream = \"{}\"\npassthrough = true\n",
        users_route(&js.url(), ""),
        js.url()
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("p1"))
        .await;
    let r = http.get(&proxy.url("/db"), &[]).await;
    assert_eq!(r.status, 200);
    let db = r.json();
    assert!(is_token(&db["users"][0]["ssn"]));
}

#[tokio::test]
async fn the_offline_cli_decrypts_what_the_proxy_stored() {
    let (js, proxy, http) = setup("").await;
    let doc = sample("o1");
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &doc)
        .await;
    let raw = http
        .get(&format!("{}/users/o1", js.url()), &[])
        .await
        .json();
    let run = |args: &[&str], stdin: String| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .args(["--config", proxy.config_path.to_str().unwrap(), "decrypt"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(
        &["--context", "tenant=acme", "--context", "region=eu"],
        raw.to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got, doc);

    let out = run(
        &[
            "--context",
            "tenant=acme",
            "--context",
            "region=eu",
            "--context",
            "id=o1",
            "--field",
            "$.ssn",
        ],
        raw["ssn"].as_str().unwrap().to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "\"123-45-6789\""
    );

    let out = run(
        &["--context", "tenant=globex", "--context", "region=eu"],
        raw.to_string(),
    );
    assert!(!out.status.success(), "wrong tenant must not decrypt");
    let out = run(&["--context", "tenant=acme"], raw.to_string());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context region="));
}

#[tokio::test]
async fn a_thousand_concurrent_cold_writes_make_one_backend_call() {
    let (_js, proxy, http) = setup("").await;
    let before = proxy.state().metrics.backend_calls_for("local");
    let mut tasks = Vec::new();
    // Straight at the key service: 1000 concurrent misses on one key context.
    let keys = proxy.state().keys.clone();
    for _ in 0..1000 {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let ctx: envelope_proxy::envelope::Context =
                [("tenant", "acme"), ("region", "eu"), ("table", "users")]
                    .into_iter()
                    .collect();
            keys.sealing_key(
                &[envelope_proxy::keys::KeyRef::parse("users").unwrap()],
                &ctx,
                1,
                10,
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(proxy.state().metrics.backend_calls_for("local") - before, 1);
    let _ = http;
}

/// In front of a store that ignores case in member names, a write whose member differs from an
/// encrypted field's name only by case is refused (the store would take it as that field, in
/// clear); exact names still seal, and other routes are unaffected.
#[tokio::test]
async fn case_variants_of_encrypted_names_are_refused_for_a_case_insensitive_store() {
    let js = JsonServer::start();
    let strict = users_route(&js.url(), "case_insensitive_upstream = true");
    let proxy = Proxy::start(&strict, "").await;
    let http = Http::default();
    let url = proxy.url("/tenants/acme/users");
    let ct = ("content-type", "application/json");
    for (body, variant) in [
        (r#"{"id":"c1","SSN":"123-45-6789"}"#, "SSN"),
        (
            r#"{"id":"c2","card":{"Number":4111111111111111}}"#,
            "Number",
        ),
        (r#"{"id":"c3","\u017fsn":"123-45-6789"}"#, "long s, escaped"),
        (r#"{"id":"c6","Ssn":"123-45-6789"}"#, "Ssn"),
        (r#"{"id":"c4","notes":[{"TEXT":"likes tea"}]}"#, "TEXT"),
    ] {
        let r = http
            .send(Method::POST, &url, &[REGION, ct], body.to_string())
            .await;
        assert_eq!(r.status.as_u16(), 400, "{variant}: {}", r.text());
        assert_eq!(r.error_code(), "case_variant_field", "{variant}");
    }
    assert!(
        !js.db_file().contains("6789"),
        "nothing may reach the store"
    );
    let r = http
        .send(Method::POST, &url, &[REGION, ct], sample("c5").to_string())
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    assert!(!js.db_file().contains("123-45-6789"));
}

/// Disable the route's root key the way `envelope-proxy keys disable` does (through the sealed
/// file), and wait for the running proxy to pick it up.
async fn disable_users_key(proxy: &Proxy, http: &Http, id: &str) {
    use envelope_proxy::keys::keyring::{Keyring, MasterKeySource};
    let dir = proxy.dir.path();
    let kr = Keyring::open(
        "local",
        &dir.join("keyring.json"),
        &MasterKeySource::File(dir.join("master.key")),
    )
    .unwrap();
    kr.set_enabled("users", false).unwrap();
    for _ in 0..40 {
        let r = http
            .get(&proxy.url(&format!("/tenants/acme/users/{id}")), &[REGION])
            .await;
        if r.status != StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy never noticed the disabled key");
}

#[tokio::test]
async fn a_disabled_key_fails_the_read_and_never_redacts() {
    let (js, proxy, http) = setup(r#"on_decrypt_error = "redact""#).await;
    let doc = sample("k1");
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[REGION], &doc)
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let stored = http
        .get(&format!("{}/users/k1", js.url()), &[])
        .await
        .json();
    disable_users_key(&proxy, &http, "k1").await;

    let r = http
        .get(&proxy.url("/tenants/acme/users/k1"), &[REGION])
        .await;
    // Not 200 with `"ssn": null`, which a client's read-modify-write would store for good.
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), "key_disabled");
    assert!(r.headers.get("x-envelope-redacted").is_none());
    assert!(!r.text().contains("123-45-6789"));
    // Lists too.
    let r = http.get(&proxy.url("/tenants/acme/users"), &[REGION]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());

    // Storage still holds every token as written.
    let now = http
        .get(&format!("{}/users/k1", js.url()), &[])
        .await
        .json();
    assert_eq!(now, stored);
    assert!(is_token(&now["ssn"]));

    // Audited and counted as what it is, not as tampering.
    let last = proxy.audit_lines().pop().unwrap();
    assert_eq!(last["outcome"], "error");
    assert_eq!(last["reason"], "key_disabled", "{last}");
    assert!(!proxy.audit_text().contains("decrypt_failed"));
    assert!(
        proxy
            .state()
            .metrics
            .backend_errors_of("local", "key_disabled")
            > 0
    );
}

#[tokio::test]
async fn a_disabled_key_on_an_error_route_is_not_reported_as_tampering() {
    let (_js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("k2"))
        .await;
    disable_users_key(&proxy, &http, "k2").await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/k2"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), "key_disabled");
    assert!(!proxy.audit_text().contains("decrypt_failed"));
}

#[tokio::test]
async fn a_running_proxy_refuses_a_restored_older_keyring() {
    let (_js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("b1"))
        .await;
    let path = proxy.dir.path().join("keyring.json");
    let backup = std::fs::read(&path).unwrap();
    disable_users_key(&proxy, &http, "b1").await;

    // Someone puts the older sealed file back (no master key needed for that).
    std::fs::write(&path, &backup).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = http
        .get(&proxy.url("/tenants/acme/users/b1"), &[REGION])
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "the disabled key must stay disabled: {}",
        r.text()
    );
    assert_eq!(r.error_code(), "key_disabled");
    assert!(
        proxy
            .state()
            .metrics
            .encode()
            .contains("envelope_proxy_keyring_rollbacks_refused_total 1"),
        "the refused rollback is counted"
    );

    // The CLI refuses it too, naming the fix; accepting it on purpose works.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .arg("--config")
            .arg(&proxy.config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["keys", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("keys accept-generation"), "{err}");
    let generation = err
        .split("keys accept-generation ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap()
        .to_string();
    assert!(
        cli(&["keys", "accept-generation", &generation])
            .status
            .success()
    );
    let out = cli(&["keys", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a canned upstream answers: the status line and headers (no blank line), and the body.
type Canned = std::sync::Arc<std::sync::Mutex<(String, String)>>;

/// An upstream that answers every request with what `Canned` holds at the time, so the tests
/// can send what json-server never does.
async fn canned_upstream() -> (String, Canned) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let canned: Canned = Default::default();
    let answer = canned.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (head, body) = answer.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!("{head}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), canned)
}

/// The users route, and the same route (same key and contexts) in front of `canned` under
/// `/canned/...`, in one proxy: what the canned store serves was sealed by the same keys.
async fn with_canned_route(js: &JsonServer, canned: &str) -> Proxy {
    let second = users_route(canned, "").replace(
        "name = \"users\"\npath = \"/tenants",
        "name = \"canned\"\npath = \"/canned/tenants",
    );
    Proxy::start(&format!("{}{second}", users_route(&js.url(), "")), "").await
}

#[tokio::test]
async fn non_json_success_responses_are_refused_never_streamed_with_tokens() {
    let (js, proxy, http) = setup("").await;
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("j1"))
        .await;
    // json-server answers JSONP (`?callback=`) as JavaScript, the stored tokens inside.
    let direct = http
        .get(&format!("{}/users/j1?callback=cb", js.url()), &[])
        .await;
    assert!(direct.text().contains("enc:v1:"), "{}", direct.text());
    let r = http
        .get(&proxy.url("/tenants/acme/users/j1?callback=cb"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "non_json_response");
    assert!(!r.text().contains("enc:v1:"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        proxy
            .audit_lines()
            .iter()
            .any(|l| l["reason"] == "non_json_response" && l["outcome"] == "error")
    );

    // A route that declares its store's other representations passes them as they are.
    let opaque = Proxy::start(
        &users_route(&js.url(), "dangerous_opaque_responses = true"),
        "",
    )
    .await;
    let r = http
        .get(&opaque.url("/tenants/acme/users/j1?callback=cb"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("enc:v1:"));
    // Errors and empty successes are not data: they pass on any route.
    let r = http
        .get(&proxy.url("/tenants/acme/nothing-here"), &[REGION])
        .await;
    assert_ne!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
}

#[tokio::test]
async fn a_connection_header_cannot_strip_the_content_type() {
    // The tokens a real write stored, served by a store that names Content-Type in its
    // Connection header (as if it were hop-by-hop).
    let js = JsonServer::start();
    let (upstream, canned) = canned_upstream().await;
    let proxy = with_canned_route(&js, &upstream).await;
    let http = Http::default();
    http.post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("c1"))
        .await;
    let stored = http
        .get(&format!("{}/users/c1", js.url()), &[])
        .await
        .text();
    *canned.lock().unwrap() = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: content-type, keep-alive"
            .into(),
        stored,
    );
    let r = http
        .get(&proxy.url("/canned/tenants/acme/users/c1"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(!r.text().contains("enc:v1:"), "tokens returned as data");
    assert_eq!(r.json(), sample("c1"));
    assert_eq!(r.headers["content-type"], "application/json");
}

#[tokio::test]
async fn upstream_locations_never_reach_the_client() {
    let (js, proxy, http) = setup("").await;
    // json-server names its own address in Location after a POST.
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("l1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED);
    let direct = http
        .post_json(
            &format!("{}/users", js.url()),
            &[],
            &json!({"id": "direct"}),
        )
        .await;
    let direct_location = direct.headers["location"].to_str().unwrap();
    assert!(
        direct_location.contains(&js.port.to_string()),
        "{direct_location}"
    );
    // json-server's Location names its own address and its un-tenanted path (`/users/l1`,
    // behind its rewrite), which this route does not serve: dropped.
    assert!(
        direct_location.ends_with("/users/direct"),
        "{direct_location}"
    );
    assert!(w.headers.get("location").is_none(), "{:?}", w.headers);
    // A store's un-tenanted path (behind a rewrite) and links to it are dropped, and so are
    // other hosts; links on this route become paths on the proxy.
    let (upstream, canned) = canned_upstream().await;
    let origin = upstream.clone();
    *canned.lock().unwrap() = (
        format!(
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nLocation: {origin}/users/9\r\nContent-Location: http://10.1.2.3/canned/tenants/acme/users/9\r\nLink: <{origin}/canned/tenants/acme/users?_page=2>; rel=\"next\", <{origin}/users?_page=1>; rel=\"first\""
        ),
        "{}".into(),
    );
    let proxy2 = with_canned_route(&js, &upstream).await;
    let r = http
        .get(&proxy2.url("/canned/tenants/acme/users"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert!(r.headers.get("location").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("content-location").is_none());
    assert_eq!(
        r.headers["link"],
        "</canned/tenants/acme/users?_page=2>; rel=\"next\""
    );
    drop(proxy);
}

#[tokio::test]
async fn one_bad_value_in_a_list_is_redacted_alone_or_named() {
    for mode in ["redact", "error"] {
        let js = JsonServer::start();
        let proxy = Proxy::start(
            &users_route(&js.url(), &format!("on_decrypt_error = \"{mode}\"")),
            "",
        )
        .await;
        let http = Http::default();
        for id in ["a1", "a2", "a3"] {
            let w = http
                .post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample(id))
                .await;
            assert_eq!(w.status, StatusCode::CREATED);
        }
        // Written around the proxy: a clear value where a token belongs, in the 2nd document.
        tamper(&js, &http, "a2", |d| d["ssn"] = json!("999-99-9999")).await;
        let r = http.get(&proxy.url("/tenants/acme/users"), &[REGION]).await;
        if mode == "redact" {
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.headers["x-envelope-redacted"], "1");
            let list = r.json();
            assert_eq!(list[0], sample("a1"));
            assert_eq!(list[2], sample("a3"));
            assert_eq!(list[1]["ssn"], Value::Null);
            let mut rest = list[1].clone();
            rest["ssn"] = json!("123-45-6789");
            assert_eq!(rest, sample("a2"), "only that value is redacted");
        } else {
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
            assert_eq!(r.error_code(), "decrypt_failed");
            let message = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains("document 1, field $.ssn"), "{message}");
            assert!(!r.text().contains("999-99-9999"));
        }
    }
}

/// "Encrypt these, pass the rest": the encrypting route, then a catch-all pass-through to the
/// same store.
fn users_then_catch_all(upstream: &str) -> String {
    format!(
        "{}\n[[route]]\nname = \"rest\"\npath = \"/**\"\nupstream = \"{upstream}\"\npassthrough = true\n",
        users_route(upstream, "")
    )
}

#[tokio::test]
async fn path_spellings_cannot_slip_past_an_encrypting_route() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&users_then_catch_all(&js.url()), "").await;
    let http = Http::default();
    // json-server routes without regard to case: this is the users collection. The proxy
    // matches the same way, so the SSN is sealed.
    let r = http
        .post_json(&proxy.url("/tenants/acme/USERS"), &[REGION], &sample("c1"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["ssn"], "123-45-6789");
    let raw = http
        .get(&format!("{}/users/c1", js.url()), &[])
        .await
        .json();
    assert!(is_token(&raw["ssn"]), "stored: {raw}");
    // Encoded letters, matrix parameters, Unicode stand-ins a folding store would take as
    // `users`, and an encoded capture: refused before anything is sent.
    for (i, path) in [
        "/tenants/acme/%75sers",
        "/tenants/acme/users;v=1",
        "/tenants/acme;v=1/users",
        "/tenants/ac%6De/users",
        "/tenants/acme/u%C5%BFers",
        "/tenants/acme/%EF%BD%95sers",
    ]
    .into_iter()
    .enumerate()
    {
        let r = http
            .post_json(&proxy.url(path), &[REGION], &sample(&format!("x{i}")))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert_eq!(r.error_code(), "bad_path", "{path}");
    }
    let file = js.db_file();
    assert!(
        !file.contains("123-45-6789"),
        "an SSN reached storage: {file}"
    );
    assert!(
        !file.contains("\"x0\"") && !file.contains("\"x3\""),
        "{file}"
    );
    // What is not spelled like the encrypting route still passes.
    let r = http.get(&proxy.url("/db"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        proxy
            .audit_lines()
            .iter()
            .any(|l| l["action"] == "reject" && l["reason"] == "bad_path")
    );
}

/// A tiny upstream that records each request line and answers `[]`.
async fn recording_upstream() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf);
                record
                    .lock()
                    .unwrap()
                    .push(text.lines().next().unwrap_or("").to_string());
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]",
                    )
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn query_parameters_naming_encrypted_fields_never_reach_the_store() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&users_then_catch_all(&js.url()), "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[REGION], &sample("q1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    // Control: the store does read query parameters (a pass-through filter by name).
    let found = http.get(&proxy.url("/users?name=Ada"), &[]).await.json();
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    let none = http.get(&proxy.url("/users?name=Bob"), &[]).await.json();
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
    // Through the encrypting route: filters naming encrypted fields are refused.
    for q in [
        "ssn=123-45-6789",
        "SSN=123-45-6789",
        "%73sn=123-45-6789",
        "ssn_like=123-45",
        "ssn_ne=123-45-6789",
        "ssn_gte=123-45-6789",
        "ssn_lte=123-45-6789",
        "user[ssn]=123-45-6789",
        "ssn[]=123-45-6789",
        "card.number=4111111111111111",
        "name=Ada&card.number_like=4111",
    ] {
        let r = http
            .get(&proxy.url(&format!("/tenants/acme/users?{q}")), &[REGION])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text());
        assert_eq!(r.error_code(), "sensitive_query_parameter", "{q}");
        assert!(!r.text().contains("123-45") && !r.text().contains("4111"));
    }
    // Other parameters still work.
    let r = http
        .get(&proxy.url("/tenants/acme/users?name=Ada"), &[REGION])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()[0]["ssn"], "123-45-6789");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let audit = proxy.audit_text();
    assert!(audit.contains("sensitive_query_parameter"), "{audit}");
    assert!(
        !audit.contains("123-45-6789"),
        "the audit log holds the value"
    );

    // And nothing of them was sent: an upstream that records every request line.
    let (up, seen) = recording_upstream().await;
    let proxy = Proxy::start(
        &users_route(&up, "allow_query_params = [\"page[number]\"]"),
        "",
    )
    .await;
    for q in ["ssn=123-45-6789", "card.number=4111111111111111"] {
        let r = http
            .get(&proxy.url(&format!("/tenants/acme/users?{q}")), &[REGION])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
    }
    let r = http
        .get(
            &proxy.url("/tenants/acme/users?page[number]=2&name=Ada"),
            &[REGION],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["GET /tenants/acme/users?page[number]=2&name=Ada HTTP/1.1".to_string()],
        "only the allowed request reached the upstream"
    );
}
