//! Who may use which key: key policies (`[[key_policy]]`) and grants, judged per request
//! before any key is used.
//!
//! The rules, as AWS KMS has them:
//! - a key without a policy is usable by every principal that passed its route's
//!   authentication (the behaviour before policies existed); a key with one denies by default;
//! - a matching `deny` statement wins over every `allow` and every grant;
//! - otherwise a matching `allow` statement, or a grant (`grants`), allows.
//!
//! A statement matches when the principal's name matches one of its `principals` (globs),
//! the action is one of its `actions`, and every condition holds. Decisions are cached per
//! (principal, key, action, context, grants generation). A refusal names the missing
//! permission, never the policy text.

pub mod grants;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Principal, glob_match};
use crate::config::Action;
use crate::config::auth::{Condition, ConditionOp, Effect, KeyPolicy, Subject};
use crate::config::template::{Lookup, Source};
use crate::envelope::Context;
use crate::keys::KeyRef;
pub use grants::Grants;

/// Why a request was allowed (named in the audit line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// The key has no policy.
    NoPolicy,
    /// An `allow` statement, by its sid.
    Statement(Arc<str>),
    /// A grant, by its id.
    Grant(Arc<str>),
}

impl std::fmt::Display for Basis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Basis::NoPolicy => f.write_str("no-policy"),
            Basis::Statement(s) => write!(f, "statement:{s}"),
            Basis::Grant(g) => write!(f, "grant:{g}"),
        }
    }
}

/// A refusal: what was missing, and (for the audit log only) the statement that denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub principal: String,
    pub key: KeyRef,
    pub action: Action,
    /// The `deny` statement that matched; `None` when nothing allowed.
    pub statement: Option<Arc<str>>,
}

impl Denial {
    /// A short, stable reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        if self.statement.is_some() {
            "explicit-deny"
        } else {
            "no-allow"
        }
    }
}

impl std::fmt::Display for Denial {
    /// What the client is told: the permission it lacks.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} may not {} with key {} under this request's encryption context",
            self.principal, self.action, self.key
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Basis),
    Deny(Denial),
}

/// What a cached decision was made for; kept beside it and compared on every hit, so a hash
/// collision can never hand one request another's decision.
struct CacheKey {
    principal: Arc<Principal>,
    key: KeyRef,
    action: Action,
    context: Context,
    generation: u64,
}

impl CacheKey {
    fn is(
        &self,
        principal: &Arc<Principal>,
        key: &KeyRef,
        action: Action,
        context: &Context,
        generation: u64,
    ) -> bool {
        self.action == action
            && self.generation == generation
            && (Arc::ptr_eq(&self.principal, principal) || *self.principal == **principal)
            && self.key == *key
            && self.context == *context
    }
}

