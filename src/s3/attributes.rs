//! GetObjectAttributes (`GET /bucket/key?attributes`), answered as HEAD is: the storage's
//! own answer would describe the ciphertext (its size, an unmarked ETag, checksums and parts
//! of the stored bytes). The gateway builds the answer from a HEAD of the stored object:
//!
//! - `ObjectSize`: the plaintext size, by arithmetic on the stored size;
//! - `ETag`: marked as every ETag the gateway answers with ([`etag::mark`]);
//! - `Checksum`: the client's checksum where the gateway kept one (a single-part object
//!   uploaded with the value in a header, see [`stored_checksum`]); opening it is a key use,
//!   authorized as a read;
//! - `ObjectParts` (objects written in parts): `PartsCount` (TotalPartsCount) from the `-N` ETag and each
//!   part's plaintext `Size` from the part layout (every part but the last of one size),
//!   paged by `x-amz-max-parts` and `x-amz-part-number-marker`;
//! - `StorageClass`: the storage's.
//!
//! An error (no such key or version) is the storage's own answer to GetObjectAttributes.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use quick_xml::escape::escape;
use s3s::{Body, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use super::gateway::{
    Ctx, META_ENVELOPE, META_OBJECT_ID, decrypt_error, internal, plaintext_size,
    strip_request_headers,
};
use super::multipart::{is_multipart, read_layout, without_query_param};
use super::{etag, stored_checksum};

/// The attributes a request names in `x-amz-object-attributes` (comma-separated, maybe
/// repeated).
fn wanted(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("x-amz-object-attributes")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// A numeric paging header, `default` when absent; S3's InvalidArgument when not a number.
fn paging(headers: &HeaderMap, name: &str, default: u64) -> S3Result<u64> {
    match headers.get(name) {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                S3Error::with_message(
                    S3ErrorCode::InvalidArgument,
                    format!("{name} must be a non-negative integer"),
                )
            }),
    }
}

/// `ObjectParts` for parts `sizes` (plaintext, in order), one page after `marker`.
fn object_parts_xml(sizes: &[u64], marker: u64, max: u64) -> String {
    let total = sizes.len() as u64;
    let first = marker.min(total);
    let last = first.saturating_add(max).min(total);
    let mut x = format!("<ObjectParts><PartsCount>{total}</PartsCount>");
    x.push_str(&format!("<PartNumberMarker>{marker}</PartNumberMarker>"));
    x.push_str(&format!(
        "<NextPartNumberMarker>{last}</NextPartNumberMarker>"
    ));
    x.push_str(&format!("<MaxParts>{max}</MaxParts>"));
    x.push_str(&format!("<IsTruncated>{}</IsTruncated>", last < total));
    for (i, size) in sizes
        .iter()
        .enumerate()
        .take(last as usize)
        .skip(first as usize)
    {
        x.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><Size>{size}</Size></Part>",
            i + 1
        ));
    }
    x.push_str("</ObjectParts>");
    x
}

