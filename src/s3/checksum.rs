//! Client checksums: verified by the proxy over the plaintext, never forwarded.
//!
//! A client's `Content-MD5` and `x-amz-checksum-*` describe the bytes *it* sends, i.e. the
//! plaintext. Upstream only ever sees ciphertext, so forwarding them makes every upload fail
//! (or, against a store that does not check, pass unverified). The gateway therefore:
//!
//! 1. builds a [`Verifier`] from the request headers ([`Verifier::from_headers`]) — this
//!    rejects malformed or conflicting checksum headers up front, before any byte is sent
//!    upstream;
//! 2. feeds it the decoded plaintext as it streams ([`Verifier::update`]);
//! 3. at the end of the body calls [`Verifier::finish`] with the aws-chunked trailers, if
//!    any, and only then lets the upload complete (never send the final chunk upstream
//!    before this passed);
//! 4. calls [`strip_checksum_headers`] on the upstream request (they describe plaintext) and
//!    on the upstream response of GET/HEAD/PUT (they describe ciphertext: an SDK that
//!    validates response checksums fails on every download otherwise).
//!
//! Header forms (values are base64 of the big-endian digest):
//!
//! | header | digest |
//! |---|---|
//! | `Content-MD5` | MD5, 16 bytes |
//! | `x-amz-checksum-crc32` | CRC-32 (ISO-HDLC, zlib's), 4 bytes |
//! | `x-amz-checksum-crc32c` | CRC-32C (Castagnoli), 4 bytes |
//! | `x-amz-checksum-crc64nvme` | CRC-64/NVME, 8 bytes |
//! | `x-amz-checksum-sha1` | SHA-1, 20 bytes |
//! | `x-amz-checksum-sha256` | SHA-256, 32 bytes |
//!
//! `x-amz-sdk-checksum-algorithm: CRC32` names the algorithm the SDK used; its value comes
//! either in the matching `x-amz-checksum-*` header or, with `aws-chunked` bodies, in a
//! trailer announced by `x-amz-trailer: x-amz-checksum-crc32`. S3 accepts one flexible
//! checksum per request (plus an optional `Content-MD5`).
//!
//! What S3 answers (and [`ChecksumError::s3_code`] returns), all `400 Bad Request`:
//!
//! | failure | code | message |
//! |---|---|---|
//! | Content-MD5 not base64 of 16 bytes | `InvalidDigest` | The Content-MD5 you specified is not valid. |
//! | Content-MD5 ≠ MD5 of the body | `BadDigest` | The Content-MD5 you specified did not match what we received. |
//! | `x-amz-checksum-*` value malformed | `InvalidRequest` | Value for x-amz-checksum-crc32 header is invalid. |
//! | `x-amz-checksum-*` ≠ checksum of the body | `BadDigest` | The CRC32 you specified did not match the calculated checksum. |
//! | several `x-amz-checksum-*` values | `InvalidRequest` | Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed. |
//! | unknown `x-amz-sdk-checksum-algorithm` | `InvalidRequest` | Checksum algorithm provided is unsupported. … |
//! | value for another algorithm than `x-amz-sdk-checksum-algorithm` | `BadDigest` (as the S3 API reference documents) | |
//! | announced trailer missing at the end of the body | `InvalidRequest` | |
//!
//! `XAmzContentChecksumMismatch` is *not* an S3 error code: S3 reports a flexible checksum
//! mismatch as `BadDigest` (the similarly named `XAmzContentSHA256Mismatch` is about the
//! SigV4 payload hash `x-amz-content-sha256`, which the signature verifier handles).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use http::{HeaderMap, HeaderName, StatusCode};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::s3::listing::{Edit, Visit, XmlRewriteError, apply_edits, is_checksum_value, walk};

/// The `x-amz-checksum-*` algorithms S3 supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Crc32,
        Algorithm::Crc32c,
        Algorithm::Crc64Nvme,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];

    /// The S3 name (`CRC32`, `CRC32C`, `CRC64NVME`, `SHA1`, `SHA256`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    /// The value header / trailer name (`x-amz-checksum-crc32`, ...).
    pub fn header_name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Crc32 | Algorithm::Crc32c => 4,
            Algorithm::Crc64Nvme => 8,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
        }
    }

    /// From the S3 name, case-insensitively.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    /// From a value header / trailer name, case-insensitively.
    pub fn from_header_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.header_name().eq_ignore_ascii_case(name.trim()))
    }
}

