//! Imported key material (BYOK), as AWS KMS's GetParametersForImport / ImportKeyMaterial.
//!
//! 1. `keys create NAME --origin external`: a key in `pending_import`, without material.
//! 2. `keys import-params NAME --out DIR`: a fresh RSA-3072 wrapping key pair; the private key
//!    stays in the sealed keyring, the public key goes to `DIR/wrapping-key.pem` (SPKI PEM)
//!    with an import token `DIR/import-token.bin`, both valid 24 hours.
//! 3. The user wraps 32 random bytes with RSA-OAEP-SHA-256 (MGF1-SHA-256):
//!    `openssl pkeyutl -encrypt -pubin -inkey DIR/wrapping-key.pem -pkeyopt rsa_padding_mode:oaep
//!    -pkeyopt rsa_oaep_md:sha256 -in key.bin -out wrapped.bin`.
//! 4. `keys import NAME --material wrapped.bin --token DIR/import-token.bin [--expires DATE]`:
//!    the token is checked (its MAC under a key derived from the master key, the key name, the
//!    parameters it names, its validity), the material unwrapped and installed as version 1;
//!    the key becomes enabled. The parameters are used once.
//!
//! A key keeps a commitment to its material (HMAC under a key derived from the master key):
//! material can be imported again (after expiry, or to restore) only if it is the same bytes,
//! as KMS requires. Expired material is wiped and the key goes back to `pending_import`.
//!
//! Import token: `"EPIT1" ‖ params id (16) ‖ u64be(valid until) ‖ u16be(len name) ‖ name ‖
//! HMAC-SHA-256(HMAC-SHA-256(master, TOKEN_LABEL), everything before)`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::lifecycle::{KeyState, Origin};
use super::{Keyring, KeyringError, RootKey, Version, unix_now, validate_key_name};
use crate::envelope::fill_random;

const TOKEN_MAGIC: &[u8] = b"EPIT1";
const TOKEN_LABEL: &[u8] = b"envelope-proxy.import-token.v1";
const COMMITMENT_LABEL: &[u8] = b"envelope-proxy.import-commitment.v1";
/// How long import parameters stay valid (as KMS: 24 hours).
pub const PARAMS_VALID_SECS: u64 = 24 * 3600;

/// Import parameters handed out and not used yet (in the sealed keyring).
pub(super) struct Pending {
    id: [u8; 16],
    /// The RSA private key, PKCS#8 DER.
    private_der: Zeroizing<Vec<u8>>,
    pub(super) expires: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InnerPending {
    id: String,
    key: String,
    expires: u64,
}

impl Drop for InnerPending {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl Pending {
    pub(super) fn read(p: InnerPending) -> Result<Pending, String> {
        let id = hex::decode(&p.id)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or("malformed import parameters id")?;
        let private_der = Zeroizing::new(
            B64.decode(&p.key)
                .map_err(|_| "malformed import wrapping key")?,
        );
        Ok(Pending {
            id,
            private_der,
            expires: p.expires,
        })
    }

    pub(super) fn write(&self) -> InnerPending {
        InnerPending {
            id: hex::encode(self.id),
            key: B64.encode(self.private_der.as_slice()),
            expires: self.expires,
        }
    }
}

/// What `keys import-params` hands out.
pub struct ImportParams {
    /// The RSA public wrapping key, SPKI PEM.
    pub public_pem: String,
    /// The import token (binary).
    pub token: Vec<u8>,
    pub expires: u64,
}

fn invalid(msg: impl Into<String>) -> KeyringError {
    KeyringError::Invalid(msg.into())
}

impl Keyring {
    fn token_mac(&self, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::{KeyInit, Mac};
        let key = self.derive_key(TOKEN_LABEL);
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_ref())
            .expect("HMAC takes any key length");
        mac.update(body);
        mac
    }

    fn commitment(&self, name: &str, material: &[u8; 32]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let key = self.derive_key(COMMITMENT_LABEL);
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_ref())
            .expect("HMAC takes any key length");
        mac.update(&(name.len() as u32).to_be_bytes());
        mac.update(name.as_bytes());
        mac.update(material);
        mac.finalize().into_bytes().into()
    }

    /// Create `name` for imported material: pending import, no versions.
    pub fn create_external(&self, name: &str) -> Result<(), KeyringError> {
        validate_key_name(name)?;
        self.modify(name, |keys| {
            if keys.keys.contains_key(name) {
                return Err(KeyringError::Exists(name.to_string()));
            }
            keys.keys.insert(
                name.to_string(),
                RootKey {
                    state: KeyState::PendingImport,
                    created: unix_now(),
                    versions: Default::default(),
                    life: super::lifecycle::Life {
                        origin: Origin::External,
                        ..Default::default()
                    },
                },
            );
            Ok(())
        })?;
        Ok(())
    }

