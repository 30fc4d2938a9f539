//! Multipart uploads through the encrypting gateway, and reads of multipart objects.
//!
//! # Writing
//!
//! - **CreateMultipartUpload** picks a data key for the key context (as PutObject does) and a
//!   random 16-byte object id, and forwards Create with the reserved metadata
//!   `x-amz-meta-ep-envelope` = base64url(envelope header) (no C2SP header: each part carries
//!   its own), `x-amz-meta-ep-object` = the object id (hex), `x-amz-meta-ep-multipart` = `1`
//!   and `x-amz-meta-ep-format` = `2` (bound to bucket and key, FORMAT.md §9).
//! - S3 has no way to read an in-progress upload's metadata at UploadPart time, so the client
//!   gets the proxy's own **upload id**:
//!
//!   ```text
//!   <upstream upload id> "." base64url-nopad(u16be(len header) ‖ envelope header ‖ object id (16) ‖ [2])
//!   ```
//!
//!   (the trailing `2`, the object format, is absent from ids issued before format 2: their
//!   parts are still sealed in format 1, so uploads in flight across an upgrade stay readable).
//!
//!   Nothing in it is secret (the data key in the header is wrapped). The proxy stays
//!   stateless (any replica serves any request). A client that alters it only makes its own
//!   object unreadable: reads trust the metadata set at Create, and the data key only unwraps
//!   under the request's key context. Requests with `uploadId` are split back; a bare upstream
//!   id (from ListMultipartUploads: storage cannot give the header back, so listings keep
//!   upstream's ids) is accepted by ListParts, CompleteMultipartUpload and
//!   AbortMultipartUpload, not by UploadPart, which needs the data key.
//! - **UploadPart** seals the part as its own C2SP message (header, chunks, final chunk), with
//!   the message context = the object context (key context + `ep:object`, and in format 2
//!   `ep:bucket` + `ep:key` of the UploadPart request itself: a part sent for another key does
//!   not open in the upload's object) + `ep:part` = the part number (decimal),
//!   streamed exactly like PutObject ([`Ctx::send_sealed`]). Its answer carries the part ETag
//!   [`part_etag`], a keyed MAC of the plaintext (the same bytes sent again as the same part get
//!   the same ETag), and the flexible checksum the client named (`x-amz-checksum-*`, over the
//!   plaintext), as S3 answers.
//! - **CompleteMultipartUpload** requires parts numbered 1..N without gaps (a part is bound to
//!   its number, which must be its position in the object), every non-final part of the same
//!   plaintext size, a positive multiple of 16 KiB (checked with ListParts), so that sizes and
//!   ranges are arithmetic: `C = P + 16·⌊P/16384⌋ + 72·N` (see
//!   [`listing::multipart_plaintext_len`]), after S3's own minimum (5 MiB but the last part:
//!   `EntityTooSmall`). A refused Complete leaves the upload in place for the client to abort
//!   or to fix. The client's `<ETag>`s are replaced by upstream's for the same part numbers.
//!   A Complete whose upload is gone answers the result again when the object at the key was
//!   completed from this upload (its object id and envelope header), as S3 does.
//!
//! # Reading
//!
//! The stored object is N C2SP messages back to back; each non-final part ends with an empty
//! final chunk (16 bytes). Its plaintext size follows from the stored size and the `-N` ETag;
//! the part size from one `HEAD ?partNumber=1` upstream (S3 answers with that part's stored
//! `Content-Length`). Then:
//!
//! - a full GET opens each part as a whole message (final chunk included) with its own header
//!   (the first 56 stored bytes of the part) and `ep:part` = its position;
//! - a ranged GET maps the plaintext range to parts ([`range::split_parts`]) and fetches the
//!   covering stored bytes in one upstream request, which contains the C2SP header of every
//!   covered part but the first. The first part's header is fetched with the chunks when the
//!   range starts in the part's first chunk (one request from the part's start), otherwise by
//!   a second 56-byte request: at most 56 bytes of over-fetch, never a whole part. Follow-up
//!   requests carry `If-Match` with the object's ETag, so a replaced object fails instead of
//!   mixing two objects' bytes;
//! - `?partNumber=N` is served as the plaintext range of part N.
//!
//! Any authentication failure aborts the body, as for single-part objects.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use hmac::{Hmac, KeyInit, Mac};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use s3s::{Body, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::gateway::{
    Ctx, META_ENVELOPE, META_MULTIPART, META_OBJECT_ID, ObjectFormat, backend_error, boxed_stream,
    clean_response_headers, decrypt_error, internal, invalid_range, plaintext_size,
    set_format_marker, strip_request_headers, unmark_conditionals, upload_headers, upload_prelude,
};
use super::listing::{self, Edit, Visit, XmlRewriteError, apply_edits, walk};
use super::range::{self, RangeSpec, ResolvedRange};
use super::{etag, xml_error};
use crate::envelope::chunked::{self, HEADER_LEN, OpenError};
use crate::envelope::stream::{Opener, Sealer};
use crate::envelope::{Context, Header, binding};
use crate::pipeline::BoxError;

/// Reserved message-context key: the part number a part's message is bound to.
pub const PART_KEY: &str = "ep:part";
/// S3's limit on the number of parts.
pub const MAX_PARTS: u64 = 10_000;
/// Length of the random object id.
pub const OBJECT_ID_LEN: usize = 16;
/// Cap on a CompleteMultipartUpload request body (10 000 parts with checksums fit easily).
const COMPLETE_BODY_LIMIT: usize = 8 << 20;
/// Cap on an upstream ListParts page or error body.
const XML_LIMIT: usize = 16 << 20;
const CHUNK: u64 = chunked::CHUNK_SIZE as u64;

// ---------------------------------------------------------------------------------------------
// Upload ids

/// What the proxy's upload id carries besides the upstream id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedUpload {
    /// The envelope header, as encoded (it is bound into every part).
    pub header_raw: Vec<u8>,
    pub header: Header,
    pub object_id: [u8; OBJECT_ID_LEN],
    /// The object format the parts are sealed in: ids issued before v2 end after the object
    /// id (v1, so uploads in flight across an upgrade stay readable); v2 ids add one byte, `2`.
    pub format: ObjectFormat,
}

/// An upload id from a client: the upstream id, and our part if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadId {
    pub upstream: String,
    /// `None` for a bare upstream id (e.g. from ListMultipartUploads).
    pub sealed: Option<SealedUpload>,
}

/// `<upstream>.<base64url(u16be len ‖ header ‖ object id ‖ [2])>` (the trailing format byte
/// only for v2); `None` if the header is longer than 65535 bytes.
pub fn encode_upload_id(
    upstream: &str,
    header_raw: &[u8],
    object_id: &[u8; OBJECT_ID_LEN],
    format: ObjectFormat,
) -> Option<String> {
    let len = u16::try_from(header_raw.len()).ok()?;
    let mut blob = Vec::with_capacity(2 + header_raw.len() + OBJECT_ID_LEN + 1);
    blob.extend_from_slice(&len.to_be_bytes());
    blob.extend_from_slice(header_raw);
    blob.extend_from_slice(object_id);
    if format == ObjectFormat::Bound {
        blob.push(2);
    }
    Some(format!("{upstream}.{}", URL_SAFE_NO_PAD.encode(blob)))
}

/// Splits a client's upload id. Anything that does not end in a well-formed suffix (a valid
/// envelope header and a 16-byte object id) is taken as a bare upstream id. The suffix never
/// contains `.`, so upstream ids containing dots split correctly.
pub fn parse_upload_id(id: &str) -> UploadId {
    let bare = || UploadId {
        upstream: id.to_string(),
        sealed: None,
    };
    let Some((upstream, suffix)) = id.rsplit_once('.') else {
        return bare();
    };
    if upstream.is_empty() {
        return bare();
    }
    match decode_sealed(suffix) {
        Some(sealed) => UploadId {
            upstream: upstream.to_string(),
            sealed: Some(sealed),
        },
        None => bare(),
    }
}

fn decode_sealed(suffix: &str) -> Option<SealedUpload> {
    let blob = URL_SAFE_NO_PAD.decode(suffix).ok()?;
    let len = usize::from(u16::from_be_bytes(blob.get(..2)?.try_into().ok()?));
    let end = 2 + len + OBJECT_ID_LEN;
    let format = match blob.get(end..)? {
        [] => ObjectFormat::Unbound,
        [2] => ObjectFormat::Bound,
        _ => return None,
    };
    let header_raw = blob[2..2 + len].to_vec();
    let (header, used) = Header::decode(&header_raw).ok()?;
    if used != len {
        return None;
    }
    let object_id = blob[2 + len..end].try_into().ok()?;
    Some(SealedUpload {
        header_raw,
        header,
        object_id,
        format,
    })
}

fn bare_upload_id_refused() -> S3Error {
    S3Error::with_message(
        S3ErrorCode::InvalidArgument,
        "this upload id was not issued by the encrypting gateway (a bare upstream id, e.g. from \
         ListMultipartUploads, works for ListParts, CompleteMultipartUpload and \
         AbortMultipartUpload, but carries no data key): upload parts with the id \
         CreateMultipartUpload returned through the gateway",
    )
}

// ---------------------------------------------------------------------------------------------
// Query strings

