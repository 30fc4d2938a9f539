//! The sidecar deployment: the app reaches the proxy over a unix socket in a shared volume
//! (`[server] unix_socket`), with `auth = "none"` routes, in front of a real json-server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use common::{Http, JsonServer, Proxy, Reply};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// One request over the unix socket (HTTP/1.1), as `curl --unix-socket` sends it.
async fn unix_send(
    socket: &Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "proxy")
        .header("connection", "close");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The users route; `auth` is the route's own (empty: the listener's, "none").
fn routes(upstream: &str, auth: &str) -> String {
    format!(
        r#"
[auth.trusted_header]
trusted_peers = ["10.0.0.0/8"]

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
{auth}
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#
    )
}

async fn stored_users(js: &JsonServer) -> Value {
    for _ in 0..100 {
        let v: Value = serde_json::from_str(&js.db_file()).unwrap();
        if v["users"].as_array().is_some_and(|a| !a.is_empty()) {
            return v["users"].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("nothing stored: {}", js.db_file())
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn the_app_reaches_the_proxy_over_its_unix_socket() {
    let js = JsonServer::start();
    let proxy = Proxy::start(&routes(&js.url(), ""), "unix_socket = \"{DIR}/proxy.sock\"").await;
    let socket = proxy.dir.path().join("proxy.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "only the proxy's user (and the app sharing it)"
    );

    let doc = json!({"id": "u1", "ssn": "123-45-6789"}).to_string();
    let w = unix_send(&socket, Method::POST, "/tenants/acme/users", &[JSON], &doc).await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let stored = stored_users(&js).await;
    assert!(stored[0]["ssn"].as_str().unwrap().starts_with("enc:"));
    assert!(!js.db_file().contains("123-45-6789"));
    let r = unix_send(&socket, Method::GET, "/tenants/acme/users/u1", &[], "").await;
    assert_eq!(r.json()["ssn"], "123-45-6789");
    let line = proxy.audit_of("/tenants/acme/users/u1").await;
    assert_eq!(line["client"], "unix");
    assert_eq!(line["principal"], "anonymous");
    // The TCP listener serves the same routes.
    let http = Http::default();
    let r = http.get(&proxy.url("/tenants/acme/users/u1"), &[]).await;
    assert_eq!(r.json()["ssn"], "123-45-6789");
    drop(http); // its idle keep-alive connection would hold the graceful stop

    // The socket is gone once the proxy stops.
    let mut proxy = proxy;
    proxy.running.take().unwrap().stop().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_mesh_header_is_believed_over_the_socket_only() {
    let js = JsonServer::start();
    let proxy = Proxy::start(
        &routes(&js.url(), "auth = \"trusted-header\""),
        "unix_socket = \"{DIR}/proxy.sock\"",
    )
    .await;
    let socket = proxy.dir.path().join("proxy.sock");
    let xfcc = (
        "x-forwarded-client-cert",
        "By=spiffe://mesh/sidecar;URI=spiffe://acme.test/ns/app/sa/api;Subject=\"CN=api,O=acme\"",
    );
    let doc = json!({"id": "m1", "ssn": "987-65-4321"}).to_string();
    let w = unix_send(
        &socket,
        Method::POST,
        "/tenants/acme/users",
        &[JSON, xfcc],
        &doc,
    )
    .await;
    assert_eq!(w.status, StatusCode::CREATED, "{}", w.text());
    let line = proxy.audit_of("/tenants/acme/users").await;
    assert_eq!(line["principal"], "spiffe://acme.test/ns/app/sa/api");
    // Over TCP from 127.0.0.1 (not in trusted_peers) the same header is refused.
    let r = Http::default()
        .send(
            Method::POST,
            &proxy.url("/tenants/acme/users"),
            &[JSON, xfcc],
            doc,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_anything_else_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = |path: &Path| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\nunix_socket = \"{}\"\nunix_socket_mode = \"0660\"\n\
             [keyring]\npath = \"{d}/k.json\"\nmaster_key_file = \"{d}/m.key\"\n\
             [[route]]\nname = \"h\"\npath = \"/health\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n",
            path.display(),
            d = dir.path().display()
        )
    };
    // A socket left by a crashed process.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let running =
        envelope_proxy::server::start(envelope_proxy::config::parse(&config(&stale)).unwrap())
            .await
            .unwrap();
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    assert!(tokio::net::UnixStream::connect(&stale).await.is_ok());
    running.stop().await;
    // A regular file is never deleted to make room.
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "keep me").unwrap();
    let e = envelope_proxy::server::start(envelope_proxy::config::parse(&config(&file)).unwrap())
        .await
        .err()
        .expect("start must fail");
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // Modes open to others are refused by the configuration.
    let bad = config(&stale).replace("0660", "0666");
    let e = envelope_proxy::config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("unix_socket_mode"), "{e}");
}
