//! Format v2 end to end: compact `enc:v2:` tokens whose data keys live as records in a key
//! vault on the same json-server. What reached storage (tokens and records) is read back from
//! json-server's db file and its HTTP API, and tampered with there.

mod common;

use common::{Http, JsonServer, Proxy};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const FIELDS: &str = r#"["$.ssn", "$.n", "$.b", "$.nul", "$.obj", "$.arr", "$.f"]"#;

fn route(upstream: &str, format: &str) -> String {
    let vault = if format == "v2" {
        "token_format = \"v2\"\n[route.key_vault]\nkind = \"rest\"\npath = \"/envelope-keys/{id}\"\ncreate = \"post\"\n"
    } else {
        // A v1 route that still reads v2 tokens.
        "[route.key_vault]\nkind = \"rest\"\npath = \"/envelope-keys/{id}\"\ncreate = \"post\"\n"
    };
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
key = "users"
fields = {FIELDS}
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
{vault}
"#
    )
}

fn sample(id: &str) -> Value {
    json!({
        "id": id,
        "name": "Ada",
        "ssn": "123-45-6789",
        "n": 4111111111111111u64,
        "b": true,
        "nul": null,
        "obj": {"email": "ada@example.com", "langs": ["en", "fr"]},
        "arr": [1, "two", 3.5],
        "f": -0.5e-3
    })
}

/// What json-server holds for `user`, read from it directly (not through the proxy).
async fn stored_user(js: &JsonServer, id: &str) -> Value {
    let r = Http::default()
        .get(&format!("{}/users/{id}", js.url()), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "no user {id} stored");
    r.json()
}

async fn stored_users(js: &JsonServer) -> Value {
    Http::default()
        .get(&format!("{}/users", js.url()), &[])
        .await
        .json()
}

async fn records(js: &JsonServer) -> Vec<Value> {
    let r = Http::default()
        .get(&format!("{}/envelope-keys", js.url()), &[])
        .await;
    r.json().as_array().unwrap().clone()
}

/// The record id a v2 token names (hex), read the way FORMAT.md says.
fn token_record(token: &str) -> String {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.strip_prefix("enc:v2:").expect("a v2 token"))
        .unwrap();
    hex::encode(&raw[..16])
}

/// A second proxy on the same keyring (another replica): its caches are cold.
async fn replica(first: &Proxy, routes: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    for f in ["keyring.json", "master.key"] {
        std::fs::copy(first.dir.path().join(f), dir.path().join(f)).unwrap();
    }
    Proxy::start_in(dir, routes, "").await
}

