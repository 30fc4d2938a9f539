//! Stage 5: the upstream. A pooled hyper client (HTTP/1.1, and HTTP/2 over TLS by ALPN) with
//! rustls (webpki roots plus an optional CA file), timeouts, and header hygiene both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;

use super::ProxyBody;
use crate::config::{ServerSettings, Upstream};
use crate::error::ProxyError;

/// Who called us, for `X-Forwarded-*` and client authentication.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The client certificate chain the TLS handshake verified against `client_ca_file`
    /// (end entity first); `None` without TLS, without a client CA, or when none was presented.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection came over the unix socket (`addr` is then a placeholder).
    pub unix: bool,
}

impl ClientInfo {
    /// What the connection tells the authenticators about the caller.
    pub fn peer(&self) -> crate::auth::Peer {
        crate::auth::Peer {
            addr: self.addr,
            certs: self.peer_certs.clone(),
            unix: self.unix,
        }
    }

    /// The caller as the audit log names it: its IP address, or `unix`.
    pub fn label(&self) -> String {
        if self.unix {
            "unix".into()
        } else {
            self.addr.ip().to_string()
        }
    }
}

pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    timeout: Duration,
}

impl UpstreamClient {
    pub fn new(settings: &ServerSettings) -> Result<Self, String> {
        let https = crate::pki::https_connector(settings)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(512)
            .build(https);
        Ok(UpstreamClient {
            client,
            timeout: settings.upstream_timeout,
        })
    }

    /// Send and wait for the response head (the timeout covers connect and the head).
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream request failed");
                Err(ProxyError::UpstreamUnavailable(e.to_string()))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// End-to-end headers the proxy decides by: a `Connection` header may not remove them (a
/// store answering `Connection: content-type` would otherwise turn a JSON response into an
/// untyped one that passes unopened).
const NEVER_HOP_BY_HOP: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
];

/// Remove hop-by-hop headers, including those the `Connection` header names (except the
/// [`NEVER_HOP_BY_HOP`] ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !NEVER_HOP_BY_HOP.contains(n))
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
}

/// Build the upstream request from the client's request head.
///
/// `transformed_len` is `Some(len)` when the body was rewritten: the length is recomputed and
/// `Accept-Encoding` removed (the proxy must read the response to decrypt it).
pub fn request(
    upstream: &Upstream,
    parts: &http::request::Parts,
    body: ProxyBody,
    client: ClientInfo,
    transformed_len: Option<usize>,
) -> Result<Request<ProxyBody>, ProxyError> {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = http::Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(format!("{}{}", upstream.base_path, path_and_query))
        .build()
        .map_err(|_| ProxyError::BadPath("cannot be forwarded"))?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let original_host = headers.remove(header::HOST).or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(h) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    // A unix-socket caller has no address to add (RFC 7239 would say "unknown").
    if !client.unix {
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", client.addr.ip()),
            None => client.addr.ip().to_string(),
        };
        // Taken as it is (no copy of the string into the header value).
        if let Ok(v) = HeaderValue::try_from(forwarded_for) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if client.tls { "https" } else { "http" }),
    );
    if let Some(len) = transformed_len {
        headers.remove(header::ACCEPT_ENCODING);
        headers.remove(header::CONTENT_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        if len > 0 || parts.headers.contains_key(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// What to do with an absolute URL that points somewhere other than the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignUrls {
    Keep,
    Drop,
}

/// Rewrite the URLs an upstream put in `Location`, `Content-Location` and `Link`, so that
/// responses never name the upstream's own address (an internal host) or a path of it that
/// the client could not use through this route (a store's un-tenanted path behind a rewrite).
///
/// A URL on the upstream (absolute with its origin, or a path starting with `/`) loses the
/// origin and the upstream's base path and becomes a path on the proxy, which the client
/// resolves against the proxy's own address; it is kept only if `same_route` says that path is
/// served by the route that answered, and dropped otherwise. Absolute URLs elsewhere are kept
/// or dropped per `foreign`. Relative references (`1`, `../x`) resolve the same way on the
/// proxy as upstream (paths are forwarded as they are) and are kept.
///
/// Attacker model: the values come from the upstream; anything that does not parse is dropped.
pub fn rewrite_locations(
    headers: &mut HeaderMap,
    upstream: &Upstream,
    foreign: ForeignUrls,
    same_route: impl Fn(&str) -> bool,
) {
    let rewrite = |url: &str| -> Option<String> {
        let url = url.trim();
        if url.is_empty() || url.bytes().any(|b| b.is_ascii_control()) {
            return None;
        }
        if url.starts_with("//") {
            // Scheme-relative: names a host.
            return rewrite_absolute(
                &format!("{}:{url}", upstream.scheme),
                upstream,
                foreign,
                &same_route,
            );
        }
        if url.starts_with('/') {
            return on_proxy(url, upstream, &same_route);
        }
        let is_absolute = url.split_once(':').is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                && !scheme.contains('/')
        });
        if is_absolute {
            rewrite_absolute(url, upstream, foreign, &same_route)
        } else {
            Some(url.to_string())
        }
    };
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name) else {
            continue;
        };
        let new = value
            .to_str()
            .ok()
            .and_then(rewrite)
            .and_then(|v| HeaderValue::from_str(&v).ok());
        match new {
            Some(v) => {
                headers.insert(name, v);
            }
            None => {
                headers.remove(name);
            }
        }
    }
    let links: Vec<HeaderValue> = headers.get_all(header::LINK).iter().cloned().collect();
    if links.is_empty() {
        return;
    }
    headers.remove(header::LINK);
    for value in links {
        let Ok(text) = value.to_str() else { continue };
        let kept: Vec<String> = split_links(text)
            .into_iter()
            .filter_map(|(url, params)| rewrite(url).map(|u| format!("<{u}>{params}")))
            .collect();
        if kept.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.append(header::LINK, v);
        }
    }
}

