//! HTTP `Range` for S3 GETs over chunked-encrypted objects.
//!
//! Three steps:
//!
//! 1. [`parse_range`]: the header value → a [`RangeSpec`] (`bytes=a-b`, `bytes=a-`,
//!    `bytes=-n`), or `None` when S3 would ignore the header and send the whole object:
//!    syntactically invalid values, other units, `a > b`, and multiple ranges (S3 does not
//!    support multipart/byteranges responses and ignores such headers).
//! 2. [`RangeSpec::resolve`] against the plaintext size → a [`ResolvedRange`] (inclusive
//!    `[start, end]`, clamped to the object) or [`RangeNotSatisfiable`] (start ≥ size,
//!    `bytes=-0`, any range on an empty object) → `416` with the S3 `InvalidRange` error and
//!    `Content-Range: bytes */size`. [`resolve`] does 1 and 2 from an optional header.
//! 3. [`ResolvedRange::chunk_plan`]: which whole chunks of the stored C2SP message to fetch
//!    (one upstream `Range: bytes=X-Y`), how much decrypted plaintext to skip and to return.
//!    For multipart objects (one message per part), [`split_parts`] first cuts the range
//!    into per-part pieces, each with its own plan; [`part_stored_offsets`] gives where each
//!    part's message starts in the stored object.
//!
//! Stored layout of one message (docs/FORMAT.md §1):
//!
//! ```text
//! [0, 56)                                     salt ‖ commitment (needed to derive the keys)
//! chunk k: [56 + k·16400, min(56 + (k+1)·16400, C) − 1]   (16384 plaintext + 16 tag;
//!                                             the final chunk k = ⌊P/16384⌋ is shorter)
//! ```
//!
//! The 56-byte message header is not part of the chunk range: fetch it separately
//! ([`MESSAGE_HEADER_RANGE`]) or fetch `bytes=0-Y` in one request
//! ([`ChunkPlan::upstream_range_with_header`]) when the first chunk is near the start.

use http::HeaderValue;

use crate::envelope::chunked;

const CHUNK: u64 = chunked::CHUNK_SIZE as u64;
const SEALED: u64 = chunked::SEALED_CHUNK_SIZE as u64;
const HEADER: u64 = chunked::HEADER_LEN as u64;

/// Upstream range of a message's header (salt ‖ commitment, stored bytes 0..56).
pub const MESSAGE_HEADER_RANGE: &str = "bytes=0-55";

/// A syntactically valid single byte range, before it is checked against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (a ≤ b).
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a `Range` header value. `None` means "ignore the header, send the whole object",
/// which is what S3 does for anything but one valid byte range:
///
/// - not UTF-8, a unit other than `bytes` (the unit is case-insensitive), no `=`;
/// - more than one range (`bytes=0-1,5-6`);
/// - a malformed range: `bytes=-`, `bytes=a-b` with a > b, signs, non-digits.
///
/// Whitespace around the unit, `=`, numbers and `-` is tolerated. Numbers too large for u64
/// saturate (a huge last-byte-pos just means "to the end").
pub fn parse_range(value: &[u8]) -> Option<RangeSpec> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = s.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let set = set.trim();
    if set.contains(',') {
        return None;
    }
    let (a, b) = set.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix(number(b)?)),
        (false, true) => Some(RangeSpec::From(number(a)?)),
        (false, false) => {
            let (a, b) = (number(a)?, number(b)?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
    }
}

/// [`parse_range`] for a header value already converted to `&str`
/// (`headers.get(RANGE).and_then(|v| v.to_str().ok()).and_then(range::parse)`).
pub fn parse(value: &str) -> Option<RangeSpec> {
    parse_range(value.as_bytes())
}

