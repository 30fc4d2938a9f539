//! ETag marking: keep clients from mistaking the upstream ciphertext MD5 for a content MD5.
//!
//! Upstream computes the ETag of a single-part object as the MD5 of what it stores, i.e. of
//! the *ciphertext*. rclone, s3cmd (and `aws s3 sync --exact-timestamps`-style tools) treat an
//! ETag of exactly 32 hex digits as the MD5 of the content they downloaded and fail or
//! re-upload when it differs. S3 multipart ETags (`"<32 hex>-<N>"`, N ≥ 1) are known not to be
//! content MD5s and are left alone by those clients.
//!
//! So the gateway **marks** every 32-hex ETag it sends to a client by appending `-0`
//! (`"9b2cf535f27731c974343645a3985328"` → `"9b2cf535f27731c974343645a3985328-0"`): it looks
//! like a multipart ETag, and S3 never produces `-0` (part counts start at 1), so the mark is
//! unambiguous and can be stripped again (**unmark**) wherever a client sends an ETag back:
//!
//! | where | function |
//! |---|---|
//! | `ETag` response header (GET, HEAD, PUT, UploadPart) | [`mark`] |
//! | `<ETag>` in listings | [`crate::s3::listing::rewrite`] |
//! | `<ETag>` in CopyObjectResult / CopyPartResult | [`mark_in_xml`] |
//! | `If-Match`, `If-None-Match`, `x-amz-copy-source-if-match`, `x-amz-copy-source-if-none-match` | [`unmark_list`] |
//! | `<ETag>` in the CompleteMultipartUpload request body | [`unmark_in_xml`] |
//!
//! Values that are not a 32-hex ETag (multipart ETags, `*`, garbage) pass through unchanged,
//! and both directions accept the forms seen in the wild: quoted or bare, with or without a
//! weak `W/` prefix, upper- or lower-case hex.

use crate::s3::listing::{Edit, Visit, XmlRewriteError, apply_edits, escape_like, walk};

/// The suffix appended to single-part ETags.
pub const MARK: &str = "-0";

/// An entity-tag split into its parts. `inner` is the text between the quotes (or the whole
/// value when unquoted).
struct Parsed<'a> {
    weak: bool,
    quoted: bool,
    inner: &'a str,
}

fn parse(value: &str) -> Parsed<'_> {
    let t = value.trim();
    let (weak, rest) = match t.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    if rest.len() >= 2 && rest.starts_with('"') && rest.ends_with('"') {
        Parsed {
            weak,
            quoted: true,
            inner: &rest[1..rest.len() - 1],
        }
    } else {
        Parsed {
            weak,
            quoted: false,
            inner: rest,
        }
    }
}

fn format(p: &Parsed<'_>, inner: &str) -> String {
    let weak = if p.weak { "W/" } else { "" };
    let q = if p.quoted { "\"" } else { "" };
    format!("{weak}{q}{inner}{q}")
}

