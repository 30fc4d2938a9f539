//! Microbenchmarks of the encrypting data path, without the network:
//!
//! - `json_fields/*`: seal and open of one ~1 KiB JSON document (`benches/load/doc.json`, the
//!   same body the load run posts) with 3 configured fields, warm data-key cache. `seal`/`open`
//!   work on a parsed `serde_json::Value`; `seal_bytes`/`open_bytes` include what the pipeline
//!   adds per request (strict parse and serialization), and `parse_serialize` is that overhead
//!   alone, for comparison.
//! - `json_fields/*_v2`: the same document through a route with `token_format = "v2"` (compact
//!   `enc:v2:` tokens, records in a directory vault), spliced path, warm caches: the sealing key
//!   comes from the cache and the opening side finds the record's key in the record cache.
//! - Before the groups, the bench prints the size of one SSN token (v1 local, v1 local +
//!   escrow, v2). Allocations per value are counted, and held at zero for v2, by
//!   `tests/alloc_count.rs` (a counting allocator).
//! - `json_fields_parts/*`: the pieces of one field (path lookup, cache hits, one token), to see
//!   where the per-document time goes.
//! - `aead_core/*`: the C2SP chunked AES-256-GCM layer (`envelope::chunked`) on 1 MiB.
//!
//! Run: `cargo bench --bench json_fields` (about a minute); `-- v2` for the v2 cases only.
//!
//! The bench allocates with mimalloc, as the `envelope-proxy` binary does (`src/main.rs`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use envelope_proxy::config::{self, JsonRoute, RouteKind};
use envelope_proxy::envelope::chunked;
use envelope_proxy::envelope::compact;
use envelope_proxy::envelope::context::FIELD_KEY;
use envelope_proxy::envelope::token::{self, ParsedToken};
use envelope_proxy::keys::keyring::Keyring;
use envelope_proxy::keys::{KeyRef, KeyService, RootKeyProvider, vault};
use envelope_proxy::metrics::Metrics;
use envelope_proxy::pipeline::route;
use envelope_proxy::transform::json_fields::{self, RequestMeta};
use envelope_proxy::transform::strict_json;
use http::HeaderMap;
use serde_json::Value;

/// Bytes in, bytes out, as the proxy runs it (spliced path), for v1 and v2: one scan, the key
/// context, the sealing key from the cache, tokens spliced into the original bytes.
async fn seal_bytes(
    keys: &KeyService,
    vault: &vault::Vault,
    jr: &JsonRoute,
    meta: &RequestMeta<'_>,
    doc_len: usize,
) -> (Vec<u8>, usize) {
    let d = json_fields::scan_body(black_box(DOC.as_bytes()), MAX_DEPTH).expect("scan");
    let key_ctx = json_fields::key_context(jr, meta).expect("key context");
    let messages = json_fields::estimate_messages_scanned(jr, &d);
    let key = match &jr.vault_label {
        Some(_) => {
            keys.sealing_record_key(vault, &jr.keys, &key_ctx, messages, doc_len as u64)
                .await
        }
        None => {
            keys.sealing_key(&jr.keys, &key_ctx, messages, doc_len as u64)
                .await
        }
    }
    .expect("sealing key");
    json_fields::seal_scanned(jr, meta, &key_ctx, &key, &d, MAX_DEPTH).expect("seal")
}

/// The response side of [`seal_bytes`]: one scan, the key context, each value opened (its
/// key from the caches) and spliced.
async fn open_bytes(
    keys: &KeyService,
    jr: &JsonRoute,
    meta: &RequestMeta<'_>,
    body: &[u8],
) -> Vec<u8> {
    let d = json_fields::scan_body(black_box(body), MAX_DEPTH).expect("scan");
    let key_ctx = json_fields::key_context(jr, meta).expect("key context");
    let (out, report) = json_fields::open_scanned(jr, meta, &key_ctx, keys, &d, MAX_DEPTH)
        .await
        .expect("open");
    assert_eq!(report.opened, 3);
    out
}

