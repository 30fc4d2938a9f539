//! Properties of the JSON field transform on random documents (proptest stands in for a fuzzer:
//! cargo-fuzz needs a nightly toolchain this project does not use):
//! - seal then open gives back the exact document;
//! - after sealing, every value at a configured path is a token;
//! - opening arbitrary (hostile) documents never panics.

use std::collections::HashMap;
use std::sync::Arc;

use envelope_proxy::config::{self, JsonRoute, RouteKind};
use envelope_proxy::keys::keyring::{Keyring, MasterKeySource};
use envelope_proxy::keys::{CacheLimits, KeyService, RootKeyProvider};
use envelope_proxy::metrics::Metrics;
use envelope_proxy::transform::json_fields::{self, RequestMeta};
use proptest::prelude::*;
use serde_json::{Value, json};

struct Fixture {
    rt: tokio::runtime::Runtime,
    keys: Arc<KeyService>,
    route: JsonRoute,
    _dir: tempfile::TempDir,
}

/// Field paths that overlap (`$.e[*]` and `$.e[*].f`): bodies with such matches go through the
/// DOM path.
const OVERLAPPING: &str = r#"["$.a", "$.b.c", "$..d", "$.e[*]", "$.e[*].f"]"#;
/// Field paths that mostly do not (`$..d` still can): bodies go through the byte-splicing path.
const DISJOINT: &str = r#"["$.a", "$.b.c", "$..d", "$.e[*].f"]"#;

fn fixture() -> Fixture {
    fixture_with(OVERLAPPING)
}

fn fixture_with(fields: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
[keyring]
path = "{d}/k.json"
master_key_file = "{d}/m.key"
[[route]]
name = "r"
path = "/t/{{tenant}}/**"
upstream = "http://127.0.0.1:1"
key = "k"
fields = {fields}
context = {{ tenant = "{{path.tenant}}" }}
message_context = {{ id = "{{json.id}}" }}
"#,
        d = dir.path().display(),
    );
    let cfg = config::parse(&text).unwrap();
    let route = match &cfg.routes[0].kind {
        RouteKind::JsonFields(jr) => jr.clone(),
        _ => unreachable!("the fixture route encrypts JSON fields"),
    };
    let keys = rt.block_on(async {
        let kr = Keyring::open(
            "local",
            &cfg.keyring.as_ref().unwrap().path,
            &MasterKeySource::File(dir.path().join("m.key")),
        )
        .unwrap();
        kr.create_key("k").unwrap();
        let backends: Vec<Arc<dyn RootKeyProvider>> = vec![kr];
        KeyService::new(backends, CacheLimits::default(), Arc::new(Metrics::new()))
    });
    Fixture {
        rt,
        keys,
        route,
        _dir: dir,
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("a".to_string()),
                    Just("b".to_string()),
                    Just("c".to_string()),
                    Just("d".to_string()),
                    Just("e".to_string()),
                    Just("f".to_string()),
                    "[a-z]{1,3}".prop_map(|s| s)
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn document() -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_map(
            prop_oneof![Just("a"), Just("b"), Just("d"), Just("e"), Just("x")],
            json_value(),
            0..5,
        ),
        "[a-z0-9]{1,8}",
    )
        .prop_map(|(m, id)| {
            let mut o: serde_json::Map<String, Value> =
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            o.insert("id".into(), Value::String(id));
            Value::Object(o)
        })
}

fn meta_parts() -> (HashMap<String, String>, http::HeaderMap) {
    (
        HashMap::from([("tenant".to_string(), "acme".to_string())]),
        http::HeaderMap::new(),
    )
}

