//! `auth = "trusted-header"`: a client certificate verified by a proxy in front of us (Envoy,
//! Istio) and forwarded in `x-forwarded-client-cert`:
//!
//! ```text
//! x-forwarded-client-cert: By=spiffe://acme/gw;Hash=4f2a...;Subject="CN=api,O=Acme";URI=spiffe://acme/ns/billing/sa/api;DNS=api.acme
//! ```
//!
//! Anyone can send that header, so it is believed only from `trusted_peers` (or the unix
//! socket); from anyone else it is refused, not ignored. Several proxies each append an
//! element (comma-separated); the *last* one was added by the proxy next to us and names the
//! client of that hop. Values holding `,` `;` or `=` are double-quoted, with `\"` and `\\`
//! escaped. The subject is in RFC 2253 form (`CN=a,O=b`, Envoy's) or OpenSSL's legacy
//! one-line form (`/C=US/CN=a`).
//!
//! There is no well-kept crate for this format; the parser is small, refuses anything
//! malformed with an error and never panics (attacker-controlled input up to the point the
//! peer check passes, and a trusted proxy's bug after).

use http::HeaderMap;

use super::cert::CertFacts;
use super::{AuthError, Peer, Principal};
use crate::config::RouteAuth;
use crate::config::auth::{TrustedHeaderSettings, cidr_contains};

/// Longest header accepted (all elements together); hyper's own header limit is larger.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// One proxy's account of a client certificate: its key/value pairs in order (keys as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub pairs: Vec<(String, String)>,
}

impl Element {
    fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The certificate facts this element carries (`Subject`, `URI`, `DNS`).
    pub fn facts(&self) -> Result<CertFacts, String> {
        let mut facts = CertFacts::default();
        if let Some(subject) = self.values("Subject").next() {
            facts.subject = parse_subject(subject)?;
        }
        facts.uris = self
            .values("URI")
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect();
        facts.dns = self
            .values("DNS")
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect();
        Ok(facts)
    }
}

/// Parse a whole header value into its elements, first (farthest proxy) to last.
pub fn parse(header: &str) -> Result<Vec<Element>, String> {
    if header.len() > MAX_HEADER_BYTES {
        return Err(format!("longer than {MAX_HEADER_BYTES} bytes"));
    }
    let mut elements = Vec::new();
    let mut pairs = Vec::new();
    let mut chars = header.chars().peekable();
    loop {
        // key
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let mut key = String::new();
        loop {
            match chars.next() {
                Some('=') => break,
                Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => key.push(c),
                Some(c) => return Err(format!("unexpected {c:?} in a key")),
                None if key.is_empty() && pairs.is_empty() => {
                    return Err("empty element".into());
                }
                None => return Err(format!("key {key:?} without a value")),
            }
        }
        if key.is_empty() {
            return Err("empty key".into());
        }
        // value
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('"') => break,
                    // `\"` is a quote; any other escape is kept as written, for the value's
                    // own syntax (an RFC 2253 subject's `\,`).
                    Some('\\') => match chars.next() {
                        Some('"') => value.push('"'),
                        Some(c) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => return Err("unterminated escape".into()),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of {key}")),
                }
            }
            while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        } else {
            while let Some(c) = chars.next_if(|c| *c != ';' && *c != ',') {
                if c == '"' || c == '\\' {
                    return Err(format!("unquoted value of {key} holds {c:?}"));
                }
                value.push(c);
            }
            let trimmed = value.trim_end_matches([' ', '\t']).len();
            value.truncate(trimmed);
        }
        pairs.push((key, value));
        // separator
        match chars.next() {
            Some(';') => {}
            Some(',') => elements.push(Element {
                pairs: std::mem::take(&mut pairs),
            }),
            None => {
                elements.push(Element { pairs });
                return Ok(elements);
            }
            Some(c) => return Err(format!("unexpected {c:?} after a quoted value")),
        }
    }
}

/// Subject attributes we know (`CN O OU C L ST`) from an RFC 2253 (`CN=a\,b,O=c`) or legacy
/// OpenSSL (`/O=c/CN=a`) distinguished name; other attribute types are skipped.
pub fn parse_subject(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut parts: Vec<(String, String)> = Vec::new();
    if s.is_empty() {
        return Ok(parts);
    }
    let mut push = |k: &str, v: String| {
        let k = k.trim();
        let known = ["CN", "O", "OU", "C", "L", "ST"]
            .into_iter()
            .find(|n| n.eq_ignore_ascii_case(k));
        if let Some(n) = known {
            parts.push((n.to_string(), v));
        }
    };
    if let Some(rest) = s.strip_prefix('/') {
        for rdn in rest.split('/') {
            let (k, v) = rdn
                .split_once('=')
                .ok_or_else(|| format!("subject part {rdn:?} is not TYPE=value"))?;
            push(k, v.to_string());
        }
        return Ok(parts);
    }
    // RFC 2253: `,` (or `+` in a multi-valued RDN) separates; `\` escapes one character or
    // gives a byte as two hex digits.
    let bytes = s.as_bytes();
    let mut i = 0;
    while i <= bytes.len() {
        let start = i;
        let mut key_end = None;
        let mut value = Vec::new();
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b'\\' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match (hex, bytes.get(i + 1)) {
                        (Some(h), _) => {
                            value.push(h);
                            i += 3;
                        }
                        (None, Some(&c)) => {
                            value.push(c);
                            i += 2;
                        }
                        (None, None) => return Err("subject ends in an escape".into()),
                    }
                    if key_end.is_none() {
                        return Err("escape in a subject attribute type".into());
                    }
                    continue;
                }
                b',' | b'+' => break,
                b'=' if key_end.is_none() => key_end = Some(i),
                _ if key_end.is_some() => value.push(b),
                _ => {}
            }
            i += 1;
        }
        let Some(k) = key_end else {
            return Err(format!(
                "subject part {:?} is not TYPE=value",
                &s[start..i.min(s.len())]
            ));
        };
        let value = String::from_utf8(value).map_err(|_| "subject is not UTF-8".to_string())?;
        push(&s[start..k], value);
        i += 1;
    }
    Ok(parts)
}

