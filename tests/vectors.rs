//! Golden vectors for the on-storage formats (docs/FORMAT.md), in `tests/vectors/tokens.json`
//! (v1 tokens, EDKs, the keyring file), `tests/vectors/tokens_v2.json` (v2 records and tokens)
//! and `tests/vectors/s3_objects.json`.
//!
//! Every check runs on every `cargo test`: the stored tokens, EDK blobs and keyring file must be
//! reproduced byte for byte by the current code, open with it, and open with the independent
//! reference decoder in this file (written from FORMAT.md alone, using only the primitives).
//! If any of these fails, the on-storage format changed: that needs a new version (FORMAT.md
//! §7), never an edit of the vectors.
//!
//! To regenerate after an intentional, versioned change (never otherwise):
//! `cargo test --test vectors -- --ignored generate` (or `generate_s3`, `generate_v2`), then
//! review and copy the file it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use envelope_proxy::envelope::chunked;
use envelope_proxy::envelope::compact::{self, CompactError};
use envelope_proxy::envelope::header::HeaderError;
use envelope_proxy::envelope::record::{self, Record, RecordId, RecordKey};
use envelope_proxy::envelope::token::{self, ParsedToken, TokenError};
use envelope_proxy::envelope::{Context, Header, WrappedKey};
use envelope_proxy::keys::keyring::{Keyring, KeyringError, MasterKeySource};
use envelope_proxy::keys::vault::VaultDoc;
use envelope_proxy::keys::{BackendError, CacheLimits, DataKey, KeyService, RootKeyProvider};
use envelope_proxy::metrics::Metrics;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/tokens.json");

// ---------------------------------------------------------------------------------------------
// The file's schema

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Vectors {
    comment: Vec<String>,
    keyring: KeyringVector,
    local_wraps: Vec<WrapVector>,
    tokens: Vec<TokenVector>,
}

/// A keyring file sealed under a known master key with a known nonce.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct KeyringVector {
    description: String,
    master_key: String,
    nonce: String,
    /// The sealed inner JSON document, verbatim.
    inner: String,
    /// The keyring file as written to disk.
    file: KeyringFile,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    format: String,
    nonce: String,
    sealed: String,
}

