//! Who may use which key, end to end: key policies (conditions on the encryption context,
//! deny over allow, default deny), masked and withheld reads, route `require` rules, on JSON
//! routes in front of json-server and S3 routes in front of moto. What reached storage is
//! read back directly; refusals are checked to have forwarded nothing, and to be audited and
//! counted.

mod common;

use common::{Http, JsonServer, Moto, Proxy};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn route(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
key = "users"
fields = ["$.ssn", "$.name", "$.email", "$.note"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
mask = {{ "$.ssn" = "last4", "$.name" = "first1", "$.email" = "hash", "$.note" = {{ fixed = "[hidden]" }} }}
{extra}
"#
    )
}

fn policy(statements: &str) -> String {
    format!(
        r#"
[masking]
hash_key_file = "{{DIR}}/mask.key"

[[key_policy]]
key = "users"
{statements}
"#
    )
}

async fn start(js: &JsonServer, statements: &str) -> Proxy {
    // The masking key must exist (mode 0600) before the proxy starts: write it in a
    // directory the proxy then uses as its own.
    let routes = route(&js.url(), "") + &policy(statements);
    Proxy::start_with_files(&routes, "", &[("mask.key", "mask-key-for-tests")]).await
}

fn doc(id: &str) -> Value {
    json!({ "id": id, "ssn": "123-45-6789", "name": "Jane", "email": "jane@example.com", "note": "vip", "plan": "pro" })
}

fn stored(js: &JsonServer) -> Value {
    serde_json::from_str::<Value>(&js.db_file()).unwrap()["users"].clone()
}

#[tokio::test]
async fn masked_reads_for_principals_allowed_open_masked_only() {
    let js = JsonServer::start();
    let proxy = start(
        &js,
        r#"
[[key_policy.statement]]
sid = "write-and-read-masked"
effect = "allow"
principals = ["anonymous"]
actions = ["seal", "open-masked"]
"#,
    )
    .await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    // Storage holds tokens only (json-server writes its file just after answering).
    let mut at_rest = stored(&js);
    for _ in 0..100 {
        if at_rest.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        at_rest = stored(&js);
    }
    for f in ["ssn", "name", "email", "note"] {
        assert!(
            at_rest[0][f]
                .as_str()
                .is_some_and(|t| t.starts_with("enc:")),
            "{f}: {at_rest}"
        );
    }
    assert!(!js.db_file().contains("123-45-6789"));
    // The write's own response is masked too (no `open`).
    assert_eq!(w.json()["ssn"], "***-**-6789");

    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = r.json();
    assert_eq!(got["ssn"], "***-**-6789");
    assert_eq!(got["name"], "J***");
    assert_eq!(got["note"], "[hidden]");
    assert_eq!(got["plan"], "pro", "unencrypted fields are as stored");
    let h = got["email"].as_str().unwrap();
    assert_eq!(h.len(), 64, "a keyed hash: {h}");
    assert!(!h.contains("jane"));
    // Equal values hash equally (joins), across records and data keys.
    http.post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u2"))
        .await;
    let r2 = http.get(&proxy.url("/tenants/acme/users/u2"), &[]).await;
    assert_eq!(r2.json()["email"], got["email"]);
    let line = proxy.audit_of("/tenants/acme/users/u2").await;
    assert_eq!(line["outcome"], "masked", "{line}");
    assert_eq!(line["principal"], "anonymous");
    assert_eq!(line["basis"][0], "statement:write-and-read-masked");
    assert!(proxy.verify_audit().keyed >= 4);
}

#[tokio::test]
async fn default_deny_forwards_nothing_and_is_audited_and_counted() {
    let js = JsonServer::start();
    // The policy lets nobody seal: a key with a policy denies what it does not allow.
    let proxy = start(
        &js,
        r#"
[[key_policy.statement]]
effect = "allow"
principals = ["anonymous"]
actions = ["open"]
"#,
    )
    .await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(w.status, StatusCode::FORBIDDEN, "{}", w.text());
    assert_eq!(w.error_code(), "access_denied");
    let msg = w.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("seal") && msg.contains("local:users"), "{msg}");
    assert_eq!(stored(&js), json!([]), "nothing reached storage");
    let line = proxy.audit_of("/tenants/acme/users").await;
    assert_eq!(line["outcome"], "denied", "{line}");
    assert_eq!(line["basis"][0], "no-allow");
    assert_eq!(line["status"], 403);
    assert_eq!(
        proxy
            .state()
            .metrics
            .denials_of("users", "local:users", "no-allow"),
        1
    );
}

