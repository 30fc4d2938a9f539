//! A sealed upload as it goes upstream: `aws-chunked` with a trailing CRC32 of the ciphertext
//! (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`, as the AWS SDKs send over TLS).
//!
//! The client's checksums describe the plaintext and end at the gateway (it verifies them).
//! Without an integrity header of its own, the storage could not check what reached it, and
//! buckets with Object Lock refuse every write (`MissingUploadObjectWithObjectLockHeaders`: S3
//! wants Content-MD5 or a flexible checksum). The ciphertext streams, so its checksum is only
//! known at its end: it goes as the aws-chunked trailer `x-amz-checksum-crc32`, computed while
//! streaming. Chunks are a fixed 64 KiB (the last shorter), so the encoded length is known
//! before the first byte, as S3 requires a Content-Length.
//!
//! Turned off per route with `[route.s3] upstream_checksum = false` for a store that does not
//! take aws-chunked uploads.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::VecDeque;

use bytes::Bytes;
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use futures_util::{Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::pipeline::BoxError;

/// Decoded bytes per aws-chunked chunk (the last may be shorter).
pub const CHUNK: u64 = 64 * 1024;
/// The trailer's name.
pub const TRAILER: &str = "x-amz-checksum-crc32";
/// The payload hash of an unsigned aws-chunked body with trailers.
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// Base64 of a 4-byte CRC32.
const CRC32_B64_LEN: u64 = 8;

fn hex_digits(n: u64) -> u64 {
    (u64::BITS - n.leading_zeros()).div_ceil(4).max(1) as u64
}

fn frame_len(n: u64) -> u64 {
    hex_digits(n) + 2 + n + 2
}

/// The encoded length of `decoded` bytes: data chunks, the final `0` chunk, the trailer line
/// and the closing empty line.
pub fn encoded_len(decoded: u64) -> u64 {
    let (full, rest) = (decoded / CHUNK, decoded % CHUNK);
    let data = full * frame_len(CHUNK) + if rest > 0 { frame_len(rest) } else { 0 };
    data + 3 + TRAILER.len() as u64 + 1 + CRC32_B64_LEN + 2 + 2
}

/// Set the upstream headers of an aws-chunked upload of `decoded` bytes (replacing
/// `Content-Length`; a client's `Content-Encoding` stays after `aws-chunked`).
pub fn set_headers(headers: &mut HeaderMap, decoded: u64) {
    let encoding = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        Some(ce) if !ce.trim().is_empty() => format!("aws-chunked,{}", ce.trim()),
        _ => "aws-chunked".to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&encoding) {
        headers.insert(header::CONTENT_ENCODING, v);
    }
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(encoded_len(decoded)),
    );
    headers.insert(
        HeaderName::from_static("x-amz-decoded-content-length"),
        HeaderValue::from(decoded),
    );
    headers.insert(
        HeaderName::from_static("x-amz-trailer"),
        HeaderValue::from_static(TRAILER),
    );
    headers.insert(
        HeaderName::from_static("x-amz-sdk-checksum-algorithm"),
        HeaderValue::from_static("CRC32"),
    );
    headers.insert(
        HeaderName::from_static("x-amz-content-sha256"),
        HeaderValue::from_static(STREAMING_UNSIGNED_TRAILER),
    );
}