fn is_md5_hex(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// True if `value` is a marked ETag (`"<32 hex>-0"`).
pub fn is_marked(value: &str) -> bool {
    let p = parse(value);
    p.inner.strip_suffix(MARK).is_some_and(is_md5_hex)
}

/// Marks one ETag for a client: `"<32 hex>"` → `"<32 hex>-0"`, keeping quotes and a `W/`
/// prefix as they were. Everything else (multipart `-N` ETags, already marked values,
/// anything unexpected) is returned unchanged.
///
/// ```
/// use envelope_proxy::s3::etag::mark;
/// assert_eq!(mark("\"d41d8cd98f00b204e9800998ecf8427e\""), "\"d41d8cd98f00b204e9800998ecf8427e-0\"");
/// assert_eq!(mark("\"3858f62230ac3c915f300c664312c11f-9\""), "\"3858f62230ac3c915f300c664312c11f-9\"");
/// ```
pub fn mark(value: &str) -> String {
    let p = parse(value);
    if is_md5_hex(p.inner) {
        format(&p, &format!("{}{MARK}", p.inner))
    } else {
        value.to_owned()
    }
}

/// Strips the mark from one ETag sent by a client: `"<32 hex>-0"` → `"<32 hex>"`, keeping
/// quotes and `W/`. Everything else is returned unchanged (so unmarking is safe to apply to
/// values that were never marked, e.g. an ETag the client got from elsewhere).
pub fn unmark(value: &str) -> String {
    let p = parse(value);
    match p.inner.strip_suffix(MARK) {
        Some(hex) if is_md5_hex(hex) => format(&p, hex),
        _ => value.to_owned(),
    }
}

/// The part count N of a multipart ETag `"<32 hex>-N"` (N ≥ 1, quotes and `W/` optional), or
/// `None` for a single-part or marked (`-0`) ETag or anything else. This is the `N` in the
/// multipart size formula (see [`crate::s3::listing::multipart_plaintext_len`]).
pub fn multipart_parts(value: &str) -> Option<u64> {
    let p = parse(value);
    let (hex, n) = p.inner.rsplit_once('-')?;
    if !is_md5_hex(hex) || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    (n >= 1).then_some(n)
}

/// Unmarks every entity-tag in an `If-Match` / `If-None-Match` (or
/// `x-amz-copy-source-if-match` / `-if-none-match`) header value: a comma-separated list of
/// entity-tags, each quoted or bare, optionally weak (`W/"…"`), or `*`.
///
/// Only the marked tags are rewritten; separators, whitespace and every other byte are kept
/// as they were, so a value without marked tags comes back identical.
pub fn unmark_list(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut copied = 0; // bytes of `value` already in `out`
    let mut i = 0;
    while i < bytes.len() {
        // Skip separators.
        if bytes[i] == b',' || bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if value[i..].starts_with("W/") {
            i += 2;
        }
        if i < bytes.len() && bytes[i] == b'"' {
            // Quoted: up to the closing quote (commas inside quotes belong to the tag).
            i = match value[i + 1..].find('"') {
                Some(j) => i + 1 + j + 1,
                None => bytes.len(),
            };
        }
        // Anything else up to the next comma belongs to this item too.
        while i < bytes.len() && bytes[i] != b',' {
            i += 1;
        }
        let item = value[start..i].trim_end();
        let end = start + item.len();
        let unmarked = unmark(item);
        if unmarked != item {
            out.push_str(&value[copied..start]);
            out.push_str(&unmarked);
            copied = end;
        }
    }
    out.push_str(&value[copied..]);
    out
}

/// Rewrites the text of every `<ETag>` element in an XML document (at any depth, any
/// namespace prefix) with `f`, keeping every other byte of the document.
fn rewrite_xml_etags(body: &[u8], f: impl Fn(&str) -> String) -> Result<Vec<u8>, XmlRewriteError> {
    let mut edits = Vec::new();
    walk(body, |visit| {
        if let Visit::Leaf(leaf) = visit
            && leaf.path.last().map(String::as_str) == Some("ETag")
            && let Some(inner) = leaf.inner
        {
            let new = f(&leaf.text);
            if new != leaf.text {
                edits.push(Edit {
                    replacement: escape_like(&body[inner.clone()], &new).into_bytes(),
                    range: inner,
                });
            }
        }
        Ok(())
    })?;
    Ok(apply_edits(body, edits))
}

/// Unmarks every `<ETag>` in an XML request body — the CompleteMultipartUpload body
/// (`<CompleteMultipartUpload><Part><ETag>"…-0"</ETag><PartNumber>1</PartNumber></Part>…`)
/// before it goes upstream. Only the ETag texts change; every other byte is kept (the
/// escaping style of quotes, `&quot;` / `&#34;` / `"`, is kept too). Errors on malformed XML
/// (answer `MalformedXML`).
///
/// The body's `Content-MD5` / `x-amz-checksum-*` (if the client sent any) no longer match
/// once an ETag changed: strip them or recompute them over the new body.
pub fn unmark_in_xml(body: &[u8]) -> Result<Vec<u8>, XmlRewriteError> {
    rewrite_xml_etags(body, unmark)
}

/// Marks every `<ETag>` in an XML response body — CopyObjectResult and CopyPartResult (whose
/// ETags are upstream ciphertext MD5s) — keeping every other byte. Listings have their own
/// rewriter ([`crate::s3::listing::rewrite`]), which also fixes sizes. Errors on malformed
/// XML.
pub fn mark_in_xml(body: &[u8]) -> Result<Vec<u8>, XmlRewriteError> {
    rewrite_xml_etags(body, mark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

    #[test]
    fn marks_single_part_etags() {
        assert_eq!(
            mark("\"d41d8cd98f00b204e9800998ecf8427e\""),
            "\"d41d8cd98f00b204e9800998ecf8427e-0\""
        );
        // Bare (some SDKs and stores strip the quotes), weak, upper-case hex.
        assert_eq!(
            mark("9B2CF535F27731C974343645A3985328"),
            "9B2CF535F27731C974343645A3985328-0"
        );
        assert_eq!(
            mark("W/\"9b2cf535f27731c974343645a3985328\""),
            "W/\"9b2cf535f27731c974343645a3985328-0\""
        );
        assert_eq!(
            mark("  \"9b2cf535f27731c974343645a3985328\"  "),
            "\"9b2cf535f27731c974343645a3985328-0\""
        );
    }

    #[test]
    fn leaves_everything_else() {
        for v in [
            "\"3858f62230ac3c915f300c664312c11f-9\"",
            "\"3858f62230ac3c915f300c664312c11f-10000\"",
            "\"d41d8cd98f00b204e9800998ecf8427e-0\"", // already marked: marking is idempotent
            "*",
            "",
            "\"\"",
            "\"d41d8cd98f00b204e9800998ecf8427\"",   // 31 hex
            "\"d41d8cd98f00b204e9800998ecf8427e0\"", // 33 hex
            "\"g41d8cd98f00b204e9800998ecf8427e\"",  // not hex
            "\"d41d8cd98f00b204e9800998ecf8427e",    // unbalanced quote
            "\"abc\"",
        ] {
            assert_eq!(mark(v), v, "{v}");
        }
    }

    #[test]
    fn unmark_inverts_mark() {
        for v in [
            "\"d41d8cd98f00b204e9800998ecf8427e\"",
            "d41d8cd98f00b204e9800998ecf8427e",
            "W/\"d41d8cd98f00b204e9800998ecf8427e\"",
        ] {
            let m = mark(v);
            assert!(is_marked(&m));
            assert!(!is_marked(v));
            assert_eq!(unmark(&m), v);
        }
        // Real multipart ETags and unmarked values are left alone.
        assert_eq!(
            unmark("\"3858f62230ac3c915f300c664312c11f-9\""),
            "\"3858f62230ac3c915f300c664312c11f-9\""
        );
        assert_eq!(unmark("\"abc-0\""), "\"abc-0\""); // not 32 hex before -0
        assert_eq!(unmark("*"), "*");
        assert_eq!(unmark(EMPTY_MD5), EMPTY_MD5);
    }

    #[test]
    fn multipart_partss() {
        assert_eq!(
            multipart_parts("\"3858f62230ac3c915f300c664312c11f-9\""),
            Some(9)
        );
        assert_eq!(
            multipart_parts("3858f62230ac3c915f300c664312c11f-10000"),
            Some(10000)
        );
        assert_eq!(
            multipart_parts("\"3858f62230ac3c915f300c664312c11f\""),
            None
        );
        assert_eq!(
            multipart_parts("\"3858f62230ac3c915f300c664312c11f-0\""),
            None
        );
        assert_eq!(
            multipart_parts("\"3858f62230ac3c915f300c664312c11f-\""),
            None
        );
        assert_eq!(
            multipart_parts("\"3858f62230ac3c915f300c664312c11f-x\""),
            None
        );
        assert_eq!(multipart_parts("\"abc-3\""), None);
        assert_eq!(multipart_parts(""), None);
    }

    #[test]
    fn unmarks_condition_lists() {
        let a = "\"9b2cf535f27731c974343645a3985328\"";
        let b = "\"3858f62230ac3c915f300c664312c11f-9\"";
        assert_eq!(unmark_list(&mark(a)), a);
        assert_eq!(
            unmark_list(&format!("{}, {b}", mark(a))),
            format!("{a}, {b}")
        );
        assert_eq!(
            unmark_list(
                "W/\"9b2cf535f27731c974343645a3985328-0\",\"d41d8cd98f00b204e9800998ecf8427e-0\""
            ),
            "W/\"9b2cf535f27731c974343645a3985328\",\"d41d8cd98f00b204e9800998ecf8427e\""
        );
        // Bare tags (S3 accepts them) and odd spacing.
        assert_eq!(
            unmark_list(" 9b2cf535f27731c974343645a3985328-0 ,d41d8cd98f00b204e9800998ecf8427e-0"),
            " 9b2cf535f27731c974343645a3985328 ,d41d8cd98f00b204e9800998ecf8427e"
        );
        // Unchanged inputs come back byte-identical.
        for v in [
            "*",
            "",
            " , ,",
            "\"a,b\", \"c\"",
            b,
            "W/\"x\"",
            "\"unterminated",
        ] {
            assert_eq!(unmark_list(v), v, "{v:?}");
        }
        // A comma inside quotes does not split the tag.
        assert_eq!(
            unmark_list("\"a,b\", \"d41d8cd98f00b204e9800998ecf8427e-0\""),
            "\"a,b\", \"d41d8cd98f00b204e9800998ecf8427e\""
        );
    }

    #[test]
    fn unmarks_complete_multipart_body_byte_identically() {
        // As the aws cli / boto3 send it: quotes as &quot;, namespace, checksum elements.
        let body = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n",
            r#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
            "<Part><ETag>&quot;0c78aef83f66abc1fa1e8477f296d394-0&quot;</ETag><PartNumber>1</PartNumber></Part>",
            "<Part><PartNumber>2</PartNumber><ETag>&quot;acbd18db4cc2f85cedef654fccc4a4d8-0&quot;</ETag></Part>",
            "</CompleteMultipartUpload>"
        );
        let out = unmark_in_xml(body.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            body.replace("-0&quot;", "&quot;")
        );

        // rclone/Go style: &#34; ; and raw quotes; pretty-printed.
        let go = "<CompleteMultipartUpload>\n  <Part>\n    <PartNumber>1</PartNumber>\n    \
                  <ETag>&#34;0c78aef83f66abc1fa1e8477f296d394-0&#34;</ETag>\n  </Part>\n  <Part>\n    \
                  <PartNumber>2</PartNumber>\n    <ETag>\"acbd18db4cc2f85cedef654fccc4a4d8-0\"</ETag>\n  \
                  </Part>\n</CompleteMultipartUpload>\n";
        let out = unmark_in_xml(go.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            go.replace("-0&#34;", "&#34;").replace("-0\"", "\"")
        );

        // Nothing marked: identical output.
        let plain = body.replace("-0&quot;", "&quot;");
        let out = unmark_in_xml(plain.as_bytes()).unwrap();
        assert_eq!(out.as_slice(), plain.as_bytes());
    }

    #[test]
    fn marks_copy_results() {
        let body = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            "\n<CopyObjectResult><LastModified>2009-10-12T17:50:30.000Z</LastModified>",
            "<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyObjectResult>"
        );
        let out = mark_in_xml(body.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            body.replace("5328&quot;", "5328-0&quot;")
        );
        let part = "<CopyPartResult><ETag>\"3858f62230ac3c915f300c664312c11f-2\"</ETag>\
                    <LastModified>2011-04-11T20:34:56.000Z</LastModified></CopyPartResult>";
        let out = mark_in_xml(part.as_bytes()).unwrap();
        assert_eq!(out.as_slice(), part.as_bytes());
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(unmark_in_xml(b"<CompleteMultipartUpload><Part><ETag>x</Part>").is_err());
        assert!(unmark_in_xml(b"<CompleteMultipartUpload><Part>").is_err());
        assert!(unmark_in_xml(b"<a><ETag>&bogus;</ETag></a>").is_err());
    }

    proptest! {
        #[test]
        fn mark_unmark_roundtrip(hex in "[0-9a-fA-F]{32}", weak: bool, quoted: bool) {
            let q = if quoted { "\"" } else { "" };
            let w = if weak { "W/" } else { "" };
            let v = format!("{w}{q}{hex}{q}");
            let m = mark(&v);
            prop_assert!(is_marked(&m));
            prop_assert_eq!(multipart_parts(&m), None);
            prop_assert_eq!(unmark(&m), v.clone());
            prop_assert_eq!(unmark_list(&format!("{m}, *")), format!("{v}, *"));
        }

        #[test]
        fn multipart_etags_untouched(hex in "[0-9a-f]{32}", n in 1u64..=10_000) {
            let v = format!("\"{hex}-{n}\"");
            prop_assert_eq!(mark(&v), v.clone());
            prop_assert_eq!(unmark(&v), v.clone());
            prop_assert_eq!(multipart_parts(&v), Some(n));
        }

        #[test]
        fn unmark_list_never_panics(s in "\\PC{0,40}") {
            let _ = unmark_list(&s);
            let _ = mark(&s);
            let _ = unmark(&s);
        }
    }
}
