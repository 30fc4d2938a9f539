//! Route path patterns: `/tenants/{tenant}/users/**`.
//!
//! Segments are matched literally, `{name}` captures one segment, `*` matches one segment,
//! a final `{name?}` captures one segment if there is one (`/users/{id?}` serves the collection
//! and its records), and a final `**` matches any number of trailing segments (including none).

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

    /// Match a request path (already checked to have no dot segments); returns the captures,
    /// percent-decoded. `None` when it does not match or a capture is not UTF-8.
    pub fn matches(&self, path: &str) -> Option<HashMap<String, String>> {
        let rest = path.strip_prefix('/')?;
        let parts: Vec<&str> = if rest.is_empty() {
            vec![]
        } else {
            rest.split('/').collect()
        };
        let mut captures = HashMap::new();
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Rest => return Some(captures),
                Segment::Literal(l) => {
                    if parts.get(i) != Some(&l.as_str()) {
                        return None;
                    }
                }
                Segment::Any => {
                    parts.get(i).filter(|p| !p.is_empty())?;
                }
                Segment::Capture(name) => {
                    let raw = parts.get(i).filter(|p| !p.is_empty())?;
                    captures.insert(name.clone(), percent_decode(raw)?);
                }
                Segment::OptionalCapture(name) => {
                    match parts.get(i) {
                        // `/users` and `/users/` are the collection.
                        None => return Some(captures),
                        Some(&"") => {}
                        Some(raw) => {
                            captures.insert(name.clone(), percent_decode(raw)?);
                        }
                    }
                }
            }
            i += 1;
        }
        (i == parts.len()).then_some(captures)
    }
}

/// Decode `%XX` escapes; `None` for a bad escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
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
    String::from_utf8(out).ok()
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
}
