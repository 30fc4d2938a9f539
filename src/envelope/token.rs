//! A sealed JSON value as one JSON string token:
//!
//! ```text
//! token = "enc:v1:" ‖ base64url-nopad(header ‖ c2sp message)
//! ```
//!
//! The plaintext is the JSON serialization of the original value, so numbers, booleans, null,
//! objects and arrays come back with their type. The C2SP context is
//! [`super::binding`]`(header, message context)`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::chunked::{self, OpenError, Prf};
use super::header::{Header, HeaderError};
use super::{Context, binding};

pub const PREFIX: &str = "enc:v1:";

/// Tokens longer than this are rejected before decoding (a sealed value can be no larger than
/// the request body limit anyway; this bounds work on hostile input).
pub const MAX_TOKEN_LEN: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not an envelope token")]
    NotAToken,
    #[error("token is not valid base64url")]
    Encoding,
    #[error("token header: {0}")]
    Header(#[from] HeaderError),
    #[error("token did not open: {0}")]
    Open(#[from] OpenError),
}

/// A parsed token whose message is not yet opened.
#[derive(Debug)]
pub struct ParsedToken {
    pub header: Header,
    header_bytes: Vec<u8>,
    message: Vec<u8>,
}

impl ParsedToken {
    /// Parse a token string. `token` is attacker controlled: this must not panic on any input.
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let body = token.strip_prefix(PREFIX).ok_or(TokenError::NotAToken)?;
        if body.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Encoding);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Encoding)?;
        let (header, used) = Header::decode(&raw)?;
        Ok(ParsedToken {
            header,
            header_bytes: raw[..used].to_vec(),
            message: raw[used..].to_vec(),
        })
    }

    /// Open with the data key recovered from one of the header's EDKs.
    pub fn open(
        &self,
        data_key: &[u8; 32],
        message_context: &Context,
    ) -> Result<Vec<u8>, TokenError> {
        self.open_with(&Prf::new(data_key), message_context)
    }

    /// [`open`](Self::open) with the data key already keyed (see [`Prf`]).
    pub fn open_with(&self, prf: &Prf, message_context: &Context) -> Result<Vec<u8>, TokenError> {
        let ctx = binding(&self.header_bytes, message_context);
        Ok(chunked::open_with(prf, &ctx, &self.message)?)
    }

    /// The encoded envelope header: equal for every token sealed under one data key.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }
}

/// Seal `plaintext` into a token under `data_key`, whose wrapped forms are in `header`.
pub fn seal(
    header: &Header,
    data_key: &[u8; 32],
    message_context: &Context,
    plaintext: &[u8],
) -> Result<String, HeaderError> {
    seal_with(
        &header.encode()?,
        &Prf::new(data_key),
        message_context,
        plaintext,
    )
}

/// [`seal`] with the header already encoded and the data key already keyed: what a body of
/// many values under one data key uses.
pub fn seal_with(
    header_bytes: &[u8],
    prf: &Prf,
    message_context: &Context,
    plaintext: &[u8],
) -> Result<String, HeaderError> {
    let message = chunked::seal_with(prf, &binding(header_bytes, message_context), plaintext);
    Ok(encode(header_bytes, &message))
}

/// Seal with a fixed salt, for golden vectors only.
pub fn seal_with_salt(
    header: &Header,
    data_key: &[u8; 32],
    salt: &[u8; chunked::SALT_LEN],
    message_context: &Context,
    plaintext: &[u8],
) -> Result<String, HeaderError> {
    let header_bytes = header.encode()?;
    let ctx = binding(&header_bytes, message_context);
    let message = chunked::seal_with_salt(data_key, salt, &ctx, plaintext);
    Ok(encode(&header_bytes, &message))
}

fn encode(header: &[u8], message: &[u8]) -> String {
    let mut raw = Vec::with_capacity(header.len() + message.len());
    raw.extend_from_slice(header);
    raw.extend_from_slice(message);
    let mut out = String::with_capacity(PREFIX.len() + raw.len() * 4 / 3 + 4);
    out.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(&raw, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::WrappedKey;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            edks: vec![WrappedKey {
                backend: "local".into(),
                key_id: "users".into(),
                key_version: 1,
                blob: vec![1; 60],
            }],
        }
    }

    #[test]
    fn round_trip_binds_context() {
        let key = [9u8; 32];
        let ctx: Context = [("tenant", "acme")].into_iter().collect();
        let t = seal(&header(), &key, &ctx, b"\"123-45-6789\"").unwrap();
        assert!(t.starts_with(PREFIX));
        let p = ParsedToken::parse(&t).unwrap();
        assert_eq!(p.header, header());
        assert_eq!(p.open(&key, &ctx).unwrap(), b"\"123-45-6789\"");
        let other: Context = [("tenant", "globex")].into_iter().collect();
        assert!(p.open(&key, &other).is_err());
    }

    #[test]
    fn swapping_the_header_breaks_the_binding() {
        let key = [9u8; 32];
        let ctx = Context::new();
        let t = seal(&header(), &key, &ctx, b"1").unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&t[PREFIX.len()..]).unwrap();
        raw[10] ^= 1; // inside the EDK blob's key id
        let forged = encode(&raw, &[]);
        let forged = format!("{}{}", PREFIX, &forged[PREFIX.len()..]);
        if let Ok(p) = ParsedToken::parse(&forged) {
            assert!(p.open(&key, &ctx).is_err());
        }
    }

    proptest! {
        #[test]
        fn parsing_random_input_never_panics(s in ".{0,200}") {
            let _ = ParsedToken::parse(&s);
            let _ = ParsedToken::parse(&format!("{PREFIX}{s}"));
        }

        #[test]
        fn parsing_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let t = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&b));
            if let Ok(p) = ParsedToken::parse(&t) {
                let _ = p.open(&[0u8; 32], &Context::new());
            }
        }
    }
}
