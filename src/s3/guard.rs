//! Checks on an authenticated S3 request before the gateway decides what it is.
//!
//! s3s proves that the signed parts of a request come from a client who knows a secret; it
//! does not prove that the request has no *other* parts. Two such gaps change what a request
//! does, so both are closed here, before the operation is classified:
//!
//! - **Unsigned `x-amz-*` headers.** SigV4 signs only the headers listed in `SignedHeaders`
//!   (a presigned URL usually lists `host` alone). s3s 0.14 accepts extra headers; AWS refuses
//!   them (`AccessDenied: There were headers present in the request which were not signed`).
//!   Without this check, anyone holding a presigned PUT URL could add `x-amz-copy-source` and
//!   turn it into a CopyObject of any object of the route, or add `x-amz-metadata-directive`,
//!   `x-amz-tagging`, `x-amz-acl`.
//! - **Host names.** The bucket comes from the path, or from the Host for virtual-host
//!   addressing. A Host the gateway does not know (`report.example.com`) would make it read
//!   `PUT /report.pdf` as a bucket-level request whose body it does not seal, while a
//!   virtual-host-aware client meant an object. Only names the route declares are accepted.
//!
//! Attacker model: every header, the query string and the Host are attacker controlled;
//! these functions never panic and refuse what they cannot parse.

use http::HeaderMap;
use s3s::{S3Error, S3ErrorCode, S3Result};

/// The one `x-amz-*` header that may be present without being listed in `SignedHeaders`:
/// with header authentication its value is the payload hash line of the canonical request
/// (so it is signed anyway), and with a presigned URL s3s checks it against the body.
const UNSIGNED_ALLOWED: [&str; 1] = ["x-amz-content-sha256"];

/// SigV4's presigned-URL parameters (stripped before anything goes upstream).
const SIGV4_QUERY: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

fn unsigned_refused(names: &[&str]) -> S3Error {
    S3Error::with_message(
        S3ErrorCode::AccessDenied,
        format!(
            "There were headers present in the request which were not signed: {}",
            names.join(", ")
        ),
    )
}

fn auth_refused(why: &str) -> S3Error {
    S3Error::with_message(S3ErrorCode::AccessDenied, why.to_string())
}

/// How s3s authenticated the request, and so which `x-amz-*` headers it covered.
enum Signed {
    /// SigV2 (header or presigned): every `x-amz-*` header with a UTF-8 value is part of the
    /// string to sign (CanonicalizedAmzHeaders); s3s skips non-UTF-8 values.
    AllAmzHeaders,
    /// SigV4: exactly these (lowercase) header names.
    Listed(Vec<String>),
}

