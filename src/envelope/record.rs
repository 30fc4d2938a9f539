//! Data-key records (format v2): a data key's wrapped forms, stored once in a key vault instead
//! of in every token (see [`super::compact`] and `docs/FORMAT.md` §12).
//!
//! ```text
//! record     = "EPDK" ‖ version (u8, = 1) ‖ id (16) ‖ commitment (32) ‖
//!              u32be len ‖ canonical(key context) ‖ header (§2)
//! PRK        = HKDF-Extract-SHA-256(salt = "envelope-proxy/dk-record/v1", ikm = data key)
//! token key  = HKDF-Expand-SHA-256(PRK, "token key" ‖ id, 32)
//! commitment = HKDF-Expand-SHA-256(PRK, "commitment" ‖ id, 32)
//! ```
//!
//! The EDKs in the header are wrapped under the key context plus `ep:dk-id = hex(id)`
//! ([`backend_context`]), so a record moved to another id does not unwrap. The commitment ties
//! the id to one data key: whatever EDKs a record carries (a rewrap replaces them), the key they
//! unwrap to must match it, or nothing opens. A record's id, data key and commitment never
//! change.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::hkdf;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Context;
use super::header::{Header, HeaderError};

pub const MAGIC: &[u8; 4] = b"EPDK";
pub const VERSION: u8 = 1;
pub const ID_LEN: usize = 16;
pub const COMMITMENT_LEN: usize = 32;
/// The context key under which a record's id is bound into its EDKs.
pub const ID_KEY: &str = "ep:dk-id";
/// Most messages one data key seals with the v2 token (random-looking 96-bit nonces: NIST's
/// bound for nonces that are not a strict counter is 2^32 per key).
pub const MAX_MESSAGES: u64 = 1 << 32;

const SALT: &[u8] = b"envelope-proxy/dk-record/v1";

/// A data-key id: 16 random bytes, written as 32 lowercase hex digits in vault paths.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub [u8; ID_LEN]);

impl RecordId {
    pub fn generate() -> Self {
        let mut id = [0u8; ID_LEN];
        super::fill_random(&mut id);
        RecordId(id)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 32 hex digits (either case); anything else is `None`.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != ID_LEN * 2 {
            return None;
        }
        let mut id = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(RecordId(id))
    }
}

impl std::fmt::Debug for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordId({})", self.hex())
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// The context the backends bind a record's EDKs to: the key context and the record id.
pub fn backend_context(key_context: &Context, id: &RecordId) -> Context {
    let mut ctx = key_context.clone();
    ctx.insert(ID_KEY, id.hex());
    ctx
}

/// A data-key record as stored (nothing in it is secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: RecordId,
    pub commitment: [u8; COMMITMENT_LEN],
    pub key_context: Context,
    pub header: Header,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a data-key record")]
    Magic,
    #[error("unsupported record version {0}")]
    Version(u8),
    #[error("truncated record")]
    Truncated,
    #[error("record key context is malformed")]
    Context,
    #[error("record header: {0}")]
    Header(#[from] HeaderError),
    #[error("trailing bytes after the record")]
    Trailing,
}

impl Record {
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let header = self.header.encode()?;
        let ctx = self.key_context.canonical();
        let mut out =
            Vec::with_capacity(4 + 1 + ID_LEN + COMMITMENT_LEN + 4 + ctx.len() + header.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.commitment);
        let len = u32::try_from(ctx.len()).map_err(|_| RecordError::Context)?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&ctx);
        out.extend_from_slice(&header);
        Ok(out)
    }

    /// Parse a record. `bytes` come from the vault: attacker controlled, never panics.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(RecordError::Magic)?;
        let (&version, rest) = rest.split_first().ok_or(RecordError::Truncated)?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        let (id, rest) = rest
            .split_at_checked(ID_LEN)
            .ok_or(RecordError::Truncated)?;
        let (commitment, rest) = rest
            .split_at_checked(COMMITMENT_LEN)
            .ok_or(RecordError::Truncated)?;
        let (len, rest) = rest.split_at_checked(4).ok_or(RecordError::Truncated)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| RecordError::Truncated)?) as usize;
        let (ctx, rest) = rest.split_at_checked(len).ok_or(RecordError::Truncated)?;
        let key_context = Context::from_canonical(ctx).ok_or(RecordError::Context)?;
        let (header, used) = Header::decode(rest)?;
        if used != rest.len() {
            return Err(RecordError::Trailing);
        }
        Ok(Record {
            id: RecordId(id.try_into().map_err(|_| RecordError::Truncated)?),
            commitment: commitment.try_into().map_err(|_| RecordError::Truncated)?,
            key_context,
            header,
        })
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The token key and commitment of data key `data_key` under record `id`.
fn derive(data_key: &[u8; 32], id: &RecordId) -> (Zeroizing<[u8; 32]>, [u8; COMMITMENT_LEN]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(data_key);
    let mut token_key = Zeroizing::new([0u8; 32]);
    let mut commitment = [0u8; COMMITMENT_LEN];
    for (label, out) in [
        (&b"token key"[..], token_key.as_mut_slice()),
        (&b"commitment"[..], commitment.as_mut_slice()),
    ] {
        let info = [label, &id.0[..]];
        prk.expand(&info, Len(32))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF-SHA-256 gives 32 bytes");
    }
    (token_key, commitment)
}

