//! `envelope-proxy reencrypt` end to end (issue 11): a json-server collection and a moto bucket
//! holding values under mixed key versions (written, `keys rotate`, written again), counted by
//! `--dry-run`, rewritten through the proxy's own routes, interrupted (`--max-items`) and
//! resumed from the checkpoint, with a concurrent writer whose value must survive; and the
//! gateway's copy onto itself, which re-seals a stale object and copies a current one
//! server-side. The proxy runs in this process; the CLI binary is run as an operator would.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Http, JsonServer, Moto, Proxy};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_envelope-proxy");

/// Run the CLI with the proxy's config; (exit code, stdout, stderr).
async fn cli(proxy: &Proxy, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&proxy.config_path)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `reencrypt` and parse its JSON summary (the last stdout line); assert the exit code.
async fn reencrypt(proxy: &Proxy, args: &[&str], code: i32) -> Value {
    let mut all = vec!["reencrypt", "--proxy"];
    let url = proxy.url("");
    all.push(&url);
    all.extend_from_slice(args);
    let (got, out, err) = cli(proxy, &all).await;
    assert_eq!(got, code, "reencrypt {args:?}: exit {got}\n{out}\n{err}");
    serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no JSON summary ({e}):\n{out}\n{err}"))
}

async fn rotate(proxy: &Proxy, key: &str) {
    let (code, out, err) = cli(proxy, &["keys", "rotate", key]).await;
    assert_eq!(code, 0, "{out}{err}");
    // The running proxy reloads the keyring within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

fn json_route(js: &JsonServer) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{}"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#,
        js.url()
    )
}

/// (key, version) of each EDK of every stored user's `ssn` token, by id.
fn stored_versions(js: &JsonServer) -> Vec<(String, Vec<(String, u32)>)> {
    let db: Value = serde_json::from_str(&js.db_file()).unwrap();
    db["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let token = u["ssn"].as_str().unwrap();
            let parsed = envelope_proxy::envelope::token::ParsedToken::parse(token)
                .unwrap_or_else(|e| panic!("{token}: {e}"));
            let edks = parsed
                .header
                .edks
                .iter()
                .map(|e| (e.key_id.clone(), e.key_version))
                .collect();
            (u["id"].as_str().unwrap().to_string(), edks)
        })
        .collect()
}

fn version_of(js: &JsonServer, id: &str) -> u32 {
    let all = stored_versions(js);
    let (_, edks) = all.iter().find(|(i, _)| i == id).unwrap();
    assert_eq!(edks.len(), 1);
    edks[0].1
}

fn ssn(id: &str) -> String {
    format!("{id}-secret-ssn")
}