/// Why a request's checksums were refused. See the module docs for the S3 codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("The Content-MD5 you specified is not valid.")]
    InvalidContentMd5,
    #[error("The Content-MD5 you specified did not match what we received.")]
    ContentMd5Mismatch,
    #[error("Value for {} header is invalid.", .0.header_name())]
    InvalidValue(Algorithm),
    #[error("The {} you specified did not match the calculated checksum.", .0.name())]
    Mismatch(Algorithm),
    #[error("Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")]
    Multiple,
    #[error(
        "Checksum algorithm provided is unsupported. Please try again with any of the valid types: [CRC32, CRC32C, CRC64NVME, SHA1, SHA256]"
    )]
    UnsupportedAlgorithm,
    #[error(
        "The value for x-amz-sdk-checksum-algorithm ({announced}) does not match the {} provided.",
        .provided.header_name()
    )]
    AlgorithmMismatch {
        announced: &'static str,
        provided: Algorithm,
    },
    #[error("The {} trailer announced in x-amz-trailer was not received.", .0.header_name())]
    MissingTrailer(Algorithm),
}

impl ChecksumError {
    /// The S3 error code to answer with.
    pub fn s3_code(&self) -> &'static str {
        match self {
            ChecksumError::InvalidContentMd5 => "InvalidDigest",
            ChecksumError::ContentMd5Mismatch
            | ChecksumError::Mismatch(_)
            | ChecksumError::AlgorithmMismatch { .. } => "BadDigest",
            ChecksumError::InvalidValue(_)
            | ChecksumError::Multiple
            | ChecksumError::UnsupportedAlgorithm
            | ChecksumError::MissingTrailer(_) => "InvalidRequest",
        }
    }

    /// Always `400 Bad Request`.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

enum Hasher {
    Crc(CrcDigest),
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Crc32 => Hasher::Crc(CrcDigest::new(CrcAlgorithm::Crc32IsoHdlc)),
            Algorithm::Crc32c => Hasher::Crc(CrcDigest::new(CrcAlgorithm::Crc32Iscsi)),
            Algorithm::Crc64Nvme => Hasher::Crc(CrcDigest::new(CrcAlgorithm::Crc64Nvme)),
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc(d) => d.update(data),
            Hasher::Sha1(d) => d.update(data),
            Hasher::Sha256(d) => d.update(data),
        }
    }

    fn finish(self, algorithm: Algorithm) -> Vec<u8> {
        match self {
            Hasher::Crc(d) => {
                let v = d.finalize();
                if algorithm == Algorithm::Crc64Nvme {
                    v.to_be_bytes().to_vec()
                } else {
                    (v as u32).to_be_bytes().to_vec()
                }
            }
            Hasher::Sha1(d) => d.finalize().to_vec(),
            Hasher::Sha256(d) => d.finalize().to_vec(),
        }
    }
}

/// Where the expected flexible checksum comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// From a request header, decoded.
    Header(Vec<u8>),
    /// From the aws-chunked trailer of that name, at [`Verifier::finish`].
    Trailer,
    /// Only the algorithm was announced (`x-amz-sdk-checksum-algorithm` without a value):
    /// computed and reported, nothing to compare with.
    Nothing,
}

struct Flexible {
    algorithm: Algorithm,
    hasher: Hasher,
    expected: Expected,
}

/// Incremental verification of a request body's client checksums over the plaintext.
pub struct Verifier {
    md5: Option<(Md5, [u8; 16])>,
    flexible: Option<Flexible>,
}

/// What [`Verifier::finish`] verified (or computed), e.g. to echo `x-amz-checksum-crc32` in
/// the PutObject response as S3 does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verified {
    /// The flexible checksum: algorithm and base64 value of the plaintext, if the request
    /// named one (verified unless only the algorithm was announced).
    pub checksum: Option<(Algorithm, String)>,
    /// True if a `Content-MD5` was verified.
    pub content_md5: bool,
}

