//! Context value templates: `"{path.tenant}"`, `"{header.x-region}"`, `"users"`,
//! `"t-{path.tenant}"`, and alternatives `"{json.id|path.id}"` (the first one present wins).
//!
//! Sources: `path.NAME` (a capture of the route pattern), `header.NAME`, `json.NAME` (a top-level
//! member of each JSON document, message context only: it is how a record id is bound),
//! `s3.bucket`, and the authenticated principal: `identity` (its name), `claim.NAME` (a JWT
//! claim) and `principal.NAME` (an attribute the authenticator configured).

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(String),
    Header(http::HeaderName),
    Json(String),
    /// The S3 bucket of the request (S3 routes).
    S3Bucket,
    /// The authenticated principal's name.
    Identity,
    /// A claim of the principal's JWT (scalar claims only).
    Claim(String),
    /// An attribute of the principal (from its certificate, token or S3 client entry).
    Principal(String),
}

impl Source {
    /// Whether the value comes from the authenticated principal, not from the request.
    pub fn is_principal(&self) -> bool {
        matches!(
            self,
            Source::Identity | Source::Claim(_) | Source::Principal(_)
        )
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Path(n) => write!(f, "path.{n}"),
            Source::Header(n) => write!(f, "header.{n}"),
            Source::Json(n) => write!(f, "json.{n}"),
            Source::S3Bucket => write!(f, "s3.bucket"),
            Source::Identity => write!(f, "identity"),
            Source::Claim(n) => write!(f, "claim.{n}"),
            Source::Principal(n) => write!(f, "principal.{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Alternatives, tried in order.
    Var(Vec<Source>),
}

#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

/// Where a template looks values up.
pub trait Lookup {
    fn lookup(&self, source: &Source) -> Option<String>;
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("unbalanced '}}' in {s:?}"));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_string()));
                    }
                    let end = rest[i..]
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in {s:?}"))?
                        + i;
                    let inner = &rest[i + 1..end];
                    let sources = inner
                        .split('|')
                        .map(|alt| parse_source(alt.trim()))
                        .collect::<Result<Vec<_>, _>>()?;
                    parts.push(Part::Var(sources));
                    rest = &rest[end + 1..];
                }
                None => {
                    parts.push(Part::Literal(rest.to_string()));
                    rest = "";
                }
            }
        }
        Ok(Template { parts })
    }

    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.parts.iter().flat_map(|p| match p {
            Part::Var(v) => v.as_slice(),
            Part::Literal(_) => &[],
        })
    }

    /// Render with values from `lookup`; `Err` names the missing source(s).
    pub fn render(&self, lookup: &dyn Lookup) -> Result<String, String> {
        let var = |alternatives: &[Source]| {
            alternatives
                .iter()
                .find_map(|s| lookup.lookup(s))
                .ok_or_else(|| {
                    alternatives
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                })
        };
        // One variable alone (the usual `{path.tenant}`): its value as the lookup made it.
        if let [Part::Var(alternatives)] = self.parts.as_slice() {
            return var(alternatives);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Var(alternatives) => out.push_str(&var(alternatives)?),
            }
        }
        Ok(out)
    }
}

fn parse_source(s: &str) -> Result<Source, String> {
    match s {
        "s3.bucket" => return Ok(Source::S3Bucket),
        "identity" => return Ok(Source::Identity),
        _ => {}
    }
    let (kind, name) = s.split_once('.').ok_or_else(|| {
        format!(
            "{{{s}}}: expected path.NAME, header.NAME, json.NAME, claim.NAME, principal.NAME, s3.bucket or identity"
        )
    })?;
    if name.is_empty() {
        return Err(format!("{{{s}}}: empty name"));
    }
    match kind {
        "path" => Ok(Source::Path(name.to_string())),
        "header" => http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map(Source::Header)
            .map_err(|_| format!("{{{s}}}: {name:?} is not a valid header name")),
        "json" => Ok(Source::Json(name.to_string())),
        "claim" => Ok(Source::Claim(name.to_string())),
        "principal" => Ok(Source::Principal(name.to_string())),
        other => Err(format!(
            "{{{s}}}: unknown source {other:?} (expected path, header, json, claim or principal)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct L;
    impl Lookup for L {
        fn lookup(&self, s: &Source) -> Option<String> {
            match s {
                Source::Path(n) if n == "tenant" => Some("acme".into()),
                _ => None,
            }
        }
    }

    #[test]
    fn render_and_alternatives() {
        assert_eq!(
            Template::parse("t-{path.tenant}")
                .unwrap()
                .render(&L)
                .unwrap(),
            "t-acme"
        );
        assert_eq!(
            Template::parse("{json.id|path.tenant}")
                .unwrap()
                .render(&L)
                .unwrap(),
            "acme"
        );
        assert_eq!(
            Template::parse("users").unwrap().render(&L).unwrap(),
            "users"
        );
        let e = Template::parse("{header.x-region}")
            .unwrap()
            .render(&L)
            .unwrap_err();
        assert_eq!(e, "header.x-region");
        assert!(Template::parse("{nope}").is_err());
        assert!(Template::parse("{path.a").is_err());
        assert!(Template::parse("a}").is_err());
        assert!(Template::parse("{query.a}").is_err());
    }
}
