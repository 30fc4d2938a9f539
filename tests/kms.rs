#![cfg(feature = "aws-kms")]
//! AWS KMS as the root-key backend, against moto server's KMS (it enforces EncryptionContext;
//! it ignores key states, so the disabled-key check of the conformance suite is left out here
//! and covered by the keyring and PKCS#11 backends).

mod common;
mod conformance;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Http, JsonServer, Moto, Proxy};
use envelope_proxy::config::KmsSettings;
use envelope_proxy::envelope::Context;
use envelope_proxy::keys::aws_kms::AwsKms;
use envelope_proxy::keys::{BackendError, KeyRef, RootKeyProvider};
use http::StatusCode;
use serde_json::json;

fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("credentials");
    std::fs::write(
        &path,
        "[moto]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    path
}

fn backend_toml(moto: &Moto, creds: &std::path::Path) -> String {
    format!(
        r#"
[backend.kms]
kind = "aws-kms"
region = "us-east-1"
endpoint = "{}"
profile = "moto"
credentials_file = "{}"
call_timeout_ms = 500
retries = 1
failure_threshold = 2
open_for_secs = 1
"#,
        moto.endpoint(),
        creds.display()
    )
}

fn route(upstream: &str, keys: &str) -> String {
    format!(
        r#"
[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "{upstream}"
keys = {keys}
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#
    )
}

/// The proxy with the KMS backend (moto) and a users route on `keys` in front of json-server;
/// `extra` is TOML put before the route. The credentials file must outlive the proxy.
async fn kms_proxy(
    moto: &Moto,
    js: &JsonServer,
    keys: &str,
    extra: &str,
) -> (Proxy, tempfile::TempDir) {
    let creds_dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "{}{extra}{}",
        backend_toml(moto, &credentials_file(creds_dir.path())),
        route(&js.url(), keys)
    );
    (Proxy::start(&routes, "").await, creds_dir)
}