impl Verified {
    /// `(header name, base64 value)` of the flexible checksum, for the response.
    pub fn response_header(&self) -> Option<(HeaderName, String)> {
        self.checksum
            .as_ref()
            .map(|(a, v)| (HeaderName::from_static(a.header_name()), v.clone()))
    }
}

fn decode_b64(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let bytes = STANDARD.decode(s).ok()?;
    (bytes.len() == len).then_some(bytes)
}

/// One header's values, requiring at most one.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(|v| v.as_bytes()))
}

impl Verifier {
    /// Reads `Content-MD5`, `x-amz-checksum-{crc32,crc32c,crc64nvme,sha1,sha256}`,
    /// `x-amz-sdk-checksum-algorithm` and `x-amz-trailer` from the client's request headers.
    /// Fails (before any body byte is read) on malformed values, several flexible checksums
    /// (header and/or trailer), an unsupported algorithm name, or a value for another
    /// algorithm than the announced one. Other `x-amz-checksum-*` headers
    /// (`-type`, `-algorithm` of CreateMultipartUpload, `-mode` of GET) carry no value and
    /// are ignored here (but stripped by [`strip_checksum_headers`]).
    pub fn from_headers(headers: &HeaderMap) -> Result<Verifier, ChecksumError> {
        let md5 =
            match single(headers, "content-md5").map_err(|_| ChecksumError::InvalidContentMd5)? {
                None => None,
                Some(v) => {
                    let d = decode_b64(v, 16).ok_or(ChecksumError::InvalidContentMd5)?;
                    Some((Md5::new(), d.try_into().expect("16 bytes")))
                }
            };

        let announced = match single(headers, "x-amz-sdk-checksum-algorithm")
            .map_err(|_| ChecksumError::UnsupportedAlgorithm)?
        {
            None => None,
            Some(v) => Some(
                std::str::from_utf8(v)
                    .ok()
                    .and_then(Algorithm::from_name)
                    .ok_or(ChecksumError::UnsupportedAlgorithm)?,
            ),
        };

        // Values in headers.
        let mut found: Vec<(Algorithm, Expected)> = Vec::new();
        for algorithm in Algorithm::ALL {
            let v =
                single(headers, algorithm.header_name()).map_err(|_| ChecksumError::Multiple)?;
            if let Some(v) = v {
                let d = decode_b64(v, algorithm.digest_len())
                    .ok_or(ChecksumError::InvalidValue(algorithm))?;
                found.push((algorithm, Expected::Header(d)));
            }
        }
        // Values announced as trailers (comma-separated list of trailer names).
        for value in headers.get_all("x-amz-trailer") {
            let Ok(list) = value.to_str() else { continue };
            for name in list.split(',') {
                if let Some(algorithm) = Algorithm::from_header_name(name) {
                    found.push((algorithm, Expected::Trailer));
                }
            }
        }

        let flexible = match (found.len(), announced) {
            (0, None) => None,
            (0, Some(algorithm)) => Some((algorithm, Expected::Nothing)),
            (1, announced) => {
                let (algorithm, expected) = found.pop().expect("one");
                if let Some(a) = announced
                    && a != algorithm
                {
                    return Err(ChecksumError::AlgorithmMismatch {
                        announced: a.name(),
                        provided: algorithm,
                    });
                }
                Some((algorithm, expected))
            }
            _ => return Err(ChecksumError::Multiple),
        };

        Ok(Verifier {
            md5,
            flexible: flexible.map(|(algorithm, expected)| Flexible {
                algorithm,
                hasher: Hasher::new(algorithm),
                expected,
            }),
        })
    }

    /// True if there is nothing to verify or compute (no checksum headers at all).
    /// The flexible checksum the client sent as a request header: algorithm and base64 value,
    /// known before the body (so it can be stored with the object once verified).
    pub fn announced(&self) -> Option<(Algorithm, String)> {
        match &self.flexible {
            Some(Flexible {
                algorithm,
                expected: Expected::Header(v),
                ..
            }) => Some((*algorithm, STANDARD.encode(v))),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.md5.is_none() && self.flexible.is_none()
    }

    /// The flexible checksum algorithm in use, if any.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.flexible.as_ref().map(|f| f.algorithm)
    }