#[tokio::test]
async fn deny_wins_and_context_conditions_pin_the_tenant() {
    let js = JsonServer::start();
    let proxy = start(
        &js,
        r#"
[[key_policy.statement]]
sid = "acme-only"
effect = "allow"
principals = ["*"]
actions = ["seal", "open"]
conditions = { "context.tenant" = { like = "acme*" } }
[[key_policy.statement]]
sid = "not-acme-test"
effect = "deny"
principals = ["*"]
actions = ["*"]
conditions = { "context.tenant" = "acme-test" }
"#,
    )
    .await;
    let http = Http::default();
    let ok = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text());
    assert_eq!(ok.json()["ssn"], "123-45-6789", "open allowed: plaintext");
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.json()["ssn"], "123-45-6789");
    // Another tenant's context: no statement allows it.
    let other = http
        .post_json(&proxy.url("/tenants/globex/users"), &[], &doc("u2"))
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    // The like-pattern would allow acme-test, the deny statement wins.
    let denied = http
        .get(&proxy.url("/tenants/acme-test/users/u1"), &[])
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.text());
    let line = proxy.audit_of("/tenants/acme-test/users/u1").await;
    assert_eq!(line["basis"][0], "deny:not-acme-test", "{line}");
    assert!(
        !denied.text().contains("not-acme-test"),
        "the client is never told the policy"
    );
    assert_eq!(stored(&js).as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn write_only_principals_get_withheld_values_and_no_reads() {
    let js = JsonServer::start();
    let proxy = start(
        &js,
        r#"
[[key_policy.statement]]
effect = "allow"
principals = ["anonymous"]
actions = ["seal"]
"#,
    )
    .await;
    let http = Http::default();
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    // The response's encrypted fields are withheld: never a token, never the value.
    let body = w.json();
    for f in ["ssn", "name", "email", "note"] {
        assert_eq!(body[f], Value::Null, "{f}: {body}");
    }
    assert_eq!(w.headers["x-envelope-withheld"], "4");
    // A read could show nothing: refused, not forwarded.
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "access_denied");
}

