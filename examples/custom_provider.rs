//! Writing your own root-key backend, and serving requests with it.
//!
//! `RootKeyProvider` is the one extension point for root keys: implement it outside the crate
//! and hand it to the server beside the config (`server::Builder::provider`); routes name its
//! keys as `NAME:key` once the config declares `[backend.NAME] kind = "embedded"`. The rest of
//! the proxy (policies, data-key cache, tokens, S3 objects, audit) works unchanged.
//!
//! This toy backend, `demo`, derives one AES-256 root key per key id from a secret in the
//! `DEMO_ROOT_SECRET` environment variable and wraps data keys with AES-256-GCM, binding the key
//! context as AAD. It is for learning only: a real backend keeps root keys in a KMS or HSM.
//!
//! Run it with `cargo run --example custom_provider`: the proxy on 127.0.0.1:8080 in front of
//! its in-memory demo store on 127.0.0.1:3000, the `users` route sealing `$.ssn` under
//! `demo:users`:
//!
//! ```console
//! $ curl -s -X POST localhost:8080/tenants/acme/users -H 'content-type: application/json' -d '{"id":"1","ssn":"123-45-6789"}'
//! $ curl -s localhost:3000/tenants/acme/users/1      # the store: a token wrapped by "demo"
//! $ curl -s localhost:8080/tenants/acme/users/1      # through the proxy: plaintext
//! ```
//!
//! tests/embedding.rs runs this file's `start` and makes that round trip.

use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use async_trait::async_trait;
use envelope_proxy::envelope::{Context, WrappedKey, fill_random};
use envelope_proxy::keys::{BackendError, DataKey, KeyDescription, RootKeyProvider};
use envelope_proxy::server::{Builder, Running};
use sha2::{Digest, Sha256};

/// Our backend. It holds only the secret; root keys are derived on demand.
pub struct DemoProvider {
    pub secret: Vec<u8>,
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

/// The proxy's config: the keyring is still required (empty here), the `demo` backend is
/// embedded (its provider comes from this program), and the route's key is on it.
pub fn config(listen: &str, store: &str, data_dir: &Path) -> String {
    let data = data_dir.display();
    format!(
        r#"
[server]
listen = "{listen}"
auth = "none"

[keyring]
path = "{data}/keyring.json"
master_key_file = "{data}/master.key"

[backend.demo]
kind = "embedded"

[demo_store]
listen = "{store}"

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://{store}"
key = "demo:users"
fields = ["$.ssn"]
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{path.id|json.id}}" }}
"#
    )
}

/// Start the proxy with the `demo` provider serving the config's embedded backend.
pub async fn start(config_text: &str, secret: &[u8]) -> Result<Running, String> {
    let config = envelope_proxy::config::parse(config_text).map_err(|e| e.to_string())?;
    let provider = DemoProvider {
        secret: secret.to_vec(),
    };
    Builder::new(config)
        .provider(Arc::new(provider))
        .start()
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("DEMO_ROOT_SECRET").unwrap_or_else(|_| {
        eprintln!("DEMO_ROOT_SECRET is not set; using a built-in demo secret");
        "not-a-secret".to_string()
    });
    let data = Path::new("data/custom_provider");
    std::fs::create_dir_all(data)?;
    let running = start(
        &config("127.0.0.1:8080", "127.0.0.1:3000", data),
        secret.as_bytes(),
    )
    .await?;
    println!(
        "proxy on {:?}, demo store on {:?}; root keys from the \"demo\" provider. Ctrl-C stops.",
        running.addr, running.demo_store_addr
    );
    tokio::signal::ctrl_c().await?;
    running.stop().await;
    Ok(())
}