/// The upstream `Range` to send **before the object size is known** (one request, no HEAD):
/// whole chunks covering the range whatever the size turns out to be.
///
/// - `a-b` → the chunks holding bytes a..=b: `bytes=56+k0·16400-(56+(k1+1)·16400−1)`
///   (upstream clamps the end to the object);
/// - `a-` → `bytes=56+k0·16400-`;
/// - `-n` → a stored suffix long enough to hold the chunks of the last n plaintext bytes for
///   any object size: `bytes=-(n + 16384 + 16·(⌈n/16384⌉ + 1))`.
///
/// Then read the stored total from the response's `Content-Range` ([`parse_content_range`]),
/// compute `P = chunked::plaintext_len(total)`, resolve the spec against `P`
/// ([`RangeSpec::resolve`]; a `416` from upstream implies the plaintext range is
/// unsatisfiable too, but a `206` does not imply it is satisfiable), and take the plan's
/// chunks out of what was fetched with [`ChunkPlan::discard`] (a suffix fetch may start before
/// the first needed chunk, even in the message header, and may end with the final chunk's tag
/// when the plan does not need it).
pub fn upstream_range_header(spec: &RangeSpec) -> String {
    let chunk_start = |k: u64| HEADER.saturating_add(k.saturating_mul(SEALED));
    match *spec {
        RangeSpec::FromTo(a, b) => {
            let start = chunk_start(a / CHUNK);
            // (`max` only matters for absurd values where the arithmetic saturates: keep the
            // range valid so upstream answers 416 instead of ignoring it.)
            let end = chunk_start(b / CHUNK + 1).saturating_sub(1).max(start);
            format!("bytes={start}-{end}")
        }
        RangeSpec::From(a) => format!("bytes={}-", chunk_start(a / CHUNK)),
        RangeSpec::Suffix(n) => {
            let chunks = n.div_ceil(CHUNK).saturating_add(1);
            let tags = (chunked::TAG_LEN as u64).saturating_mul(chunks);
            format!("bytes=-{}", n.saturating_add(CHUNK).saturating_add(tags))
        }
    }
}

/// A parsed `Content-Range` response header: `bytes first-last/total` or `bytes */total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// `(first, last)` inclusive, or `None` for `bytes */total` (a 416).
    pub range: Option<(u64, u64)>,
    /// The complete length.
    pub total: u64,
}

/// Parses `bytes first-last/total` or `bytes */total`; `None` for anything else (including
/// an unknown total `*`).
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let (range, total) = rest.trim_start().split_once('/')?;
    let total = number(total.trim())?;
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b) = (number(a.trim())?, number(b.trim())?);
            if a > b || b >= total {
                return None;
            }
            Some((a, b))
        }
    };
    Some(ContentRange { range, total })
}

/// The complete length from a `Content-Range` value (see [`parse_content_range`]).
pub fn total_from_content_range(value: &str) -> Option<u64> {
    parse_content_range(value).map(|c| c.total)
}

/// Decimal digits only, saturating at `u64::MAX`.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// A valid range that cannot be served for this object: answer `416 InvalidRange` with
/// `Content-Range: ` [`content_range`](Self::content_range) (the gateway's `invalid_range`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("range {requested:?} not satisfiable for an object of {size} bytes")]
pub struct RangeNotSatisfiable {
    /// Plaintext object size.
    pub size: u64,
    /// The header value as received (lossily decoded), for `<RangeRequested>`.
    pub requested: String,
}

impl RangeNotSatisfiable {
    /// `bytes */<size>`, the `Content-Range` of a 416 response.
    pub fn content_range(&self) -> String {
        format!("bytes */{}", self.size)
    }
}

/// An inclusive plaintext range `[start, end]` within an object of `size` bytes
/// (`start ≤ end < size`, guaranteed by construction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRange {
    start: u64,
    end: u64,
    size: u64,
}

impl RangeSpec {
    /// Checks the range against the plaintext `size` and clamps its end, as S3 does:
    /// `a-b` and `a-` need `a < size`; `-n` needs `n > 0` and a non-empty object and is
    /// clamped to the whole object when `n ≥ size`.
    ///
    /// `requested` is only used to fill in the error (`<RangeRequested>`).
    pub fn resolve(self, size: u64, requested: &str) -> Result<ResolvedRange, RangeNotSatisfiable> {
        let unsatisfiable = || RangeNotSatisfiable {
            size,
            requested: requested.to_owned(),
        };
        let (start, end) = match self {
            RangeSpec::FromTo(a, b) if a < size => (a, b.min(size - 1)),
            RangeSpec::From(a) if a < size => (a, size - 1),
            RangeSpec::Suffix(n) if n > 0 && size > 0 => (size - n.min(size), size - 1),
            _ => return Err(unsatisfiable()),
        };
        Ok(ResolvedRange { start, end, size })
    }
}

