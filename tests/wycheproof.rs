//! Wycheproof vectors for the primitives the on-storage format is built on, and for the C2SP
//! chunked-encryption layer itself (see docs/FORMAT.md §1).
//!
//! - AES-256-GCM (96-bit nonce, 128-bit tag) against the `aes-gcm` crate (local-keyring EDKs and
//!   the keyring file) and against ring through the chunk layer (`MessageKeys`).
//! - HKDF-SHA-512 built from `hmac` + `sha2`: the chunked layer uses its Expand half, keyed with
//!   HMAC-SHA-512 exactly as here.
//! - All C2SP chunked-encryption AES-256-GCM vectors against `envelope::chunked::open`.
//!
//! Every test asserts how many vectors it ran, so an empty or mis-filtered set cannot pass.

use std::io::Read;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use envelope_proxy::envelope::chunked::{self, MessageKeys};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha512};
use wycheproof::TestResult;

// ---------------------------------------------------------------------------------------------
// AES-256-GCM

#[test]
fn aes_256_gcm() {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let (mut run, mut skipped, mut valid, mut invalid) = (0usize, 0usize, 0usize, 0usize);
    for group in &set.test_groups {
        // Only the parameters we use: AES-256, 12-byte nonces, 16-byte tags.
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            skipped += group.tests.len();
            continue;
        }
        for t in &group.tests {
            let ctx = format!("tcId {} ({})", t.tc_id, t.comment);
            let key: [u8; 32] = t.key.as_slice().try_into().expect("256-bit key");
            let nonce: [u8; 12] = t.nonce.as_slice().try_into().expect("96-bit nonce");
            let cipher = Aes256Gcm::new(&Array::from(key));

            // Decrypt: must succeed and give the message exactly when the vector is valid.
            let opened = match <[u8; 16]>::try_from(t.tag.as_slice()) {
                Ok(tag) => {
                    let mut buf = t.ct.to_vec();
                    cipher
                        .decrypt_inout_detached(
                            &Array::from(nonce),
                            &t.aad,
                            buf.as_mut_slice().into(),
                            &Array::from(tag),
                        )
                        .ok()
                        .map(|_| buf)
                }
                Err(_) => None, // a tag of the wrong size can never authenticate
            };
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let pt = opened.unwrap_or_else(|| panic!("{ctx}: valid vector rejected"));
                    assert_eq!(pt, t.pt.as_slice(), "{ctx}: wrong plaintext");
                    // Encrypt: must reproduce ciphertext and tag.
                    let mut buf = t.pt.to_vec();
                    let tag = cipher
                        .encrypt_inout_detached(
                            &Array::from(nonce),
                            &t.aad,
                            buf.as_mut_slice().into(),
                        )
                        .unwrap();
                    assert_eq!(buf, t.ct.as_slice(), "{ctx}: wrong ciphertext");
                    assert_eq!(tag.as_slice(), t.tag.as_slice(), "{ctx}: wrong tag");
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(opened.is_none(), "{ctx}: invalid vector accepted");
                    invalid += 1;
                }
            }
            run += 1;
        }
    }
    println!(
        "AES-256-GCM: ran {run} vectors ({valid} valid, {invalid} invalid); skipped {skipped} \
         with other key, nonce or tag sizes"
    );
    assert_eq!(run + skipped, set.number_of_tests);
    assert_eq!(run, 66, "AES-256-GCM/96-bit nonce vector count changed");
    assert!(valid > 0 && invalid > 0);
}

// ---------------------------------------------------------------------------------------------
// HKDF-SHA-512 (RFC 5869) from HMAC-SHA-512

type HmacSha512 = Hmac<Sha512>;
const SHA512_LEN: usize = 64;