/// One local-keyring EDK blob.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct WrapVector {
    description: String,
    root_key: String,
    key_id: String,
    version: u32,
    key_context: BTreeMap<String, String>,
    data_key: String,
    nonce: String,
    aad: String,
    blob: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct TokenVector {
    description: String,
    data_key: String,
    salt: String,
    header: HeaderVector,
    /// The key context the EDKs were wrapped under (for the end-to-end check).
    key_context: BTreeMap<String, String>,
    /// The message context, including `ep:field`.
    context: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plaintext_pattern: Option<Pattern>,
    plaintext_len: usize,
    /// Intermediate values, to debug an independent implementation.
    header_hex: String,
    canonical_context_hex: String,
    token: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct HeaderVector {
    edks: Vec<EdkVector>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct EdkVector {
    backend: String,
    key_id: String,
    key_version: u32,
    blob: String,
}

/// A long plaintext: `prefix ‖ repeat × times ‖ suffix`.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Pattern {
    prefix: String,
    repeat: String,
    times: usize,
    suffix: String,
}

impl TokenVector {
    fn plaintext(&self) -> Vec<u8> {
        match (&self.plaintext, &self.plaintext_pattern) {
            (Some(p), None) => p.as_bytes().to_vec(),
            (None, Some(p)) => {
                format!("{}{}{}", p.prefix, p.repeat.repeat(p.times), p.suffix).into_bytes()
            }
            _ => panic!(
                "{}: give exactly one of plaintext, plaintext_pattern",
                self.description
            ),
        }
    }
    fn header(&self) -> Header {
        Header {
            edks: self
                .header
                .edks
                .iter()
                .map(|e| WrappedKey {
                    backend: e.backend.clone(),
                    key_id: e.key_id.clone(),
                    key_version: e.key_version,
                    blob: unhex(&e.blob),
                })
                .collect(),
        }
    }
    fn data_key(&self) -> [u8; 32] {
        unhex_array(&self.data_key)
    }
    fn salt(&self) -> [u8; 24] {
        unhex_array(&self.salt)
    }
    fn context(&self) -> Context {
        to_context(&self.context)
    }
}

fn load() -> Vectors {
    let text = std::fs::read_to_string(VECTORS).expect("tests/vectors/tokens.json");
    serde_json::from_str(&text).expect("tests/vectors/tokens.json parses")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

fn unhex_array<const N: usize>(s: &str) -> [u8; N] {
    unhex(s)
        .try_into()
        .unwrap_or_else(|_| panic!("{s:?} is not {N} bytes"))
}

fn to_context(m: &BTreeMap<String, String>) -> Context {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---------------------------------------------------------------------------------------------
// An independent reference implementation, written from docs/FORMAT.md with only the
// primitives (HMAC-SHA-512, AES-256-GCM, base64). It shares no code with the crate.

mod reference {
    use super::*;

    pub const CHUNK: usize = 16384;
    pub const TAG: usize = 16;
    pub const SALT: usize = 24;
    pub const COMMIT: usize = 32;
    pub const LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM";
    pub const WRAP_LABEL: &[u8] = b"envelope-proxy.local-wrap.v1";
    pub const KEYRING_FORMAT: &str = "envelope-proxy.keyring.v1";

    /// FORMAT.md §4: u32be(count) ‖ (u32be(len k) ‖ k ‖ u32be(len v) ‖ v)* in key byte order.
    pub fn canonical(ctx: &BTreeMap<String, String>) -> Vec<u8> {
        let mut pairs: Vec<(&String, &String)> = ctx.iter().collect();
        pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut out = (pairs.len() as u32).to_be_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    /// FORMAT.md §2.
    pub fn encode_header(edks: &[EdkVector]) -> Vec<u8> {
        let mut out = vec![1u8, edks.len() as u8];
        for e in edks {
            out.push(e.backend.len() as u8);
            out.extend_from_slice(e.backend.as_bytes());
            out.push(e.key_id.len() as u8);
            out.extend_from_slice(e.key_id.as_bytes());
            out.extend_from_slice(&e.key_version.to_be_bytes());
            let blob = unhex(&e.blob);
            out.extend_from_slice(&(blob.len() as u16).to_be_bytes());
            out.extend_from_slice(&blob);
        }
        out
    }

    /// FORMAT.md §2: the header's length, or None if malformed.
    pub fn header_len(raw: &[u8]) -> Option<usize> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = raw.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        if take(1)? != [1] {
            return None;
        }
        let count = take(1)?[0];
        if !(1..=16).contains(&count) {
            return None;
        }
        for _ in 0..count {
            for _ in 0..2 {
                let n = take(1)?[0] as usize;
                std::str::from_utf8(take(n)?).ok()?;
            }
            take(4)?;
            let n = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
            take(n)?;
        }
        Some(at)
    }

    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 64] {
        let mut mac = <Hmac<Sha512> as KeyInit>::new_from_slice(key).unwrap();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// FORMAT.md §1.2: (aead key, base nonce, commitment).
    pub fn derive(key: &[u8; 32], salt: &[u8], context: &[u8]) -> ([u8; 32], [u8; 12], [u8; 32]) {
        let info = [LABEL, &[0u8], salt, context].concat();
        let t1 = hmac(key, &[&info, &[1]]);
        let t2 = hmac(key, &[&t1, &info, &[2]]);
        let okm = [t1, t2].concat();
        (
            okm[..32].try_into().unwrap(),
            okm[32..44].try_into().unwrap(),
            okm[44..76].try_into().unwrap(),
        )
    }

    fn nonce(base: &[u8; 12], i: u64) -> [u8; 12] {
        let mut n = *base;
        for (b, c) in n[4..].iter_mut().zip(i.to_be_bytes()) {
            *b ^= c;
        }
        n
    }

    /// FORMAT.md §1.3, whole-message decryption.
    pub fn chunked_open(key: &[u8; 32], context: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
        if msg.len() < SALT + COMMIT + TAG {
            return None;
        }
        let (salt, rest) = msg.split_at(SALT);
        let (commitment, body) = rest.split_at(COMMIT);
        if body.len() % (CHUNK + TAG) < TAG {
            return None; // the last chunk would be full, or shorter than a tag
        }
        let (k, base, c) = derive(key, salt, context);
        if c != commitment {
            return None;
        }
        let aead = Aes256Gcm::new(&Array::from(k));
        let mut out = Vec::new();
        for (i, sealed) in body.chunks(CHUNK + TAG).enumerate() {
            let (ct, tag) = sealed.split_at(sealed.len() - TAG);
            let tag: [u8; TAG] = tag.try_into().unwrap();
            let mut buf = ct.to_vec();
            aead.decrypt_inout_detached(
                &Array::from(nonce(&base, i as u64)),
                &[],
                buf.as_mut_slice().into(),
                &Array::from(tag),
            )
            .ok()?;
            out.extend_from_slice(&buf);
        }
        Some(out)
    }

    /// FORMAT.md §5 and §3: open an `enc:v1:` token.
    pub fn open_token(
        token: &str,
        key: &[u8; 32],
        ctx: &BTreeMap<String, String>,
    ) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD
            .decode(token.strip_prefix("enc:v1:")?)
            .ok()?;
        let h = header_len(&raw)?;
        let mut binding = (h as u32).to_be_bytes().to_vec();
        binding.extend_from_slice(&raw[..h]);
        binding.extend_from_slice(&canonical(ctx));
        chunked_open(key, &binding, &raw[h..])
    }

    /// FORMAT.md §6.1.
    pub fn wrap_aad(key_id: &str, version: u32, ctx: &BTreeMap<String, String>) -> Vec<u8> {
        let mut aad = WRAP_LABEL.to_vec();
        aad.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
        aad.extend_from_slice(key_id.as_bytes());
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(&canonical(ctx));
        aad
    }

    pub fn gcm_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], pt: &[u8]) -> Vec<u8> {
        let mut buf = pt.to_vec();
        let tag = Aes256Gcm::new(&Array::from(*key))
            .encrypt_inout_detached(&Array::from(*nonce), aad, buf.as_mut_slice().into())
            .unwrap();
        buf.extend_from_slice(&tag);
        buf
    }

    pub fn gcm_open(
        key: &[u8; 32],
        nonce: &[u8; 12],
        aad: &[u8],
        ct_tag: &[u8],
    ) -> Option<Vec<u8>> {
        let split = ct_tag.len().checked_sub(16)?;
        let (ct, tag) = ct_tag.split_at(split);
        let tag: [u8; 16] = tag.try_into().ok()?;
        let mut buf = ct.to_vec();
        Aes256Gcm::new(&Array::from(*key))
            .decrypt_inout_detached(
                &Array::from(*nonce),
                aad,
                buf.as_mut_slice().into(),
                &Array::from(tag),
            )
            .ok()?;
        Some(buf)
    }

    /// FORMAT.md §6.1: blob = nonce ‖ ct ‖ tag.
    pub fn wrap(root: &[u8; 32], nonce: &[u8; 12], aad: &[u8], data_key: &[u8; 32]) -> Vec<u8> {
        [nonce.as_slice(), &gcm_seal(root, nonce, aad, data_key)].concat()
    }

    pub fn unwrap(root: &[u8; 32], aad: &[u8], blob: &[u8]) -> Option<[u8; 32]> {
        if blob.len() != 60 {
            return None;
        }
        let nonce: [u8; 12] = blob[..12].try_into().unwrap();
        gcm_open(root, &nonce, aad, &blob[12..])?.try_into().ok()
    }

    /// FORMAT.md §6.2: the inner JSON of a keyring file.
    pub fn read_keyring(master: &[u8; 32], file: &[u8]) -> Option<serde_json::Value> {
        let outer: serde_json::Value = serde_json::from_slice(file).ok()?;
        if outer["format"] != KEYRING_FORMAT {
            return None;
        }
        let nonce: [u8; 12] = B64.decode(outer["nonce"].as_str()?).ok()?.try_into().ok()?;
        let sealed = B64.decode(outer["sealed"].as_str()?).ok()?;
        let inner = gcm_open(master, &nonce, KEYRING_FORMAT.as_bytes(), &sealed)?;
        serde_json::from_slice(&inner).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[test]
fn vector_file_covers_the_cases() {
    let v = load();
    assert_eq!(v.tokens.len(), 6);
    assert!(
        v.tokens
            .iter()
            .any(|t| t.plaintext_len > chunked::CHUNK_SIZE)
    );
    assert!(v.tokens.iter().any(|t| t.header.edks.len() == 2));
    assert!(v.tokens.iter().all(|t| t.context.contains_key("ep:field")));
    assert!(
        v.tokens
            .iter()
            .any(|t| t.plaintext.as_deref() == Some("\"\""))
    );
    assert_eq!(v.local_wraps.len(), 3);
}

/// (a) Sealing with the stored salt reproduces the stored token byte for byte.
#[test]
fn sealing_reproduces_every_token() {
    for t in load().tokens {
        let d = &t.description;
        let pt = t.plaintext();
        assert_eq!(pt.len(), t.plaintext_len, "{d}: plaintext_len");
        // The plaintext is the JSON serialization of a value.
        let value: serde_json::Value = serde_json::from_slice(&pt).expect("plaintext is JSON");
        assert_eq!(
            serde_json::to_vec(&value).unwrap(),
            pt,
            "{d}: not canonical serde output"
        );

        let header = t.header();
        let header_bytes = header.encode().unwrap();
        assert_eq!(
            hex::encode(&header_bytes),
            t.header_hex,
            "{d}: header bytes"
        );
        assert_eq!(
            reference::encode_header(&t.header.edks),
            header_bytes,
            "{d}: reference header"
        );
        let canonical = t.context().canonical();
        assert_eq!(
            hex::encode(&canonical),
            t.canonical_context_hex,
            "{d}: canonical context"
        );
        assert_eq!(
            reference::canonical(&t.context),
            canonical,
            "{d}: reference canonical"
        );

        let token =
            token::seal_with_salt(&header, &t.data_key(), &t.salt(), &t.context(), &pt).unwrap();
        assert_eq!(token, t.token, "{d}: the token format changed");

        // Sizes: prefix ‖ base64url(header ‖ C), C = P + 16·⌊P/16384⌋ + 72.
        let raw = URL_SAFE_NO_PAD.decode(&t.token["enc:v1:".len()..]).unwrap();
        let c = chunked::ciphertext_len(pt.len() as u64) as usize;
        assert_eq!(c, pt.len() + 16 * (pt.len() / 16384) + 72);
        assert_eq!(raw.len(), header_bytes.len() + c, "{d}: size");
        assert_eq!(&raw[..header_bytes.len()], header_bytes.as_slice());
        assert_eq!(
            &raw[header_bytes.len()..][..24],
            t.salt().as_slice(),
            "{d}: salt"
        );
    }
}

/// (b) Every token opens, with the crate and with the reference decoder.
#[test]
fn every_token_opens() {
    for t in load().tokens {
        let d = &t.description;
        let parsed = ParsedToken::parse(&t.token).unwrap();
        assert_eq!(parsed.header, t.header(), "{d}: parsed header");
        let pt = parsed.open(&t.data_key(), &t.context()).unwrap();
        assert_eq!(pt, t.plaintext(), "{d}: crate plaintext");
        let pt = reference::open_token(&t.token, &t.data_key(), &t.context)
            .unwrap_or_else(|| panic!("{d}: the reference decoder (FORMAT.md) rejects it"));
        assert_eq!(pt, t.plaintext(), "{d}: reference plaintext");
    }
}

fn opens(token: &str, key: &[u8; 32], ctx: &BTreeMap<String, String>) -> bool {
    let ours = ParsedToken::parse(token)
        .and_then(|p| p.open(key, &to_context(ctx)))
        .is_ok();
    let theirs = reference::open_token(token, key, ctx).is_some();
    assert_eq!(ours, theirs, "crate and reference disagree");
    ours
}

/// (c) A wrong key or context, or any flipped bit, fails.
#[test]
fn tampering_fails() {
    for t in load().tokens {
        let d = &t.description;
        let key = t.data_key();
        assert!(opens(&t.token, &key, &t.context), "{d}");

        // Wrong data key.
        let mut other = key;
        other[31] ^= 1;
        assert!(!opens(&t.token, &other, &t.context), "{d}: wrong key");

        // Wrong message context: another field path, a changed, missing or extra pair.
        let mut ctx = t.context.clone();
        ctx.insert("ep:field".into(), "$.other".into());
        assert!(!opens(&t.token, &key, &ctx), "{d}: other ep:field");
        for k in t.context.keys() {
            let mut ctx = t.context.clone();
            ctx.remove(k);
            assert!(!opens(&t.token, &key, &ctx), "{d}: without {k}");
            let mut ctx = t.context.clone();
            ctx.get_mut(k).unwrap().push('x');
            assert!(!opens(&t.token, &key, &ctx), "{d}: changed {k}");
        }
        let mut ctx = t.context.clone();
        ctx.insert("extra".into(), String::new());
        assert!(!opens(&t.token, &key, &ctx), "{d}: extra pair");

        // Flipped bits in every region of header ‖ message.
        let raw = URL_SAFE_NO_PAD.decode(&t.token["enc:v1:".len()..]).unwrap();
        let h = t.header_hex.len() / 2;
        let mut positions = vec![0, 1, 2, h - 1, h, h + 23, h + 24, h + 55, h + 56];
        positions.extend([raw.len() - 17, raw.len() - 16, raw.len() - 1]);
        if t.plaintext_len >= 16384 {
            positions.extend([
                h + 56 + 16383,
                h + 56 + 16384,
                h + 56 + 16399,
                h + 56 + 16400,
            ]);
        }
        for at in positions {
            for bit in [0x01u8, 0x80] {
                let mut bad = raw.clone();
                bad[at] ^= bit;
                let forged = format!("enc:v1:{}", URL_SAFE_NO_PAD.encode(&bad));
                assert!(
                    !opens(&forged, &key, &t.context),
                    "{d}: flip {bit:#x} at {at}"
                );
            }
        }

        // Truncated, extended, or re-encoded tokens.
        for cut in [1, 16, raw.len() - h - 56] {
            let forged = format!("enc:v1:{}", URL_SAFE_NO_PAD.encode(&raw[..raw.len() - cut]));
            assert!(!opens(&forged, &key, &t.context), "{d}: cut {cut}");
        }
        let forged = format!(
            "enc:v1:{}",
            URL_SAFE_NO_PAD.encode([&raw[..], &[0]].concat())
        );
        assert!(!opens(&forged, &key, &t.context), "{d}: trailing byte");
        for suffix in ["=", "==", " ", "\n", "A", "*"] {
            let forged = format!("{}{suffix}", t.token);
            assert!(!opens(&forged, &key, &t.context), "{d}: suffix {suffix:?}");
        }
        let padded = format!("enc:v1:{}", B64.encode(&raw));
        if padded != t.token {
            assert!(
                ParsedToken::parse(&padded).is_err(),
                "{d}: standard base64 accepted"
            );
        }
    }
}

/// FORMAT.md §7: readers reject versions they do not know.
#[test]
fn unknown_versions_are_rejected() {
    let t = &load().tokens[0];
    let body = &t.token["enc:v1:".len()..];
    for prefix in ["enc:v2:", "enc:v0:", "enc:", "ENC:v1:", ""] {
        assert!(matches!(
            ParsedToken::parse(&format!("{prefix}{body}")),
            Err(TokenError::NotAToken)
        ));
    }
    let mut raw = URL_SAFE_NO_PAD.decode(body).unwrap();
    for version in [0u8, 2, 0xff] {
        raw[0] = version;
        let forged = format!("enc:v1:{}", URL_SAFE_NO_PAD.encode(&raw));
        assert!(matches!(
            ParsedToken::parse(&forged),
            Err(TokenError::Header(HeaderError::Version(v))) if v == version
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Local keyring: EDK blobs and the keyring file

/// Write the vector's keyring file and master key into `dir`, as `keyring.json`/`master.key`.
fn try_install_keyring(v: &KeyringVector, dir: &Path) -> Result<Arc<Keyring>, KeyringError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |name: &str, bytes: &[u8]| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))
            .unwrap();
        f.write_all(bytes).unwrap();
    };
    write("master.key", format!("{}\n", v.master_key).as_bytes());
    write("keyring.json", &serde_json::to_vec_pretty(&v.file).unwrap());
    Keyring::open(
        "local",
        &dir.join("keyring.json"),
        &MasterKeySource::File(dir.join("master.key")),
    )
}

fn install_keyring(v: &KeyringVector, dir: &Path) -> Arc<Keyring> {
    try_install_keyring(v, dir).expect("the vector keyring file opens")
}

#[test]
fn keyring_file_vector() {
    let v = load().keyring;
    let master: [u8; 32] = unhex_array(&v.master_key);
    let nonce: [u8; 12] = unhex_array(&v.nonce);
    assert_eq!(v.file.format, reference::KEYRING_FORMAT);
    assert_eq!(B64.decode(&v.file.nonce).unwrap(), nonce);
    let sealed = reference::gcm_seal(
        &master,
        &nonce,
        reference::KEYRING_FORMAT.as_bytes(),
        v.inner.as_bytes(),
    );
    assert_eq!(B64.encode(sealed), v.file.sealed, "keyring file sealing");

    let dir = tempfile::tempdir().unwrap();
    let keyring = install_keyring(&v, dir.path());
    let list: Vec<(String, bool, u32, usize)> = keyring
        .list()
        .into_iter()
        .map(|k| (k.name, k.enabled, k.current_version, k.versions))
        .collect();
    assert_eq!(
        list,
        vec![
            ("backup".to_string(), true, 1, 1),
            ("users".to_string(), true, 2, 2)
        ]
    );

    // The other direction: a file the crate writes reads back with the reference reader.
    let dir = tempfile::tempdir().unwrap();
    let (file, master_file) = (dir.path().join("k.json"), dir.path().join("m.key"));
    let kr = Keyring::open("local", &file, &MasterKeySource::File(master_file.clone())).unwrap();
    kr.create_key("orders").unwrap();
    kr.rotate_key("orders").unwrap();
    let master: [u8; 32] = unhex_array(std::fs::read_to_string(&master_file).unwrap().trim());
    let inner = reference::read_keyring(&master, &std::fs::read(&file).unwrap())
        .expect("the reference reader opens a keyring file the crate wrote");
    let orders = &inner["keys"]["orders"];
    assert_eq!(orders["state"], "enabled");
    let versions = orders["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    for (i, ver) in versions.iter().enumerate() {
        assert_eq!(ver["version"], i as u64 + 1);
        assert!(ver["created"].is_u64());
        assert_eq!(
            B64.decode(ver["material"].as_str().unwrap()).unwrap().len(),
            32
        );
    }

    // An unknown keyring format is refused.
    let mut doc = v.file.clone();
    doc.format = "envelope-proxy.keyring.v2".into();
    let bad = KeyringVector {
        file: doc,
        ..v.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let err = try_install_keyring(&bad, dir.path())
        .err()
        .expect("keyring format v2 accepted");
    assert!(
        err.to_string().contains("unsupported keyring format"),
        "{err}"
    );
}

/// Root key material of the vector keyring, read with the reference reader.
fn root_key(v: &KeyringVector, key_id: &str, version: u32) -> [u8; 32] {
    let master: [u8; 32] = unhex_array(&v.master_key);
    let file = serde_json::to_vec(&v.file).unwrap();
    let inner = reference::read_keyring(&master, &file).unwrap();
    let ver = inner["keys"][key_id]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["version"] == version)
        .unwrap();
    B64.decode(ver["material"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

#[tokio::test]
async fn local_wrap_vectors() {
    let v = load();
    let dir = tempfile::tempdir().unwrap();
    let keyring = install_keyring(&v.keyring, dir.path());
    for w in &v.local_wraps {
        let d = &w.description;
        let root: [u8; 32] = unhex_array(&w.root_key);
        assert_eq!(
            root,
            root_key(&v.keyring, &w.key_id, w.version),
            "{d}: root key"
        );
        let aad = reference::wrap_aad(&w.key_id, w.version, &w.key_context);
        assert_eq!(hex::encode(&aad), w.aad, "{d}: AAD");
        let blob = reference::wrap(
            &root,
            &unhex_array(&w.nonce),
            &aad,
            &unhex_array(&w.data_key),
        );
        assert_eq!(hex::encode(&blob), w.blob, "{d}: blob");

        // The keyring unwraps the stored blob to the data key, under its key context only.
        let wrapped = WrappedKey {
            backend: "local".into(),
            key_id: w.key_id.clone(),
            key_version: w.version,
            blob: unhex(&w.blob),
        };
        let ctx = to_context(&w.key_context);
        let key = keyring.unwrap_data_key(&wrapped, &ctx).await.unwrap();
        assert_eq!(hex::encode(key.expose()), w.data_key, "{d}: unwrapped key");
        let mut other = w.key_context.clone();
        other.insert("tenant".into(), "globex".into());
        assert!(matches!(
            keyring.unwrap_data_key(&wrapped, &to_context(&other)).await,
            Err(BackendError::InvalidCiphertext)
        ));
        let mut bad = wrapped.clone();
        bad.blob[30] ^= 1;
        assert!(keyring.unwrap_data_key(&bad, &ctx).await.is_err());
        let mut bad = wrapped.clone();
        bad.key_version ^= 3; // another (or a missing) version
        assert!(keyring.unwrap_data_key(&bad, &ctx).await.is_err());
    }

    // What the keyring wraps now (random nonce, newest version) unwraps with the reference.
    let ctx: BTreeMap<String, String> = [("tenant".to_string(), "acme".to_string())].into();
    let data_key = DataKey::from_bytes([0x5a; 32]);
    for key_id in ["users", "backup"] {
        let w = keyring
            .wrap_data_key(key_id, &data_key, &to_context(&ctx))
            .await
            .unwrap();
        assert_eq!((w.backend.as_str(), w.key_id.as_str()), ("local", key_id));
        assert_eq!(w.blob.len(), 60);
        let root = root_key(&v.keyring, key_id, w.key_version);
        let aad = reference::wrap_aad(key_id, w.key_version, &ctx);
        assert_eq!(reference::unwrap(&root, &aad, &w.blob), Some([0x5a; 32]));
    }
}

/// Keyring file → EDK → data key → token, through the public `KeyService`.
#[tokio::test]
async fn end_to_end_through_key_service() {
    let v = load();
    let dir = tempfile::tempdir().unwrap();
    let keyring = install_keyring(&v.keyring, dir.path());
    let service = KeyService::new(
        vec![keyring as Arc<dyn RootKeyProvider>],
        CacheLimits::default(),
        Arc::new(Metrics::new()),
    );
    for t in &v.tokens {
        let parsed = ParsedToken::parse(&t.token).unwrap();
        let key = service
            .opening_key(&parsed.header, &to_context(&t.key_context))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", t.description));
        assert_eq!(hex::encode(key.expose()), t.data_key, "{}", t.description);
        assert_eq!(
            parsed.open(key.expose(), &t.context()).unwrap(),
            t.plaintext()
        );
        // The message context contains the key context.
        for (k, val) in &t.key_context {
            assert_eq!(t.context.get(k), Some(val));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generator. Not a check: it writes a candidate file and never touches tests/vectors/.

/// Deterministic "random-looking" bytes from a label.
fn fixed<const N: usize>(label: &str) -> [u8; N] {
    Sha256::digest(label.as_bytes())[..N].try_into().unwrap()
}

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
#[ignore = "generator: writes a candidate tokens.json under target/, run only on a format change"]
fn generate() {
    let master: [u8; 32] = fixed("envelope-proxy vectors: master key");
    let users_v1: [u8; 32] = fixed("envelope-proxy vectors: root key users v1");
    let users_v2: [u8; 32] = fixed("envelope-proxy vectors: root key users v2");
    let backup_v1: [u8; 32] = fixed("envelope-proxy vectors: root key backup v1");
    let k1: [u8; 32] = fixed("envelope-proxy vectors: data key 1");
    let k2: [u8; 32] = fixed("envelope-proxy vectors: data key 2");

    // The keyring file.
    let inner = serde_json::json!({"keys": {
        "backup": {"state": "enabled", "created": 1_700_000_100u64, "versions": [
            {"version": 1, "created": 1_700_000_100u64, "material": B64.encode(backup_v1)}]},
        "users": {"state": "enabled", "created": 1_700_000_000u64, "versions": [
            {"version": 1, "created": 1_700_000_000u64, "material": B64.encode(users_v1)},
            {"version": 2, "created": 1_700_086_400u64, "material": B64.encode(users_v2)}]},
    }})
    .to_string();
    let nonce: [u8; 12] = fixed("envelope-proxy vectors: keyring nonce");
    let sealed = reference::gcm_seal(
        &master,
        &nonce,
        reference::KEYRING_FORMAT.as_bytes(),
        inner.as_bytes(),
    );
    let keyring = KeyringVector {
        description: "A keyring file with root keys users (versions 1 and 2) and backup \
                      (version 1), sealed under master_key with nonce. Material is base64 in \
                      the inner document."
            .into(),
        master_key: hex::encode(master),
        nonce: hex::encode(nonce),
        inner,
        file: KeyringFile {
            format: reference::KEYRING_FORMAT.into(),
            nonce: B64.encode(nonce),
            sealed: B64.encode(sealed),
        },
    };

    // EDK blobs: the data keys wrapped under the keyring's root keys.
    let tenant = ctx(&[("tenant", "acme")]);
    let none = ctx(&[]);
    let wrap = |i: usize,
                description: &str,
                key_id: &str,
                version: u32,
                root: [u8; 32],
                key_context: &BTreeMap<String, String>,
                data_key: [u8; 32]| {
        let nonce: [u8; 12] = fixed(&format!("envelope-proxy vectors: wrap nonce {i}"));
        let aad = reference::wrap_aad(key_id, version, key_context);
        WrapVector {
            description: description.into(),
            root_key: hex::encode(root),
            key_id: key_id.into(),
            version,
            key_context: key_context.clone(),
            data_key: hex::encode(data_key),
            nonce: hex::encode(nonce),
            aad: hex::encode(&aad),
            blob: hex::encode(reference::wrap(&root, &nonce, &aad, &data_key)),
        }
    };
    let local_wraps = vec![
        wrap(
            0,
            "data key 1 under users v1, key context {tenant: acme}",
            "users",
            1,
            users_v1,
            &tenant,
            k1,
        ),
        wrap(
            1,
            "data key 2 under users v2, empty key context",
            "users",
            2,
            users_v2,
            &none,
            k2,
        ),
        wrap(
            2,
            "data key 2 under backup v1, empty key context",
            "backup",
            1,
            backup_v1,
            &none,
            k2,
        ),
    ];
    let edk = |w: &WrapVector| EdkVector {
        backend: "local".into(),
        key_id: w.key_id.clone(),
        key_version: w.version,
        blob: w.blob.clone(),
    };
    let one = vec![edk(&local_wraps[0])];
    let two = vec![edk(&local_wraps[1]), edk(&local_wraps[2])];

    // Tokens.
    let mut tokens: Vec<TokenVector> = Vec::new();
    let mut case = |description: &str,
                    data_key: [u8; 32],
                    edks: &[EdkVector],
                    key_context: &BTreeMap<String, String>,
                    extra: &[(&str, &str)],
                    plaintext: Result<serde_json::Value, Pattern>| {
        let salt: [u8; 24] = fixed(&format!("envelope-proxy vectors: salt {}", tokens.len()));
        let mut context = key_context.clone();
        context.extend(ctx(extra));
        let (plaintext, plaintext_pattern) = match plaintext {
            Ok(value) => (Some(serde_json::to_string(&value).unwrap()), None),
            Err(pattern) => (None, Some(pattern)),
        };
        let mut t = TokenVector {
            description: description.into(),
            data_key: hex::encode(data_key),
            salt: hex::encode(salt),
            header: HeaderVector {
                edks: edks.to_vec(),
            },
            key_context: key_context.clone(),
            context,
            plaintext,
            plaintext_pattern,
            plaintext_len: 0,
            header_hex: String::new(),
            canonical_context_hex: String::new(),
            token: String::new(),
        };
        let pt = t.plaintext();
        t.plaintext_len = pt.len();
        t.header_hex = hex::encode(t.header().encode().unwrap());
        t.canonical_context_hex = hex::encode(t.context().canonical());
        t.token = token::seal_with_salt(&t.header(), &data_key, &salt, &t.context(), &pt).unwrap();
        tokens.push(t);
    };
    case(
        "a JSON string",
        k1,
        &one,
        &tenant,
        &[("id", "42"), ("ep:field", "$.ssn")],
        Ok(serde_json::json!("123-45-6789")),
    );
    case(
        "a JSON number",
        k1,
        &one,
        &tenant,
        &[("id", "42"), ("ep:field", "$.balance")],
        Ok(serde_json::json!(-1234.5)),
    );
    case(
        "a JSON object (key order preserved, non-ASCII text); context keys sort bytewise",
        k1,
        &one,
        &tenant,
        &[("app", "crm"), ("id", "42"), ("ep:field", "$.address")],
        Ok(serde_json::json!({
            "street": "1 Main St", "city": "Zürich", "zip": "8001",
            "tags": ["home", "billing"], "primary": true, "unit": null,
        })),
    );
    case(
        "an empty JSON string (plaintext is the two bytes \"\")",
        k1,
        &one,
        &tenant,
        &[("ep:field", "$.nickname")],
        Ok(serde_json::json!("")),
    );
    case(
        "a 17602-byte JSON string: one full 16384-byte chunk and a 1218-byte final chunk",
        k1,
        &one,
        &tenant,
        &[("ep:field", "$.notes")],
        Err(Pattern {
            prefix: "\"".into(),
            repeat: "0123456789abcdef".into(),
            times: 1100,
            suffix: "\"".into(),
        }),
    );
    case(
        "two EDKs (users v2 and backup v1) for one data key; empty key context",
        k2,
        &two,
        &none,
        &[("ep:field", "$.card.number")],
        Ok(serde_json::json!("4111111111111111")),
    );

    let vectors = Vectors {
        comment: vec![
            "Golden vectors for envelope-proxy's on-storage formats; see docs/FORMAT.md.".into(),
            "Checked on every test run by tests/vectors.rs. Never edit: a format change needs a new version.".into(),
            "Bytes are lowercase hex unless a field says base64. Contexts are objects of string pairs.".into(),
            "plaintext_pattern means prefix + repeat * times + suffix.".into(),
        ],
        keyring,
        local_wraps,
        tokens,
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tokens.json");
    std::fs::write(&out, serde_json::to_string_pretty(&vectors).unwrap() + "\n").unwrap();
    println!("wrote {}", out.display());
}

// ---------------------------------------------------------------------------------------------
// S3 objects (FORMAT.md §9), in `tests/vectors/s3_objects.json`. The same rules: the current code
// must reproduce every stored byte, open every object (with its streaming opener and with the
// reference decoder), and unwrap every EDK through the keyring of `tokens.json`.
//
// Regenerate only on a versioned format change: `cargo test --test vectors -- --ignored
// generate_s3`.

const S3_VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/s3_objects.json");

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct S3Vectors {
    comment: Vec<String>,
    objects: Vec<S3ObjectVector>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct S3ObjectVector {
    description: String,
    data_key: String,
    edks: Vec<EdkVector>,
    /// The key context (the route's `context`, e.g. the bucket): the EDKs are wrapped under it.
    key_context: BTreeMap<String, String>,
    /// Hex of the 16-byte object id; the message context is the key context plus
    /// `ep:object` = this, and for a multipart object `ep:part` = the part number (decimal).
    object_id: String,
    /// Format 2 (metadata `ep-format: 2`) also binds `ep:bucket` = `bucket` and `ep:key` =
    /// `key`; format 1 (no `bucket`/`key` fields, no marker) is the legacy, unbound format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    multipart: bool,
    /// The reserved metadata as stored (header names without `x-amz-meta-`).
    metadata: BTreeMap<String, String>,
    parts: Vec<S3PartVector>,
    /// Intermediate value, to debug an independent implementation.
    header_hex: String,
}

/// One stored message: the whole body of a single-part object, or one part.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct S3PartVector {
    salt: String,
    /// Plaintext byte `i` of the object (counted across parts) is `(7·i + 3) mod 256`.
    plaintext_offset: u64,
    plaintext_len: u64,
    /// The stored bytes, standard base64.
    stored: String,
}

fn object_plaintext(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((7 * i + 3) % 256) as u8)
        .collect()
}

impl S3ObjectVector {
    fn header_bytes(&self) -> Vec<u8> {
        reference::encode_header(&self.edks)
    }
    /// The message context of one stored message (FORMAT.md §9).
    fn message_context(&self, part: Option<usize>) -> BTreeMap<String, String> {
        let mut c = self.key_context.clone();
        c.insert("ep:object".into(), self.object_id.clone());
        if let (Some(bucket), Some(key)) = (&self.bucket, &self.key) {
            c.insert("ep:bucket".into(), bucket.clone());
            c.insert("ep:key".into(), key.clone());
        }
        if let Some(n) = part {
            c.insert("ep:part".into(), n.to_string());
        }
        c
    }
    fn binding(&self, part: Option<usize>) -> Vec<u8> {
        let h = self.header_bytes();
        let mut b = (h.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(&h);
        b.extend_from_slice(&reference::canonical(&self.message_context(part)));
        b
    }
    fn part_number(&self, i: usize) -> Option<usize> {
        self.multipart.then_some(i + 1)
    }
    fn bound(&self) -> bool {
        self.bucket.is_some()
    }
}

fn key_of(o: &S3ObjectVector) -> [u8; 32] {
    unhex_array(&o.data_key)
}

fn load_s3() -> S3Vectors {
    let text = std::fs::read_to_string(S3_VECTORS).expect("tests/vectors/s3_objects.json");
    serde_json::from_str(&text).expect("s3_objects.json parses")
}

#[test]
fn s3_object_vectors_reproduce_and_open() {
    let v = load_s3();
    assert!(v.objects.iter().any(|o| o.multipart) && v.objects.iter().any(|o| !o.multipart));
    assert!(v.objects.iter().any(|o| o.multipart && o.bound()));
    assert!(v.objects.iter().any(|o| !o.multipart && o.bound()));
    for o in &v.objects {
        assert_eq!(o.bucket.is_some(), o.key.is_some(), "{}", o.description);
        // The crate's object context (the gateway's and decrypt-object's) is the reference's.
        let format = if o.bound() {
            envelope_proxy::transform::s3_object::ObjectFormat::Bound
        } else {
            envelope_proxy::transform::s3_object::ObjectFormat::Unbound
        };
        assert_eq!(
            format.object_context(
                &to_context(&o.key_context),
                &o.object_id,
                o.bucket.as_deref().unwrap_or(""),
                o.key.as_deref().unwrap_or("")
            ),
            to_context(&o.message_context(None)),
            "{}",
            o.description
        );
        let key: [u8; 32] = unhex_array(&o.data_key);
        let header = o.header_bytes();
        assert_eq!(hex::encode(&header), o.header_hex, "{}", o.description);
        // The crate's binding is the reference's.
        let crate_ctx = to_context(&o.message_context(o.part_number(0)));
        assert_eq!(
            envelope_proxy::envelope::binding(&header, &crate_ctx),
            o.binding(o.part_number(0)),
            "{}",
            o.description
        );
        for (i, p) in o.parts.iter().enumerate() {
            let what = format!("{} (part {})", o.description, i + 1);
            let stored = B64.decode(&p.stored).unwrap();
            let plain = object_plaintext(p.plaintext_offset, p.plaintext_len);
            let salt: [u8; 24] = unhex_array(&p.salt);
            let bind = o.binding(o.part_number(i));
            assert_eq!(
                stored.len() as u64,
                chunked::ciphertext_len(p.plaintext_len),
                "{what}"
            );
            // Byte for byte what the gateway's sealer writes.
            let mut sealer =
                envelope_proxy::envelope::stream::Sealer::with_salt(&key, &salt, &bind);
            let mut out = sealer.header().to_vec();
            for piece in plain.chunks(7000) {
                sealer.push(piece, &mut out);
            }
            sealer.finish(&mut out);
            assert!(out == stored, "{what}: the sealer wrote other bytes");
            // Opened by the gateway's streaming opener, fed in odd pieces.
            let mut opener = envelope_proxy::envelope::stream::Opener::new(
                &key,
                &bind,
                stored[..chunked::HEADER_LEN].try_into().unwrap(),
            )
            .unwrap();
            let mut got = Vec::new();
            for piece in stored[chunked::HEADER_LEN..].chunks(5000) {
                opener.push(piece, &mut got).unwrap();
            }
            opener.finish(&mut got).unwrap();
            assert!(got == plain, "{what}: the opener gave other bytes");
            // And by the reference decoder.
            assert!(
                reference::chunked_open(&key, &bind, &stored).as_deref() == Some(&plain[..]),
                "{what}: the reference decoder disagrees"
            );
        }
        // The reserved metadata.
        let first = B64.decode(&o.parts[0].stored).unwrap();
        let envelope = if o.multipart {
            header.clone()
        } else {
            [&header[..], &first[..chunked::HEADER_LEN]].concat()
        };
        assert_eq!(
            o.metadata.get("ep-envelope"),
            Some(&URL_SAFE_NO_PAD.encode(envelope))
        );
        assert_eq!(o.metadata.get("ep-object"), Some(&o.object_id));
        assert_eq!(
            o.metadata.get("ep-multipart").map(String::as_str),
            o.multipart.then_some("1")
        );
        assert_eq!(
            o.metadata.get("ep-format").map(String::as_str),
            o.bound().then_some("2")
        );
    }
}

#[test]
fn s3_object_tampering_fails() {
    let v = load_s3();
    for o in v.objects.iter().filter(|o| o.multipart) {
        let key: [u8; 32] = unhex_array(&o.data_key);
        let parts: Vec<Vec<u8>> = o
            .parts
            .iter()
            .map(|p| B64.decode(&p.stored).unwrap())
            .collect();
        // A part opens only as its own part number of its own object.
        assert!(reference::chunked_open(&key, &o.binding(Some(2)), &parts[0]).is_none());
        let mut other = o.clone();
        other.object_id = "00".repeat(16);
        assert!(reference::chunked_open(&key, &other.binding(Some(1)), &parts[0]).is_none());
    }
    for o in &v.objects {
        let key: [u8; 32] = unhex_array(&o.data_key);
        let stored = B64.decode(&o.parts[0].stored).unwrap();
        let bind = o.binding(o.part_number(0));
        for at in [0, 30, chunked::HEADER_LEN, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            assert!(
                reference::chunked_open(&key, &bind, &bad).is_none(),
                "{}: flip at {at}",
                o.description
            );
        }
        if o.bound() {
            // Format 2 is bound to its place: under another key or bucket it does not open,
            // nor as format 1 (its marker stripped).
            for (bucket, key) in [
                (o.bucket.clone(), Some("tenants/bob/record.txt".to_string())),
                (Some("another-bucket".to_string()), o.key.clone()),
                (None, None),
            ] {
                let mut moved = o.clone();
                moved.bucket = bucket;
                moved.key = key;
                assert!(
                    reference::chunked_open(&key_of(o), &moved.binding(o.part_number(0)), &stored)
                        .is_none(),
                    "{}: opened at {:?}/{:?}",
                    o.description,
                    moved.bucket,
                    moved.key
                );
            }
        } else {
            // Format 1 objects do not open as format 2 (a marker added by storage).
            let mut marked = o.clone();
            marked.bucket = Some("photos".into());
            marked.key = Some("k".into());
            assert!(
                reference::chunked_open(&key_of(o), &marked.binding(o.part_number(0)), &stored)
                    .is_none()
            );
        }
        // Another key context (another bucket) does not open it.
        let mut elsewhere = o.clone();
        elsewhere
            .key_context
            .insert("bucket".into(), "another-bucket".into());
        assert!(
            reference::chunked_open(&key, &elsewhere.binding(o.part_number(0)), &stored).is_none()
        );
    }
}

/// The EDKs unwrap through the keyring of `tokens.json` under the object's key context.
#[tokio::test]
async fn s3_object_edks_unwrap_through_the_keyring() {
    let v = load_s3();
    let dir = tempfile::tempdir().unwrap();
    let keyring = install_keyring(&load().keyring, dir.path());
    let service = KeyService::new(
        vec![keyring as Arc<dyn RootKeyProvider>],
        CacheLimits::default(),
        Arc::new(Metrics::new()),
    );
    for o in &v.objects {
        let (header, _) = Header::decode(&o.header_bytes()).unwrap();
        let key = service
            .opening_key(&header, &to_context(&o.key_context))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", o.description));
        assert_eq!(hex::encode(key.expose()), o.data_key, "{}", o.description);
    }
}

#[test]
#[ignore = "generator: writes a candidate s3_objects.json under target/, run only on a format change"]
fn generate_s3() {
    let keyring = load().keyring;
    let users_v1 = root_key(&keyring, "users", 1);
    let mut objects = Vec::new();
    // Format 1 (legacy: read only) then format 2 (bound to bucket and key).
    const NAME: Option<&str> = Some("2026/été ✓ +&=.jpg");
    let cases: [(&str, bool, &[u64], Option<&str>); 6] = [
        ("single-part, empty (format 1, legacy)", false, &[0], None),
        (
            "single-part, 100 bytes (one short chunk) (format 1, legacy)",
            false,
            &[100],
            None,
        ),
        (
            "single-part, 16385 bytes (a full chunk and a 1-byte final chunk) (format 1, legacy)",
            false,
            &[16_385],
            None,
        ),
        (
            "multipart, 3 parts: 16384 + 16384 + 10 bytes (non-final parts end with an empty final chunk) (format 1, legacy)",
            true,
            &[16_384, 16_384, 10],
            None,
        ),
        (
            "single-part, 100 bytes (format 2: bound to bucket and key)",
            false,
            &[100],
            NAME,
        ),
        (
            "multipart, 2 parts: 16384 + 5 bytes (format 2: bound to bucket and key)",
            true,
            &[16_384, 5],
            NAME,
        ),
    ];
    for (n, (description, multipart, sizes, name)) in cases.into_iter().enumerate() {
        let data_key: [u8; 32] = fixed(&format!("envelope-proxy s3 vectors: data key {n}"));
        let key_context = ctx(&[("bucket", "photos")]);
        let wrap_nonce: [u8; 12] = fixed(&format!("envelope-proxy s3 vectors: wrap nonce {n}"));
        let aad = reference::wrap_aad("users", 1, &key_context);
        let edks = vec![EdkVector {
            backend: "local".into(),
            key_id: "users".into(),
            key_version: 1,
            blob: hex::encode(reference::wrap(&users_v1, &wrap_nonce, &aad, &data_key)),
        }];
        let object_id: [u8; 16] = fixed(&format!("envelope-proxy s3 vectors: object id {n}"));
        let mut o = S3ObjectVector {
            description: description.into(),
            data_key: hex::encode(data_key),
            edks,
            key_context,
            object_id: hex::encode(object_id),
            bucket: name.map(|_| "photos".to_string()),
            key: name.map(str::to_string),
            multipart,
            metadata: BTreeMap::new(),
            parts: Vec::new(),
            header_hex: String::new(),
        };
        o.header_hex = hex::encode(o.header_bytes());
        let mut offset = 0;
        for (i, &len) in sizes.iter().enumerate() {
            let salt: [u8; 24] = fixed(&format!("envelope-proxy s3 vectors: salt {n}.{i}"));
            let stored = chunked::seal_with_salt(
                &data_key,
                &salt,
                &o.binding(o.part_number(i)),
                &object_plaintext(offset, len),
            );
            o.parts.push(S3PartVector {
                salt: hex::encode(salt),
                plaintext_offset: offset,
                plaintext_len: len,
                stored: B64.encode(stored),
            });
            offset += len;
        }
        let first = B64.decode(&o.parts[0].stored).unwrap();
        let envelope = if multipart {
            o.header_bytes()
        } else {
            [o.header_bytes(), first[..chunked::HEADER_LEN].to_vec()].concat()
        };
        o.metadata
            .insert("ep-envelope".into(), URL_SAFE_NO_PAD.encode(envelope));
        o.metadata.insert("ep-object".into(), o.object_id.clone());
        if multipart {
            o.metadata.insert("ep-multipart".into(), "1".into());
        }
        if name.is_some() {
            o.metadata.insert("ep-format".into(), "2".into());
        }
        objects.push(o);
    }
    let out = S3Vectors {
        comment: vec![
            "Golden vectors for S3 objects written by the encrypting gateway (docs/FORMAT.md §9).".into(),
            "Hex unless a field says base64. The EDKs wrap data_key under root key users v1 of the \
             keyring in tokens.json, with the key context as AAD (FORMAT.md §6.1)."
                .into(),
            "Plaintext byte i of an object (counted across its parts) is (7*i + 3) mod 256.".into(),
        ],
        objects,
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/s3_objects.candidate.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

/// `decrypt-object` (the offline reader, which shares the gateway's opening code) opens every
/// vector object from its stored bytes and metadata, with the keyring of `tokens.json`.
#[tokio::test]
async fn s3_object_vectors_open_offline() {
    let v = load_s3();
    let dir = tempfile::tempdir().unwrap();
    drop(install_keyring(&load().keyring, dir.path()));
    let config = envelope_proxy::config::parse(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
[keyring]
path = "{dir}/keyring.json"
master_key_file = "{dir}/master.key"
[[route]]
name = "objects"
kind = "s3"
path = "/**"
upstream = "http://127.0.0.1:9"
key = "users"
context = {{ bucket = "{{s3.bucket}}" }}
[route.s3]
region = "us-east-1"
upstream_access_key_id_file = "{dir}/master.key"
upstream_secret_access_key_file = "{dir}/master.key"
[[route.s3.client]]
access_key_id = "AKIAVECTORS"
secret_access_key_file = "{dir}/master.key"
identity = "vectors"
"#,
        dir = dir.path().display()
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    for o in &v.objects {
        let mut meta = serde_json::json!({ "Metadata": o.metadata });
        if o.multipart {
            let first = B64.decode(&o.parts[0].stored).unwrap();
            meta["PartsCount"] = o.parts.len().into();
            meta["ContentLength"] = first.len().into();
        }
        let body: Vec<u8> = o
            .parts
            .iter()
            .flat_map(|p| B64.decode(&p.stored).unwrap())
            .collect();
        let given: std::collections::HashMap<String, String> = o
            .key_context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        envelope_proxy::s3::offline::decrypt_object(
            &config,
            None,
            &given,
            o.bucket.as_deref().zip(o.key.as_deref()),
            &meta.to_string(),
            &body[..],
            &mut out,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", o.description));
        let total: u64 = o.parts.iter().map(|p| p.plaintext_len).sum();
        assert!(out == object_plaintext(0, total), "{}", o.description);
        if o.bound() {
            // A format-2 object needs its own bucket and key: none, or another key, fails.
            let bucket = o.bucket.as_deref().unwrap();
            for names in [None, Some((bucket, "tenants/bob/record.txt"))] {
                let mut out = Vec::new();
                let r = envelope_proxy::s3::offline::decrypt_object(
                    &config,
                    None,
                    &given,
                    names,
                    &meta.to_string(),
                    &body[..],
                    &mut out,
                )
                .await;
                assert!(r.is_err(), "{}: opened with {names:?}", o.description);
                assert!(out.is_empty(), "{}: released plaintext", o.description);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Format v2 (FORMAT.md §12): data-key records and `enc:v2:` tokens, in
// `tests/vectors/tokens_v2.json`. The same rules: the current code must reproduce every stored
// byte (record, EDK blobs, vault document, token), open every token (with the crate and with
// the reference decoder below), and unwrap every record's EDKs through the keyring of
// `tokens.json`, under the key context plus `ep:dk-id`.
//
// Regenerate only on a versioned format change: `cargo test --test vectors -- --ignored
// generate_v2` (writes target/tokens_v2.candidate.json).

const V2_VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/tokens_v2.json");

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct V2Vectors {
    comment: Vec<String>,
    records: Vec<RecordVector>,
    tokens: Vec<V2TokenVector>,
}

/// One data-key record, as the vault stores it.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct RecordVector {
    description: String,
    data_key: String,
    /// 16 bytes, hex (also the record's name in the vault).
    id: String,
    /// The key context the record belongs to (stored in it); the EDKs are wrapped under it
    /// plus `ep:dk-id` = `id`.
    key_context: BTreeMap<String, String>,
    /// Local-keyring EDKs (root keys of the keyring in `tokens.json`), with the nonce each wrap
    /// used (the nonce is also the blob's first 12 bytes).
    edks: Vec<EdkVector>,
    wrap_nonces: Vec<String>,
    /// Intermediate values, to debug an independent implementation.
    token_key: String,
    commitment: String,
    header_hex: String,
    /// The record bytes (hex).
    record: String,
    /// The vault document (JSON text as the crate serializes it).
    vault_doc: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct V2TokenVector {
    description: String,
    /// The id of the record (in `records`) whose data key sealed it.
    record_id: String,
    /// The message context, including `ep:field` (the key context plus the route's
    /// message_context pairs plus the field path).
    context: BTreeMap<String, String>,
    nonce: String,
    plaintext: String,
    /// Intermediate value: canonical(context), the AES-GCM AAD.
    aad_hex: String,
    token: String,
}

impl RecordVector {
    fn data_key(&self) -> [u8; 32] {
        unhex_array(&self.data_key)
    }
    fn record_id(&self) -> RecordId {
        RecordId(unhex_array(&self.id))
    }
    /// The record the fields describe, built with the crate's types.
    fn record(&self) -> Record {
        Record {
            id: self.record_id(),
            commitment: unhex_array(&self.commitment),
            key_context: to_context(&self.key_context),
            header: Header {
                edks: self
                    .edks
                    .iter()
                    .map(|e| WrappedKey {
                        backend: e.backend.clone(),
                        key_id: e.key_id.clone(),
                        key_version: e.key_version,
                        blob: unhex(&e.blob),
                    })
                    .collect(),
            },
        }
    }
    /// The context the EDKs are wrapped under: the key context plus `ep:dk-id`.
    fn bound_context(&self) -> BTreeMap<String, String> {
        let mut c = self.key_context.clone();
        c.insert("ep:dk-id".into(), self.id.clone());
        c
    }
}

fn load_v2() -> V2Vectors {
    let text = std::fs::read_to_string(V2_VECTORS).expect("tests/vectors/tokens_v2.json");
    serde_json::from_str(&text).expect("tokens_v2.json parses")
}

fn v2_record<'a>(v: &'a V2Vectors, t: &V2TokenVector) -> &'a RecordVector {
    v.records
        .iter()
        .find(|r| r.id == t.record_id)
        .unwrap_or_else(|| panic!("{}: no record {}", t.description, t.record_id))
}

/// The reference decoder for format v2, from FORMAT.md §12 with only the primitives
/// (HMAC-SHA-256, AES-256-GCM, base64). It shares no code with the crate.
mod reference_v2 {
    use super::*;

    pub const MAGIC: &[u8] = b"EPDK";
    pub const SALT: &[u8] = b"envelope-proxy/dk-record/v1";
    pub const PREFIX: &str = "enc:v2:";

    fn hmac256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// HKDF-SHA-256 (RFC 5869): extract with the record salt, one 32-byte expand block each.
    /// Returns (token key, commitment).
    pub fn derive(data_key: &[u8; 32], id: &[u8; 16]) -> ([u8; 32], [u8; 32]) {
        let prk = hmac256(SALT, &[data_key]);
        let token_key = hmac256(&prk, &[b"token key", id, &[1]]);
        let commitment = hmac256(&prk, &[b"commitment", id, &[1]]);
        (token_key, commitment)
    }

    /// FORMAT.md §12.1.
    pub fn encode_record(
        id: &[u8; 16],
        commitment: &[u8; 32],
        key_context: &BTreeMap<String, String>,
        edks: &[EdkVector],
    ) -> Vec<u8> {
        let ctx = reference::canonical(key_context);
        let mut out = MAGIC.to_vec();
        out.push(1);
        out.extend_from_slice(id);
        out.extend_from_slice(commitment);
        out.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        out.extend_from_slice(&ctx);
        out.extend_from_slice(&reference::encode_header(edks));
        out
    }

    /// FORMAT.md §12.4: the record id a token names and its plaintext under `data_key`, or
    /// None. The caller checks the id against the record it took the key from.
    pub fn open_token(
        token: &str,
        data_key: &[u8; 32],
        ctx: &BTreeMap<String, String>,
    ) -> Option<([u8; 16], Vec<u8>)> {
        let raw = URL_SAFE_NO_PAD.decode(token.strip_prefix(PREFIX)?).ok()?;
        if raw.len() < 16 + 12 + 16 {
            return None;
        }
        let id: [u8; 16] = raw[..16].try_into().unwrap();
        let nonce: [u8; 12] = raw[16..28].try_into().unwrap();
        let (token_key, _) = derive(data_key, &id);
        let pt = reference::gcm_open(&token_key, &nonce, &reference::canonical(ctx), &raw[28..])?;
        Some((id, pt))
    }
}

#[test]
fn v2_vector_file_covers_the_cases() {
    let v = load_v2();
    assert!(v.records.len() >= 2);
    assert!(v.records.iter().any(|r| r.edks.len() == 2));
    assert!(v.records.iter().any(|r| r.key_context.is_empty()));
    assert!(v.tokens.len() >= 6);
    assert!(v.tokens.iter().all(|t| t.context.contains_key("ep:field")));
    assert!(v.tokens.iter().any(|t| t.plaintext == "\"\""));
    assert!(v.tokens.iter().any(|t| t.plaintext.len() > 1000));
    for r in &v.records {
        assert!(
            v.tokens.iter().any(|t| t.record_id == r.id),
            "{}: no token",
            r.description
        );
    }
}

/// Records, EDK blobs and vault documents reproduce byte for byte, with the crate and with the
/// reference encoder; the crate decodes them back.
#[test]
fn v2_records_reproduce() {
    let v = load_v2();
    let keyring = load().keyring;
    for r in &v.records {
        let d = &r.description;
        let (dk, id) = (r.data_key(), r.record_id());
        // Derivations (§12.2).
        let (token_key, commitment) = reference_v2::derive(&dk, &id.0);
        assert_eq!(hex::encode(token_key), r.token_key, "{d}: token key");
        assert_eq!(hex::encode(commitment), r.commitment, "{d}: commitment");
        assert_eq!(
            record::commitment(&dk, &id),
            commitment,
            "{d}: crate commitment"
        );
        // The EDKs wrap the data key under the key context plus ep:dk-id (§12.3).
        let bound = r.bound_context();
        assert_eq!(
            record::backend_context(&to_context(&r.key_context), &id),
            to_context(&bound),
            "{d}: bound context"
        );
        assert_eq!(r.edks.len(), r.wrap_nonces.len());
        for (e, n) in r.edks.iter().zip(&r.wrap_nonces) {
            let root = root_key(&keyring, &e.key_id, e.key_version);
            let aad = reference::wrap_aad(&e.key_id, e.key_version, &bound);
            assert_eq!(
                hex::encode(reference::wrap(&root, &unhex_array(n), &aad, &dk)),
                e.blob,
                "{d}: EDK blob"
            );
        }
        // The record bytes (§12.1).
        let rec = r.record();
        let bytes = rec.encode().unwrap();
        assert_eq!(
            hex::encode(&bytes),
            r.record,
            "{d}: the record format changed"
        );
        assert_eq!(
            reference_v2::encode_record(&id.0, &commitment, &r.key_context, &r.edks),
            bytes,
            "{d}: reference record"
        );
        assert_eq!(
            hex::encode(rec.header.encode().unwrap()),
            r.header_hex,
            "{d}: header"
        );
        assert_eq!(Record::decode(&bytes).unwrap(), rec, "{d}: decode");
        // The vault document (§12.5).
        let doc = VaultDoc::new(&rec).unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r.vault_doc,
            "{d}: vault doc"
        );
        let parsed: VaultDoc = serde_json::from_str(&r.vault_doc).unwrap();
        assert_eq!(parsed.record().unwrap(), rec, "{d}: vault doc record");
        let json: serde_json::Value = serde_json::from_str(&r.vault_doc).unwrap();
        assert_eq!(json["id"], r.id.as_str());
        assert_eq!(json["state"], "active");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(json["record"].as_str().unwrap())
                .unwrap(),
            bytes
        );
    }
}

/// Every token: the record's key (commitment checked) opens it, sealing with the stored nonce
/// reproduces it, the reference decoder opens it, and its size is 7 + base64(P + 44).
#[test]
fn v2_every_token_opens() {
    let v = load_v2();
    for t in &v.tokens {
        let d = &t.description;
        let r = v2_record(&v, t);
        let rec = r.record();
        // The plaintext is one JSON value.
        serde_json::from_str::<serde_json::Value>(&t.plaintext).expect("plaintext is JSON");
        let aad = reference::canonical(&t.context);
        assert_eq!(hex::encode(&aad), t.aad_hex, "{d}: AAD");
        assert_eq!(to_context(&t.context).canonical(), aad, "{d}: crate AAD");
        // The AAD as the proxy builds it: the message context without ep:field, plus it.
        let mut without = t.context.clone();
        let field = without.remove("ep:field").unwrap();
        let mut built = vec![7u8];
        to_context(&without).canonical_with_into(("ep:field", &field), &mut built);
        assert_eq!(built, aad, "{d}: canonical_with_into");

        let key = RecordKey::open(&r.data_key(), &rec).expect("the commitment matches");
        assert_eq!(compact::record_id(&t.token).unwrap(), rec.id, "{d}: id");
        let pt = compact::open(&key, &aad, &t.token).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(&*pt, t.plaintext.as_bytes(), "{d}: crate plaintext");
        let again = compact::seal_with_nonce(
            &RecordKey::new(&r.data_key(), rec.id),
            unhex_array(&t.nonce),
            &aad,
            t.plaintext.as_bytes(),
        );
        assert_eq!(again, t.token, "{d}: the token format changed");
        let (id, pt) = reference_v2::open_token(&t.token, &r.data_key(), &t.context)
            .unwrap_or_else(|| panic!("{d}: the reference decoder (FORMAT.md) rejects it"));
        assert_eq!(id, rec.id.0, "{d}: reference id");
        assert_eq!(pt, t.plaintext.as_bytes(), "{d}: reference plaintext");
        // Size: prefix ‖ base64url(id 16 ‖ nonce 12 ‖ P ‖ tag 16).
        let raw = URL_SAFE_NO_PAD.decode(&t.token["enc:v2:".len()..]).unwrap();
        assert_eq!(
            raw.len(),
            t.plaintext.len() + compact::OVERHEAD,
            "{d}: size"
        );
        assert_eq!(compact::OVERHEAD, 44);
        assert_eq!(&raw[16..28], unhex(&t.nonce).as_slice(), "{d}: nonce");
        assert_eq!(
            t.token.len(),
            7 + (4 * raw.len()).div_ceil(3),
            "{d}: token length"
        );
    }
}

fn v2_opens(
    key: &RecordKey,
    data_key: &[u8; 32],
    token: &str,
    ctx: &BTreeMap<String, String>,
) -> bool {
    let ours = compact::open(key, &reference::canonical(ctx), token).is_ok();
    let theirs =
        reference_v2::open_token(token, data_key, ctx).is_some_and(|(id, _)| id == key.id.0);
    assert_eq!(ours, theirs, "crate and reference disagree on {token}");
    ours
}

/// A wrong data key, id, record or context, and any flipped bit, fail.
#[test]
fn v2_tampering_fails() {
    let v = load_v2();
    for t in &v.tokens {
        let d = &t.description;
        let r = v2_record(&v, t);
        let rec = r.record();
        let dk = r.data_key();
        let key = RecordKey::open(&dk, &rec).unwrap();
        assert!(v2_opens(&key, &dk, &t.token, &t.context), "{d}");

        // The commitment ties the record to its data key and id.
        let mut other = dk;
        other[31] ^= 1;
        assert!(
            RecordKey::open(&other, &rec).is_none(),
            "{d}: wrong data key"
        );
        let mut moved = rec.clone();
        moved.id.0[0] ^= 1;
        assert!(
            RecordKey::open(&dk, &moved).is_none(),
            "{d}: record moved to another id"
        );
        let mut forged = rec.clone();
        forged.commitment[5] ^= 0x10;
        assert!(
            RecordKey::open(&dk, &forged).is_none(),
            "{d}: commitment changed"
        );
        // The key of another record (data key, or id) does not open it.
        for o in v.records.iter().filter(|o| o.id != r.id) {
            let k = RecordKey::open(&o.data_key(), &o.record()).unwrap();
            assert!(compact::open(&k, &reference::canonical(&t.context), &t.token).is_err());
        }
        let same_key_other_id = RecordKey::new(&dk, RecordId([0x42; 16]));
        assert!(
            compact::open(
                &same_key_other_id,
                &reference::canonical(&t.context),
                &t.token
            )
            .is_err(),
            "{d}: same data key, another id"
        );

        // Wrong message context: another field path, a changed, missing or extra pair.
        let mut ctx = t.context.clone();
        ctx.insert("ep:field".into(), "$.other".into());
        assert!(!v2_opens(&key, &dk, &t.token, &ctx), "{d}: other ep:field");
        for k in t.context.keys() {
            let mut ctx = t.context.clone();
            ctx.remove(k);
            assert!(!v2_opens(&key, &dk, &t.token, &ctx), "{d}: without {k}");
            let mut ctx = t.context.clone();
            ctx.get_mut(k).unwrap().push('x');
            assert!(!v2_opens(&key, &dk, &t.token, &ctx), "{d}: changed {k}");
        }
        let mut ctx = t.context.clone();
        ctx.insert("extra".into(), String::new());
        assert!(!v2_opens(&key, &dk, &t.token, &ctx), "{d}: extra pair");

        // Flipped bits in every region: id, nonce, ciphertext, tag.
        let raw = URL_SAFE_NO_PAD.decode(&t.token["enc:v2:".len()..]).unwrap();
        let n = raw.len();
        for at in [0, 15, 16, 27, 28, n - 17, n - 16, n - 1] {
            for bit in [0x01u8, 0x80] {
                let mut bad = raw.clone();
                bad[at] ^= bit;
                let forged = format!("enc:v2:{}", URL_SAFE_NO_PAD.encode(&bad));
                assert!(
                    !v2_opens(&key, &dk, &forged, &t.context),
                    "{d}: flip {bit:#x} at {at}"
                );
            }
        }
        // Truncated, extended, re-encoded, or under another prefix.
        for cut in [1, 16, n - 44, n - 28, n] {
            let forged = format!("enc:v2:{}", URL_SAFE_NO_PAD.encode(&raw[..n - cut]));
            assert!(!v2_opens(&key, &dk, &forged, &t.context), "{d}: cut {cut}");
        }
        let forged = format!(
            "enc:v2:{}",
            URL_SAFE_NO_PAD.encode([&raw[..], &[0]].concat())
        );
        assert!(
            !v2_opens(&key, &dk, &forged, &t.context),
            "{d}: trailing byte"
        );
        for suffix in ["=", "==", " ", "\n", "*"] {
            let forged = format!("{}{suffix}", t.token);
            assert!(
                !v2_opens(&key, &dk, &forged, &t.context),
                "{d}: suffix {suffix:?}"
            );
        }
        let padded = format!("enc:v2:{}", B64.encode(&raw));
        if padded != t.token {
            assert!(
                !v2_opens(&key, &dk, &padded, &t.context),
                "{d}: standard base64"
            );
        }
        let body = &t.token["enc:v2:".len()..];
        for prefix in ["enc:v1:", "enc:v3:", "enc:", "ENC:v2:", ""] {
            let forged = format!("{prefix}{body}");
            assert_eq!(
                compact::open(&key, &aad_of(t), &forged).unwrap_err(),
                CompactError::NotAToken,
                "{d}: prefix {prefix:?}"
            );
            assert!(compact::record_id(&forged).is_err());
        }
        // A v2 body is no v1 token.
        assert!(ParsedToken::parse(&format!("enc:v1:{body}")).is_err());
    }
}

fn aad_of(t: &V2TokenVector) -> Vec<u8> {
    reference::canonical(&t.context)
}

/// Record → vault → key service → token, as the proxy reads: the records are put in a
/// directory vault, opened through `KeyService::opening_record_key` with the keyring of
/// `tokens.json` (EDKs unwrapped under the key context plus ep:dk-id, commitment checked),
/// and the key opens the tokens. A missing, pending-shred, foreign-context or forged record
/// fails as FORMAT.md §12.6 says.
#[tokio::test]
async fn v2_records_open_through_key_service() {
    use envelope_proxy::keys::KeyRef;
    use envelope_proxy::keys::vault::{self, Vault};
    let v = load_v2();
    let dir = tempfile::tempdir().unwrap();
    let keyring = install_keyring(&load().keyring, dir.path());
    let service = KeyService::new(
        vec![keyring as Arc<dyn RootKeyProvider>],
        CacheLimits::default(),
        Arc::new(Metrics::new()),
    );
    let vault_dir = dir.path().join("vault");
    let store: Vault = Arc::new(vault::dir::DirVault::new(&vault_dir, "dir:vectors".into()));
    let allowed = vec![
        KeyRef::parse("local:users").unwrap(),
        KeyRef::parse("local:backup").unwrap(),
    ];
    for r in &v.records {
        let doc: VaultDoc = serde_json::from_str(&r.vault_doc).unwrap();
        store.create(&doc).await.unwrap();
    }
    for t in &v.tokens {
        let d = &t.description;
        let r = v2_record(&v, t);
        let id = r.record_id();
        let key_ctx = to_context(&r.key_context);
        let opened = service
            .opening_record_key(&store, &id, &key_ctx, &allowed)
            .await
            .unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(opened.key.id, id);
        assert_eq!(opened.header, r.record().header, "{d}: header");
        let pt = compact::open(&opened.key, &aad_of(t), &t.token).unwrap();
        assert_eq!(&*pt, t.plaintext.as_bytes(), "{d}");
        // The message context contains the key context.
        for (k, val) in &r.key_context {
            assert_eq!(t.context.get(k), Some(val), "{d}");
        }
    }

    // Failures, each on a fresh service (the one above has the records cached).
    let fresh = || {
        let keyring = Keyring::open(
            KeyRef::DEFAULT_BACKEND,
            &dir.path().join("keyring.json"),
            &MasterKeySource::File(dir.path().join("master.key")),
        )
        .unwrap();
        KeyService::new(
            vec![keyring as Arc<dyn RootKeyProvider>],
            CacheLimits::default(),
            Arc::new(Metrics::new()),
        )
    };
    let r = &v.records[0];
    let id = r.record_id();
    let key_ctx = to_context(&r.key_context);
    // Another key context: the record is refused (never redaction).
    let mut other_ctx = r.key_context.clone();
    other_ctx.insert("tenant".into(), "globex".into());
    let e = fresh()
        .opening_record_key(&store, &id, &to_context(&other_ctx), &allowed)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, BackendError::RecordInvalid(_)),
        "foreign context: {e:?}"
    );
    // Not in the vault.
    let e = fresh()
        .opening_record_key(&store, &RecordId([0xee; 16]), &key_ctx, &allowed)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, BackendError::RecordMissing(_)),
        "missing: {e:?}"
    );
    // No EDK under the route's keys.
    let e = fresh()
        .opening_record_key(
            &store,
            &id,
            &key_ctx,
            &[KeyRef::parse("local:other").unwrap()],
        )
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, BackendError::RecordInvalid(_)),
        "other keys: {e:?}"
    );
    // A forged commitment, a record stored under another record's id, a pending shred.
    let current = store.get(&id).await.unwrap().unwrap();
    let mut rec = r.record();
    rec.commitment[0] ^= 1;
    let forged = VaultDoc::new(&rec).unwrap();
    store.replace(&current, &forged).await.unwrap();
    let e = fresh()
        .opening_record_key(&store, &id, &key_ctx, &allowed)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, BackendError::RecordInvalid(_)),
        "commitment: {e:?}"
    );
    let current = store.get(&id).await.unwrap().unwrap();
    let other = &v.records[1];
    let mut swapped: VaultDoc = serde_json::from_str(&other.vault_doc).unwrap();
    swapped.id = r.id.clone();
    store.replace(&current, &swapped).await.unwrap();
    let e = fresh()
        .opening_record_key(&store, &id, &key_ctx, &allowed)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(e, BackendError::RecordInvalid(_)),
        "swapped: {e:?}"
    );
    let current = store.get(&id).await.unwrap().unwrap();
    let mut pending: VaultDoc = serde_json::from_str(&r.vault_doc).unwrap();
    pending.state = "pending_shred".into();
    pending.shred_after = Some(1_900_000_000);
    store.replace(&current, &pending).await.unwrap();
    let e = fresh()
        .opening_record_key(&store, &id, &key_ctx, &allowed)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            BackendError::KeyState {
                state: "pending_shred",
                ..
            }
        ),
        "pending shred: {e:?}"
    );
}

#[test]
#[ignore = "generator: writes a candidate tokens_v2.json under target/, run only on a format change"]
fn generate_v2() {
    let keyring = load().keyring;
    let dk_a: [u8; 32] = fixed("envelope-proxy v2 vectors: data key A");
    let dk_b: [u8; 32] = fixed("envelope-proxy v2 vectors: data key B");
    let id_a: [u8; 16] = fixed("envelope-proxy v2 vectors: record id A");
    let id_b: [u8; 16] = fixed("envelope-proxy v2 vectors: record id B");

    let make_record = |n: usize,
                       description: &str,
                       dk: [u8; 32],
                       id: [u8; 16],
                       key_context: BTreeMap<String, String>,
                       roots: &[(&str, u32)]| {
        let mut r = RecordVector {
            description: description.into(),
            data_key: hex::encode(dk),
            id: hex::encode(id),
            key_context,
            edks: Vec::new(),
            wrap_nonces: Vec::new(),
            token_key: String::new(),
            commitment: String::new(),
            header_hex: String::new(),
            record: String::new(),
            vault_doc: String::new(),
        };
        let bound = r.bound_context();
        for (i, (key_id, version)) in roots.iter().enumerate() {
            let nonce: [u8; 12] = fixed(&format!("envelope-proxy v2 vectors: wrap nonce {n}.{i}"));
            let root = root_key(&keyring, key_id, *version);
            let aad = reference::wrap_aad(key_id, *version, &bound);
            r.edks.push(EdkVector {
                backend: "local".into(),
                key_id: (*key_id).into(),
                key_version: *version,
                blob: hex::encode(reference::wrap(&root, &nonce, &aad, &dk)),
            });
            r.wrap_nonces.push(hex::encode(nonce));
        }
        let rid = RecordId(id);
        r.token_key = hex::encode(reference_v2::derive(&dk, &id).0);
        r.commitment = hex::encode(record::commitment(&dk, &rid));
        let rec = r.record();
        r.header_hex = hex::encode(rec.header.encode().unwrap());
        r.record = hex::encode(rec.encode().unwrap());
        r.vault_doc = serde_json::to_string(&VaultDoc::new(&rec).unwrap()).unwrap();
        r
    };
    let records = vec![
        make_record(
            0,
            "data key A, key context {tenant: acme}, one EDK (users v1)",
            dk_a,
            id_a,
            ctx(&[("tenant", "acme")]),
            &[("users", 1)],
        ),
        make_record(
            1,
            "data key B, empty key context, two EDKs (users v2 and backup v1)",
            dk_b,
            id_b,
            ctx(&[]),
            &[("users", 2), ("backup", 1)],
        ),
    ];

    let mut tokens: Vec<V2TokenVector> = Vec::new();
    let mut case = |description: &str,
                    r: &RecordVector,
                    extra: &[(&str, &str)],
                    plaintext: serde_json::Value| {
        let nonce: [u8; 12] = fixed(&format!(
            "envelope-proxy v2 vectors: nonce {}",
            tokens.len()
        ));
        let mut context = r.key_context.clone();
        context.extend(ctx(extra));
        let plaintext = serde_json::to_string(&plaintext).unwrap();
        let aad = reference::canonical(&context);
        let key = RecordKey::new(&r.data_key(), r.record_id());
        let token = compact::seal_with_nonce(&key, nonce, &aad, plaintext.as_bytes());
        tokens.push(V2TokenVector {
            description: description.into(),
            record_id: r.id.clone(),
            context,
            nonce: hex::encode(nonce),
            plaintext,
            aad_hex: hex::encode(&aad),
            token,
        });
    };
    let (a, b) = (&records[0], &records[1]);
    case(
        "a JSON string (the 11-character SSN: 13 bytes, an 83-character token)",
        a,
        &[("id", "42"), ("ep:field", "$.ssn")],
        serde_json::json!("123-45-6789"),
    );
    case(
        "a JSON number",
        a,
        &[("id", "42"), ("ep:field", "$.balance")],
        serde_json::json!(-1234.5),
    );
    case(
        "a JSON object (key order preserved, non-ASCII text); context keys sort bytewise",
        a,
        &[("app", "crm"), ("id", "42"), ("ep:field", "$.address")],
        serde_json::json!({
            "street": "1 Main St", "city": "Zürich", "zip": "8001",
            "tags": ["home", "billing"], "primary": true, "unit": null,
        }),
    );
    case(
        "an empty JSON string (plaintext is the two bytes \"\")",
        a,
        &[("ep:field", "$.nickname")],
        serde_json::json!(""),
    );
    case(
        "null",
        a,
        &[("id", "43"), ("ep:field", "$.ssn")],
        serde_json::Value::Null,
    );
    case(
        "a 2050-byte JSON string (no chunking in v2: one AES-GCM message)",
        a,
        &[("id", "42"), ("ep:field", "$.notes")],
        serde_json::json!("0123456789abcdef".repeat(128)),
    );
    case(
        "a record with two EDKs and an empty key context",
        b,
        &[("ep:field", "$.card.number")],
        serde_json::json!("4111111111111111"),
    );
    case(
        "the same record, another field",
        b,
        &[("id", "7"), ("ep:field", "$.profile")],
        serde_json::json!({"name": "Ada", "born": 1815}),
    );

    let out = V2Vectors {
        comment: vec![
            "Golden vectors for format v2 (docs/FORMAT.md §12): data-key records and enc:v2: tokens.".into(),
            "Checked on every test run by tests/vectors.rs. Never edit: a format change needs a new version.".into(),
            "Bytes are lowercase hex. The EDKs wrap data_key under root keys of the keyring in tokens.json, \
             with the key context plus ep:dk-id = id as the context (FORMAT.md §6.1, §12.3)."
                .into(),
            "A token's AAD is canonical(context); its key is the token key of the record it names (record_id).".into(),
        ],
        records,
        tokens,
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tokens_v2.candidate.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}