fn rewrite_absolute(
    url: &str,
    upstream: &Upstream,
    foreign: ForeignUrls,
    same_route: &impl Fn(&str) -> bool,
) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let same_origin = uri.scheme() == Some(&upstream.scheme)
        && uri
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(upstream.authority.as_str()));
    if same_origin {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        on_proxy(path, upstream, same_route)
    } else {
        (foreign == ForeignUrls::Keep).then(|| url.to_string())
    }
}

/// An upstream path (with its query) as the proxy's path, if this route serves it.
fn on_proxy(path: &str, upstream: &Upstream, same_route: &impl Fn(&str) -> bool) -> Option<String> {
    let rest = if upstream.base_path.is_empty() {
        path
    } else {
        let rest = path.strip_prefix(upstream.base_path.as_str())?;
        if !(rest.starts_with('/') || rest.starts_with('?') || rest.is_empty()) {
            return None;
        }
        rest
    };
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_string()
    };
    let only_path = rest.split(['?', '#']).next().unwrap_or("/");
    same_route(only_path).then_some(rest)
}

/// The link-values of a `Link` header (RFC 8288): `<url>` and the parameters after it. A
/// value that does not parse ends the list (what follows is dropped).
fn split_links(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix('<') {
        let Some(end) = after.find('>') else { break };
        let url = &after[..end];
        let tail = &after[end + 1..];
        // Parameters run to the next comma outside a quoted string.
        let mut in_quotes = false;
        let mut split = tail.len();
        for (i, c) in tail.char_indices() {
            match c {
                '"' => in_quotes = !in_quotes,
                ',' if !in_quotes => {
                    split = i;
                    break;
                }
                _ => {}
            }
        }
        out.push((url, tail[..split].trim_end()));
        rest = tail.get(split + 1..).unwrap_or("").trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base: &str) -> Upstream {
        Upstream {
            scheme: http::uri::Scheme::HTTP,
            authority: "store.internal:3000".parse().unwrap(),
            base_path: base.to_string(),
        }
    }

    fn run(pairs: &[(HeaderName, &str)], base: &str, foreign: ForeignUrls) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(n.clone(), HeaderValue::from_str(v).unwrap());
        }
        rewrite_locations(&mut h, &upstream(base), foreign, |p| {
            p.starts_with("/tenants/")
        });
        h
    }

    #[test]
    fn upstream_urls_become_proxy_paths_or_go() {
        let h = run(
            &[(
                header::LOCATION,
                "http://store.internal:3000/tenants/acme/users/7",
            )],
            "",
            ForeignUrls::Drop,
        );
        assert_eq!(h[header::LOCATION], "/tenants/acme/users/7");
        // The store's un-tenanted path behind a rewrite: not this route's, dropped.
        let h = run(&[(header::LOCATION, "/users/7")], "", ForeignUrls::Drop);
        assert!(h.get(header::LOCATION).is_none());
        let h = run(
            &[(
                header::CONTENT_LOCATION,
                "HTTP://STORE.internal:3000/users/7",
            )],
            "",
            ForeignUrls::Keep,
        );
        assert!(h.get(header::CONTENT_LOCATION).is_none());
        // The base path goes; a path outside it is not the proxy's.
        let h = run(
            &[(header::LOCATION, "/api/tenants/a/users/1?x=1")],
            "/api",
            ForeignUrls::Drop,
        );
        assert_eq!(h[header::LOCATION], "/tenants/a/users/1?x=1");
        let h = run(
            &[(header::LOCATION, "/apix/tenants/a")],
            "/api",
            ForeignUrls::Drop,
        );
        assert!(h.get(header::LOCATION).is_none());
        // Another host: per the route.
        let h = run(
            &[(header::LOCATION, "https://idp.example/login")],
            "",
            ForeignUrls::Keep,
        );
        assert_eq!(h[header::LOCATION], "https://idp.example/login");
        let h = run(
            &[(header::LOCATION, "//other.internal/tenants/a")],
            "",
            ForeignUrls::Drop,
        );
        assert!(h.get(header::LOCATION).is_none());
        // Relative references resolve alike on both sides.
        let h = run(&[(header::LOCATION, "7")], "", ForeignUrls::Drop);
        assert_eq!(h[header::LOCATION], "7");
    }

    #[test]
    fn link_values_are_rewritten_one_by_one() {
        let h = run(
            &[(
                header::LINK,
                r#"<http://store.internal:3000/tenants/a/users?_page=2>; rel="next", <http://store.internal:3000/users?_page=1>; rel="first, really", <https://elsewhere/x>; rel="help""#,
            )],
            "",
            ForeignUrls::Drop,
        );
        assert_eq!(h[header::LINK], r#"</tenants/a/users?_page=2>; rel="next""#);
        let h = run(
            &[(
                header::LINK,
                "<http://store.internal:3000/users>; rel=\"last\"",
            )],
            "",
            ForeignUrls::Drop,
        );
        assert!(h.get(header::LINK).is_none());
    }

    /// A unix-socket caller has no address: X-Forwarded-For is not invented for it (an app's
    /// own value passes unchanged); a TCP caller's address is appended.
    #[test]
    fn forwarded_for_names_tcp_callers_only() {
        let forwarded = |unix: bool, given: Option<&str>| {
            let mut req = http::Request::builder().uri("/tenants/a/users/1");
            if let Some(v) = given {
                req = req.header("x-forwarded-for", v);
            }
            let (parts, ()) = req.body(()).unwrap().into_parts();
            let client = ClientInfo {
                addr: "192.0.2.7:4711".parse().unwrap(),
                tls: false,
                peer_certs: None,
                unix,
            };
            let body = crate::pipeline::full_body(bytes::Bytes::new());
            let req = request(&upstream(""), &parts, body, client, None).unwrap();
            req.headers()
                .get("x-forwarded-for")
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(forwarded(false, None).as_deref(), Some("192.0.2.7"));
        assert_eq!(
            forwarded(false, Some("10.1.1.1")).as_deref(),
            Some("10.1.1.1, 192.0.2.7")
        );
        assert_eq!(forwarded(true, None), None);
        assert_eq!(
            forwarded(true, Some("10.1.1.1")).as_deref(),
            Some("10.1.1.1")
        );
    }
}
