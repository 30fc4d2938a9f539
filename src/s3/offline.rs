//! Offline decryption of an object fetched by other means (no lock-in): the stored body and
//! its metadata, with the same keys as the proxy.
//!
//! ```text
//! aws s3api head-object --bucket b --key k > meta.json      # straight from storage
//! aws s3 cp s3://b/k body.bin                                # straight from storage
//! envelope-proxy --config c.toml decrypt-object --context bucket=b --metadata meta.json \
//!     --bucket b --key k < body.bin > plain.bin
//! ```
//!
//! A v2 object (`ep-format: 2`, FORMAT.md §9) is bound to its bucket and key: `--bucket` and
//! `--key` are required for it, exactly as S3 stores them (the key decoded). Legacy v1 objects
//! open without them.
//!
//! A multipart object is N sealed parts back to back. Their layout comes from a HEAD of part 1:
//! `aws s3api head-object --bucket b --key k --part-number 1` prints `PartsCount` and part 1's
//! stored `ContentLength` (every part but the last has that stored size) and, on AWS S3, the
//! metadata too. Where a store omits user metadata on a part HEAD, put `PartsCount` and
//! `ContentLength` from it into the plain HEAD's JSON.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::gateway::{META_ENVELOPE, META_FORMAT, META_MULTIPART, META_OBJECT_ID, ObjectFormat};
use super::multipart::{MAX_PARTS, part_binding};
use crate::config::template::{Lookup, Source};
use crate::config::{Config, RouteKind, S3RouteConfig};
use crate::envelope::stream::Opener;
use crate::envelope::{Context, Header, binding, chunked};
use crate::keys::KeyService;
use crate::metrics::Metrics;

/// What decrypting an object needs from its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `ep-envelope`: base64url envelope header (plus the C2SP header for single-part objects).
    pub envelope: String,
    /// `ep-object`: the object id bound into every message.
    pub object_id: String,
    /// `ep-format`: absent on legacy v1 objects, `2` on objects bound to their bucket and key.
    pub format: ObjectFormat,
    /// For a multipart object (`ep-multipart`): the number of parts and part 1's stored size,
    /// when the metadata came from a `--part-number 1` HEAD.
    pub multipart: Option<PartLayout>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLayout {
    pub count: Option<u64>,
    pub first_part_stored: Option<u64>,
}