#[tokio::test]
async fn grant_tokens_never_reach_storage_and_forged_ones_do_not_open() {
    let js = JsonServer::start();
    let proxy = start(
        &js,
        r#"
[[key_policy.statement]]
effect = "allow"
principals = ["anonymous"]
actions = ["seal"]
"#,
    )
    .await;
    let http = Http::default();
    // A request carrying a (forged) grant token: the header is stripped before storage, and
    // the token allows nothing.
    let r = http
        .send(
            Method::GET,
            &proxy.url("/tenants/acme/users/u1"),
            &[("x-envelope-grant-token", "ept1.forged")],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

// -- S3 -----------------------------------------------------------------------------------

const ACME_KEY: &str = "AKIAACME";
const GLOBEX_KEY: &str = "AKIAGLOBEX";

async fn s3_gateway(moto: &Moto, extra_route: &str, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let secret = |n: &str, v: &str| {
        common::s3::secret_file(dir.path(), n, v)
            .display()
            .to_string()
    };
    let routes = format!(
        r#"
[[route]]
name = "objects"
kind = "s3"
path = "/**"
upstream = "{up}"
key = "objects"
context = {{ tenant = "{{principal.tenant}}", bucket = "{{s3.bucket}}" }}
require = {{ "s3.bucket" = "{{principal.tenant}}-data" }}
{extra_route}
[route.s3]
region = "us-east-1"
upstream_access_key_id_file = "{ak}"
upstream_secret_access_key_file = "{sk}"
[[route.s3.client]]
access_key_id = "{ACME_KEY}"
secret_access_key_file = "{acme}"
identity = "acme-app"
attributes = {{ tenant = "acme" }}
[[route.s3.client]]
access_key_id = "{GLOBEX_KEY}"
secret_access_key_file = "{globex}"
identity = "globex-app"
attributes = {{ tenant = "globex" }}
{extra}
"#,
        up = moto.endpoint(),
        ak = secret("ak", "testing"),
        sk = secret("sk", "testing"),
        acme = secret("acme", "acme-secret"),
        globex = secret("globex", "globex-secret"),
    );
    let p = Proxy::start(&routes, "").await;
    std::mem::forget(dir);
    p
}

async fn s3_send(
    proxy: &Proxy,
    (ak, sk): (&str, &str),
    method: Method,
    path: &str,
    body: &'static [u8],
) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let creds = envelope_proxy::s3::sign::UpstreamCredentials::new(
        ak.into(),
        zeroize::Zeroizing::new(sk.to_string()),
    );
    let mut req = http::Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
        .unwrap();
    envelope_proxy::s3::sign::sign_request(&mut req, &creds, "us-east-1").unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const ACME: (&str, &str) = (ACME_KEY, "acme-secret");
const GLOBEX: (&str, &str) = (GLOBEX_KEY, "globex-secret");

#[tokio::test]
async fn s3_principals_are_pinned_to_their_buckets_and_contexts() {
    let moto = Moto::start();
    let proxy = s3_gateway(
        &moto,
        "",
        r#"
[[key_policy]]
key = "objects"
[[key_policy.statement]]
sid = "own-tenant"
effect = "allow"
principals = ["*-app"]
actions = ["seal", "open"]
conditions = { "context.tenant" = "{principal.tenant}" }
"#,
    )
    .await;
    for (who, bucket) in [(ACME, "acme-data"), (GLOBEX, "globex-data")] {
        let (s, b) = s3_send(&proxy, who, Method::PUT, &format!("/{bucket}"), b"").await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let (s, b) = s3_send(
        &proxy,
        ACME,
        Method::PUT,
        "/acme-data/r.txt",
        b"acme report",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, at_rest) = common::s3::raw_get(&moto, "acme-data", "r.txt").await;
    assert!(
        !at_rest.windows(4).any(|w| w == b"acme"),
        "ciphertext at rest"
    );
    let (s, b) = s3_send(&proxy, ACME, Method::GET, "/acme-data/r.txt", b"").await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "acme report"));
    // Globex may not reach acme's bucket: the route's require rule, before any key use.
    let (s, b) = s3_send(&proxy, GLOBEX, Method::GET, "/acme-data/r.txt", b"").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("AccessDenied"), "{b}");
    let (s, _) = s3_send(&proxy, GLOBEX, Method::PUT, "/acme-data/x.txt", b"planted").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = common::s3::raw_get(&moto, "acme-data", "x.txt").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing was written");
    proxy.audit_of("/acme-data/x.txt").await;
    let lines = proxy.audit_lines();
    let put = lines
        .iter()
        .find(|l| l["method"] == "PUT" && l["path"] == "/acme-data/r.txt")
        .unwrap();
    assert_eq!(put["principal"], "acme-app");
    assert_eq!(put["action"], "seal");
    assert_eq!(put["basis"][0], "statement:own-tenant");
    let refused = lines.last().unwrap();
    assert_eq!(refused["principal"], "globex-app");
    assert_eq!(refused["outcome"], "denied");
    assert_eq!(
        proxy.state().metrics.denials_of("objects", "-", "require"),
        2
    );
}

#[tokio::test]
async fn s3_key_policy_refuses_before_any_key_use() {
    let moto = Moto::start();
    let proxy = s3_gateway(
        &moto,
        "",
        r#"
[[key_policy]]
key = "objects"
[[key_policy.statement]]
effect = "allow"
principals = ["acme-app"]
actions = ["seal", "open"]
[[key_policy.statement]]
sid = "globex-read-only"
effect = "allow"
principals = ["globex-app"]
actions = ["open"]
"#,
    )
    .await;
    s3_send(&proxy, GLOBEX, Method::PUT, "/globex-data", b"").await;
    let (s, b) = s3_send(&proxy, GLOBEX, Method::PUT, "/globex-data/a", b"data").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b.contains("may not seal"), "{b}");
    let (s, _) = common::s3::raw_get(&moto, "globex-data", "a").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        proxy
            .state()
            .metrics
            .denials_of("objects", "local:objects", "no-allow"),
        1
    );
    let line = proxy.audit_of("/globex-data/a").await;
    assert_eq!(line["basis"][0], "no-allow", "{line}");
}