#[tokio::test]
async fn v2_round_trip_of_every_json_type_with_one_record_per_data_key() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&route(&js.url(), "v2"), "").await;
    let http = Http::default();
    for id in ["u1", "u2"] {
        let w = http
            .post_json(&proxy.url("/tenants/acme/users"), &[], &sample(id))
            .await;
        assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    }
    let file = stored_users(&js).await.to_string();
    // `"two"` with its quotes: as a bare substring it turns up in random base64url tokens now
    // and then (a false alarm seen in a suite run); no token contains a quote.
    for clear in [
        "123-45-6789",
        "4111111111111111",
        "ada@example.com",
        "\"two\"",
    ] {
        assert!(!file.contains(clear), "{clear} reached storage");
    }
    let stored = stored_user(&js, "u1").await;
    assert_eq!(stored["name"], "Ada", "unconfigured fields pass");
    let ssn = stored["ssn"].as_str().unwrap();
    assert!(ssn.starts_with("enc:v2:"), "{ssn}");
    // 13 bytes of JSON + 44 → 76 base64url characters + the 7-character prefix.
    assert_eq!(ssn.len(), 83, "{ssn}");
    for f in ["n", "b", "nul", "obj", "arr", "f"] {
        assert!(stored[f].as_str().unwrap().starts_with("enc:v2:"), "{f}");
    }
    // One data key (cached) sealed both documents: one record, named by every token.
    let recs = records(&js).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["id"], token_record(ssn));
    assert_eq!(recs[0]["state"], "active");
    assert_eq!(
        token_record(stored_user(&js, "u2").await["ssn"].as_str().unwrap()),
        token_record(ssn)
    );

    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u1"));
    let list = http.get(&proxy.url("/tenants/acme/users"), &[]).await;
    assert_eq!(list.json(), json!([sample("u1"), sample("u2")]));

    // A replica with cold caches reads the record from the vault.
    let other = replica(&proxy, &route(&js.url(), "v2")).await;
    let r = http.get(&other.url("/tenants/acme/users/u2"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u2"));
    // A token moved to another field or record does not open (context binding).
    let mut moved = stored_user(&js, "u1").await;
    moved["b"] = stored["ssn"].clone();
    http.put_json(&format!("{}/users/u1", js.url()), &moved)
        .await;
    let r = http.get(&other.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "decrypt_failed");
    // Another tenant's key context: the record is not theirs.
    let r = http.get(&other.url("/tenants/globex/users/u2"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_invalid");
    let audit = other.audit_for("/tenants/globex/users/u2", 502).await;
    assert_eq!(audit["outcome"], "error", "{audit}");
}

#[tokio::test]
async fn the_record_is_written_before_the_data_and_a_failed_vault_write_forwards_nothing() {
    let js = JsonServer::start();
    // A vault path json-server does not serve: the record cannot be created.
    let routes = route(&js.url(), "v2").replace("/envelope-keys/{id}", "/no-such-vault/{id}");
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::SERVICE_UNAVAILABLE, "{}", w.text());
    assert_eq!(w.error_code(), "key_backend_unavailable");
    assert_eq!(stored_users(&js).await, json!([]), "nothing forwarded");
    // The same write once the vault works: the record is there with the data.
    let proxy = Proxy::start(&route(&js.url(), "v2"), "").await;
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let token = stored_user(&js, "u1").await["ssn"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        records(&js)
            .await
            .iter()
            .any(|r| r["id"] == token_record(&token))
    );
}

#[tokio::test]
async fn tampered_swapped_deleted_and_foreign_records_are_refused_never_redacted() {
    let js = JsonServer::start();
    // Redaction on: even so, a record problem fails the response (it is not the value's).
    let routes = route(&js.url(), "v2").replace(
        "token_format = \"v2\"",
        "token_format = \"v2\"\non_decrypt_error = \"redact\"",
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    for (tenant, id) in [("acme", "u1"), ("globex", "g1")] {
        let w = http
            .post_json(
                &proxy.url(&format!("/tenants/{tenant}/users")),
                &[],
                &sample(id),
            )
            .await;
        assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    }
    let acme = token_record(stored_user(&js, "u1").await["ssn"].as_str().unwrap());
    let globex = token_record(stored_user(&js, "g1").await["ssn"].as_str().unwrap());
    assert_ne!(acme, globex, "key contexts have their own data keys");
    let record_url = |id: &str| format!("{}/envelope-keys/{id}", js.url());
    let original = http.get(&record_url(&acme), &[]).await.json();

    // Each case on a fresh replica (cold cache), then the original record back.
    let read = |p: &Proxy| p.url("/tenants/acme/users/u1");
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "tampered EDK",
            {
                let mut r = original.clone();
                let mut raw = base64_decode(r["record"].as_str().unwrap());
                let last = raw.len() - 3;
                raw[last] ^= 1;
                r["record"] = base64_encode(&raw).into();
                r
            },
            StatusCode::BAD_GATEWAY,
            "key_record_invalid",
        ),
        (
            "swapped (another id's record)",
            {
                let mut r = http.get(&record_url(&globex), &[]).await.json();
                r["id"] = acme.clone().into();
                r
            },
            StatusCode::BAD_GATEWAY,
            "key_record_invalid",
        ),
        (
            "commitment changed",
            {
                let mut r = original.clone();
                let mut raw = base64_decode(r["record"].as_str().unwrap());
                raw[4 + 1 + 16] ^= 1;
                r["record"] = base64_encode(&raw).into();
                r
            },
            StatusCode::BAD_GATEWAY,
            "key_record_invalid",
        ),
        (
            "not a record",
            json!({"id": acme, "record": "bm90IGEgcmVjb3Jk"}),
            StatusCode::BAD_GATEWAY,
            "key_record_invalid",
        ),
        (
            // A state this version does not know is not taken for "active".
            "unknown state",
            {
                let mut r = original.clone();
                r["state"] = "shredded".into();
                r
            },
            StatusCode::BAD_GATEWAY,
            "key_record_invalid",
        ),
    ];
    for (what, doc, status, code) in cases {
        let put = http.put_json(&record_url(&acme), &doc).await;
        assert!(put.status.is_success(), "{what}: {}", put.text());
        let replica = replica(&proxy, &routes).await;
        let r = http.get(&read(&replica), &[]).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert_eq!(r.error_code(), code, "{what}");
        assert!(!r.text().contains("123-45-6789"), "{what}");
    }
    // Deleted: 503 key_record_missing, on a route that would redact a bad value.
    http.send(Method::DELETE, &record_url(&acme), &[], "").await;
    let replica_ = replica(&proxy, &routes).await;
    let r = http.get(&read(&replica_), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_missing");
    // Restored: readable again (nothing about the data changed).
    let w = http
        .post_json(&format!("{}/envelope-keys", js.url()), &[], &original)
        .await;
    assert!(w.status.is_success(), "{}", w.text());
    let replica_ = replica(&proxy, &routes).await;
    let r = http.get(&read(&replica_), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u1"));

    // A foreign record: another keyring's proxy wrote it; this keyring cannot unwrap it.
    let foreign = Proxy::start(&routes, "").await;
    let w = http
        .post_json(&foreign.url("/tenants/acme/users"), &[], &sample("x1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let r = http.get(&proxy.url("/tenants/acme/users/x1"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_invalid");
}

/// Two routes sharing one vault, with different root keys: neither opens the other's records
/// (with the record's key cached by the route that wrote it, or on a cold cache), and a rewrap
/// of one route leaves the other's records alone.
#[tokio::test]
async fn routes_sharing_a_vault_never_open_or_rewrap_each_others_records() {
    let js = JsonServer::start();
    let routes = format!(
        r#"{}
[[route]]
name = "pages"
path = "/tenants/{{tenant}}/page"
upstream = "{}"
key = "staff"
fields = {FIELDS}
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{json.id}}" }}
token_format = "v2"
[route.key_vault]
kind = "rest"
path = "/envelope-keys/{{id}}"
create = "post"
"#,
        route(&js.url(), "v2"),
        js.url()
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    // The writer has the record's key cached; the users route reads it.
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Someone with access to the store copies the user into the pages route's resource:
    // same vault, key context, message context and field, but the record's data key is
    // wrapped under "users" only, and the pages route opens through "staff".
    let stored = stored_user(&js, "u1").await;
    let put = http.put_json(&format!("{}/page", js.url()), &stored).await;
    assert!(put.status.is_success(), "{}", put.text());
    let fresh = replica(&proxy, &routes).await;
    for (who, p) in [("warm cache", &proxy), ("cold cache", &fresh)] {
        let r = http.get(&p.url("/tenants/acme/page"), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{who}: {}", r.text());
        assert_eq!(r.error_code(), "key_record_invalid", "{who}");
        assert!(!r.text().contains("123-45-6789"), "{who}");
    }

    // A rewrap of the pages route leaves the users route's record as it was.
    let before = records(&js).await;
    assert_eq!(before.len(), 1);
    let (ok, out) = cli(&proxy, &["keys", "rewrap", "--route", "pages"], "");
    assert!(ok, "{out}");
    assert!(
        out.contains("0 records rewrapped") && out.contains("1 left alone"),
        "{out}"
    );
    assert_eq!(records(&js).await, before);
    let r = http.get(&fresh.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u1"));
    // `--from` moves records from a key the route does not name: the record is now wrapped
    // under "staff" only (the pages route reads the copy; the users route no longer can).
    let (ok, out) = cli(
        &proxy,
        &["keys", "rewrap", "--route", "pages", "--from", "users"],
        "",
    );
    assert!(ok && out.contains("1 records rewrapped"), "{out}");
    let moved = replica(&proxy, &routes).await;
    let r = http.get(&moved.url("/tenants/acme/page"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u1"));
    let r = http.get(&moved.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.error_code(), "key_record_invalid", "{}", r.text());
    // `--from` must name a key.
    let (ok, out) = cli(
        &proxy,
        &["keys", "rewrap", "--route", "pages", "--from", ""],
        "",
    );
    assert!(!ok && out.contains("not a key"), "{out}");
    // One bad document in the vault stops management loudly (nothing is done on a partial
    // view), and is named so that it can be found.
    let w = http
        .post_json(
            &format!("{}/envelope-keys", js.url()),
            &[],
            &json!({"id": "x", "record": 5}),
        )
        .await;
    assert!(w.status.is_success(), "{}", w.text());
    let (ok, out) = cli(&proxy, &["keys", "rewrap", "--route", "pages"], "");
    assert!(
        !ok && out.contains("document 1 of the listing is not a vault document"),
        "{out}"
    );
}

#[tokio::test]
async fn v1_and_v2_values_in_one_document_and_every_route_reads_both() {
    let js = JsonServer::start();
    let v1 = Proxy::start(&route(&js.url(), "v1"), "").await;
    let v2 = replica(&v1, &route(&js.url(), "v2")).await;
    let http = Http::default();
    let w = http
        .post_json(&v1.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let old = stored_user(&js, "u1").await;
    assert!(old["ssn"].as_str().unwrap().starts_with("enc:v1:"));
    // The v2 route reads v1 tokens; its writes are v2.
    let r = http.get(&v2.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.json(), sample("u1"), "{}", r.text());
    let w = http
        .send(
            Method::PUT,
            &v2.url("/tenants/acme/users/u1"),
            &[("content-type", "application/json")],
            sample("u1").to_string(),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let new = stored_user(&js, "u1").await;
    assert!(new["ssn"].as_str().unwrap().starts_with("enc:v2:"));
    // One document with both: ssn in v1, the rest in v2. Both routes read it.
    let mut mixed = new.clone();
    mixed["ssn"] = old["ssn"].clone();
    http.put_json(&format!("{}/users/u1", js.url()), &mixed)
        .await;
    for p in [&v1, &v2] {
        let r = http.get(&p.url("/tenants/acme/users/u1"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json(), sample("u1"));
    }
    // A route without a vault cannot read v2 tokens: a clear error, not redaction.
    let bare = route(&js.url(), "v1");
    let bare = &bare[..bare.find("[route.key_vault]").unwrap()];
    let no_vault = replica(&v1, bare).await;
    let r = http.get(&no_vault.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_missing");
}

#[tokio::test]
async fn a_directory_vault_serves_a_single_node() {
    let js = JsonServer::start();
    let routes = route(&js.url(), "v2").replace(
        "kind = \"rest\"\npath = \"/envelope-keys/{id}\"\ncreate = \"post\"",
        "kind = \"dir\"\ndir = \"{DIR}/vault\"",
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let token = stored_user(&js, "u1").await["ssn"]
        .as_str()
        .unwrap()
        .to_string();
    let file = proxy
        .dir
        .path()
        .join("vault")
        .join(format!("{}.json", token_record(&token)));
    let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(doc["id"], token_record(&token));
    assert!(records(&js).await.is_empty(), "nothing in the REST store");
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.json(), sample("u1"));
}

#[test]
fn bad_vault_settings_are_config_errors() {
    let base = route("http://127.0.0.1:9", "v2");
    for (from, to, says) in [
        (
            "path = \"/envelope-keys/{id}\"",
            "path = \"/envelope-keys\"",
            "/{id}",
        ),
        (
            "path = \"/envelope-keys/{id}\"",
            "path = \"/k/{id}?x=1\"",
            "/{id}",
        ),
        ("create = \"post\"", "create = \"patch\"", "create"),
        ("kind = \"rest\"", "kind = \"s3\"", "kind"),
        (
            "token_format = \"v2\"",
            "token_format = \"v3\"",
            "token_format",
        ),
    ] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"/tmp/k.json\"\nmaster_key_file = \"/tmp/m.key\"\n{}",
            base.replace(from, to)
        );
        let e = envelope_proxy::config::parse(&text)
            .expect_err(to)
            .to_string();
        assert!(e.contains(says), "{to}: {e}");
    }
    // A route that forwards clients to the vault's records on the same store.
    for exposing in ["/**", "/envelope-keys/{id?}", "/ENVELOPE-KEYS/**"] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"/tmp/k.json\"\nmaster_key_file = \"/tmp/m.key\"\n{base}\n[[route]]\nname = \"rest\"\npath = \"{exposing}\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\nauth = \"none\"\n"
        );
        let e = envelope_proxy::config::parse(&text)
            .expect_err(exposing)
            .to_string();
        assert!(
            e.contains("forwards requests to the key vault"),
            "{exposing}: {e}"
        );
    }
    // v2 without a vault.
    let cut = &base[..base.find("[route.key_vault]").unwrap()];
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"/tmp/k.json\"\nmaster_key_file = \"/tmp/m.key\"\n{cut}"
    );
    let e = envelope_proxy::config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a key_vault"), "{e}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Run the CLI with the proxy's config; returns (success, stdout + stderr).
fn cli(proxy: &Proxy, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .arg("--config")
        .arg(&proxy.config_path)
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
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `keys shred --route users ARGS...` with the proxy's config.
fn shred(proxy: &Proxy, args: &[&str]) -> (bool, String) {
    let mut all = vec!["keys", "shred", "--route", "users"];
    all.extend_from_slice(args);
    cli(proxy, &all, "")
}

/// The root-key versions in a stored record's EDKs.
fn record_versions(doc: &Value) -> Vec<u32> {
    use envelope_proxy::envelope::record::Record;
    let rec = Record::decode(&base64_decode(doc["record"].as_str().unwrap())).unwrap();
    rec.header.edks.iter().map(|e| e.key_version).collect()
}

#[tokio::test]
async fn rewrap_changes_records_only_and_old_versions_can_then_be_retired() {
    let js = JsonServer::start();
    let routes = route(&js.url(), "v2");
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    for (tenant, id) in [("acme", "u1"), ("acme", "u2"), ("globex", "g1")] {
        let w = http
            .post_json(
                &proxy.url(&format!("/tenants/{tenant}/users")),
                &[],
                &sample(id),
            )
            .await;
        assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    }
    let data_before = stored_users(&js).await.to_string();
    let recs = records(&js).await;
    assert_eq!(recs.len(), 2, "one record per key context");
    assert!(recs.iter().all(|r| record_versions(r) == vec![1]));

    let (ok, out) = cli(&proxy, &["keys", "rotate", "users"], "");
    assert!(ok, "{out}");
    let (ok, out) = cli(&proxy, &["keys", "rewrap", "--route", "users"], "");
    assert!(ok, "{out}");
    assert!(out.contains("2 records rewrapped"), "{out}");
    // The data is byte for byte what it was; the records now name version 2, same ids.
    assert_eq!(stored_users(&js).await.to_string(), data_before);
    let after = records(&js).await;
    assert_eq!(
        after.iter().map(|r| &r["id"]).collect::<Vec<_>>(),
        recs.iter().map(|r| &r["id"]).collect::<Vec<_>>()
    );
    assert!(
        after.iter().all(|r| record_versions(r) == vec![2]),
        "{after:?}"
    );
    // Nothing left to do on a second run.
    let (ok, out) = cli(&proxy, &["keys", "rewrap", "--route", "users"], "");
    assert!(
        ok && out.contains("0 records rewrapped, 2 already current"),
        "{out}"
    );

    // Version 1 can go: every value still opens on a fresh replica.
    let (ok, out) = cli(
        &proxy,
        &[
            "keys",
            "retire-version",
            "users",
            "--version",
            "1",
            "--unused-days",
            "0",
        ],
        "",
    );
    assert!(ok, "{out}");
    let fresh = replica(&proxy, &routes).await;
    for (tenant, id) in [("acme", "u1"), ("acme", "u2"), ("globex", "g1")] {
        let r = http
            .get(&fresh.url(&format!("/tenants/{tenant}/users/{id}")), &[])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json(), sample(id));
    }
}

#[tokio::test]
async fn shredding_a_key_context_makes_exactly_its_values_unreadable_after_the_window() {
    use envelope_proxy::keys::vault::{self, manage};
    let js = JsonServer::start();
    let routes = route(&js.url(), "v2");
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    for (tenant, id) in [("acme", "u1"), ("globex", "g1")] {
        let w = http
            .post_json(
                &proxy.url(&format!("/tenants/{tenant}/users")),
                &[],
                &sample(id),
            )
            .await;
        assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    }
    let read = |p: &Proxy, tenant: &str, id: &str| p.url(&format!("/tenants/{tenant}/users/{id}"));

    // Context keys must be the route's.
    let (ok, out) = shred(&proxy, &["--context", "x=acme"]);
    assert!(!ok && out.contains("key context"), "{out}");
    let (ok, out) = shred(&proxy, &["--context", "tenant=acme", "--days", "3"]);
    assert!(!ok && out.contains("7 to 30 days"), "{out}");
    let (ok, out) = shred(&proxy, &["--context", "tenant=acme", "--days", "7"]);
    assert!(ok && out.contains("1 records scheduled"), "{out}");
    // During the window: acme's values are refused (and audited), globex's open.
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&read(&fresh, "acme", "u1"), &[]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_pending_shred");
    let audit = fresh.audit_for("/tenants/acme/users/u1", 409).await;
    assert_eq!(audit["outcome"], "error", "{audit}");
    // Counted for the alarm (EnvelopeProxyShreddedRecordUsed).
    let label = format!("vault:rest:{}/envelope-keys/{{id}}", js.url());
    assert_eq!(
        fresh
            .state()
            .metrics
            .key_state_refusals_of(&label, "pending_shred"),
        1
    );
    let r = http.get(&read(&fresh, "globex", "g1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Cancelled: readable again.
    let (ok, out) = shred(&proxy, &["--context", "tenant=acme", "--cancel"]);
    assert!(ok && out.contains("1 records back in use"), "{out}");
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&read(&fresh, "acme", "u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Scheduled again; before the window nothing is deleted, after it acme's record is gone.
    let (ok, out) = shred(&proxy, &["--context", "tenant=acme", "--days", "7"]);
    assert!(ok, "{out}");
    let cfg = envelope_proxy::config::load(&proxy.config_path).unwrap();
    let users = cfg.routes.iter().find(|r| r.name == "users").unwrap();
    let envelope_proxy::config::RouteKind::JsonFields(jr) = &users.kind else {
        panic!("a JSON route")
    };
    let v = vault::open(jr.key_vault.as_ref().unwrap(), &users.upstream, &cfg.server).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        manage::apply_due_shreds(&v, now + 6 * 86_400)
            .await
            .unwrap()
            .is_empty()
    );
    // A replica without a cached key writes for acme during the window: a new record, which
    // the shredding takes too (nothing written under that key context stays readable).
    let writer = replica(&proxy, &routes).await;
    let w = http
        .post_json(&writer.url("/tenants/acme/users"), &[], &sample("u3"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    assert_eq!(records(&js).await.len(), 3);
    let deleted = manage::apply_due_shreds(&v, now + 7 * 86_400 + 60)
        .await
        .unwrap();
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    assert_eq!(records(&js).await.len(), 1, "globex's record stays");
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&read(&fresh, "acme", "u1"), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), "key_record_missing");
    assert!(!r.text().contains("123-45-6789"));
    let r = http.get(&read(&fresh, "acme", "u3"), &[]).await;
    assert_eq!(r.error_code(), "key_record_missing", "{}", r.text());
    let r = http.get(&read(&fresh, "globex", "g1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("g1"));
}

#[tokio::test]
async fn decrypt_works_offline_with_a_vault_export() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&route(&js.url(), "v2"), "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let stored = stored_user(&js, "u1").await;
    let export = proxy.dir.path().join("vault-export.json");
    let (ok, out) = cli(
        &proxy,
        &[
            "keys",
            "vault-export",
            "--route",
            "users",
            "--out",
            export.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok && out.contains("1 records written"), "{out}");
    // The store is gone: only the export and the keyring remain.
    drop(js);
    let (ok, out) = cli(
        &proxy,
        &[
            "decrypt",
            "--route",
            "users",
            "--context",
            "tenant=acme",
            "--vault-export",
            export.to_str().unwrap(),
        ],
        &stored.to_string(),
    );
    assert!(ok, "{out}");
    let opened: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(opened, sample("u1"));
    // A bare v2 token with its field and record id context.
    let (ok, out) = cli(
        &proxy,
        &[
            "decrypt",
            "--route",
            "users",
            "--context",
            "tenant=acme",
            "--context",
            "id=u1",
            "--field",
            "$.ssn",
            "--vault-export",
            export.to_str().unwrap(),
        ],
        stored["ssn"].as_str().unwrap(),
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "\"123-45-6789\"");
    // Another tenant's context does not open it.
    let (ok, out) = cli(
        &proxy,
        &[
            "decrypt",
            "--route",
            "users",
            "--context",
            "tenant=globex",
            "--vault-export",
            export.to_str().unwrap(),
        ],
        &stored.to_string(),
    );
    assert!(!ok, "{out}");
    assert!(!out.contains("123-45-6789"), "{out}");
}

/// With AWS KMS (moto) and an escrow key beside it: the token is as small as with the local
/// keyring, the record holds both EDKs, a cold replica opens it through KMS.
#[cfg(feature = "aws-kms")]
#[tokio::test]
async fn v2_with_aws_kms_and_an_escrow_key() {
    use common::Moto;
    let moto = Moto::start();
    moto.create_key("alias/users-v2").await;
    let js = JsonServer::start();
    let creds = tempfile::tempdir().unwrap();
    let creds_file = creds.path().join("credentials");
    std::fs::write(
        &creds_file,
        "[moto]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let backend = format!(
        "[backend.kms]\nkind = \"aws-kms\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\nprofile = \"moto\"\ncredentials_file = \"{}\"\n",
        moto.endpoint(),
        creds_file.display()
    );
    let routes = format!(
        "{backend}{}",
        route(&js.url(), "v2").replace(
            "key = \"users\"",
            "keys = [\"kms:alias/users-v2\", \"escrow\"]"
        )
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let stored = stored_user(&js, "u1").await;
    assert_eq!(stored["ssn"].as_str().unwrap().len(), 83, "{stored}");
    let recs = records(&js).await;
    assert_eq!(recs.len(), 1);
    let rec = envelope_proxy::envelope::record::Record::decode(&base64_decode(
        recs[0]["record"].as_str().unwrap(),
    ))
    .unwrap();
    let backends: Vec<&str> = rec.header.edks.iter().map(|e| e.backend.as_str()).collect();
    assert_eq!(backends, ["kms", "local"]);
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&fresh.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), sample("u1"));
}

/// Shredding through the admin API: authorized by the key policy, audited.
#[tokio::test]
async fn shredding_through_the_admin_api_is_authorized_and_audited() {
    let js = JsonServer::start();
    let admin = r#"
[admin]
listen = "127.0.0.1:0"
auth = "none"

[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "app"
effect = "allow"
principals = ["anonymous"]
actions = ["seal", "open", "schedule-deletion", "cancel-deletion"]
"#;
    let routes = format!("{admin}{}", route(&js.url(), "v2"));
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &sample("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let port = proxy.running.as_ref().unwrap().admin_addr.unwrap().port();
    let api = |p: &str| format!("http://127.0.0.1:{port}{p}");

    let r = http
        .post_json(
            &api("/v1/routes/users/shred"),
            &[],
            &json!({"context": {"tenant": "acme"}, "days": 3}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = http
        .post_json(
            &api("/v1/routes/users/shred"),
            &[],
            &json!({"context": {"region": "acme"}, "days": 7}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = http
        .post_json(
            &api("/v1/routes/users/shred"),
            &[],
            &json!({"context": {"tenant": "acme"}, "days": 7}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["records"].as_array().unwrap().len(), 1);
    let audit = proxy.audit_for("/v1/routes/users/shred", 200).await;
    assert_eq!(audit["action"], "admin:shred", "{audit}");
    assert_eq!(audit["principal"], "anonymous", "{audit}");
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&fresh.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.error_code(), "key_record_pending_shred", "{}", r.text());
    let r = http
        .post_json(
            &api("/v1/routes/users/shred/cancel"),
            &[],
            &json!({"context": {"tenant": "acme"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let audit = proxy.audit_for("/v1/routes/users/shred/cancel", 200).await;
    assert_eq!(audit["action"], "admin:cancel-shred", "{audit}");
    let fresh = replica(&proxy, &routes).await;
    let r = http.get(&fresh.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Unknown routes and routes without a vault.
    let r = http
        .post_json(
            &api("/v1/routes/nope/shred"),
            &[],
            &json!({"context": {"tenant": "acme"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
}