    /// True if the flexible checksum's value is expected in a trailer.
    pub fn expects_trailer(&self) -> bool {
        self.flexible
            .as_ref()
            .is_some_and(|f| f.expected == Expected::Trailer)
    }

    /// Feeds the next plaintext bytes (the decoded body, in order).
    pub fn update(&mut self, data: &[u8]) {
        if let Some((md5, _)) = &mut self.md5 {
            md5.update(data);
        }
        if let Some(f) = &mut self.flexible {
            f.hasher.update(data);
        }
    }

    /// Call once the body has ended, with the aws-chunked trailers if the body had any.
    /// Checks `Content-MD5` first, then the flexible checksum (from its header, or from the
    /// trailer announced in `x-amz-trailer`: missing → [`ChecksumError::MissingTrailer`]).
    /// Trailer names are matched case-insensitively (a `HeaderMap` lower-cases them).
    pub fn finish(self, trailers: Option<&HeaderMap>) -> Result<Verified, ChecksumError> {
        let mut verified = Verified::default();
        if let Some((md5, expected)) = self.md5 {
            let got: [u8; 16] = md5.finalize().into();
            if got != expected {
                return Err(ChecksumError::ContentMd5Mismatch);
            }
            verified.content_md5 = true;
        }
        if let Some(f) = self.flexible {
            let got = f.hasher.finish(f.algorithm);
            let expected = match f.expected {
                Expected::Header(d) => Some(d),
                Expected::Nothing => None,
                Expected::Trailer => {
                    let value = trailers
                        .and_then(|t| t.get(f.algorithm.header_name()))
                        .ok_or(ChecksumError::MissingTrailer(f.algorithm))?;
                    Some(
                        decode_b64(value.as_bytes(), f.algorithm.digest_len())
                            .ok_or(ChecksumError::InvalidValue(f.algorithm))?,
                    )
                }
            };
            if let Some(expected) = expected
                && expected != got
            {
                return Err(ChecksumError::Mismatch(f.algorithm));
            }
            verified.checksum = Some((f.algorithm, STANDARD.encode(&got)));
        }
        Ok(verified)
    }
}

/// True for the headers [`strip_checksum_headers`] removes.
pub fn is_checksum_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-amz-checksum-")
        || n == "x-amz-sdk-checksum-algorithm"
        || n == "content-md5"
        || n == "x-amz-trailer"
}

/// Removes every `x-amz-checksum-*` (values, `-type`, `-algorithm`, `-mode`),
/// `x-amz-sdk-checksum-algorithm`, `Content-MD5` and `x-amz-trailer` header; returns how many
/// values were removed.
///
/// Use on the upstream request of PutObject / UploadPart / CompleteMultipartUpload (the
/// values describe plaintext or a body the proxy rewrites) and on upstream responses of
/// GET / HEAD / PUT / UploadPart / Complete (they describe ciphertext). Do **not** use it on
/// requests whose body the proxy forwards unchanged and for which S3 *requires* a checksum
/// (DeleteObjects, PutBucketLifecycleConfiguration, PutObjectLockConfiguration, ...): there
/// the client's values are correct and needed. The aws-chunked framing headers
/// (`Content-Encoding: aws-chunked`, `x-amz-decoded-content-length`) are the signature
/// layer's business and are not touched.
pub fn strip_checksum_headers(headers: &mut HeaderMap) -> usize {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_checksum_header(n))
        .cloned()
        .collect();
    let mut removed = 0;
    for name in names {
        removed += headers.get_all(&name).iter().count();
        headers.remove(&name);
    }
    removed
}

