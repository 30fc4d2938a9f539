//! Allocations per value on the JSON hot path, counted by a counting allocator (dhat in its
//! testing mode; this test binary's global allocator). The same route seals and opens a
//! document with four of its ten fields set (one value of each kind: string, number, object,
//! so reused buffers have grown to fit each kind), then one with all ten: the difference,
//! divided by six, is what each further value costs. Compact (v2) tokens reuse their buffers from value
//! to value: they must cost no allocation at all. Self-contained (v1) tokens are reported.
//!
//! `cargo test --test alloc_count -- --nocapture` prints the counts.

use std::sync::Arc;

use envelope_proxy::config::{self, JsonRoute, RouteKind};
use envelope_proxy::keys::keyring::Keyring;
use envelope_proxy::keys::{KeyRef, KeyService, RootKeyProvider, vault};
use envelope_proxy::metrics::Metrics;
use envelope_proxy::pipeline::route;
use envelope_proxy::transform::json_fields::{self, RequestMeta};
use http::HeaderMap;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const MAX_DEPTH: usize = 64;
const FIELDS: usize = 10;
/// Values in the smaller document.
const FEW: usize = 4;

fn config_text(dir: &std::path::Path) -> String {
    let d = dir.display();
    let fields = (0..FIELDS)
        .map(|i| format!("\"$.f{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let route = |name: &str, prefix: &str, extra: &str| {
        format!(
            r#"
[[route]]
name = "{name}"
path = "{prefix}/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = [{fields}]
context = {{ tenant = "{{path.tenant}}", table = "users" }}
message_context = {{ id = "{{path.id|json.id}}" }}
{extra}
"#
        )
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

[cache]
max_messages = 1000000000000
{}{}"#,
        route("v1", "", ""),
        route(
            "v2",
            "/v2",
            &format!(
                "token_format = \"v2\"\n[route.key_vault]\nkind = \"dir\"\ndir = \"{d}/vault\""
            )
        ),
    )
}

/// A document with ten members of every kind (string, number, object, in turn): the first `n`
/// are fields (`f0`, `f1`, ...), the others are not (`g7`, ...). Every `n` gives a document of
/// the same shape and size, so only the values to seal or open differ.
fn document(n: usize) -> Vec<u8> {
    let mut doc = serde_json::json!({ "id": "user-42", "name": "Ada", "plan": "pro" });
    for i in 0..FIELDS {
        let name = format!("{}{i}", if i < n { 'f' } else { 'g' });
        doc[name] = match i % 3 {
            0 => serde_json::json!(format!("value {i}")),
            1 => serde_json::json!(i * 1000),
            _ => serde_json::json!({ "nested": [i, "x"] }),
        };
    }
    serde_json::to_vec(&doc).unwrap()
}

fn blocks() -> u64 {
    dhat::HeapStats::get().total_blocks
}

#[test]
fn compact_tokens_allocate_nothing_per_value() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::parse(&config_text(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let ring = cfg.keyring.as_ref().unwrap();
    let keyring = Keyring::open(KeyRef::DEFAULT_BACKEND, &ring.path, &ring.master_key).unwrap();
    keyring.create_key("users").unwrap();
    let backends: Vec<Arc<dyn RootKeyProvider>> = vec![keyring];
    let keys = {
        let _guard = rt.enter();
        KeyService::new(backends, cfg.cache.clone(), Arc::new(Metrics::new()))
    };
    vault::register_all(&keys, &cfg).unwrap();
    let headers = HeaderMap::new();

    for (path, format) in [
        ("/tenants/acme/users/user-42", "v1"),
        ("/v2/tenants/acme/users/user-42", "v2"),
    ] {
        let (route, captures) = route::select(&cfg.routes, path).unwrap();
        let RouteKind::JsonFields(jr) = &route.kind else {
            panic!("an encrypting route");
        };
        let jr: &JsonRoute = jr;
        let meta = RequestMeta {
            captures: &captures,
            headers: &headers,
            given: None,
            principal: None,
        };
        let seal = |body: &[u8]| -> Vec<u8> {
            let doc = json_fields::scan_body(body, MAX_DEPTH).unwrap();
            let key_ctx = json_fields::key_context(jr, &meta).unwrap();
            let messages = json_fields::estimate_messages_scanned(jr, &doc);
            let key = match &jr.vault_label {
                Some(label) => rt.block_on(keys.sealing_record_key(
                    &keys.vault(label).unwrap(),
                    &jr.keys,
                    &key_ctx,
                    messages,
                    body.len() as u64,
                )),
                None => {
                    rt.block_on(keys.sealing_key(&jr.keys, &key_ctx, messages, body.len() as u64))
                }
            }
            .unwrap();
            json_fields::seal_scanned(jr, &meta, &key_ctx, &key, &doc, MAX_DEPTH)
                .unwrap()
                .0
        };
        let open = |body: &[u8]| -> Vec<u8> {
            let doc = json_fields::scan_body(body, MAX_DEPTH).unwrap();
            let key_ctx = json_fields::key_context(jr, &meta).unwrap();
            rt.block_on(json_fields::open_scanned(
                jr, &meta, &key_ctx, &keys, &doc, MAX_DEPTH,
            ))
            .unwrap()
            .0
        };
        // Each operation's allocations, after a warm-up run of the same input (caches filled,
        // the record written).
        let count = |f: &dyn Fn() -> Vec<u8>| {
            drop(f());
            let before = blocks();
            drop(f());
            blocks() - before
        };
        let (one, all) = (document(FEW), document(FIELDS));
        let (sealed_one, sealed_all) = (seal(&one), seal(&all));
        assert_eq!(open(&sealed_all), all, "{format} round trip");
        let seal_one = count(&|| seal(&one));
        let seal_all = count(&|| seal(&all));
        let open_one = count(&|| open(&sealed_one));
        let open_all = count(&|| open(&sealed_all));
        let per_value = |a: u64, b: u64| (b as f64 - a as f64) / (FIELDS - FEW) as f64;
        eprintln!(
            "{format}: seal {seal_one} allocations with {FEW} values, {seal_all} with {FIELDS} ({:.1} per value); open {open_one} with {FEW}, {open_all} with {FIELDS} ({:.1} per value)",
            per_value(seal_one, seal_all),
            per_value(open_one, open_all),
        );
        if format == "v2" {
            assert_eq!(seal_all, seal_one, "v2 seal: no allocation per value");
            assert_eq!(open_all, open_one, "v2 open: no allocation per value");
        }
    }
}
