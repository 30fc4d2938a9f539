//! The S3 object format's message context (FORMAT.md §9), versioned.
//!
//! Every S3 object body is one C2SP message (or one per part) sealed under a message context
//! derived from the reader's own request, never trusted from storage:
//!
//! - **v1** (legacy, read only): key context + `ep:object` = the random object id kept in
//!   `x-amz-meta-ep-object` (+ `ep:part` for a multipart part). Not bound to its name: storage
//!   that copies an object with its metadata over another key makes the gateway serve it there.
//! - **v2** (every write since): v1's pairs + `ep:bucket` = the bucket name and `ep:key` = the
//!   object key, exactly as S3 stores them (the decoded key the gateway sends upstream). The
//!   object carries `x-amz-meta-ep-format: 2`.
//!
//! The version needs no separate authentication: v2 contexts always hold `ep:bucket` and
//! `ep:key`, v1 contexts never do, so the HKDF context (and the key commitment) differ. A v2
//! object whose marker storage stripped opens under v1 rules and fails its commitment check;
//! a v1 object given the marker fails the same way. Neither reads as the other.

use http::HeaderMap;

use crate::envelope::Context;

/// Reserved metadata: the object format version; absent on v1 (legacy) objects.
pub const META_FORMAT: &str = "x-amz-meta-ep-format";
/// Reserved message-context key: the random object id (both versions).
pub const OBJECT_ID_KEY: &str = "ep:object";
/// Reserved message-context key: the bucket name (v2).
pub const BUCKET_KEY: &str = "ep:bucket";
/// Reserved message-context key: the object key (v2).
pub const NAME_KEY: &str = "ep:key";

/// The version of an S3 object's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFormat {
    /// v1: bound to its random object id only (objects written before v2; read only).
    Unbound,
    /// v2: bound to its object id, bucket and key.
    Bound,
}

impl ObjectFormat {
    /// The value of [`META_FORMAT`] on objects of this version (`None`: no marker).
    pub fn marker(self) -> Option<&'static str> {
        match self {
            ObjectFormat::Unbound => None,
            ObjectFormat::Bound => Some("2"),
        }
    }

    /// The format an object's (upstream response) headers declare. A marker this version does
    /// not know is an error: the object cannot be read safely.
    pub fn of(headers: &HeaderMap) -> Result<ObjectFormat, &'static str> {
        let values: Vec<_> = headers.get_all(META_FORMAT).iter().collect();
        match values.as_slice() {
            [] => Ok(ObjectFormat::Unbound),
            [v] if v.as_bytes() == b"2" => Ok(ObjectFormat::Bound),
            _ => Err("unknown object format version"),
        }
    }

    /// The message context of an object (before any `ep:part`): `key_ctx` + the object id, and
    /// for v2 the bucket and key.
    pub fn object_context(
        self,
        key_ctx: &Context,
        object_id: &str,
        bucket: &str,
        key: &str,
    ) -> Context {
        let mut ctx = key_ctx.clone();
        ctx.insert(OBJECT_ID_KEY, object_id);
        if self == ObjectFormat::Bound {
            ctx.insert(BUCKET_KEY, bucket);
            ctx.insert(NAME_KEY, key);
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn markers_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(ObjectFormat::of(&h), Ok(ObjectFormat::Unbound));
        h.insert(META_FORMAT, HeaderValue::from_static("2"));
        assert_eq!(ObjectFormat::of(&h), Ok(ObjectFormat::Bound));
        h.insert(META_FORMAT, HeaderValue::from_static("3"));
        assert!(ObjectFormat::of(&h).is_err());
        h.insert(META_FORMAT, HeaderValue::from_static("2"));
        h.append(META_FORMAT, HeaderValue::from_static("2"));
        assert!(ObjectFormat::of(&h).is_err());
    }

    #[test]
    fn v2_contexts_never_equal_v1_contexts() {
        let mut k = Context::new();
        k.insert("bucket", "b");
        let v1 = ObjectFormat::Unbound.object_context(&k, "00", "b", "k");
        let v2 = ObjectFormat::Bound.object_context(&k, "00", "b", "k");
        assert_ne!(v1.canonical(), v2.canonical());
        assert_eq!(v2.get(NAME_KEY), Some("k"));
        assert_eq!(v1.get(NAME_KEY), None);
        let other = ObjectFormat::Bound.object_context(&k, "00", "b", "k2");
        assert_ne!(v2.canonical(), other.canonical());
    }
}
