//! Route path patterns: `/tenants/{tenant}/users/**`.
//!
//! Segments are matched literally, `{name}` captures one segment, `*` matches one segment,
//! a final `{name?}` captures one segment if there is one (`/users/{id?}` serves the collection
//! and its records), and a final `**` matches any number of trailing segments (including none).
//!
//! Literal segments match ASCII-case-insensitively: stores that route without regard to case
//! (Express, Spring, json-server) take `/USERS` as `/users`, so the proxy must too, or
//! `/tenants/acme/USERS` would miss an encrypting route and fall to a later pass-through one
//! while the store files it with the encrypted records. [`PathPattern::matches_loosely`]
//! goes further (percent-decoding, Unicode case folding) to find spellings the proxy refuses.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
    OptionalCapture(String),
    Any,
    Rest,
}

#[derive(Debug, Clone)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(source: &str) -> Result<Self, String> {
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| format!("path pattern {source:?} must start with '/'"))?;
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            vec![]
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => {
                    return Err(format!(
                        "path pattern {source:?}: '**' must be the last segment"
                    ));
                }
                "*" => Segment::Any,
                "" => return Err(format!("path pattern {source:?} has an empty segment")),
                p if p.starts_with('{') && p.ends_with('}') => {
                    let mut name = &p[1..p.len() - 1];
                    let optional = name.ends_with('?');
                    if optional {
                        if i + 1 != parts.len() {
                            return Err(format!(
                                "path pattern {source:?}: an optional capture must be the last segment"
                            ));
                        }
                        name = &name[..name.len() - 1];
                    }
                    if name.is_empty()
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        return Err(format!(
                            "path pattern {source:?}: bad capture name {name:?}"
                        ));
                    }
                    if segments
                        .iter()
                        .any(|s| matches!(s, Segment::Capture(n) | Segment::OptionalCapture(n) if n == name))
                    {
                        return Err(format!(
                            "path pattern {source:?}: capture {name:?} appears twice"
                        ));
                    }
                    if optional {
                        Segment::OptionalCapture(name.to_string())
                    } else {
                        Segment::Capture(name.to_string())
                    }
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path pattern {source:?}: segment {p:?} mixes text with a capture or wildcard"
                    ));
                }
                p if check_segment(p).is_err() => {
                    return Err(format!(
                        "path pattern {source:?}: segment {p:?} is not spelled as requests must be \
                         (no ';', dot segments, encoded slashes or %XX of letters, digits, \
                         '-._~'; uppercase hex)"
                    ));
                }
                p => Segment::Literal(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(PathPattern {
            source: source.to_string(),
            segments,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn has_capture(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) | Segment::OptionalCapture(n) if n == name))
    }

    /// Match a request path; returns the captures, percent-decoded. `None` when it does not
    /// match or a capture is not UTF-8. Literals match ASCII-case-insensitively.
    pub fn matches(&self, path: &str) -> Option<HashMap<String, String>> {
        let parts = split_path(path)?;
        self.match_parts(&parts, false).map(|(c, _)| c)
    }

    /// [`PathPattern::matches`] on a path split into segments, also returning how many
    /// segments precede the trailing `**` (all of them without one): the part of the path
    /// that chose the route, as opposed to the free tail (an S3 object key).
    pub fn match_segments(&self, parts: &[&str]) -> Option<(HashMap<String, String>, usize)> {
        self.match_parts(parts, false)
    }

    /// Whether the path could be taken for this pattern by a store that percent-decodes
    /// segments and compares them with Unicode case folding (`%75sers`, `u%C5%BFers` with a
    /// long s, `%E2%84%AAey` with a Kelvin sign for `key`) or compatibility mappings
    /// (full-width letters): a segment of the same length whose non-ASCII characters stand
    /// in for the literal's is taken as a match too. A superset of [`PathPattern::matches`].
    pub fn matches_loosely(&self, parts: &[&str]) -> bool {
        self.match_parts(parts, true).is_some()
    }

    fn match_parts(&self, parts: &[&str], loose: bool) -> Option<(HashMap<String, String>, usize)> {
        let mut captures = HashMap::new();
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Rest => return Some((captures, i)),
                Segment::Literal(l) => {
                    let p = parts.get(i)?;
                    let same = p.eq_ignore_ascii_case(l) || (loose && looks_like(l, p));
                    if !same {
                        return None;
                    }
                }
                Segment::Any => {
                    parts.get(i).filter(|p| !p.is_empty())?;
                }
                Segment::Capture(name) => {
                    let raw = parts.get(i).filter(|p| !p.is_empty())?;
                    if !loose {
                        captures.insert(name.clone(), percent_decode(raw)?.into_owned());
                    }
                }
                Segment::OptionalCapture(name) => {
                    match parts.get(i) {
                        // `/users` and `/users/` are the collection.
                        None => return Some((captures, i)),
                        Some(&"") => {}
                        Some(raw) => {
                            if !loose {
                                captures.insert(name.clone(), percent_decode(raw)?.into_owned());
                            }
                        }
                    }
                }
            }
            i += 1;
        }
        (i == parts.len()).then_some((captures, i))
    }

    /// Whether some request path matches both patterns (literals compared without regard to
    /// case, captures and `*` taking any segment, `**` any tail). Used by the configuration
    /// check that refuses a pass-through route placed before an encrypting one it overlaps.
    pub fn intersects(&self, other: &PathPattern) -> bool {
        fn go(a: &[Segment], b: &[Segment]) -> bool {
            match (a.first(), b.first()) {
                (Some(Segment::Rest), _) | (_, Some(Segment::Rest)) => true,
                (None, None) => true,
                // An optional capture may match nothing (or an empty last segment).
                (Some(Segment::OptionalCapture(_)), None)
                | (None, Some(Segment::OptionalCapture(_))) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some(x), Some(y)) => {
                    let compatible = match (x, y) {
                        (Segment::Literal(l), Segment::Literal(m)) => {
                            l.eq_ignore_ascii_case(m) || looks_like(l, m) || looks_like(m, l)
                        }
                        _ => true,
                    };
                    compatible && go(&a[1..], &b[1..])
                }
            }
        }
        go(&self.segments, &other.segments)
    }
}