/// The key policies and grants of a running proxy.
pub struct Policies {
    by_key: HashMap<KeyRef, KeyPolicy>,
    grants: Arc<Grants>,
    /// Decisions by a keyed hash of what they were made for (no allocation on a hit).
    cache: moka::sync::Cache<u64, Arc<(CacheKey, Decision)>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("keys", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl Policies {
    pub fn new(policies: &[KeyPolicy], grants: Arc<Grants>) -> Policies {
        Policies {
            by_key: policies
                .iter()
                .map(|p| (p.key.clone(), p.clone()))
                .collect(),
            grants,
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    /// Whether `key` has a policy (default deny) or is open to every authenticated principal.
    pub fn has_policy(&self, key: &KeyRef) -> bool {
        self.by_key.contains_key(key)
    }

    /// The decision for one use of one key. `grant_tokens` are tokens the client presented
    /// (`x-envelope-grant-token`): a grant they carry counts even before this replica has
    /// read it from the grants file.
    pub fn decide(
        &self,
        principal: &Arc<Principal>,
        key: &KeyRef,
        action: Action,
        context: &Context,
        grant_tokens: &[&str],
    ) -> Decision {
        if !self.by_key.contains_key(key) {
            return Decision::Allow(Basis::NoPolicy);
        }
        if !grant_tokens.is_empty() {
            return self.evaluate(principal, key, action, context, grant_tokens);
        }
        let generation = self.grants.generation();
        let slot = {
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = self.hasher.build_hasher();
            principal.hash(&mut h);
            key.hash(&mut h);
            action.hash(&mut h);
            context.hash(&mut h);
            generation.hash(&mut h);
            h.finish()
        };
        if let Some(hit) = self.cache.get(&slot)
            && hit.0.is(principal, key, action, context, generation)
        {
            return hit.1.clone();
        }
        let d = self.evaluate(principal, key, action, context, &[]);
        let ck = CacheKey {
            principal: principal.clone(),
            key: key.clone(),
            action,
            context: context.clone(),
            generation,
        };
        self.cache.insert(slot, Arc::new((ck, d.clone())));
        d
    }

    /// [`decide`](Self::decide) without the cache.
    pub fn evaluate(
        &self,
        principal: &Principal,
        key: &KeyRef,
        action: Action,
        context: &Context,
        grant_tokens: &[&str],
    ) -> Decision {
        let Some(policy) = self.by_key.get(key) else {
            return Decision::Allow(Basis::NoPolicy);
        };
        let mut allowed_by = None;
        for s in &policy.statements {
            if !s.actions.contains(&action)
                || !s.principals.iter().any(|p| principal_matches(p, principal))
                || !s.conditions.iter().all(|c| holds(c, principal, context))
            {
                continue;
            }
            match s.effect {
                Effect::Deny => {
                    return Decision::Deny(Denial {
                        principal: principal.name.clone(),
                        key: key.clone(),
                        action,
                        statement: Some(s.sid.as_str().into()),
                    });
                }
                Effect::Allow => {
                    allowed_by.get_or_insert_with(|| Arc::<str>::from(s.sid.as_str()));
                }
            }
        }
        if let Some(sid) = allowed_by {
            return Decision::Allow(Basis::Statement(sid));
        }
        if let Some(id) = self
            .grants
            .find(principal, key, action, context, grant_tokens)
        {
            return Decision::Allow(Basis::Grant(id));
        }
        Decision::Deny(Denial {
            principal: principal.name.clone(),
            key: key.clone(),
            action,
            statement: None,
        })
    }

    /// Every key of a route must allow the action (a route seals under all of its keys, and
    /// may open with any): the bases, or the first refusal.
    pub fn decide_all(
        &self,
        principal: &Arc<Principal>,
        keys: &[KeyRef],
        action: Action,
        context: &Context,
        grant_tokens: &[&str],
    ) -> Result<Vec<Basis>, Denial> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match self.decide(principal, k, action, context, grant_tokens) {
                Decision::Allow(b) => out.push(b),
                Decision::Deny(d) => return Err(d),
            }
        }
        Ok(out)
    }
}

/// A statement's principal pattern: a glob on the name, or `METHOD:glob` (`mtls:spiffe://…`,
/// `jwt:alice`, `sigv4:app`, `trusted-header:…`, `none:anonymous`) to also require how the
/// principal authenticated: where routes mix authenticators, a JWT whose `sub` is spelled like
/// a SPIFFE id must not pass for the workload holding that certificate.
fn principal_matches(pattern: &str, principal: &Principal) -> bool {
    use crate::config::RouteAuth;
    for method in [
        RouteAuth::Mtls,
        RouteAuth::Jwt,
        RouteAuth::TrustedHeader,
        RouteAuth::SigV4,
        RouteAuth::None,
    ] {
        if let Some(rest) = pattern
            .strip_prefix(method.name())
            .and_then(|r| r.strip_prefix(':'))
        {
            return principal.method == method && glob_match(rest, &principal.name);
        }
    }
    glob_match(pattern, &principal.name)
}

struct PrincipalLookup<'a>(&'a Principal);

impl Lookup for PrincipalLookup<'_> {
    fn lookup(&self, source: &Source) -> Option<String> {
        self.0.value(source)
    }
}