#[tokio::test]
async fn quotas_answer_429_with_retry_after_and_forward_nothing() {
    let js = JsonServer::start();
    let routes = route(
        &js.url(),
        "quota = { seal_per_second = 1, open_per_second = 1000, burst = 2 }",
    );
    let proxy = Proxy::start(
        &routes.replace(
            r#"mask = { "$.ssn" = "last4", "$.name" = "first1", "$.email" = "hash", "$.note" = { fixed = "[hidden]" } }"#,
            "",
        ),
        "",
    )
    .await;
    let http = Http::default();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..3 {
        let r = http
            .post_json(
                &proxy.url("/tenants/acme/users"),
                &[],
                &doc(&format!("q{i}")),
            )
            .await;
        statuses.push(r.status);
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.error_code(), "quota_exceeded");
            retry_after = r.headers.get("retry-after").cloned();
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    // Reads have their own (here generous) quota.
    let r = http.get(&proxy.url("/tenants/acme/users/q0"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        stored(&js).as_array().unwrap().len(),
        2,
        "the refused write was not forwarded"
    );
    assert_eq!(proxy.state().metrics.denials_of("users", "-", "quota"), 1);
    let line = proxy.audit_for("/tenants/acme/users", 429).await;
    assert_eq!(line["status"], 429);
    assert_eq!(line["outcome"], "denied");
}

#[tokio::test]
async fn a_grant_token_works_on_a_replica_that_has_not_read_the_grant_yet() {
    let js = JsonServer::start();
    // This replica reads the grants file once an hour: a grant made elsewhere reaches it
    // only through its token.
    let routes = route(&js.url(), "")
        + &policy(
            r#"
[[key_policy.statement]]
effect = "allow"
principals = ["someone-else"]
actions = ["seal", "open"]
"#,
        )
        + "\n[grants]\nreload_secs = 3600\n";
    let proxy = Proxy::start_with_files(&routes, "", &[("mask.key", "mask-key-for-tests")]).await;
    let http = Http::default();
    let refused = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // Another replica (here the CLI, on the shared grants file) grants anonymous seal and open
    // on acme's context only.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["--config", proxy.config_path.to_str().unwrap()])
        .args([
            "grants",
            "create",
            "--key",
            "users",
            "--grantee",
            "anonymous",
        ])
        .args([
            "--operations",
            "seal,open",
            "--context-equals",
            "tenant=acme",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let (id, token) = (field("grant_id"), field("grant_token"));
    let with_token = [("x-envelope-grant-token", token.as_str())];
    // Without the token this replica does not know the grant yet.
    let still = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("u1"))
        .await;
    assert_eq!(still.status, StatusCode::FORBIDDEN);
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &with_token, &doc("u1"))
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    assert_eq!(w.json()["ssn"], "123-45-6789");
    let line = proxy.audit_for("/tenants/acme/users", 201).await;
    assert_eq!(line["basis"][0], format!("grant:{id}"), "{line}");
    assert!(!proxy.audit_text().contains(&token), "never the token");
    // The grant's constraint holds: another tenant's context is refused, token or not.
    let other = http
        .post_json(&proxy.url("/tenants/globex/users"), &with_token, &doc("u2"))
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    // A token altered by one character is refused.
    let mut forged = token.clone().into_bytes();
    let i = forged.len() - 3;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("x-envelope-grant-token", forged.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = http
        .get(&proxy.url("/tenants/acme/users/u1"), &with_token)
        .await;
    assert_eq!(r.json()["ssn"], "123-45-6789");
}

#[tokio::test]
async fn s3_quotas_answer_slow_down_and_write_nothing() {
    use http_body_util::BodyExt;
    let moto = Moto::start();
    let proxy = s3_gateway(&moto, "quota = { seal_per_second = 1, burst = 1 }", "").await;
    s3_send(&proxy, ACME, Method::PUT, "/acme-data", b"").await;
    let (s, b) = s3_send(&proxy, ACME, Method::PUT, "/acme-data/one", b"1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // The second write within the second: throttled, with S3's code and a Retry-After.
    let creds = envelope_proxy::s3::sign::UpstreamCredentials::new(
        ACME.0.into(),
        zeroize::Zeroizing::new(ACME.1.to_string()),
    );
    let mut req = http::Request::put(proxy.url("/acme-data/two"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"2")))
        .unwrap();
    envelope_proxy::s3::sign::sign_request(&mut req, &creds, "us-east-1").unwrap();
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("<Code>SlowDown</Code>"));
    let (s, _) = common::s3::raw_get(&moto, "acme-data", "two").await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "the throttled write was not forwarded"
    );
    // Reads are not limited by the seal quota.
    let (s, b) = s3_send(&proxy, ACME, Method::GET, "/acme-data/one", b"").await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "1"));
    assert_eq!(proxy.state().metrics.denials_of("objects", "-", "quota"), 1);
}
