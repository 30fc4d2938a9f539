//! Streaming seal and open of C2SP chunked messages ([`super::chunked`]), in constant memory.
//!
//! The one-shot [`chunked::seal`]/[`chunked::open`] need the whole message in memory. The types
//! here produce and consume the very same bytes piece by piece, for bodies of any size (object
//! storage, multi-GiB uploads), holding at most one chunk (16 KiB plaintext, 16400 sealed bytes)
//! whatever the input size. They are plain synchronous state machines: the caller drives them
//! from its body stream (`push` each frame as it arrives, `finish` at the end of the stream) and
//! forwards what they append to `out`.
//!
//! ```text
//! stored message = header (56: salt ‖ commitment) ‖ chunk_0 ‖ … ‖ chunk_n
//! chunk_i        = AES-256-GCM(P_i) ‖ tag        16400 bytes for i < n; 16..=16399 for i = n
//! chunk k starts at stored offset 56 + 16400·k
//! ```
//!
//! # Sealing: [`Sealer`]
//!
//! [`Sealer::header`] is written first, then whatever [`Sealer::push`] and [`Sealer::finish`]
//! append. `push` seals every chunk as soon as 16384 plaintext bytes have accumulated (a full
//! chunk is never the last one, so no look-ahead is needed) and keeps the remainder, fewer than
//! 16384 bytes, in a buffer allocated once and wiped on drop. `finish` seals that remainder as
//! the final, short, possibly empty chunk. The output is byte-identical to
//! [`chunked::seal_with_salt`] for any way of splitting the input. A `Sealer` dropped without
//! `finish` leaves a message that ends on a full chunk or mid-chunk, which never opens: an
//! aborted upload cannot be mistaken for a complete, shorter one.
//!
//! # Opening: [`Opener`]
//!
//! [`Opener::new`] takes the 56-byte header and checks the key commitment (constant time)
//! before anything is decrypted: a wrong key or context fails there. [`Opener::push`] then takes
//! the stored bytes that follow, in frames of any size, and appends the plaintext of each chunk
//! once it has authenticated **and** is known not to be the last one. That second condition is
//! the subtle part. Chunk boundaries follow from lengths alone, but whether a complete 16400-byte
//! chunk is the end of the message is only known from what comes after it: if the stored bytes
//! stop right there, the message was truncated at a chunk boundary (the final chunk is always
//! short) and must be rejected. So the opener holds back the most recent complete chunk until it
//! sees at least one more byte (proof that the chunk is not final, since more bytes can only
//! follow a full chunk) or until [`Opener::finish`], which opens the final short chunk and fails
//! if the stream ends on a full chunk, mid-tag, or with no final chunk at all.
//!
//! State, between calls: `pending` holds the bytes of the current chunk, 0 to 16400 of them;
//! `next_index` is that chunk's index (its nonce). A `push` that meets an error poisons the
//! opener: every later `push` and `finish` returns the same error.
//!
//! # Ranged reads
//!
//! Chunks are independently authenticated at their position (the index is in the nonce), so a
//! plaintext byte range can be served by fetching and opening only the chunks that cover it,
//! plus the 56-byte header. [`chunk_range_for`] maps a plaintext range to those chunks and the
//! stored byte range to fetch; [`Opener::for_range`] opens exactly those chunks and trims the
//! output to the requested bytes. The lower-level constructors are [`Opener::at_chunk`] (from
//! chunk `k` to the end of the message) and [`Opener::range`] (chunks `first..=last`, with the
//! caller saying whether `last` is the message's final chunk; when it is not, the stream must
//! end exactly on chunk `last`, which is then full, and ending there is not a truncation).
//!
//! # Attacker model
//!
//! The attacker controls the stored bytes: the header, every chunk, the length, the size the
//! storage reports, and how the bytes are cut into frames (including a range response longer or
//! shorter than asked for). It does not know the data key. The key and the context come from
//! trusted sources. Then:
//!
//! - Nothing here panics on any input (lengths and indices use checked arithmetic), and the
//!   state kept between calls never exceeds one chunk; what a call appends to `out` is bounded
//!   by the input it was given plus that one chunk.
//! - Plaintext is appended to `out` only in whole chunks that authenticated at the expected
//!   index under the committed key. A failed chunk leaves `out` as it was (the bytes it
//!   decrypted into are zeroed, then truncated off).
//! - Reordered, duplicated, dropped or modified chunks fail authentication; a stream that ends
//!   on a chunk boundary, mid-chunk or before the expected last chunk fails at `finish`; bytes
//!   past the expected end fail at `push` (ranges) or `finish` (whole messages, where they make
//!   the final chunk fail to authenticate or end the stream on a full chunk).
//! - **Streaming releases plaintext before the end is verified.** A reader of a stream that
//!   later fails has received an authentic but possibly incomplete prefix. A consumer must turn
//!   a failed `push`/`finish` into a visible failure, never a clean end of body: abort the
//!   response (HTTP/1.1: close without the terminating chunk, or short of `Content-Length`;
//!   HTTP/2: `RST_STREAM`), and never report success before `finish` returned `Ok`.
//! - A ranged read that does not include the message's final chunk does not authenticate the
//!   message's total length (it only proves the chunks it read). A gateway that reports the
//!   total (`Content-Range: bytes a-b/TOTAL`) from the storage's size should authenticate it by
//!   also opening the final chunk (at most 16399 + 16 bytes), e.g. with a second
//!   [`Opener::range`]`(n, n, true)` where `n = ⌊total / 16384⌋`. [`Opener::for_range`] checks
//!   the final chunk's length against the range's `plain_total` whenever the range includes it.
//!
//! [`chunked::seal`]: super::chunked::seal
//! [`chunked::open`]: super::chunked::open
//! [`chunked::seal_with_salt`]: super::chunked::seal_with_salt

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::chunked::{
    CHUNK_SIZE, HEADER_LEN, MessageKeys, OpenError, SALT_LEN, SEALED_CHUNK_SIZE, TAG_LEN,
};

