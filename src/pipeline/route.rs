//! Stage 1: route match. The request path is checked first: anything an upstream could
//! normalize into a different path (dot segments, encoded slashes, empty segments) is refused,
//! so a request cannot match a pass-through route here and land on an encrypted one upstream.

use std::collections::HashMap;

use crate::config::Route;
use crate::config::pattern::percent_decode;
use crate::error::ProxyError;

pub fn check_path(path: &str) -> Result<(), ProxyError> {
    if !path.starts_with('/') {
        return Err(ProxyError::BadPath("the path must start with '/'"));
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err(ProxyError::BadPath(
            "encoded slashes and backslashes are not allowed",
        ));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() && i + 1 != segments.len() {
            return Err(ProxyError::BadPath("empty path segments are not allowed"));
        }
        let decoded = percent_decode(seg).ok_or(ProxyError::BadPath("bad percent-encoding"))?;
        if decoded == "." || decoded == ".." {
            return Err(ProxyError::BadPath("dot segments are not allowed"));
        }
    }
    Ok(())
}

/// The first route (in config order) whose pattern matches, with its captures.
///
/// Patterns match literally, so a path cannot match the wrong route here; the path checks
/// then apply to every route whose upstream might normalize the path (JSON stores, pass-through
/// routes). S3 keys are opaque to S3 servers: `a//b` and `a/../b` are keys like any other.
pub fn select<'a>(
    routes: &'a [Route],
    path: &str,
) -> Result<(&'a Route, HashMap<String, String>), ProxyError> {
    if !path.starts_with('/') {
        return Err(ProxyError::BadPath("the path must start with '/'"));
    }
    let (route, captures) = routes
        .iter()
        .find_map(|r| r.pattern.matches(path).map(|c| (r, c)))
        .ok_or_else(|| check_path(path).err().unwrap_or(ProxyError::NoRoute))?;
    if !matches!(route.kind, crate::config::RouteKind::S3(_)) {
        check_path(path)?;
    }
    Ok((route, captures))
}

/// Whether `path` is served by the route named `name` (the route that [`select`] picks for it).
pub fn serves(routes: &[Route], name: &str, path: &str) -> bool {
    select(routes, path).is_ok_and(|(route, _)| route.name == name)
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
}