/// Parses and resolves an optional `Range` header against the plaintext `size`:
/// `Ok(None)` → send the whole object (`200`); `Ok(Some(r))` → `206` with `r`;
/// `Err(e)` → `416`.
///
/// ```
/// use envelope_proxy::s3::range::resolve;
/// use http::HeaderValue;
/// let r = resolve(Some(&HeaderValue::from_static("bytes=-10")), 100).unwrap().unwrap();
/// assert_eq!((r.start(), r.end(), r.content_range()), (90, 99, "bytes 90-99/100".to_string()));
/// assert!(resolve(Some(&HeaderValue::from_static("bytes=100-")), 100).is_err());
/// assert_eq!(resolve(Some(&HeaderValue::from_static("bytes=0-1,4-5")), 100), Ok(None));
/// ```
pub fn resolve(
    header: Option<&HeaderValue>,
    size: u64,
) -> Result<Option<ResolvedRange>, RangeNotSatisfiable> {
    let Some(value) = header else {
        return Ok(None);
    };
    match parse_range(value.as_bytes()) {
        None => Ok(None),
        Some(spec) => spec
            .resolve(size, &String::from_utf8_lossy(value.as_bytes()))
            .map(Some),
    }
}

impl ResolvedRange {
    /// `start ≤ end < size`, or `None`.
    pub fn new(start: u64, end: u64, size: u64) -> Option<Self> {
        (start <= end && end < size).then_some(ResolvedRange { start, end, size })
    }

    /// First plaintext byte (inclusive).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Last plaintext byte (inclusive).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Plaintext size of the whole object.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bytes in the range: the response's `Content-Length`.
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// `bytes start-end/size`, the `Content-Range` of the `206` response.
    pub fn content_range(&self) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, self.size)
    }

    /// The chunks to fetch for this range of a single-message object.
    pub fn chunk_plan(&self) -> ChunkPlan {
        ChunkPlan::compute(self.start, self.end, self.size)
    }

    /// Splits the range over a multipart object's parts (one message each); see
    /// [`split_parts`]. `None` if the part sizes do not add up to this range's object size.
    pub fn split_parts(&self, part_sizes: &[u64]) -> Option<Vec<PartPiece>> {
        let total = part_sizes
            .iter()
            .try_fold(0u64, |acc, &p| acc.checked_add(p))?;
        if total != self.size {
            return None;
        }
        split_parts(self.start, self.end, part_sizes)
    }
}

/// What to fetch from upstream for a plaintext range of one C2SP message, and what to do with
/// it. All offsets are relative to the message start (see [`ChunkPlan::at_offset`] for a
/// message that starts later in the stored object, i.e. a part of a multipart object).
///
/// The fetched bytes `[stored_start, stored_end]` are whole chunks `first_chunk ..=
/// last_chunk`: 16400 bytes each (16384 plaintext + tag), except that the last one is
/// shorter when it is the message's final chunk. Decrypt each with its index (nonce
/// `base_nonce XOR index`), drop `skip` bytes from the front of the decrypted plaintext and
/// return the next `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Index of the first chunk fetched.
    pub first_chunk: u64,
    /// Index of the last chunk fetched.
    pub last_chunk: u64,
    /// First stored byte to fetch (inclusive) = `56 + first_chunk·16400` (+ offset).
    pub stored_start: u64,
    /// Last stored byte to fetch (inclusive).
    pub stored_end: u64,
    /// Plaintext bytes to drop from the front of the first decrypted chunk (< 16384).
    pub skip: u64,
    /// Plaintext bytes to return after the skip.
    pub len: u64,
    /// True if `last_chunk` is the message's final (short, possibly empty) chunk.
    pub ends_at_final_chunk: bool,
}

impl ChunkPlan {
    /// The plan for plaintext `[start, end]` (inclusive) of a message of `size` plaintext
    /// bytes, or `None` unless `start ≤ end < size`.
    pub fn for_range(start: u64, end: u64, size: u64) -> Option<ChunkPlan> {
        (start <= end && end < size).then(|| Self::compute(start, end, size))
    }

    fn compute(start: u64, end: u64, size: u64) -> ChunkPlan {
        debug_assert!(start <= end && end < size);
        let stored_size = chunked::ciphertext_len(size);
        let first_chunk = start / CHUNK;
        let last_chunk = end / CHUNK;
        ChunkPlan {
            first_chunk,
            last_chunk,
            stored_start: HEADER + first_chunk * SEALED,
            stored_end: (HEADER + (last_chunk + 1) * SEALED).min(stored_size) - 1,
            skip: start - first_chunk * CHUNK,
            len: end - start + 1,
            ends_at_final_chunk: last_chunk == size / CHUNK,
        }
    }