/// The decoded key of one raw `k=v` query pair.
fn pair_key(pair: &str) -> String {
    form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

/// The decoded value of the first `name` parameter.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The raw query without any `name` parameter (other pairs kept byte for byte); `None` if
/// nothing is left.
pub(super) fn without_query_param(query: Option<&str>, name: &str) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && pair_key(p) != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The raw query with `name` set to `value` (replacing any previous value).
fn with_query_param(query: Option<&str>, name: &str, value: &str) -> String {
    let mut pairs: Vec<String> = without_query_param(query, name)
        .map(|q| q.split('&').map(str::to_string).collect())
        .unwrap_or_default();
    pairs.push(format!(
        "{}={}",
        encode_component(name),
        encode_component(value)
    ));
    pairs.join("&")
}

/// RFC 3986 percent-encoding of everything but unreserved characters (as SigV4 does).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The URI with another query.
fn with_uri_query(uri: &http::Uri, query: &str) -> S3Result<http::Uri> {
    let mut pq = uri.path().to_string();
    if !query.is_empty() {
        pq.push('?');
        pq.push_str(query);
    }
    let mut b = http::Uri::builder().path_and_query(pq);
    if let Some(s) = uri.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = uri.authority() {
        b = b.authority(a.clone());
    }
    b.build().map_err(internal)
}

fn parse_part_number(value: &str) -> S3Result<u64> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| {
            S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive",
            )
        })
}

/// `?partNumber=N` of a GET or HEAD, checked.
pub(super) fn part_number_query(uri: &http::Uri) -> S3Result<Option<u64>> {
    query_param(uri.query(), "partNumber")
        .map(|v| parse_part_number(&v))
        .transpose()
}

/// True if the upstream headers mark an object written by a multipart upload.
pub(super) fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(META_MULTIPART)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// S3's answer to `?partNumber=N` past the object's last part.
pub(super) fn invalid_part_number() -> S3Error {
    let mut e = S3Error::with_message(
        S3ErrorCode::Custom("InvalidPartNumber".into()),
        "The requested partnumber is not satisfiable",
    );
    e.set_status_code(StatusCode::RANGE_NOT_SATISFIABLE);
    e
}

// ---------------------------------------------------------------------------------------------
// XML bodies

/// A CompleteMultipartUpload body, ready for upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteBody {
    /// The `<PartNumber>`s, in the order listed.
    pub part_numbers: Vec<u64>,
    /// The body with ETags unmarked and per-part checksums removed (they describe plaintext;
    /// upstream holds no checksum for the sealed parts).
    pub body: Vec<u8>,
}

/// Reads and rewrites a CompleteMultipartUpload body. Errors (for `MalformedXML`) on bad XML,
/// a `<Part>` without exactly one numeric `<PartNumber>`, or another root element.
pub fn rewrite_complete_body(body: &[u8]) -> Result<CompleteBody, String> {
    let mut numbers = Vec::new();
    let mut edits = Vec::new();
    let mut parts = 0usize;
    let mut in_part = 0usize;
    let mut bad: Option<String> = None;
    walk(body, |visit| {
        match visit {
            Visit::Leaf(leaf) => {
                if leaf.path.first().map(String::as_str) != Some("CompleteMultipartUpload") {
                    bad = Some("the root element is not CompleteMultipartUpload".into());
                }
                if leaf.path.len() == 2 && leaf.path[1] == "Part" {
                    parts += 1; // <Part/>: no number
                }
                if leaf.path.len() == 3 && leaf.path[1] == "Part" {
                    match leaf.path[2].as_str() {
                        "PartNumber" => {
                            in_part += 1;
                            match leaf.text.trim().parse::<u64>() {
                                Ok(n) => numbers.push(n),
                                Err(_) => bad = Some(format!("bad PartNumber {:?}", leaf.text)),
                            }
                        }
                        name if name.starts_with("Checksum") => {
                            let mut start = leaf.outer.start;
                            while start > 0 && body[start - 1].is_ascii_whitespace() {
                                start -= 1;
                            }
                            edits.push(Edit {
                                range: start..leaf.outer.end,
                                replacement: Vec::new(),
                            });
                        }
                        _ => {}
                    }
                }
            }
            Visit::Close { path } => {
                if path.len() == 2 && path[1] == "Part" {
                    parts += 1;
                    if in_part != 1 {
                        bad = Some("a Part without exactly one PartNumber".into());
                    }
                    in_part = 0;
                }
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if let Some(why) = bad {
        return Err(why);
    }
    if parts != numbers.len() {
        return Err("a Part without a PartNumber".into());
    }
    let stripped = apply_edits(body, edits);
    let body = etag::unmark_in_xml(&stripped).map_err(|e| e.to_string())?;
    Ok(CompleteBody {
        part_numbers: numbers,
        body,
    })
}

/// The part numbers of a Complete request must be 1, 2, …, N: ascending (as S3 requires) and
/// without gaps (the gateway's own rule: each part is sealed with its number, and a reader
/// only knows positions).
pub fn check_part_numbers(numbers: &[u64]) -> Result<(), S3Error> {
    if numbers.is_empty() {
        return Err(S3Error::with_message(
            S3ErrorCode::MalformedXML,
            "The XML you provided was not well-formed or did not validate against our published schema",
        ));
    }
    if numbers.windows(2).any(|w| w[1] <= w[0]) {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidPartOrder,
            "The list of parts was not in ascending order. The parts list must be specified in \
             order by part number.",
        ));
    }
    if let Some((i, n)) = numbers
        .iter()
        .enumerate()
        .find(|&(i, &n)| n != i as u64 + 1)
    {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidPart,
            format!(
                "the encrypting gateway needs the parts numbered 1, 2, 3, … without gaps (each \
                 part is bound to its position in the object): part {n} is listed at position {}",
                i + 1
            ),
        ));
    }
    Ok(())
}

/// The gateway's layout rule, on the parts' plaintext sizes in order: every part but the last
/// a positive multiple of 16384 bytes, all of the same size. Returns the refusal message.
pub fn check_layout(sizes: &[u64]) -> Result<(), String> {
    let Some((_, non_final)) = sizes.split_last() else {
        return Err("no parts".into());
    };
    let Some(&first) = non_final.first() else {
        return Ok(());
    };
    if first == 0 || !first.is_multiple_of(CHUNK) {
        return Err(format!(
            "part 1 holds {first} bytes: through the encrypting gateway every part but the last \
             must be a multiple of 16384 bytes (16 KiB), e.g. 8 MiB; abort this upload and \
             upload again with such a part size"
        ));
    }
    if let Some((i, &p)) = non_final.iter().enumerate().find(|&(_, &p)| p != first) {
        return Err(format!(
            "part {} holds {p} bytes and part 1 holds {first}: through the encrypting gateway \
             every part but the last must have the same size; abort this upload and upload \
             again with a fixed part size",
            i + 1
        ));
    }
    debug_assert!(listing::multipart_layout_ok(sizes));
    Ok(())
}

/// S3's minimum size of every part but the last.
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// S3's size minimum, on the parts' plaintext sizes in order (what the client sent): every part
/// but the last at least 5 MiB, else `400 EntityTooSmall` as S3 answers. Checked before the
/// gateway's own layout rule, so a client sees the error S3 would give it.
pub fn check_min_part_size(sizes: &[u64]) -> Result<(), S3Error> {
    let Some((_, non_final)) = sizes.split_last() else {
        return Ok(());
    };
    match non_final.iter().position(|&p| p < MIN_PART_SIZE) {
        None => Ok(()),
        Some(i) => {
            let mut e = S3Error::with_message(
                S3ErrorCode::EntityTooSmall,
                format!(
                    "Your proposed upload is smaller than the minimum allowed size: part {} \
                     holds {} bytes, and every part but the last must hold at least {} bytes",
                    i + 1,
                    non_final[i],
                    MIN_PART_SIZE
                ),
            );
            e.set_status_code(StatusCode::BAD_REQUEST);
            Err(e)
        }
    }
}