/// Streaming sealer; see the [module docs](self).
pub struct Sealer {
    keys: MessageKeys,
    header: [u8; HEADER_LEN],
    next_index: u64,
    /// Plaintext of the chunk being filled: fewer than `CHUNK_SIZE` bytes between calls. Its
    /// capacity is allocated once (never reallocated, so no copy is left behind) and wiped on
    /// drop.
    pending: Zeroizing<Vec<u8>>,
}

impl Sealer {
    /// A sealer for a new message, with a fresh random salt from the OS CSPRNG.
    pub fn new(ikm: &[u8; 32], context: &[u8]) -> Sealer {
        let mut salt = [0u8; SALT_LEN];
        crate::envelope::fill_random(&mut salt);
        Sealer::with_salt(ikm, &salt, context)
    }

    /// A sealer with a caller-chosen salt. Only for tests and vectors: a repeated salt under one
    /// key repeats every nonce.
    pub fn with_salt(ikm: &[u8; 32], salt: &[u8; SALT_LEN], context: &[u8]) -> Sealer {
        let keys = MessageKeys::derive(ikm, salt, context);
        let mut header = [0u8; HEADER_LEN];
        header[..SALT_LEN].copy_from_slice(salt);
        header[SALT_LEN..].copy_from_slice(keys.commitment());
        Sealer {
            keys,
            header,
            next_index: 0,
            pending: Zeroizing::new(Vec::with_capacity(CHUNK_SIZE)),
        }
    }

