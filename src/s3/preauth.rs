//! What the gateway does to an S3 request before s3s authenticates it, where s3s 0.14 and S3
//! disagree on an unchanged client request:
//!
//! - **SigV2, bucket-level, path-style.** S3's CanonicalizedResource for a bucket request is
//!   `/bucket/` whether the request line says `/bucket` or `/bucket/` (botocore and s3cmd sign
//!   `/bucket/` and send `/bucket?list-type=2`); s3s signs the request path as it is, so every
//!   bucket-level SigV2 request failed with SignatureDoesNotMatch. The path is given its
//!   trailing slash before s3s sees it (only then: SigV4 signs the path as sent).
//! - **Presigned URLs with `X-Amz-Expires` ≤ 0.** S3 answers 403 AccessDenied (`Request has
//!   expired`); s3s cannot parse a negative value and answered 400.
//!
//! Attacker model: the path, Host, query and headers are the client's. Nothing here decides
//! access: a rewritten path is still verified by s3s, and an expired URL is refused.

use http::{HeaderMap, StatusCode, header};

use crate::config::S3RouteConfig;

/// An answer given before authentication: status, S3 error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: &'static str,
}

impl S3Error {
    fn new(status: StatusCode, code: &'static str, message: &'static str) -> S3Error {
        S3Error {
            status,
            code,
            message,
        }
    }

    /// The `<Error>` document S3 sends.
    pub fn to_xml(&self) -> String {
        use quick_xml::escape::escape;
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>",
            escape(self.code),
            escape(self.message)
        )
    }
}

/// Adjust the request for s3s, or return the answer to give it at once: see the module
/// documentation.
pub fn prepare(parts: &mut http::request::Parts, cfg: &S3RouteConfig) -> Option<S3Error> {
    if let Some(e) = refuse(&parts.uri) {
        return Some(e);
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.host())
        .unwrap_or("");
    // A Host the route does not know is refused later, by s3s's host parser.
    let path_style = matches!(
        super::guard::host_bucket(host, &cfg.virtual_host_suffixes, &cfg.path_style_hosts),
        Ok(None)
    );
    if let Some(uri) = sigv2_uri(&parts.uri, &parts.headers, path_style) {
        parts.uri = uri;
    }
    None
}

/// The answer S3 gives for a presigned URL whose `X-Amz-Expires` is zero or negative.
fn expired() -> S3Error {
    S3Error::new(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired")
}

/// `Some(error)` when the request must be answered before authentication.
fn refuse(uri: &http::Uri) -> Option<S3Error> {
    let query = uri.query()?;
    let mut sigv4 = false;
    let mut non_positive = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "X-Amz-Algorithm" {
            sigv4 = true;
        } else if k == "X-Amz-Expires" {
            // A number S3 would read as zero or negative (`-5`, `0`, `-0`); anything else
            // (not a number, too large) is s3s's to refuse as S3 does.
            let v = v.trim();
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            non_positive = v.strip_prefix('-').is_some_and(digits)
                || (!v.is_empty() && v.bytes().all(|b| b == b'0'));
        }
    }
    (sigv4 && non_positive).then(expired)
}

/// Whether the request is signed with SigV2 (an `Authorization: AWS key:sig` header, or a
/// presigned URL with `AWSAccessKeyId` and `Signature`).
fn is_sigv2(uri: &http::Uri, headers: &HeaderMap) -> bool {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        return auth.as_bytes().starts_with(b"AWS ");
    }
    let Some(q) = uri.query() else { return false };
    let names: Vec<String> = form_urlencoded::parse(q.as_bytes())
        .map(|(k, _)| k.into_owned())
        .collect();
    names.iter().any(|k| k == "AWSAccessKeyId") && names.iter().any(|k| k == "Signature")
}

/// The request URI s3s must verify: `/bucket` becomes `/bucket/` for a SigV2 path-style
/// bucket request (`path_style`: the Host names no bucket). `None`: unchanged.
fn sigv2_uri(uri: &http::Uri, headers: &HeaderMap, path_style: bool) -> Option<http::Uri> {
    let path = uri.path();
    let bucket = path.strip_prefix('/')?;
    if !path_style || bucket.is_empty() || bucket.contains('/') || !is_sigv2(uri, headers) {
        return None;
    }
    let pq = match uri.query() {
        Some(q) => format!("{path}/?{q}"),
        None => format!("{path}/"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn non_positive_expiry_is_expired() {
        for q in ["-5", "0", "-0", "00", "%2D5"] {
            let u = uri(&format!(
                "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires={q}&X-Amz-Signature=x"
            ));
            let e = refuse(&u).unwrap_or_else(|| panic!("{q}"));
            assert_eq!(e.status, StatusCode::FORBIDDEN);
            assert_eq!(e.code, "AccessDenied");
        }
        for q in ["1", "604800", "abc", "", "-", "1-"] {
            let u = uri(&format!(
                "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires={q}"
            ));
            assert!(refuse(&u).is_none(), "{q}");
        }
        // Not a SigV4 presigned URL: not ours to judge.
        assert!(refuse(&uri("/b/k?X-Amz-Expires=-1")).is_none());
        assert!(refuse(&uri("/b/k")).is_none());
    }

    #[test]
    fn sigv2_bucket_requests_get_their_trailing_slash() {
        let v2 = {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, "AWS AK:c2ln".parse().unwrap());
            h
        };
        let v4 = {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                "AWS4-HMAC-SHA256 Credential=AK/x".parse().unwrap(),
            );
            h
        };
        let none = HeaderMap::new();
        let got =
            |u: &str, h: &HeaderMap, ps: bool| sigv2_uri(&uri(u), h, ps).map(|u| u.to_string());
        assert_eq!(
            got("/bucket?list-type=2", &v2, true).as_deref(),
            Some("/bucket/?list-type=2")
        );
        assert_eq!(got("/bucket", &v2, true).as_deref(), Some("/bucket/"));
        assert_eq!(
            got(
                "/bucket?AWSAccessKeyId=A&Signature=s&Expires=1",
                &none,
                true
            )
            .as_deref(),
            Some("/bucket/?AWSAccessKeyId=A&Signature=s&Expires=1")
        );
        // Already a bucket path with its slash, an object, the service, virtual-host style,
        // SigV4 or unsigned: unchanged.
        assert_eq!(got("/bucket/", &v2, true), None);
        assert_eq!(got("/bucket/key", &v2, true), None);
        assert_eq!(got("/", &v2, true), None);
        assert_eq!(got("/key", &v2, false), None);
        assert_eq!(got("/bucket", &v4, true), None);
        assert_eq!(got("/bucket", &none, true), None);
    }
}