/// The segments of a path (`/a/b/` → `a`, `b`, ``); `None` without the leading `/`.
pub fn split_path(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    Some(if rest.is_empty() {
        vec![]
    } else {
        rest.split('/').collect()
    })
}

/// One path segment in the only spelling the proxy accepts where the path chooses a route.
/// Each refusal is a spelling some store reads as another one, so that the proxy and the
/// store would disagree on which route, record or tenant a request names:
/// - dot segments (`..`, `%2e`): resolved by many servers;
/// - encoded slashes and backslashes: decoded into separators by some;
/// - `;`: matrix parameters, cut off by Spring and Tomcat (`/users;x=1` is `/users`);
/// - `%XX` of an unreserved character (`%75` for `u`): decoded by most, not by all — a
///   decoding store sees `/users` where the proxy sees another segment, and a capture
///   (`ac%6De`) would name one tenant for the key context and two for a non-decoding store;
/// - lowercase hex (`%c3%a9`): the same bytes as `%C3%A9`, two spellings again.
pub fn check_segment(seg: &str) -> Result<(), &'static str> {
    if seg.contains(';') {
        return Err("';' (matrix parameters) is not allowed in paths");
    }
    if seg.contains('\\') {
        return Err("encoded slashes and backslashes are not allowed");
    }
    let bytes = seg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .ok_or("bad percent-encoding")?;
            if hex.iter().any(u8::is_ascii_lowercase) {
                return Err("percent-encodings must use uppercase hex digits (%C3%A9, not %c3%a9)");
            }
            let v = (hex_value(hex[0]) << 4) | hex_value(hex[1]);
            if v == b'/' || v == b'\\' {
                return Err("encoded slashes and backslashes are not allowed");
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                return Err("letters, digits and '-._~' must not be percent-encoded");
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    let decoded = percent_decode(seg).ok_or("bad percent-encoding")?;
    if decoded == "." || decoded == ".." {
        return Err("dot segments are not allowed");
    }
    Ok(())
}

fn hex_value(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        _ => h - b'A' + 10,
    }
}

/// Case folding as Unicode-aware stores do it (upper, then lower): `ſ` → `s`, `K` (Kelvin)
/// → `k`, `ß` → `ss`, `ı` → `i`.
pub fn fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether a request segment (as sent) could be read as the literal by a store that decodes
/// and folds more than ASCII case (see [`PathPattern::matches_loosely`]).
fn looks_like(literal: &str, raw: &str) -> bool {
    let Some(decoded) = percent_decode(raw) else {
        return false;
    };
    if decoded.eq_ignore_ascii_case(literal) {
        return true;
    }
    // Between ASCII strings, Unicode case folding is ASCII case folding, and the stand-in
    // rule below needs a non-ASCII character: nothing more can match (and nothing is folded
    // into new strings on every request).
    if decoded.is_ascii() && literal.is_ascii() {
        return false;
    }
    if fold(&decoded) == fold(literal) {
        return true;
    }
    // Same length, and every character either the literal's (ignoring ASCII case) or a
    // non-ASCII stand-in for it (full-width `ｕ`, mathematical letters, ...).
    decoded.chars().count() == literal.chars().count()
        && !decoded.is_ascii()
        && decoded
            .chars()
            .zip(literal.chars())
            .all(|(d, l)| d.eq_ignore_ascii_case(&l) || !d.is_ascii())
}