/// `auth = "trusted-header"`.
#[derive(Debug)]
pub struct TrustedHeaderAuthenticator {
    settings: TrustedHeaderSettings,
}

impl TrustedHeaderAuthenticator {
    pub fn new(settings: &TrustedHeaderSettings) -> TrustedHeaderAuthenticator {
        TrustedHeaderAuthenticator {
            settings: settings.clone(),
        }
    }

    fn trusted(&self, peer: &Peer) -> bool {
        peer.unix
            || self
                .settings
                .trusted_peers
                .iter()
                .any(|net| cidr_contains(*net, peer.addr.ip()))
    }

    pub fn authenticate(&self, headers: &HeaderMap, peer: &Peer) -> Result<Principal, AuthError> {
        let name = &self.settings.header;
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            return Err(AuthError::Missing("forwarded client certificate"));
        }
        if !self.trusted(peer) {
            return Err(AuthError::Invalid(format!(
                "{name} from an untrusted peer ({})",
                peer.addr.ip()
            )));
        }
        // Several header lines are one list, in order.
        let mut joined = String::new();
        for v in values {
            let v = v
                .to_str()
                .map_err(|_| AuthError::Invalid(format!("{name} is not visible ASCII")))?;
            if !joined.is_empty() {
                joined.push(',');
            }
            joined.push_str(v);
        }
        let elements =
            parse(&joined).map_err(|e| AuthError::Invalid(format!("malformed {name}: {e}")))?;
        let last = elements
            .last()
            .ok_or_else(|| AuthError::Invalid(format!("empty {name}")))?;
        let facts = last
            .facts()
            .map_err(|e| AuthError::Invalid(format!("malformed {name}: {e}")))?;
        facts
            .principal(
                RouteAuth::TrustedHeader,
                self.settings.identity,
                &self.settings.attributes,
            )
            .map_err(|e| match e {
                AuthError::Invalid(m) => {
                    AuthError::Invalid(m.replace("client certificate", name.as_str()))
                }
                other => other,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::auth::{CertIdentity, parse_cidr};

    fn pairs(e: &Element) -> Vec<(&str, &str)> {
        e.pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn envoy_examples() {
        let h = r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com"#;
        let els = parse(h).unwrap();
        assert_eq!(els.len(), 1);
        assert_eq!(
            pairs(&els[0]),
            vec![
                ("By", "http://frontend.lyft.com"),
                (
                    "Hash",
                    "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
                ),
                (
                    "Subject",
                    "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"
                ),
                ("URI", "http://testclient.lyft.com"),
            ]
        );
        let f = els[0].facts().unwrap();
        assert_eq!(f.field("subject.CN").as_deref(), Some("Test Client"));
        assert_eq!(f.field("subject.L").as_deref(), Some("San Francisco"));
        assert_eq!(f.field("subject.C").as_deref(), Some("US"));

        // Two hops; DNS repeated; RFC 2253 subject with an escaped comma and a quote.
        let h = r#"By=spiffe://a/gw;URI=spiffe://a/ns/x/sa/first, By=spiffe://a/sidecar;Subject="CN=Al \"Bo\" C\,D,O=Acme\, Inc.+OU=ops,1.2.3=#0403,ST=B\C3\A4den";URI=spiffe://a/ns/billing/sa/api;DNS=api.a;DNS=api2.a"#;
        let els = parse(h).unwrap();
        assert_eq!(els.len(), 2);
        assert_eq!(
            els[0].values("URI").next(),
            Some("spiffe://a/ns/x/sa/first")
        );
        let f = els[1].facts().unwrap();
        assert_eq!(
            f.subject,
            vec![
                ("CN".to_string(), "Al \"Bo\" C,D".to_string()),
                ("O".to_string(), "Acme, Inc.".to_string()),
                ("OU".to_string(), "ops".to_string()),
                ("ST".to_string(), "Bäden".to_string()),
            ]
        );
        assert_eq!(f.dns, vec!["api.a", "api2.a"]);
        assert_eq!(
            f.field("spiffe.path").as_deref(),
            Some("/ns/billing/sa/api")
        );
    }

    #[test]
    fn rfc2253_escapes_and_hex() {
        let s = parse_subject(r"CN=B\C3\A4r\+x,ST=Z\\").unwrap();
        assert_eq!(
            s,
            vec![
                ("CN".to_string(), "Bär+x".to_string()),
                ("ST".to_string(), "Z\\".to_string())
            ]
        );
        assert!(parse_subject("").unwrap().is_empty());
        assert!(parse_subject("CN").is_err());
        assert!(parse_subject("CN=a,").is_err());
        assert!(parse_subject(r"CN=a\").is_err());
        assert!(parse_subject(r"CN=\FF\FE").is_err()); // not UTF-8
        assert!(parse_subject("/CN=a/bad").is_err());
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [
            "",
            "URI",
            "URI=a;",
            "URI=a,",
            ";URI=a",
            "=a",
            "URI=\"unterminated",
            "URI=\"a\"b",
            "URI=\"a\\",
            "URI=\"a\\\"",
            "URI=a\"b",
            "U RI=a",
            "URI=a,,URI=b",
            "Subject=\"CN\"",
        ] {
            let r = parse(bad).and_then(|els| {
                els.iter().try_for_each(|e| e.facts().map(|_| ()))?;
                Ok(els)
            });
            assert!(r.is_err(), "{bad:?} was accepted: {r:?}");
        }
        assert!(parse(&"URI=a;".repeat(3000)).is_err());
        // Whitespace around pairs and quoted values is allowed.
        let els = parse(r#" URI=a ; DNS="b" , URI=c"#).unwrap();
        assert_eq!(pairs(&els[0]), vec![("URI", "a"), ("DNS", "b")]);
        assert_eq!(pairs(&els[1]), vec![("URI", "c")]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            if let Ok(els) = parse(&s) {
                for e in &els {
                    let _ = e.facts();
                }
            }
            let _ = parse_subject(&s);
        }

        #[test]
        fn never_panics_on_delimiters(s in "[=;,\"\\\\/+a-c ]{0,60}") {
            if let Ok(els) = parse(&s) {
                for e in &els {
                    let _ = e.facts();
                }
            }
            let _ = parse_subject(&s);
        }
    }

    fn auth(identity: CertIdentity) -> TrustedHeaderAuthenticator {
        TrustedHeaderAuthenticator::new(&TrustedHeaderSettings {
            header: http::HeaderName::from_static("x-forwarded-client-cert"),
            trusted_peers: vec![parse_cidr("10.0.0.0/8").unwrap()],
            identity,
            attributes: [("team", "subject.OU"), ("td", "spiffe.trust_domain")]
                .into_iter()
                .map(|(a, f)| (a.to_string(), f.to_string()))
                .collect(),
        })
    }

    fn peer(addr: &str, unix: bool) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            certs: None,
            unix,
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-client-cert", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn trust_and_last_element() {
        let a = auth(CertIdentity::UriSan);
        let h = headers(&[
            "URI=spiffe://evil/first",
            r#"Subject="CN=api,OU=billing";URI=spiffe://acme/ns/billing/sa/api"#,
        ]);
        let p = a.authenticate(&h, &peer("10.1.2.3:9", false)).unwrap();
        assert_eq!(p.name, "spiffe://acme/ns/billing/sa/api");
        assert_eq!(p.method, RouteAuth::TrustedHeader);
        assert_eq!(p.attributes["team"], "billing");
        assert_eq!(p.attributes["td"], "acme");
        // IPv4-mapped IPv6 peers count as their IPv4 address.
        assert!(
            a.authenticate(&h, &peer("[::ffff:10.0.0.1]:9", false))
                .is_ok()
        );
        // The unix socket is trusted.
        assert!(a.authenticate(&h, &peer("192.0.2.1:9", true)).is_ok());
        // From anyone else the header is refused, not ignored.
        assert!(matches!(
            a.authenticate(&h, &peer("192.0.2.1:9", false)),
            Err(AuthError::Invalid(m)) if m.contains("untrusted peer")
        ));
        assert_eq!(
            a.authenticate(&HeaderMap::new(), &peer("10.0.0.1:9", false)),
            Err(AuthError::Missing("forwarded client certificate"))
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new(), &peer("192.0.2.1:9", false)),
            Err(AuthError::Missing("forwarded client certificate"))
        );
        // Subject CN identity; no CN → refused.
        let cn = auth(CertIdentity::SubjectCn);
        assert_eq!(
            cn.authenticate(&h, &peer("10.0.0.1:9", false))
                .unwrap()
                .name,
            "api"
        );
        let no_cn = headers(&["URI=spiffe://acme/x"]);
        assert!(matches!(
            cn.authenticate(&no_cn, &peer("10.0.0.1:9", false)),
            Err(AuthError::Invalid(m)) if m.contains("no subject CN")
        ));
        // Malformed from a trusted peer: refused with the reason.
        let bad = headers(&["URI=\"spiffe://acme/x"]);
        assert!(matches!(
            a.authenticate(&bad, &peer("10.0.0.1:9", false)),
            Err(AuthError::Invalid(m)) if m.contains("malformed")
        ));
    }
}
