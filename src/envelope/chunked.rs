//! C2SP chunked encryption ("Cobblestone", c2sp.org/chunked-encryption), instantiated with
//! HKDF-SHA-512 and AES-256-GCM as in the Wycheproof vectors
//! `c2sp_chunked_encryption_aes_256_gcm_test.json`.
//!
//! ```text
//! message = salt (24) ‖ commitment (32) ‖ chunk_0 ‖ … ‖ chunk_n
//! chunk_i = AES-256-GCM(key, base_nonce XOR I2OSP(i, 12), aad = "", plaintext_i) (≤ 16384 + 16)
//! key ‖ base_nonce ‖ commitment = HKDF-Expand-SHA-512(ikm,
//!     "c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM" ‖ 0x00 ‖ salt ‖ context, 76)
//! ```
//!
//! Every chunk but the last holds exactly 16 KiB of plaintext; the last one is always short
//! (possibly empty). A message that ends on a full chunk was truncated at a chunk boundary and
//! is rejected; that is what makes the format truncation-proof without a final-chunk flag.
//! The 32-byte commitment binds the key and context, so a ciphertext opens under one key only.
//!
//! The whole message is a function of `(ikm, context, salt, plaintext)`; the stored size is
//! `C = P + 16·⌊P/16384⌋ + 72`, which [`ciphertext_len`] and [`plaintext_len`] compute.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Plaintext bytes per chunk. DO NOT CHANGE: part of the on-storage format.
pub const CHUNK_SIZE: usize = 16384;
pub const TAG_LEN: usize = 16;
pub const SALT_LEN: usize = 24;
pub const COMMITMENT_LEN: usize = 32;
pub const HEADER_LEN: usize = SALT_LEN + COMMITMENT_LEN;
/// Stored bytes per full chunk.
pub const SEALED_CHUNK_SIZE: usize = CHUNK_SIZE + TAG_LEN;

const LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00";

/// Why a message did not open. Deliberately coarse: callers map all of these to one opaque
/// error for the peer, and log the variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("ciphertext too short or of an impossible length")]
    Truncated,
    #[error("key commitment mismatch (wrong key or context)")]
    Commitment,
    #[error("chunk {0} failed authentication")]
    Chunk(u64),
}

/// Size of the sealed message for `plaintext_len` bytes of plaintext.
pub const fn ciphertext_len(plaintext_len: u64) -> u64 {
    plaintext_len + TAG_LEN as u64 * (plaintext_len / CHUNK_SIZE as u64) + 72
}

/// Plaintext size for a sealed message of `ciphertext_len` bytes, or `None` if no message has
/// that size (a length whose last chunk would be full or shorter than a tag).
pub const fn plaintext_len(ciphertext_len: u64) -> Option<u64> {
    if ciphertext_len < HEADER_LEN as u64 + TAG_LEN as u64 {
        return None;
    }
    let body = ciphertext_len - HEADER_LEN as u64;
    let full = body / SEALED_CHUNK_SIZE as u64;
    let last = body % SEALED_CHUNK_SIZE as u64;
    if last < TAG_LEN as u64 {
        return None;
    }
    Some(full * CHUNK_SIZE as u64 + last - TAG_LEN as u64)
}

/// Keys derived for one message.
///
/// The AEAD is `ring`'s AES-256-GCM (BoringSSL's assembly: AES-NI/CLMUL, and VAES/VPCLMULQDQ
/// with AVX2 where the CPU has them), selected at run time; `benches/aead.rs` measured it at
/// several times the throughput of the portable `aes-gcm` crate. The raw key bytes only ever
/// live in zeroized buffers here; `ring` keeps the expanded key schedule inside its opaque key
/// type (which, like `aes-gcm`'s without its `zeroize` feature, is not wiped on drop).
pub struct MessageKeys {
    cipher: LessSafeKey,
    base_nonce: [u8; 12],
    commitment: [u8; COMMITMENT_LEN],
}

