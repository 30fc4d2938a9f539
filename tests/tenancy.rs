//! Client identity on the request path, end to end, in front of a real json-server: JWT
//! principals pinned to their tenant (route `require`, context from claims, key policies with
//! claim conditions, masking for support staff), mTLS principals (SPIFFE ids from client
//! certificates made here) and a trusted proxy's `x-forwarded-client-cert` header. What
//! reached storage is read back from json-server's file; refusals forward nothing.

mod common;

use std::time::Duration;

use common::jwt::{TestKey, jwks, now};
use common::pki::{Pki, client_config, https_send, write_leaf};
use common::{Http, JsonServer, Proxy};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const ISS: &str = "https://issuer.test";
const AUD: &str = "envelope-proxy";

fn db(js: &JsonServer) -> Value {
    serde_json::from_str::<Value>(&js.db_file()).unwrap()["users"].clone()
}

async fn db_when(js: &JsonServer, n: usize) -> Value {
    for _ in 0..100 {
        let users = db(js);
        if users.as_array().is_some_and(|a| a.len() >= n) {
            return users;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("json-server holds fewer than {n} users: {}", js.db_file())
}

fn ada() -> Value {
    json!({ "id": "u1", "name": "Ada", "ssn": "123-45-6789", "plan": "pro" })
}

// -- JWT ------------------------------------------------------------------------------------

const JWT_ROUTE: &str = r#"
[auth.jwt]
jwks_file = "{DIR}/jwks.json"
issuer = "https://issuer.test"
audience = "envelope-proxy"
attributes = { role = "role" }

[masking]
hash_key_file = "{DIR}/mask.key"

[[route]]
name = "users"
path = "/tenants/{tenant}/users/{id?}"
upstream = "UPSTREAM"
auth = "jwt"
require = { "path.tenant" = "{claim.tenant}" }
key = "users"
fields = ["$.ssn", "$.name"]
context = { tenant = "{claim.tenant}" }
message_context = { id = "{path.id|json.id}" }
mask = { "$.ssn" = "last4", "$.name" = "first1" }

[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "apps-own-tenant"
effect = "allow"
principals = ["app-*"]
actions = ["seal", "open"]
conditions = { "context.tenant" = "{claim.tenant}" }
[[key_policy.statement]]
sid = "support-masked"
effect = "allow"
principals = ["*"]
actions = ["open-masked"]
conditions = { "context.tenant" = "{claim.tenant}", "principal.role" = "support" }
"#;

async fn jwt_proxy(js: &JsonServer, key: &TestKey) -> Proxy {
    let routes = JWT_ROUTE.replace("UPSTREAM", &js.url());
    // The JWKS must be in the proxy's directory before it starts: written with the files the
    // proxy starts with (mode 0600; any mode will do for a JWKS), beside the mask key.
    Proxy::start_with_files(
        &routes,
        "",
        &[
            ("jwks.json", &jwks(&[key])),
            ("mask.key", "mask-key-for-tests"),
        ],
    )
    .await
}

fn token(key: &TestKey, sub: &str, tenant: &str, role: Option<&str>) -> String {
    let mut c = json!({"iss": ISS, "aud": AUD, "sub": sub, "tenant": tenant,
                       "exp": now() + 300, "iat": now()});
    if let Some(r) = role {
        c["role"] = json!(r);
    }
    format!("Bearer {}", key.token(&c))
}

#[tokio::test]
async fn jwt_principals_are_pinned_to_their_tenant() {
    let js = JsonServer::start();
    let key = TestKey::ec("k1");
    let proxy = jwt_proxy(&js, &key).await;
    let http = Http::default();
    let acme = token(&key, "app-acme", "acme", None);
    let globex = token(&key, "app-globex", "globex", None);

    // No token: 401 with the Bearer challenge, nothing forwarded.
    let r = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &ada())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "unauthenticated");
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer realm=\"envelope-proxy\""
    );
    // A token signed by another key: 401 invalid_token.
    let stranger = token(&TestKey::ec("k1"), "app-acme", "acme", None);
    let r = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[("authorization", stranger.as_str())],
            &ada(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(db(&js), json!([]), "nothing reached storage");

    // Acme's app writes and reads its own tenant.
    let w = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[("authorization", acme.as_str())],
            &ada(),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let stored = db_when(&js, 1).await;
    assert!(stored[0]["ssn"].as_str().unwrap().starts_with("enc:"));
    assert!(!js.db_file().contains("123-45-6789"));
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("authorization", acme.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["ssn"], "123-45-6789");
    let line = proxy.audit_of("/tenants/acme/users/u1").await;
    assert_eq!(line["principal"], "app-acme");
    assert_eq!(line["basis"][0], "statement:apps-own-tenant");

    // Globex's app on acme's path: the route's require rule, before anything else.
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("authorization", globex.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), "forbidden");
    // Globex's app on its own path reaching acme's record (the store ignores the tenant):
    // the context is globex's (from the token, not the path), so acme's value cannot open.
    let r = http
        .get(
            &proxy.url("/tenants/globex/users/u1"),
            &[("authorization", globex.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "decrypt_failed");
    assert!(!r.text().contains("123-45-6789"));
    assert_eq!(proxy.state().metrics.denials_of("users", "-", "require"), 1);
}

#[tokio::test]
async fn support_staff_see_masked_values_and_apps_see_plaintext() {
    let js = JsonServer::start();
    let key = TestKey::rsa("r1");
    let proxy = jwt_proxy(&js, &key).await;
    let http = Http::default();
    let app = token(&key, "app-acme", "acme", None);
    let support = token(&key, "jane", "acme", Some("support"));
    let outsider = token(&key, "jim", "acme", None);
    let w = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[("authorization", app.as_str())],
            &ada(),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());

    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("authorization", support.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["ssn"], "***-**-6789");
    assert_eq!(r.json()["name"], "A**");
    assert_eq!(r.json()["plan"], "pro");
    let line = proxy.audit_of("/tenants/acme/users/u1").await;
    assert_eq!(
        (line["principal"].as_str(), line["outcome"].as_str()),
        (Some("jane"), Some("masked"))
    );
    assert_eq!(line["basis"][0], "statement:support-masked");
    // Support may not write.
    let r = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[("authorization", support.as_str())],
            &json!({"id": "u2", "ssn": "000-00-0000"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Nobody else of the tenant reads at all.
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("authorization", outsider.as_str())],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("jim may not open")
    );
}

// -- mTLS -----------------------------------------------------------------------------------

#[tokio::test]
async fn mtls_principals_are_named_by_their_spiffe_ids() {
    let js = JsonServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "mesh");
    let (cert, key) = write_leaf(dir.path(), "server", &pki.server());
    let ca = pki.ca_file("mesh");
    let server = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\", client_ca_file = \"{}\" }}",
        cert.display(),
        key.display(),
        ca.display()
    );
    let routes = format!(
        r#"
[auth.mtls]
identity = "uri-san"
attributes = {{ tenant = "spiffe.trust_domain", team = "subject.OU" }}

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{up}"
auth = "mtls"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{principal.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}

[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "acme-workloads"
effect = "allow"
principals = ["spiffe://acme.test/ns/*"]
actions = ["seal", "open"]
conditions = {{ "context.tenant" = "{{principal.tenant}}", "principal.team" = "billing" }}
"#,
        up = js.url()
    );
    let proxy = Proxy::start(&routes, &server).await;
    let api = pki.client("api", "spiffe://acme.test/ns/billing/sa/api");
    let other = pki.client("api", "spiffe://globex.test/ns/billing/sa/api");
    let body = bytes::Bytes::from(ada().to_string());
    let json_ct = [("content-type", "application/json")];

    // Without a client certificate: 401 (the TLS handshake itself is fine).
    let r = https_send(
        proxy.addr,
        client_config(&ca, None),
        Method::POST,
        "/tenants/acme/users",
        &json_ct,
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());

    let r = https_send(
        proxy.addr,
        client_config(&ca, Some(&api)),
        Method::POST,
        "/tenants/acme/users",
        &json_ct,
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let stored = db_when(&js, 1).await;
    assert!(stored[0]["ssn"].as_str().unwrap().starts_with("enc:"));
    let r = https_send(
        proxy.addr,
        client_config(&ca, Some(&api)),
        Method::GET,
        "/tenants/acme/users/u1",
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["ssn"], "123-45-6789");
    let line = proxy.audit_of("/tenants/acme/users/u1").await;
    assert_eq!(line["principal"], "spiffe://acme.test/ns/billing/sa/api");
    assert_eq!(line["basis"][0], "statement:acme-workloads");

    // Another trust domain's workload (same CA): no statement allows it.
    let r = https_send(
        proxy.addr,
        client_config(&ca, Some(&other)),
        Method::GET,
        "/tenants/acme/users/u1",
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert!(
        r.text()
            .contains("spiffe://globex.test/ns/billing/sa/api may not open")
    );
}

// -- Trusted proxy header -------------------------------------------------------------------

#[tokio::test]
async fn a_trusted_proxys_client_cert_header_names_the_principal_only_from_trusted_peers() {
    let js = JsonServer::start();
    let route = |peers: &str| {
        format!(
            r#"
[auth.trusted_header]
trusted_peers = [{peers}]
attributes = {{ tenant = "spiffe.trust_domain" }}

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{up}"
auth = "trusted-header"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{principal.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#,
            up = js.url()
        )
    };
    let xfcc = "By=spiffe://mesh/sidecar;Hash=abc;Subject=\"CN=api,O=acme\";URI=spiffe://acme.test/ns/app/sa/api";
    let http = Http::default();
    // Loopback is a trusted peer here (the mesh sidecar in the same pod).
    let proxy = Proxy::start(&route("\"127.0.0.0/8\""), "").await;
    let w = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[("x-forwarded-client-cert", xfcc)],
            &ada(),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let line = proxy.audit_of("/tenants/acme/users").await;
    assert_eq!(line["principal"], "spiffe://acme.test/ns/app/sa/api");
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "no header, no principal"
    );
    drop(proxy);
    // The same header from a peer outside trusted_peers is refused: anyone could send it.
    let proxy = Proxy::start(&route("\"10.0.0.0/8\""), "").await;
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[("x-forwarded-client-cert", xfcc)],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.error_code(), "unauthenticated");
}

/// An upstream that records the headers it receives and answers `{}`.
async fn header_recorder() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
) {
    use hyper::service::service_fn;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    s.lock().unwrap().push(req.headers().clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn credentials_for_the_proxy_never_reach_storage() {
    let (addr, seen) = header_recorder().await;
    let key = TestKey::ed("k");
    let routes = format!(
        r#"
[auth.jwt]
jwks_file = "{{DIR}}/jwks.json"
issuer = "{ISS}"
audience = "{AUD}"

[[route]]
name = "users"
path = "/users/{{id?}}"
upstream = "http://{addr}"
auth = "jwt"
key = "users"
fields = ["$.ssn"]

[[route]]
name = "raw"
path = "/raw/**"
upstream = "http://{addr}"
auth = "jwt"
passthrough = true
"#
    );
    let proxy = Proxy::start_with_files(&routes, "", &[("jwks.json", &jwks(&[&key]))]).await;
    let http = Http::default();
    let bearer = token(&key, "app", "acme", None);
    let creds = [
        ("authorization", bearer.as_str()),
        ("x-envelope-grant-token", "ept1.some.token"),
        ("x-request-id", "r-1"),
    ];
    for path in ["/users/1", "/raw/anything"] {
        let r = http.get(&proxy.url(path), &creds).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for h in seen {
        assert!(!h.contains_key("authorization"), "{h:?}");
        assert!(!h.contains_key("x-envelope-grant-token"), "{h:?}");
        assert_eq!(h["x-request-id"], "r-1", "other headers pass");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_keys_from_an_https_jwks_endpoint_and_their_rotation() {
    use common::jwt::JwksServer;
    let js = JsonServer::start();
    let (old, new) = (TestKey::rsa("2026-11"), TestKey::ed("2026-12"));
    let server = JwksServer::start(jwks(&[&old])).await;
    let routes = format!(
        r#"
[auth.jwt]
jwks_url = "{url}"
jwks_ca_file = "{ca}"
issuer = "{ISS}"
audience = "{AUD}"

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{up}"
auth = "jwt"
require = {{ "path.tenant" = "{{claim.tenant}}" }}
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{claim.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#,
        url = server.url(),
        ca = server.ca_file.display(),
        up = js.url()
    );
    let proxy = Proxy::start(&routes, "").await;
    let http = Http::default();
    let w = http
        .post_json(
            &proxy.url("/tenants/acme/users"),
            &[(
                "authorization",
                token(&old, "app-acme", "acme", None).as_str(),
            )],
            &ada(),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    // The issuer rotates: a token signed by the new key (a kid the proxy has not seen) makes
    // it fetch the JWKS again, and works.
    server.serve(jwks(&[&old, &new]));
    let r = http
        .get(
            &proxy.url("/tenants/acme/users/u1"),
            &[(
                "authorization",
                token(&new, "app-acme", "acme", None).as_str(),
            )],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["ssn"], "123-45-6789");
    assert!(server.hits() >= 2, "fetched again for the new kid");
}

#[tokio::test]
async fn the_admin_api_over_mtls_names_callers_by_their_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ops");
    let (cert, key) = write_leaf(dir.path(), "server", &pki.server());
    let ca = pki.ca_file("ops");
    let server = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\", client_ca_file = \"{}\" }}",
        cert.display(),
        key.display(),
        ca.display()
    );
    let routes = r#"
[admin]
listen = "127.0.0.1:0"
auth = "mtls"

[[route]]
name = "users"
path = "/users/{id?}"
upstream = "http://127.0.0.1:9"
key = "users"
fields = ["$.ssn"]

[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "operators"
effect = "allow"
principals = ["spiffe://acme.test/ns/ops/*"]
actions = ["describe", "rotate"]
"#;
    let proxy = Proxy::start(routes, &server).await;
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let operator = pki.client("op", "spiffe://acme.test/ns/ops/sa/rotator");
    let app = pki.client("app", "spiffe://acme.test/ns/billing/sa/api");
    let call = |who: Option<&common::pki::Leaf>, method: Method, path: &'static str| {
        https_send(
            admin,
            client_config(&ca, who),
            method,
            path,
            &[],
            bytes::Bytes::new(),
        )
    };
    let r = call(None, Method::GET, "/v1/keys/users").await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let r = call(Some(&app), Method::GET, "/v1/keys/users")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let r = call(Some(&operator), Method::GET, "/v1/keys/users")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = call(Some(&operator), Method::POST, "/v1/keys/users/rotate")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["current_version"], 2);
    let line = proxy.audit_of("/v1/keys/users/rotate").await;
    assert_eq!(line["principal"], "spiffe://acme.test/ns/ops/sa/rotator");
    assert_eq!(line["outcome"], "ok");
}