/// Refuse a request carrying an `x-amz-*` header its signature does not cover.
///
/// The signed header list is read from the same field s3s verified: `X-Amz-SignedHeaders`
/// for a presigned URL, `SignedHeaders=` in a SigV4 Authorization header. A request offering
/// more than one authentication (two Authorization headers, a signature both in the query and
/// in a header) is refused rather than guessed about.
pub(super) fn check_signed_headers(
    method: &http::Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> S3Result<()> {
    // A browser-form POST is authenticated by a policy document, which signs no header.
    // The gateway never serves POST Object (its file would reach storage in clear).
    if *method == http::Method::POST
        && headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("multipart/form-data")
            })
    {
        return Err(S3Error::with_message(
            S3ErrorCode::NotImplemented,
            "browser-form uploads (POST Object) are not available through the encrypting gateway",
        ));
    }
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let count = |name: &str| {
        query
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    };
    let authorizations: Vec<&http::HeaderValue> = headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .collect();
    // `x-amz-*` in the query string: S3 reads some of them as the header of that name (SDKs
    // "hoist" headers into presigned URLs). The gateway decides what a request is from its
    // headers, so such a parameter would act upstream behind the gateway's back (a copy
    // source, a metadata directive). Only SigV4's own parameters are accepted.
    if let Some((name, _)) = query.iter().find(|(k, _)| {
        k.len() >= 6
            && k.as_bytes()[..6].eq_ignore_ascii_case(b"x-amz-")
            && !SIGV4_QUERY.iter().any(|p| k.eq_ignore_ascii_case(p))
    }) {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            format!(
                "the query parameter {name} is not accepted by the encrypting gateway; send it as a signed header"
            ),
        ));
    }
    let (v2_query, v4_query) = (count("Signature"), count("X-Amz-Signature"));
    if v2_query + v4_query + authorizations.len() != 1 {
        return Err(auth_refused(
            "exactly one authentication (an Authorization header or a presigned URL) is required",
        ));
    }
    let signed = if v2_query == 1 {
        Signed::AllAmzHeaders
    } else if v4_query == 1 {
        let mut lists = query
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("X-Amz-SignedHeaders"));
        match (lists.next(), lists.next()) {
            (Some((_, list)), None) => Signed::Listed(split_list(list)),
            _ => {
                return Err(auth_refused(
                    "one X-Amz-SignedHeaders parameter is required",
                ));
            }
        }
    } else {
        let value = authorizations
            .first()
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| auth_refused("the Authorization header is not readable"))?;
        if value.starts_with("AWS ") {
            Signed::AllAmzHeaders
        } else {
            let list = sigv4_signed_headers(value)
                .ok_or_else(|| auth_refused("the Authorization header is not SigV4 or SigV2"))?;
            Signed::Listed(split_list(list))
        }
    };
    let mut unsigned: Vec<&str> = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        if !name.starts_with("x-amz-") {
            continue;
        }
        let covered = std::str::from_utf8(value.as_bytes()).is_ok()
            && match &signed {
                Signed::AllAmzHeaders => true,
                Signed::Listed(list) => {
                    UNSIGNED_ALLOWED.contains(&name) || list.iter().any(|s| s == name)
                }
            };
        if !covered && !unsigned.contains(&name) {
            unsigned.push(name);
        }
    }
    if unsigned.is_empty() {
        Ok(())
    } else {
        Err(unsigned_refused(&unsigned))
    }
}

fn split_list(list: &str) -> Vec<String> {
    // Names are compared as s3s looks them up: exactly (lowercase). `X-Amz-Foo` in the list
    // does not sign the `x-amz-foo` header, since s3s would not have found it.
    list.split(';').map(str::to_string).collect()
}

/// The `SignedHeaders=` list of a SigV4 Authorization header, parsed with the grammar s3s
/// 0.14 accepts: `ALG Credential=AK/DATE/REGION/SERVICE/aws4_request,` (optional whitespace)
/// `SignedHeaders=a;b;c,` (optional whitespace) `Signature=HEX` (optional whitespace). The
/// access key cannot contain `/`, so the credential ends at its fifth field. Anything else is
/// `None` (refused): this parser only needs to agree with s3s where s3s succeeded.
fn sigv4_signed_headers(value: &str) -> Option<&str> {
    let (algorithm, rest) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    if algorithm != "AWS4-HMAC-SHA256" {
        return None;
    }
    let rest = rest
        .trim_start_matches(|c: char| c.is_ascii_whitespace())
        .strip_prefix("Credential=")?;
    let mut fields = rest.splitn(5, '/');
    for _ in 0..4 {
        fields.next()?;
    }
    let rest = fields
        .next()?
        .strip_prefix("aws4_request,")?
        .trim_start_matches(|c: char| c.is_ascii_whitespace())
        .strip_prefix("SignedHeaders=")?;
    let (list, rest) = rest.split_once(',')?;
    let signature = rest
        .trim_start_matches(|c: char| c.is_ascii_whitespace())
        .strip_prefix("Signature=")?;
    let signature = signature.trim_end_matches(|c: char| c.is_ascii_whitespace());
    if list.is_empty() || signature.contains(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    Some(list)
}

/// Where a Host header points: `None` for path-style, `Some(bucket)` for virtual-host style.
///
/// Accepted: IP literals (with or without a port), `localhost`, the route's
/// `path_style_hosts`, its `virtual_host_suffixes` themselves (path-style) and
/// `BUCKET.SUFFIX` (virtual-host). Anything else is refused: the gateway cannot know whether
/// the client put a bucket in that name.
pub(super) fn host_bucket<'a>(
    host: &'a str,
    suffixes: &[String],
    path_style_hosts: &[String],
) -> S3Result<Option<&'a str>> {
    let name = strip_port(host);
    if name.is_empty() {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "a Host header is required",
        ));
    }
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if unbracketed.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || path_style_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        || suffixes.iter().any(|s| s.eq_ignore_ascii_case(name))
    {
        return Ok(None);
    }
    for suffix in suffixes {
        if name.len() > suffix.len() + 1 {
            let (bucket, tail) = name.split_at(name.len() - suffix.len());
            if tail.eq_ignore_ascii_case(suffix)
                && let Some(bucket) = bucket.strip_suffix('.')
                && !bucket.is_empty()
            {
                // Bucket names are DNS labels; anything else (`%`, `:`) could split
                // differently upstream.
                if !bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return Err(S3Error::new(S3ErrorCode::InvalidBucketName));
                }
                return Ok(Some(bucket));
            }
        }
    }
    Err(S3Error::with_message(
        S3ErrorCode::InvalidRequest,
        "the Host is not a name of this gateway: list it in path_style_hosts (path-style \
         requests) or its parent domain in virtual_host_suffixes (bucket.DOMAIN)",
    ))
}

