//! Embedding: a program's own `RootKeyProvider` serves real requests inside the server
//! (`server::Builder::provider`), here the one from examples/custom_provider.rs.

mod common;

#[allow(dead_code)]
#[path = "../examples/custom_provider.rs"]
mod example;

use serde_json::json;

#[tokio::test]
async fn a_custom_provider_seals_and_opens_through_the_proxy() {
    let data = tempfile::tempdir().unwrap();
    let store = format!("127.0.0.1:{}", common::free_port());
    let config = example::config("127.0.0.1:0", &store, data.path());
    let running = example::start(&config, b"embedding-test-secret")
        .await
        .unwrap();
    let proxy = format!(
        "http://{}/tenants/acme/users",
        running.addr.expect("a TCP listener")
    );
    let http = common::Http::default();

    let created = http
        .post_json(&proxy, &[], &json!({"id": "7", "ssn": "123-45-6789"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.text());

    // At rest: a token whose EDK was wrapped by the "demo" backend, no plaintext.
    let stored = http
        .get(&format!("http://{store}/tenants/acme/users/7"), &[])
        .await
        .json();
    let token = stored["ssn"].as_str().unwrap();
    let parsed = envelope_proxy::envelope::token::ParsedToken::parse(token).unwrap();
    assert_eq!(parsed.header.edks.len(), 1);
    assert_eq!(parsed.header.edks[0].backend, "demo");
    assert_eq!(parsed.header.edks[0].key_id, "users");
    assert!(!stored.to_string().contains("123-45-6789"));

    // Back through the proxy: plaintext. Another tenant's path re-derives another key
    // context, which the provider's AAD refuses.
    let read = http.get(&format!("{proxy}/7"), &[]).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json()["ssn"], "123-45-6789");
    running.stop().await;

    // The same stored token does not open under another provider secret (the root key is
    // the provider's, not the keyring's).
    let other = example::start(
        &example::config("127.0.0.1:0", "127.0.0.1:0", data.path()),
        b"another-secret",
    )
    .await
    .unwrap();
    let key_context: envelope_proxy::envelope::Context = [("tenant", "acme")].into_iter().collect();
    assert!(
        other
            .state()
            .keys
            .opening_key(&parsed.header, &key_context)
            .await
            .is_err()
    );
    other.stop().await;
}

/// Both sides must match: an embedded backend without its provider, and a provider the
/// config does not name, stop the start with the fix named.
#[tokio::test]
async fn embedded_backends_and_providers_must_match() {
    let data = tempfile::tempdir().unwrap();
    let text = example::config("127.0.0.1:0", "127.0.0.1:0", data.path());
    let config = envelope_proxy::config::parse(&text).unwrap();
    let err = envelope_proxy::server::start(config).await.err().unwrap();
    assert!(err.contains("backend demo"), "{err}");
    assert!(err.contains("server::Builder::provider"), "{err}");

    let text = text
        .replace("[backend.demo]\nkind = \"embedded\"\n", "")
        .replace("demo:users", "users")
        .replace("master.key\"", "master.key\"\ncreate_missing_keys = true");
    let config = envelope_proxy::config::parse(&text).unwrap();
    let provider = example::DemoProvider {
        secret: b"x".to_vec(),
    };
    let err = envelope_proxy::server::Builder::new(config)
        .provider(std::sync::Arc::new(provider))
        .start()
        .await
        .err()
        .unwrap();
    assert!(err.contains("no [backend.demo]"), "{err}");

    // Two providers under one name: which one would serve is not left to chance.
    let text = example::config("127.0.0.1:0", "127.0.0.1:0", data.path());
    let config = envelope_proxy::config::parse(&text).unwrap();
    let twice = |s: &[u8]| -> std::sync::Arc<dyn envelope_proxy::keys::RootKeyProvider> {
        std::sync::Arc::new(example::DemoProvider { secret: s.to_vec() })
    };
    let err = envelope_proxy::server::Builder::new(config)
        .provider(twice(b"a"))
        .provider(twice(b"b"))
        .start()
        .await
        .err()
        .unwrap();
    assert!(err.contains("given twice"), "{err}");
}
