//! Stage 1: route match. The request path is checked first: anything an upstream could
//! normalize into a different path (dot segments, encoded slashes, empty segments) is refused,
//! so a request cannot match a pass-through route here and land on an encrypted one upstream.

use std::collections::HashMap;

use crate::config::pattern::{check_segment, fold, percent_decode, split_path};
use crate::config::{JsonRoute, Route, RouteKind};
use crate::error::ProxyError;

pub fn check_path(path: &str) -> Result<(), ProxyError> {
    let segments = split_path(path).ok_or(ProxyError::BadPath("the path must start with '/'"))?;
    check_split_path(path, &segments)
}

/// [`check_path`] of a path already split into its `segments`.
fn check_split_path(path: &str, segments: &[&str]) -> Result<(), ProxyError> {
    let encoded_slash = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
    });
    if encoded_slash || path.contains('\\') {
        return Err(ProxyError::BadPath(
            "encoded slashes and backslashes are not allowed",
        ));
    }
    check_segments(segments, true)
}

/// Every segment in its one accepted spelling ([`check_segment`]); an empty segment only last
/// (`/users/`) when `trailing_empty`.
fn check_segments(segments: &[&str], trailing_empty: bool) -> Result<(), ProxyError> {
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() && !(trailing_empty && i + 1 == segments.len()) {
            return Err(ProxyError::BadPath("empty path segments are not allowed"));
        }
        check_segment(seg).map_err(ProxyError::BadPath)?;
    }
    Ok(())
}

/// The first route (in config order) whose pattern matches, with its captures.
///
/// Literal segments match ASCII-case-insensitively (stores route `/USERS` to `/users`). The
/// path is then checked in full on every route whose upstream might normalize it (JSON
/// stores, pass-through routes): one spelling per path, so captures are the same strings the
/// upstream receives, decoded. On S3 routes only the segments before the pattern's `**` (the
/// part that chose the route: the bucket) are checked; the rest is the object key, opaque to
/// S3 servers (`a//b`, `a/../b`, `a;b` and `%75` are keys like any other).
///
/// Last, an earlier encrypting route the path matches only by a looser reading (a store's
/// percent-decoding or Unicode case folding, [`crate::config::PathPattern::matches_loosely`])
/// is a spelling meant to slip past it: refused, whatever route it did select.
pub fn select<'a>(
    routes: &'a [Route],
    path: &str,
) -> Result<(&'a Route, HashMap<String, String>), ProxyError> {
    let parts = split_path(path).ok_or(ProxyError::BadPath("the path must start with '/'"))?;
    let Some((route, captures, prefix)) = routes.iter().find_map(|r| {
        r.pattern
            .match_segments(&parts)
            .map(|(c, prefix)| (r, c, prefix))
    }) else {
        check_split_path(path, &parts)?;
        return Err(ProxyError::NoRoute);
    };
    if matches!(route.kind, RouteKind::S3(_)) {
        check_segments(&parts[..prefix], false)?;
    } else {
        check_split_path(path, &parts)?;
    }
    let shadowed = routes
        .iter()
        .take_while(|r| !std::ptr::eq(*r, route))
        .any(|r| !matches!(r.kind, RouteKind::Passthrough) && r.pattern.matches_loosely(&parts));
    if shadowed {
        return Err(ProxyError::BadPath(
            "the path differs from an encrypting route's only by case or encoding",
        ));
    }
    Ok((route, captures))
}

/// Whether `path` is served by the route named `name` (the route that [`select`] picks for it).
pub fn serves(routes: &[Route], name: &str, path: &str) -> bool {
    select(routes, path).is_ok_and(|(route, _)| route.name == name)
}