    /// `bytes=stored_start-stored_end`: the upstream `Range` for the chunks only.
    pub fn upstream_range(&self) -> String {
        format!("bytes={}-{}", self.stored_start, self.stored_end)
    }

    /// `bytes=<message start>-stored_end`: header and chunks in one request (the bytes
    /// between the header and `stored_start` are fetched and discarded). Worth it when
    /// `first_chunk` is small; otherwise fetch [`MESSAGE_HEADER_RANGE`] separately.
    pub fn upstream_range_with_header(&self) -> String {
        format!(
            "bytes={}-{}",
            self.stored_start - HEADER - self.first_chunk * SEALED,
            self.stored_end
        )
    }

    /// Number of stored bytes in the chunk range.
    pub fn stored_len(&self) -> u64 {
        self.stored_end - self.stored_start + 1
    }

    /// Number of chunks fetched.
    pub fn chunk_count(&self) -> u64 {
        self.last_chunk - self.first_chunk + 1
    }

    /// Plaintext bytes the fetched chunks decrypt to (`stored_len − 16·chunk_count`).
    pub fn decrypted_len(&self) -> u64 {
        self.stored_len() - chunked::TAG_LEN as u64 * self.chunk_count()
    }

    /// For upstream bytes `[fetched_start, fetched_end]` (inclusive, from the response's
    /// `Content-Range`) that contain the plan's chunk range: how many bytes to drop before
    /// `stored_start` and after `stored_end`. `None` if the fetched range does not contain
    /// the plan's (the upstream did not return what was asked: fail the request).
    pub fn discard(&self, fetched_start: u64, fetched_end: u64) -> Option<(u64, u64)> {
        (fetched_start <= self.stored_start && fetched_end >= self.stored_end).then(|| {
            (
                self.stored_start - fetched_start,
                fetched_end - self.stored_end,
            )
        })
    }

    /// The same plan for a message stored at byte `base` of the object (a part of a
    /// multipart object: `base` from [`part_stored_offsets`]).
    pub fn at_offset(self, base: u64) -> ChunkPlan {
        ChunkPlan {
            stored_start: self.stored_start + base,
            stored_end: self.stored_end + base,
            ..self
        }
    }
}

/// The part of a range that falls in one part of a multipart object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPiece {
    /// Index into the `part_sizes` slice (0-based; S3 part number is usually index + 1).
    pub part_index: usize,
    /// First plaintext byte within the part (inclusive).
    pub start: u64,
    /// Last plaintext byte within the part (inclusive).
    pub end: u64,
    /// Plaintext size of the part.
    pub part_size: u64,
}

impl PartPiece {
    /// Number of bytes in the piece.
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// The chunk plan within the part's message (offsets relative to the part's start; add
    /// the part's stored offset with [`ChunkPlan::at_offset`]).
    pub fn chunk_plan(&self) -> ChunkPlan {
        ChunkPlan::compute(self.start, self.end, self.part_size)
    }
}

/// Cuts the plaintext range `[start, end]` (inclusive) of a multipart object into pieces, one
/// per part it touches, in order; `part_sizes` are the parts' plaintext sizes in part order.
/// Empty parts never yield a piece. `None` unless `start ≤ end < Σ part_sizes`.
///
/// The pieces are contiguous and cover exactly `[start, end]`: serving them in order serves
/// the range.
pub fn split_parts(start: u64, end: u64, part_sizes: &[u64]) -> Option<Vec<PartPiece>> {
    if start > end {
        return None;
    }
    let mut pieces = Vec::new();
    let mut offset = 0u64; // plaintext offset of the current part
    for (part_index, &part_size) in part_sizes.iter().enumerate() {
        if offset > end {
            break;
        }
        let part_end = offset.checked_add(part_size)?; // exclusive
        if part_size > 0 && part_end > start {
            pieces.push(PartPiece {
                part_index,
                start: start.max(offset) - offset,
                end: end.min(part_end - 1) - offset,
                part_size,
            });
        }
        offset = part_end;
    }
    // The range must end inside the object.
    (offset > end).then_some(pieces)
}

