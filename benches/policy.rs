//! The authorization stage alone: one key policy decision per request, as a JSON or S3
//! request makes it (`Policies::decide_all` on the route's key), with a warm decision cache
//! (the steady state: the same principal, key, action and context again) and without it
//! (`evaluate`: every statement and condition checked). Goal: ≤ 2 µs per request warm.
//!
//! `cargo bench --bench policy`

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use envelope_proxy::auth::Principal;
use envelope_proxy::config::{Action, RouteAuth};
use envelope_proxy::envelope::Context;
use envelope_proxy::keys::KeyRef;
use envelope_proxy::policy::{Decision, Grants, Policies};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
[keyring]
path = "k.json"
master_key_file = "m.key"
[[route]]
name = "p"
path = "/p"
upstream = "http://127.0.0.1:1"
passthrough = true
[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "interns"
effect = "deny"
principals = ["intern-*"]
actions = ["open"]
[[key_policy.statement]]
sid = "own-tenant"
effect = "allow"
principals = ["spiffe://acme/ns/*/sa/*"]
actions = ["seal", "open"]
conditions = { "context.tenant" = "{claim.tenant}", "context.table" = { any_of = ["users", "accounts"] } }
"#;

fn bench(c: &mut Criterion) {
    let cfg = envelope_proxy::config::parse(CONFIG).unwrap();
    let policies = Policies::new(&cfg.access.key_policies, Arc::new(Grants::disabled()));
    let mut p = Principal::new("spiffe://acme/ns/billing/sa/api", RouteAuth::Jwt);
    p.claims.insert("tenant".into(), "acme".into());
    p.claims
        .insert("iss".into(), "https://issuer.example".into());
    p.attributes.insert("team".into(), "billing".into());
    let p = Arc::new(p);
    let keys = [KeyRef::parse("users").unwrap()];
    let mut ctx = Context::new();
    ctx.insert("tenant", "acme");
    ctx.insert("table", "users");
    assert!(matches!(
        policies.evaluate(&p, &keys[0], Action::Open, &ctx, &[]),
        Decision::Allow(_)
    ));
    c.bench_function("policy/decide_warm_cache", |b| {
        b.iter(|| {
            policies
                .decide_all(&p, &keys, Action::Open, &ctx, &[])
                .unwrap()
        })
    });
    c.bench_function("policy/evaluate_uncached", |b| {
        b.iter(|| policies.evaluate(&p, &keys[0], Action::Open, &ctx, &[]))
    });
    let unrestricted = [KeyRef::parse("other").unwrap()];
    c.bench_function("policy/key_without_policy", |b| {
        b.iter(|| {
            policies
                .decide_all(&p, &unrestricted, Action::Open, &ctx, &[])
                .unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