/// `host[:port]` → `host` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port))
            if (h.starts_with('[') && h.ends_with(']') || !h.contains(':'))
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h
        }
        _ => host,
    }
}

/// Largest body a pass-through request may carry (DeleteObjects: 1000 keys of up to 1 KiB).
pub(super) const MAX_PASSTHROUGH_BODY: usize = 2 << 20;

/// What the body of a pass-through request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PassBody {
    /// An XML document with this root element (a bucket or object subresource).
    Xml(&'static str),
    /// A JSON document (a bucket policy).
    Json,
    /// No body at all.
    Empty,
}

/// Subresources whose request body is a small document, never object data. A body on any
/// other pass-through request is refused: if the storage read that request differently than
/// the gateway (a Host-based bucket, a path prefix), it could store the body as an object,
/// in clear.
fn subresource_body(method: &http::Method, on_key: bool, sub: &str) -> Option<PassBody> {
    use PassBody::Xml;
    let put = *method == http::Method::PUT;
    let post = *method == http::Method::POST;
    Some(match (on_key, sub) {
        (_, "acl") if put => Xml("AccessControlPolicy"),
        (_, "tagging") if put => Xml("Tagging"),
        (true, "retention") if put => Xml("Retention"),
        (true, "legal-hold") if put => Xml("LegalHold"),
        (true, "restore") if post => Xml("RestoreRequest"),
        (false, "delete") if post => Xml("Delete"),
        (false, "policy") if put => PassBody::Json,
        (false, sub) if put => Xml(match sub {
            "versioning" => "VersioningConfiguration",
            "lifecycle" => "LifecycleConfiguration",
            "cors" => "CORSConfiguration",
            "encryption" => "ServerSideEncryptionConfiguration",
            "website" => "WebsiteConfiguration",
            "logging" => "BucketLoggingStatus",
            "notification" => "NotificationConfiguration",
            "replication" => "ReplicationConfiguration",
            "object-lock" => "ObjectLockConfiguration",
            "publicAccessBlock" => "PublicAccessBlockConfiguration",
            "ownershipControls" => "OwnershipControls",
            "accelerate" => "AccelerateConfiguration",
            "requestPayment" => "RequestPaymentConfiguration",
            "intelligent-tiering" => "IntelligentTieringConfiguration",
            "inventory" => "InventoryConfiguration",
            "analytics" => "AnalyticsConfiguration",
            "metrics" => "MetricsConfiguration",
            _ => return None,
        }),
        _ => return None,
    })
}

/// The body a pass-through request may carry.
pub(super) fn pass_body(method: &http::Method, has_key: bool, query: Option<&str>) -> PassBody {
    let known = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find_map(|(k, _)| subresource_body(method, has_key, &k))
    });
    match known {
        Some(body) => body,
        // CreateBucket (its optional CreateBucketConfiguration).
        None if *method == http::Method::PUT && !has_key => {
            PassBody::Xml("CreateBucketConfiguration")
        }
        None => PassBody::Empty,
    }
}

/// Check a pass-through body (already read, at most [`MAX_PASSTHROUGH_BODY`]) against what
/// its operation takes. An empty body is always fine.
pub(super) fn check_pass_body(want: PassBody, body: &[u8]) -> S3Result<()> {
    if body.is_empty() {
        return Ok(());
    }
    let refused = || {
        S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "this request cannot carry that body through the encrypting gateway (object \
             data is only accepted by PutObject, UploadPart and their copies)",
        )
    };
    match want {
        PassBody::Empty => Err(refused()),
        PassBody::Json => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'{') && serde_json::from_slice::<serde_json::Value>(body).is_ok() {
                Ok(())
            } else {
                Err(refused())
            }
        }
        PassBody::Xml(root) => match xml_root(body) {
            Some(name) if name == root.as_bytes() => Ok(()),
            _ => Err(refused()),
        },
    }
}

