//! Golden vectors for the on-storage formats (docs/FORMAT.md), in `tests/vectors/tokens.json`.
//!
//! Every check runs on every `cargo test`: the stored tokens, EDK blobs and keyring file must be
//! reproduced byte for byte by the current code, open with it, and open with the independent
//! reference decoder in this file (written from FORMAT.md alone, using only the primitives).
//! If any of these fails, the on-storage format changed: that needs a new version (FORMAT.md
//! §7), never an edit of the vectors.
//!
//! To regenerate after an intentional, versioned change (never otherwise):
//! `cargo test --test vectors -- --ignored generate`, then review and copy the file it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use envelope_proxy::envelope::chunked;
use envelope_proxy::envelope::header::HeaderError;
use envelope_proxy::envelope::token::{self, ParsedToken, TokenError};
use envelope_proxy::envelope::{Context, Header, WrappedKey};
use envelope_proxy::keys::keyring::{Keyring, KeyringError, MasterKeySource};
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
