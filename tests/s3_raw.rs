//! The S3 gateway at the protocol level: a client that disconnects mid-upload, virtual-host
//! addressing, and presigned URLs (v4 and v2, verified by s3s; tampered ones refused).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::s3::{CLIENT_KEY, CLIENT_SECRET, gateway, gateway_with, raw_get};
use common::{Http, Moto, Proxy};
use envelope_proxy::s3::sign::{UpstreamCredentials, sign_request};
use tokio::io::AsyncWriteExt;

fn client_creds() -> UpstreamCredentials {
    UpstreamCredentials::new(
        CLIENT_KEY.into(),
        zeroize::Zeroizing::new(CLIENT_SECRET.to_string()),
    )
}

/// A request signed as the client, sent over a fresh connection.
async fn signed(method: http::Method, url: &str, host: Option<&str>, body: Bytes) -> common::Reply {
    signed_with(method, url, host, &[], body).await
}

/// [`signed`] with extra headers (signed too).
async fn signed_with(
    method: http::Method,
    url: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> common::Reply {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(h) = host {
        req = req.header(http::header::HOST, h);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(http_body_util::Full::new(body)).unwrap();
    sign_request(&mut req, &client_creds(), "us-east-1").unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .set_host(host.is_none())
        .build_http();
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    common::Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn setup(server: &str) -> (Moto, tempfile::TempDir, Proxy) {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway(&moto, dir.path(), server).await;
    let r = signed(
        http::Method::PUT,
        &format!("http://{}/raw-bucket", proxy.addr),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "create bucket: {}", r.text());
    (moto, dir, proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_upload_commits_nothing() {
    let (moto, _dir, proxy) = setup("").await;
    // A correctly signed PUT announcing 1 MiB, of which half is sent before the socket closes.
    let url = format!("http://{}/raw-bucket/half.bin", proxy.addr);
    let mut req = http::Request::put(&url)
        .header(http::header::HOST, proxy.addr.to_string())
        .header(http::header::CONTENT_LENGTH, (1u64 << 20).to_string())
        .body(())
        .unwrap();
    sign_request(&mut req, &client_creds(), "us-east-1").unwrap();
    let mut head = String::from("PUT /raw-bucket/half.bin HTTP/1.1\r\n");
    for (k, v) in req.headers() {
        head.push_str(&format!("{}: {}\r\n", k, v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let mut sock = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&vec![7u8; 512 * 1024]).await.unwrap();
    sock.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sock);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = raw_get(&moto, "raw-bucket", "half.bin").await;
    assert_eq!(status, 404, "a partial upload reached storage");
    // The proxy still works afterwards.
    let r = signed(http::Method::PUT, &url, None, Bytes::from_static(b"whole")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn virtual_host_style_addressing() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway_with(
        &moto,
        dir.path(),
        "",
        r#"virtual_host_suffixes = ["s3.local"]"#,
    )
    .await;
    let path_url = format!("http://{}/vh-bucket", proxy.addr);
    assert_eq!(
        signed(http::Method::PUT, &path_url, None, Bytes::new())
            .await
            .status,
        200
    );
    // PUT virtual-host style: Host = vh-bucket.s3.local, path = /the/key.
    let host = format!("vh-bucket.s3.local:{}", proxy.addr.port());
    let vh_url = format!("http://{}/dir/the%20key.txt", proxy.addr);
    let r = signed(
        http::Method::PUT,
        &vh_url,
        Some(&host),
        Bytes::from_static(b"virtual hosted"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Read it back path-style, and check storage holds ciphertext.
    let r = signed(
        http::Method::GET,
        &format!("{path_url}/dir/the%20key.txt"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&r.body[..], b"virtual hosted");
    let (status, stored) = raw_get(&moto, "vh-bucket", "dir/the%20key.txt").await;
    assert_eq!(status, 200);
    assert_eq!(stored.len(), 14 + 72);
}

/// Flip the last hex digit of the X-Amz-Signature query parameter.
fn v4_url_tampered(url: &str) -> String {
    let at = url.find("X-Amz-Signature=").expect("a v4 presigned URL") + "X-Amz-Signature=".len();
    let mut bytes = url.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn presigned_urls_v4_and_v2_work_and_tampering_is_refused() {
    let (_moto, _dir, proxy) = setup("").await;
    let endpoint = format!("http://{}", proxy.addr);
    let put = signed(
        http::Method::PUT,
        &format!("{endpoint}/raw-bucket/shared.txt"),
        None,
        Bytes::from_static(b"presigned read"),
    )
    .await;
    assert_eq!(put.status, 200);
    let presign = |version: &str| {
        common::s3::presign(&endpoint, version, "get_object", "raw-bucket", "shared.txt")
    };
    let http = Http::default();
    let v4 = http.get(&presign("s3v4"), &[]).await;
    assert_eq!(v4.status, 200, "{}", v4.text());
    assert_eq!(&v4.body[..], b"presigned read");
    // s3s verifies SigV2 presigned URLs too (older SDKs still make them).
    let v2_url = presign("s3");
    let v2 = http.get(&v2_url, &[]).await;
    assert_eq!(v2.status, 200, "{}", v2.text());
    assert_eq!(&v2.body[..], b"presigned read");
    // A tampered signature or an expired URL is refused.
    for url in [
        v4_url_tampered(&presign("s3v4")),
        v2_url.replace("Signature=", "Signature=AAAA"),
    ] {
        let r = http.get(&url, &[]).await;
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        assert!(
            r.text().contains("SignatureDoesNotMatch") || r.text().contains("AccessDenied"),
            "{}",
            r.text()
        );
    }
}

/// Requests whose body an S3 server would store as the object, but that the gateway does not
/// seal, are refused: nothing reaches storage in clear.
#[tokio::test(flavor = "multi_thread")]
async fn object_requests_the_gateway_cannot_seal_are_refused() {
    let (moto, _dir, proxy) = setup("").await;
    let base = format!("http://{}/raw-bucket", proxy.addr);
    for (method, url) in [
        (http::Method::PUT, format!("{base}/leak1?torrent")),
        (http::Method::PUT, format!("{base}/leak2?select")),
        (http::Method::PUT, format!("{base}/leak3?uploads")),
        (http::Method::GET, format!("{base}/leak4?uploads")),
        // POST Object (a browser-form upload to the bucket) and a POST on a key.
        (http::Method::POST, base.clone()),
        (http::Method::POST, format!("{base}/leak6")),
        (http::Method::PATCH, format!("{base}/leak7")),
    ] {
        let r = signed(
            method.clone(),
            &url,
            None,
            Bytes::from_static(b"secret payload"),
        )
        .await;
        assert_eq!(r.status, 501, "{method} {url}: {}", r.text());
        assert!(r.text().contains("NotImplemented"), "{}", r.text());
    }
    // A percent-escape in the bucket segment would split differently upstream.
    let r = signed(
        http::Method::PUT,
        &format!("http://{}/raw-bucket%2Fleak5", proxy.addr),
        None,
        Bytes::from_static(b"secret payload"),
    )
    .await;
    assert!(r.status.is_client_error(), "{}: {}", r.status, r.text());
    for key in ["leak1", "leak2", "leak3", "leak5"] {
        let (status, _) = raw_get(&moto, "raw-bucket", key).await;
        assert_eq!(status, 404, "{key} reached storage");
    }
    // Allowed subresources still pass through (tagging carries no object body).
    let put = signed(
        http::Method::PUT,
        &format!("{base}/tagged"),
        None,
        Bytes::from_static(b"x"),
    )
    .await;
    assert_eq!(put.status, 200);
    let tags = signed(
        http::Method::GET,
        &format!("{base}/tagged?tagging"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(tags.status, 200, "{}", tags.text());
}

/// A copy reads its source with the route's own keys and upstream credentials, so the source
/// must be served by the same route (routes scope clients to buckets); it names an object,
/// never a subresource; and an object written around the proxy is not copied in clear.
#[tokio::test(flavor = "multi_thread")]
async fn copies_stay_within_their_route_and_never_copy_plaintext() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let route =
        |name: &str, path: &str| common::s3::route(name, path, &moto.endpoint(), dir.path(), "");
    let routes = route("hr", "/hr-docs/**") + &route("objects", "/**");
    let proxy = Proxy::start(&routes, "").await;
    let base = format!("http://{}", proxy.addr);
    for bucket in ["hr-docs", "fin-docs"] {
        let r = signed(
            http::Method::PUT,
            &format!("{base}/{bucket}"),
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "create {bucket}: {}", r.text());
    }
    let r = signed(
        http::Method::PUT,
        &format!("{base}/hr-docs/salaries.csv"),
        None,
        Bytes::from_static(b"ada,100\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let copy = |dest: &'static str, source: &'static str| {
        let url = format!("{base}/fin-docs/{dest}");
        async move {
            signed_with(
                http::Method::PUT,
                &url,
                None,
                &[("x-amz-copy-source", source)],
                Bytes::new(),
            )
            .await
        }
    };
    // Another route's object: refused, nothing written.
    let r = copy("x", "hr-docs/salaries.csv").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("AccessDenied"), "{}", r.text());
    assert_eq!(raw_get(&moto, "fin-docs", "x").await.0, 404);
    // A subresource as the source: refused.
    let r = copy("y", "fin-docs/anything?acl").await;
    assert_eq!(r.status, 400, "{}", r.text());
    // An object written around the proxy (no envelope): the copy is refused, not done in clear.
    let put_raw = {
        let creds = UpstreamCredentials::new(
            "testing".into(),
            zeroize::Zeroizing::new("testing".to_string()),
        );
        let mut req = http::Request::put(format!("{}/fin-docs/legacy.txt", moto.endpoint()))
            .body(http_body_util::Full::new(Bytes::from_static(
                b"written before the proxy",
            )))
            .unwrap();
        sign_request(&mut req, &creds, "us-east-1").unwrap();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
            .request(req)
            .await
            .unwrap()
    };
    assert!(put_raw.status().is_success());
    let r = copy("legacy-copy.txt", "fin-docs/legacy.txt").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(raw_get(&moto, "fin-docs", "legacy-copy.txt").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_root_key_is_answered_as_s3_answers_sse_kms_not_as_a_bad_object() {
    use envelope_proxy::keys::keyring::{Keyring, MasterKeySource};
    let (moto, _dir, proxy) = setup("").await;
    let url = format!("http://{}/raw-bucket/k.txt", proxy.addr);
    let r = signed(http::Method::PUT, &url, None, Bytes::from_static(b"hello")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stored = raw_get(&moto, "raw-bucket", "k.txt").await;

    let d = proxy.dir.path();
    Keyring::open(
        "local",
        &d.join("keyring.json"),
        &MasterKeySource::File(d.join("master.key")),
    )
    .unwrap()
    .set_enabled("objects", false)
    .unwrap();
    let mut r = signed(http::Method::GET, &url, None, Bytes::new()).await;
    for _ in 0..40 {
        if r.status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = signed(http::Method::GET, &url, None, Bytes::new()).await;
    }
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.text().contains("<Code>KMS.DisabledException</Code>"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains("hello"));
    // Nothing changed in storage.
    assert_eq!(raw_get(&moto, "raw-bucket", "k.txt").await, stored);
    // Writes say the same.
    let r = signed(http::Method::PUT, &url, None, Bytes::from_static(b"again")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("KMS.DisabledException"), "{}", r.text());
}

/// A request signed as the client, then given `unsigned` headers the signature does not cover.
async fn signed_then_added(
    method: http::Method,
    url: &str,
    signed_headers: &[(&str, &str)],
    unsigned: &[(&str, &str)],
    body: Bytes,
) -> common::Reply {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in signed_headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(http_body_util::Full::new(body)).unwrap();
    sign_request(&mut req, &client_creds(), "us-east-1").unwrap();
    for (k, v) in unsigned {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    common::Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Issue #8, item 1: an `x-amz-*` header outside the signature changes what a signed request
/// does (a presigned PUT becomes a CopyObject of the payroll). It is refused, as AWS does.
#[tokio::test(flavor = "multi_thread")]
async fn unsigned_amz_headers_are_refused() {
    let (moto, _dir, proxy) = setup("").await;
    let endpoint = format!("http://{}", proxy.addr);
    let put = signed(
        http::Method::PUT,
        &format!("{endpoint}/raw-bucket/private/payroll.csv"),
        None,
        Bytes::from_static(b"ada,100000\n"),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let http = Http::default();
    // A presigned PUT (SignedHeaders=host) for public/upload.txt, with an added copy source.
    let url = common::s3::presign(
        &endpoint,
        "s3v4",
        "put_object",
        "raw-bucket",
        "public/upload.txt",
    );
    assert!(url.contains("X-Amz-SignedHeaders=host&"), "{url}");
    for extra in [
        ("x-amz-copy-source", "raw-bucket/private/payroll.csv"),
        ("x-amz-tagging", "owner=mallory"),
        ("x-amz-acl", "public-read"),
    ] {
        let r = http
            .send(http::Method::PUT, &url, &[extra], Bytes::new())
            .await;
        assert_eq!(r.status, 403, "{extra:?}: {}", r.text());
        assert!(r.text().contains("AccessDenied"), "{}", r.text());
        assert!(r.text().contains(extra.0), "{}", r.text());
        assert_eq!(
            raw_get(&moto, "raw-bucket", "public/upload.txt").await.0,
            404,
            "{extra:?} wrote the URL's key"
        );
    }
    // The URL itself works.
    let r = http
        .send(http::Method::PUT, &url, &[], Bytes::from_static(b"upload"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Header authentication: the same, for headers added after signing.
    let r = signed_then_added(
        http::Method::PUT,
        &format!("{endpoint}/raw-bucket/public/copy.txt"),
        &[],
        &[
            ("x-amz-copy-source", "raw-bucket/private/payroll.csv"),
            ("x-amz-metadata-directive", "REPLACE"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(raw_get(&moto, "raw-bucket", "public/copy.txt").await.0, 404);
    // Hoisted into the query string (where S3 reads x-amz-* as headers), even signed: the
    // gateway would not see the copy, so it is refused.
    let r = signed(
        http::Method::PUT,
        &format!("{endpoint}/raw-bucket/public/copy.txt?x-amz-copy-source=raw-bucket%2Fprivate%2Fpayroll.csv"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(raw_get(&moto, "raw-bucket", "public/copy.txt").await.0, 404);
    // Signed, the same copy is allowed (the headers are the signer's intent).
    let r = signed_with(
        http::Method::PUT,
        &format!("{endpoint}/raw-bucket/public/copy.txt"),
        None,
        &[("x-amz-copy-source", "raw-bucket/private/payroll.csv")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Issue #8, item 3: a Host that is not one of the gateway's names is refused (a
/// virtual-host-style client would otherwise have `PUT /report.pdf` read as CreateBucket,
/// its body forwarded unsealed); names listed in `path_style_hosts` work path-style; and a
/// virtual-host request reaches only buckets its route serves.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_hosts_are_refused_and_hosts_cannot_cross_routes() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"virtual_host_suffixes = ["s3.local"]
path_style_hosts = ["gateway.internal"]"#;
    let routes = common::s3::route("hr", "/hr-docs/**", &moto.endpoint(), dir.path(), "")
        + &common::s3::route("objects", "/**", &moto.endpoint(), dir.path(), extra);
    let proxy = Proxy::start(&routes, "").await;
    let base = format!("http://{}", proxy.addr);
    let port = proxy.addr.port();
    for bucket in ["hr-docs", "docs"] {
        let r = signed(
            http::Method::PUT,
            &format!("{base}/{bucket}"),
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "create {bucket}: {}", r.text());
    }
    // A virtual-host-style PUT under a name the gateway does not know.
    let r = signed(
        http::Method::PUT,
        &format!("{base}/report.pdf"),
        Some(&format!("docs.example.com:{port}")),
        Bytes::from_static(b"%PDF-1.7 quarterly report"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let (status, listing) = raw_get(&moto, "report.pdf", "").await;
    assert_eq!(
        status,
        404,
        "a bucket was created: {}",
        String::from_utf8_lossy(&listing)
    );
    // A declared name works path-style.
    let r = signed(
        http::Method::PUT,
        &format!("{base}/docs/a.txt"),
        Some(&format!("gateway.internal:{port}")),
        Bytes::from_static(b"path style"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(raw_get(&moto, "docs", "a.txt").await.1.len(), 10 + 72);
    // hr-docs belongs to the "hr" route; a Host naming it on the "objects" route is refused.
    let r = signed(
        http::Method::PUT,
        &format!("{base}/hr-docs/salaries.csv"),
        None,
        Bytes::from_static(b"ada,100\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = signed(
        http::Method::GET,
        &format!("{base}/salaries.csv"),
        Some(&format!("hr-docs.s3.local:{port}")),
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!r.text().contains("ada,100"));
    // A body on a bucket-level request that is not a small document of its kind.
    let r = signed(
        http::Method::PUT,
        &format!("{base}/newbucket"),
        None,
        Bytes::from_static(b"%PDF-1.7 quarterly report"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("InvalidRequest"), "{}", r.text());
    assert_eq!(raw_get(&moto, "newbucket", "").await.0, 404);
}

/// Issue #8, item 11: with `clear_metadata = "refuse"`, writes that would leave user
/// metadata, tags or Content-Disposition in clear beside the object are refused.
#[tokio::test(flavor = "multi_thread")]
async fn clear_metadata_can_be_refused() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = gateway_with(&moto, dir.path(), "", r#"clear_metadata = "refuse""#).await;
    let base = format!("http://{}/meta-bucket", proxy.addr);
    let r = signed(http::Method::PUT, &base, None, Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = signed(
        http::Method::PUT,
        &format!("{base}/plain.txt"),
        None,
        Bytes::from_static(b"no metadata"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let refused = [
        ("PUT", "/a.txt", ("x-amz-meta-patient", "Ada Lovelace")),
        ("PUT", "/b.txt", ("x-amz-tagging", "patient=Ada")),
        (
            "PUT",
            "/c.txt",
            (
                "content-disposition",
                "attachment; filename=\"ada-diagnosis.pdf\"",
            ),
        ),
        ("POST", "/d.txt?uploads", ("x-amz-meta-patient", "Ada")),
        (
            "PUT",
            "/plain.txt?tagging",
            ("content-type", "application/xml"),
        ),
    ];
    for (method, path, header) in refused {
        let body = if path.ends_with("?tagging") {
            Bytes::from_static(
                b"<Tagging><TagSet><Tag><Key>patient</Key><Value>Ada</Value></Tag></TagSet></Tagging>",
            )
        } else {
            Bytes::from_static(b"body")
        };
        let r = signed_with(
            method.parse().unwrap(),
            &format!("{base}{path}"),
            None,
            &[header],
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{method} {path} {header:?}: {}", r.text());
        assert!(r.text().contains("InvalidArgument"), "{}", r.text());
    }
    for key in ["a.txt", "b.txt", "c.txt"] {
        assert_eq!(raw_get(&moto, "meta-bucket", key).await.0, 404, "{key}");
    }
    let (status, tags) = raw_get(&moto, "meta-bucket", "plain.txt?tagging").await;
    assert_eq!(status, 200);
    assert!(!String::from_utf8_lossy(&tags).contains("Ada"));
    // A copy that replaces metadata with new user metadata: refused; a plain copy works.
    let r = signed_with(
        http::Method::PUT,
        &format!("{base}/copy.txt"),
        None,
        &[
            ("x-amz-copy-source", "meta-bucket/plain.txt"),
            ("x-amz-metadata-directive", "REPLACE"),
            ("x-amz-meta-patient", "Ada"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = signed_with(
        http::Method::PUT,
        &format!("{base}/copy.txt"),
        None,
        &[("x-amz-copy-source", "meta-bucket/plain.txt")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
