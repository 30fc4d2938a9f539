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

/// One GET over the unix socket in HTTP/2 (prior knowledge, as gRPC-style clients speak).
async fn unix_get_h2(socket: &Path, path: &str) -> (http::Version, Reply) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://proxy{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let reply = Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    };
    (parts.version, reply)
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
    // HTTP/2 on the same socket.
    let (version, r) = unix_get_h2(&socket, "/tenants/acme/users/u1").await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(r.json()["ssn"], "123-45-6789");
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

/// A proxy with only a pass-through route (no keys), serving `socket` as well.
fn socket_config(keys: &Path, socket: &Path, mode: &str) -> envelope_proxy::config::Config {
    envelope_proxy::config::parse(&socket_config_text(keys, socket, mode)).unwrap()
}

fn socket_config_text(keys: &Path, socket: &Path, mode: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\nunix_socket = \"{}\"\nunix_socket_mode = \"{mode}\"\n\
         [keyring]\npath = \"{d}/k.json\"\nmaster_key_file = \"{d}/m.key\"\n\
         [[route]]\nname = \"h\"\npath = \"/health\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n",
        socket.display(),
        d = keys.display()
    )
}

/// Entries of `dir` other than `keep`: what binding left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_anything_else_refused() {
    let keys = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A socket left by a crashed process.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let running = envelope_proxy::server::start(socket_config(keys.path(), &stale, "0660"))
        .await
        .unwrap();
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    assert!(tokio::net::UnixStream::connect(&stale).await.is_ok());
    // Bound in a private directory first (never reachable with the umask's mode): it is gone.
    assert_eq!(leftovers(dir.path(), &["stale.sock"]), Vec::<String>::new());
    running.stop().await;
    assert!(!stale.exists());
    // A regular file is never deleted to make room.
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "keep me").unwrap();
    let e = envelope_proxy::server::start(socket_config(keys.path(), &file, "0660"))
        .await
        .err()
        .expect("start must fail");
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert_eq!(leftovers(dir.path(), &["data.txt"]), Vec::<String>::new());
    // Nor a symbolic link (to a socket or anything else).
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let e = envelope_proxy::server::start(socket_config(keys.path(), &link, "0660"))
        .await
        .err()
        .expect("start must fail");
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn the_socket_settings_are_checked() {
    let base = "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n\
                [keyring]\npath = \"k.json\"\nmaster_key_env = \"M\"\n\
                [[route]]\nname = \"h\"\npath = \"/health\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n";
    let parse = |server: &str| {
        envelope_proxy::config::parse(
            &base.replace("auth = \"none\"\n", &format!("auth = \"none\"\n{server}")),
        )
        .map(|c| c.server.unix_socket_mode)
        .map_err(|e| e.to_string())
    };
    assert_eq!(parse("unix_socket = \"/run/p.sock\"\n"), Ok(0o600));
    assert_eq!(
        parse("unix_socket = \"/run/p.sock\"\nunix_socket_mode = \"0660\"\n"),
        Ok(0o660)
    );
    for (server, needle) in [
        // Modes open to others are refused.
        (
            "unix_socket = \"/run/p.sock\"\nunix_socket_mode = \"0666\"\n",
            "unix_socket_mode",
        ),
        (
            "unix_socket = \"/run/p.sock\"\nunix_socket_mode = \"rw\"\n",
            "unix_socket_mode",
        ),
        (
            "unix_socket = \"/run/p.sock\"\nunix_socket_mode = \"01660\"\n",
            "unix_socket_mode",
        ),
        ("unix_socket_mode = \"0600\"\n", "only with unix_socket"),
        ("unix_socket = \"\"\n", "server.unix_socket"),
        (
            &format!("unix_socket = \"/run/{}.sock\"\n", "x".repeat(100)),
            "server.unix_socket",
        ),
    ] {
        let e = parse(server).expect_err(server);
        assert!(e.contains(needle), "{server}: {e}");
    }
}

/// `listen` may be omitted for a socket-only sidecar: no TCP listener at all (on Kubernetes
/// every container of the pod shares loopback; the socket's mode is then the only way in).
#[tokio::test]
async fn a_socket_only_sidecar_has_no_tcp_listener() {
    let keys = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let text = socket_config_text(keys.path(), &socket, "0600");
    let only_socket = text.replace("listen = \"127.0.0.1:0\"\n", "");
    assert_ne!(only_socket, text);
    let config = envelope_proxy::config::parse(&only_socket).unwrap();
    assert_eq!(config.server.listen, None);
    // auth = "none" behind a unix socket is no network exposure: nothing to warn about.
    assert_eq!(config.warnings(), Vec::<String>::new());
    let running = envelope_proxy::server::start(config).await.unwrap();
    assert_eq!(running.addr, None);
    let r = unix_send(&socket, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    running.stop().await;
    assert!(!socket.exists());
    // Neither a listener nor a socket: an error, not a proxy nobody can reach.
    let neither = only_socket
        .lines()
        .filter(|l| !l.starts_with("unix_socket"))
        .collect::<Vec<_>>()
        .join("\n");
    let e = envelope_proxy::config::parse(&neither)
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.listen: required"), "{e}");
    // A TCP listener beyond loopback still warns about the same route.
    let wide = envelope_proxy::config::parse(&text.replace("127.0.0.1:0", "0.0.0.0:0")).unwrap();
    assert_eq!(wide.warnings().len(), 1, "{:?}", wide.warnings());
}

/// A second proxy given the same path (a rolling restart gone wrong, a copy-pasted config)
/// must not unlink a socket another process still serves: its callers would silently lose it.
#[tokio::test]
async fn a_live_socket_is_never_taken_over() {
    let (keys1, keys2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let first = envelope_proxy::server::start(socket_config(keys1.path(), &socket, "0600"))
        .await
        .unwrap();
    let e = envelope_proxy::server::start(socket_config(keys2.path(), &socket, "0600"))
        .await
        .err()
        .expect("the second start must fail");
    assert!(e.contains("in use"), "{e}");
    // The first proxy still answers on its socket (its upstream is down: 502 from the proxy).
    let r = unix_send(&socket, Method::GET, "/health", &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(leftovers(dir.path(), &["proxy.sock"]), Vec::<String>::new());
    first.stop().await;
}

/// Stopping removes the proxy's own socket only: one that replaced it at the path (another
/// process's) stays.
#[tokio::test]
async fn stop_removes_only_its_own_socket() {
    let keys = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let running = envelope_proxy::server::start(socket_config(keys.path(), &socket, "0600"))
        .await
        .unwrap();
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    running.stop().await;
    assert!(socket.exists(), "another process's socket was removed");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    drop(other);
}
