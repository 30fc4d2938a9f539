//! The client's flexible checksum, kept with the object it describes (FORMAT.md §9.4).
//!
//! A PutObject whose `x-amz-checksum-*` value arrives as a request header (before the body)
//! gets it stored in the reserved metadata `x-amz-meta-ep-checksum`, sealed: a checksum of the
//! plaintext (a CRC-32 above all) would otherwise let anyone who reads the bucket's metadata
//! confirm a guess of the content. The value is one C2SP message under the object's data key,
//! bound to the object's message context plus `ep:meta = checksum`, so it opens only for its
//! own object, in its own place. GET (whole object) and HEAD with `x-amz-checksum-mode:
//! ENABLED` answer it as S3 does; a value that does not open fails the request as any
//! tampered object does.
//!
//! A checksum sent as an aws-chunked *trailer* (SDKs over HTTPS) is verified and echoed but
//! not stored: S3 metadata travels before the body, and the value is only known after it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::checksum::Algorithm;
use crate::envelope::{Context, binding, chunked};

/// Reserved metadata: the client's checksum, sealed.
pub const META_CHECKSUM: &str = "x-amz-meta-ep-checksum";

/// The message-context entry that tells this message from the object's body.
const META_KEY: &str = "ep:meta";

fn context(env_header: &[u8], msg_ctx: &Context) -> Vec<u8> {
    let mut ctx = msg_ctx.clone();
    ctx.insert(META_KEY, "checksum");
    binding(env_header, &ctx)
}

/// The metadata value for `algorithm` and its base64 `value`.
pub fn seal(
    data_key: &[u8; 32],
    env_header: &[u8],
    msg_ctx: &Context,
    algorithm: Algorithm,
    value: &str,
) -> String {
    let plain = format!("{} {value}", algorithm.name());
    URL_SAFE_NO_PAD.encode(chunked::seal(
        data_key,
        &context(env_header, msg_ctx),
        plain.as_bytes(),
    ))
}

/// The stored checksum, or `None` when the value does not open or parse (tampered, or copied
/// from another object).
pub fn open(
    data_key: &[u8; 32],
    env_header: &[u8],
    msg_ctx: &Context,
    stored: &str,
) -> Option<(Algorithm, String)> {
    let message = URL_SAFE_NO_PAD.decode(stored.trim()).ok()?;
    let plain = chunked::open(data_key, &context(env_header, msg_ctx), &message).ok()?;
    let text = std::str::from_utf8(&plain).ok()?;
    let (name, value) = text.split_once(' ')?;
    let algorithm = Algorithm::from_name(name)?;
    let valid = base64::engine::general_purpose::STANDARD
        .decode(value)
        .is_ok_and(|d| d.len() == algorithm.digest_len());
    valid.then(|| (algorithm, value.to_string()))
}

/// Whether a GET or HEAD asks for the object's checksum (`x-amz-checksum-mode: ENABLED`).
pub fn requested(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-amz-checksum-mode")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"ENABLED"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_for_its_own_object() {
        let key = [7u8; 32];
        let mut ctx = Context::new();
        ctx.insert("ep:object", "aa");
        let sealed = seal(&key, b"hdr", &ctx, Algorithm::Crc32, "AAAAAA==");
        assert_eq!(
            open(&key, b"hdr", &ctx, &sealed),
            Some((Algorithm::Crc32, "AAAAAA==".to_string()))
        );
        let mut other = Context::new();
        other.insert("ep:object", "bb");
        assert_eq!(open(&key, b"hdr", &other, &sealed), None);
        assert_eq!(open(&[8u8; 32], b"hdr", &ctx, &sealed), None);
        assert_eq!(open(&key, b"hdx", &ctx, &sealed), None);
        let mut tampered = sealed.into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            open(&key, b"hdr", &ctx, std::str::from_utf8(&tampered).unwrap()),
            None
        );
        assert_eq!(open(&key, b"hdr", &ctx, "not base64!"), None);
    }
}
