//! Offline decryption of an object fetched by other means (no lock-in): the stored body and
//! its metadata, with the same keys as the proxy.
//!
//! ```text
//! aws s3api head-object --bucket b --key k > meta.json      # straight from storage
//! aws s3 cp s3://b/k body.bin                                # straight from storage
//! envelope-proxy --config c.toml decrypt-object --context bucket=b --metadata meta.json \
//!     < body.bin > plain.bin
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::gateway::{META_ENVELOPE, META_OBJECT_ID};
use crate::config::template::{Lookup, Source};
use crate::config::{Config, RouteKind, S3RouteConfig};
use crate::envelope::stream::Opener;
use crate::envelope::{Context, Header, binding, chunked};
use crate::keys::KeyService;
use crate::metrics::Metrics;

/// The envelope metadata of an object: from `aws s3api head-object` JSON (`Metadata`
/// holds `ep-envelope`, `ep-object`) or from `name=value` lines with the full header names.
pub fn parse_metadata(text: &str) -> Result<(String, String), String> {
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
    Ok((envelope, object_id))
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

/// Decrypt a single-part object body from `input` to `output`; returns the plaintext length.
pub async fn decrypt_object(
    config: &Config,
    route: Option<&str>,
    given: &HashMap<String, String>,
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
    let (envelope, object_id) = parse_metadata(metadata)?;
    let raw = URL_SAFE_NO_PAD
        .decode(envelope.trim())
        .map_err(|_| "the envelope metadata is not base64url".to_string())?;
    let (header, used) = Header::decode(&raw).map_err(|e| format!("envelope header: {e}"))?;
    let c2sp: [u8; chunked::HEADER_LEN] = raw[used..].try_into().map_err(|_| {
        "this object was uploaded in parts; offline decryption of multipart objects is not available yet"
            .to_string()
    })?;
    let key_ctx = key_context(s3, given)?;
    let (_, backends) = crate::keys::connect_backends(config).await?;
    let keys: Arc<KeyService> =
        KeyService::new(backends, config.cache.clone(), Arc::new(Metrics::new()));
    let data_key = keys
        .opening_key_for(&header, &key_ctx, &s3.keys)
        .await
        .map_err(|e| format!("the data key does not unwrap (wrong context or key): {e}"))?;
    let mut msg_ctx = key_ctx;
    msg_ctx.insert("ep:object", object_id);
    let mut opener = Opener::new(data_key.expose(), &binding(&raw[..used], &msg_ctx), &c2sp)
        .map_err(|_| {
            "key commitment mismatch: wrong context values or another object's metadata".to_string()
        })?;

    // The body starts with its own copy of the C2SP header; it must match the metadata's.
    let mut body_header = [0u8; chunked::HEADER_LEN];
    input
        .read_exact(&mut body_header)
        .map_err(|_| "the body is shorter than its header".to_string())?;
    if body_header != c2sp {
        return Err("the body does not belong to this metadata".into());
    }
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
