//! Listener hardening against real sockets: a slowloris client, huge headers, a connection
//! flood and the concurrent-request limit (load shedding).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Proxy;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream: `/slow` answers after 1.5 s, anything else at once.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path().ends_with("/slow") {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"{\"ok\":true}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(limits: &str) -> Proxy {
    let up = upstream().await;
    let routes = format!(
        "[[route]]\nname = \"p\"\npath = \"/p/{{id}}\"\nupstream = \"http://{up}\"\npassthrough = true\n"
    );
    Proxy::start(&routes, limits).await
}

/// One HTTP/1.1 request with `Connection: close`; the whole answer as text.
async fn request(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra_headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn slowloris_is_disconnected_while_a_normal_client_is_served() {
    let p = proxy("header_read_timeout_ms = 800").await;
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    let head = b"GET /p/x HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        // One byte every 100 ms: never a whole head within the timeout.
        for b in head {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    // Meanwhile a normal client is served.
    let resp = request(p.addr, "/p/x", "").await;
    assert_eq!(status(&resp), 200, "{resp}");
    let mut slow = writer.await.unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(3)).await,
        "the slowloris connection is still open"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "closed only after {took:?}");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let p = proxy("header_read_timeout_ms = 500").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The response arrives; the connection then sits idle and is closed.
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test]
async fn huge_headers_get_431() {
    let p = proxy("max_header_bytes = 8192").await;
    let big = format!("X-Big: {}\r\n", "a".repeat(20_000));
    let resp = request(p.addr, "/p/x", &big).await;
    assert_eq!(status(&resp), 431, "{resp}");
    // Within the limit: served.
    let resp = request(p.addr, "/p/x", &format!("X-Ok: {}\r\n", "a".repeat(4000))).await;
    assert_eq!(status(&resp), 200, "{resp}");
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_with_503() {
    let p = proxy("max_requests = 2").await;
    let addr = p.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { request(addr, "/p/slow", "").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let shed = request(addr, "/p/x", "").await;
    assert_eq!(status(&shed), 503, "{shed}");
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );
    assert!(shed.contains("\"overloaded\""), "{shed}");
    for t in slow {
        let resp = t.await.unwrap();
        assert_eq!(status(&resp), 200, "{resp}");
    }
    // The slots are back.
    let resp = request(addr, "/p/x", "").await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(
        metric(&p, "envelope_proxy_requests_shed_total{listener=\"data\"}"),
        1.0
    );
}

/// A sample of the proxy's metrics (the text `/metrics` serves), 0 when absent.
fn metric(p: &Proxy, series: &str) -> f64 {
    p.state()
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn connection_flood_is_refused_and_clients_are_served_after_it() {
    let p = proxy("max_connections = 4").await;
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(p.addr).await.unwrap());
    }
    // Let the proxy accept them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One more: accepted and closed at once.
    let mut extra = TcpStream::connect(p.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "a connection beyond max_connections stayed open"
    );
    let refused = "envelope_proxy_connections_refused_total{listener=\"data\"}";
    assert!(metric(&p, refused) >= 1.0, "the refusal is counted");
    // The flood goes; a normal client is served.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = request(p.addr, "/p/x", "").await;
        if status(&resp) == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served after the flood: {resp}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// HTTP/2 (prior knowledge, raw frames): after `h2_keepalive_interval_ms` of silence the proxy
/// sends a PING; a peer that never answers is disconnected after `h2_keepalive_timeout_ms`.
#[tokio::test]
async fn silent_http2_peer_is_pinged_then_disconnected() {
    let p = proxy("h2_keepalive_interval_ms = 200\nh2_keepalive_timeout_ms = 300").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut pinged = None;
    let closed = loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
        // Frames: 3 bytes length, type, flags, 4 bytes stream id, then the payload.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = usize::from(buf[at]) << 16
                | usize::from(buf[at + 1]) << 8
                | usize::from(buf[at + 2]);
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            if kind == 6 && flags & 1 == 0 && pinged.is_none() {
                pinged = Some(started.elapsed());
            }
            at += 9 + len;
        }
    };
    let pinged = pinged.expect("the proxy sent a PING");
    assert!(pinged >= Duration::from_millis(150), "{pinged:?}");
    assert!(closed, "a peer that does not answer PINGs is disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn bad_limits_are_config_errors() {
    let base = "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n{}\n\
                [keyring]\npath = \"/nonexistent/k.json\"\nmaster_key_env = \"NOPE\"\n\
                [[route]]\nname = \"h\"\npath = \"/h\"\nupstream = \"http://127.0.0.1:9\"\npassthrough = true\n";
    for (line, place) in [
        ("max_header_bytes = 100", "server.max_header_bytes"),
        (
            "header_read_timeout_ms = 0",
            "server.header_read_timeout_ms",
        ),
        ("max_connections = 0", "server.max_connections"),
        ("max_requests = 0", "server.max_requests"),
        (
            "h2_keepalive_timeout_ms = 0",
            "server.h2_keepalive_timeout_ms",
        ),
        (
            "h2_keepalive_interval_ms = 3600001",
            "server.h2_keepalive_interval_ms",
        ),
        ("drain_timeout_ms = 99999999", "server.drain_timeout_ms"),
    ] {
        let err = envelope_proxy::config::parse(&base.replace("{}", line))
            .err()
            .unwrap_or_else(|| panic!("{line} accepted"))
            .to_string();
        assert!(err.contains(place), "{line}: {err}");
    }
    let ok = envelope_proxy::config::parse(&base.replace("{}", "")).unwrap();
    assert_eq!(ok.server.limits.max_header_bytes, 65536);
    assert_eq!(ok.server.drain_timeout, Duration::from_secs(25));
    assert_eq!(ok.server.shutdown_delay, Duration::ZERO);
}
