//! Stage 4: may this principal use the route's keys for this, under this context? Asked of
//! [`crate::policy::Policies`] before any key is used; a refusal is counted and answered with
//! 403 (naming the missing permission), and nothing is forwarded.

use std::sync::Arc;

use super::AppState;
use crate::auth::Principal;
use crate::config::{Action, Route};
use crate::envelope::Context;
use crate::error::ProxyError;
use crate::keys::KeyRef;
use crate::policy::{Basis, Denial};

/// Every key of the route must allow `action`.
pub fn authorize(
    state: &AppState,
    route: &Route,
    principal: &Arc<Principal>,
    keys: &[KeyRef],
    action: Action,
    context: &Context,
    grant_tokens: &[&str],
) -> Result<Vec<Basis>, ProxyError> {
    let bases = state
        .policies
        .decide_all(principal, keys, action, context, grant_tokens)
        .map_err(|d| refused(state, route, d))?;
    charge(state, route, principal, action)?;
    Ok(bases)
}

/// The route's request quota for this principal (seal or open).
pub fn charge(
    state: &AppState,
    route: &Route,
    principal: &Principal,
    action: Action,
) -> Result<(), ProxyError> {
    state
        .quotas
        .charge(&route.name, &principal.name, action)
        .inspect_err(|_| state.metrics.denial(&route.name, "-", "quota"))
}

fn refused(state: &AppState, route: &Route, d: Denial) -> ProxyError {
    state
        .metrics
        .denial(&route.name, &d.key.to_string(), d.reason());
    ProxyError::PolicyDenied(d)
}

/// How stored values are shown to the principal on the way back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadView {
    /// Plaintext (`open`).
    Plain(Vec<Basis>),
    /// Masked per the route's `mask` rules (`open-masked` without `open`).
    Masked(Vec<Basis>),
    /// Neither: encrypted values are answered as `null` and no key is used.
    Withheld(Denial),
}

/// `open` if allowed, else `open-masked`, else withheld (with the `open` refusal).
pub fn read_view(
    state: &AppState,
    principal: &Arc<Principal>,
    keys: &[KeyRef],
    context: &Context,
    grant_tokens: &[&str],
) -> ReadView {
    let p = &state.policies;
    match p.decide_all(principal, keys, Action::Open, context, grant_tokens) {
        Ok(b) => ReadView::Plain(b),
        Err(denied) => {
            match p.decide_all(principal, keys, Action::OpenMasked, context, grant_tokens) {
                Ok(b) => ReadView::Masked(b),
                Err(_) => ReadView::Withheld(denied),
            }
        }
    }
}

/// The grant tokens a request presents (`x-envelope-grant-token`), removed from its headers:
/// a token is a credential for the proxy and never reaches storage.
pub fn take_grant_tokens(headers: &mut http::HeaderMap) -> Vec<String> {
    let out = crate::policy::grants::tokens_from(headers)
        .into_iter()
        .map(str::to_string)
        .collect();
    headers.remove(crate::policy::grants::GRANT_TOKEN_HEADER);
    out
}

/// A read that would return nothing but withheld values is refused outright.
pub fn refuse_withheld(state: &AppState, route: &Route, denial: Denial) -> ProxyError {
    refused(state, route, denial)
}