/// Stored byte offset of each part's message in a multipart object (a prefix sum of
/// `chunked::ciphertext_len`), in part order.
pub fn part_stored_offsets(part_sizes: &[u64]) -> Vec<u64> {
    let mut at = 0u64;
    part_sizes
        .iter()
        .map(|&p| {
            let here = at;
            at += chunked::ciphertext_len(p);
            here
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::chunked::{MessageKeys, SALT_LEN, TAG_LEN};
    use proptest::prelude::*;

    fn spec(s: &str) -> Option<RangeSpec> {
        parse_range(s.as_bytes())
    }

    fn res(h: &str, size: u64) -> Result<Option<(u64, u64)>, RangeNotSatisfiable> {
        resolve(Some(&HeaderValue::from_str(h).unwrap()), size)
            .map(|r| r.map(|r| (r.start(), r.end())))
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(spec("bytes=0-499"), Some(RangeSpec::FromTo(0, 499)));
        assert_eq!(spec("bytes=500-"), Some(RangeSpec::From(500)));
        assert_eq!(spec("bytes=-500"), Some(RangeSpec::Suffix(500)));
        assert_eq!(spec("bytes=7-7"), Some(RangeSpec::FromTo(7, 7)));
        assert_eq!(spec(" Bytes = 1 - 2 "), Some(RangeSpec::FromTo(1, 2)));
        assert_eq!(
            spec("bytes=0-99999999999999999999999"),
            Some(RangeSpec::FromTo(0, u64::MAX))
        );
    }

    #[test]
    fn ignores_what_s3_ignores() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=5-3",
            "bytes=0-1,4-5",
            "bytes=0-1, 4-5",
            "bytes=0-5,",
            "items=0-5",
            "bytes=a-5",
            "bytes=+1-5",
            "bytes=-+5",
            "bytes=1-2-3",
            "bytes=0x10-",
            "bytes=1.5-2",
            "0-5",
        ] {
            assert_eq!(spec(h), None, "{h:?}");
        }
        assert_eq!(parse_range(b"bytes=\xff-1"), None);
        assert_eq!(resolve(None, 10), Ok(None));
        assert_eq!(res("bytes=0-1,4-5", 10), Ok(None));
        assert_eq!(res("bytes=5-3", 10), Ok(None));
    }

    #[test]
    fn resolves_like_s3() {
        assert_eq!(res("bytes=0-499", 10_000), Ok(Some((0, 499))));
        assert_eq!(res("bytes=0-499", 100), Ok(Some((0, 99)))); // clamped
        assert_eq!(res("bytes=99-", 100), Ok(Some((99, 99))));
        assert_eq!(res("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(res("bytes=-1000", 100), Ok(Some((0, 99)))); // whole object
        assert_eq!(res("bytes=0-", 1), Ok(Some((0, 0))));
        for (h, size) in [
            ("bytes=100-", 100),
            ("bytes=100-200", 100),
            ("bytes=-0", 100),
            ("bytes=0-", 0),
            ("bytes=0-0", 0),
            ("bytes=-5", 0),
        ] {
            let e = res(h, size).unwrap_err();
            assert_eq!(e.size, size);
            assert_eq!(e.requested, h);
            assert_eq!(e.content_range(), format!("bytes */{size}"));
        }
    }

    #[tokio::test]
    async fn unsatisfiable_error_response() {
        use http_body_util::BodyExt;
        let e = res("bytes=100-", 42).unwrap_err();
        let resp = crate::s3::gateway::invalid_range(Some(e.size))
            .to_http_response()
            .unwrap();
        assert_eq!(resp.status(), http::StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()["content-range"], e.content_range());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let xml = String::from_utf8(body.to_vec()).unwrap();
        assert!(xml.contains("<Code>InvalidRange</Code>"), "{xml}");
    }

    #[test]
    fn content_range_and_len() {
        let r = ResolvedRange::new(10, 19, 100).unwrap();
        assert_eq!(r.len(), 10);
        assert_eq!(r.content_range(), "bytes 10-19/100");
        assert!(ResolvedRange::new(5, 4, 100).is_none());
        assert!(ResolvedRange::new(0, 100, 100).is_none());
    }

    #[test]
    fn chunk_plans_by_hand() {
        // P = 40000: chunks 0, 1 full, chunk 2 holds 7232 bytes; C = 40000 + 32 + 72 = 40104.
        let p = 40_000;
        let c = chunked::ciphertext_len(p);
        assert_eq!(c, 40_104);
        let plan = ChunkPlan::for_range(0, 0, p).unwrap();
        assert_eq!(
            plan,
            ChunkPlan {
                first_chunk: 0,
                last_chunk: 0,
                stored_start: 56,
                stored_end: 56 + 16400 - 1,
                skip: 0,
                len: 1,
                ends_at_final_chunk: false
            }
        );
        assert_eq!(plan.upstream_range(), "bytes=56-16455");
        assert_eq!(plan.upstream_range_with_header(), "bytes=0-16455");
        // Spanning the 1|2 boundary up to the end.
        let plan = ChunkPlan::for_range(20_000, 39_999, p).unwrap();
        assert_eq!(plan.first_chunk, 1);
        assert_eq!(plan.last_chunk, 2);
        assert_eq!(plan.stored_start, 56 + 16400);
        assert_eq!(plan.stored_end, c - 1);
        assert_eq!(plan.skip, 20_000 - 16384);
        assert_eq!(plan.len, 20_000);
        assert!(plan.ends_at_final_chunk);
        assert_eq!(plan.decrypted_len(), p - 16384);
        // P a multiple of the chunk size: the final chunk is empty and never needed.
        let p = 2 * 16384;
        let plan = ChunkPlan::for_range(0, p - 1, p).unwrap();
        assert_eq!(plan.last_chunk, 1);
        assert!(!plan.ends_at_final_chunk);
        assert_eq!(plan.stored_end, 56 + 2 * 16400 - 1);
        assert_eq!(chunked::ciphertext_len(p) - 1 - plan.stored_end, 16); // only the final tag left
        assert!(ChunkPlan::for_range(0, p, p).is_none());
        // Offsets for a later part.
        let shifted = plan.at_offset(1000);
        assert_eq!(
            shifted.upstream_range(),
            format!("bytes={}-{}", 1056, 1000 + 56 + 2 * 16400 - 1)
        );
        assert_eq!(
            shifted.upstream_range_with_header(),
            format!("bytes=1000-{}", 1000 + 56 + 2 * 16400 - 1)
        );
    }

    #[test]
    fn split_by_hand() {
        let parts = [100, 0, 50, 30];
        let pieces = split_parts(90, 160, &parts).unwrap();
        assert_eq!(
            pieces,
            vec![
                PartPiece {
                    part_index: 0,
                    start: 90,
                    end: 99,
                    part_size: 100
                },
                PartPiece {
                    part_index: 2,
                    start: 0,
                    end: 49,
                    part_size: 50
                },
                PartPiece {
                    part_index: 3,
                    start: 0,
                    end: 10,
                    part_size: 30
                },
            ]
        );
        assert_eq!(split_parts(0, 179, &parts).unwrap().len(), 3);
        assert_eq!(split_parts(0, 180, &parts), None);
        assert_eq!(split_parts(5, 4, &parts), None);
        assert_eq!(split_parts(0, 0, &[]), None);
        assert_eq!(part_stored_offsets(&parts), vec![0, 172, 244, 366]);
        let r = ResolvedRange::new(90, 160, 180).unwrap();
        assert_eq!(r.split_parts(&parts), Some(pieces));
        assert_eq!(r.split_parts(&[100, 79]), None);
    }

    #[test]
    fn upstream_ranges_without_the_size() {
        assert_eq!(
            upstream_range_header(&RangeSpec::FromTo(0, 0)),
            "bytes=56-16455"
        );
        assert_eq!(
            upstream_range_header(&RangeSpec::FromTo(16384, 16384)),
            "bytes=16456-32855"
        );
        assert_eq!(
            upstream_range_header(&RangeSpec::From(20_000)),
            "bytes=16456-"
        );
        assert_eq!(upstream_range_header(&RangeSpec::Suffix(1)), "bytes=-16417");
        assert_eq!(
            upstream_range_header(&RangeSpec::FromTo(u64::MAX, u64::MAX)),
            format!("bytes={0}-{0}", u64::MAX)
        );
        assert_eq!(parse("bytes=1-2"), Some(RangeSpec::FromTo(1, 2)));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 56-16455/40104"),
            Some(ContentRange {
                range: Some((56, 16455)),
                total: 40104
            })
        );
        assert_eq!(
            parse_content_range("bytes */72"),
            Some(ContentRange {
                range: None,
                total: 72
            })
        );
        assert_eq!(total_from_content_range("bytes 0-0/1"), Some(1));
        for bad in [
            "bytes 0-1/*",
            "bytes 5-1/10",
            "bytes 0-10/10",
            "bits 0-1/10",
            "bytes0-1/10",
            "",
            "bytes 0-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    /// Decrypts the fetched chunk range the way the gateway will and returns the plaintext
    /// the plan says to send.
    fn serve(stored: &[u8], header: &[u8], plan: &ChunkPlan) -> Vec<u8> {
        let salt: &[u8; SALT_LEN] = header[..SALT_LEN].try_into().unwrap();
        let keys = MessageKeys::derive(&[7; 32], salt, b"ctx");
        assert_eq!(&header[SALT_LEN..56], keys.commitment());
        let fetched = &stored[plan.stored_start as usize..=plan.stored_end as usize];
        let mut plain = Vec::new();
        for (i, sealed) in fetched.chunks(chunked::SEALED_CHUNK_SIZE).enumerate() {
            let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
            let mut body = body.to_vec();
            keys.open_chunk(
                plan.first_chunk + i as u64,
                &mut body,
                tag.try_into().unwrap(),
            )
            .unwrap();
            plain.extend_from_slice(&body);
        }
        assert_eq!(plain.len() as u64, plan.decrypted_len());
        plain[plan.skip as usize..(plan.skip + plan.len) as usize].to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Real encryption: the planned chunks decrypt and yield exactly the requested bytes.
        #[test]
        fn plan_serves_exact_bytes(size in 1u64..(5 * 16384 + 100), a in any::<u64>(), b in any::<u64>()) {
            let plaintext: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let stored = chunked::seal_with_salt(&[7; 32], &[9; SALT_LEN], b"ctx", &plaintext);
            let (s, e) = { let (x, y) = (a % size, b % size); (x.min(y), x.max(y)) };
            let r = ResolvedRange::new(s, e, size).unwrap();
            let plan = r.chunk_plan();
            prop_assert_eq!(serve(&stored, &stored[..56], &plan), plaintext[s as usize..=e as usize].to_vec());
            if plan.ends_at_final_chunk {
                prop_assert_eq!(plan.stored_end, stored.len() as u64 - 1);
            }
        }

        /// Real encryption, multipart: each part its own message; pieces served in order
        /// give exactly the requested bytes.
        #[test]
        fn multipart_serves_exact_bytes(
            chunks in proptest::collection::vec(1u64..3, 0..4),
            last in 0u64..40_000,
            a in any::<u64>(), b in any::<u64>(),
        ) {
            let mut sizes: Vec<u64> = chunks.iter().map(|c| c * 16384).collect();
            sizes.push(last);
            let total: u64 = sizes.iter().sum();
            prop_assume!(total > 0);
            let plaintext: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
            let mut stored = Vec::new();
            let mut at = 0usize;
            for (i, &p) in sizes.iter().enumerate() {
                let part = &plaintext[at..at + p as usize];
                stored.extend(chunked::seal_with_salt(&[7; 32], &[i as u8; SALT_LEN], b"ctx", part));
                at += p as usize;
            }
            prop_assert_eq!(stored.len() as u64, crate::s3::listing::multipart_ciphertext_len(&sizes));
            let (s, e) = { let (x, y) = (a % total, b % total); (x.min(y), x.max(y)) };
            let offsets = part_stored_offsets(&sizes);
            let pieces = ResolvedRange::new(s, e, total).unwrap().split_parts(&sizes).unwrap();
            let mut served = Vec::new();
            for piece in &pieces {
                let base = offsets[piece.part_index];
                let plan = piece.chunk_plan().at_offset(base);
                let header = &stored[base as usize..base as usize + 56];
                served.extend(serve(&stored, header, &plan));
            }
            prop_assert_eq!(served, plaintext[s as usize..=e as usize].to_vec());
        }

        /// Arithmetic over huge sizes: the plan fetches whole chunks, inside the object,
        /// that contain exactly the requested range.
        #[test]
        fn plan_arithmetic(size in 1u64..(1 << 42), a in any::<u64>(), b in any::<u64>()) {
            let (s, e) = { let (x, y) = (a % size, b % size); (x.min(y), x.max(y)) };
            let plan = ChunkPlan::for_range(s, e, size).unwrap();
            let c = chunked::ciphertext_len(size);
            prop_assert!(plan.stored_start <= plan.stored_end && plan.stored_end < c);
            prop_assert!((plan.stored_start - 56).is_multiple_of(16400));
            prop_assert!(plan.stored_end == c - 1 || (plan.stored_end + 1 - 56).is_multiple_of(16400));
            prop_assert!(plan.skip < 16384);
            prop_assert_eq!(plan.first_chunk * 16384 + plan.skip, s);
            prop_assert_eq!(plan.len, e - s + 1);
            prop_assert!(plan.skip + plan.len <= plan.decrypted_len());
            // No whole chunk fetched beyond need: the last chunk holds byte e.
            prop_assert!(plan.skip + plan.len > plan.decrypted_len().saturating_sub(16384));
            prop_assert_eq!(plan.ends_at_final_chunk, plan.stored_end == c - 1);
        }

        /// The size-independent upstream range, answered as S3 would for the real stored
        /// size, always contains the chunks the plan needs once the size is known; and an
        /// upstream 416 only happens when the plaintext range is unsatisfiable too.
        #[test]
        fn upstream_range_contains_the_plan(
            size in 0u64..(1 << 40),
            kind in 0u8..3, a in any::<u64>(), b in any::<u64>(),
        ) {
            let bound = size.saturating_mul(2).max(1);
            let (x, y) = (a % bound, b % bound);
            let spec = match kind {
                0 => RangeSpec::FromTo(x.min(y), x.max(y)),
                1 => RangeSpec::From(x),
                _ => RangeSpec::Suffix(x),
            };
            let c = chunked::ciphertext_len(size);
            // What S3 does with our upstream range on an object of c bytes.
            let fetched = match parse(&upstream_range_header(&spec)).unwrap().resolve(c, "") {
                Ok(r) => Some((r.start(), r.end())),
                Err(_) => None,
            };
            match (spec.resolve(size, ""), fetched) {
                (Ok(r), Some((fs, fe))) => {
                    let plan = r.chunk_plan();
                    let (front, back) = plan.discard(fs, fe).unwrap();
                    prop_assert_eq!(fs + front, plan.stored_start);
                    prop_assert_eq!(fe - back, plan.stored_end);
                    // Over-fetch is bounded: at most the header, one chunk and a tag.
                    prop_assert!(front <= SEALED + HEADER && back <= 16);
                }
                (Ok(_), None) => prop_assert!(false, "upstream 416 for a satisfiable range"),
                (Err(_), _) => {}
            }
        }

        /// Pieces are contiguous, in bounds, non-empty and cover exactly [s, e].
        #[test]
        fn split_covers_exactly(
            sizes in proptest::collection::vec(0u64..1_000_000, 1..20),
            a in any::<u64>(), b in any::<u64>(),
        ) {
            let total: u64 = sizes.iter().sum();
            prop_assume!(total > 0);
            let (s, e) = { let (x, y) = (a % total, b % total); (x.min(y), x.max(y)) };
            let pieces = split_parts(s, e, &sizes).unwrap();
            let starts: Vec<u64> = sizes.iter().scan(0, |acc, &p| { let at = *acc; *acc += p; Some(at) }).collect();
            let mut next = s;
            let mut last_index = None;
            for p in &pieces {
                prop_assert!(p.start <= p.end && p.end < p.part_size);
                prop_assert_eq!(p.part_size, sizes[p.part_index]);
                prop_assert!(last_index.is_none_or(|i| i < p.part_index));
                prop_assert_eq!(starts[p.part_index] + p.start, next);
                next = starts[p.part_index] + p.end + 1;
                last_index = Some(p.part_index);
            }
            prop_assert_eq!(next, e + 1);
            prop_assert_eq!(pieces.iter().map(PartPiece::len).sum::<u64>(), e - s + 1);
        }

        /// Resolution: a satisfiable range lies inside the object; the header parser never
        /// panics.
        #[test]
        fn resolve_in_bounds(h in "bytes=[0-9]{0,6}-[0-9]{0,6}", size in 0u64..2_000_000) {
            match resolve(Some(&HeaderValue::from_str(&h).unwrap()), size) {
                Ok(Some(r)) => prop_assert!(r.start() <= r.end() && r.end() < size),
                Ok(None) => {}
                Err(e) => prop_assert_eq!(e.size, size),
            }
        }

        #[test]
        fn parse_never_panics(h in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_range(&h);
        }
    }
}