/// The load run's POST body: ~1 KiB, with `ssn`, `card.number` and `profile` (an object).
const DOC: &str = include_str!("load/doc.json");
const PATH: &str = "/tenants/acme/users/user-42";
/// The same document on the v2 route (compact tokens, a directory vault).
const PATH_V2: &str = "/v2/tenants/acme/users/user-42";
const MAX_DEPTH: usize = 64;

fn route_config(dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

# Keep one data key for the whole run: the benchmark measures the warm path.
[cache]
max_messages = 1000000000000

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.ssn", "$.card.number", "$.profile"]
context = {{ tenant = "{{path.tenant}}", table = "users" }}
message_context = {{ id = "{{path.id|json.id}}" }}

[[route]]
name = "users-v2"
path = "/v2/tenants/{{tenant}}/users/{{id?}}"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.ssn", "$.card.number", "$.profile"]
context = {{ tenant = "{{path.tenant}}", table = "users" }}
message_context = {{ id = "{{path.id|json.id}}" }}
token_format = "v2"

[route.key_vault]
kind = "dir"
dir = "{d}/vault"
"#
    )
}

fn json_fields(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = config::parse(&route_config(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let (route, captures) = route::select(&cfg.routes, PATH).expect("route matches");
    let RouteKind::JsonFields(jr) = &route.kind else {
        panic!("expected an encrypting route");
    };
    let jr: &JsonRoute = jr;

    let keyring = Keyring::open(
        KeyRef::DEFAULT_BACKEND,
        &cfg.keyring.as_ref().unwrap().path,
        &cfg.keyring.as_ref().unwrap().master_key,
    )
    .expect("keyring");
    keyring.create_key("users").expect("create root key");
    keyring
        .create_key("users-escrow")
        .expect("create escrow root key");
    let backends: Vec<Arc<dyn RootKeyProvider>> = vec![keyring];
    // KeyService::new spawns its cache-invalidation task: it needs a runtime context.
    let keys = {
        let _guard = rt.enter();
        KeyService::new(backends, cfg.cache.clone(), Arc::new(Metrics::new()))
    };

    let headers = HeaderMap::new();
    let meta = RequestMeta {
        captures: &captures,
        headers: &headers,
        given: None,
        principal: None,
    };
    let doc: Value = strict_json::parse(DOC.as_bytes(), MAX_DEPTH).expect("doc parses");
    let doc_len = serde_json::to_vec(&doc).expect("serialize").len();

    // The v2 route: its directory vault registered as the server registers it.
    let (route_v2, captures_v2) = route::select(&cfg.routes, PATH_V2).expect("v2 route matches");
    let RouteKind::JsonFields(jr2) = &route_v2.kind else {
        panic!("expected an encrypting route");
    };
    let jr2: &JsonRoute = jr2;
    vault::register_all(&keys, &cfg).expect("vault");
    let vault = keys
        .vault(jr2.vault_label.as_deref().expect("v2 route has a vault"))
        .expect("vault registered");
    let meta_v2 = RequestMeta {
        captures: &captures_v2,
        headers: &headers,
        given: None,
        principal: None,
    };

    // The request path: context → data key (cache) → seal.
    let seal_one = |doc: &mut Value| -> usize {
        let key_ctx = json_fields::key_context(jr, &meta).expect("key context");
        let messages = json_fields::estimate_messages(jr, doc);
        let key = rt
            .block_on(keys.sealing_key(&jr.keys, &key_ctx, messages, doc_len as u64))
            .expect("sealing key");
        json_fields::seal_body(jr, &meta, &key_ctx, &key, doc).expect("seal")
    };
    // The response path: context → open (each token's data key from the cache).
    let open_one = |doc: &mut Value| -> usize {
        let key_ctx = json_fields::key_context(jr, &meta).expect("key context");
        rt.block_on(json_fields::open_body(jr, &meta, &key_ctx, &keys, doc))
            .expect("open")
            .opened
    };

    // Warm both caches and check the round trip once.
    let mut sealed = doc.clone();
    assert_eq!(seal_one(&mut sealed), 3, "three fields sealed");
    assert_ne!(sealed, doc);
    let mut reopened = sealed.clone();
    assert_eq!(open_one(&mut reopened), 3, "three fields opened");
    assert_eq!(reopened, doc, "round trip");
    let sealed_bytes = serde_json::to_vec(&sealed).expect("serialize");
    eprintln!(
        "document: {} bytes plaintext, {} bytes sealed, 3 fields",
        doc_len,
        sealed_bytes.len()
    );

    // Warm the v2 caches (the first seal writes the record; its key primes the record cache)
    // and check the round trip.
    let (sealed_v2, n) = rt.block_on(seal_bytes(&keys, &vault, jr2, &meta_v2, doc_len));
    assert_eq!(n, 3);
    let text = String::from_utf8(sealed_v2.clone()).expect("utf-8");
    assert_eq!(text.matches(compact::PREFIX).count(), 3, "three v2 tokens");
    let reopened: Value =
        serde_json::from_slice(&rt.block_on(open_bytes(&keys, jr2, &meta_v2, &sealed_v2)))
            .expect("json");
    assert_eq!(reopened, doc, "v2 round trip");
    eprintln!(
        "document: {} bytes sealed with v2 tokens ({} records in the vault)",
        sealed_v2.len(),
        rt.block_on(vault.list()).expect("list").len()
    );

    // One SSN ("123-45-6789", 13 bytes of JSON) as a token: v1 under one local key, v1 under
    // a local key and an escrow key (two EDKs), v2 (any backends, any number of keys).
    {
        let key_ctx = json_fields::key_context(jr, &meta).expect("key context");
        let mut msg_ctx = key_ctx.clone();
        msg_ctx.insert("id", "user-42");
        msg_ctx.insert(FIELD_KEY, "$.ssn");
        let ssn = br#""123-45-6789""#;
        let users = KeyRef::parse("local:users").expect("key");
        let escrow = KeyRef::parse("local:users-escrow").expect("key");
        for (name, route_keys) in [
            ("v1 local (users)", vec![users.clone()]),
            (
                "v1 local + escrow (users, users-escrow)",
                vec![users.clone(), escrow],
            ),
        ] {
            let key = rt
                .block_on(keys.sealing_key(&route_keys, &key_ctx, 1, 13))
                .expect("sealing key");
            let t = token::seal(&key.header, key.data_key.expose(), &msg_ctx, ssn).expect("seal");
            eprintln!("ssn token {name}: {} characters", t.len());
        }
        let key = rt
            .block_on(keys.sealing_record_key(&vault, &jr2.keys, &key_ctx, 1, 13))
            .expect("sealing key");
        let record = key.record.as_ref().expect("a v2 key has a record");
        // The AAD: canonical(message context with ep:field).
        let t = compact::seal(record, &msg_ctx.canonical(), ssn).expect("seal");
        eprintln!("ssn token v2: {} characters", t.len());
    }

    let mut g = c.benchmark_group("json_fields");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .throughput(Throughput::Elements(1));

    g.bench_function("seal", |b| {
        b.iter_batched(
            || doc.clone(),
            |mut d| {
                black_box(seal_one(&mut d));
                d
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("open", |b| {
        b.iter_batched(
            || sealed.clone(),
            |mut d| {
                black_box(open_one(&mut d));
                d
            },
            BatchSize::SmallInput,
        )
    });
    // Bytes in, bytes out, as the proxy runs it: one scan, tokens spliced into the original
    // bytes (json_fields::seal_scanned / open_scanned).
    // The runtime is entered once per batch of iterations (`to_async`), as a request's
    // transform runs inside a task that is already running.
    g.bench_function("seal_bytes", |b| {
        b.to_async(&rt)
            .iter(|| seal_bytes(&keys, &vault, jr, &meta, doc_len))
    });
    g.bench_function("open_bytes", |b| {
        b.to_async(&rt)
            .iter(|| open_bytes(&keys, jr, &meta, &sealed_bytes))
    });
    // The same on the v2 route: compact tokens, the record's key from the caches.
    g.bench_function("seal_bytes_v2", |b| {
        b.to_async(&rt)
            .iter(|| seal_bytes(&keys, &vault, jr2, &meta_v2, doc_len))
    });
    g.bench_function("open_bytes_v2", |b| {
        b.to_async(&rt)
            .iter(|| open_bytes(&keys, jr2, &meta_v2, &sealed_v2))
    });
    // The same through the DOM path (parse into a Value, replace, serialize): what routes
    // whose field paths may nest run.
    g.bench_function("seal_bytes_dom", |b| {
        b.iter(|| {
            let mut d = strict_json::parse(black_box(DOC.as_bytes()), MAX_DEPTH).expect("parse");
            seal_one(&mut d);
            serde_json::to_vec(&d).expect("serialize")
        })
    });
    g.bench_function("open_bytes_dom", |b| {
        b.iter(|| {
            let mut d = strict_json::parse(black_box(&sealed_bytes), MAX_DEPTH).expect("parse");
            open_one(&mut d);
            serde_json::to_vec(&d).expect("serialize")
        })
    });
    g.bench_function("parse_serialize", |b| {
        b.iter(|| {
            let d = strict_json::parse(black_box(DOC.as_bytes()), MAX_DEPTH).expect("parse");
            serde_json::to_vec(&d).expect("serialize")
        })
    });
    g.finish();

    // Where the time goes: one field's pieces, for reading the numbers above.
    let key_ctx = json_fields::key_context(jr, &meta).expect("key context");
    let key = rt
        .block_on(keys.sealing_key(&jr.keys, &key_ctx, 3, doc_len as u64))
        .expect("sealing key");
    let mut msg_ctx = key_ctx.clone();
    msg_ctx.insert("id", "user-42");
    msg_ctx.insert(envelope_proxy::envelope::context::FIELD_KEY, "$.profile");
    let profile = serde_json::to_vec(&doc["profile"]).expect("serialize");
    let profile_token =
        token::seal(&key.header, key.data_key.expose(), &msg_ctx, &profile).expect("seal");

    let mut g = c.benchmark_group("json_fields_parts");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    g.bench_function("locate_3_paths", |b| {
        b.iter(|| {
            jr.fields
                .iter()
                .map(|f| f.locate(black_box(&doc)).map_or(0, |l| l.len()))
                .sum::<usize>()
        })
    });
    g.bench_function("sealing_key_cache_hit", |b| {
        b.iter(|| {
            rt.block_on(keys.sealing_key(&jr.keys, black_box(&key_ctx), 3, doc_len as u64))
                .expect("sealing key")
        })
    });
    let parsed = ParsedToken::parse(&profile_token).expect("token");
    g.bench_function("opening_key_cache_hit", |b| {
        b.iter(|| {
            rt.block_on(keys.opening_key(black_box(&parsed.header), &key_ctx))
                .expect("opening key")
        })
    });
    g.bench_function("token_seal_profile", |b| {
        b.iter(|| {
            token::seal(
                &key.header,
                key.data_key.expose(),
                &msg_ctx,
                black_box(&profile),
            )
        })
    });
    g.bench_function("token_open_profile", |b| {
        b.iter(|| {
            ParsedToken::parse(black_box(&profile_token))
                .expect("token")
                .open(key.data_key.expose(), &msg_ctx)
                .expect("opens")
        })
    });
    g.finish();
}

fn aead_core(c: &mut Criterion) {
    const LEN: usize = 1 << 20;
    let key = [7u8; 32];
    let context = b"envelope-proxy bench context";
    let plaintext: Vec<u8> = (0..LEN).map(|i| (i * 31) as u8).collect();
    let message = chunked::seal(&key, context, &plaintext);
    assert_eq!(
        chunked::open(&key, context, &message).expect("opens"),
        plaintext
    );

    let mut g = c.benchmark_group("aead_core");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("seal_1MiB", |b| {
        b.iter(|| chunked::seal(&key, context, black_box(&plaintext)))
    });
    g.bench_function("open_1MiB", |b| {
        b.iter(|| chunked::open(&key, context, black_box(&message)).expect("opens"))
    });
    g.finish();
}

criterion_group!(benches, json_fields, aead_core);
criterion_main!(benches);