/// The root element's local name of a well-formed-looking XML document (the declaration,
/// comments and whitespace before it skipped).
fn xml_root(body: &[u8]) -> Option<Vec<u8>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) | Event::Empty(e) => return Some(e.local_name().as_ref().to_vec()),
            Event::Decl(_) | Event::Comment(_) => {}
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
            _ => return None,
        }
    }
}

/// `clear_metadata = "refuse"`: refuse a write that would leave something beside the sealed
/// object in clear: user metadata (`x-amz-meta-*`), tags (`x-amz-tagging`, PutObjectTagging)
/// or `Content-Disposition` (it usually carries a file name). Checked on every PUT and POST
/// on an object key: PutObject, CopyObject (a copy without these headers keeps the source's,
/// which passed this check when written), CreateMultipartUpload, UploadPart.
pub(super) fn check_clear_metadata(
    method: &http::Method,
    has_key: bool,
    query: Option<&str>,
    headers: &HeaderMap,
) -> S3Result<()> {
    if !has_key || !matches!(*method, http::Method::PUT | http::Method::POST) {
        return Ok(());
    }
    let refused = |what: &str| {
        Err(S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            format!(
                "{what} would be stored in clear beside the object; this route refuses it \
                 (clear_metadata = \"refuse\")"
            ),
        ))
    };
    let tagging_query =
        query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "tagging"));
    if *method == http::Method::PUT && tagging_query {
        return refused("object tags");
    }
    for name in headers.keys() {
        let n = name.as_str();
        if n.starts_with("x-amz-meta-") {
            return refused("user metadata (x-amz-meta-*)");
        }
        if n == "x-amz-tagging" {
            return refused("object tags (x-amz-tagging)");
        }
        if n == "content-disposition" {
            return refused("Content-Disposition");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(uri: &str, headers: &[(&str, &str)]) -> Result<(), String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        check_signed_headers(&http::Method::PUT, &uri.parse().unwrap(), &map)
            .map_err(|e| e.message().unwrap_or_default().to_string())
    }

    const AUTH: &str = "AWS4-HMAC-SHA256 Credential=AK/20260101/us-east-1/s3/aws4_request, \
                        SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=abc";

    #[test]
    fn unsigned_amz_headers_are_refused() {
        assert!(check("/b/k", &[("authorization", AUTH), ("x-amz-date", "1")]).is_ok());
        // The payload hash may be unsigned; anything else x-amz-* may not.
        let e = check(
            "/b/k",
            &[("authorization", AUTH), ("x-amz-copy-source", "b/payroll")],
        )
        .unwrap_err();
        assert!(e.contains("x-amz-copy-source"), "{e}");
        // Presigned: only what X-Amz-SignedHeaders lists.
        let q = "/b/k?X-Amz-Signature=ab&X-Amz-SignedHeaders=host%3Bx-amz-acl";
        assert!(check(q, &[("x-amz-acl", "private")]).is_ok());
        assert!(check(q, &[("x-amz-content-sha256", "UNSIGNED-PAYLOAD")]).is_ok());
        assert!(check(q, &[("x-amz-tagging", "a=b")]).is_err());
        // Case matters as it does to s3s: `X-Amz-Acl` in the list does not sign `x-amz-acl`.
        let q = "/b/k?X-Amz-Signature=ab&X-Amz-SignedHeaders=host%3BX-Amz-Acl";
        assert!(check(q, &[("x-amz-acl", "private")]).is_err());
        // x-amz-* query parameters other than SigV4's are refused (S3 reads them as headers).
        assert!(
            check(
                "/b/k?X-Amz-Signature=ab&X-Amz-SignedHeaders=host&x-amz-copy-source=b%2Fp",
                &[]
            )
            .is_err()
        );
        assert!(check("/b/k?X-AMZ-ACL=public-read", &[("authorization", AUTH)]).is_err());
        // SigV2 signs every x-amz-* header.
        assert!(check("/b/k?Signature=x&AWSAccessKeyId=A", &[("x-amz-acl", "p")]).is_ok());
        assert!(
            check(
                "/b/k",
                &[("authorization", "AWS A:sig"), ("x-amz-acl", "p")]
            )
            .is_ok()
        );
    }

    #[test]
    fn ambiguous_authentication_is_refused() {
        assert!(check("/b/k", &[]).is_err());
        assert!(check("/b/k", &[("authorization", AUTH), ("authorization", AUTH)]).is_err());
        assert!(
            check(
                "/b/k?X-Amz-Signature=a&X-Amz-SignedHeaders=host",
                &[("authorization", AUTH)]
            )
            .is_err()
        );
        assert!(
            check(
                "/b/k?X-Amz-Signature=a&Signature=b&X-Amz-SignedHeaders=host",
                &[]
            )
            .is_err()
        );
        assert!(
            check(
                "/b/k?X-Amz-Signature=a&X-Amz-SignedHeaders=host&x-amz-signedheaders=host%3Bx-amz-acl",
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn signed_headers_follow_the_s3s_grammar() {
        assert_eq!(
            sigv4_signed_headers(AUTH),
            Some("host;x-amz-content-sha256;x-amz-date")
        );
        assert_eq!(
            sigv4_signed_headers(
                "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s3/aws4_request,SignedHeaders=host,Signature=ab"
            ),
            Some("host")
        );
        // A `SignedHeaders=` inside the credential is part of the access key (up to the first
        // `/`), for s3s and here alike; the list is the one after the credential.
        assert_eq!(
            sigv4_signed_headers(
                "AWS4-HMAC-SHA256 Credential=AK,SignedHeaders=x-amz-acl/20260101/r/s3/aws4_request, SignedHeaders=host, Signature=ab"
            ),
            Some("host")
        );
        for bad in [
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=ab",
            "AWS4-ECDSA-P256-SHA256 Credential=AK/20260101/r/s3/aws4_request, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s3/aws4_request, SignedHeaders=, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s3/aws4_request, Signature=ab",
        ] {
            assert_eq!(sigv4_signed_headers(bad), None, "{bad}");
        }
    }

    #[test]
    fn pass_through_bodies_are_small_documents_only() {
        let put = http::Method::PUT;
        assert_eq!(
            pass_body(&put, false, None),
            PassBody::Xml("CreateBucketConfiguration")
        );
        assert_eq!(pass_body(&put, false, Some("policy")), PassBody::Json);
        assert_eq!(
            pass_body(&put, true, Some("tagging&versionId=3")),
            PassBody::Xml("Tagging")
        );
        assert_eq!(
            pass_body(&http::Method::DELETE, true, None),
            PassBody::Empty
        );
        let create = PassBody::Xml("CreateBucketConfiguration");
        assert!(check_pass_body(create, b"").is_ok());
        assert!(
            check_pass_body(
                create,
                b"<?xml version=\"1.0\"?>\n<CreateBucketConfiguration xmlns=\"x\"><LocationConstraint>eu</LocationConstraint></CreateBucketConfiguration>"
            )
            .is_ok()
        );
        assert!(check_pass_body(create, b"%PDF-1.7 secret report").is_err());
        assert!(check_pass_body(create, b"<Tagging/>").is_err());
        assert!(check_pass_body(PassBody::Empty, b"x").is_err());
        assert!(check_pass_body(PassBody::Json, b" {\"Version\": \"2012-10-17\"}").is_ok());
        assert!(check_pass_body(PassBody::Json, b"{not json").is_err());
    }

    #[test]
    fn hosts_are_known_names_only() {
        let suffixes = vec!["s3.local".to_string()];
        let names = vec!["gateway.internal".to_string()];
        for (host, want) in [
            ("127.0.0.1:9000", Some(None)),
            ("[::1]:9000", Some(None)),
            ("localhost", Some(None)),
            ("LocalHost:80", Some(None)),
            ("gateway.internal:9000", Some(None)),
            ("s3.local", Some(None)),
            ("docs.s3.local:9000", Some(Some("docs"))),
            ("report.example.com", None),
            ("docs.gateway.internal", None),
            (".s3.local", None),
            ("", None),
        ] {
            let got = host_bucket(host, &suffixes, &names).ok();
            assert_eq!(got, want, "{host}");
        }
    }
}
