//! One conformance suite for every root-key backend, in the style of rustls's per-provider
//! tests: each backend's test file calls [`run`] with a provider and its keys.
#![allow(dead_code)]

use std::sync::Arc;

use envelope_proxy::envelope::Context;
use envelope_proxy::keys::{BackendError, DataKey, RootKeyProvider};

pub struct Keys<'a> {
    /// An enabled key.
    pub key: &'a str,
    /// A disabled key, where the backend enforces key states.
    pub disabled: Option<&'a str>,
}

fn ctx(tenant: &str) -> Context {
    [("tenant", tenant), ("table", "users")]
        .into_iter()
        .collect()
}

pub async fn run(p: Arc<dyn RootKeyProvider>, keys: Keys<'_>) {
    // generate → unwrap gives the same key
    let g = p
        .generate_data_key(keys.key, &ctx("acme"))
        .await
        .expect("generate");
    assert_eq!(g.wrapped.backend, p.name());
    let k = p
        .unwrap_data_key(&g.wrapped, &ctx("acme"))
        .await
        .expect("unwrap");
    assert_eq!(k.expose(), g.plaintext.expose());

    // wrap an existing key (multi-key routes) → unwrap gives it back
    let dk = DataKey::generate();
    let w = p
        .wrap_data_key(keys.key, &dk, &ctx("acme"))
        .await
        .expect("wrap");
    assert_eq!(
        p.unwrap_data_key(&w, &ctx("acme"))
            .await
            .expect("unwrap wrapped")
            .expose(),
        dk.expose()
    );

    // another key context → refused
    let e = p
        .unwrap_data_key(&g.wrapped, &ctx("globex"))
        .await
        .expect_err("wrong context must fail");
    assert!(
        matches!(e, BackendError::InvalidCiphertext),
        "wrong context: {e:?}"
    );
    let e = p
        .unwrap_data_key(&g.wrapped, &Context::new())
        .await
        .expect_err("empty context must fail");
    assert!(
        matches!(e, BackendError::InvalidCiphertext),
        "empty context: {e:?}"
    );

    // tampered EDKs → refused, never a panic
    for i in [0, g.wrapped.blob.len() / 2, g.wrapped.blob.len() - 1] {
        let mut bad = g.wrapped.clone();
        bad.blob[i] ^= 0x01;
        let e = p
            .unwrap_data_key(&bad, &ctx("acme"))
            .await
            .expect_err("tampered EDK must fail");
        assert!(!e.retryable(), "tampering is not an outage: {e:?}");
    }
    for blob in [vec![], vec![0u8; 3], vec![0xffu8; 4096]] {
        let mut bad = g.wrapped.clone();
        bad.blob = blob;
        assert!(p.unwrap_data_key(&bad, &ctx("acme")).await.is_err());
    }

    // unknown key
    let e = p
        .generate_data_key("no-such-key-7f3a", &ctx("acme"))
        .await
        .expect_err("unknown key must fail");
    assert!(
        matches!(e, BackendError::KeyNotFound(_)),
        "unknown key: {e:?}"
    );

    // disabled key
    if let Some(disabled) = keys.disabled {
        let e = p
            .generate_data_key(disabled, &ctx("acme"))
            .await
            .expect_err("disabled key must fail");
        assert!(
            matches!(e, BackendError::KeyDisabled(_)),
            "disabled key: {e:?}"
        );
    }

    // describe
    let d = p.describe_key(keys.key).await.expect("describe");
    assert!(d.enabled);
}
