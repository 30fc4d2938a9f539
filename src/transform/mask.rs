//! Masking on read: what a principal allowed `open-masked` but not `open` sees of a field
//! (route `mask` rules). A masked value is computed from the plaintext and never contains a
//! token or the whole value.
//!
//! - `last4`: `123-45-6789` → `***-**-6789`: letters and digits but the last four become `*`,
//!   other characters (separators) stay; values of four characters or fewer become all `*`.
//! - `first1`: `Jane` → `J***` (a one-character value becomes `*`).
//! - `hash`: hex HMAC-SHA-256 of the value's JSON text under `[masking] hash_key_file`:
//!   equal values give equal hashes (joins), without the key nobody can test guesses.
//! - fixed string; `null` (the default for fields without a rule).
//!
//! Non-string values (numbers, objects) are masked on their JSON text; the result is always
//! a JSON string or `null`.

use hmac::{KeyInit, Mac};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::config::Mask;

/// The key of `hash` masks.
pub struct MaskKey(Zeroizing<Vec<u8>>);

impl MaskKey {
    pub fn new(secret: &[u8]) -> MaskKey {
        MaskKey(Zeroizing::new(secret.to_vec()))
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

/// The masked form of one plaintext value (its JSON text), as JSON text.
pub fn apply(mask: &Mask, plaintext: &[u8], key: Option<&MaskKey>) -> Zeroizing<Vec<u8>> {
    let text: Zeroizing<String> = match serde_json::from_slice::<Value>(plaintext) {
        Ok(Value::String(s)) => Zeroizing::new(s),
        _ => Zeroizing::new(String::from_utf8_lossy(plaintext).into_owned()),
    };
    let masked: Option<String> = match mask {
        Mask::Null => None,
        Mask::Fixed(s) => Some(s.clone()),
        Mask::Last4 => {
            let n = text.chars().filter(|c| c.is_alphanumeric()).count();
            let keep_from = if n > 4 { n - 4 } else { n };
            let mut seen = 0;
            Some(
                text.chars()
                    .map(|c| {
                        if c.is_alphanumeric() {
                            seen += 1;
                            if seen > keep_from { c } else { '*' }
                        } else {
                            c
                        }
                    })
                    .collect(),
            )
        }
        // A one-character value would be shown whole: all `*` then.
        Mask::First1 if text.chars().count() <= 1 => Some("*".repeat(text.chars().count())),
        Mask::First1 => {
            let mut chars = text.chars();
            chars
                .next()
                .map(|first| std::iter::once(first).chain(chars.map(|_| '*')).collect())
        }
        Mask::Hash => key.map(|k| {
            let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&k.0)
                .expect("HMAC takes any key length");
            m.update(b"envelope-proxy mask v1\n");
            m.update(plaintext);
            hex::encode(m.finalize().into_bytes())
        }),
    };
    Zeroizing::new(match masked {
        Some(s) => Value::String(s).to_string().into_bytes(),
        None => b"null".to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(mask: Mask, v: &str) -> String {
        String::from_utf8(apply(&mask, v.as_bytes(), Some(&MaskKey::new(b"k"))).to_vec()).unwrap()
    }

    #[test]
    fn masks() {
        assert_eq!(m(Mask::Last4, r#""123-45-6789""#), r#""***-**-6789""#);
        assert_eq!(
            m(Mask::Last4, r#""4111111111111111""#),
            r#""************1111""#
        );
        assert_eq!(m(Mask::Last4, r#""abc""#), r#""***""#);
        assert_eq!(m(Mask::Last4, "123456"), r#""**3456""#);
        assert_eq!(m(Mask::First1, r#""Jane""#), r#""J***""#);
        assert_eq!(m(Mask::First1, r#""""#), r#""""#);
        assert_eq!(m(Mask::First1, r#""X""#), r#""*""#, "never the whole value");
        assert_eq!(m(Mask::Null, r#""x""#), "null");
        assert_eq!(m(Mask::Fixed("[hidden]".into()), r#""x""#), r#""[hidden]""#);
        let h1 = m(Mask::Hash, r#""a@example.com""#);
        assert_eq!(h1, m(Mask::Hash, r#""a@example.com""#));
        assert_ne!(h1, m(Mask::Hash, r#""b@example.com""#));
        assert!(!h1.contains("example"));
        let other = String::from_utf8(
            apply(
                &Mask::Hash,
                br#""a@example.com""#,
                Some(&MaskKey::new(b"k2")),
            )
            .to_vec(),
        )
        .unwrap();
        assert_ne!(h1, other, "the hash depends on the key");
        // Objects are masked on their JSON text and become a string.
        assert_eq!(m(Mask::First1, r#"{"a":1}"#), r#""{******""#);
    }
}