/// Sets the `<ETag>` of every `<Part>` of a CompleteMultipartUpload body to the ETag upstream
/// lists for that part number (`etags`): the client names the gateway's part ETags (see
/// [`part_etag`]), which upstream never saw. Parts without an `<ETag>` element or without a
/// listed ETag are left as they are (upstream answers for them).
fn set_part_etags(body: &[u8], etags: &BTreeMap<u64, String>) -> Result<Vec<u8>, XmlRewriteError> {
    let mut edits = Vec::new();
    let (mut number, mut etag_span) = (None::<u64>, None);
    walk(body, |visit| {
        match visit {
            Visit::Leaf(leaf) if leaf.path.len() == 3 && leaf.path[1] == "Part" => {
                match leaf.path[2].as_str() {
                    "PartNumber" => number = leaf.text.trim().parse().ok(),
                    "ETag" => etag_span = leaf.inner.clone(),
                    _ => {}
                }
            }
            Visit::Close { path } if path.len() == 2 && path[1] == "Part" => {
                if let (Some(n), Some(span)) = (number.take(), etag_span.take())
                    && let Some(stored) = etags.get(&n)
                {
                    edits.push(Edit {
                        range: span,
                        replacement: quick_xml::escape::escape(stored.as_str())
                            .into_owned()
                            .into_bytes(),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(apply_edits(body, edits))
}

// ---------------------------------------------------------------------------------------------
// Part ETags

/// Label of the part-ETag key (FORMAT.md §9).
const PART_ETAG_LABEL: &[u8] = b"envelope-proxy s3 part etag v1\0";

/// The keyed MAC behind a part's ETag, before any plaintext: HMAC-SHA256 under
/// `HMAC-SHA256(data key, label ‖ object id ‖ u64be(part number))`, a key bound to the upload
/// (its data key and object id) and to the part number.
pub fn part_etag_mac(
    data_key: &[u8; 32],
    object_id: &[u8; OBJECT_ID_LEN],
    part: u64,
) -> Result<Hmac<Sha256>, S3Error> {
    let mut derive = <Hmac<Sha256> as KeyInit>::new_from_slice(data_key).map_err(internal)?;
    derive.update(PART_ETAG_LABEL);
    derive.update(object_id);
    derive.update(&part.to_be_bytes());
    let key = Zeroizing::new(<[u8; 32]>::from(derive.finalize().into_bytes()));
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_ref()).map_err(internal)
}

/// The ETag the client sees for a part: `"<hex of the first 16 MAC bytes>-0"`. The same
/// plaintext sent again as the same part of the same upload gets the same ETag (as S3's MD5
/// ETags do), though its sealing differs; it is marked like every 32-hex ETag the gateway
/// answers with ([`etag::mark`]), so no client takes it for the content's MD5.
pub fn part_etag(mac: Hmac<Sha256>) -> String {
    let tag = mac.finalize().into_bytes();
    format!("\"{}{}\"", hex::encode(&tag[..16]), etag::MARK)
}

/// What UploadPart learns from the plaintext as it streams to the sealer.
struct PartTee {
    mac: Option<Hmac<Sha256>>,
    seen: u64,
}

impl PartTee {
    fn update(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        if let Some(m) = self.mac.as_mut() {
            m.update(data);
        }
    }
}

/// A `CompleteMultipartUploadResult` document (values escaped).
fn complete_result_xml(location: &str, bucket: &str, key: &str, etag_value: &str) -> Vec<u8> {
    use quick_xml::escape::escape;
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUploadResult \
         xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Location>{}</Location>\
         <Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
        escape(location),
        escape(bucket),
        escape(key),
        escape(etag_value)
    )
    .into_bytes()
}

/// A part as upstream stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredPart {
    size: u64,
    /// The upstream ETag, as listed (quotes included).
    etag: Option<String>,
}

/// One page of an upstream ListParts answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct PartsPage {
    parts: Vec<(u64, StoredPart)>,
    truncated: bool,
    next_marker: Option<String>,
}

fn parse_list_parts(body: &[u8]) -> Result<PartsPage, XmlRewriteError> {
    let mut page = PartsPage::default();
    let (mut number, mut size, mut etag) = (None::<u64>, None::<u64>, None::<String>);
    walk(body, |visit| {
        match visit {
            Visit::Leaf(leaf) if leaf.path.len() == 2 => match leaf.path[1].as_str() {
                "IsTruncated" => page.truncated = leaf.text.trim() == "true",
                "NextPartNumberMarker" => page.next_marker = Some(leaf.text.trim().to_string()),
                _ => {}
            },
            Visit::Leaf(leaf) if leaf.path.len() == 3 && leaf.path[1] == "Part" => {
                match leaf.path[2].as_str() {
                    "PartNumber" => number = leaf.text.trim().parse().ok(),
                    "ETag" => etag = Some(leaf.text.trim().to_string()),
                    "Size" => {
                        size = Some(
                            leaf.text
                                .trim()
                                .parse()
                                .map_err(|_| XmlRewriteError::BadSize(leaf.text.clone()))?,
                        )
                    }
                    _ => {}
                }
            }
            Visit::Close { path } if path.len() == 2 && path[1] == "Part" => {
                let etag = etag.take();
                if let (Some(n), Some(size)) = (number.take(), size.take()) {
                    page.parts.push((n, StoredPart { size, etag }));
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(page)
}

/// Replaces the text of the top-level `<UploadId>` (InitiateMultipartUploadResult,
/// ListPartsResult) with `f(old)`; returns the body and how many were replaced.
fn rewrite_upload_id(
    body: &[u8],
    f: impl Fn(&str) -> Option<String>,
) -> Result<(Vec<u8>, usize), XmlRewriteError> {
    let mut edits = Vec::new();
    walk(body, |visit| {
        if let Visit::Leaf(leaf) = visit
            && leaf.path.len() == 2
            && leaf.path[1] == "UploadId"
            && let Some(inner) = leaf.inner
            && let Some(new) = f(leaf.text.trim())
        {
            edits.push(Edit {
                range: inner,
                replacement: quick_xml::escape::escape(new.as_str())
                    .into_owned()
                    .into_bytes(),
            });
        }
        Ok(())
    })?;
    let n = edits.len();
    Ok((apply_edits(body, edits), n))
}

// ---------------------------------------------------------------------------------------------
// Layout of a stored multipart object

/// The plaintext sizes of the parts of a multipart object written through the gateway, from
/// its stored size, its part count `n` (from the `-N` ETag) and the stored size of part 1
/// (needed when `n > 1`). `None` when they do not describe a layout the gateway writes.
pub fn read_layout(stored_total: u64, n: u64, first_part_stored: Option<u64>) -> Option<Vec<u64>> {
    if n == 0 || n > MAX_PARTS {
        return None;
    }
    let plain_total = listing::multipart_plaintext_len(stored_total, n)?;
    if n == 1 {
        return Some(vec![plain_total]);
    }
    let p = chunked::plaintext_len(first_part_stored?)?;
    if p == 0 || !p.is_multiple_of(CHUNK) {
        return None;
    }
    let last = plain_total.checked_sub(p.checked_mul(n - 1)?)?;
    let mut sizes = vec![p; (n - 1) as usize];
    sizes.push(last);
    (listing::multipart_ciphertext_len(&sizes) == stored_total).then_some(sizes)
}

/// The message context of part `part`: the object's message context plus `ep:part`.
pub fn part_binding(env_header: &[u8], object_ctx: &Context, part: u64) -> Vec<u8> {
    let mut ctx = object_ctx.clone();
    ctx.insert(PART_KEY, part.to_string());
    binding(env_header, &ctx)
}

// ---------------------------------------------------------------------------------------------
// Opening a stream of stored bytes that spans parts

/// Which chunks of a part's message a [`ReadPiece`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// The whole message, its final chunk included (full reads).
    Whole,
    /// Chunks `first..=last` ([`Opener::range`]).
    Chunks {
        first: u64,
        last: u64,
        last_is_final: bool,
    },
}

/// The part of a read that falls in one part. Offsets are absolute stored offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPiece {
    /// The part number (its position, 1-based): bound into its message.
    pub part_number: u64,
    /// Stored offset of the part's message (its C2SP header).
    pub base: u64,
    /// The part's C2SP header if fetched separately; otherwise it is read from the stream at
    /// `base`.
    pub header: Option<[u8; HEADER_LEN]>,
    /// Stored bytes `[feed_start, feed_end)` go to the opener.
    pub feed_start: u64,
    pub feed_end: u64,
    pub kind: PieceKind,
    /// Plaintext to drop at the front, then to keep.
    pub skip: u64,
    pub len: u64,
}

impl ReadPiece {
    /// Whole parts, for a read of the whole object (`sizes`: plaintext sizes in part order).
    pub fn whole_object(sizes: &[u64]) -> Vec<ReadPiece> {
        let offsets = range::part_stored_offsets(sizes);
        sizes
            .iter()
            .zip(offsets)
            .enumerate()
            .map(|(i, (&p, base))| ReadPiece {
                part_number: i as u64 + 1,
                base,
                header: None,
                feed_start: base + HEADER_LEN as u64,
                feed_end: base + chunked::ciphertext_len(p),
                kind: PieceKind::Whole,
                skip: 0,
                len: p,
            })
            .collect()
    }

    /// The pieces of plaintext range `r` (headers read from the stream), and the stored range
    /// `[start, end]` (inclusive) that holds them and every covered part's header.
    pub fn for_range(r: &ResolvedRange, sizes: &[u64]) -> Option<(Vec<ReadPiece>, u64, u64)> {
        let offsets = range::part_stored_offsets(sizes);
        let pieces: Vec<ReadPiece> = r
            .split_parts(sizes)?
            .into_iter()
            .map(|piece| {
                let base = offsets[piece.part_index];
                let plan = piece.chunk_plan().at_offset(base);
                ReadPiece {
                    part_number: piece.part_index as u64 + 1,
                    base,
                    header: None,
                    feed_start: plan.stored_start,
                    feed_end: plan.stored_end + 1,
                    kind: PieceKind::Chunks {
                        first: plan.first_chunk,
                        last: plan.last_chunk,
                        last_is_final: plan.ends_at_final_chunk,
                    },
                    skip: plan.skip,
                    len: plan.len,
                }
            })
            .collect();
        let start = pieces.first()?.base;
        let end = pieces.last()?.feed_end - 1;
        Some((pieces, start, end))
    }
}

/// Why a multipart read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    #[error("part {part}: {source}")]
    Open { part: u64, source: OpenError },
    #[error("the stored bytes do not line up with the part layout")]
    Layout,
    #[error("the stored object ended before its last part")]
    Truncated,
}

enum Stage {
    /// Before the next piece (or its header).
    Next,
    /// Reading the current piece's C2SP header from the stream.
    Header(Vec<u8>),
    /// Feeding the current piece's chunks.
    Body {
        opener: Box<Opener>,
        skip: u64,
        left: u64,
    },
    Done,
    Failed(PartsError),
}

/// Opens stored bytes that span several parts (each its own message), piece by piece: a
/// synchronous state machine like [`Opener`], fed the upstream body from `fetched_start`.
/// Plaintext is appended only in whole chunks that authenticated; every part's header is
/// checked against its own commitment (so a part moved to another position, or a part of
/// another object, fails).
pub struct PartsOpener {
    key: Zeroizing<[u8; 32]>,
    env_header: Vec<u8>,
    /// Key context + `ep:object`.
    object_ctx: Context,
    /// Stored offset of the next byte fed.
    pos: u64,
    pieces: VecDeque<ReadPiece>,
    stage: Stage,
}

impl PartsOpener {
    pub fn new(
        key: &[u8; 32],
        env_header: &[u8],
        object_ctx: Context,
        fetched_start: u64,
        pieces: Vec<ReadPiece>,
    ) -> PartsOpener {
        PartsOpener {
            key: Zeroizing::new(*key),
            env_header: env_header.to_vec(),
            object_ctx,
            pos: fetched_start,
            pieces: pieces.into(),
            stage: Stage::Next,
        }
    }

    /// True once every piece has been opened: later bytes are not needed.
    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// The most [`push`](Self::push) of `input_len` bytes (or [`finish`](Self::finish), with 0)
    /// appends (plaintext is never longer than what is fed plus one held-back chunk): size
    /// `out` with it and it is never reallocated.
    pub fn output_bound(&self, input_len: usize) -> usize {
        input_len + chunked::SEALED_CHUNK_SIZE
    }

    fn open(&self, piece: &ReadPiece, header: &[u8; HEADER_LEN]) -> Result<Stage, PartsError> {
        if self.pos > piece.feed_start {
            return Err(PartsError::Layout);
        }
        let bind = part_binding(&self.env_header, &self.object_ctx, piece.part_number);
        let opener = match piece.kind {
            PieceKind::Whole => Opener::new(&self.key, &bind, header),
            PieceKind::Chunks {
                first,
                last,
                last_is_final,
            } => Opener::range(&self.key, &bind, header, first, last, last_is_final),
        }
        .map_err(|source| PartsError::Open {
            part: piece.part_number,
            source,
        })?;
        Ok(Stage::Body {
            opener: Box::new(opener),
            skip: piece.skip,
            left: piece.len,
        })
    }

    /// Take more stored bytes; append the plaintext they complete to `out`. An error poisons
    /// the opener.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), PartsError> {
        let result = self.push_inner(input, out);
        if let Err(e) = &result {
            self.stage = Stage::Failed(e.clone());
        }
        result
    }

    fn push_inner(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), PartsError> {
        loop {
            let stage = std::mem::replace(&mut self.stage, Stage::Done);
            match stage {
                Stage::Failed(e) => {
                    self.stage = Stage::Failed(e.clone());
                    return Err(e);
                }
                Stage::Done => {
                    self.pos += input.len() as u64;
                    return Ok(());
                }
                Stage::Next => {
                    let Some(piece) = self.pieces.front() else {
                        continue; // stage is Done
                    };
                    if let Some(h) = piece.header {
                        self.stage = self.open(piece, &h)?;
                        continue;
                    }
                    if self.pos > piece.base {
                        return Err(PartsError::Layout);
                    }
                    if self.pos == piece.base {
                        self.stage = Stage::Header(Vec::with_capacity(HEADER_LEN));
                        continue;
                    }
                    self.stage = Stage::Next;
                    if input.is_empty() {
                        return Ok(());
                    }
                    let n = (piece.base - self.pos).min(input.len() as u64) as usize;
                    input = &input[n..];
                    self.pos += n as u64;
                }
                Stage::Header(mut buf) => {
                    if input.is_empty() {
                        self.stage = Stage::Header(buf);
                        return Ok(());
                    }
                    let take = (HEADER_LEN - buf.len()).min(input.len());
                    buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.pos += take as u64;
                    self.stage = if buf.len() == HEADER_LEN {
                        let header: [u8; HEADER_LEN] =
                            buf.as_slice().try_into().map_err(|_| PartsError::Layout)?;
                        let piece = self.pieces.front().ok_or(PartsError::Layout)?;
                        self.open(piece, &header)?
                    } else {
                        Stage::Header(buf)
                    };
                }
                Stage::Body {
                    mut opener,
                    mut skip,
                    mut left,
                } => {
                    let (part, feed_start, feed_end) = {
                        let p = self.pieces.front().ok_or(PartsError::Layout)?;
                        (p.part_number, p.feed_start, p.feed_end)
                    };
                    let fail = |source| PartsError::Open { part, source };
                    if self.pos == feed_end {
                        let at = out.len();
                        opener.finish(out).map_err(fail)?;
                        trim(out, at, &mut skip, &mut left);
                        if left != 0 {
                            return Err(PartsError::Truncated);
                        }
                        self.pieces.pop_front();
                        self.stage = Stage::Next;
                        continue;
                    }
                    if input.is_empty() {
                        self.stage = Stage::Body { opener, skip, left };
                        return Ok(());
                    }
                    if self.pos < feed_start {
                        let n = (feed_start - self.pos).min(input.len() as u64) as usize;
                        input = &input[n..];
                        self.pos += n as u64;
                    } else {
                        let n = (feed_end - self.pos).min(input.len() as u64) as usize;
                        let at = out.len();
                        opener.push(&input[..n], out).map_err(fail)?;
                        trim(out, at, &mut skip, &mut left);
                        input = &input[n..];
                        self.pos += n as u64;
                    }
                    self.stage = Stage::Body { opener, skip, left };
                }
            }
        }
    }

    /// End of the stored bytes: every piece must have been opened.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), PartsError> {
        // A piece that ends exactly at the end of the stream is finished by an empty push.
        self.push(&[], out)?;
        match self.stage {
            Stage::Done => Ok(()),
            Stage::Failed(e) => Err(e),
            _ => Err(PartsError::Truncated),
        }
    }
}

/// The plaintext just appended to `out` (from `at` on): drop what remains of `skip` at its
/// front, keep at most `left` bytes. (An opener that fails leaves `out` as it was.)
fn trim(out: &mut Vec<u8>, at: usize, skip: &mut u64, left: &mut u64) {
    let produced = out.len().saturating_sub(at);
    let drop = (*skip).min(produced as u64) as usize;
    if drop > 0 {
        out.drain(at..at + drop);
        *skip -= drop as u64;
    }
    let keep = (*left).min((out.len() - at) as u64) as usize;
    out.truncate(at + keep);
    *left -= keep as u64;
}

/// The decrypted download body of a multipart object; a failure aborts the body.
fn open_parts_stream(
    body: hyper::body::Incoming,
    opener: PartsOpener,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    let state = Some((BodyExt::into_data_stream(body), opener));
    futures_util::stream::unfold(state, |state| async move {
        let (mut body, mut opener) = state?;
        let abort = |e: BoxError| {
            tracing::warn!(error = %e, "stored multipart object failed authentication or ended early; aborting the body");
            Some((Err(e), None))
        };
        loop {
            if opener.is_done() {
                return None;
            }
            match body.next().await {
                Some(Ok(bytes)) => {
                    let mut out = Vec::with_capacity(opener.output_bound(bytes.len()));
                    if let Err(e) = opener.push(&bytes, &mut out) {
                        return abort(Box::new(e));
                    }
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), Some((body, opener))));
                    }
                }
                Some(Err(e)) => return abort(Box::new(e)),
                None => {
                    let mut out = Vec::with_capacity(opener.output_bound(0));
                    return match opener.finish(&mut out) {
                        Err(e) => abort(Box::new(e)),
                        Ok(()) if out.is_empty() => None,
                        // The state is gone: the stream ends after this item.
                        Ok(()) => Some((Ok(Bytes::from(out)), None)),
                    };
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The operations

/// What [`Ctx::get_object`] learnt before handing a multipart object over.
pub(super) struct MultipartGet<'a> {
    pub client_headers: &'a HeaderMap,
    /// Upstream URI of the object (without `partNumber`).
    pub uri: http::Uri,
    /// Headers for upstream reads, without `Range`.
    pub base_headers: HeaderMap,
    /// The first upstream answer (2xx): a GET of the whole object, a ranged GET planned for
    /// a single message (dropped), or a HEAD.
    pub resp: http::Response<hyper::body::Incoming>,
    /// `resp` carries the whole stored object.
    pub whole_body: bool,
    pub meta: String,
    pub object_id: String,
    pub format: ObjectFormat,
    pub etag: Option<String>,
    pub stored_total: u64,
    /// The client's range and its header value.
    pub requested: Option<(RangeSpec, String)>,
    pub part: Option<u64>,
    pub head: bool,
}

/// Headers for the follow-up reads of one object: the client's conditions were checked by the
/// first request; these must hit the same object version (`If-Match` with its ETag).
fn follow_up_headers(base: &HeaderMap, etag_value: Option<&str>) -> HeaderMap {
    let mut h = base.clone();
    for name in [
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
    ] {
        h.remove(name);
    }
    if let Some(v) = etag_value.and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::IF_MATCH, v);
    }
    h
}

/// The storage does not answer `HEAD ?partNumber=1` with the part (no `x-amz-mp-parts-count`),
/// so the part layout of a multipart object cannot be known.
fn part_reads_unsupported() -> S3Error {
    tracing::warn!(
        "the storage ignores ?partNumber on HEAD (no x-amz-mp-parts-count): multipart objects cannot be read through the gateway"
    );
    S3Error::with_message(
        S3ErrorCode::NotImplemented,
        "the storage behind this gateway does not report part sizes (HEAD ?partNumber=1 without x-amz-mp-parts-count), so multipart objects cannot be decrypted; upload without multipart or use storage that supports part reads",
    )
}

fn changed_while_reading() -> S3Error {
    S3Error::with_message(
        S3ErrorCode::InternalError,
        "the object changed while it was being read; retry",
    )
}

/// An upstream error answer as an S3 error (code, message and status kept).
async fn upstream_error(resp: http::Response<hyper::body::Incoming>) -> S3Error {
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), XML_LIMIT)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut e = match xml_error::parse_error(&body) {
        Some(err) => S3Error::with_message(
            err.code.parse().unwrap_or(S3ErrorCode::InternalError),
            err.message.clone(),
        ),
        None => S3Error::with_message(
            S3ErrorCode::InternalError,
            format!("upstream answered {status}"),
        ),
    };
    if status.is_client_error() || status.is_server_error() {
        e.set_status_code(status);
    }
    e
}

