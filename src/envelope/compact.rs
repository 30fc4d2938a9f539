//! The compact token (format v2): a sealed JSON value that names its data key by record id
//! instead of carrying the wrapped keys (see [`super::record`] and `docs/FORMAT.md` §12).
//!
//! ```text
//! token = "enc:v2:" ‖ base64url-nopad(id (16) ‖ nonce (12) ‖ ciphertext ‖ tag (16))
//! ciphertext ‖ tag = AES-256-GCM(token key of the record, nonce,
//!                                aad = canonical(message context with ep:field), JSON value)
//! ```
//!
//! 44 bytes over the plaintext whatever the backends and however many root keys wrap the data
//! key. The id is bound through the token key (derived from the data key and the id), the
//! context through the AAD. Functions here write into caller buffers, so a body of many values
//! reuses them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{Aad, Nonce};

use super::record::{ID_LEN, RecordId, RecordKey};

pub const PREFIX: &str = "enc:v2:";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Raw bytes a token adds to its plaintext.
pub const OVERHEAD: usize = ID_LEN + NONCE_LEN + TAG_LEN;
/// Tokens longer than this are refused before decoding (as for v1).
pub const MAX_TOKEN_LEN: usize = super::token::MAX_TOKEN_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompactError {
    #[error("not a v2 token")]
    NotAToken,
    #[error("token is not valid base64url")]
    Encoding,
    #[error("token too short")]
    Truncated,
    #[error("token did not open (wrong key, context or tampered)")]
    Open,
    #[error("data key used up (2^32 messages)")]
    UsedUp,
}

/// The record id a token names, read without decoding the rest. Attacker controlled input:
/// never panics.
pub fn record_id(token: &str) -> Result<RecordId, CompactError> {
    let body = token.strip_prefix(PREFIX).ok_or(CompactError::NotAToken)?;
    // 16 bytes are the first 22 characters (the 22nd carries 2 bits of the 17th byte): decode
    // 24 characters (18 bytes) and take 16.
    let head = body.get(..24).ok_or(CompactError::Truncated)?;
    let mut raw = [0u8; 18];
    URL_SAFE_NO_PAD
        .decode_slice(head, &mut raw)
        .map_err(|_| CompactError::Encoding)?;
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&raw[..ID_LEN]);
    Ok(RecordId(id))
}

/// Seal `plaintext` under `key` with `aad`; appends the token (prefix included) to `out`.
/// `scratch` is reused between calls.
pub fn seal_into(
    key: &RecordKey,
    aad: &[u8],
    plaintext: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), CompactError> {
    let nonce = key.next_nonce().ok_or(CompactError::UsedUp)?;
    seal_raw(key, nonce, aad, plaintext, scratch)?;
    out.extend_from_slice(PREFIX.as_bytes());
    let start = out.len();
    out.resize(
        start + base64::encoded_len(scratch.len(), false).unwrap_or(0),
        0,
    );
    let written = URL_SAFE_NO_PAD
        .encode_slice(&scratch[..], &mut out[start..])
        .map_err(|_| CompactError::Encoding)?;
    out.truncate(start + written);
    Ok(())
}

/// `id ‖ nonce ‖ ciphertext ‖ tag` into `scratch` (cleared first). The plaintext is sealed in
/// place: nothing of it is left in `scratch`.
fn seal_raw(
    key: &RecordKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), CompactError> {
    scratch.clear();
    scratch.reserve(OVERHEAD + plaintext.len());
    scratch.extend_from_slice(&key.id.0);
    scratch.extend_from_slice(&nonce);
    scratch.extend_from_slice(plaintext);
    let tag = key
        .cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut scratch[ID_LEN + NONCE_LEN..],
        )
        .map_err(|_| CompactError::Open)?;
    scratch.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Open `token` under `key` (whose id the token must name) with `aad`. The plaintext is left
