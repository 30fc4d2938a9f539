//! Encryption contexts and their canonical encoding.
//!
//! A context is a set of key/value pairs derived from request metadata. Its canonical encoding
//! is what gets bound into ciphertexts (the HKDF `context` input of the chunked format, the AAD
//! of a wrapped data key), so it must be *injective*: two different contexts never encode to the
//! same bytes. We get that with sorted keys and a length prefix on every item:
//!
//! ```text
//! u32be(pair count) ‖ for each pair in key order: u32be(len k) ‖ k ‖ u32be(len v) ‖ v
//! ```
//!
//! `{a: "b,c"}` and `{a: "b", c: ""}` differ in the pair count and in the length prefixes.

use std::collections::BTreeMap;

/// Keys starting with this prefix are set by the proxy itself (for example the JSON field path);
/// configs cannot define them.
pub const RESERVED_PREFIX: &str = "ep:";

/// The context key under which a JSON field's configured path is bound.
pub const FIELD_KEY: &str = "ep:field";

/// An ordered set of context pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Context(BTreeMap<String, String>);

impl Context {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// This context with every pair of `other` added (`other` wins on a shared key).
    pub fn merged(&self, other: &Context) -> Context {
        let mut out = self.clone();
        for (k, v) in other.iter() {
            out.insert(k, v);
        }
        out
    }

    /// The canonical, injective byte encoding (see the module docs).
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.canonical_into(&mut out);
        out
    }

    /// [`canonical`](Self::canonical), appended to `out`.
    pub fn canonical_into(&self, out: &mut Vec<u8>) {
        let size = 4 + self
            .0
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>();
        out.reserve(size);
        out.extend_from_slice(&len32(self.0.len()));
        for (k, v) in &self.0 {
            out.extend_from_slice(&len32(k.len()));
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&len32(v.len()));
            out.extend_from_slice(v.as_bytes());
        }
    }
}

impl Context {
    /// Parse a [`canonical`](Self::canonical) encoding; `None` unless `bytes` are exactly the
    /// encoding of some context (keys strictly ascending, every length in bounds, UTF-8).
    pub fn from_canonical(bytes: &[u8]) -> Option<Context> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = b.split_at_checked(n)?;
            *b = rest;
            Some(head)
        }
        fn item(b: &mut &[u8]) -> Option<String> {
            let len = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
            String::from_utf8(take(b, len)?.to_vec()).ok()
        }
        let mut b = bytes;
        let count = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
        let mut map = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..count {
            let k = item(&mut b)?;
            let v = item(&mut b)?;
            if last.as_ref().is_some_and(|l| *l >= k) {
                return None;
            }
            last = Some(k.clone());
            map.insert(k, v);
        }
        b.is_empty().then_some(Context(map))
    }

    /// The canonical encoding of this context with `extra` added (it wins on a shared key),
    /// written into `out` (cleared first): what [`merged`](Self::merged) then
    /// [`canonical`](Self::canonical) give, without copying the context.
    pub fn canonical_with_into(&self, extra: (&str, &str), out: &mut Vec<u8>) {
        out.clear();
        let shared = self.0.contains_key(extra.0);
        let count = self.0.len() + usize::from(!shared);
        out.extend_from_slice(&len32(count));
        let put = |out: &mut Vec<u8>, k: &str, v: &str| {
            out.extend_from_slice(&len32(k.len()));
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&len32(v.len()));
            out.extend_from_slice(v.as_bytes());
        };
        let mut pending = Some(extra);
        for (k, v) in &self.0 {
            if let Some((ek, ev)) = pending
                && ek <= k.as_str()
            {
                put(out, ek, ev);
                pending = None;
                if ek == k.as_str() {
                    continue;
                }
            }
            put(out, k, v);
        }
        if let Some((ek, ev)) = pending {
            put(out, ek, ev);
        }
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Context {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Context(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Lengths here come from strings held in memory, far below 4 GiB; saturate rather than panic.
fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splitting_a_value_changes_the_encoding() {
        let a: Context = [("a", "b,c")].into_iter().collect();
        let b: Context = [("a", "b"), ("c", "")].into_iter().collect();
        assert_ne!(a.canonical(), b.canonical());
    }

    #[test]
    fn order_of_insertion_does_not_matter() {
        let a: Context = [("x", "1"), ("y", "2")].into_iter().collect();
        let b: Context = [("y", "2"), ("x", "1")].into_iter().collect();
        assert_eq!(a.canonical(), b.canonical());
    }

    proptest! {
        #[test]
        fn canonical_parses_back_and_extra_merges(
            a in proptest::collection::btree_map(".{0,6}", ".{0,6}", 0..5),
            k in ".{0,6}", v in ".{0,6}",
        ) {
            let c = Context(a);
            prop_assert_eq!(Context::from_canonical(&c.canonical()), Some(c.clone()));
            let mut m = c.clone();
            m.insert(k.clone(), v.clone());
            let mut out = vec![1, 2, 3];
            c.canonical_with_into((&k, &v), &mut out);
            prop_assert_eq!(out, m.canonical());
        }

        #[test]
        fn from_canonical_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(c) = Context::from_canonical(&b) {
                prop_assert_eq!(c.canonical(), b);
            }
        }

        #[test]
        fn canonical_encoding_is_injective(
            a in proptest::collection::btree_map(".{0,6}", ".{0,6}", 0..4),
            b in proptest::collection::btree_map(".{0,6}", ".{0,6}", 0..4),
        ) {
            let ca = Context(a.clone());
            let cb = Context(b.clone());
            prop_assert_eq!(a == b, ca.canonical() == cb.canonical());
        }
    }
}