/// An input key prepared for HKDF-Expand: HMAC-SHA-512 keyed once (the inner and outer states
/// after the padded key block), so that many messages under one data key (JSON fields) skip the
/// two SHA-512 blocks of keying each. Those states are as secret as the key: RustCrypto's HMAC
/// and SHA-512 (with their `zeroize` features) wipe them on drop, here and in every clone.
#[derive(Clone)]
pub struct Prf(hmac::Hmac<sha2::Sha512>);

impl Prf {
    pub fn new(ikm: &[u8; 32]) -> Prf {
        Prf(
            <hmac::Hmac<sha2::Sha512> as hmac::KeyInit>::new_from_slice(ikm)
                .expect("HMAC takes a key of any length"),
        )
    }
}

impl MessageKeys {
    /// HKDF-Expand with SHA-512, keyed directly with the 32-byte input key (there is no
    /// Extract step in this construction, and the `hkdf` crate refuses a 32-byte PRK for SHA-512).
    pub fn derive(ikm: &[u8; 32], salt: &[u8; SALT_LEN], context: &[u8]) -> Self {
        Self::derive_with(&Prf::new(ikm), salt, context)
    }

    /// [`derive`](Self::derive) with the input key already keyed.
    pub fn derive_with(prf: &Prf, salt: &[u8; SALT_LEN], context: &[u8]) -> Self {
        // OKM = T1 ‖ T2 (RFC 5869 §2.3); only the first 76 bytes are used.
        use hmac::Mac;
        let mut okm = Zeroizing::new([0u8; 128]);
        for i in 0..2 {
            let mut mac = prf.0.clone();
            if i > 0 {
                mac.update(&okm[(i - 1) * 64..i * 64]);
            }
            mac.update(LABEL);
            mac.update(salt);
            mac.update(context);
            mac.update(&[i as u8 + 1]);
            let mut t = mac.finalize().into_bytes();
            okm[i * 64..(i + 1) * 64].copy_from_slice(&t);
            zeroize::Zeroize::zeroize(t.as_mut_slice());
        }
        let mut base_nonce = [0u8; 12];
        base_nonce.copy_from_slice(&okm[32..44]);
        let mut commitment = [0u8; COMMITMENT_LEN];
        commitment.copy_from_slice(&okm[44..76]);
        let cipher = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &okm[..32]).expect("AES-256-GCM takes a 32-byte key"),
        );
        MessageKeys {
            cipher,
            base_nonce,
            commitment,
        }
    }

    pub fn commitment(&self) -> &[u8; COMMITMENT_LEN] {
        &self.commitment
    }

    /// `base_nonce XOR I2OSP(index, 12)`: the index XORed into the last 8 bytes.
    fn nonce(&self, index: u64) -> Nonce {
        let mut nonce = self.base_nonce;
        for (n, c) in nonce[4..].iter_mut().zip(index.to_be_bytes()) {
            *n ^= c;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// Seal one chunk in place; returns the tag to append.
    pub fn seal_chunk(&self, index: u64, chunk: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .cipher
            .seal_in_place_separate_tag(self.nonce(index), Aad::empty(), chunk)
            .expect("chunks are far below the AES-GCM length limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Open one chunk (ciphertext without its tag) in place. On failure the chunk is
    /// overwritten with zeros, so no unauthenticated plaintext is left behind.
    pub fn open_chunk(
        &self,
        index: u64,
        chunk: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        self.cipher
            .open_in_place_separate_tag(
                self.nonce(index),
                Aad::empty(),
                Tag::from(*tag),
                chunk,
                0..,
            )
            .map(|_| ())
            .map_err(|_| {
                chunk.fill(0);
                OpenError::Chunk(index)
            })
    }
}

/// Seal `plaintext` in one piece with a fresh random salt.
pub fn seal(ikm: &[u8; 32], context: &[u8], plaintext: &[u8]) -> Vec<u8> {
    seal_with(&Prf::new(ikm), context, plaintext)
}

/// [`seal`] with the input key already keyed.
pub fn seal_with(prf: &Prf, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut salt = [0u8; SALT_LEN];
    crate::envelope::fill_random(&mut salt);
    seal_with_salt_prf(prf, &salt, context, plaintext)
}

/// Seal with a caller-chosen salt. Only for test vectors: a repeated salt under one key repeats
/// every nonce.
pub fn seal_with_salt(
    ikm: &[u8; 32],
    salt: &[u8; SALT_LEN],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    seal_with_salt_prf(&Prf::new(ikm), salt, context, plaintext)
}

fn seal_with_salt_prf(
    prf: &Prf,
    salt: &[u8; SALT_LEN],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let keys = MessageKeys::derive_with(prf, salt, context);
    let mut out = Vec::with_capacity(ciphertext_len(plaintext.len() as u64) as usize);
    out.extend_from_slice(salt);
    out.extend_from_slice(keys.commitment());
    let full_chunks = plaintext.len() / CHUNK_SIZE;
    for index in 0..=full_chunks {
        let start = index * CHUNK_SIZE;
        let end = (start + CHUNK_SIZE).min(plaintext.len());
        let at = out.len();
        out.extend_from_slice(&plaintext[start..end]);
        let tag = keys.seal_chunk(index as u64, &mut out[at..]);
        out.extend_from_slice(&tag);
    }
    out
}

/// Open a whole message. `message` is attacker controlled: this must not panic on any input.
pub fn open(ikm: &[u8; 32], context: &[u8], message: &[u8]) -> Result<Vec<u8>, OpenError> {
    open_with(&Prf::new(ikm), context, message)
}

/// [`open`] with the input key already keyed.
pub fn open_with(prf: &Prf, context: &[u8], message: &[u8]) -> Result<Vec<u8>, OpenError> {
    let plain_len = plaintext_len(message.len() as u64).ok_or(OpenError::Truncated)?;
    let salt: &[u8; SALT_LEN] = message[..SALT_LEN]
        .try_into()
        .map_err(|_| OpenError::Truncated)?;
    let keys = MessageKeys::derive_with(prf, salt, context);
    if !bool::from(keys.commitment().ct_eq(&message[SALT_LEN..HEADER_LEN])) {
        return Err(OpenError::Commitment);
    }
    let mut out = Vec::with_capacity(plain_len as usize);
    for (index, sealed) in message[HEADER_LEN..].chunks(SEALED_CHUNK_SIZE).enumerate() {
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Truncated)?;
        let at = out.len();
        out.extend_from_slice(body);
        keys.open_chunk(index as u64, &mut out[at..], tag)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for p in [0u64, 1, 16383, 16384, 16385, 32768, 1 << 30] {
            let c = ciphertext_len(p);
            assert_eq!(plaintext_len(c), Some(p), "p = {p}");
        }
        // A ciphertext whose last chunk would be full is impossible.
        assert_eq!(plaintext_len(56 + 16400), None);
        assert_eq!(plaintext_len(71), None);
    }

    #[test]
    fn round_trip_and_truncation() {
        let key = [7u8; 32];
        for len in [0usize, 5, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE * 2 + 3] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ct = seal(&key, b"ctx", &pt);
            assert_eq!(ct.len() as u64, ciphertext_len(len as u64));
            assert_eq!(open(&key, b"ctx", &ct).unwrap(), pt);
            assert!(open(&key, b"other", &ct).is_err());
            assert!(open(&[8u8; 32], b"ctx", &ct).is_err());
            // Dropping the final (short) chunk leaves a message ending on a full chunk.
            if len >= CHUNK_SIZE {
                let cut = HEADER_LEN + (len / CHUNK_SIZE) * SEALED_CHUNK_SIZE;
                assert!(open(&key, b"ctx", &ct[..cut]).is_err());
            }
            for i in [0, SALT_LEN, HEADER_LEN, ct.len() - 1] {
                let mut bad = ct.clone();
                bad[i] ^= 1;
                assert!(open(&key, b"ctx", &bad).is_err(), "flip at {i}");
            }
        }
    }
}
