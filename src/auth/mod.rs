//! Client authentication: who is calling. Each authenticator turns what a request carries
//! (a client certificate, a bearer token, a trusted proxy's header, an S3 signature) into a
//! [`Principal`]; `crate::pipeline::identity` picks the route's authenticator.
//!
//! Attacker model: every credential is attacker-supplied until verified; a failure says why
//! in the audit log and metrics, and to the client only as much as a standard client needs
//! (401 with `WWW-Authenticate`, never the token or certificate).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use rustls_pki_types::CertificateDer;

use crate::config::RouteAuth;
use crate::config::auth::AuthSettings;
use crate::config::template::Source;

pub mod cert;
pub mod jwt;
pub mod xfcc;

/// What the connection tells about the caller.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate chain, verified against `client_ca_file` by the TLS handshake
    /// (end entity first); `None` without TLS or when none was presented.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection came over the unix socket (a trusted local caller).
    pub unix: bool,
}

/// The configured authenticators, built once at start.
pub struct Authenticators {
    jwt: Option<jwt::JwtAuthenticator>,
    mtls: Option<cert::MtlsAuthenticator>,
    trusted_header: Option<xfcc::TrustedHeaderAuthenticator>,
}

/// The realm of our `WWW-Authenticate` challenges.
pub const REALM: &str = "envelope-proxy";

impl Authenticators {
    /// Build the configured authenticators. A JWKS file that does not load or a JWKS CA file
    /// that does not load stops the start; a JWKS URL is first fetched on use.
    pub async fn build(settings: &AuthSettings) -> Result<Authenticators, String> {
        let jwt = match &settings.jwt {
            Some(j) => Some(jwt::JwtAuthenticator::new(j).await?),
            None => None,
        };
        Ok(Authenticators {
            jwt,
            mtls: settings.mtls.as_ref().map(cert::MtlsAuthenticator::new),
            trusted_header: settings
                .trusted_header
                .as_ref()
                .map(xfcc::TrustedHeaderAuthenticator::new),
        })
    }

    /// The principal of a request on a route authenticating with `method`. Never called for
    /// S3 routes (SigV4 is verified by the S3 service).
    pub async fn authenticate(
        &self,
        method: RouteAuth,
        headers: &HeaderMap,
        peer: &Peer,
    ) -> Result<Principal, AuthError> {
        // `[auth.mtls]` may be left out: its defaults (URI SAN identity, no attributes) apply.
        static MTLS_DEFAULT: std::sync::LazyLock<cert::MtlsAuthenticator> =
            std::sync::LazyLock::new(|| {
                cert::MtlsAuthenticator::new(&crate::config::auth::MtlsSettings {
                    identity: crate::config::auth::CertIdentity::UriSan,
                    attributes: BTreeMap::new(),
                })
            });
        match method {
            RouteAuth::None => Ok(Principal::anonymous()),
            RouteAuth::Mtls => self
                .mtls
                .as_ref()
                .unwrap_or(&MTLS_DEFAULT)
                .authenticate(peer),
            RouteAuth::Jwt => match &self.jwt {
                Some(j) => j.authenticate(headers).await,
                None => Err(AuthError::Unavailable(
                    "[auth.jwt] is not configured".into(),
                )),
            },
            RouteAuth::TrustedHeader => match &self.trusted_header {
                Some(t) => t.authenticate(headers, peer),
                None => Err(AuthError::Unavailable(
                    "[auth.trusted_header] is not configured".into(),
                )),
            },
            RouteAuth::SigV4 => Err(AuthError::Invalid(
                "SigV4 is verified by the S3 gateway, not here".into(),
            )),
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 on a route authenticating with `method`
    /// (RFC 6750: `error="invalid_token"` when a token was presented and refused).
    pub fn challenge(method: RouteAuth, error: &AuthError) -> Option<String> {
        match (method, error) {
            (RouteAuth::Jwt, AuthError::Invalid(_)) => {
                Some("Bearer realm=\"envelope-proxy\", error=\"invalid_token\"".into())
            }
            (RouteAuth::Jwt, _) => Some("Bearer realm=\"envelope-proxy\"".into()),
            _ => None,
        }
    }
}

/// The authenticated caller: a name plus attributes, as contexts, policies, masking, quotas
/// and the audit log see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// `anonymous` on `auth = "none"` routes; a SPIFFE id, subject CN, JWT `sub` or S3 client
    /// identity otherwise.
    pub name: String,
    /// How it was authenticated.
    pub method: RouteAuth,
    /// Attributes the authenticator configured (`principal.NAME`).
    pub attributes: BTreeMap<String, String>,
    /// Scalar JWT claims (`claim.NAME`); empty for other methods.
    pub claims: BTreeMap<String, String>,
}

impl Principal {
    pub const ANONYMOUS: &'static str = "anonymous";

    pub fn anonymous() -> Principal {
        Principal {
            name: Self::ANONYMOUS.into(),
            method: RouteAuth::None,
            attributes: BTreeMap::new(),
            claims: BTreeMap::new(),
        }
    }

    pub fn new(name: impl Into<String>, method: RouteAuth) -> Principal {
        Principal {
            name: name.into(),
            method,
            attributes: BTreeMap::new(),
            claims: BTreeMap::new(),
        }
    }

    /// A principal-side template source (`identity`, `claim.NAME`, `principal.NAME`).
    pub fn value(&self, source: &Source) -> Option<String> {
        match source {
            Source::Identity => Some(self.name.clone()),
            Source::Claim(n) => self.claims.get(n).cloned(),
            Source::Principal(n) => self.attributes.get(n).cloned(),
            _ => None,
        }
    }
}

/// Why a request was not authenticated (→ 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential of the route's kind was presented.
    #[error("no {0} credential presented")]
    Missing(&'static str),
    /// A credential was presented and refused: the reason is for the audit log.
    #[error("{0}")]
    Invalid(String),
    /// The credential could not be checked (JWKS unreachable): 503, not the client's fault.
    #[error("cannot verify credentials now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// A short, stable reason for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "missing",
            AuthError::Invalid(_) => "invalid",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// Match a name against a glob: `*` any run of characters, `?` one character; anything else
/// literally. Used by policy principals and `like` conditions.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match(
            "spiffe://acme/ns/*/sa/api",
            "spiffe://acme/ns/billing/sa/api"
        ));
        assert!(!glob_match(
            "spiffe://acme/ns/*/sa/api",
            "spiffe://acme/ns/billing/sa/web"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("acme-*", "acme-"));
        assert!(!glob_match("acme", "acme2"));
        assert!(glob_match("*b*b", "abxbb"));
    }
}