async fn write_users(http: &Http, proxy: &Proxy, js: &JsonServer, ids: &[&str]) {
    for id in ids {
        let r = http
            .post_json(
                &proxy.url("/tenants/acme/users"),
                &[],
                &json!({ "id": id, "ssn": ssn(id), "name": format!("user {id}") }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // json-server writes its file a moment later.
    for _ in 0..100 {
        let db = js.db_file();
        if ids.iter().all(|id| db.contains(&format!("\"{id}\""))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{ids:?} never reached json-server's file");
}

/// Every user reads back through the proxy as written.
async fn all_read_back(http: &Http, proxy: &Proxy, ids: &[&str]) {
    for id in ids {
        let r = http
            .get(&proxy.url(&format!("/tenants/acme/users/{id}")), &[])
            .await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({ "id": id, "ssn": ssn(id), "name": format!("user {id}") })
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_collection_counted_interrupted_resumed_and_rewritten() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&json_route(&js), "").await;

    let http = Http::default();
    let old = ["u1", "u2", "u3", "u4", "u5"];
    let new = ["u6", "u7", "u8"];
    write_users(&http, &proxy, &js, &old).await;
    rotate(&proxy, "users").await;
    write_users(&http, &proxy, &js, &new).await;
    for id in old {
        assert_eq!(version_of(&js, id), 1);
    }
    for id in new {
        assert_eq!(version_of(&js, id), 2);
    }
    let walk = [
        "--route",
        "users",
        "--collection",
        "/tenants/acme/users",
        "--limit",
        "3",
    ];

    // Dry run: counts by key and version, writes nothing.
    let before = js.db_file();
    let s = reencrypt(&proxy, &[&walk[..], &["--dry-run"]].concat(), 0).await;
    assert_eq!(s["route"], "users");
    assert_eq!(s["scanned"], 8);
    assert_eq!(s["stale"], 5);
    assert_eq!(s["rewritten"], 0);
    assert_eq!(s["by_version"], json!({ "users:1": 5, "users:2": 3 }));
    assert_eq!(js.db_file(), before);

    // Interrupted after 3 items: the checkpoint says where.
    let cp = proxy.dir.path().join("users.checkpoint");
    let cp_arg = cp.to_str().unwrap();
    let resume = ["--resume", cp_arg, "--checkpoint-every", "1"];
    let s = reencrypt(
        &proxy,
        &[
            &walk[..],
            &resume,
            &["--max-items", "3", "--concurrency", "2"],
        ]
        .concat(),
        0,
    )
    .await;
    assert_eq!(
        (s["scanned"].as_u64(), s["rewritten"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(s["stopped_early"], true);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert_eq!(saved["last"], "u3");
    for id in ["u1", "u2", "u3"] {
        assert_eq!(version_of(&js, id), 2, "{id} rewritten");
    }
    for id in ["u4", "u5"] {
        assert_eq!(version_of(&js, id), 1, "{id} not reached yet");
    }

    // Resumed: the rest, with the counts of the whole walk.
    let s = reencrypt(&proxy, &[&walk[..], &resume, &["--rate", "50"]].concat(), 0).await;
    assert_eq!(s["scanned"], 8, "{s}");
    assert_eq!(s["stale"], 5);
    assert_eq!(s["rewritten"], 5);
    assert_eq!(s["conflicts"], 0);
    assert_eq!(s["errors"], 0);
    assert!(s.get("stopped_early").is_none(), "{s}");
    assert!(
        !cp.exists(),
        "a walk that went through removes its checkpoint"
    );
    for (id, edks) in stored_versions(&js) {
        assert_eq!(edks, [("users".to_string(), 2)], "{id}");
    }
    all_read_back(&http, &proxy, &[&old[..], &new[..]].concat()).await;

    // Nothing left; PATCH mode and an id file read the same way.
    let ids = proxy.dir.path().join("ids.txt");
    std::fs::write(&ids, "u1\nu8\n").unwrap();
    let s = reencrypt(
        &proxy,
        &[
            "--route",
            "users",
            "--collection",
            "/tenants/acme/users",
            "--ids",
            ids.to_str().unwrap(),
            "--patch",
        ],
        0,
    )
    .await;
    assert_eq!(
        (s["scanned"].as_u64(), s["stale"].as_u64()),
        (Some(2), Some(0))
    );

    // keys usage: both versions were used (the keyring's notes), the audit log named the key.
    let audit = proxy.dir.path().join("audit.log");
    let (code, out, err) = cli(
        &proxy,
        &[
            "keys",
            "usage",
            "users",
            "--audit",
            audit.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let usage: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(usage["key"], "users");
    assert!(
        usage["versions"]["1"].is_object() && usage["versions"]["2"].is_object(),
        "{usage}"
    );
    // 5 writes under version 1 and the rewrites' reads; 3 writes and the rewrites under 2.
    let requests = |v: &str| usage["versions"][v]["requests"].as_u64().unwrap();
    assert!(requests("1") >= 5 + 5, "{usage}");
    assert!(requests("2") >= 3 + 5, "{usage}");
    assert!(
        usage["versions"]["2"]["last_request"].is_string(),
        "{usage}"
    );
    assert!(usage["versions"].get("unknown").is_none(), "{usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_concurrent_writer_is_never_overwritten() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&json_route(&js), "").await;

    let http = Http::default();
    write_users(&http, &proxy, &js, &["c1", "c2", "c3"]).await;
    rotate(&proxy, "users").await;

    // The run reads every stale record, then waits before writing; meanwhile c2 is updated.
    let run = {
        let args: Vec<String> = [
            "reencrypt",
            "--proxy",
            &proxy.url(""),
            "--route",
            "users",
            "--collection",
            "/tenants/acme/users",
            "--concurrency",
            "4",
            "--pause-before-write-ms",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&proxy.config_path)
            .args(args)
            .output()
    };
    let writer = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let r = http
            .put_json(
                &proxy.url("/tenants/acme/users/c2"),
                &json!({ "id": "c2", "ssn": "changed-meanwhile", "name": "user c2" }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let (out, ()) = tokio::join!(run, writer);
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "conflicts left: {stdout}\n{stderr}"
    );
    let s: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(s["conflicts"], 1, "{s}");
    assert_eq!(s["rewritten"], 2, "{s}");
    assert!(stderr.contains("conflict: c2"), "{stderr}");
    // The concurrent value is intact.
    let r = http.get(&proxy.url("/tenants/acme/users/c2"), &[]).await;
    assert_eq!(r.json()["ssn"], "changed-meanwhile");
    all_read_back(&http, &proxy, &["c1", "c3"]).await;
    // A second run finds nothing stale (c2 was written under the current version).
    let s = reencrypt(
        &proxy,
        &["--route", "users", "--collection", "/tenants/acme/users"],
        0,
    )
    .await;
    assert_eq!(
        (s["scanned"].as_u64(), s["stale"].as_u64()),
        (Some(3), Some(0))
    );
    for (id, edks) in stored_versions(&js) {
        assert_eq!(edks, [("users".to_string(), 2)], "{id}");
    }
}

// ---------------------------------------------------------------------------------------------
// S3

fn python() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers/venv/bin/python")
        .display()
        .to_string()
}

/// Run boto3 `code` with `proxy` (the gateway, test client) and `raw` (moto) clients defined.
async fn boto(gateway: &Proxy, moto: &Moto, code: &str) -> String {
    let script = format!(
        "import boto3, hashlib, sys\n\
         from botocore.config import Config\n\
         cfg = Config(s3={{'addressing_style': 'path'}}, request_checksum_calculation='when_required', response_checksum_validation='when_required')\n\
         proxy = boto3.client('s3', endpoint_url='{}', aws_access_key_id='{}', aws_secret_access_key='{}', region_name='us-east-1', config=cfg)\n\
         raw = boto3.client('s3', endpoint_url='{}', aws_access_key_id='testing', aws_secret_access_key='testing', region_name='us-east-1', config=cfg)\n\
         {code}\n",
        gateway.url(""),
        common::s3::CLIENT_KEY,
        common::s3::CLIENT_SECRET,
        moto.endpoint(),
    );
    common::s3::run(&python(), &["-c", &script], &[]).await
}

/// The body of object `key` as written by [`write_objects`].
fn body_code(key: &str) -> String {
    format!("(b'{key}:' * 40000)")
}

async fn write_objects(gateway: &Proxy, moto: &Moto, keys: &[&str]) {
    let mut code = String::new();
    for k in keys {
        code.push_str(&format!(
            "proxy.put_object(Bucket='objs', Key='{k}', Body={}, Metadata={{'owner': '{k}'}})\n",
            body_code(k)
        ));
    }
    boto(gateway, moto, &code).await;
}

/// A 2-part object written through the gateway (multipart upload).
async fn write_multipart(gateway: &Proxy, moto: &Moto, key: &str) {
    let code = format!(
        "u = proxy.create_multipart_upload(Bucket='objs', Key='{key}', Metadata={{'owner': 'mp'}})\n\
         parts = []\n\
         for n in (1, 2):\n\
         \x20   r = proxy.upload_part(Bucket='objs', Key='{key}', UploadId=u['UploadId'], PartNumber=n, Body=bytes([n]) * (5 * 1024 * 1024 if n == 1 else 1000))\n\
         \x20   parts.append({{'PartNumber': n, 'ETag': r['ETag']}})\n\
         proxy.complete_multipart_upload(Bucket='objs', Key='{key}', UploadId=u['UploadId'], MultipartUpload={{'Parts': parts}})\n"
    );
    boto(gateway, moto, &code).await;
}

/// What storage holds for one object: (key, [(key id, version)], metadata owner, ETag).
type StoredObject = (String, Vec<(String, u32)>, String, String);

async fn stored_objects(gateway: &Proxy, moto: &Moto) -> Vec<StoredObject> {
    let out = boto(
        gateway,
        moto,
        "import json\n\
         for o in raw.list_objects_v2(Bucket='objs').get('Contents', []):\n\
         \x20   h = raw.head_object(Bucket='objs', Key=o['Key'])\n\
         \x20   print(json.dumps([o['Key'], h['Metadata'].get('ep-envelope'), h['Metadata'].get('owner'), h['ETag']]))",
    )
    .await;
    use base64::Engine;
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(v[1].as_str().unwrap())
                .unwrap();
            let (h, _) = envelope_proxy::envelope::Header::decode(&raw).unwrap();
            (
                v[0].as_str().unwrap().to_string(),
                h.edks
                    .iter()
                    .map(|e| (e.key_id.clone(), e.key_version))
                    .collect(),
                v[2].as_str().unwrap_or("").to_string(),
                v[3].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Each object reads back through the gateway as written.
async fn objects_read_back(gateway: &Proxy, moto: &Moto, keys: &[&str]) {
    let mut code = String::new();
    for k in keys {
        code.push_str(&format!(
            "assert proxy.get_object(Bucket='objs', Key='{k}')['Body'].read() == {}, '{k}'\n",
            body_code(k)
        ));
    }
    code.push_str(
        "b = proxy.get_object(Bucket='objs', Key='mp')['Body'].read()\n\
         assert b == bytes([1]) * (5 * 1024 * 1024) + bytes([2]) * 1000, 'mp'\n\
         print('ok')",
    );
    assert_eq!(boto(gateway, moto, &code).await.trim(), "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_bucket_counted_interrupted_resumed_and_resealed() {
    let moto = Moto::start();
    let secrets = tempfile::tempdir().unwrap();
    let gateway = common::s3::gateway(&moto, secrets.path(), "").await;
    boto(&gateway, &moto, "raw.create_bucket(Bucket='objs')").await;
    write_objects(&gateway, &moto, &["a", "b", "c/d e"]).await;
    write_multipart(&gateway, &moto, "mp").await;
    rotate(&gateway, "objects").await;
    write_objects(&gateway, &moto, &["z"]).await;
    let walk = ["--route", "objects", "--bucket", "objs"];

    let s = reencrypt(&gateway, &[&walk[..], &["--dry-run"]].concat(), 0).await;
    assert_eq!(s["scanned"], 5, "{s}");
    assert_eq!(s["stale"], 4);
    assert_eq!(s["by_version"], json!({ "objects:1": 4, "objects:2": 1 }));

    let cp = gateway.dir.path().join("objs.checkpoint");
    let resume = ["--resume", cp.to_str().unwrap(), "--checkpoint-every", "1"];
    let s = reencrypt(
        &gateway,
        &[&walk[..], &resume, &["--max-items", "2"]].concat(),
        0,
    )
    .await;
    assert_eq!(
        (s["scanned"].as_u64(), s["rewritten"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert_eq!(saved["last"], "b");
    let stored = stored_objects(&gateway, &moto).await;
    let version = |k: &str| stored.iter().find(|o| o.0 == k).unwrap().1.clone();
    assert_eq!(version("a"), [("objects".to_string(), 2)]);
    assert_eq!(
        version("mp"),
        [("objects".to_string(), 1)],
        "not reached yet"
    );

    let s = reencrypt(&gateway, &[&walk[..], &resume].concat(), 0).await;
    assert_eq!(s["scanned"], 5, "{s}");
    assert_eq!(s["rewritten"], 4, "{s}");
    assert_eq!(
        (s["conflicts"].as_u64(), s["errors"].as_u64()),
        (Some(0), Some(0))
    );
    for (key, edks, owner, _) in stored_objects(&gateway, &moto).await {
        assert_eq!(edks, [("objects".to_string(), 2)], "{key}");
        // User metadata kept by the copy.
        let want = if key == "mp" { "mp" } else { key.as_str() };
        assert_eq!(owner, want, "{key}");
    }
    objects_read_back(&gateway, &moto, &["a", "b", "c/d e", "z"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_copy_onto_itself_reseals_only_stale_objects() {
    let moto = Moto::start();
    let secrets = tempfile::tempdir().unwrap();
    let gateway = common::s3::gateway(&moto, secrets.path(), "").await;
    boto(&gateway, &moto, "raw.create_bucket(Bucket='objs')").await;
    write_objects(&gateway, &moto, &["old"]).await;
    rotate(&gateway, "objects").await;
    write_objects(&gateway, &moto, &["new"]).await;
    let before = stored_objects(&gateway, &moto).await;
    let (_, raw_old) = common::s3::raw_get(&moto, "objs", "old").await;
    let (_, raw_new) = common::s3::raw_get(&moto, "objs", "new").await;

    boto(
        &gateway,
        &moto,
        "for k in ('old', 'new'):\n\
         \x20   proxy.copy_object(Bucket='objs', Key=k, CopySource={'Bucket': 'objs', 'Key': k}, MetadataDirective='REPLACE', Metadata={'owner': k, 'copied': '1'})",
    )
    .await;
    let after = stored_objects(&gateway, &moto).await;
    let find = |v: &[StoredObject], k: &str| v.iter().find(|o| o.0 == k).unwrap().clone();
    // The stale one: re-sealed under the current version (new ciphertext, new data key).
    assert_eq!(find(&before, "old").1, [("objects".to_string(), 1)]);
    assert_eq!(find(&after, "old").1, [("objects".to_string(), 2)]);
    assert_ne!(common::s3::raw_get(&moto, "objs", "old").await.1, raw_old);
    // The current one: copied server-side, the stored bytes and envelope untouched.
    assert_eq!(find(&after, "new").1, [("objects".to_string(), 2)]);
    assert_eq!(common::s3::raw_get(&moto, "objs", "new").await.1, raw_new);
    assert_eq!(
        find(&after, "new").3,
        find(&before, "new").3,
        "same ciphertext ETag"
    );
    let out = boto(
        &gateway,
        &moto,
        "for k in ('old', 'new'):\n\
         \x20   r = proxy.get_object(Bucket='objs', Key=k)\n\
         \x20   assert r['Body'].read() == (k.encode() + b':') * 40000, k\n\
         \x20   assert r['Metadata'].get('copied') == '1', r['Metadata']\n\
         print('ok')",
    )
    .await;
    assert_eq!(out.trim(), "ok");
}