    /// New import parameters for `name` (replacing any handed out before).
    pub fn import_params(&self, name: &str, now: u64) -> Result<ImportParams, KeyringError> {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        // RSA-3072 (the crate's default size), e = 65537, from the operating system's RNG.
        let private = <rsa::PrivateKey as rsa::Generate>::try_generate()
            .map_err(|e| invalid(format!("cannot generate the wrapping key: {e:?}")))?;
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| invalid(format!("cannot encode the wrapping key: {e}")))?;
        let der = private
            .to_pkcs8_der()
            .map_err(|e| invalid(format!("cannot encode the wrapping key: {e}")))?;
        let mut id = [0u8; 16];
        fill_random(&mut id);
        let expires = now + PARAMS_VALID_SECS;
        self.modify(name, |keys| {
            let key = keys
                .keys
                .get_mut(name)
                .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
            if key.life.origin != Origin::External {
                return Err(invalid(format!(
                    "root key {name} was made by the proxy; import material only into a key \
                     created with --origin external"
                )));
            }
            if matches!(key.state, KeyState::PendingDeletion | KeyState::Destroyed) {
                return Err(invalid(format!("root key {name} is {}", key.state.name())));
            }
            key.life.import = Some(Pending {
                id,
                private_der: Zeroizing::new(der.as_bytes().to_vec()),
                expires,
            });
            Ok(())
        })?;
        let mut token = Vec::with_capacity(64 + name.len());
        token.extend_from_slice(TOKEN_MAGIC);
        token.extend_from_slice(&id);
        token.extend_from_slice(&expires.to_be_bytes());
        token.extend_from_slice(&(name.len() as u16).to_be_bytes());
        token.extend_from_slice(name.as_bytes());
        let mac = {
            use hmac::Mac;
            self.token_mac(&token).finalize().into_bytes()
        };
        token.extend_from_slice(&mac);
        Ok(ImportParams {
            public_pem,
            token,
            expires,
        })
    }

    /// Install wrapped key material into `name` with the token of its import parameters.
    /// `material_expires`: when the material expires (the key then waits for it again).
    pub fn import(
        &self,
        name: &str,
        wrapped: &[u8],
        token: &[u8],
        material_expires: Option<u64>,
        now: u64,
    ) -> Result<(), KeyringError> {
        use rsa::pkcs8::DecodePrivateKey;
        // The token: magic, id, validity, name, MAC (checked in constant time).
        let fixed = TOKEN_MAGIC.len() + 16 + 8 + 2;
        if token.len() < fixed + 32 || !token.starts_with(TOKEN_MAGIC) {
            return Err(invalid("not an import token of envelope-proxy"));
        }
        let (body, mac) = token.split_at(token.len() - 32);
        {
            use hmac::Mac;
            self.token_mac(body).verify_slice(mac).map_err(|_| {
                invalid("the import token does not verify (another keyring, or modified)")
            })?;
        }
        let mut at = TOKEN_MAGIC.len();
        let id: [u8; 16] = body[at..at + 16]
            .try_into()
            .map_err(|_| invalid("bad token"))?;
        at += 16;
        let valid_until = u64::from_be_bytes(
            body[at..at + 8]
                .try_into()
                .map_err(|_| invalid("bad token"))?,
        );
        at += 8;
        let len = u16::from_be_bytes(
            body[at..at + 2]
                .try_into()
                .map_err(|_| invalid("bad token"))?,
        ) as usize;
        at += 2;
        if body.len() != at + len || &body[at..] != name.as_bytes() {
            return Err(invalid(format!(
                "the import token is not for root key {name}"
            )));
        }
        if now >= valid_until {
            return Err(invalid(format!(
                "the import parameters expired on {}: run `keys import-params {name}` again",
                super::lifecycle::date(valid_until)
            )));
        }
        if material_expires.is_some_and(|e| e <= now) {
            return Err(invalid("the material's expiry date is in the past"));
        }
        // The private key of those parameters, from the sealed keyring.
        let private_der = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let key = keys
                .keys
                .get(name)
                .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
            match &key.life.import {
                Some(p) if p.id == id => p.private_der.clone(),
                _ => {
                    return Err(invalid(
                        "these import parameters were used already or replaced: run `keys import-params` again",
                    ));
                }
            }
        };
        let private = rsa::PrivateKey::from_pkcs8_der(&private_der)
            .map_err(|_| invalid("the stored wrapping key is malformed"))?;
        let material = Zeroizing::new(private.oaep_decrypt::<rsa::sha2::Sha256>(wrapped).map_err(
            |_| {
                invalid(
                    "the wrapped material does not unwrap: wrap it with RSA-OAEP SHA-256 under \
                         this key's wrapping key (see the README)",
                )
            },
        )?);
        let material: Zeroizing<[u8; 32]> = Zeroizing::new(
            material
                .as_slice()
                .try_into()
                .map_err(|_| invalid("key material must be exactly 32 bytes (AES-256)"))?,
        );
        let commitment = self.commitment(name, &material);
        self.modify(name, |keys| {
            let key = keys
                .keys
                .get_mut(name)
                .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
            if key.life.import.as_ref().map(|p| p.id) != Some(id) {
                return Err(invalid("these import parameters were used already"));
            }
            if matches!(key.state, KeyState::PendingDeletion | KeyState::Destroyed) {
                return Err(invalid(format!("root key {name} is {}", key.state.name())));
            }
            if let Some(c) = &key.life.material_commitment
                && !bool::from(subtle::ConstantTimeEq::ct_eq(&c[..], &commitment[..]))
            {
                return Err(invalid(format!(
                    "this is not the key material root key {name} had: only the same material \
                     can be imported again (as in AWS KMS); for new material create a new key"
                )));
            }
            key.versions.clear();
            key.versions.insert(
                1,
                Version {
                    created: now,
                    material: material.clone(),
                },
            );
            key.life.material_commitment = Some(commitment);
            key.life.material_expires = material_expires;
            key.life.import = None;
            if key.state == KeyState::PendingImport {
                key.state = KeyState::Enabled;
            }
            Ok(())
        })?;
        Ok(())
    }
}