fn holds(c: &Condition, principal: &Principal, context: &Context) -> bool {
    let value: Option<std::borrow::Cow<str>> = match &c.subject {
        Subject::Context(n) => context.get(n).map(Into::into),
        Subject::Principal(n) => principal.attributes.get(n).map(|v| v.as_str().into()),
        Subject::Claim(n) => principal.claims.get(n).map(|v| v.as_str().into()),
        Subject::Identity => Some(principal.name.as_str().into()),
    };
    let lookup = PrincipalLookup(principal);
    match (&c.op, value) {
        (ConditionOp::Present(want), v) => v.is_some() == *want,
        (_, None) => false,
        (ConditionOp::Equals(t), Some(v)) => t.render(&lookup).is_ok_and(|w| w == v),
        (ConditionOp::Like(g), Some(v)) => glob_match(g, &v),
        (ConditionOp::AnyOf(ts), Some(v)) => {
            ts.iter().any(|t| t.render(&lookup).is_ok_and(|w| w == v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteAuth;

    fn policies(toml: &str) -> Policies {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[keyring]\npath = \"k.json\"\nmaster_key_file = \"m.key\"\n\
             [[route]]\nname = \"p\"\npath = \"/p\"\nupstream = \"http://127.0.0.1:1\"\npassthrough = true\n{toml}"
        );
        let cfg = crate::config::parse(&text).unwrap();
        Policies::new(&cfg.access.key_policies, Arc::new(Grants::disabled()))
    }

    fn alice(tenant: &str) -> Arc<Principal> {
        let mut p = Principal::new("alice", RouteAuth::Jwt);
        p.claims.insert("tenant".into(), tenant.into());
        Arc::new(p)
    }

    fn ctx(tenant: &str) -> Context {
        let mut c = Context::new();
        c.insert("tenant", tenant);
        c
    }

    const POLICY: &str = r#"
[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "own-tenant"
effect = "allow"
principals = ["*"]
actions = ["seal", "open"]
conditions = { "context.tenant" = "{claim.tenant}" }
[[key_policy.statement]]
sid = "no-mallory"
effect = "deny"
principals = ["mallory"]
actions = ["*"]
"#;

    #[test]
    fn conditions_deny_by_default_and_deny_wins() {
        let p = policies(POLICY);
        let users = KeyRef::parse("users").unwrap();
        assert_eq!(
            p.decide(&alice("acme"), &users, Action::Open, &ctx("acme"), &[]),
            Decision::Allow(Basis::Statement("own-tenant".into()))
        );
        // Cached decisions are the same.
        assert!(matches!(
            p.decide(&alice("acme"), &users, Action::Open, &ctx("acme"), &[]),
            Decision::Allow(_)
        ));
        let Decision::Deny(d) = p.decide(&alice("acme"), &users, Action::Open, &ctx("globex"), &[])
        else {
            panic!("another tenant's context must be refused")
        };
        assert_eq!(d.reason(), "no-allow");
        assert!(
            !d.to_string().contains("own-tenant"),
            "never the policy text"
        );
        // No action listed: refused.
        assert!(matches!(
            p.decide(&alice("acme"), &users, Action::Rotate, &ctx("acme"), &[]),
            Decision::Deny(_)
        ));
        let mut m = Principal::new("mallory", RouteAuth::Jwt);
        m.claims.insert("tenant".into(), "acme".into());
        let Decision::Deny(d) = p.decide(&Arc::new(m), &users, Action::Open, &ctx("acme"), &[])
        else {
            panic!("deny must win over allow")
        };
        assert_eq!(d.statement.as_deref(), Some("no-mallory"));
        // A principal without the claim: the template cannot render, nothing matches.
        let nobody = Arc::new(Principal::new("bob", RouteAuth::Jwt));
        assert!(matches!(
            p.decide(&nobody, &users, Action::Open, &ctx("acme"), &[]),
            Decision::Deny(_)
        ));
        // A key without a policy is open to authenticated principals.
        assert_eq!(
            p.decide(
                &nobody,
                &KeyRef::parse("other").unwrap(),
                Action::Open,
                &ctx("x"),
                &[]
            ),
            Decision::Allow(Basis::NoPolicy)
        );
    }

    #[test]
    fn like_present_any_of() {
        let p = policies(
            r#"
[[key_policy]]
key = "k"
[[key_policy.statement]]
effect = "allow"
principals = ["spiffe://acme/ns/*/sa/api"]
actions = ["open"]
conditions = { "context.tenant" = { like = "acme-*" }, "context.region" = { present = false }, "principal.team" = { any_of = ["billing", "{claim.team}"] } }
"#,
        );
        let k = KeyRef::parse("k").unwrap();
        let mut pr = Principal::new("spiffe://acme/ns/prod/sa/api", RouteAuth::Mtls);
        pr.attributes.insert("team".into(), "billing".into());
        let pr = Arc::new(pr);
        assert!(matches!(
            p.decide(&pr, &k, Action::Open, &ctx("acme-eu"), &[]),
            Decision::Allow(_)
        ));
        assert!(matches!(
            p.decide(&pr, &k, Action::Open, &ctx("globex"), &[]),
            Decision::Deny(_)
        ));
        let mut with_region = ctx("acme-eu");
        with_region.insert("region", "eu");
        assert!(matches!(
            p.decide(&pr, &k, Action::Open, &with_region, &[]),
            Decision::Deny(_)
        ));
        // A method-qualified pattern: the same name from a JWT does not match.
        let q = policies(
            r#"
[[key_policy]]
key = "k"
[[key_policy.statement]]
effect = "allow"
principals = ["mtls:spiffe://acme/*"]
actions = ["open"]
"#,
        );
        let cert = Arc::new(Principal::new("spiffe://acme/ns/a", RouteAuth::Mtls));
        let token = Arc::new(Principal::new("spiffe://acme/ns/a", RouteAuth::Jwt));
        assert!(matches!(
            q.decide(&cert, &k, Action::Open, &ctx("x"), &[]),
            Decision::Allow(_)
        ));
        assert!(matches!(
            q.decide(&token, &k, Action::Open, &ctx("x"), &[]),
            Decision::Deny(_)
        ));
        let other = Arc::new(Principal::new(
            "spiffe://acme/ns/prod/sa/web",
            RouteAuth::Mtls,
        ));
        assert!(matches!(
            p.decide(&other, &k, Action::Open, &ctx("acme-eu"), &[]),
            Decision::Deny(_)
        ));
    }
}