fn hmac_sha512(key: &[u8], parts: &[&[u8]]) -> [u8; SHA512_LEN] {
    let mut mac = <HmacSha512 as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// HKDF-Expand as in RFC 5869 §2.3. This loop is the one `MessageKeys::derive` runs with the
/// data key as PRK (see docs/FORMAT.md §1.2).
fn hkdf_expand_sha512(prk: &[u8], info: &[u8], len: usize) -> Option<Vec<u8>> {
    if len > 255 * SHA512_LEN {
        return None;
    }
    let mut okm = Vec::with_capacity(len);
    let mut t: Vec<u8> = Vec::new();
    let mut counter = 1u8;
    while okm.len() < len {
        t = hmac_sha512(prk, &[&t, info, &[counter]]).to_vec();
        okm.extend_from_slice(&t);
        counter = counter.wrapping_add(1);
    }
    okm.truncate(len);
    Some(okm)
}

fn hkdf_sha512(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Option<Vec<u8>> {
    // An empty salt is HashLen zero bytes, which HMAC pads to the same key.
    let prk = hmac_sha512(salt, &[ikm]);
    hkdf_expand_sha512(&prk, info, len)
}

#[test]
fn hkdf_sha512_vectors() {
    let set = wycheproof::hkdf::TestSet::load(wycheproof::hkdf::TestName::HkdfSha512).unwrap();
    let (mut valid, mut invalid) = (0usize, 0usize);
    for group in &set.test_groups {
        for t in &group.tests {
            let ctx = format!("tcId {} ({})", t.tc_id, t.comment);
            let okm = hkdf_sha512(&t.salt, &t.ikm, &t.info, t.size);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let okm = okm.unwrap_or_else(|| panic!("{ctx}: valid vector rejected"));
                    assert_eq!(okm, t.okm.as_slice(), "{ctx}: wrong output");
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(okm.is_none(), "{ctx}: invalid vector accepted");
                    invalid += 1;
                }
            }
        }
    }
    println!("HKDF-SHA-512: ran {valid} valid and {invalid} invalid vectors");
    assert_eq!(valid + invalid, set.number_of_tests);
    assert_eq!(valid + invalid, 83, "HKDF-SHA-512 vector count changed");
    assert!(valid > 0 && invalid > 0);
}

// ---------------------------------------------------------------------------------------------
// C2SP chunked encryption (Cobblestone-256)

const LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM";

/// The key schedule written out from docs/FORMAT.md, independent of the crate:
/// aead key ‖ base nonce ‖ commitment = HKDF-Expand-SHA-512(PRK = key, info, 76).
fn reference_keys(key: &[u8], salt: &[u8], ctx: &[u8]) -> ([u8; 32], [u8; 12], [u8; 32]) {
    let info = [LABEL, &[0u8], salt, ctx].concat();
    let okm = hkdf_expand_sha512(key, &info, 76).unwrap();
    (
        okm[..32].try_into().unwrap(),
        okm[32..44].try_into().unwrap(),
        okm[44..76].try_into().unwrap(),
    )
}

fn chunk_nonce(base: &[u8; 12], index: u64) -> [u8; 12] {
    let mut n = *base;
    let i = (index as u128).to_be_bytes(); // 16 bytes; the low 12 are the 96-bit counter
    for (b, c) in n.iter_mut().zip(&i[4..]) {
        *b ^= c;
    }
    n
}

/// Check that `MessageKeys::derive` uses the vector's AEAD key and base nonce. They are private
/// to `MessageKeys`, so observe them: seal the same chunk with `MessageKeys::seal_chunk` and with
/// AES-256-GCM under (aeadKey, baseNonce XOR i) and compare, for a few chunk indices.
fn check_derived_keys(
    keys: &MessageKeys,
    aead_key: &[u8; 32],
    base_nonce: &[u8; 12],
    what: &str,
) -> usize {
    let cipher = Aes256Gcm::new(&Array::from(*aead_key));
    let mut checked = 0;
    for index in [0u64, 1, 255, 256, 1 << 32, u64::MAX] {
        let sample = *b"observe the derived key and nonce";
        let mut ours = sample;
        let tag_ours = keys.seal_chunk(index, &mut ours);
        let mut theirs = sample;
        let tag_theirs = cipher
            .encrypt_inout_detached(
                &Array::from(chunk_nonce(base_nonce, index)),
                &[],
                theirs.as_mut_slice().into(),
            )
            .unwrap();
        assert_eq!(ours, theirs, "{what}: chunk {index} ciphertext differs");
        assert_eq!(
            tag_ours.as_slice(),
            tag_theirs.as_slice(),
            "{what}: chunk {index} tag differs"
        );
        checked += 1;
    }
    checked
}