/// Encode `input` (the sealed body) as aws-chunked with the CRC32 trailer, without copying
/// the data: each chunk goes out as its size line, the input's own buffers (split where a
/// chunk ends) and a CRLF. An error of the input passes through (the upstream request is then
/// aborted, nothing committed).
pub fn encode<S>(input: S) -> impl Stream<Item = Result<Bytes, BoxError>> + Send + Sync + 'static
where
    S: Stream<Item = Result<Bytes, BoxError>> + Send + Sync + 'static,
{
    struct State<S> {
        input: std::pin::Pin<Box<S>>,
        /// Input not framed yet, and its length.
        queued: VecDeque<Bytes>,
        queued_len: u64,
        /// Framed output not sent yet.
        out: VecDeque<Bytes>,
        crc: Option<CrcDigest>,
    }
    impl<S> State<S> {
        /// Frame the first `n` queued bytes as one chunk.
        fn frame(&mut self, n: u64) {
            self.out
                .push_back(Bytes::from(format!("{n:x}\r\n").into_bytes()));
            let mut left = n as usize;
            while left > 0 {
                let Some(mut front) = self.queued.pop_front() else {
                    break;
                };
                if front.len() > left {
                    let piece = front.split_to(left);
                    self.queued.push_front(front);
                    left = 0;
                    self.out.push_back(piece);
                } else {
                    left -= front.len();
                    self.out.push_back(front);
                }
            }
            self.queued_len -= n;
            self.out.push_back(Bytes::from_static(b"\r\n"));
        }
    }
    let state = State {
        input: Box::pin(input),
        queued: VecDeque::new(),
        queued_len: 0,
        out: VecDeque::new(),
        crc: Some(CrcDigest::new(CrcAlgorithm::Crc32IsoHdlc)),
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.out.pop_front() {
                return Some((Ok(b), st));
            }
            if st.queued_len >= CHUNK {
                st.frame(CHUNK);
                continue;
            }
            st.crc.as_ref()?;
            match st.input.next().await {
                Some(Ok(bytes)) => {
                    if let Some(crc) = st.crc.as_mut() {
                        crc.update(&bytes);
                    }
                    st.queued_len += bytes.len() as u64;
                    if !bytes.is_empty() {
                        st.queued.push_back(bytes);
                    }
                }
                Some(Err(e)) => {
                    st.crc = None;
                    st.queued.clear();
                    st.queued_len = 0;
                    return Some((Err(e), st));
                }
                None => {
                    let crc = st.crc.take()?;
                    if st.queued_len > 0 {
                        let n = st.queued_len;
                        st.frame(n);
                    }
                    let value = STANDARD.encode((crc.finalize() as u32).to_be_bytes());
                    st.out.push_back(Bytes::from(
                        format!("0\r\n{TRAILER}:{value}\r\n\r\n").into_bytes(),
                    ));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn encoded(pieces: Vec<Vec<u8>>) -> Vec<u8> {
        let s = futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, BoxError>(Bytes::from(p))),
        );
        let mut out = Vec::new();
        let mut e = std::pin::pin!(encode(s));
        while let Some(b) = e.next().await {
            out.extend_from_slice(&b.unwrap());
        }
        out
    }

    /// The encoding is what aws-chunked readers decode, its length is the announced one, for
    /// any split of the input.
    #[tokio::test]
    async fn length_and_framing() {
        for total in [0usize, 1, 100, 65535, 65536, 65537, 200_000] {
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            for split in [1usize, 7, 65536, 100_000] {
                let pieces: Vec<Vec<u8>> = data.chunks(split).map(<[u8]>::to_vec).collect();
                let out = encoded(pieces).await;
                assert_eq!(
                    out.len() as u64,
                    encoded_len(total as u64),
                    "{total}/{split}"
                );
                // Decode it back.
                let mut rest = &out[..];
                let mut decoded = Vec::new();
                loop {
                    let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                    let n =
                        usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16)
                            .unwrap();
                    rest = &rest[line_end + 2..];
                    if n == 0 {
                        break;
                    }
                    assert!(n as u64 <= CHUNK);
                    decoded.extend_from_slice(&rest[..n]);
                    assert_eq!(&rest[n..n + 2], b"\r\n");
                    rest = &rest[n + 2..];
                }
                assert_eq!(decoded, data);
                let mut crc = CrcDigest::new(CrcAlgorithm::Crc32IsoHdlc);
                crc.update(&data);
                let want = format!(
                    "{TRAILER}:{}\r\n\r\n",
                    STANDARD.encode((crc.finalize() as u32).to_be_bytes())
                );
                assert_eq!(rest, want.as_bytes());
            }
        }
    }

    #[test]
    fn hex_digit_counts() {
        assert_eq!(hex_digits(0), 1);
        assert_eq!(hex_digits(15), 1);
        assert_eq!(hex_digits(16), 2);
        assert_eq!(hex_digits(65536), 5);
    }

    #[tokio::test]
    async fn an_input_error_passes_through() {
        let s = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Bytes::from_static(b"abc")),
            Err::<Bytes, BoxError>("client went away".into()),
        ]);
        let mut e = std::pin::pin!(encode(s));
        let mut saw_error = false;
        while let Some(item) = e.next().await {
            if item.is_err() {
                saw_error = true;
            }
        }
        assert!(saw_error);
    }
}