    /// The first 56 bytes of the message: salt ‖ commitment.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.header
    }

    /// Take more plaintext; append the sealed form of every chunk it completes to `out`.
    /// Appends at most `input.len() + self.buffered() + 16·(chunks completed)` bytes.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            let take = (CHUNK_SIZE - self.pending.len()).min(input.len());
            let (head, rest) = input.split_at(take);
            self.pending.extend_from_slice(head);
            input = rest;
            if self.pending.len() < CHUNK_SIZE {
                return;
            }
            seal_into(&self.keys, self.next_index, &self.pending, out);
            self.next_index += 1;
            self.pending.clear();
        }
        // Whole chunks straight from the input, without going through `pending`.
        let mut chunks = input.chunks_exact(CHUNK_SIZE);
        for chunk in &mut chunks {
            seal_into(&self.keys, self.next_index, chunk, out);
            // 2^64 chunks would be 2^78 bytes: the index cannot wrap.
            self.next_index += 1;
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    /// Seal the final chunk (the buffered remainder, 0 to 16383 bytes) and append it to `out`.
    pub fn finish(self, out: &mut Vec<u8>) {
        seal_into(&self.keys, self.next_index, &self.pending, out);
    }

    /// Plaintext bytes held, waiting for their chunk to fill: always below 16384 between calls.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// The most [`push`](Self::push) of `input_len` bytes (or [`finish`](Self::finish), with
    /// 0) appends: size `out` with it and it is never reallocated.
    pub fn output_bound(&self, input_len: usize) -> usize {
        let total = self.pending.len() + input_len;
        total + TAG_LEN * (total / CHUNK_SIZE + 1)
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("next_index", &self.next_index)
            .field("buffered", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Copy `plaintext` to the end of `out`, seal it there in place as chunk `index`, append the tag.
fn seal_into(keys: &MessageKeys, index: u64, plaintext: &[u8], out: &mut Vec<u8>) {
    // Reserve first, so the plaintext is never left behind in a reallocated buffer.
    out.reserve(plaintext.len() + TAG_LEN);
    let at = out.len();
    out.extend_from_slice(plaintext);
    let tag = keys.seal_chunk(index, &mut out[at..]);
    out.extend_from_slice(&tag);
}

/// Copy the ciphertext of `sealed` (chunk `index`, tag included) to the end of `out` and open
/// it there in place. On failure `out` is left as it was. Returns where the plaintext starts.
fn open_into(
    keys: &MessageKeys,
    index: u64,
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, OpenError> {
    let body_len = sealed
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(OpenError::Truncated)?;
    let (body, tag) = sealed.split_at(body_len);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Truncated)?;
    // `out` holds plaintext: growing it must not leave a copy in the freed buffer. Callers
    // size it with `output_bound`; this is the backstop.
    if out.capacity() - out.len() < body.len() {
        let mut bigger = Vec::with_capacity((out.len() + body.len()).max(2 * out.capacity()));
        bigger.extend_from_slice(out);
        zeroize::Zeroize::zeroize(out);
        *out = bigger;
    }
    let at = out.len();
    out.extend_from_slice(body);
    if let Err(e) = keys.open_chunk(index, &mut out[at..], tag) {
        out[at..].fill(0);
        out.truncate(at);
        return Err(e);
    }
    Ok(at)
}

/// Where the stream of chunks given to an [`Opener`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// At the end of the message: the last chunk is the short final one.
    Message,
    /// After chunk `last`, which is full unless `last_is_final`.
    Chunk { last: u64, last_is_final: bool },
}

/// Trimming of the plaintext to a requested byte range ([`Opener::for_range`]).
#[derive(Debug, Clone, Copy)]
struct Trim {
    /// Plaintext bytes still to drop at the front.
    skip: u64,
    /// Plaintext bytes still to emit.
    keep: u64,
    /// Expected plaintext length of the message's final chunk, when the range includes it.
    final_plain_len: Option<u64>,
}

/// Streaming opener; see the [module docs](self).
pub struct Opener {
    keys: MessageKeys,
    /// Index (nonce) of the chunk that `pending` is filling.
    next_index: u64,
    /// Sealed bytes of the current chunk, at most `SEALED_CHUNK_SIZE`; exactly that many means a
    /// complete chunk held back until we know whether it is the last one.
    pending: Vec<u8>,
    end: End,
    trim: Option<Trim>,
    /// Set by the first error; every later call returns it.
    failed: Option<OpenError>,
}

impl Opener {
    /// An opener for a whole message, given its first 56 bytes. Fails with
    /// [`OpenError::Commitment`] for a wrong key or context, before decrypting anything.
    pub fn new(
        ikm: &[u8; 32],
        context: &[u8],
        header: &[u8; HEADER_LEN],
    ) -> Result<Opener, OpenError> {
        Opener::build(ikm, context, header, 0, End::Message, None)
    }

    /// An opener for the stored bytes from chunk `first_chunk` (stored offset
    /// `56 + 16400·first_chunk`) to the end of the message. The bytes fed must run to the end of
    /// the message: its final, short chunk is checked at [`finish`](Opener::finish).
    pub fn at_chunk(
        ikm: &[u8; 32],
        context: &[u8],
        header: &[u8; HEADER_LEN],
        first_chunk: u64,
    ) -> Result<Opener, OpenError> {
        Opener::build(ikm, context, header, first_chunk, End::Message, None)
    }

    /// An opener for exactly the chunks `first_chunk..=last_chunk` (stored bytes from offset
    /// `56 + 16400·first_chunk`), emitting their whole plaintext.
    ///
    /// `is_final_chunk_of_object` says whether `last_chunk` is the message's final chunk
    /// (`⌊plaintext length / 16384⌋`), known from the object's size:
    ///
    /// - `true`: chunks before `last_chunk` must be full and `last_chunk` must be short (16 to
    ///   16399 stored bytes), as for [`at_chunk`](Opener::at_chunk), and exactly
    ///   `last_chunk − first_chunk + 1` chunks must arrive.
    /// - `false`: every chunk must be full and the stream must end exactly after `last_chunk`;
    ///   ending on that full chunk is then expected, not a truncation.
    ///
    /// Without lookahead being needed, each chunk is emitted as soon as it has authenticated.
    /// Bytes past the last chunk fail at [`push`](Opener::push); too few fail at `finish`. Fails
    /// with [`OpenError::Truncated`] if `last_chunk < first_chunk`.
    pub fn range(
        ikm: &[u8; 32],
        context: &[u8],
        header: &[u8; HEADER_LEN],
        first_chunk: u64,
        last_chunk: u64,
        is_final_chunk_of_object: bool,
    ) -> Result<Opener, OpenError> {
        if last_chunk < first_chunk {
            return Err(OpenError::Truncated);
        }
        let end = End::Chunk {
            last: last_chunk,
            last_is_final: is_final_chunk_of_object,
        };
        Opener::build(ikm, context, header, first_chunk, end, None)
    }

    /// An opener for a plaintext byte range planned by [`chunk_range_for`]: feed it the stored
    /// bytes `range.stored_start..=range.stored_end_inclusive` and it emits exactly the
    /// `range.plain_len` requested plaintext bytes (dropping `skip_in_first_chunk` at the front
    /// and what follows the range in the last chunk). When the range includes the message's
    /// final chunk, that chunk's length must also match `range.plain_total`. Fails with
    /// [`OpenError::Truncated`] for a `ChunkRange` that `chunk_range_for` would not produce.
    pub fn for_range(
        ikm: &[u8; 32],
        context: &[u8],
        header: &[u8; HEADER_LEN],
        range: &ChunkRange,
    ) -> Result<Opener, OpenError> {
        let start = range
            .first_chunk
            .checked_mul(CHUNK_SIZE as u64)
            .and_then(|s| s.checked_add(range.skip_in_first_chunk));
        let end = start
            .and_then(|s| s.checked_add(range.plain_len))
            .and_then(|e| e.checked_sub(1));
        match (start, end) {
            (Some(s), Some(e)) if chunk_range_for(s, e, range.plain_total) == Some(*range) => {}
            _ => return Err(OpenError::Truncated),
        }
        let end = End::Chunk {
            last: range.last_chunk,
            last_is_final: range.last_is_final,
        };
        let trim = Trim {
            skip: range.skip_in_first_chunk,
            keep: range.plain_len,
            final_plain_len: range
                .last_is_final
                .then(|| range.plain_total % CHUNK_SIZE as u64),
        };
        Opener::build(ikm, context, header, range.first_chunk, end, Some(trim))
    }

    fn build(
        ikm: &[u8; 32],
        context: &[u8],
        header: &[u8; HEADER_LEN],
        first_chunk: u64,
        end: End,
        trim: Option<Trim>,
    ) -> Result<Opener, OpenError> {
        let (salt, commitment) = header.split_at(SALT_LEN);
        let salt: &[u8; SALT_LEN] = salt.try_into().map_err(|_| OpenError::Truncated)?;
        let keys = MessageKeys::derive(ikm, salt, context);
        if !bool::from(keys.commitment().ct_eq(commitment)) {
            return Err(OpenError::Commitment);
        }
        Ok(Opener {
            keys,
            next_index: first_chunk,
            pending: Vec::with_capacity(SEALED_CHUNK_SIZE),
            end,
            trim,
            failed: None,
        })
    }

    /// Take more stored bytes; append the plaintext of every chunk that is complete, has
    /// authenticated and is known not to be the final one. On error nothing more is appended
    /// and the opener is poisoned.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), OpenError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.push_inner(input, out);
        if let Err(e) = result {
            self.failed = Some(e);
            self.pending.clear();
        }
        result
    }

    fn push_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), OpenError> {
        // Whether a complete chunk can be opened without seeing what follows: in a range with
        // a known last chunk, the index alone says whether a full chunk is allowed here.
        let bounded = matches!(self.end, End::Chunk { .. });
        while !input.is_empty() {
            if self.pending.len() == SEALED_CHUNK_SIZE {
                // A held-back full chunk followed by more bytes: it is not the final one.
                self.open_pending_full(out)?;
            }
            if let End::Chunk { last, .. } = self.end
                && self.next_index > last
            {
                // Bytes past the last chunk of the range.
                return Err(OpenError::Truncated);
            }
            if self.pending.is_empty()
                && input.len() >= SEALED_CHUNK_SIZE
                && (bounded || input.len() > SEALED_CHUNK_SIZE)
            {
                // A whole chunk in the input (followed by more, or in a range): open it
                // straight from there.
                let (chunk, rest) = input.split_at(SEALED_CHUNK_SIZE);
                self.check_full_allowed()?;
                let at = open_into(&self.keys, self.next_index, chunk, out)?;
                self.advance(out, at)?;
                input = rest;
                continue;
            }
            let take = (SEALED_CHUNK_SIZE - self.pending.len()).min(input.len());
            let (head, rest) = input.split_at(take);
            self.pending.extend_from_slice(head);
            input = rest;
            if bounded && self.pending.len() == SEALED_CHUNK_SIZE {
                self.open_pending_full(out)?;
            }
        }
        Ok(())
    }

    /// A full chunk may sit at `next_index`: always in a whole message (the caller has seen
    /// that more bytes follow); in a range, before the last chunk, or at it if it is not final.
    fn check_full_allowed(&self) -> Result<(), OpenError> {
        match self.end {
            End::Message => Ok(()),
            End::Chunk {
                last,
                last_is_final,
            } => {
                if self.next_index < last || (self.next_index == last && !last_is_final) {
                    Ok(())
                } else {
                    Err(OpenError::Truncated)
                }
            }
        }
    }

    fn open_pending_full(&mut self, out: &mut Vec<u8>) -> Result<(), OpenError> {
        self.check_full_allowed()?;
        let at = open_into(&self.keys, self.next_index, &self.pending, out)?;
        self.pending.clear();
        self.advance(out, at)
    }

    /// After chunk `next_index` opened into `out[at..]`: trim it to the requested range and
    /// move to the next index.
    fn advance(&mut self, out: &mut Vec<u8>, at: usize) -> Result<(), OpenError> {
        if let Some(trim) = &mut self.trim {
            let produced = out.len().saturating_sub(at);
            let skip = usize::try_from(trim.skip)
                .unwrap_or(usize::MAX)
                .min(produced);
            if skip > 0 {
                out.drain(at..at + skip);
                trim.skip -= skip as u64;
            }
            let produced = out.len().saturating_sub(at);
            let keep = usize::try_from(trim.keep)
                .unwrap_or(usize::MAX)
                .min(produced);
            out.truncate(at + keep);
            trim.keep -= keep as u64;
        }
        self.next_index = self
            .next_index
            .checked_add(1)
            .ok_or(OpenError::Chunk(u64::MAX))?;
        Ok(())
    }

    /// End of the stored bytes: open the final chunk if this stream ends with one, and check
    /// that the stream ended where it must. Fails with [`OpenError::Truncated`] if it ends on a
    /// full chunk of a whole message (truncation at a chunk boundary), mid-chunk, with no final
    /// chunk, or before the last chunk of a range.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), OpenError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let ends_on_final = match self.end {
            End::Message => true,
            End::Chunk {
                last,
                last_is_final: true,
            } => {
                if self.next_index != last {
                    return Err(OpenError::Truncated);
                }
                true
            }
            End::Chunk {
                last,
                last_is_final: false,
            } => {
                if last.checked_add(1) != Some(self.next_index) || !self.pending.is_empty() {
                    return Err(OpenError::Truncated);
                }
                false
            }
        };
        if ends_on_final {
            let len = self.pending.len();
            if !(TAG_LEN..SEALED_CHUNK_SIZE).contains(&len) {
                return Err(OpenError::Truncated);
            }
            if let Some(Trim {
                final_plain_len: Some(expected),
                ..
            }) = self.trim
                && (len - TAG_LEN) as u64 != expected
            {
                return Err(OpenError::Truncated);
            }
            let at = open_into(&self.keys, self.next_index, &self.pending, out)?;
            self.pending.clear();
            self.advance(out, at)?;
        }
        match self.trim {
            Some(Trim { keep, .. }) if keep != 0 => Err(OpenError::Truncated),
            _ => Ok(()),
        }
    }

    /// Stored bytes held: the current, incomplete or held-back chunk, at most 16400.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// The most [`push`](Self::push) of `input_len` stored bytes (or [`finish`](Self::finish),
    /// with 0) appends: size `out` with it and it is never reallocated, so no plaintext is left
    /// behind in a freed buffer.
    pub fn output_bound(&self, input_len: usize) -> usize {
        self.pending.len() + input_len
    }

    /// Index of the chunk the next stored bytes belong to.
    pub fn next_chunk(&self) -> u64 {
        self.next_index
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("next_index", &self.next_index)
            .field("buffered", &self.pending.len())
            .field("end", &self.end)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// The stored bytes needed for a plaintext byte range, from [`chunk_range_for`]. Offsets are
/// into the stored message (the 56-byte header included), so they are what an HTTP `Range`
/// request to the storage asks for. The header itself (bytes `0..56`) must be fetched too; when
/// `first_chunk` is 0 a single request for `0..=stored_end_inclusive` gets both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    /// Index of the first chunk covering the range.
    pub first_chunk: u64,
    /// Index of the last chunk covering the range.
    pub last_chunk: u64,
    /// Stored offset of `first_chunk`: `56 + 16400·first_chunk`.
    pub stored_start: u64,
    /// Stored offset of the last byte of `last_chunk` (its tag's last byte).
    pub stored_end_inclusive: u64,
    /// Plaintext bytes of `first_chunk` before the range starts, to drop (below 16384).
    pub skip_in_first_chunk: u64,
    /// Plaintext bytes in the range, to keep in total: `plain_end − plain_start + 1`.
    pub plain_len: u64,
    /// Whether `last_chunk` is the message's final (short) chunk.
    pub last_is_final: bool,
    /// The message's plaintext length the range was planned for.
    pub plain_total: u64,
}

