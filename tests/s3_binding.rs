//! S3 objects are bound to their bucket and key (format v2, FORMAT.md §9): storage that copies
//! an object with its metadata over another key cannot make the gateway serve it there; copies
//! through the gateway re-seal; legacy v1 objects stay readable, counted; stripping the format
//! marker makes a v2 object unreadable, never unbound-readable.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::s3::{CLIENT_KEY, CLIENT_SECRET, raw_get};
use common::{Moto, Proxy, Reply};
use envelope_proxy::s3::sign::{UpstreamCredentials, sign_request};
use http::Method;

const ALICE: &str = "tenants/alice/record.txt";
const BOB: &str = "tenants/bob/record.txt";
const ABORTED: &[u8] = b"<body aborted>";
const SECRET: &[u8] = b"alice's medical record: do not show to bob";

async fn send(
    creds: UpstreamCredentials,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(http_body_util::Full::new(body)).unwrap();
    sign_request(&mut req, &creds, "us-east-1").unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    // The connection closed before any answer (a read that failed before its first byte).
    let Ok(resp) = client.request(req).await else {
        return Reply {
            status: http::StatusCode::BAD_GATEWAY,
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(ABORTED),
        };
    };
    let (parts, body) = resp.into_parts();
    // A body aborted mid-way (authentication failed) is a failed read: keep what arrived.
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::from_static(ABORTED),
    };
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Through the gateway, signed as its client.
async fn client(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
    let creds = UpstreamCredentials::new(
        CLIENT_KEY.into(),
        zeroize::Zeroizing::new(CLIENT_SECRET.to_string()),
    );
    send(creds, method, url, headers, body).await
}

/// Straight to storage (moto's own user): what an attacker with storage access can do.
async fn storage(moto: &Moto, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let creds =
        UpstreamCredentials::new("testing".into(), zeroize::Zeroizing::new("testing".into()));
    let url = format!("{}{path}", moto.endpoint());
    send(creds, method, &url, headers, Bytes::new()).await
}

/// A storage-side CopyObject (metadata copied along, as S3 does by default).
async fn storage_copy(moto: &Moto, from: &str, to: &str) {
    let r = storage(moto, Method::PUT, to, &[("x-amz-copy-source", from)]).await;
    assert_eq!(r.status, 200, "storage copy: {}", r.text());
}

/// The gateway with one route whose key context is `context` (a TOML inline table).
async fn gateway(moto: &Moto, dir: &Path, context: &str, s3_extra: &str) -> Proxy {
    let routes = common::s3::route("objects", "/**", &moto.endpoint(), dir, s3_extra).replace(
        r#"context = { bucket = "{s3.bucket}" }"#,
        &format!("context = {context}"),
    );
    assert!(routes.contains(context));
    Proxy::start(&routes, "").await
}

async fn make_buckets(proxy: &Proxy, buckets: &[&str]) {
    for b in buckets {
        let r = client(
            Method::PUT,
            &format!("http://{}/{b}", proxy.addr),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "create {b}: {}", r.text());
    }
}

/// A read through the gateway that must not give `SECRET` back.
fn assert_refused(r: &Reply, what: &str) {
    assert!(
        !r.body.windows(8).any(|w| SECRET.windows(8).any(|s| s == w)),
        "{what}: plaintext served"
    );
    // Refused up front, or (a multipart object, checked part by part as it streams) the body
    // aborted: a short read the client sees as a failure, never a clean end.
    assert!(
        !r.status.is_success() || &r.body[..] == ABORTED,
        "{what}: {} {}",
        r.status,
        r.text()
    );
}