#[test]
fn c2sp_chunked_encryption_aes_256_gcm() {
    let set = wycheproof::chunked_encryption::TestSet::load(
        wycheproof::chunked_encryption::TestName::Cobblestone256,
    )
    .unwrap();
    let (mut valid, mut invalid, mut key_checks) = (0usize, 0usize, 0usize);
    for group in &set.test_groups {
        assert_eq!(
            group.aead,
            wycheproof::chunked_encryption::ChunkedEncryptionAead::Aes256Gcm
        );
        assert_eq!(group.hash, wycheproof::HashFunction::Sha2_512);
        for t in &group.tests {
            let what = format!("tcId {} ({})", t.tc_id, t.comment);
            let mut ct = Vec::new();
            flate2::read::ZlibDecoder::new(t.ct.as_slice())
                .read_to_end(&mut ct)
                .unwrap_or_else(|e| panic!("{what}: ct does not inflate: {e}"));

            // Our API takes exactly 32-byte keys: another size cannot even be passed, which is
            // the rejection the InvalidKeySize vectors ask for.
            let key: Option<[u8; 32]> = t.key.as_slice().try_into().ok();
            let opened = key.and_then(|k| chunked::open(&k, &t.ctx, &ct).ok());

            // Where the vector gives the derived AEAD key and base nonce, check our derivation,
            // both as written in FORMAT.md and as implemented.
            if let (Some(k), Some(aead_key), Some(base_nonce)) =
                (key, t.aead_key.as_ref(), t.base_nonce.as_ref())
            {
                let salt: [u8; chunked::SALT_LEN] = ct[..chunked::SALT_LEN].try_into().unwrap();
                let aead_key: [u8; 32] = aead_key.as_slice().try_into().unwrap();
                let base_nonce: [u8; 12] = base_nonce.as_slice().try_into().unwrap();
                let (rk, rn, rc) = reference_keys(&k, &salt, &t.ctx);
                assert_eq!(rk, aead_key, "{what}: reference AEAD key");
                assert_eq!(rn, base_nonce, "{what}: reference base nonce");
                let keys = MessageKeys::derive(&k, &salt, &t.ctx);
                assert_eq!(keys.commitment(), &rc, "{what}: commitment");
                if ct.len() >= chunked::HEADER_LEN {
                    assert_eq!(&ct[chunked::SALT_LEN..chunked::HEADER_LEN], &rc, "{what}");
                }
                key_checks += check_derived_keys(&keys, &aead_key, &base_nonce, &what);
            }

            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let msg = opened.unwrap_or_else(|| panic!("{what}: valid vector rejected"));
                    assert_eq!(Some(msg.len()), t.msg_length, "{what}: length");
                    let digest = Sha512::digest(&msg);
                    assert_eq!(
                        Some(digest.as_slice()),
                        t.msg_sha512.as_ref().map(|d| d.as_slice()),
                        "{what}: SHA-512"
                    );
                    assert_eq!(
                        chunked::ciphertext_len(msg.len() as u64),
                        ct.len() as u64,
                        "{what}: size formula"
                    );
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(opened.is_none(), "{what}: invalid vector accepted");
                    invalid += 1;
                }
            }
        }
    }
    println!(
        "C2SP chunked AES-256-GCM: ran {valid} valid and {invalid} invalid vectors; \
         {key_checks} derived-key observations"
    );
    assert_eq!(valid + invalid, set.number_of_tests);
    assert_eq!(valid + invalid, 35, "C2SP vector count changed");
    assert!(valid >= 10 && invalid >= 20);
    assert!(key_checks > 0);
}
