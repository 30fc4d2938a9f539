//! S3 XML error bodies from upstream: spotting errors hidden in a `200 OK`. (Our own error
//! bodies are `s3s::S3Error`s, serialized by s3s.)
//!
//! S3 answers every failed request with a body like
//!
//! ```text
//! <?xml version="1.0" encoding="UTF-8"?>
//! <Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message>
//! <Resource>/bucket/key</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>
//! ```
//!
//! (some codes add fields, e.g. `InvalidRange` adds `<RangeRequested>` and
//! `<ActualObjectSize>`). Clients read `Code` to decide what to do (retry, 404, ...).
//!
//! Two S3 operations can fail *after* having sent `200 OK`: CompleteMultipartUpload and
//! CopyObject (also UploadPartCopy) send the status line early and keep the connection alive
//! with whitespace while they work, then send either their result or an `<Error>` document.
//! [`parse_error`] detects the latter so the gateway can turn it into a real error status
//! ([`status_for_code`]) instead of passing a "successful" failure to the client.
//!
//! The body is attacker-influenced (anything between us and the storage): parsing never
//! panics, and a document that is not an `<Error>` at its root is not an error.

use http::StatusCode;
use quick_xml::Reader;
use quick_xml::events::Event;

/// An `<Error>` document received from upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamError {
    /// `<Code>`; empty if the element was missing.
    pub code: String,
    /// `<Message>`; empty if the element was missing.
    pub message: String,
    pub resource: Option<String>,
    pub request_id: Option<String>,
}