/// The commitment to `data_key` for record `id` (what a new record stores).
pub fn commitment(data_key: &[u8; 32], id: &RecordId) -> [u8; COMMITMENT_LEN] {
    derive(data_key, id).1
}

/// A data key ready to seal and open v2 tokens: the AES-256-GCM key derived for its record.
pub struct RecordKey {
    pub id: RecordId,
    pub(super) cipher: LessSafeKey,
    nonce_base: [u8; 12],
    sealed: AtomicU64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordKey({}, [SENSITIVE])", self.id)
    }
}

impl RecordKey {
    /// The key of a record whose data key is `data_key`, checked against the record's
    /// commitment (in constant time): `None` when it does not match.
    pub fn open(data_key: &[u8; 32], record: &Record) -> Option<RecordKey> {
        let (token_key, commitment) = derive(data_key, &record.id);
        if !bool::from(commitment.ct_eq(&record.commitment)) {
            return None;
        }
        Some(Self::with(record.id, &token_key))
    }

    /// The key of a new record (the commitment is computed from the same key).
    pub fn new(data_key: &[u8; 32], id: RecordId) -> RecordKey {
        let (token_key, _) = derive(data_key, &id);
        Self::with(id, &token_key)
    }

    fn with(id: RecordId, token_key: &[u8; 32]) -> RecordKey {
        let mut nonce_base = [0u8; 12];
        super::fill_random(&mut nonce_base);
        RecordKey {
            id,
            cipher: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, token_key).expect("AES-256-GCM takes 32 bytes"),
            ),
            nonce_base,
            sealed: AtomicU64::new(0),
        }
    }

    /// Count `n` messages as sealed (tests: a key near its nonce limit).
    #[cfg(test)]
    pub(crate) fn count_sealed(&self, n: u64) {
        self.sealed.fetch_add(n, Ordering::Relaxed);
    }

    /// How many more messages this key may seal (its nonces left).
    pub fn remaining(&self) -> u64 {
        MAX_MESSAGES.saturating_sub(self.sealed.load(Ordering::Relaxed))
    }

    /// A fresh nonce: a random per-key base XOR a counter, so nonces never repeat under one
    /// key in this process (the only one that seals with it). `None` past [`MAX_MESSAGES`].
    pub(super) fn next_nonce(&self) -> Option<[u8; 12]> {
        let n = self.sealed.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_MESSAGES {
            return None;
        }
        let mut nonce = self.nonce_base;
        for (b, c) in nonce[4..].iter_mut().zip(n.to_be_bytes()) {
            *b ^= c;
        }
        Some(nonce)
    }
}

/// A well-formed record of key context `tenant=TENANT` whose EDK opens under no key (tests of
/// what stores and management do with records, not of opening them).
#[cfg(test)]
pub(crate) fn sample_record(tenant: &str) -> Record {
    Record {
        id: RecordId::generate(),
        commitment: [7; COMMITMENT_LEN],
        key_context: [("tenant", tenant)].into_iter().collect(),
        header: Header {
            edks: vec![crate::envelope::WrappedKey {
                backend: "local".into(),
                key_id: "users".into(),
                key_version: 1,
                blob: vec![1; 40],
            }],
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::WrappedKey;
    use proptest::prelude::*;

    fn record() -> Record {
        let dk = [7u8; 32];
        let id = RecordId([3; 16]);
        Record {
            id,
            commitment: commitment(&dk, &id),
            key_context: [("tenant", "acme")].into_iter().collect(),
            header: Header {
                edks: vec![WrappedKey {
                    backend: "local".into(),
                    key_id: "users".into(),
                    key_version: 2,
                    blob: vec![9; 60],
                }],
            },
        }
    }

    #[test]
    fn round_trip_and_commitment() {
        let r = record();
        let bytes = r.encode().unwrap();
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        assert!(RecordKey::open(&[7u8; 32], &r).is_some());
        assert!(RecordKey::open(&[8u8; 32], &r).is_none(), "another key");
        let mut moved = r.clone();
        moved.id = RecordId([4; 16]);
        assert!(RecordKey::open(&[7u8; 32], &moved).is_none(), "another id");
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Record::decode(&long), Err(RecordError::Trailing));
    }

    #[test]
    fn ids_in_hex() {
        let id = RecordId::generate();
        assert_eq!(RecordId::parse_hex(&id.hex()), Some(id));
        assert_eq!(RecordId::parse_hex(&id.hex().to_uppercase()), Some(id));
        for bad in ["", "00", &"g".repeat(32), &"0".repeat(33)] {
            assert_eq!(RecordId::parse_hex(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Record::decode(&b);
            let mut framed = MAGIC.to_vec();
            framed.push(VERSION);
            framed.extend_from_slice(&b);
            let _ = Record::decode(&framed);
        }
    }
}