/// The envelope metadata of an object: from `aws s3api head-object` JSON (`Metadata`
/// holds `ep-envelope`, `ep-object`; `PartsCount` and `ContentLength` give the part layout)
/// or from `name: value` lines with the full header names (`x-amz-mp-parts-count`,
/// `content-length`).
pub fn parse_metadata(text: &str) -> Result<ObjectMeta, String> {
    let mut found: HashMap<String, String> = HashMap::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let meta = v.get("Metadata").unwrap_or(&v);
        if let Some(m) = meta.as_object() {
            for (k, v) in m {
                if let Some(s) = v.as_str() {
                    found.insert(
                        format!("x-amz-meta-{}", k.trim_start_matches("x-amz-meta-")),
                        s.to_string(),
                    );
                }
            }
        }
        for (field, header) in [
            ("PartsCount", "x-amz-mp-parts-count"),
            ("ContentLength", "content-length"),
        ] {
            if let Some(n) = v.get(field).and_then(|n| n.as_u64()) {
                found.insert(header.to_string(), n.to_string());
            }
        }
    } else {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(['=', ':']) {
                found.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    let envelope = found.remove(META_ENVELOPE).ok_or_else(|| {
        format!("no {META_ENVELOPE} in the metadata: was the object written through the gateway?")
    })?;
    let object_id = found
        .remove(META_OBJECT_ID)
        .ok_or_else(|| format!("no {META_OBJECT_ID} in the metadata"))?;
    let format = match found.get(META_FORMAT).map(String::as_str) {
        None => ObjectFormat::Unbound,
        Some("2") => ObjectFormat::Bound,
        Some(other) => return Err(format!("{META_FORMAT}: unknown object format {other:?}")),
    };
    let number = |name: &str| -> Result<Option<u64>, String> {
        found
            .get(name)
            .map(|v| v.parse().map_err(|_| format!("{name} is not a number")))
            .transpose()
    };
    let multipart = match found.get(META_MULTIPART) {
        Some(_) => Some(PartLayout {
            count: number("x-amz-mp-parts-count")?,
            first_part_stored: number("content-length")?,
        }),
        None => None,
    };
    Ok(ObjectMeta {
        envelope,
        object_id,
        format,
        multipart,
    })
}

/// Offline there is no request: only literal context values render; the rest must be given.
struct NoRequest;

impl Lookup for NoRequest {
    fn lookup(&self, _: &Source) -> Option<String> {
        None
    }
}

fn key_context(cfg: &S3RouteConfig, given: &HashMap<String, String>) -> Result<Context, String> {
    let mut ctx = Context::new();
    for (name, t) in &cfg.key_context {
        let v = match given.get(name) {
            Some(v) => v.clone(),
            None => t.render(&NoRequest).map_err(|from| {
                format!("pass --context {name}=... (the route takes it from {from})")
            })?,
        };
        ctx.insert(name.clone(), v);
    }
    Ok(ctx)
}

/// Decrypt an object body (single-part or multipart) from `input` to `output`; returns the
/// plaintext length. `names` is the object's (bucket, key), required for v2 objects.
pub async fn decrypt_object(
    config: &Config,
    route: Option<&str>,
    given: &HashMap<String, String>,
    names: Option<(&str, &str)>,
    metadata: &str,
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, String> {
    let routes: Vec<_> = config
        .routes
        .iter()
        .filter_map(|r| match &r.kind {
            RouteKind::S3(s3) => Some((r, s3)),
            _ => None,
        })
        .collect();
    let (_, s3) = match route {
        Some(name) => routes
            .iter()
            .find(|(r, _)| r.name == name)
            .ok_or_else(|| format!("no S3 route named {name:?}"))?,
        None if routes.len() == 1 => &routes[0],
        None => return Err("choose the S3 route with --route".into()),
    };
    let meta = parse_metadata(metadata)?;
    let raw = URL_SAFE_NO_PAD
        .decode(meta.envelope.trim())
        .map_err(|_| "the envelope metadata is not base64url".to_string())?;
    let (header, used) = Header::decode(&raw).map_err(|e| format!("envelope header: {e}"))?;
    let key_ctx = key_context(s3, given)?;
    let (_, backends) = crate::keys::connect_backends(config).await?;
    let keys: Arc<KeyService> =
        KeyService::new(backends, config.cache.clone(), Arc::new(Metrics::new()));
    let data_key = keys
        .opening_key_for(&header, &key_ctx, &s3.keys)
        .await
        .map_err(|e| format!("the data key does not unwrap (wrong context or key): {e}"))?;
    let key = data_key.expose();
    let (bucket, object_key) = match (meta.format, names) {
        (_, Some(names)) => names,
        (ObjectFormat::Unbound, None) => ("", ""),
        (ObjectFormat::Bound, None) => {
            return Err("this object is bound to its bucket and key (ep-format 2): \
                 pass --bucket and --key as S3 stores them"
                .into());
        }
    };
    let object_ctx = meta
        .format
        .object_context(&key_ctx, &meta.object_id, bucket, object_key);
    let env_header = &raw[..used];

    let Some(layout) = meta.multipart else {
        let c2sp: [u8; chunked::HEADER_LEN] = raw[used..]
            .try_into()
            .map_err(|_| "the envelope metadata has no message header".to_string())?;
        // The body starts with its own copy of the C2SP header; it must match the metadata's.
        if read_header(&mut input)? != c2sp {
            return Err("the body does not belong to this metadata".into());
        }
        let ctx = binding(env_header, &object_ctx);
        return open_message(key, &ctx, &c2sp, input, &mut output).map_err(|e| e.to_string());
    };
    if used != raw.len() {
        return Err("bad envelope metadata for a multipart object".into());
    }
    let fetch = "fetch the metadata with `aws s3api head-object --part-number 1`";
    let count = layout
        .count
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| format!("a multipart object needs its part count (PartsCount): {fetch}"))?;
    let first_stored = layout
        .first_part_stored
        .and_then(|n| n.checked_sub(chunked::HEADER_LEN as u64))
        .ok_or_else(|| {
            format!("a multipart object needs part 1's size (ContentLength): {fetch}")
        })?;
    let mut total = 0;
    for part in 1..=count {
        let header = read_header(&mut input).map_err(|e| format!("part {part}: {e}"))?;
        let ctx = part_binding(env_header, &object_ctx, part);
        // Every part but the last has part 1's stored size; the last runs to the end.
        let n = if part < count {
            open_message(
                key,
                &ctx,
                &header,
                (&mut input).take(first_stored),
                &mut output,
            )
        } else {
            open_message(key, &ctx, &header, &mut input, &mut output)
        };
        total += n.map_err(|e| format!("part {part}: {e}"))?;
    }
    Ok(total)
}

fn read_header(input: &mut impl Read) -> Result<[u8; chunked::HEADER_LEN], String> {
    let mut header = [0u8; chunked::HEADER_LEN];
    input
        .read_exact(&mut header)
        .map_err(|_| "the body ends before its header".to_string())?;
    Ok(header)
}

/// Open one C2SP message (its header already read) from `input` to `output`; returns the
/// plaintext length. Nothing unauthenticated is written: the opener releases a chunk only
/// once its tag has been checked, and the last chunk only at the end of the message.
fn open_message(
    key: &[u8; 32],
    context: &[u8],
    header: &[u8; chunked::HEADER_LEN],
    mut input: impl Read,
    output: &mut impl Write,
) -> Result<u64, String> {
    let mut opener = Opener::new(key, context, header).map_err(|_| {
        "key commitment mismatch: wrong context values or another object's metadata".to_string()
    })?;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = Vec::with_capacity(1 << 16);
    let mut total = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| format!("reading the body: {e}"))?;
        if n == 0 {
            break;
        }
        out.clear();
        opener
            .push(&buf[..n], &mut out)
            .map_err(|e| format!("the body does not decrypt: {e}"))?;
        output
            .write_all(&out)
            .map_err(|e| format!("writing: {e}"))?;
        total += out.len() as u64;
    }
    out.clear();
    opener
        .finish(&mut out)
        .map_err(|e| format!("the body does not decrypt: {e}"))?;
    output
        .write_all(&out)
        .map_err(|e| format!("writing: {e}"))?;
    output.flush().map_err(|e| format!("writing: {e}"))?;
    Ok(total + out.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_from_aws_cli_json_and_header_lines() {
        let json = r#"{"ContentLength": 5243032, "PartsCount": 5, "ETag": "\"x-5\"",
            "Metadata": {"ep-envelope": "AAAA", "ep-object": "00ff", "ep-multipart": "1"}}"#;
        let m = parse_metadata(json).unwrap();
        assert_eq!(
            (m.envelope.as_str(), m.object_id.as_str()),
            ("AAAA", "00ff")
        );
        assert_eq!(
            m.multipart,
            Some(PartLayout {
                count: Some(5),
                first_part_stored: Some(5_243_032)
            })
        );
        let lines = "x-amz-meta-ep-envelope: BBBB\nx-amz-meta-ep-object: 01\ncontent-length: 9\n";
        let m = parse_metadata(lines).unwrap();
        assert_eq!(m.envelope, "BBBB");
        assert_eq!(m.multipart, None, "no ep-multipart: a single-part object");
        assert_eq!(
            m.format,
            ObjectFormat::Unbound,
            "no ep-format: legacy format 1"
        );
        let v2 = r#"{"Metadata": {"ep-envelope": "A", "ep-object": "01", "ep-format": "2"}}"#;
        assert_eq!(parse_metadata(v2).unwrap().format, ObjectFormat::Bound);
        let v3 = r#"{"Metadata": {"ep-envelope": "A", "ep-object": "01", "ep-format": "3"}}"#;
        assert!(parse_metadata(v3).is_err(), "an unknown format is refused");
        assert!(parse_metadata(r#"{"Metadata": {"ep-object": "01"}}"#).is_err());
        let bad = "x-amz-meta-ep-envelope: B\nx-amz-meta-ep-object: 01\nx-amz-meta-ep-multipart: 1\nx-amz-mp-parts-count: many\n";
        assert!(parse_metadata(bad).is_err());
    }
}