/// Query parameters that name an encrypted field are refused on JSON routes: a store that
/// filters by them (json-server's `?ssn=…`, `?card.number=…`, `?ssn_like=…`) or binds them
/// into its model would read the value in clear, and it reaches its access logs either way.
///
/// A parameter is checked by its percent-decoded name, compared with Unicode case folding to
/// the last member name of each encrypted field path (`$.card.number` → `number`): the whole
/// name, each part of it split at `[`, `]` and `.` (`user[ssn]`, `ssn[]`, `card.number`),
/// and each such part with a suffix after `_` (`ssn_like`, `ssn_ne`, `ssn_gte`, Django's
/// `ssn__icontains`). Names in the route's `allow_query_params` pass (compared the same way).
pub fn check_query(jr: &JsonRoute, query: Option<&str>) -> Result<(), ProxyError> {
    let Some(query) = query else {
        return Ok(());
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw = pair.split_once('=').map_or(pair, |(n, _)| n);
        // A name that does not decode cannot be shown not to name a field.
        let spaced = raw.replace('+', " ");
        let Some(name) = percent_decode(&spaced) else {
            return Err(ProxyError::BadQuery(
                "a query parameter name is not valid percent-encoded UTF-8",
            ));
        };
        let folded = fold(&name);
        if jr.allow_query_params.contains(&folded) {
            continue;
        }
        // The error names the configured field name, never anything else from the request.
        let named = |part: &str| {
            jr.query_names.iter().find(|n| {
                n.as_str() == "*"
                    || part == n.as_str()
                    || part
                        .strip_prefix(n.as_str())
                        .is_some_and(|rest| rest.starts_with('_'))
            })
        };
        if let Some(n) = std::iter::once(folded.as_str())
            .chain(folded.split(['[', ']', '.']))
            .find_map(named)
        {
            return Err(ProxyError::SensitiveQueryParameter(n.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_an_upstream_could_rewrite() {
        for bad in [
            "/a/../b",
            "/a/./b",
            "/a/%2e%2E/b",
            "/a%2fb",
            "/a//b",
            "a",
            "/a\\b",
            "/%zz",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in ["/", "/a/b", "/a/b/", "/a/%20b", "/a/.hidden"] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
auth = "none"
[keyring]
path = "k.json"
master_key_file = "m.key"
"#;

    fn config(routes: &str) -> crate::config::Config {
        crate::config::parse(&format!("{BASE}{routes}")).unwrap_or_else(|e| panic!("{e}"))
    }

    const ENCRYPT_THEN_PASS: &str = r#"
[[route]]
name = "users"
path = "/tenants/{tenant}/users/**"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.ssn", "$.card.number", "$.notes[*].text", "$.tags[0]"]
context = { tenant = "{path.tenant}" }
allow_query_params = ["page[number]"]

[[route]]
name = "rest"
path = "/**"
upstream = "http://127.0.0.1:3000"
passthrough = true
"#;

    fn selected(cfg: &crate::config::Config, path: &str) -> Result<String, &'static str> {
        select(&cfg.routes, path)
            .map(|(r, _)| r.name.clone())
            .map_err(|e| e.code())
    }

    #[test]
    fn spellings_of_an_encrypting_route_cannot_reach_the_pass_through_behind_it() {
        let cfg = config(ENCRYPT_THEN_PASS);
        assert_eq!(selected(&cfg, "/tenants/acme/users").unwrap(), "users");
        // ASCII case: the encrypting route, as the store reads it.
        assert_eq!(selected(&cfg, "/tenants/acme/USERS").unwrap(), "users");
        assert_eq!(selected(&cfg, "/Tenants/acme/Users/7").unwrap(), "users");
        // Encodings, matrix parameters, Unicode stand-ins: refused.
        for bad in [
            "/tenants/acme/%75sers",
            "/tenants/acme/users;x=1",
            "/tenants/acme;x=1/users",
            "/tenants/ac%6De/users",
            "/tenants/acme/u%C5%BFers",
            "/tenants/acme/%EF%BD%95sers",
            "/tenants/caf%c3%a9/users",
        ] {
            assert_eq!(selected(&cfg, bad), Err("bad_path"), "{bad}");
        }
        // What is not spelled like the encrypting route passes.
        assert_eq!(selected(&cfg, "/tenants/acme/orders").unwrap(), "rest");
        assert_eq!(
            selected(&cfg, "/tenants/acme/us%C3%A9rs-x").unwrap(),
            "rest"
        );
        // Captures are the segments as sent, decoded.
        let (_, c) = select(&cfg.routes, "/tenants/caf%C3%A9/users").unwrap();
        assert_eq!(c["tenant"], "café");
    }

    #[test]
    fn s3_keys_stay_opaque_but_the_bucket_part_is_checked() {
        let s3 = |path: &str| {
            format!(
                r#"
[[route]]
name = "objects"
kind = "s3"
path = "{path}"
upstream = "http://127.0.0.1:9000"
key = "objects"
[route.s3]
region = "us-east-1"
upstream_access_key_id_env = "AK"
upstream_secret_access_key_env = "SK"
[[route.s3.client]]
access_key_id = "app"
secret_access_key_env = "APP_SK"
identity = "app"
"#
            )
        };
        let cfg = config(&s3("/{bucket}/**"));
        for key in ["/b/a;b", "/b/%75", "/b/a//b", "/b/a/../b", "/b/%c3%a9"] {
            assert_eq!(selected(&cfg, key).unwrap(), "objects", "{key}");
        }
        for bad in ["/b;x/k", "/%62/k", "/b%c3%a9/k"] {
            assert_eq!(selected(&cfg, bad), Err("bad_path"), "{bad}");
        }
        let cfg = config(&s3("/**"));
        assert_eq!(selected(&cfg, "/b;x/%75").unwrap(), "objects");
    }

    fn json_route(cfg: &crate::config::Config) -> &JsonRoute {
        match &cfg.routes[0].kind {
            RouteKind::JsonFields(jr) => jr,
            _ => unreachable!(),
        }
    }

    #[test]
    fn query_parameters_naming_encrypted_fields_are_refused() {
        let cfg = config(ENCRYPT_THEN_PASS);
        let jr = json_route(&cfg);
        for bad in [
            "ssn=123-45-6789",
            "SSN=1",
            "%73sn=1",
            "s%73n=1",
            "%C5%BFsn=1",
            "ssn",
            "a=1&ssn=2",
            "user[ssn]=1",
            "ssn[]=1",
            "ssn_like=12",
            "ssn_ne=1",
            "ssn_gte=1",
            "ssn_lte=1",
            "ssn__icontains=1",
            "card.number=4111",
            "number=4111",
            "card[number]=4111",
            "notes.text=x",
            "tags=1",
            "%ff=1",
        ] {
            let e = check_query(jr, Some(bad)).unwrap_err();
            assert!(
                matches!(e.code(), "sensitive_query_parameter" | "bad_query"),
                "{bad}"
            );
            assert!(!e.to_string().contains("4111"), "{e}");
        }
        for good in [
            "",
            "name=Ada",
            "_page=2&_limit=10",
            "page[number]=2",
            "PAGE[NUMBER]=2",
            "ssnx=1",
            "q=ssn",
            "_sort=ssn",
            "card.brand=visa",
        ] {
            assert!(check_query(jr, Some(good)).is_ok(), "{good}");
        }
        assert!(check_query(jr, None).is_ok());
        let e = check_query(jr, Some("card.number=4111")).unwrap_err();
        assert_eq!(e.code(), "sensitive_query_parameter");
        assert!(e.to_string().contains("\"number\""), "{e}");
    }

    #[test]
    fn a_path_without_member_names_makes_every_parameter_sensitive() {
        let cfg = config(
            r#"
[[route]]
name = "all"
path = "/all/**"
upstream = "http://127.0.0.1:3000"
key = "all"
fields = ["$.*"]
allow_query_params = ["_page"]
"#,
        );
        let jr = json_route(&cfg);
        assert!(check_query(jr, Some("anything=1")).is_err());
        assert!(check_query(jr, Some("_page=1")).is_ok());
    }
}