impl Ctx<'_> {
    /// Requests with `?uploads` or `?uploadId` on a key.
    pub(super) async fn multipart(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let query = req.uri.query();
        let has = |name: &str| query_param(query, name).is_some();
        let (uploads, upload_id) = (has("uploads"), has("uploadId"));
        match req.method {
            Method::POST if uploads => self.create_upload(req).await,
            Method::POST if upload_id => self.complete_upload(req).await,
            Method::PUT if upload_id && req.headers.contains_key("x-amz-copy-source") => {
                self.upload_part_copy(req).await
            }
            Method::PUT if upload_id => self.upload_part(req).await,
            Method::GET if upload_id => self.list_parts(req).await,
            Method::DELETE if upload_id => self.abort_upload(req).await,
            // Anything else with ?uploads or ?uploadId (a PUT without uploadId, a GET without
            // one) must not pass through: the upstream could store or serve a raw body.
            _ => Err(S3Error::with_message(
                S3ErrorCode::NotImplemented,
                "this multipart request is not available through the encrypting gateway",
            )),
        }
    }

    async fn create_upload(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let key_ctx = self.authorized_context(&req.headers, crate::config::Action::Seal)?;
        // The parts' sizes are not known yet; each part is a message under this key.
        let sealing = self
            .state
            .keys
            .sealing_key(&self.cfg.keys, &key_ctx, 1, 0)
            .await
            .map_err(backend_error)?;
        let env_header = sealing.header.encode().map_err(internal)?;
        let mut object_id = [0u8; OBJECT_ID_LEN];
        crate::envelope::fill_random(&mut object_id);
        if encode_upload_id("", &env_header, &object_id, ObjectFormat::Bound).is_none() {
            return Err(internal("envelope header too long for an upload id"));
        }

        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        unmark_conditionals(&mut headers);
        headers.insert(
            HeaderName::from_static(META_ENVELOPE),
            HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(&env_header)).map_err(internal)?,
        );
        headers.insert(
            HeaderName::from_static(META_OBJECT_ID),
            HeaderValue::from_str(&hex::encode(object_id)).map_err(internal)?,
        );
        headers.insert(
            HeaderName::from_static(META_MULTIPART),
            HeaderValue::from_static("1"),
        );
        set_format_marker(&mut headers, ObjectFormat::Bound);
        let uri = self.upstream_uri(&req.uri)?;
        let resp = self.send_empty(Method::POST, uri, headers).await?;
        self.rewrite_xml(resp, |body| {
            let (out, n) = rewrite_upload_id(body, |upstream| {
                encode_upload_id(upstream, &env_header, &object_id, ObjectFormat::Bound)
            })
            .map_err(internal)?;
            if n != 1 {
                return Err(internal("CreateMultipartUpload answer without an UploadId"));
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn upload_part(&self, mut req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let query = req.uri.query().map(str::to_string);
        let id = parse_upload_id(&query_param(query.as_deref(), "uploadId").unwrap_or_default());
        let Some(sealed) = id.sealed else {
            return Err(bare_upload_id_refused());
        };
        let part =
            parse_part_number(&query_param(query.as_deref(), "partNumber").unwrap_or_default())?;
        let (plain_len, verifier) = upload_prelude(&req.headers)?;
        let key_ctx = self.authorized_context(&req.headers, crate::config::Action::Seal)?;
        let data_key = self
            .state
            .keys
            .opening_key_for(&sealed.header, &key_ctx, &self.cfg.keys)
            .await
            .map_err(|e| match e {
                crate::keys::BackendError::InvalidCiphertext => S3Error::with_message(
                    S3ErrorCode::InvalidArgument,
                    "the upload id's data key does not open in this bucket's encryption \
                     context (an upload id from another bucket, or an altered one)",
                ),
                other => backend_error(other),
            })?;
        // Bound to this request's bucket and key: a part sent for another key than the upload's
        // (S3 refuses the upload id there anyway) would not open under the upload's key.
        let object_ctx =
            self.object_context(sealed.format, &key_ctx, &hex::encode(sealed.object_id))?;
        let sealer = Sealer::new(
            data_key.expose(),
            &part_binding(&sealed.header_raw, &object_ctx, part),
        );
        let headers = upload_headers(&req.headers);
        let uri = self.upstream_uri_with_query(Some(&with_query_param(
            query.as_deref(),
            "uploadId",
            &id.upstream,
        )))?;
        // The plaintext also goes through the part-ETag MAC (the sealing stream verifies the
        // client's checksums and reports them for the answer).
        let tee = Arc::new(Mutex::new(PartTee {
            mac: Some(part_etag_mac(data_key.expose(), &sealed.object_id, part)?),
            seen: 0,
        }));
        let feed = tee.clone();
        let input = std::mem::replace(&mut req.input, Body::empty()).inspect(move |item| {
            if let Ok(bytes) = item {
                feed.lock().unwrap_or_else(|p| p.into_inner()).update(bytes);
            }
        });
        req.input = Body::http_body(http_body_util::StreamBody::new(
            input.map_ok(hyper::body::Frame::data),
        ));
        let (resp, verified) = self
            .send_sealed(uri, headers, req, sealer, verifier, plain_len)
            .await?;
        let mut out = Self::forward_upload(resp, &verified)?;
        if out.status.is_some_and(|s| s.is_success()) {
            let mut t = tee.lock().unwrap_or_else(|p| p.into_inner());
            // The upstream only commits a part once the sealer's final chunk went out, which
            // follows the client's last byte: anything else is a bug, never a wrong ETag.
            if t.seen != plain_len {
                return Err(internal(
                    "UploadPart answered before the whole part was read",
                ));
            }
            let mac = t
                .mac
                .take()
                .ok_or_else(|| internal("part ETag taken twice"))?;
            out.headers.insert(
                header::ETAG,
                HeaderValue::from_str(&part_etag(mac)).map_err(internal)?,
            );
        }
        Ok(out)
    }

    async fn complete_upload(&self, mut req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let query = req.uri.query().map(str::to_string);
        // A bare upstream id (from ListMultipartUploads) completes too: Complete seals nothing,
        // and a read checks every part against the metadata Create stored, whichever id the
        // client names here.
        let id = parse_upload_id(&query_param(query.as_deref(), "uploadId").unwrap_or_default());
        let mut headers = req.headers.clone();
        // The client's total describes plaintext: checked here, not forwarded.
        let object_size = headers
            .remove("x-amz-mp-object-size")
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        S3Error::with_message(
                            S3ErrorCode::InvalidArgument,
                            "x-amz-mp-object-size is not a number",
                        )
                    })
            })
            .transpose()?;
        strip_request_headers(&mut headers);
        unmark_conditionals(&mut headers);
        let body = req
            .input
            .store_all_limited(COMPLETE_BODY_LIMIT)
            .await
            .map_err(|_| {
                S3Error::with_message(
                    S3ErrorCode::MalformedXML,
                    "the CompleteMultipartUpload body could not be read or is too large",
                )
            })?;
        let complete = rewrite_complete_body(&body).map_err(|why| {
            S3Error::with_message(
                S3ErrorCode::MalformedXML,
                format!("The XML you provided was not well-formed: {why}"),
            )
        })?;
        check_part_numbers(&complete.part_numbers)?;

        let parts_count = complete.part_numbers.len();
        let stored = match self.list_all_parts(&id.upstream).await {
            Ok(stored) => stored,
            // The upload is gone: a retried Complete of an upload that completed answers as
            // S3 does, with the result again.
            Err(e) if e.code() == &S3ErrorCode::NoSuchUpload => {
                return self.completed_earlier(&req, &id, parts_count, e).await;
            }
            Err(e) => return Err(e),
        };
        let mut sizes = Vec::with_capacity(parts_count);
        let mut etags = BTreeMap::new();
        for n in &complete.part_numbers {
            let part = stored.get(n).ok_or_else(|| {
                S3Error::with_message(
                    S3ErrorCode::InvalidPart,
                    format!("part {n} has not been uploaded"),
                )
            })?;
            sizes.push(chunked::plaintext_len(part.size).ok_or_else(|| {
                S3Error::with_message(
                    S3ErrorCode::InvalidPart,
                    format!("part {n} was not sealed by the encrypting gateway"),
                )
            })?);
            if let Some(e) = &part.etag {
                etags.insert(*n, e.clone());
            }
        }
        check_min_part_size(&sizes)?;
        check_layout(&sizes).map_err(|why| S3Error::with_message(S3ErrorCode::InvalidPart, why))?;
        // The client names the part ETags the gateway answered with; upstream gets its own
        // ETags of the parts it holds under those numbers (FORMAT.md §9).
        let body = set_part_etags(&complete.body, &etags).map_err(internal)?;
        let total: u64 = sizes.iter().sum();
        if let Some(claimed) = object_size
            && claimed != total
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidRequest,
                format!("x-amz-mp-object-size is {claimed} but the parts hold {total} bytes"),
            ));
        }

        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let uri = self.upstream_uri_with_query(Some(&with_query_param(
            query.as_deref(),
            "uploadId",
            &id.upstream,
        )))?;
        let resp = self
            .send(
                Method::POST,
                uri,
                headers,
                crate::pipeline::full_body(Bytes::from(body)),
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            // Another Complete of the same upload won the race.
            let e = upstream_error(resp).await;
            if e.code() == &S3ErrorCode::NoSuchUpload {
                return self.completed_earlier(&req, &id, parts_count, e).await;
            }
            return Err(e);
        }
        // 200 with <Error> inside is turned into an error by rewrite_xml. Upstream checksums
        // in the result would describe ciphertext.
        self.rewrite_xml(resp, |b| {
            let (b, _) = super::checksum::strip_checksum_elements(b).map_err(internal)?;
            etag::mark_in_xml(&b).map_err(internal)
        })
        .await
    }

    /// The answer to a Complete whose upload is gone upstream (`gone`: the NoSuchUpload):
    /// if the object at the key was completed from this upload, the
    /// CompleteMultipartUploadResult again, as S3 answers a repeated Complete; otherwise
    /// `gone`. "From this upload" is the object's metadata naming the upload id's object id
    /// and envelope header, with as many parts as the request lists: a bare upstream id
    /// carries neither, so its retry stays NoSuchUpload.
    async fn completed_earlier(
        &self,
        req: &S3Request<Body>,
        id: &UploadId,
        parts_count: usize,
        gone: S3Error,
    ) -> S3Result<S3Response<Body>> {
        let Some(sealed) = &id.sealed else {
            return Err(gone);
        };
        let uri = self.upstream_uri_with_query(None)?;
        let resp = self.send_empty(Method::HEAD, uri, HeaderMap::new()).await?;
        if !resp.status().is_success() {
            return Err(gone);
        }
        let h = resp.headers();
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let etag_value = get(header::ETAG.as_str()).map(str::to_string);
        let ours = is_multipart(h)
            && get(META_OBJECT_ID) == Some(hex::encode(sealed.object_id).as_str())
            && get(META_ENVELOPE) == Some(URL_SAFE_NO_PAD.encode(&sealed.header_raw).as_str())
            && etag_value.as_deref().and_then(etag::multipart_parts) == Some(parts_count as u64);
        let (Some(etag_value), true) = (etag_value, ours) else {
            return Err(gone);
        };
        let (Some(bucket), Some(key)) = (self.target.bucket.as_deref(), self.target.key.as_deref())
        else {
            return Err(gone);
        };
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let location = format!(
            "{}://{host}{}",
            req.uri.scheme_str().unwrap_or("http"),
            req.uri.path()
        );
        let body = complete_result_xml(&location, bucket, key, &etag_value);
        let mut out = S3Response::new(Body::from(body.clone()));
        out.status = Some(StatusCode::OK);
        out.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        out.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(v) = h.get("x-amz-version-id") {
            out.headers
                .insert(HeaderName::from_static("x-amz-version-id"), v.clone());
        }
        Ok(out)
    }

    /// Every part of an upload as upstream stores it, by part number.
    async fn list_all_parts(&self, upstream_id: &str) -> S3Result<BTreeMap<u64, StoredPart>> {
        let mut parts = BTreeMap::new();
        let mut marker: Option<String> = None;
        // 10 000 parts at 1000 a page, plus slack for stores with smaller pages.
        for _ in 0..=MAX_PARTS {
            let mut q = format!("uploadId={}&max-parts=1000", encode_component(upstream_id));
            if let Some(m) = &marker {
                q.push_str("&part-number-marker=");
                q.push_str(&encode_component(m));
            }
            let uri = self.upstream_uri_with_query(Some(&q))?;
            let resp = self.send_empty(Method::GET, uri, HeaderMap::new()).await?;
            if !resp.status().is_success() {
                return Err(upstream_error(resp).await);
            }
            let body = http_body_util::Limited::new(resp.into_body(), XML_LIMIT)
                .collect()
                .await
                .map_err(internal)?
                .to_bytes();
            let page = parse_list_parts(&body).map_err(internal)?;
            let last = page.parts.iter().map(|p| p.0).max();
            parts.extend(page.parts);
            if !page.truncated {
                return Ok(parts);
            }
            let next = page
                .next_marker
                .filter(|m| !m.is_empty() && Some(m) != marker.as_ref())
                .or_else(|| last.map(|l| l.to_string()))
                .ok_or_else(|| internal("ListParts is truncated without a marker"))?;
            marker = Some(next);
        }
        Err(internal("ListParts did not end"))
    }

    /// The client's upload id, and the upstream URI and headers of a body-less request on it
    /// (the proxy's upload id swapped for the upstream's).
    fn upload_request(&self, req: &S3Request<Body>) -> S3Result<(String, http::Uri, HeaderMap)> {
        let query = req.uri.query();
        let client_id = query_param(query, "uploadId").unwrap_or_default();
        let id = parse_upload_id(&client_id);
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        let uri =
            self.upstream_uri_with_query(Some(&with_query_param(query, "uploadId", &id.upstream)))?;
        Ok((client_id, uri, headers))
    }

    async fn list_parts(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let (client_id, uri, headers) = self.upload_request(&req)?;
        let resp = self.send_empty(Method::GET, uri, headers).await?;
        self.rewrite_xml(resp, |body| {
            let listed = listing::rewrite(body, plaintext_size)
                .map_err(internal)?
                .body;
            rewrite_upload_id(&listed, |_| Some(client_id.clone()))
                .map(|(b, _)| b)
                .map_err(internal)
        })
        .await
    }

    async fn abort_upload(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let (_, uri, headers) = self.upload_request(&req)?;
        let resp = self.send_empty(Method::DELETE, uri, headers).await?;
        Ok(Self::forward(resp))
    }

    /// The stored size of part 1, from `HEAD ?partNumber=1`.
    pub(super) async fn first_part_stored_size(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        n: u64,
    ) -> S3Result<u64> {
        let uri = with_uri_query(uri, &with_query_param(uri.query(), "partNumber", "1"))?;
        // Not conditional: stores differ on which ETag a part HEAD answers with.
        let mut headers = follow_up_headers(headers, None);
        headers.remove(header::RANGE);
        let resp = self.send_empty(Method::HEAD, uri, headers).await?;
        if !resp.status().is_success() {
            return Err(decrypt_error("HEAD ?partNumber=1 failed"));
        }
        let number = |name: &str| -> Option<u64> {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        match number("x-amz-mp-parts-count") {
            Some(count) if count != n => return Err(changed_while_reading()),
            Some(_) => {}
            // A store that ignores `partNumber` (s3s-fs 0.14) answers with the whole object:
            // its length is not part 1's, and guessing the layout could only fail later.
            None => return Err(part_reads_unsupported()),
        }
        number("content-length").ok_or_else(|| decrypt_error("part 1 without a length"))
    }

    /// The 56-byte C2SP header of the part stored at `base`.
    async fn fetch_part_header(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        base: u64,
    ) -> S3Result<[u8; HEADER_LEN]> {
        let mut headers = headers.clone();
        headers.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes={}-{}", base, base + HEADER_LEN as u64 - 1))
                .map_err(internal)?,
        );
        let resp = self.send_empty(Method::GET, uri.clone(), headers).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => return Err(changed_while_reading()),
            _ => return Err(decrypt_error("part header fetch failed")),
        }
        let bytes = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map_err(internal)?
            .to_bytes();
        bytes
            .as_ref()
            .try_into()
            .map_err(|_| decrypt_error("short part header"))
    }

    /// GET/HEAD of an object written by a multipart upload (see the module docs).
    pub(super) async fn get_multipart(&self, g: MultipartGet<'_>) -> S3Result<S3Response<Body>> {
        let n = g
            .etag
            .as_deref()
            .and_then(etag::multipart_parts)
            .filter(|&n| n <= MAX_PARTS)
            .ok_or_else(|| decrypt_error("multipart object without a part count in its ETag"))?;
        let plain_total = listing::multipart_plaintext_len(g.stored_total, n)
            .ok_or_else(|| decrypt_error("impossible stored size for a multipart object"))?;

        // The key context comes from this request; the object id and header from the object.
        let key_ctx = self.authorized_context(g.client_headers, crate::config::Action::Open)?;
        // Multipart metadata holds the envelope header only: each part carries its C2SP header.
        let (env_header, used, data_key) = self.open_envelope(&g.meta, &key_ctx).await?;
        if used != env_header.len() {
            return Err(decrypt_error("bad envelope metadata length"));
        }
        let object_ctx = self.object_context(g.format, &key_ctx, &g.object_id)?;

        let (mut parts, first_body) = g.resp.into_parts();
        clean_response_headers(&mut parts.headers);
        parts.headers.remove(header::CONTENT_RANGE);
        parts
            .headers
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let respond =
            |mut parts: http::response::Parts, body: Body| -> S3Result<S3Response<Body>> {
                let mut out = S3Response::new(body);
                out.status = Some(parts.status);
                out.headers = std::mem::take(&mut parts.headers);
                Ok(out)
            };

        if g.head && g.part.is_none() {
            parts.status = StatusCode::OK;
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(plain_total));
            return respond(parts, Body::empty());
        }

        let sizes = if n == 1 {
            vec![plain_total]
        } else {
            let first = self
                .first_part_stored_size(&g.uri, &g.base_headers, n)
                .await?;
            read_layout(g.stored_total, n, Some(first))
                .ok_or_else(|| decrypt_error("stored sizes do not match a gateway part layout"))?
        };

        // The plaintext range to serve (None: the whole object).
        let range = match (g.part, &g.requested) {
            (Some(k), _) => {
                let index = usize::try_from(k - 1).map_err(internal)?;
                let len = *sizes.get(index).ok_or_else(invalid_part_number)?;
                let start: u64 = sizes[..index].iter().sum();
                parts.headers.insert(
                    HeaderName::from_static("x-amz-mp-parts-count"),
                    HeaderValue::from(n),
                );
                if len == 0 {
                    // An empty (last) part.
                    parts.status = StatusCode::OK;
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
                    return respond(parts, Body::empty());
                }
                Some(
                    ResolvedRange::new(start, start + len - 1, plain_total)
                        .ok_or_else(|| internal("part range outside the object"))?,
                )
            }
            (None, Some((spec, raw))) => Some(
                spec.resolve(plain_total, raw)
                    .map_err(|_| invalid_range(Some(plain_total)))?,
            ),
            (None, None) => None,
        };
        let len = match &range {
            Some(r) => {
                parts.status = StatusCode::PARTIAL_CONTENT;
                parts.headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&r.content_range()).map_err(internal)?,
                );
                r.len()
            }
            None => {
                parts.status = StatusCode::OK;
                plain_total
            }
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if g.head {
            return respond(parts, Body::empty());
        }

        let follow_up = follow_up_headers(&g.base_headers, g.etag.as_deref());
        let (body, fetched_start, pieces) = match range {
            None if g.whole_body => (first_body, 0, ReadPiece::whole_object(&sizes)),
            None => {
                drop(first_body);
                let resp = self
                    .send_empty(Method::GET, g.uri.clone(), follow_up)
                    .await?;
                match resp.status() {
                    StatusCode::OK => {}
                    StatusCode::PRECONDITION_FAILED => return Err(changed_while_reading()),
                    _ => return Err(upstream_error(resp).await),
                }
                (resp.into_body(), 0, ReadPiece::whole_object(&sizes))
            }
            Some(r) => {
                drop(first_body);
                let (mut pieces, mut start, end) = ReadPiece::for_range(&r, &sizes)
                    .ok_or_else(|| internal("range does not split over the parts"))?;
                // The first part's header: in the fetched range when the range starts in the
                // part's first chunk, else fetched on its own (56 bytes).
                if let Some(first) = pieces.first_mut()
                    && first.feed_start > first.base + HEADER_LEN as u64
                {
                    first.header = Some(
                        self.fetch_part_header(&g.uri, &follow_up, first.base)
                            .await?,
                    );
                    start = first.feed_start;
                }
                let mut headers = follow_up;
                headers.insert(
                    header::RANGE,
                    HeaderValue::from_str(&format!("bytes={start}-{end}")).map_err(internal)?,
                );
                let resp = self.send_empty(Method::GET, g.uri.clone(), headers).await?;
                let fetched_start = match resp.status() {
                    StatusCode::PARTIAL_CONTENT => resp
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(range::parse_content_range)
                        .and_then(|c| c.range)
                        .map(|(s, _)| s)
                        .filter(|&s| s <= start)
                        .ok_or_else(|| internal("upstream returned another range than asked"))?,
                    StatusCode::OK => 0,
                    StatusCode::PRECONDITION_FAILED => return Err(changed_while_reading()),
                    _ => return Err(upstream_error(resp).await),
                };
                (resp.into_body(), fetched_start, pieces)
            }
        };
        let opener = PartsOpener::new(
            data_key.expose(),
            &env_header,
            object_ctx,
            fetched_start,
            pieces,
        );
        respond(
            parts,
            Body::http_body(boxed_stream(
                self.counted_open(open_parts_stream(body, opener)),
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::WrappedKey;
    use crate::transform::s3_object::OBJECT_ID_KEY;
    use proptest::prelude::*;

    fn header() -> (Header, Vec<u8>) {
        let h = Header {
            edks: vec![WrappedKey {
                backend: "local".into(),
                key_id: "objects".into(),
                key_version: 1,
                blob: vec![7; 60],
            }],
        };
        let raw = h.encode().unwrap();
        (h, raw)
    }

    #[test]
    fn upload_ids_round_trip() {
        let (h, raw) = header();
        let oid = [9u8; 16];
        for upstream in ["abc", "a.b.c", "VXBsb2Fk-_~", "x+y/z="] {
            for format in [ObjectFormat::Unbound, ObjectFormat::Bound] {
                let id = encode_upload_id(upstream, &raw, &oid, format).unwrap();
                assert!(id.starts_with(upstream));
                let parsed = parse_upload_id(&id);
                assert_eq!(parsed.upstream, upstream);
                let sealed = parsed.sealed.unwrap();
                assert_eq!(sealed.header, h);
                assert_eq!(sealed.header_raw, raw);
                assert_eq!(sealed.object_id, oid);
                assert_eq!(sealed.format, format);
            }
        }
        // Bare ids, and ids whose suffix does not parse, are taken whole.
        for bare in ["abc", "a.b", ".abc", "abc.", "2~Xyz.AAAA"] {
            let parsed = parse_upload_id(bare);
            assert_eq!(parsed.upstream, bare);
            assert!(parsed.sealed.is_none());
        }
        // A suffix with a wrong length prefix or trailing bytes is refused.
        let id = encode_upload_id("u", &raw, &oid, ObjectFormat::Bound).unwrap();
        let mut blob = URL_SAFE_NO_PAD
            .decode(id.split_once('.').unwrap().1)
            .unwrap();
        blob.push(0);
        assert!(
            parse_upload_id(&format!("u.{}", URL_SAFE_NO_PAD.encode(&blob)))
                .sealed
                .is_none()
        );
        assert!(encode_upload_id("u", &vec![0; 70_000], &oid, ObjectFormat::Bound).is_none());
    }

    #[test]
    fn query_helpers() {
        let q = Some("partNumber=3&uploadId=a.b%2Bc&x-id=UploadPart");
        assert_eq!(query_param(q, "uploadId").as_deref(), Some("a.b+c"));
        assert_eq!(
            with_query_param(q, "uploadId", "up+/="),
            "partNumber=3&x-id=UploadPart&uploadId=up%2B%2F%3D"
        );
        assert_eq!(
            without_query_param(Some("partNumber=1&versionId=v"), "partNumber").as_deref(),
            Some("versionId=v")
        );
        assert_eq!(
            without_query_param(Some("partNumber=1"), "partNumber"),
            None
        );
        assert_eq!(with_query_param(None, "partNumber", "1"), "partNumber=1");
        let uri: http::Uri = "http://h:1/b/k?partNumber=2".parse().unwrap();
        assert_eq!(part_number_query(&uri).unwrap(), Some(2));
        for bad in ["0", "10001", "x", ""] {
            let uri: http::Uri = format!("http://h/b/k?partNumber={bad}").parse().unwrap();
            assert!(part_number_query(&uri).is_err(), "{bad}");
        }
        let u = with_uri_query(&"http://h:1/b/k?a=1".parse().unwrap(), "b=2").unwrap();
        assert_eq!(u.to_string(), "http://h:1/b/k?b=2");
    }

    #[test]
    fn complete_body() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Part><ETag>&quot;0123456789abcdef0123456789abcdef-0&quot;</ETag><PartNumber>1</PartNumber>
    <ChecksumCRC32>AAAAAA==</ChecksumCRC32></Part>
  <Part><PartNumber>2</PartNumber><ETag>"fedcba9876543210fedcba9876543210-0"</ETag></Part>
</CompleteMultipartUpload>"#;
        let c = rewrite_complete_body(body).unwrap();
        assert_eq!(c.part_numbers, vec![1, 2]);
        let out = String::from_utf8(c.body).unwrap();
        assert!(out.contains("&quot;0123456789abcdef0123456789abcdef&quot;"));
        assert!(out.contains("\"fedcba9876543210fedcba9876543210\""));
        assert!(!out.contains("Checksum"));
        assert!(!out.contains("-0&quot;") && !out.contains("-0\""));
        for bad in [
            &b"<CompleteMultipartUpload><Part><ETag>x</ETag></Part></CompleteMultipartUpload>"[..],
            b"<CompleteMultipartUpload><Part/></CompleteMultipartUpload>",
            b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber></Part></CompleteMultipartUpload>",
            b"<Other><Part><PartNumber>1</PartNumber></Part></Other>",
            b"<CompleteMultipartUpload><Part>",
        ] {
            assert!(rewrite_complete_body(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn part_number_and_layout_rules() {
        assert!(check_part_numbers(&[1, 2, 3]).is_ok());
        assert!(check_part_numbers(&[1]).is_ok());
        assert_eq!(
            check_part_numbers(&[]).unwrap_err().code(),
            &S3ErrorCode::MalformedXML
        );
        assert_eq!(
            check_part_numbers(&[2, 1]).unwrap_err().code(),
            &S3ErrorCode::InvalidPartOrder
        );
        assert_eq!(
            check_part_numbers(&[1, 3]).unwrap_err().code(),
            &S3ErrorCode::InvalidPart
        );
        let mib5 = 5 << 20;
        assert!(check_layout(&[mib5, mib5, 7]).is_ok());
        assert!(check_layout(&[mib5, mib5, mib5 + 1]).is_ok());
        assert!(check_layout(&[123]).is_ok());
        assert!(check_layout(&[0]).is_ok());
        assert!(check_layout(&[mib5 + 100, mib5 + 100, 7]).is_err());
        assert!(check_layout(&[mib5, 2 * mib5, 7]).is_err());
        assert!(check_layout(&[0, 7]).is_err());
        assert!(check_layout(&[]).is_err());
    }

    #[test]
    fn list_parts_and_upload_id_xml() {
        let body = br#"<ListPartsResult><Bucket>b</Bucket><Key>k</Key><UploadId>up-1</UploadId>
<PartNumberMarker>0</PartNumberMarker><NextPartNumberMarker>2</NextPartNumberMarker>
<IsTruncated>true</IsTruncated>
<Part><PartNumber>1</PartNumber><ETag>"x"</ETag><Size>100</Size></Part>
<Part><Size>200</Size><PartNumber>2</PartNumber></Part></ListPartsResult>"#;
        let page = parse_list_parts(body).unwrap();
        assert_eq!(
            page,
            PartsPage {
                parts: vec![
                    (
                        1,
                        StoredPart {
                            size: 100,
                            etag: Some("\"x\"".into())
                        }
                    ),
                    (
                        2,
                        StoredPart {
                            size: 200,
                            etag: None
                        }
                    )
                ],
                truncated: true,
                next_marker: Some("2".into())
            }
        );
        let (out, n) = rewrite_upload_id(body, |old| Some(format!("{old}.<&>"))).unwrap();
        assert_eq!(n, 1);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("<UploadId>up-1.&lt;&amp;&gt;</UploadId>")
        );
    }

    #[test]
    fn part_size_minimum_comes_first() {
        let mib = 1 << 20;
        assert!(check_min_part_size(&[5 * mib, 5 * mib, 1]).is_ok());
        assert!(check_min_part_size(&[1]).is_ok());
        assert!(check_min_part_size(&[]).is_ok());
        let e = check_min_part_size(&[mib, 7]).unwrap_err();
        assert_eq!(e.code(), &S3ErrorCode::EntityTooSmall);
        assert_eq!(e.status_code(), Some(StatusCode::BAD_REQUEST));
        // 1 MiB is a multiple of 16 KiB: the layout rule alone would accept it.
        assert!(check_layout(&[mib, mib, 7]).is_ok());
        assert!(check_min_part_size(&[5 * mib, 5 * mib - 1, 7]).is_err());
    }

    #[test]
    fn complete_body_gets_upstream_etags() {
        let body = br#"<CompleteMultipartUpload><Part><ETag>"aa-0"</ETag><PartNumber>1</PartNumber></Part>
<Part><PartNumber>2</PartNumber><ETag>&quot;bb-0&quot;</ETag></Part><Part><PartNumber>3</PartNumber></Part>
<Part><PartNumber>4</PartNumber><ETag>"dd"</ETag></Part></CompleteMultipartUpload>"#;
        let etags = BTreeMap::from([
            (1, "\"u1\"".to_string()),
            (2, "\"u<2>\"".to_string()),
            (3, "\"u3\"".to_string()),
        ]);
        let out = String::from_utf8(set_part_etags(body, &etags).unwrap()).unwrap();
        assert!(
            out.contains("<ETag>&quot;u1&quot;</ETag><PartNumber>1</PartNumber>"),
            "{out}"
        );
        assert!(out.contains("<ETag>&quot;u&lt;2&gt;&quot;</ETag>"), "{out}");
        assert!(!out.contains("u3"), "no ETag element to set: {out}");
        assert!(out.contains("<ETag>\"dd\"</ETag>"), "no listed ETag: {out}");
        assert!(set_part_etags(b"<CompleteMultipartUpload><Part>", &etags).is_err());
    }

    #[test]
    fn part_etags_follow_the_plaintext() {
        let etag_of = |key: &[u8; 32], oid: &[u8; 16], part: u64, chunks: &[&[u8]]| {
            let mut m = part_etag_mac(key, oid, part).unwrap();
            for c in chunks {
                m.update(c);
            }
            part_etag(m)
        };
        let (k, oid) = ([1u8; 32], [2u8; 16]);
        let e = etag_of(&k, &oid, 1, &[b"hello ", b"world"]);
        assert!(etag::is_marked(&e), "{e}");
        assert!(e.starts_with('"') && e.ends_with("-0\""), "{e}");
        // FORMAT.md §9, computed independently (Python's hmac).
        assert_eq!(e, "\"003b1d6d1fb8a23661555d20865fa4e1-0\"");
        // Same bytes, framed differently: same ETag.
        assert_eq!(e, etag_of(&k, &oid, 1, &[b"hello world"]));
        // Anything else differs: the bytes, the part number, the upload's object id or key.
        for other in [
            etag_of(&k, &oid, 1, &[b"hello worlD"]),
            etag_of(&k, &oid, 2, &[b"hello world"]),
            etag_of(&k, &[3; 16], 1, &[b"hello world"]),
            etag_of(&[4; 32], &oid, 1, &[b"hello world"]),
        ] {
            assert_ne!(e, other);
        }
        let xml = complete_result_xml("http://h/b/k&", "b", "a<b", "\"x-2\"");
        let text = String::from_utf8(xml).unwrap();
        assert!(
            text.contains("<Key>a&lt;b</Key>") && text.contains("<ETag>&quot;x-2&quot;</ETag>")
        );
        assert!(text.contains("<Location>http://h/b/k&amp;</Location>"));
    }

    #[test]
    fn layouts() {
        let p = 5u64 << 20;
        let sizes = vec![p, p, p, 3 << 20];
        let stored = listing::multipart_ciphertext_len(&sizes);
        let first = chunked::ciphertext_len(p);
        assert_eq!(read_layout(stored, 4, Some(first)), Some(sizes));
        // Another part size gives another (consistent) layout: hence the HEAD ?partNumber=1.
        assert_eq!(
            read_layout(stored, 4, Some(first + 16400)),
            Some(vec![p + CHUNK, p + CHUNK, p + CHUNK, (3 << 20) - 3 * CHUNK])
        );
        assert_eq!(read_layout(stored, 4, Some(first + 400 * 16400)), None);
        assert_eq!(read_layout(stored, 4, Some(first + 1)), None);
        assert_eq!(read_layout(stored, 4, None), None);
        let single = chunked::ciphertext_len(1000);
        assert_eq!(read_layout(single, 1, None), Some(vec![1000]));
        assert_eq!(read_layout(single, 0, None), None);
        assert_eq!(read_layout(single, MAX_PARTS + 1, None), None);
        // Empty last part.
        let sizes = vec![CHUNK, 0];
        let stored = listing::multipart_ciphertext_len(&sizes);
        assert_eq!(
            read_layout(stored, 2, Some(chunked::ciphertext_len(CHUNK))),
            Some(sizes)
        );
    }

    const KEY: [u8; 32] = [3; 32];

    fn object_ctx() -> Context {
        let mut c = Context::new();
        c.insert("bucket", "b");
        c.insert(OBJECT_ID_KEY, "00ff");
        c
    }

    /// Seal parts the way UploadPart does and concatenate them.
    fn store(plain: &[u8], sizes: &[u64], env: &[u8], numbers: &[u64]) -> Vec<u8> {
        let mut stored = Vec::new();
        let mut at = 0usize;
        for (&p, &number) in sizes.iter().zip(numbers) {
            let mut sealer = Sealer::new(&KEY, &part_binding(env, &object_ctx(), number));
            stored.extend_from_slice(&sealer.header());
            let mut out = Vec::new();
            sealer.push(&plain[at..at + p as usize], &mut out);
            sealer.finish(&mut out);
            stored.extend(out);
            at += p as usize;
        }
        stored
    }

    fn read(
        stored: &[u8],
        env: &[u8],
        fetched_start: u64,
        end: u64,
        pieces: Vec<ReadPiece>,
        frame: usize,
    ) -> Result<Vec<u8>, PartsError> {
        let mut opener = PartsOpener::new(&KEY, env, object_ctx(), fetched_start, pieces);
        let mut out = Vec::new();
        for piece in stored[fetched_start as usize..=end as usize].chunks(frame) {
            opener.push(piece, &mut out)?;
        }
        opener.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn whole_reads_and_tampering() {
        let (_, env) = header();
        let sizes = [2 * CHUNK, 2 * CHUNK, 5000];
        let total: u64 = sizes.iter().sum();
        let plain: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let stored = store(&plain, &sizes, &env, &[1, 2, 3]);
        let end = stored.len() as u64 - 1;
        for frame in [1, 7, 16400, 100_000] {
            let got = read(
                &stored,
                &env,
                0,
                end,
                ReadPiece::whole_object(&sizes),
                frame,
            )
            .unwrap();
            assert_eq!(got, plain);
        }
        // A flipped byte in part 2.
        let mut bad = stored.clone();
        bad[(chunked::ciphertext_len(2 * CHUNK) + 100) as usize] ^= 1;
        assert!(read(&bad, &env, 0, end, ReadPiece::whole_object(&sizes), 4096).is_err());
        // Parts in another order (sealed as 2, 1, 3) fail at the first part's commitment.
        let swapped = store(&plain, &sizes, &env, &[2, 1, 3]);
        assert!(matches!(
            read(
                &swapped,
                &env,
                0,
                end,
                ReadPiece::whole_object(&sizes),
                4096
            ),
            Err(PartsError::Open { part: 1, .. })
        ));
        // Truncated: the stream ends early.
        let mut opener =
            PartsOpener::new(&KEY, &env, object_ctx(), 0, ReadPiece::whole_object(&sizes));
        let mut out = Vec::new();
        opener.push(&stored[..stored.len() - 1], &mut out).unwrap();
        assert!(opener.finish(&mut out).is_err());
        // Another object's header binding.
        let (_, other_env) = {
            let mut h = header().0;
            h.edks[0].key_version = 2;
            let raw = h.encode().unwrap();
            (h, raw)
        };
        assert!(
            read(
                &stored,
                &other_env,
                0,
                end,
                ReadPiece::whole_object(&sizes),
                4096
            )
            .is_err()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Ranged reads over parts, with the first header fetched apart or from the stream,
        /// in frames of any size, give exactly the requested bytes.
        #[test]
        fn ranged_reads(
            chunks in 1u64..4, n in 1usize..4, last in 0u64..40_000,
            a in any::<u64>(), b in any::<u64>(), frame in 1usize..40_000, apart in any::<bool>(),
        ) {
            let (_, env) = header();
            let mut sizes = vec![chunks * CHUNK; n - 1];
            sizes.push(last);
            let total: u64 = sizes.iter().sum();
            prop_assume!(total > 0);
            let plain: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
            let numbers: Vec<u64> = (1..=n as u64).collect();
            let stored = store(&plain, &sizes, &env, &numbers);
            let (x, y) = (a % total, b % total);
            let r = ResolvedRange::new(x.min(y), x.max(y), total).unwrap();
            let (mut pieces, mut start, end) = ReadPiece::for_range(&r, &sizes).unwrap();
            if apart && pieces[0].feed_start > pieces[0].base + 56 {
                let base = pieces[0].base as usize;
                pieces[0].header = Some(stored[base..base + 56].try_into().unwrap());
                start = pieces[0].feed_start;
            }
            let got = read(&stored, &env, start, end, pieces, frame).unwrap();
            prop_assert_eq!(got, plain[r.start() as usize..=r.end() as usize].to_vec());
        }
    }
}
