//! Stage 2: who is calling. The route's authenticator turns the request's credential into a
//! [`Principal`] (401 without one), then the route's `require` rules compare request values
//! (path captures, headers, the S3 bucket) with the principal's (403 when they differ).
//! S3 routes get their principal from the SigV4 access key the S3 service verified
//! ([`sigv4_principal`]) and pass the same `require` check.

use std::sync::Arc;

use http::HeaderMap;

use super::{AppState, ClientInfo};
use crate::auth::Principal;
use crate::config::template::Lookup;
use crate::config::{Route, RouteAuth, S3ClientConfig};
use crate::error::ProxyError;

/// The principal of a JSON or pass-through request.
pub async fn identify(
    state: &AppState,
    route: &Route,
    headers: &HeaderMap,
    client: &ClientInfo,
) -> Result<Arc<Principal>, ProxyError> {
    match state
        .authenticators
        .authenticate(route.auth, headers, &client.peer())
        .await
    {
        Ok(p) => Ok(Arc::new(p)),
        Err(e) => {
            state
                .metrics
                .denial(&route.name, "-", &format!("unauthenticated-{}", e.kind()));
            Err(ProxyError::Unauthenticated(e, route.auth))
        }
    }
}

/// The credentials a request presented to the proxy never reach storage: the bearer token of a
/// JWT route, the trusted proxy's client-certificate header.
pub fn strip_credentials(state: &AppState, route: &Route, headers: &mut HeaderMap) {
    match route.auth {
        RouteAuth::Jwt => {
            headers.remove(http::header::AUTHORIZATION);
        }
        RouteAuth::TrustedHeader => {
            if let Some(t) = &state.config.access.auth.trusted_header {
                headers.remove(&t.header);
            }
        }
        _ => {}
    }
}

/// The principal of an S3 client the S3 service authenticated by its access key.
pub fn sigv4_principal(client: &S3ClientConfig) -> Principal {
    let mut p = Principal::new(client.identity.clone(), RouteAuth::SigV4);
    p.attributes = client.attributes.clone();
    p
}

/// The route's `require` rules: each request value must be present and equal the principal's
/// value (`/tenants/{tenant}` only for the principal whose tenant it is).
pub fn check_requirements(
    state: &AppState,
    route: &Route,
    principal: &Principal,
    request: &dyn Lookup,
) -> Result<(), ProxyError> {
    struct Of<'a>(&'a Principal);
    impl Lookup for Of<'_> {
        fn lookup(&self, s: &crate::config::Source) -> Option<String> {
            self.0.value(s)
        }
    }
    for r in &route.require {
        let have = request.lookup(&r.subject);
        let want = r.equals.render(&Of(principal)).ok();
        let holds = match (&have, &want) {
            (Some(h), Some(w)) => {
                bool::from(subtle::ConstantTimeEq::ct_eq(h.as_bytes(), w.as_bytes()))
            }
            _ => false,
        };
        if !holds {
            state.metrics.denial(&route.name, "-", "require");
            return Err(ProxyError::Forbidden(format!(
                "{} may not use this route with this {}",
                principal.name, r.subject
            )));
        }
    }
    Ok(())
}