impl ChunkRange {
    /// Number of stored bytes to fetch (after the header).
    pub fn stored_len(&self) -> u64 {
        self.stored_end_inclusive - self.stored_start + 1
    }
}

/// Plan a ranged read: the whole chunks covering plaintext bytes
/// `plain_start..=plain_end_inclusive` of a message with `plain_total` plaintext bytes, where
/// they are stored, and what to trim. `None` if the range is empty, inverted or not within the
/// plaintext (`plain_end_inclusive >= plain_total`; an HTTP gateway answers 416), or if the
/// offsets would not fit in a `u64`. Suffix (`bytes=-n`) and open (`bytes=a-`) HTTP ranges are
/// resolved against `plain_total` by the caller first.
pub fn chunk_range_for(
    plain_start: u64,
    plain_end_inclusive: u64,
    plain_total: u64,
) -> Option<ChunkRange> {
    if plain_start > plain_end_inclusive || plain_end_inclusive >= plain_total {
        return None;
    }
    let chunk = CHUNK_SIZE as u64;
    let sealed = SEALED_CHUNK_SIZE as u64;
    let header = HEADER_LEN as u64;
    let first_chunk = plain_start / chunk;
    let last_chunk = plain_end_inclusive / chunk;
    let final_chunk = plain_total / chunk;
    let last_is_final = last_chunk == final_chunk;
    let last_stored_len = if last_is_final {
        plain_total % chunk + TAG_LEN as u64
    } else {
        sealed
    };
    let stored_start = first_chunk.checked_mul(sealed)?.checked_add(header)?;
    let stored_end_inclusive = last_chunk
        .checked_mul(sealed)?
        .checked_add(header)?
        .checked_add(last_stored_len - 1)?;
    Some(ChunkRange {
        first_chunk,
        last_chunk,
        stored_start,
        stored_end_inclusive,
        skip_in_first_chunk: plain_start % chunk,
        plain_len: plain_end_inclusive - plain_start + 1,
        last_is_final,
        plain_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::chunked::{self, ciphertext_len};

    const C: u64 = CHUNK_SIZE as u64;
    const S: u64 = SEALED_CHUNK_SIZE as u64;

    #[test]
    fn range_rejects_empty_and_out_of_bounds() {
        assert_eq!(chunk_range_for(0, 0, 0), None);
        assert_eq!(chunk_range_for(5, 4, 100), None);
        assert_eq!(chunk_range_for(0, 100, 100), None);
        assert_eq!(chunk_range_for(100, 100, 100), None);
        assert_eq!(chunk_range_for(0, u64::MAX, u64::MAX), None);
        // Offsets that overflow a u64.
        assert_eq!(chunk_range_for(u64::MAX - 1, u64::MAX - 1, u64::MAX), None);
    }

    #[test]
    fn range_within_the_final_chunk() {
        // 100-byte message: one short chunk of 116 stored bytes at 56..=171.
        let r = chunk_range_for(10, 19, 100).unwrap();
        assert_eq!(
            r,
            ChunkRange {
                first_chunk: 0,
                last_chunk: 0,
                stored_start: 56,
                stored_end_inclusive: 171,
                skip_in_first_chunk: 10,
                plain_len: 10,
                last_is_final: true,
                plain_total: 100,
            }
        );
        assert_eq!(r.stored_end_inclusive + 1, ciphertext_len(100));
    }

    #[test]
    fn range_of_full_chunks() {
        // 3 full chunks and a final one of 5 bytes.
        let total = 3 * C + 5;
        let r = chunk_range_for(C - 1, C, total).unwrap();
        assert_eq!((r.first_chunk, r.last_chunk), (0, 1));
        assert_eq!(r.stored_start, 56);
        assert_eq!(r.stored_end_inclusive, 56 + 2 * S - 1);
        assert_eq!(r.skip_in_first_chunk, C - 1);
        assert_eq!(r.plain_len, 2);
        assert!(!r.last_is_final);
        assert_eq!(r.stored_len(), 2 * S);

        // Exactly the second chunk.
        let r = chunk_range_for(C, 2 * C - 1, total).unwrap();
        assert_eq!((r.first_chunk, r.last_chunk), (1, 1));
        assert_eq!(
            (r.stored_start, r.stored_end_inclusive),
            (56 + S, 56 + 2 * S - 1)
        );
        assert_eq!((r.skip_in_first_chunk, r.plain_len), (0, C));

        // The last byte is in the final chunk.
        let r = chunk_range_for(2 * C + 7, total - 1, total).unwrap();
        assert_eq!((r.first_chunk, r.last_chunk), (2, 3));
        assert!(r.last_is_final);
        assert_eq!(r.stored_end_inclusive + 1, ciphertext_len(total));
    }

    #[test]
    fn range_when_the_final_chunk_is_empty() {
        // 2 full chunks and an empty final chunk: no byte lives in chunk 2, so a range never
        // reaches it, and its last chunk is not final.
        let total = 2 * C;
        let r = chunk_range_for(0, total - 1, total).unwrap();
        assert_eq!(
            (r.first_chunk, r.last_chunk, r.last_is_final),
            (0, 1, false)
        );
        assert_eq!(r.stored_end_inclusive, 56 + 2 * S - 1);
        assert_eq!(
            r.stored_end_inclusive + 1 + TAG_LEN as u64,
            ciphertext_len(total)
        );
    }

    #[test]
    fn range_matches_brute_force() {
        for total in [1u64, 2, C - 1, C, C + 1, 2 * C, 2 * C + 1, 3 * C - 1] {
            let pts = [0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C, 3 * C - 2];
            for &a in pts.iter().filter(|&&a| a < total) {
                for &b in pts.iter().filter(|&&b| b >= a && b < total) {
                    let r = chunk_range_for(a, b, total).unwrap();
                    assert_eq!(r.first_chunk, a / C);
                    assert_eq!(r.last_chunk, b / C);
                    assert_eq!(r.stored_start, 56 + (a / C) * S);
                    let end = (56 + (b / C + 1) * S).min(ciphertext_len(total));
                    assert_eq!(r.stored_end_inclusive + 1, end, "{a}..={b} of {total}");
                    assert_eq!(r.first_chunk * C + r.skip_in_first_chunk, a);
                    assert_eq!(r.plain_len, b - a + 1);
                    assert_eq!(r.last_is_final, b / C == total / C);
                }
            }
        }
    }

    #[test]
    fn sealer_matches_one_shot_and_opener_round_trips() {
        let key = [3u8; 32];
        let salt = [9u8; SALT_LEN];
        for len in [
            0usize,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE,
        ] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let expected = chunked::seal_with_salt(&key, &salt, b"ctx", &pt);
            let mut sealer = Sealer::with_salt(&key, &salt, b"ctx");
            let mut ct = sealer.header().to_vec();
            for piece in pt.chunks(1000) {
                sealer.push(piece, &mut ct);
                assert!(sealer.buffered() < CHUNK_SIZE);
            }
            sealer.finish(&mut ct);
            assert_eq!(ct, expected, "len {len}");

            let header: &[u8; HEADER_LEN] = ct[..HEADER_LEN].try_into().unwrap();
            let mut opener = Opener::new(&key, b"ctx", header).unwrap();
            let mut got = Vec::new();
            for piece in ct[HEADER_LEN..].chunks(777) {
                opener.push(piece, &mut got).unwrap();
                assert!(opener.buffered() <= SEALED_CHUNK_SIZE);
            }
            opener.finish(&mut got).unwrap();
            assert_eq!(got, pt);
        }
    }

    #[test]
    fn opener_rejects_wrong_key_and_context() {
        let ct = chunked::seal(&[1u8; 32], b"ctx", b"hello");
        let header: &[u8; HEADER_LEN] = ct[..HEADER_LEN].try_into().unwrap();
        assert_eq!(
            Opener::new(&[2u8; 32], b"ctx", header).unwrap_err(),
            OpenError::Commitment
        );
        assert_eq!(
            Opener::new(&[1u8; 32], b"other", header).unwrap_err(),
            OpenError::Commitment
        );
        assert!(Opener::range(&[1u8; 32], b"ctx", header, 1, 0, true).is_err());
    }

    #[test]
    fn held_back_full_chunk_is_truncation() {
        let key = [5u8; 32];
        let pt = vec![0xabu8; CHUNK_SIZE];
        let ct = chunked::seal(&key, b"", &pt);
        let header: &[u8; HEADER_LEN] = ct[..HEADER_LEN].try_into().unwrap();
        // Only the full chunk: held back, nothing emitted, and finish fails.
        let mut opener = Opener::new(&key, b"", header).unwrap();
        let mut out = Vec::new();
        opener
            .push(&ct[HEADER_LEN..HEADER_LEN + SEALED_CHUNK_SIZE], &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(opener.buffered(), SEALED_CHUNK_SIZE);
        assert_eq!(opener.finish(&mut out), Err(OpenError::Truncated));
        assert!(out.is_empty());
        // One more byte proves the chunk is not final: it is released.
        let mut opener = Opener::new(&key, b"", header).unwrap();
        opener
            .push(&ct[HEADER_LEN..HEADER_LEN + SEALED_CHUNK_SIZE], &mut out)
            .unwrap();
        opener
            .push(&ct[HEADER_LEN + SEALED_CHUNK_SIZE..][..1], &mut out)
            .unwrap();
        assert_eq!(out, pt);
        opener
            .push(&ct[HEADER_LEN + SEALED_CHUNK_SIZE + 1..], &mut out)
            .unwrap();
        opener.finish(&mut out).unwrap();
        assert_eq!(out, pt);
    }

    #[test]
    fn errors_poison_the_opener() {
        let key = [6u8; 32];
        let pt = vec![1u8; 3 * CHUNK_SIZE];
        let mut ct = chunked::seal(&key, b"", &pt);
        ct[HEADER_LEN + 5] ^= 1;
        let header: &[u8; HEADER_LEN] = ct[..HEADER_LEN].try_into().unwrap();
        let mut opener = Opener::new(&key, b"", header).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            opener.push(&ct[HEADER_LEN..], &mut out),
            Err(OpenError::Chunk(0))
        );
        assert!(out.is_empty());
        assert_eq!(opener.push(b"x", &mut out), Err(OpenError::Chunk(0)));
        assert_eq!(opener.finish(&mut out), Err(OpenError::Chunk(0)));
        assert!(out.is_empty());
    }

    #[test]
    fn stream_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Sealer>();
        check::<Opener>();
    }
}