/// If `body`'s root element is `<Error>` (any namespace prefix), returns its `Code`,
/// `Message`, `Resource` and `RequestId` (direct children; other children are ignored).
///
/// Returns `None` when the root is anything else, when there is no root element, or when the
/// document is malformed before its root element starts. Leading whitespace (S3 keep-alive
/// padding on CompleteMultipartUpload/CopyObject) is skipped. A document whose root is
/// `<Error>` but that is cut off or malformed later still yields `Some` with the fields read
/// so far: an error document that is also broken is still an error.
///
/// Use it on the complete body of a `200` CompleteMultipartUpload, CopyObject or
/// UploadPartCopy response before forwarding or rewriting it.
pub fn parse_error(body: &[u8]) -> Option<UpstreamError> {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let mut reader = Reader::from_reader(&body[start..]);

    // Find the root element.
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == b"Error" => break,
            Event::Empty(e) if e.local_name().as_ref() == b"Error" => {
                return Some(UpstreamError::default());
            }
            Event::Start(_) | Event::Empty(_) | Event::Eof => return None,
            _ => {}
        }
    }

    let mut out = UpstreamError::default();
    // Depth below <Error>; `field` is the direct child being read, if it is one we keep.
    let mut depth = 0usize;
    let mut field: Option<&'static str> = None;
    let mut text = String::new();
    while let Ok(event) = reader.read_event() {
        match event {
            Event::Start(e) => {
                depth += 1;
                field = None;
                if depth == 1 {
                    field = match e.local_name().as_ref() {
                        b"Code" => Some("Code"),
                        b"Message" => Some("Message"),
                        b"Resource" => Some("Resource"),
                        b"RequestId" => Some("RequestId"),
                        _ => None,
                    };
                    text.clear();
                }
            }
            Event::Text(t) if field.is_some() && depth == 1 => match t.xml10_content() {
                Ok(s) => text.push_str(&s),
                Err(_) => break,
            },
            Event::GeneralRef(r) if field.is_some() && depth == 1 => {
                match crate::s3::listing::resolve_reference(&r) {
                    Ok(s) => text.push_str(&s),
                    Err(_) => break,
                }
            }
            Event::CData(c) if field.is_some() && depth == 1 => match c.decode() {
                Ok(s) => text.push_str(&s),
                Err(_) => break,
            },
            Event::End(_) => {
                if depth == 0 {
                    break; // </Error>
                }
                if depth == 1 {
                    let value = std::mem::take(&mut text);
                    match field.take() {
                        Some("Code") => out.code = value,
                        Some("Message") => out.message = value,
                        Some("Resource") => out.resource = Some(value),
                        Some("RequestId") => out.request_id = Some(value),
                        _ => {}
                    }
                }
                depth -= 1;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some(out)
}

/// The HTTP status S3 uses for a known error code, for turning a `200`-with-`<Error>` into a
/// proper error response. Unknown codes map to `500`, as an unexplained failure.
pub fn status_for_code(code: &str) -> StatusCode {
    match code {
        "AccessDenied"
        | "AllAccessDisabled"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "RequestTimeTooSkewed"
        | "InvalidObjectState" => StatusCode::FORBIDDEN,
        "NoSuchKey" | "NoSuchBucket" | "NoSuchUpload" | "NoSuchVersion" => StatusCode::NOT_FOUND,
        "MethodNotAllowed" => StatusCode::METHOD_NOT_ALLOWED,
        "OperationAborted" | "BucketNotEmpty" | "InvalidBucketState" => StatusCode::CONFLICT,
        "MissingContentLength" => StatusCode::LENGTH_REQUIRED,
        "PreconditionFailed" => StatusCode::PRECONDITION_FAILED,
        "InvalidRange" => StatusCode::RANGE_NOT_SATISFIABLE,
        "NotImplemented" => StatusCode::NOT_IMPLEMENTED,
        "SlowDown" | "ServiceUnavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "InternalError" => StatusCode::INTERNAL_SERVER_ERROR,
        "BadDigest"
        | "InvalidDigest"
        | "EntityTooSmall"
        | "EntityTooLarge"
        | "InvalidPart"
        | "InvalidPartOrder"
        | "InvalidArgument"
        | "InvalidRequest"
        | "MalformedXML"
        | "IncompleteBody"
        | "InvalidBucketName"
        | "KeyTooLongError"
        | "RequestTimeout"
        | "ExpiredToken"
        | "InvalidToken"
        | "XAmzContentSHA256Mismatch" => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use s3s::{S3Error, S3ErrorCode};

    /// What s3s (which writes the proxy's own S3 errors) sends for `e`.
    async fn s3s_body(e: S3Error) -> (StatusCode, String) {
        let resp = e.to_http_response().unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Our errors are s3s's: the S3 shape, which our parser reads back, escapes and all.
    #[tokio::test]
    async fn s3s_errors_round_trip_through_the_parser() {
        let mut e = S3Error::with_message(S3ErrorCode::NoSuchKey, "Key <a & b> \"quoted\" it's");
        e.set_request_id("id&1");
        let (status, xml) = s3s_body(e).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            xml.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?>"#),
            "{xml}"
        );
        assert!(xml.contains("<Code>NoSuchKey</Code>"), "{xml}");
        assert!(!xml.contains("<a & b>"), "{xml}");
        let parsed = parse_error(xml.as_bytes()).unwrap();
        assert_eq!(parsed.code, "NoSuchKey");
        assert_eq!(parsed.message, "Key <a & b> \"quoted\" it's");
        assert_eq!(parsed.request_id.as_deref(), Some("id&1"));
        assert_eq!(status_for_code(&parsed.code), status);
    }

    #[tokio::test]
    async fn unicode_survives() {
        let e = S3Error::with_message(S3ErrorCode::NoSuchKey, "ключ 😀 not found: 日本語 キー");
        let (_, xml) = s3s_body(e).await;
        let parsed = parse_error(xml.as_bytes()).unwrap();
        assert_eq!(parsed.message, "ключ 😀 not found: 日本語 キー");
        assert_eq!(parsed.request_id, None);
    }

    /// Where s3s and S3 agree on a code's status, so do we.
    #[tokio::test]
    async fn status_for_code_agrees_with_s3s() {
        for code in [
            S3ErrorCode::AccessDenied,
            S3ErrorCode::NoSuchKey,
            S3ErrorCode::NoSuchUpload,
            S3ErrorCode::InvalidRange,
            S3ErrorCode::PreconditionFailed,
            S3ErrorCode::BadDigest,
            S3ErrorCode::InvalidPart,
            S3ErrorCode::SlowDown,
            S3ErrorCode::InternalError,
        ] {
            let name = code.as_str().to_string();
            let (status, _) = s3s_body(S3Error::new(code)).await;
            assert_eq!(status_for_code(&name), status, "{name}");
        }
    }

    #[test]
    fn detects_error_in_a_200_complete_response() {
        // CompleteMultipartUpload: whitespace keep-alive padding, then the error document.
        let body = concat!(
            "\n\n          \n",
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n<Error>\n  <Code>InternalError</Code>\n",
            "  <Message>We encountered an internal error. Please try again.</Message>\n",
            "  <RequestId>656c76696e6727732072657175657374</RequestId>\n",
            "  <HostId>Uuag1LuByRx9e6j5Onimru9pO4ZVKnJ2Qz7/C1NPcfTWAtRPfTaOFg==</HostId>\n",
            "</Error>"
        );
        let e = parse_error(body.as_bytes()).unwrap();
        assert_eq!(e.code, "InternalError");
        assert_eq!(
            e.message,
            "We encountered an internal error. Please try again."
        );
        assert_eq!(
            e.request_id.as_deref(),
            Some("656c76696e6727732072657175657374")
        );
        assert_eq!(e.resource, None);
        assert_eq!(status_for_code(&e.code), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn success_documents_are_not_errors() {
        let complete = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n",
            r#"<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
            "<Location>https://b.s3.amazonaws.com/k</Location><Bucket>b</Bucket><Key>k</Key>",
            "<ETag>&quot;3858f62230ac3c915f300c664312c11f-9&quot;</ETag>",
            "</CompleteMultipartUploadResult>"
        );
        assert_eq!(parse_error(complete.as_bytes()), None);
        let copy = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "<CopyObjectResult><LastModified>2009-10-12T17:50:30.000Z</LastModified>",
            "<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyObjectResult>"
        );
        assert_eq!(parse_error(copy.as_bytes()), None);
        // An <Error> element that is not the root does not count.
        let nested = "<Result><Error><Code>X</Code></Error></Result>";
        assert_eq!(parse_error(nested.as_bytes()), None);
        assert_eq!(parse_error(b""), None);
        assert_eq!(parse_error(b"   "), None);
        assert_eq!(parse_error(b"not xml at all"), None);
    }

    #[test]
    fn nested_children_do_not_confuse_fields() {
        let body = "<Error><Details><Code>inner</Code></Details><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        let e = parse_error(body.as_bytes()).unwrap();
        assert_eq!(e.code, "SlowDown");
        assert_eq!(status_for_code(&e.code), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn truncated_error_still_counts() {
        let body =
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code><Mess";
        let e = parse_error(body.as_bytes()).unwrap();
        assert_eq!(e.code, "InternalError");
        assert_eq!(parse_error(b"<Error/>"), Some(UpstreamError::default()));
    }

    #[test]
    fn namespaced_root() {
        let body = r#"<s3:Error xmlns:s3="http://s3.amazonaws.com/doc/2006-03-01/"><s3:Code>NoSuchUpload</s3:Code></s3:Error>"#;
        let e = parse_error(body.as_bytes()).unwrap();
        assert_eq!(e.code, "NoSuchUpload");
        assert_eq!(status_for_code(&e.code), StatusCode::NOT_FOUND);
    }

    #[test]
    fn status_mapping() {
        assert_eq!(status_for_code("BadDigest"), StatusCode::BAD_REQUEST);
        assert_eq!(status_for_code("InvalidPart"), StatusCode::BAD_REQUEST);
        assert_eq!(status_for_code("AccessDenied"), StatusCode::FORBIDDEN);
        assert_eq!(
            status_for_code("PreconditionFailed"),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            status_for_code("SomethingNew"),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