/// in `buf[range]`; on failure `buf` holds no plaintext.
pub fn open_into(
    key: &RecordKey,
    aad: &[u8],
    token: &str,
    buf: &mut Vec<u8>,
) -> Result<std::ops::Range<usize>, CompactError> {
    let body = token.strip_prefix(PREFIX).ok_or(CompactError::NotAToken)?;
    if body.len() > MAX_TOKEN_LEN {
        return Err(CompactError::Encoding);
    }
    buf.clear();
    buf.resize(body.len() * 3 / 4 + 3, 0);
    let n = URL_SAFE_NO_PAD
        .decode_slice(body, &mut buf[..])
        .map_err(|_| CompactError::Encoding)?;
    buf.truncate(n);
    if n < OVERHEAD {
        return Err(CompactError::Truncated);
    }
    if buf[..ID_LEN] != key.id.0 {
        return Err(CompactError::Open);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[ID_LEN..ID_LEN + NONCE_LEN]);
    let start = ID_LEN + NONCE_LEN;
    match key.cipher.open_in_place(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf[start..],
    ) {
        Ok(plain) => {
            let len = plain.len();
            Ok(start..start + len)
        }
        Err(_) => {
            buf.fill(0);
            Err(CompactError::Open)
        }
    }
}

/// The token string for `plaintext` (tests, vectors, the CLI): [`seal_into`] with fresh buffers.
pub fn seal(key: &RecordKey, aad: &[u8], plaintext: &[u8]) -> Result<String, CompactError> {
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    seal_into(key, aad, plaintext, &mut scratch, &mut out)?;
    String::from_utf8(out).map_err(|_| CompactError::Encoding)
}

/// The plaintext of `token` (tests, vectors, the CLI).
pub fn open(
    key: &RecordKey,
    aad: &[u8],
    token: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, CompactError> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    let range = open_into(key, aad, token, &mut buf)?;
    Ok(zeroize::Zeroizing::new(buf[range].to_vec()))
}

/// Seal with a fixed nonce, for golden vectors only (a repeated nonce under one key is fatal).
pub fn seal_with_nonce(
    key: &RecordKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> String {
    let mut raw = Vec::new();
    seal_raw(key, nonce, aad, plaintext, &mut raw).expect("far below the AES-GCM length limit");
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Context;
    use proptest::prelude::*;

    fn key() -> RecordKey {
        RecordKey::new(&[5u8; 32], RecordId([1; 16]))
    }

    #[test]
    fn round_trip_size_and_binding() {
        let k = key();
        let ctx: Context = [("tenant", "acme")].into_iter().collect();
        let mut aad = Vec::new();
        ctx.canonical_with_into(("ep:field", "$.ssn"), &mut aad);
        let t = seal(&k, &aad, b"\"123-45-6789\"").unwrap();
        assert!(t.starts_with(PREFIX));
        assert_eq!(record_id(&t).unwrap(), k.id);
        // 13 bytes of plaintext + 44 → 57 bytes → 76 characters + the prefix.
        assert_eq!(t.len(), PREFIX.len() + 76);
        assert_eq!(&*open(&k, &aad, &t).unwrap(), b"\"123-45-6789\"");
        let mut other = Vec::new();
        ctx.canonical_with_into(("ep:field", "$.name"), &mut other);
        assert_eq!(open(&k, &other, &t).unwrap_err(), CompactError::Open);
        let foreign = RecordKey::new(&[6u8; 32], RecordId([1; 16]));
        assert_eq!(open(&foreign, &aad, &t).unwrap_err(), CompactError::Open);
        let other_id = RecordKey::new(&[5u8; 32], RecordId([2; 16]));
        assert_eq!(open(&other_id, &aad, &t).unwrap_err(), CompactError::Open);
        // Nonces differ from one value to the next.
        assert_ne!(seal(&k, &aad, b"1").unwrap(), seal(&k, &aad, b"1").unwrap());
    }

    #[test]
    fn tampering_anywhere_fails() {
        let k = key();
        let t = seal(&k, b"", b"{\"a\":[1,2,3]}").unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&t[PREFIX.len()..]).unwrap();
        for i in ID_LEN..raw.len() {
            let mut r = raw.clone();
            r[i] ^= 0x40;
            let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&r));
            assert!(open(&k, b"", &forged).is_err(), "byte {i}");
        }
    }

    proptest! {
        #[test]
        fn parsing_random_input_never_panics(s in ".{0,120}") {
            let k = key();
            let _ = record_id(&s);
            let _ = open(&k, b"", &s);
            let t = format!("{PREFIX}{s}");
            let _ = record_id(&t);
            let _ = open(&k, b"", &t);
        }

        #[test]
        fn random_bytes_never_open(b in proptest::collection::vec(any::<u8>(), 0..120)) {
            let t = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&b));
            prop_assert!(open(&key(), b"", &t).is_err());
        }
    }
}