fn unbound_reads(proxy: &Proxy) -> u64 {
    let text = proxy.state().metrics.encode();
    text.lines()
        .find(|l| l.starts_with("envelope_proxy_unbound_object_reads_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_copied_by_storage_to_another_key_do_not_open() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    // One key context for both buckets: only the binding to bucket and key tells them apart.
    let proxy = gateway(&moto, dir.path(), r#"{ app = "records" }"#, "").await;
    make_buckets(&proxy, &["records", "records-b"]).await;
    let base = format!("http://{}", proxy.addr);
    let r = client(
        Method::PUT,
        &format!("{base}/records/{ALICE}"),
        &[],
        Bytes::from_static(SECRET),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client(
        Method::GET,
        &format!("{base}/records/{ALICE}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));

    // Storage copies alice's object (with its metadata) over bob's key, and into another
    // bucket under the same name.
    storage_copy(
        &moto,
        &format!("/records/{ALICE}"),
        &format!("/records/{BOB}"),
    )
    .await;
    storage_copy(
        &moto,
        &format!("/records/{ALICE}"),
        &format!("/records-b/{ALICE}"),
    )
    .await;
    for (path, range) in [
        (format!("records/{BOB}"), None),
        (format!("records/{BOB}"), Some("bytes=0-9")),
        (format!("records-b/{ALICE}"), None),
    ] {
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("range", *r)).collect();
        let r = client(
            Method::GET,
            &format!("{base}/{path}"),
            &headers,
            Bytes::new(),
        )
        .await;
        assert_refused(&r, &path);
    }
    // A copy through the gateway is re-sealed for its new key and reads back.
    let dest = "tenants/alice/r%C3%A9cord%20copy.txt";
    let r = client(
        Method::PUT,
        &format!("{base}/records/{dest}"),
        &[("x-amz-copy-source", &format!("records/{ALICE}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client(
        Method::GET,
        &format!("{base}/records/{dest}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
    let (_, source_stored) = raw_get(&moto, "records", ALICE).await;
    let (_, copy_stored) = raw_get(&moto, "records", dest).await;
    assert_eq!(source_stored.len(), copy_stored.len());
    assert_ne!(source_stored, copy_stored, "the copy was not re-sealed");
    let head = storage(&moto, Method::HEAD, &format!("/records/{dest}"), &[]).await;
    assert_eq!(
        head.headers
            .get("x-amz-meta-ep-format")
            .map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    // A copy onto itself (metadata REPLACE) stays in place and still reads.
    let r = client(
        Method::PUT,
        &format!("{base}/records/{ALICE}"),
        &[
            ("x-amz-copy-source", &format!("records/{ALICE}")),
            ("x-amz-metadata-directive", "REPLACE"),
            ("content-type", "text/plain"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client(
        Method::GET,
        &format!("{base}/records/{ALICE}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
    assert_eq!(unbound_reads(&proxy), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_objects_copied_by_storage_to_another_key_do_not_open() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), r#"{ bucket = "{s3.bucket}" }"#, "").await;
    make_buckets(&proxy, &["records"]).await;
    let base = format!("http://{}", proxy.addr);
    let url = format!("{base}/records/{ALICE}");
    // Create at `url`, upload one part at `part_url`, complete at `url`: the Complete's reply.
    let upload = |part_url: String| {
        let url = url.clone();
        async move {
            let r = client(Method::POST, &format!("{url}?uploads"), &[], Bytes::new()).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let text = r.text();
            let id = text
                .split("<UploadId>")
                .nth(1)
                .and_then(|s| s.split("</UploadId>").next())
                .unwrap()
                .to_string();
            let id_q = form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>();
            let r = client(
                Method::PUT,
                &format!("{part_url}?partNumber=1&uploadId={id_q}"),
                &[],
                Bytes::from_static(SECRET),
            )
            .await;
            let Some(etag) = r.headers.get("etag").filter(|_| r.status == 200) else {
                return r;
            };
            let complete = format!(
                "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{}</ETag></Part></CompleteMultipartUpload>",
                etag.to_str().unwrap()
            );
            client(
                Method::POST,
                &format!("{url}?uploadId={id_q}"),
                &[],
                Bytes::from(complete),
            )
            .await
        }
    };
    // A part sent to bob's key with alice's upload id (moto takes it: it files parts by
    // upload id) is sealed for bob's key: alice's object made of it does not open.
    let r = upload(format!("{base}/records/{BOB}")).await;
    if r.status == 200 && !r.text().contains("<Error>") {
        let r = client(Method::GET, &url, &[], Bytes::new()).await;
        assert_refused(&r, "a part uploaded for another key");
    }
    let r = upload(url.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client(Method::GET, &url, &[], Bytes::new()).await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
    let head = storage(&moto, Method::HEAD, &format!("/records/{ALICE}"), &[]).await;
    assert_eq!(
        head.headers
            .get("x-amz-meta-ep-format")
            .map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );

    storage_copy(
        &moto,
        &format!("/records/{ALICE}"),
        &format!("/records/{BOB}"),
    )
    .await;
    let bob = format!("{base}/records/{BOB}");
    for headers in [vec![], vec![("range", "bytes=3-12")]] {
        let r = client(Method::GET, &bob, &headers, Bytes::new()).await;
        assert_refused(&r, "multipart copied by storage");
    }
    let r = client(
        Method::GET,
        &format!("{bob}?partNumber=1"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_refused(&r, "part 1 of a multipart copied by storage");
}

/// Seal an object the way the gateway did before format v2 (no bucket or key bound) and put
/// it straight into storage.
async fn put_legacy_object(proxy: &Proxy, moto: &Moto, bucket: &str, key: &str, plain: &[u8]) {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use envelope_proxy::envelope::{Context, binding, chunked};
    let state = proxy.state();
    let envelope_proxy::config::RouteKind::S3(cfg) = &state.config.routes[0].kind else {
        panic!("an S3 route")
    };
    let mut key_ctx = Context::new();
    key_ctx.insert("bucket", bucket);
    let sealing = state
        .keys
        .sealing_key(&cfg.keys, &key_ctx, 1, plain.len() as u64)
        .await
        .unwrap();
    let object_id = "0123456789abcdef0123456789abcdef";
    let mut msg_ctx = key_ctx.clone();
    msg_ctx.insert("ep:object", object_id);
    let env_header = sealing.header.encode().unwrap();
    let salt = [7u8; 24];
    let stored = chunked::seal_with_salt(
        sealing.data_key.expose(),
        &salt,
        &binding(&env_header, &msg_ctx),
        plain,
    );
    let meta = [&env_header[..], &stored[..chunked::HEADER_LEN]].concat();
    let creds =
        UpstreamCredentials::new("testing".into(), zeroize::Zeroizing::new("testing".into()));
    let r = send(
        creds,
        Method::PUT,
        &format!("{}/{bucket}/{key}", moto.endpoint()),
        &[
            ("x-amz-meta-ep-envelope", &URL_SAFE_NO_PAD.encode(meta)),
            ("x-amz-meta-ep-object", object_id),
        ],
        Bytes::from(stored),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_objects_stay_readable_counted_and_a_stripped_marker_does_not_open() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), r#"{ bucket = "{s3.bucket}" }"#, "").await;
    make_buckets(&proxy, &["records"]).await;
    let base = format!("http://{}", proxy.addr);
    put_legacy_object(&proxy, &moto, "records", "old.txt", SECRET).await;
    assert_eq!(unbound_reads(&proxy), 0);
    let r = client(
        Method::GET,
        &format!("{base}/records/old.txt"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
    assert_eq!(unbound_reads(&proxy), 1);
    let r = client(
        Method::GET,
        &format!("{base}/records/old.txt"),
        &[("range", "bytes=2-5")],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (206, &SECRET[2..6]));
    assert_eq!(unbound_reads(&proxy), 2);

    // A copy through the gateway (here onto itself) re-seals it as v2.
    let r = client(
        Method::PUT,
        &format!("{base}/records/old.txt"),
        &[("x-amz-copy-source", "records/old.txt")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let counted = unbound_reads(&proxy);
    assert_eq!(counted, 3, "the copy read a v1 source");
    let head = storage(&moto, Method::HEAD, "/records/old.txt", &[]).await;
    assert_eq!(
        head.headers
            .get("x-amz-meta-ep-format")
            .map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    let r = client(
        Method::GET,
        &format!("{base}/records/old.txt"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
    assert_eq!(unbound_reads(&proxy), counted, "a v2 read is not counted");

    // Storage strips the marker of a v2 object (keeping the rest): it does not open as v1.
    let envelope = head.headers["x-amz-meta-ep-envelope"].to_str().unwrap();
    let object = head.headers["x-amz-meta-ep-object"].to_str().unwrap();
    let r = storage(
        &moto,
        Method::PUT,
        "/records/old.txt",
        &[
            ("x-amz-copy-source", "/records/old.txt"),
            ("x-amz-metadata-directive", "REPLACE"),
            ("x-amz-meta-ep-envelope", envelope),
            ("x-amz-meta-ep-object", object),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stripped = storage(&moto, Method::HEAD, "/records/old.txt", &[]).await;
    assert!(!stripped.headers.contains_key("x-amz-meta-ep-format"));
    let r = client(
        Method::GET,
        &format!("{base}/records/old.txt"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_refused(&r, "a v2 object without its marker");
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_can_refuse_legacy_objects() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(
        &moto,
        dir.path(),
        r#"{ bucket = "{s3.bucket}" }"#,
        "refuse_unbound_objects = true",
    )
    .await;
    make_buckets(&proxy, &["records"]).await;
    let base = format!("http://{}", proxy.addr);
    put_legacy_object(&proxy, &moto, "records", "old.txt", SECRET).await;
    let r = client(
        Method::GET,
        &format!("{base}/records/old.txt"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_refused(&r, "a legacy object on a refusing route");
    // New objects are v2 and read.
    let r = client(
        Method::PUT,
        &format!("{base}/records/new.txt"),
        &[],
        Bytes::from_static(SECRET),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client(
        Method::GET,
        &format!("{base}/records/new.txt"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!((r.status, &r.body[..]), (http::StatusCode::OK, SECRET));
}