/// A value at a configured path of `sealed` that is not a token, if any.
fn value_in_clear(route: &JsonRoute, sealed: &Value) -> Option<String> {
    for field in &route.fields {
        for loc in field.locate(sealed).unwrap() {
            let mut v = sealed;
            for step in &loc {
                v = match step {
                    json_fields::Step::Key(k) => &v[k.as_str()],
                    json_fields::Step::Index(i) => &v[*i],
                };
            }
            if !v.as_str().is_some_and(|s| s.starts_with("enc:v1:")) {
                return Some(format!("{} left {v} in clear", field.source()));
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn seal_then_open_is_the_identity(doc in document()) {
        let f = fixture();
        let (captures, headers) = meta_parts();
        let meta = RequestMeta { captures: &captures, headers: &headers, given: None ,    principal: None,};
        let key_ctx = json_fields::key_context(&f.route, &meta).unwrap();
        let mut sealed = doc.clone();
        f.rt.block_on(async {
            let key = f.keys.sealing_key(&f.route.keys, &key_ctx, 100, 10_000).await.unwrap();
            json_fields::seal_body(&f.route, &meta, &key_ctx, &key, &mut sealed).unwrap();
        });
        // Every configured path now holds only tokens.
        if let Some(clear) = value_in_clear(&f.route, &sealed) {
            prop_assert!(false, "{}", clear);
        }
        let mut opened = sealed.clone();
        f.rt.block_on(async {
            json_fields::open_body(&f.route, &meta, &key_ctx, &f.keys, &mut opened).await.unwrap();
        });
        prop_assert_eq!(opened, doc);
    }

    /// The byte-splicing path (what the proxy runs) and the DOM path agree: each opens what
    /// the other sealed, splicing round-trips, and it leaves no configured value in clear.
    #[test]
    fn splicing_agrees_with_the_dom_path(doc in document(), pretty in any::<bool>(), disjoint in any::<bool>()) {
        let f = fixture_with(if disjoint { DISJOINT } else { OVERLAPPING });
        let (captures, headers) = meta_parts();
        let meta = RequestMeta { captures: &captures, headers: &headers, given: None ,    principal: None,};
        let key_ctx = json_fields::key_context(&f.route, &meta).unwrap();
        let text = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.unwrap();
        let scanned = json_fields::scan_body(&text, 64).unwrap();
        let key = f.rt.block_on(f.keys.sealing_key(&f.route.keys, &key_ctx, 100, 10_000)).unwrap();
        let (spliced, n) = json_fields::seal_scanned(&f.route, &meta, &key_ctx, &key, &scanned, 64).unwrap();
        let sealed: Value = serde_json::from_slice(&spliced).unwrap();
        let mut dom_sealed = doc.clone();
        let dom_n = json_fields::seal_body(&f.route, &meta, &key_ctx, &key, &mut dom_sealed).unwrap();
        prop_assert_eq!(n, dom_n);
        if let Some(clear) = value_in_clear(&f.route, &sealed) {
            prop_assert!(false, "{}", clear);
        }
        // The DOM path opens what splicing sealed.
        let mut opened = sealed.clone();
        f.rt.block_on(json_fields::open_body(&f.route, &meta, &key_ctx, &f.keys, &mut opened)).unwrap();
        prop_assert_eq!(&opened, &doc);
        // Splicing opens what splicing sealed, and what the DOM path sealed.
        for body in [spliced, serde_json::to_vec(&dom_sealed).unwrap()] {
            let scanned = json_fields::scan_body(&body, 64).unwrap();
            let (out, report) = f.rt.block_on(json_fields::open_scanned(&f.route, &meta, &key_ctx, &f.keys, &scanned, 64)).unwrap();
            prop_assert_eq!(report.opened, n);
            let out: Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(&out, &doc);
        }
    }

    #[test]
    fn opening_hostile_documents_never_panics(doc in document(), junk in ".{0,80}") {
        let f = fixture();
        let (captures, headers) = meta_parts();
        let meta = RequestMeta { captures: &captures, headers: &headers, given: None ,    principal: None,};
        let key_ctx = json_fields::key_context(&f.route, &meta).unwrap();
        let mut d = doc;
        d["a"] = Value::String(format!("enc:v1:{junk}"));
        let _ = f.rt.block_on(json_fields::open_body(&f.route, &meta, &key_ctx, &f.keys, &mut d));
        let text = serde_json::to_vec(&d).unwrap();
        let scanned = json_fields::scan_body(&text, 64).unwrap();
        let _ = f.rt.block_on(json_fields::open_scanned(&f.route, &meta, &key_ctx, &f.keys, &scanned, 64));
    }
}