impl Ctx<'_> {
    pub(super) async fn object_attributes(
        &self,
        req: S3Request<Body>,
    ) -> S3Result<S3Response<Body>> {
        let wanted = wanted(&req.headers);
        let want = |name: &str| wanted.iter().any(|w| w.eq_ignore_ascii_case(name));
        if wanted.is_empty() {
            // S3's own error for a request that names none.
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                "x-amz-object-attributes must name at least one attribute",
            ));
        }
        let max_parts = paging(&req.headers, "x-amz-max-parts", 1000)?.clamp(1, 1000);
        let marker = paging(&req.headers, "x-amz-part-number-marker", 0)?;
        // HEAD the stored object (the same version, if one is named).
        let mut headers = req.headers.clone();
        strip_request_headers(&mut headers);
        for h in [
            "x-amz-object-attributes",
            "x-amz-max-parts",
            "x-amz-part-number-marker",
        ] {
            headers.remove(h);
        }
        let query = without_query_param(req.uri.query(), "attributes");
        let uri = self.upstream_uri_with_query(query.as_deref())?;
        let head = self
            .send_empty(Method::HEAD, uri.clone(), headers.clone())
            .await?;
        if !head.status().is_success() {
            // The storage's error, with its XML body (a HEAD has none).
            return self.passthrough(req).await;
        }
        let h = head.headers();
        if !h.contains_key(META_ENVELOPE) {
            // Written around the gateway: as a GET of it is answered.
            self.plaintext_object(head)?;
            return self.passthrough(req).await;
        }
        let format = self.read_format(h)?;
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let etag_value = text(header::ETAG.as_str()).map(str::to_string);
        let stored: u64 = text(header::CONTENT_LENGTH.as_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| internal("upstream HEAD without a length"))?;
        let size = plaintext_size(stored, etag_value.as_deref())
            .ok_or_else(|| decrypt_error("impossible stored size"))?;
        let multipart = is_multipart(h);

        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetObjectAttributesResponse \
             xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
        );
        if want("ETag")
            && let Some(e) = &etag_value
        {
            let marked = etag::mark(e);
            xml.push_str(&format!(
                "<ETag>{}</ETag>",
                escape(marked.trim_matches('"'))
            ));
        }
        if want("Checksum")
            && !multipart
            && let Some(sealed) = text(stored_checksum::META_CHECKSUM)
        {
            let meta = text(META_ENVELOPE).unwrap_or("");
            let object_id = text(META_OBJECT_ID).unwrap_or("");
            let key_ctx = self.authorized_context(&req.headers, crate::config::Action::Open)?;
            let (raw, used, data_key) = self.open_envelope(meta, &key_ctx).await?;
            let msg_ctx = self.object_context(format, &key_ctx, object_id)?;
            let (algorithm, value) =
                stored_checksum::open(data_key.expose(), &raw[..used], &msg_ctx, sealed)
                    .ok_or_else(|| decrypt_error("the stored checksum does not open"))?;
            let element = match algorithm.name() {
                "CRC64NVME" => "ChecksumCRC64NVME".to_string(),
                name => format!("Checksum{name}"),
            };
            xml.push_str(&format!(
                "<Checksum><{element}>{}</{element}><ChecksumType>FULL_OBJECT</ChecksumType></Checksum>",
                escape(&value)
            ));
        }
        if want("ObjectParts")
            && multipart
            && let Some(n) = etag_value.as_deref().and_then(etag::multipart_parts)
        {
            let sizes = if n == 1 {
                vec![size]
            } else {
                let first = self.first_part_stored_size(&uri, &headers, n).await?;
                read_layout(stored, n, Some(first)).ok_or_else(|| {
                    decrypt_error("stored sizes do not match a gateway part layout")
                })?
            };
            xml.push_str(&object_parts_xml(&sizes, marker, max_parts));
        }
        if want("StorageClass") {
            xml.push_str(&format!(
                "<StorageClass>{}</StorageClass>",
                escape(text("x-amz-storage-class").unwrap_or("STANDARD"))
            ));
        }
        if want("ObjectSize") {
            xml.push_str(&format!("<ObjectSize>{size}</ObjectSize>"));
        }
        xml.push_str("</GetObjectAttributesResponse>");

        let mut out_headers = HeaderMap::new();
        for name in [
            header::LAST_MODIFIED.as_str(),
            "x-amz-version-id",
            "x-amz-delete-marker",
            "x-amz-request-charged",
        ] {
            if let Some(v) = h.get(name) {
                out_headers.insert(http::HeaderName::from_static(name), v.clone());
            }
        }
        out_headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        let mut out = S3Response::new(Body::from(xml));
        out.status = Some(StatusCode::OK);
        out.headers = out_headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_page() {
        let sizes = [16384, 16384, 7];
        let x = object_parts_xml(&sizes, 0, 1000);
        assert!(x.contains("<PartsCount>3</PartsCount>"), "{x}");
        assert!(x.contains("<IsTruncated>false</IsTruncated>"), "{x}");
        assert!(x.contains("<Part><PartNumber>3</PartNumber><Size>7</Size></Part>"));
        let x = object_parts_xml(&sizes, 1, 1);
        assert!(x.contains("<Part><PartNumber>2</PartNumber><Size>16384</Size></Part>"));
        assert!(
            !x.contains("<PartNumber>1<") && !x.contains("<PartNumber>3<"),
            "{x}"
        );
        assert!(
            x.contains("<NextPartNumberMarker>2</NextPartNumberMarker>"),
            "{x}"
        );
        assert!(x.contains("<IsTruncated>true</IsTruncated>"), "{x}");
        // A marker past the end: an empty page.
        let x = object_parts_xml(&sizes, 9, 1000);
        assert!(!x.contains("<Part>"), "{x}");
    }

    #[test]
    fn attribute_names() {
        let mut h = HeaderMap::new();
        h.append(
            "x-amz-object-attributes",
            "ETag, ObjectSize".parse().unwrap(),
        );
        h.append("x-amz-object-attributes", "Checksum".parse().unwrap());
        assert_eq!(wanted(&h), ["ETag", "ObjectSize", "Checksum"]);
        assert!(wanted(&HeaderMap::new()).is_empty());
    }
}