/// Decode `%XX` escapes; `None` for a bad escape or a result that is not UTF-8. Borrows
/// when there is nothing to decode (the common case on the request path: no allocation).
pub fn percent_decode(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !s.contains('%') {
        return Some(std::borrow::Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let p = PathPattern::parse("/tenants/{tenant}/users/**").unwrap();
        let c = p.matches("/tenants/ac%6De/users/7").unwrap();
        assert_eq!(c["tenant"], "acme");
        assert!(p.matches("/tenants/acme/users").is_some());
        assert!(p.matches("/tenants//users").is_none());
        assert!(p.matches("/tenants/acme/orders").is_none());
        let exact = PathPattern::parse("/health").unwrap();
        assert!(exact.matches("/health").is_some());
        assert!(exact.matches("/health/x").is_none());
        assert!(PathPattern::parse("/a/**/b").is_err());
        assert!(PathPattern::parse("a").is_err());
        assert!(PathPattern::parse("/x{y}").is_err());
        let opt = PathPattern::parse("/t/{tenant}/users/{id?}").unwrap();
        assert!(!opt.matches("/t/a/users").unwrap().contains_key("id"));
        assert!(!opt.matches("/t/a/users/").unwrap().contains_key("id"));
        assert_eq!(opt.matches("/t/a/users/7").unwrap()["id"], "7");
        assert!(opt.matches("/t/a/users/7/x").is_none());
        assert!(opt.has_capture("id"));
        assert!(PathPattern::parse("/a/{id?}/b").is_err());
    }

    #[test]
    fn literals_match_without_regard_to_ascii_case() {
        let p = PathPattern::parse("/tenants/{tenant}/users/**").unwrap();
        assert!(p.matches("/tenants/acme/USERS").is_some());
        assert!(p.matches("/Tenants/acme/Users/7").is_some());
        // Captures keep the case they were sent with.
        assert_eq!(p.matches("/tenants/ACME/users").unwrap()["tenant"], "ACME");
        // The strict match does not decode literals.
        assert!(p.matches("/tenants/acme/%75sers").is_none());
    }

    #[test]
    fn loose_matching_finds_what_a_decoding_or_folding_store_would_take() {
        let p = PathPattern::parse("/tenants/{tenant}/users/**").unwrap();
        let loose = |path: &str| p.matches_loosely(&split_path(path).unwrap());
        for hit in [
            "/tenants/acme/users",
            "/tenants/acme/USERS",
            "/tenants/acme/%75sers",
            "/tenants/acme/u%C5%BFers", // ſ (long s)
            "/tenants/acme/U%C5%BFERS",
            "/tenants/acme/%EF%BD%95sers", // full-width u
        ] {
            assert!(loose(hit), "{hit}");
        }
        // A zero-width space makes it another name for any store.
        assert!(!loose("/tenants/acme/user%E2%80%8Bs"));
        assert!(!loose("/tenants/acme/orders"));
        let k = PathPattern::parse("/keys/**").unwrap();
        assert!(k.matches_loosely(&split_path("/%E2%84%AAeys").unwrap())); // Kelvin sign
        let ss = PathPattern::parse("/class/**").unwrap();
        assert!(ss.matches_loosely(&split_path("/cla%C3%9F").unwrap())); // ß folds to ss
    }

    #[test]
    fn one_spelling_per_segment() {
        for bad in [
            "users;x=1",
            ";",
            "ac%6De",
            "%2e",
            "%2E%2E",
            "%7E",
            "%5F",
            "%2D",
            "%c3%a9",
            "%2F",
            "%5C",
            "a\\b",
            "%zz",
            "%4",
            "..",
        ] {
            assert!(check_segment(bad).is_err(), "{bad}");
        }
        for good in [
            "acme",
            "a%20b",
            "caf%C3%A9",
            "a%3Bb",
            "a!b",
            "%25",
            "user@x.com",
            "",
        ] {
            assert!(check_segment(good).is_ok(), "{good}");
        }
        assert!(PathPattern::parse("/a;b/**").is_err());
        assert!(PathPattern::parse("/%75sers").is_err());
    }

    #[test]
    fn intersections() {
        let enc = PathPattern::parse("/tenants/{tenant}/users/**").unwrap();
        let hits = [
            "/**",
            "/tenants/**",
            "/tenants/*/USERS",
            "/tenants/acme/users/{id}",
            "/{a}/{b}/{c?}",
            "/TENANTS/{t}/users",
        ];
        for h in hits {
            assert!(PathPattern::parse(h).unwrap().intersects(&enc), "{h}");
            assert!(
                enc.intersects(&PathPattern::parse(h).unwrap()),
                "{h} (reversed)"
            );
        }
        for miss in [
            "/health",
            "/tenants/{t}/orders/**",
            "/tenants/{t}",
            "/a/b/c/d",
        ] {
            let m = PathPattern::parse(miss).unwrap();
            assert!(!m.intersects(&enc), "{miss}");
        }
        let opt = PathPattern::parse("/t/{tenant}/users/{id?}").unwrap();
        assert!(PathPattern::parse("/t/a/users").unwrap().intersects(&opt));
        assert!(PathPattern::parse("/t/a/users/1").unwrap().intersects(&opt));
        assert!(
            !PathPattern::parse("/t/a/users/1/x")
                .unwrap()
                .intersects(&opt)
        );
    }
}