async fn provider(moto: &Moto, dir: &std::path::Path) -> AwsKms {
    AwsKms::connect(
        "kms",
        &KmsSettings {
            region: Some("us-east-1".into()),
            endpoint: Some(moto.endpoint()),
            profile: Some("moto".into()),
            credentials_file: Some(credentials_file(dir)),
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn aws_kms_conforms() {
    let moto = Moto::start();
    let arn = moto.create_key("alias/conformance").await;
    let dir = tempfile::tempdir().unwrap();
    let kms = Arc::new(provider(&moto, dir.path()).await);
    conformance::run(
        kms.clone(),
        conformance::Keys {
            key: "alias/conformance",
            disabled: None,
        },
    )
    .await;
    // Key ids, ARNs and aliases all work, and the EDK names the ARN KMS used.
    for id in [
        arn.as_str(),
        arn.rsplit('/').next().unwrap(),
        "alias/conformance",
    ] {
        let g = kms.generate_data_key(id, &Context::new()).await.unwrap();
        assert_eq!(g.wrapped.key_id, arn);
    }
}

#[tokio::test]
async fn kms_enforces_the_key_context() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let dir = tempfile::tempdir().unwrap();
    let kms = provider(&moto, dir.path()).await;
    let acme: Context = [("tenant", "acme")].into_iter().collect();
    let globex: Context = [("tenant", "globex")].into_iter().collect();
    let g = kms.generate_data_key("alias/users", &acme).await.unwrap();
    let e = kms
        .unwrap_data_key(&g.wrapped, &globex)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
}

#[tokio::test]
async fn round_trip_through_the_proxy_with_kms() {
    let moto = Moto::start();
    let arn = moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (proxy, _creds) = kms_proxy(&moto, &js, r#"["kms:alias/users"]"#, "").await;
    let http = Http::default();
    let doc = json!({"id": "k1", "name": "Ada", "ssn": "123-45-6789"});
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc)
        .await;
    assert_eq!(w.status, 201, "{}", w.text());
    assert_eq!(
        http.get(&proxy.url("/tenants/acme/users/k1"), &[])
            .await
            .json(),
        doc
    );
    let raw = http
        .get(&format!("{}/users/k1", js.url()), &[])
        .await
        .json();
    let token =
        envelope_proxy::envelope::token::ParsedToken::parse(raw["ssn"].as_str().unwrap()).unwrap();
    assert_eq!(token.header.edks.len(), 1);
    assert_eq!(token.header.edks[0].backend, "kms");
    assert_eq!(token.header.edks[0].key_id, arn);
    assert!(!js.db_file().contains("123-45-6789"));
    // Another tenant: KMS refuses the EncryptionContext.
    let r = http.get(&proxy.url("/tenants/globex/users/k1"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
}

#[tokio::test]
async fn a_hung_kms_keeps_cached_work_going_and_recovers() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (proxy, _creds) = kms_proxy(
        &moto,
        &js,
        r#"["kms:alias/users"]"#,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let admin = format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    );
    let http = Http::default();
    let doc = |id: &str| json!({"id": id, "ssn": format!("ssn-{id}")});
    assert_eq!(
        http.post_json(&proxy.url("/tenants/acme/users"), &[], &doc("a1"))
            .await
            .status,
        201
    );
    assert_eq!(
        http.get(&proxy.url("/tenants/acme/users/a1"), &[])
            .await
            .status,
        200
    );

    moto.signal("-STOP");
    // Cached: reads of a1 and new writes under tenant acme.
    let r = http.get(&proxy.url("/tenants/acme/users/a1"), &[]).await;
    assert_eq!(r.status, 200, "cached read while KMS hangs: {}", r.text());
    let w = http
        .post_json(&proxy.url("/tenants/acme/users"), &[], &doc("a2"))
        .await;
    assert_eq!(w.status, 201, "cached write while KMS hangs: {}", w.text());
    // Not cached: another key context needs KMS → 503 with Retry-After, never plaintext.
    let w = http
        .post_json(&proxy.url("/tenants/globex/users"), &[], &doc("g1"))
        .await;
    assert_eq!(w.status, StatusCode::SERVICE_UNAVAILABLE, "{}", w.text());
    assert_eq!(w.error_code(), "key_backend_unavailable");
    assert!(w.headers.contains_key("retry-after"));
    let stored = http.get(&format!("{}/users", js.url()), &[]).await.json();
    assert!(
        stored.as_array().unwrap().iter().all(|u| u["id"] != "g1"),
        "nothing written while the key backend is down"
    );
    // A second failed request opens the circuit (failure_threshold = 2) …
    let w = http
        .post_json(&proxy.url("/tenants/globex/users"), &[], &doc("g1"))
        .await;
    assert_eq!(w.status, StatusCode::SERVICE_UNAVAILABLE);
    // … after which requests fail fast without waiting on KMS, and /readyz says so (in its
    // detail: the proxy stays ready, its cached keys still serve tenant acme).
    let t = Instant::now();
    let w = http
        .post_json(&proxy.url("/tenants/globex/users"), &[], &doc("g1"))
        .await;
    assert_eq!(w.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "open circuit should fail fast: {:?}",
        t.elapsed()
    );
    let ready = http.get(&format!("{admin}/readyz"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["backends"]["kms"], "down");

    moto.signal("-CONT");
    // Recovery is automatic once the cool-down (1 s) has passed.
    let mut status = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = http
            .post_json(&proxy.url("/tenants/globex/users"), &[], &doc("g1"))
            .await
            .status
            .as_u16();
        if status == 201 {
            break;
        }
    }
    assert_eq!(status, 201, "recovered after KMS came back");
    assert_eq!(http.get(&format!("{admin}/readyz"), &[]).await.status, 200);
}

#[tokio::test]
async fn multi_key_routes_read_through_the_escrow_key_when_kms_is_gone() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (proxy, _creds) = kms_proxy(
        &moto,
        &js,
        r#"["kms:alias/users", "local:users-escrow"]"#,
        "",
    )
    .await;
    let http = Http::default();
    let doc = json!({"id": "m1", "ssn": "123-45-6789"});
    assert_eq!(
        http.post_json(&proxy.url("/tenants/acme/users"), &[], &doc)
            .await
            .status,
        201
    );
    let raw = http
        .get(&format!("{}/users/m1", js.url()), &[])
        .await
        .json();
    let token =
        envelope_proxy::envelope::token::ParsedToken::parse(raw["ssn"].as_str().unwrap()).unwrap();
    let backends: Vec<_> = token
        .header
        .edks
        .iter()
        .map(|e| e.backend.as_str())
        .collect();
    assert_eq!(backends, ["kms", "local"], "one EDK per listed key");

    moto.signal("-STOP");
    proxy.state().keys.cache().invalidate_all(); // a cold cache: every read must unwrap
    let r = http.get(&proxy.url("/tenants/acme/users/m1"), &[]).await;
    assert_eq!(
        r.status,
        200,
        "escrow key reads while KMS is gone: {}",
        r.text()
    );
    assert_eq!(r.json(), doc);
}

#[tokio::test]
async fn kms_calls_per_ten_thousand_writes_and_single_flight() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (proxy, _creds) = kms_proxy(&moto, &js, r#"["kms:alias/users"]"#, "").await;
    let keys = proxy.state().keys.clone();
    let kr = [KeyRef::parse("kms:alias/users").unwrap()];
    let ctx: Context = [("tenant", "acme")].into_iter().collect();

    // 1000 concurrent cold requests → one GenerateDataKey.
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let keys = keys.clone();
        let (kr, ctx) = (kr.clone(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            keys.sealing_key(&kr, &ctx, 1, 100).await.is_ok()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(
        proxy.state().metrics.backend_calls_for("kms"),
        1,
        "single-flight"
    );

    // 10,000 writes under default cache limits, two key contexts: one call per context.
    let globex: Context = [("tenant", "globex")].into_iter().collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..10_000 {
        let c = if i % 2 == 0 { &ctx } else { &globex };
        let t = Instant::now();
        keys.sealing_key(&kr, c, 1, 1024).await.unwrap();
        let e = t.elapsed();
        if i < 2 { cold.push(e) } else { warm.push(e) }
    }
    let calls = proxy.state().metrics.backend_calls_for("kms");
    println!(
        "KMS calls for 10,000 writes over 2 key contexts: {} (after the single-flight warm-up)",
        calls - 1
    );
    assert_eq!(
        calls, 2,
        "one GenerateDataKey per key context per cache period"
    );
    warm.sort();
    println!(
        "data key for a write: cold {:?} (KMS call), warm p50 {:?} p99 {:?}",
        cold[1],
        warm[warm.len() / 2],
        warm[warm.len() * 99 / 100]
    );
}

/// Measurement (printed, not asserted): write latency through the proxy with KMS as the
/// backend, warm cache (one tenant) versus cold (a new tenant, so a new key context and a
/// GenerateDataKey call, each time). `cargo test --test kms write_latency -- --nocapture`.
#[tokio::test]
async fn write_latency_cold_versus_warm() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let (proxy, _creds) = kms_proxy(&moto, &js, r#"["kms:alias/users"]"#, "").await;
    let http = Http::default();
    let measure = |samples: &mut Vec<Duration>, t: Instant| samples.push(t.elapsed());
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    http.post_json(
        &proxy.url("/tenants/warm/users"),
        &[],
        &json!({"id": "w-first", "ssn": "1"}),
    )
    .await;
    for i in 0..200 {
        let t = Instant::now();
        let r = http
            .post_json(
                &proxy.url("/tenants/warm/users"),
                &[],
                &json!({"id": format!("w{i}"), "ssn": "123"}),
            )
            .await;
        measure(&mut warm, t);
        assert_eq!(r.status, 201);
        let t = Instant::now();
        let r = http
            .post_json(
                &proxy.url(&format!("/tenants/cold{i}/users")),
                &[],
                &json!({"id": format!("c{i}"), "ssn": "123"}),
            )
            .await;
        measure(&mut cold, t);
        assert_eq!(r.status, 201);
    }
    warm.sort();
    cold.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    println!(
        "write latency through the proxy to json-server, KMS (moto) backend, 200 writes each:\n  \
         warm cache: p50 {:?} p99 {:?}\n  cold cache (GenerateDataKey per write): p50 {:?} p99 {:?}",
        pct(&warm, 50),
        pct(&warm, 99),
        pct(&cold, 50),
        pct(&cold, 99)
    );
    assert_eq!(
        proxy.state().metrics.backend_calls_for("kms"),
        201,
        "one KMS call per cold write"
    );
}

#[tokio::test]
async fn an_alias_not_yet_resolved_matches_only_its_own_key() {
    use envelope_proxy::envelope::Header;
    use envelope_proxy::keys::{CacheLimits, KeyService};
    use envelope_proxy::metrics::Metrics;
    let moto = Moto::start();
    let users_arn = moto.create_key("alias/users").await;
    let other_arn = moto.create_key("alias/other").await;
    let dir = tempfile::tempdir().unwrap();
    let ctx: Context = [("tenant", "acme")].into_iter().collect();
    // Sealed by someone else under another key this account can use.
    let writer = provider(&moto, dir.path()).await;
    let foreign = writer.generate_data_key("alias/other", &ctx).await.unwrap();
    assert_eq!(foreign.wrapped.key_id, other_arn);
    let own = writer.generate_data_key("alias/users", &ctx).await.unwrap();

    // A fresh process whose route names `alias/users`: nothing learned about the alias yet.
    let fresh = || async {
        let metrics = Arc::new(Metrics::new());
        let kms: Arc<dyn RootKeyProvider> = Arc::new(provider(&moto, dir.path()).await);
        (
            KeyService::new(vec![kms], CacheLimits::default(), metrics.clone()),
            metrics,
        )
    };
    let allowed = [KeyRef::parse("kms:alias/users").unwrap()];
    let (service, metrics) = fresh().await;
    let e = service
        .opening_key_for(
            &Header {
                edks: vec![foreign.wrapped.clone()],
            },
            &ctx,
            &allowed,
        )
        .await
        .err()
        .unwrap();
    assert!(matches!(e, BackendError::InvalidCiphertext), "{e:?}");
    assert_eq!(
        metrics.backend_calls_for("kms"),
        0,
        "an EDK naming another key is never sent to KMS under this route's key"
    );

    // Its own EDK opens in a fresh process (the alias is resolved first).
    let (service, _) = fresh().await;
    let k = service
        .opening_key_for(
            &Header {
                edks: vec![foreign.wrapped.clone(), own.wrapped.clone()],
            },
            &ctx,
            &allowed,
        )
        .await
        .unwrap();
    assert_eq!(k.expose(), own.plaintext.expose());
    assert_eq!(own.wrapped.key_id, users_arn);
}

/// `/metrics` as a scraper sees it: backend call latency counts grow with real calls (the
/// local keyring and moto's KMS), the KMS circuit's state follows an outage (closed → open →
/// half-open → closed).
#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_backend_calls_and_the_circuit_state() {
    let moto = Moto::start();
    moto.create_key("alias/users").await;
    let js = JsonServer::start();
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(creds_dir.path());
    let routes = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

{backend}
{users}
[[route]]
name = "page"
path = "/tenants/{{tenant}}/page"
upstream = "{upstream}"
key = "users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{json.id}}" }}
"#,
        backend = backend_toml(&moto, &creds).replace("retries = 1", "retries = 0"),
        users = route(&js.url(), r#"["kms:alias/users"]"#),
        upstream = js.url(),
    );
    let proxy = Proxy::start(&routes, "").await;
    let admin = format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    );
    let http = Http::default();
    let scrape = || async {
        http.get(&format!("{admin}/metrics"), &[("x-request-id", "scrape-1")])
            .await
            .text()
    };
    // The sum of a histogram's `_count` over every series of `backend`.
    let calls = |text: &str, backend: &str| -> f64 {
        let prefix = format!("envelope_proxy_backend_call_seconds_count{{backend=\"{backend}\"");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let gauge = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let before = scrape().await;
    let circuit = "envelope_proxy_backend_circuit_state{backend=\"kms\"}";
    assert_eq!(gauge(&before, circuit), Some(0.0), "closed: {before}");

    // Each tenant is its own key context: a fresh data key, so a backend call each.
    for t in ["t1", "t2", "t3"] {
        let r = http
            .post_json(
                &proxy.url(&format!("/tenants/{t}/users")),
                &[],
                &json!({ "id": format!("u-{t}"), "ssn": "1" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let r = http
            .put_json(
                &proxy.url(&format!("/tenants/{t}/page")),
                &json!({ "id": format!("p-{t}"), "ssn": "2" }),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    let after = scrape().await;
    assert!(
        calls(&after, "kms") >= calls(&before, "kms") + 3.0,
        "KMS calls counted:\n{after}"
    );
    assert!(
        calls(&after, "local") >= calls(&before, "local") + 3.0,
        "local keyring calls counted:\n{after}"
    );

    // KMS hangs: new data keys fail, the circuit opens (threshold 2), then half-opens.
    moto.signal("-STOP");
    for t in ["o1", "o2", "o3"] {
        let r = http
            .post_json(
                &proxy.url(&format!("/tenants/{t}/users")),
                &[],
                &json!({ "id": "x", "ssn": "1" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    }
    assert_eq!(gauge(&scrape().await, circuit), Some(1.0), "open");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gauge(&scrape().await, circuit), Some(2.0), "half-open");
    moto.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http
            .post_json(
                &proxy.url("/tenants/back/users"),
                &[],
                &json!({ "id": "y", "ssn": "1" }),
            )
            .await;
        if r.status == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KMS did not come back: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gauge(&scrape().await, circuit), Some(0.0), "closed again");
}
