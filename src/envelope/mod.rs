//! On-storage formats. Everything written here is versioned and documented in `docs/FORMAT.md`,
//! with golden vectors under `tests/vectors/` that the test suite opens on every run.
//!
//! - [`chunked`]: the sealing layer (C2SP chunked encryption, AES-256-GCM, key-committing).
//! - [`header`]: our envelope header: format version and the wrapped data keys (EDKs).
//! - [`token`]: a sealed JSON value as one string, `enc:v1:` + base64url(header ‖ message).
//! - [`context`]: encryption contexts and their injective canonical encoding.

pub mod chunked;
pub mod compact;
pub mod context;
pub mod header;
pub mod record;
pub mod stream;
pub mod token;

pub use context::Context;
pub use header::{Header, WrappedKey};

/// Fill `buf` from the operating system's CSPRNG. There is no sane way to continue without
/// randomness, so a failing OS RNG aborts the process rather than producing weak keys.
pub fn fill_random(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        eprintln!("fatal: the operating system random number generator failed: {e}");
        std::process::abort();
    }
}

/// The bytes bound into a message as its C2SP `context`: the envelope header (so no EDK or key
/// reference can be swapped) followed by the message context.
///
/// ```text
/// u32be(len header) ‖ header ‖ canonical(message context)
/// ```
pub fn binding(header: &[u8], message_context: &Context) -> Vec<u8> {
    let ctx = message_context.canonical();
    let mut out = Vec::with_capacity(4 + header.len() + ctx.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(&ctx);
    out
}
