//! Writing your own root-key backend.
//!
//! `RootKeyProvider` is the one extension point for root keys: implement it outside the crate,
//! hand it to `KeyService`, and the rest of the proxy (data-key cache, tokens) works unchanged.
//!
//! This toy backend, `demo`, derives one AES-256 root key per key id from a secret in the
//! `DEMO_ROOT_SECRET` environment variable and wraps data keys with AES-256-GCM, binding the key
//! context as AAD. It is for learning only: a real backend keeps root keys in a KMS or HSM.
//!
//! Run it with `cargo run --example custom_provider`.

use std::sync::Arc;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use async_trait::async_trait;
use envelope_proxy::envelope::token::{self, ParsedToken};
use envelope_proxy::envelope::{Context, WrappedKey, context::FIELD_KEY, fill_random};
use envelope_proxy::keys::{
    BackendError, CacheLimits, DataKey, KeyDescription, KeyRef, KeyService, RootKeyProvider,
};
use envelope_proxy::metrics::Metrics;
use sha2::{Digest, Sha256};

/// Our backend. It holds only the secret; root keys are derived on demand.
struct DemoProvider {
    secret: Vec<u8>,
}

impl DemoProvider {
    /// The root key for `key_id`: SHA-256(secret ‖ 0x00 ‖ key_id). (A real KMS would look it up.)
    fn root_key(&self, key_id: &str) -> Aes256Gcm {
        let digest = Sha256::new()
            .chain_update(&self.secret)
            .chain_update([0])
            .chain_update(key_id.as_bytes())
            .finalize();
        let key: [u8; 32] = digest.into();
        Aes256Gcm::new(&Array::from(key))
    }

    /// The AAD binds the key id and the key context: unwrapping under any other context fails,
    /// as the `RootKeyProvider` contract requires.
    fn aad(key_id: &str, key_context: &Context) -> Vec<u8> {
        let mut aad = b"demo-wrap-v1".to_vec();
        aad.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
        aad.extend_from_slice(key_id.as_bytes());
        aad.extend_from_slice(&key_context.canonical()); // injective encoding of the pairs
        aad
    }
}

#[async_trait]
impl RootKeyProvider for DemoProvider {
    /// The name stored in each EDK, and the `backend` of a `KeyRef`.
    fn name(&self) -> &str {
        "demo"
    }

    // generate_data_key: the trait's default (a fresh key from the OS CSPRNG, wrapped below).

    /// blob = nonce (12) ‖ AES-256-GCM(root key, nonce, aad, data key) (32 + 16).
    async fn wrap_data_key(
        &self,
        key_id: &str,
        data_key: &DataKey,
        key_context: &Context,
    ) -> Result<WrappedKey, BackendError> {
        let mut nonce = [0u8; 12];
        fill_random(&mut nonce);
        let mut sealed = data_key.expose().to_vec();
        let tag = self
            .root_key(key_id)
            .encrypt_inout_detached(
                &Array::from(nonce),
                &Self::aad(key_id, key_context),
                sealed.as_mut_slice().into(),
            )
            .map_err(|_| BackendError::Unavailable("wrap failed".into()))?;
        let blob = [nonce.as_slice(), &sealed, tag.as_slice()].concat();
        Ok(WrappedKey {
            backend: self.name().to_string(),
            key_id: key_id.to_string(),
            key_version: 0, // this backend has no key versions
            blob,
        })
    }

    /// The blob comes from storage and is attacker controlled: check lengths, never panic.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        key_context: &Context,
    ) -> Result<DataKey, BackendError> {
        if wrapped.blob.len() != 12 + 32 + 16 {
            return Err(BackendError::InvalidCiphertext);
        }
        let (nonce, rest) = wrapped.blob.split_at(12);
        let (sealed, tag) = rest.split_at(32);
        let nonce: [u8; 12] = nonce
            .try_into()
            .map_err(|_| BackendError::InvalidCiphertext)?;
        let tag: [u8; 16] = tag
            .try_into()
            .map_err(|_| BackendError::InvalidCiphertext)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(sealed);
        self.root_key(&wrapped.key_id)
            .decrypt_inout_detached(
                &Array::from(nonce),
                &Self::aad(&wrapped.key_id, key_context),
                key.as_mut_slice().into(),
                &Array::from(tag),
            )
            .map_err(|_| BackendError::InvalidCiphertext)?;
        Ok(DataKey::from_bytes(key))
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
        Ok(KeyDescription {
            key_id: key_id.to_string(),
            enabled: true,
            current_version: 0,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Build the backend and hand it to a KeyService (which adds the data-key cache).
    let secret = std::env::var("DEMO_ROOT_SECRET").unwrap_or_else(|_| {
        eprintln!("DEMO_ROOT_SECRET is not set; using a built-in demo secret");
        "not-a-secret".to_string()
    });
    let provider = DemoProvider {
        secret: secret.into_bytes(),
    };
    let keys = KeyService::new(
        vec![Arc::new(provider)],
        CacheLimits::default(),
        Arc::new(Metrics::new()),
    );

    // 2. Contexts. The key context goes to the backend (and partitions the cache); the message
    //    context is bound into each token and includes the key context plus the field's path.
    let key_context: Context = [("tenant", "acme")].into_iter().collect();
    let mut message_context = key_context.clone();
    message_context.insert("id", "42");
    message_context.insert(FIELD_KEY, "$.ssn");

    // 3. Seal a JSON value. The plaintext is its JSON serialization.
    let root = KeyRef {
        backend: "demo".into(),
        key_id: "k1".into(),
    };
    let value = serde_json::json!("123-45-6789");
    let plaintext = serde_json::to_vec(&value)?;
    let sealing = keys
        .sealing_key(&[root], &key_context, 1, plaintext.len() as u64)
        .await?;
    let token = token::seal(
        &sealing.header,
        sealing.data_key.expose(),
        &message_context,
        &plaintext,
    )?;
    println!("sealed:    {value}");
    println!("token:     {token}");

    // 4. Open it again: parse the token, let the KeyService find a backend that unwraps one of
    //    the header's EDKs, then open the message under the same message context.
    let parsed = ParsedToken::parse(&token)?;
    println!("wrapped by {:?}", parsed.header.edks);
    let data_key = keys.opening_key(&parsed.header, &key_context).await?;
    let opened = parsed.open(data_key.expose(), &message_context)?;
    let recovered: serde_json::Value = serde_json::from_slice(&opened)?;
    println!("recovered: {recovered}");
    assert_eq!(recovered, value);

    // 5. The bindings hold: another tenant's key context cannot unwrap the data key, and the
    //    token does not open as another field.
    let other_tenant: Context = [("tenant", "globex")].into_iter().collect();
    assert!(
        keys.opening_key(&parsed.header, &other_tenant)
            .await
            .is_err()
    );
    let mut other_field = message_context.clone();
    other_field.insert(FIELD_KEY, "$.name");
    assert!(parsed.open(data_key.expose(), &other_field).is_err());
    println!("another key context or field path fails, as it should");
    Ok(())
}
