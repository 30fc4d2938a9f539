//! Graceful shutdown of the real binary: SIGTERM → `/readyz` 503 at once, the pre-stop delay,
//! then the drain with its deadline; SIGHUP does not end the process.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the upstream saw: PUT bodies received whole (`stored`) and cut short (`broken`).
#[derive(Default)]
struct Seen {
    stored: AtomicUsize,
    broken: AtomicUsize,
}

/// An upstream: `/p/slow` answers after 2 s; a PUT is "stored" only when its body arrived
/// whole (as a store would: an incomplete body leaves no object).
async fn upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        if req.method() == http::Method::PUT {
                            match req.into_body().collect().await {
                                Ok(_) => s.stored.fetch_add(1, Ordering::SeqCst),
                                Err(_) => s.broken.fetch_add(1, Ordering::SeqCst),
                            };
                        } else if req.uri().path().ends_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"{\"ok\":true}",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

struct Served {
    child: Child,
    port: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(up: SocketAddr, server_extra: &str) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let (port, admin) = (common::free_port(), common::free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nauth = \"none\"\n{server_extra}\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [keyring]\npath = \"{d}/k.json\"\nmaster_key_file = \"{d}/m.key\"\n\
         [[route]]\nname = \"p\"\npath = \"/p/{{id}}\"\nupstream = \"http://{up}\"\npassthrough = true\n"
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let served = Served {
        child,
        port,
        admin,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(get(admin, "/readyz").await.as_deref()) != 200 {
        assert!(Instant::now() < deadline, "the proxy did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    served
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// One GET with `Connection: close`: the whole answer, `None` when the connection failed.
async fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn status(resp: Option<&str>) -> u16 {
    resp.and_then(|r| r.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Wait for the process to exit; its exit code and how long that took.
fn wait_exit(child: &mut Child, within: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), started.elapsed());
        }
        assert!(started.elapsed() < within, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_then_drains_the_in_flight_request_and_exits_0() {
    let (up, _) = upstream().await;
    let mut p = serve(up, "shutdown_delay_ms = 1500\ndrain_timeout_ms = 10000").await;
    // SIGHUP does not end it.
    signal(&p.child, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the proxy"
    );
    assert_eq!(status(get(p.port, "/p/x").await.as_deref()), 200);

    let port = p.port;
    let slow = tokio::spawn(async move { get(port, "/p/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&p.child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // During the delay: not ready, yet still serving.
    let ready = get(p.admin, "/readyz").await;
    assert_eq!(status(ready.as_deref()), 503, "{ready:?}");
    assert!(ready.unwrap().contains("draining"));
    assert_eq!(status(get(p.port, "/p/x").await.as_deref()), 200);
    // The in-flight request completes; the process exits 0, well within the deadline.
    let resp = slow.await.unwrap();
    assert_eq!(status(resp.as_deref()), 200, "{resp:?}");
    let child = &mut p.child;
    let (code, _) = tokio::task::block_in_place(|| wait_exit(child, Duration::from_secs(10)));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outliving_the_drain_deadline_is_cut_and_leaves_nothing_upstream() {
    let (up, seen) = upstream().await;
    let mut p = serve(up, "drain_timeout_ms = 1000").await;
    // A streaming PUT whose body never ends (chunked, one chunk now and then).
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    s.write_all(
        b"PUT /p/obj HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            if s.write_all(b"5\r\nhello\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    signal(&p.child, "TERM");
    let child = &mut p.child;
    let (code, _) = tokio::task::block_in_place(|| wait_exit(child, Duration::from_secs(8)));
    assert_eq!(code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(6));
    writer.abort();
    // The upstream saw the body break off, never a whole one.
    let deadline = Instant::now() + Duration::from_secs(3);
    while seen.broken.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the upstream never saw the cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.stored.load(Ordering::SeqCst), 0);
}
