//! S3 XML error bodies: building ours, and spotting upstream errors hidden in a `200 OK`.
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
//! `<ActualObjectSize>`). Clients read `Code` to decide what to do (retry, 404, ...), so the
//! proxy's own errors must be in this shape, with `Content-Type: application/xml`.
//!
//! Two S3 operations can fail *after* having sent `200 OK`: CompleteMultipartUpload and
//! CopyObject (also UploadPartCopy) send the status line early and keep the connection alive
//! with whitespace while they work, then send either their result or an `<Error>` document.
//! [`parse_error`] detects the latter so the gateway can turn it into a real error status
//! ([`status_for_code`]) instead of passing a "successful" failure to the client.
//!
//! Text is escaped with quick-xml's [`escape`](quick_xml::escape::escape) (`&`, `<`, `>`, `'`,
//! `"`), so keys with `&` or `<` in a `Resource` stay well-formed.

use std::borrow::Cow;

use http::StatusCode;
use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

/// The XML declaration S3 puts in front of every error body.
pub const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// One S3 error response: status, `Code`, `Message` and the optional fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    /// HTTP status to send with the body.
    pub status: StatusCode,
    /// S3 error code (`NoSuchKey`, `InvalidRange`, `BadDigest`, ...).
    pub code: Cow<'static, str>,
    /// Human-readable message. Never put plaintext or secrets here.
    pub message: Cow<'static, str>,
    /// `<Resource>`: the bucket or object path the request addressed, if known.
    pub resource: Option<String>,
    /// `<RequestId>`: the proxy's request id, if any.
    pub request_id: Option<String>,
    /// Extra elements after `Message` (e.g. `("ActualObjectSize", "42")`), in order.
    /// Names are fixed by the code that creates the error, hence `&'static str`.
    pub extra: Vec<(&'static str, String)>,
}

impl S3Error {
    /// A new error with no resource, request id or extra fields.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        S3Error {
            status,
            code: code.into(),
            message: message.into(),
            resource: None,
            request_id: None,
            extra: Vec::new(),
        }
    }

    /// Sets `<Resource>`.
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Sets `<RequestId>`.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Appends an extra element `<name>value</name>`. `name` must be a plain XML name
    /// (ASCII letters and digits); it is written as is.
    pub fn with_field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        debug_assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "extra field names are plain XML names"
        );
        self.extra.push((name, value.into()));
        self
    }

    /// The complete body: declaration, then `<Error>` with `Code`, `Message`, the extra
    /// fields, `Resource` and `RequestId` (the last two only when set), no whitespace.
    pub fn to_xml(&self) -> String {
        let mut writer = Writer::new(Vec::with_capacity(256));
        put(
            &mut writer,
            Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)),
        );
        put(&mut writer, Event::Start(BytesStart::new("Error")));
        write_field(&mut writer, "Code", &self.code);
        write_field(&mut writer, "Message", &self.message);
        for (name, value) in &self.extra {
            write_field(&mut writer, name, value);
        }
        if let Some(resource) = &self.resource {
            write_field(&mut writer, "Resource", resource);
        }
        if let Some(request_id) = &self.request_id {
            write_field(&mut writer, "RequestId", request_id);
        }
        put(&mut writer, Event::End(BytesEnd::new("Error")));
        String::from_utf8(writer.into_inner()).expect("quick-xml writes UTF-8 for UTF-8 input")
    }
}

fn put(writer: &mut Writer<Vec<u8>>, event: Event<'_>) {
    writer
        .write_event(event)
        .expect("writing XML into a Vec cannot fail");
}

/// `<name>escaped value</name>`.
fn write_field(writer: &mut Writer<Vec<u8>>, name: &str, value: &str) {
    put(writer, Event::Start(BytesStart::new(name)));
    put(writer, Event::Text(BytesText::new(value)));
    put(writer, Event::End(BytesEnd::new(name)));
}

/// Shorthand for `S3Error::new(...).with_resource(..).with_request_id(..).to_xml()` without
/// extra fields.
pub fn error_xml(
    code: &str,
    message: &str,
    resource: Option<&str>,
    request_id: Option<&str>,
) -> String {
    let mut error = S3Error::new(StatusCode::BAD_REQUEST, code.to_owned(), message.to_owned());
    error.resource = resource.map(str::to_owned);
    error.request_id = request_id.map(str::to_owned);
    error.to_xml()
}

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

    #[test]
    fn builds_the_s3_shape() {
        let xml = S3Error::new(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        )
        .with_resource("/bucket/photos/2024/a.jpg")
        .with_request_id("4442587FB7D0A2F9")
        .to_xml();
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                "<Error><Code>NoSuchKey</Code>",
                "<Message>The specified key does not exist.</Message>",
                "<Resource>/bucket/photos/2024/a.jpg</Resource>",
                "<RequestId>4442587FB7D0A2F9</RequestId></Error>"
            )
        );
        assert!(xml.starts_with(XML_DECLARATION));
    }

    #[test]
    fn optional_fields_are_omitted_and_extras_kept_in_order() {
        let xml = S3Error::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            "The requested range is not satisfiable",
        )
        .with_field("RangeRequested", "bytes=100-")
        .with_field("ActualObjectSize", "42")
        .to_xml();
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                "<Error><Code>InvalidRange</Code>",
                "<Message>The requested range is not satisfiable</Message>",
                "<RangeRequested>bytes=100-</RangeRequested>",
                "<ActualObjectSize>42</ActualObjectSize></Error>"
            )
        );
    }

    #[test]
    fn escapes_text() {
        let xml = error_xml(
            "NoSuchKey",
            "Key <a & b> \"quoted\" it's",
            Some("/b/Tom & Jerry <1>.txt"),
            Some("id&1"),
        );
        assert!(xml.contains("<Resource>/b/Tom &amp; Jerry &lt;1&gt;.txt</Resource>"));
        assert!(xml.contains("<RequestId>id&amp;1</RequestId>"));
        assert!(!xml.contains("<a & b>"));
        // And it round-trips through our own parser.
        let parsed = parse_error(xml.as_bytes()).unwrap();
        assert_eq!(parsed.code, "NoSuchKey");
        assert_eq!(parsed.message, "Key <a & b> \"quoted\" it's");
        assert_eq!(parsed.resource.as_deref(), Some("/b/Tom & Jerry <1>.txt"));
        assert_eq!(parsed.request_id.as_deref(), Some("id&1"));
    }

    #[test]
    fn unicode_survives() {
        let xml = error_xml(
            "NoSuchKey",
            "ключ 😀 not found",
            Some("/b/日本語 キー"),
            None,
        );
        let parsed = parse_error(xml.as_bytes()).unwrap();
        assert_eq!(parsed.message, "ключ 😀 not found");
        assert_eq!(parsed.resource.as_deref(), Some("/b/日本語 キー"));
        assert_eq!(parsed.request_id, None);
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