/// Removes every checksum *value* element (`<ChecksumCRC32>`, `<ChecksumCRC32C>`,
/// `<ChecksumCRC64NVME>`, `<ChecksumSHA1>`, `<ChecksumSHA256>`, any `<Checksum…>` except
/// `<ChecksumAlgorithm>` / `<ChecksumType>`), at any depth, with the whitespace before it;
/// every other byte is kept. Returns the body and the number of elements removed.
///
/// - CompleteMultipartUpload **request** body: the client's per-part checksums describe
///   plaintext parts, and the parts went upstream without checksums; S3 rejects a Complete
///   that names checksums the parts do not have. (Unmark the ETags too:
///   [`crate::s3::etag::unmark_in_xml`].)
/// - CompleteMultipartUploadResult, CopyObjectResult, CopyPartResult **responses**: upstream
///   checksums of ciphertext.
///
/// Listings have this built in ([`crate::s3::listing::rewrite`]).
pub fn strip_checksum_elements(body: &[u8]) -> Result<(Vec<u8>, usize), XmlRewriteError> {
    let mut edits = Vec::new();
    walk(body, |visit| {
        if let Visit::Leaf(leaf) = visit
            && leaf.path.len() > 1
            && leaf.path.last().is_some_and(|n| is_checksum_value(n))
        {
            let mut start = leaf.outer.start;
            while start > 0 && body[start - 1].is_ascii_whitespace() {
                start -= 1;
            }
            edits.push(Edit {
                range: start..leaf.outer.end,
                replacement: Vec::new(),
            });
        }
        Ok(())
    })?;
    let n = edits.len();
    Ok((apply_edits(body, edits), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn check(
        pairs: &[(&str, &str)],
        body: &[u8],
        trailers: Option<&HeaderMap>,
    ) -> Result<Verified, ChecksumError> {
        let mut v = Verifier::from_headers(&headers(pairs))?;
        // Feed in uneven pieces to exercise the incremental path.
        for piece in body.chunks(3) {
            v.update(piece);
        }
        v.finish(trailers)
    }

    // Values cross-checked with Python (zlib.crc32, hashlib) and bit-by-bit CRC-32C /
    // CRC-64/NVME implementations that reproduce the published check values below.
    const HELLO: &[u8] = b"hello world";
    const VECTORS: &[(&[u8], Algorithm, &str)] = &[
        (b"hello world", Algorithm::Crc32, "DUoRhQ=="), // 0x0d4a1185
        (b"hello world", Algorithm::Crc32c, "yZRlqg=="), // 0xc99465aa
        (b"hello world", Algorithm::Crc64Nvme, "jSnVw/bqjr4="), // 0x8d29d5c3f6ea8ebe
        (
            b"hello world",
            Algorithm::Sha1,
            "Kq5sNclPz7QV2+lfQIuc6R7oRu0=",
        ),
        (
            b"hello world",
            Algorithm::Sha256,
            "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=",
        ),
        (b"123456789", Algorithm::Crc32, "y/Q5Jg=="), // check value 0xCBF43926
        (b"123456789", Algorithm::Crc32c, "4waSgw=="), // check value 0xE3069283
        (b"123456789", Algorithm::Crc64Nvme, "rosUhgp5mIg="), // check value 0xAE8B14860A799888
        (b"", Algorithm::Crc32, "AAAAAA=="),
        (b"", Algorithm::Crc64Nvme, "AAAAAAAAAAA="),
        (
            b"",
            Algorithm::Sha256,
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ),
    ];

    #[test]
    fn known_vectors_pass_in_headers_and_trailers() {
        for &(data, algorithm, b64) in VECTORS {
            let v = check(&[(algorithm.header_name(), b64)], data, None).unwrap();
            assert_eq!(
                v.checksum,
                Some((algorithm, b64.to_owned())),
                "{algorithm:?} {data:?}"
            );
            // As a trailer, as boto3 sends it over TLS.
            let trailers = headers(&[(algorithm.header_name(), b64)]);
            let v = check(
                &[
                    ("x-amz-sdk-checksum-algorithm", algorithm.name()),
                    ("x-amz-trailer", algorithm.header_name()),
                ],
                data,
                Some(&trailers),
            )
            .unwrap();
            assert_eq!(v.checksum, Some((algorithm, b64.to_owned())));
            assert_eq!(
                v.response_header(),
                Some((
                    HeaderName::from_static(algorithm.header_name()),
                    b64.to_owned()
                ))
            );
        }
    }

    #[test]
    fn crc_values_as_numbers() {
        let crc = |a, d: &[u8]| {
            let mut x = CrcDigest::new(a);
            x.update(d);
            x.finalize()
        };
        assert_eq!(crc(CrcAlgorithm::Crc32IsoHdlc, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc(CrcAlgorithm::Crc32Iscsi, b"123456789"), 0xE306_9283);
        assert_eq!(
            crc(CrcAlgorithm::Crc64Nvme, b"123456789"),
            0xAE8B_1486_0A79_9888
        );
        assert_eq!(crc(CrcAlgorithm::Crc32IsoHdlc, HELLO), 0x0D4A_1185);
        assert_eq!(crc(CrcAlgorithm::Crc32Iscsi, HELLO), 0xC994_65AA);
    }

    #[test]
    fn mismatches_name_the_algorithm() {
        for &(data, algorithm, _) in VECTORS {
            let wrong = STANDARD.encode(vec![0x5a; algorithm.digest_len()]);
            let e = check(&[(algorithm.header_name(), &wrong)], data, None).unwrap_err();
            assert_eq!(e, ChecksumError::Mismatch(algorithm));
            assert_eq!(e.s3_code(), "BadDigest");
            assert_eq!(
                e.to_string(),
                format!(
                    "The {} you specified did not match the calculated checksum.",
                    algorithm.name()
                )
            );
        }
        // Trailer mismatch.
        let trailers = headers(&[("x-amz-checksum-crc32", "AAAAAA==")]);
        let e = check(
            &[("x-amz-trailer", "x-amz-checksum-crc32")],
            HELLO,
            Some(&trailers),
        )
        .unwrap_err();
        assert_eq!(e, ChecksumError::Mismatch(Algorithm::Crc32));
    }

    #[test]
    fn content_md5() {
        let ok = check(&[("content-md5", "XrY7u+Ae7tCTyyK7j1rNww==")], HELLO, None).unwrap();
        assert!(ok.content_md5);
        assert_eq!(ok.checksum, None);
        // Empty body.
        assert!(check(&[("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")], b"", None).is_ok());
        let e = check(&[("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")], HELLO, None).unwrap_err();
        assert_eq!(e, ChecksumError::ContentMd5Mismatch);
        assert_eq!(e.s3_code(), "BadDigest");
        assert_eq!(
            e.to_string(),
            "The Content-MD5 you specified did not match what we received."
        );
        for bad in [
            "not base64!",
            "XrY7u+Ae7tCTyyK7j1rN",
            "AAAA",
            "XrY7u+Ae7tCTyyK7j1rNwwAA",
        ] {
            let e = Verifier::from_headers(&headers(&[("content-md5", bad)]))
                .err()
                .unwrap();
            assert_eq!(e, ChecksumError::InvalidContentMd5, "{bad}");
            assert_eq!(e.s3_code(), "InvalidDigest");
        }
        // Content-MD5 together with a flexible checksum: both checked, MD5 first.
        let both = [
            ("content-md5", "XrY7u+Ae7tCTyyK7j1rNww=="),
            ("x-amz-checksum-crc32", "DUoRhQ=="),
        ];
        let v = check(&both, HELLO, None).unwrap();
        assert!(v.content_md5);
        assert_eq!(v.checksum, Some((Algorithm::Crc32, "DUoRhQ==".into())));
        assert_eq!(
            check(&both, b"hello World", None),
            Err(ChecksumError::ContentMd5Mismatch)
        );
    }

    #[test]
    fn malformed_and_conflicting_headers() {
        let err = |pairs: &[(&str, &str)]| Verifier::from_headers(&headers(pairs)).err().unwrap();
        assert_eq!(
            err(&[("x-amz-checksum-crc32", "DUoRhQ")]),
            ChecksumError::InvalidValue(Algorithm::Crc32)
        );
        assert_eq!(
            err(&[("x-amz-checksum-crc32", "jSnVw/bqjr4=")]),
            ChecksumError::InvalidValue(Algorithm::Crc32)
        );
        assert_eq!(
            err(&[("x-amz-checksum-sha256", "")]),
            ChecksumError::InvalidValue(Algorithm::Sha256)
        );
        let e = err(&[("x-amz-checksum-crc32c", "%%%")]);
        assert_eq!(e.s3_code(), "InvalidRequest");
        assert_eq!(
            e.to_string(),
            "Value for x-amz-checksum-crc32c header is invalid."
        );
        assert_eq!(
            err(&[
                ("x-amz-checksum-crc32", "DUoRhQ=="),
                ("x-amz-checksum-crc32c", "yZRlqg==")
            ]),
            ChecksumError::Multiple
        );
        assert_eq!(
            err(&[
                ("x-amz-checksum-crc32", "DUoRhQ=="),
                ("x-amz-checksum-crc32", "DUoRhQ==")
            ]),
            ChecksumError::Multiple
        );
        assert_eq!(
            err(&[
                ("x-amz-checksum-crc32", "DUoRhQ=="),
                ("x-amz-trailer", "x-amz-checksum-crc32")
            ]),
            ChecksumError::Multiple
        );
        assert_eq!(
            err(&[("x-amz-sdk-checksum-algorithm", "MD5")]),
            ChecksumError::UnsupportedAlgorithm
        );
        let e = err(&[
            ("x-amz-sdk-checksum-algorithm", "CRC32"),
            (
                "x-amz-checksum-sha256",
                "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=",
            ),
        ]);
        assert_eq!(
            e,
            ChecksumError::AlgorithmMismatch {
                announced: "CRC32",
                provided: Algorithm::Sha256
            }
        );
        assert_eq!(e.s3_code(), "BadDigest");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        // The gateway answers with s3s's error for the code (upload_prelude).
        let code: s3s::S3ErrorCode = e.s3_code().parse().unwrap();
        assert_eq!(code, s3s::S3ErrorCode::BadDigest);
    }

    #[test]
    fn announced_algorithm_without_value_is_computed() {
        let v = check(
            &[("x-amz-sdk-checksum-algorithm", "crc64nvme")],
            HELLO,
            None,
        )
        .unwrap();
        assert_eq!(
            v.checksum,
            Some((Algorithm::Crc64Nvme, "jSnVw/bqjr4=".into()))
        );
        // Name matching is case-insensitive and the header value may be padded.
        let v = check(&[("x-amz-sdk-checksum-algorithm", " Sha1 ")], HELLO, None).unwrap();
        assert_eq!(v.checksum.unwrap().0, Algorithm::Sha1);
    }

    #[test]
    fn trailers() {
        let pairs = [
            ("x-amz-sdk-checksum-algorithm", "CRC32C"),
            ("x-amz-trailer", "x-amz-checksum-crc32c"),
        ];
        let v = Verifier::from_headers(&headers(&pairs)).unwrap();
        assert!(v.expects_trailer());
        assert_eq!(v.algorithm(), Some(Algorithm::Crc32c));
        // Missing entirely, or trailers without our value.
        assert_eq!(
            check(&pairs, HELLO, None),
            Err(ChecksumError::MissingTrailer(Algorithm::Crc32c))
        );
        let other = headers(&[("x-amz-checksum-crc32", "DUoRhQ==")]);
        assert_eq!(
            check(&pairs, HELLO, Some(&other)),
            Err(ChecksumError::MissingTrailer(Algorithm::Crc32c))
        );
        // Malformed trailer value.
        let bad = headers(&[("x-amz-checksum-crc32c", "zz")]);
        assert_eq!(
            check(&pairs, HELLO, Some(&bad)),
            Err(ChecksumError::InvalidValue(Algorithm::Crc32c))
        );
        // A non-checksum trailer alongside is fine; names in x-amz-trailer may have spaces.
        let pairs = [("x-amz-trailer", "x-amz-meta-foo, x-amz-checksum-crc32c")];
        let t = headers(&[
            ("x-amz-meta-foo", "bar"),
            ("x-amz-checksum-crc32c", "yZRlqg=="),
        ]);
        assert!(check(&pairs, HELLO, Some(&t)).is_ok());
    }

    #[test]
    fn strips_checksum_elements_from_complete_bodies() {
        let body = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n",
            r#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
            "\n  <Part>\n    <ETag>&quot;0c78aef83f66abc1fa1e8477f296d394&quot;</ETag>",
            "\n    <ChecksumCRC32>DUoRhQ==</ChecksumCRC32>",
            "\n    <PartNumber>1</PartNumber>\n  </Part>",
            "\n  <Part><ETag>&quot;acbd18db4cc2f85cedef654fccc4a4d8&quot;</ETag>",
            "<ChecksumCRC64NVME>jSnVw/bqjr4=</ChecksumCRC64NVME><PartNumber>2</PartNumber></Part>",
            "\n</CompleteMultipartUpload>"
        );
        let (out, n) = strip_checksum_elements(body.as_bytes()).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            body.replace("\n    <ChecksumCRC32>DUoRhQ==</ChecksumCRC32>", "")
                .replace("<ChecksumCRC64NVME>jSnVw/bqjr4=</ChecksumCRC64NVME>", "")
        );
        // Copy result: checksum of ciphertext removed, type kept; nothing else changes.
        let copy = "<CopyObjectResult><ETag>\"9b2cf535f27731c974343645a3985328\"</ETag>\
                    <LastModified>2024-11-28T23:20:00.000Z</LastModified>\
                    <ChecksumType>FULL_OBJECT</ChecksumType>\
                    <ChecksumCRC64NVME>AAAAAAAAAAA=</ChecksumCRC64NVME></CopyObjectResult>";
        let (out, n) = strip_checksum_elements(copy.as_bytes()).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            copy.replace("<ChecksumCRC64NVME>AAAAAAAAAAA=</ChecksumCRC64NVME>", "")
        );
        // A root element named like a checksum is not removed; malformed XML is an error.
        let (out, n) = strip_checksum_elements(b"<ChecksumCRC32>x</ChecksumCRC32>").unwrap();
        assert_eq!(
            (out.as_slice(), n),
            (&b"<ChecksumCRC32>x</ChecksumCRC32>"[..], 0)
        );
        assert!(strip_checksum_elements(b"<a><ChecksumCRC32>x</a>").is_err());
    }

    #[test]
    fn verifier_moves_across_tasks() {
        // The gateway keeps it inside a body stream that must be Send + Sync.
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Verifier>();
        assert_send_sync::<ChecksumError>();
    }

    #[test]
    fn empty_verifier() {
        let v = Verifier::from_headers(&headers(&[
            ("content-type", "text/plain"),
            ("x-amz-checksum-mode", "ENABLED"),
        ]))
        .unwrap();
        assert!(v.is_empty());
        assert_eq!(v.finish(None), Ok(Verified::default()));
    }

    #[test]
    fn strips_all_checksum_headers() {
        let mut h = headers(&[
            ("content-md5", "XrY7u+Ae7tCTyyK7j1rNww=="),
            ("x-amz-checksum-crc32", "DUoRhQ=="),
            ("x-amz-checksum-crc64nvme", "jSnVw/bqjr4="),
            ("x-amz-checksum-type", "FULL_OBJECT"),
            ("x-amz-checksum-algorithm", "CRC32"),
            ("x-amz-checksum-mode", "ENABLED"),
            ("x-amz-sdk-checksum-algorithm", "CRC32"),
            ("x-amz-trailer", "x-amz-checksum-crc32"),
            ("X-Amz-Checksum-SHA256", "x"),
            ("content-type", "application/octet-stream"),
            ("content-length", "11"),
            ("x-amz-meta-checksum", "keep"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ("etag", "\"x\""),
        ]);
        h.append("x-amz-checksum-crc32", HeaderValue::from_static("second"));
        assert_eq!(strip_checksum_headers(&mut h), 10);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "content-length",
                "content-type",
                "etag",
                "x-amz-content-sha256",
                "x-amz-meta-checksum"
            ]
        );
        assert_eq!(strip_checksum_headers(&mut h), 0);
    }

    proptest! {
        /// Incremental hashing in arbitrary pieces equals the one-shot digest.
        #[test]
        fn incremental_equals_one_shot(data in proptest::collection::vec(any::<u8>(), 0..5000), cuts in proptest::collection::vec(0usize..5000, 0..8)) {
            for algorithm in Algorithm::ALL {
                let mut one = Hasher::new(algorithm);
                one.update(&data);
                let expected = STANDARD.encode(one.finish(algorithm));
                let mut v = Verifier::from_headers(&headers(&[(algorithm.header_name(), &expected)])).unwrap();
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
                cuts.sort_unstable();
                let mut at = 0;
                for c in cuts { v.update(&data[at..c]); at = c; }
                v.update(&data[at..]);
                prop_assert_eq!(v.finish(None), Ok(Verified { checksum: Some((algorithm, expected)), content_md5: false }));
            }
        }
    }
}
