//! The envelope header: which root keys wrapped this message's data key, and the wrapped keys.
//! Nothing in it is secret. It is authenticated by being bound into the message (see
//! [`super::binding`]), and each EDK is authenticated by its backend.
//!
//! ```text
//! header  = version (u8, = 1) ‖ edk_count (u8, 1..=16) ‖ edk*
//! edk     = u8 len ‖ backend (UTF-8) ‖ u8 len ‖ key_id (UTF-8) ‖ u32be key_version ‖
//!           u16be len ‖ blob
//! ```

use std::fmt;

pub const VERSION: u8 = 1;
pub const MAX_EDKS: usize = 16;

/// A data key wrapped by one root key: what a backend returns and later unwraps.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WrappedKey {
    /// Name of the configured backend (`local`, `kms`, ...).
    pub backend: String,
    /// The root key's identifier within that backend (name, ARN, label).
    pub key_id: String,
    /// Root key version for backends that expose one (the local keyring); 0 otherwise.
    pub key_version: u32,
    /// The backend's opaque wrapped form.
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WrappedKey({}:{} v{}, {} bytes)",
            self.backend,
            self.key_id,
            self.key_version,
            self.blob.len()
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub edks: Vec<WrappedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("truncated header")]
    Truncated,
    #[error("unsupported header version {0}")]
    Version(u8),
    #[error("bad EDK count {0}")]
    Count(usize),
    #[error("a field is too long to encode")]
    TooLong,
    #[error("a name is not UTF-8")]
    Utf8,
}

impl Header {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        if self.edks.is_empty() || self.edks.len() > MAX_EDKS {
            return Err(HeaderError::Count(self.edks.len()));
        }
        let mut out = vec![VERSION, self.edks.len() as u8];
        for edk in &self.edks {
            put_u8_str(&mut out, &edk.backend)?;
            put_u8_str(&mut out, &edk.key_id)?;
            out.extend_from_slice(&edk.key_version.to_be_bytes());
            let len = u16::try_from(edk.blob.len()).map_err(|_| HeaderError::TooLong)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&edk.blob);
        }
        Ok(out)
    }

    /// Parse a header from the front of `bytes`; returns it and the number of bytes it took.
    /// `bytes` is attacker controlled: this must not panic on any input.
    pub fn decode(bytes: &[u8]) -> Result<(Header, usize), HeaderError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let count = r.u8()? as usize;
        if count == 0 || count > MAX_EDKS {
            return Err(HeaderError::Count(count));
        }
        let mut edks = Vec::with_capacity(count);
        for _ in 0..count {
            let backend = r.u8_str()?;
            let key_id = r.u8_str()?;
            let key_version =
                u32::from_be_bytes(r.take(4)?.try_into().map_err(|_| HeaderError::Truncated)?);
            let len =
                u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| HeaderError::Truncated)?);
            let blob = r.take(len as usize)?.to_vec();
            edks.push(WrappedKey {
                backend,
                key_id,
                key_version,
                blob,
            });
        }
        Ok((Header { edks }, r.at))
    }
}

fn put_u8_str(out: &mut Vec<u8>, s: &str) -> Result<(), HeaderError> {
    let len = u8::try_from(s.len()).map_err(|_| HeaderError::TooLong)?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        let end = self.at.checked_add(n).ok_or(HeaderError::Truncated)?;
        let out = self.bytes.get(self.at..end).ok_or(HeaderError::Truncated)?;
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, HeaderError> {
        Ok(self.take(1)?[0])
    }
    fn u8_str(&mut self) -> Result<String, HeaderError> {
        let len = self.u8()? as usize;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| HeaderError::Utf8)
    }
}
