//! Grants across replicas: created through the admin API on one proxy, used by grant token on
//! another that has not read the grants file yet, retired and revoked, refused when forged;
//! the admin API's authentication, authorization and audit lines.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Http;
use envelope_proxy::auth::Principal;
use envelope_proxy::config::{Action, RouteAuth};
use envelope_proxy::envelope::Context;
use envelope_proxy::keys::KeyRef;
use envelope_proxy::policy::grants::{Constraints, GrantKeys, Grants, NewGrant};
use envelope_proxy::policy::{Basis, Decision, Policies};
use envelope_proxy::server::Running;
use http::{Method, StatusCode};
use serde_json::{Value, json};

const POLICIES: &str = r#"
[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "admins"
effect = "allow"
principals = ["anonymous"]
actions = ["describe", "list", "rotate", "create-grant", "list-grants", "revoke-grant"]

[[key_policy]]
key = "planned"
[[key_policy.statement]]
sid = "creators"
effect = "allow"
principals = ["anonymous"]
actions = ["create", "describe", "schedule-deletion", "cancel-deletion"]

[[key_policy]]
key = "locked"
[[key_policy.statement]]
sid = "look-only"
effect = "allow"
principals = ["anonymous"]
actions = ["describe"]

[[route]]
name = "users"
path = "/users/{id?}"
upstream = "http://127.0.0.1:9"
key = "users"
fields = ["$.ssn"]

[[route]]
name = "locked"
path = "/locked/{id?}"
upstream = "http://127.0.0.1:9"
key = "locked"
fields = ["$.ssn"]
"#;

/// One proxy of a group sharing `dir` (keyring, master key, grants file); its own audit log.
struct Replica {
    running: Option<Running>,
    name: &'static str,
    dir: PathBuf,
    config_path: PathBuf,
}

impl Replica {
    async fn start(dir: &Path, name: &'static str, admin: &str, reload_secs: u64) -> Replica {
        let d = dir.display();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
auth = "none"

[admin]
listen = "127.0.0.1:0"
{admin}

[keyring]
path = "{d}/keyring.json"
master_key_file = "{d}/master.key"
create_missing_keys = true

[audit]
path = "{d}/audit-{name}.log"

[grants]
reload_secs = {reload_secs}

{POLICIES}
"#
        );
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, &text).unwrap();
        let config = envelope_proxy::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let running = envelope_proxy::server::start(config).await.unwrap();
        Replica {
            running: Some(running),
            name,
            dir: dir.to_path_buf(),
            config_path,
        }
    }

    fn policies(&self) -> Arc<Policies> {
        self.running.as_ref().unwrap().state().policies.clone()
    }

    fn grants(&self) -> Arc<Grants> {
        self.policies().grants().clone()
    }

    fn api(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.running.as_ref().unwrap().admin_addr.unwrap()
        )
    }

    /// The audit lines written so far (once the writer has caught up), after checking the
    /// log's keyed chain.
    async fn audit_lines(&self) -> Vec<Value> {
        let path = self.dir.join(format!("audit-{}.log", self.name));
        let mut last = String::new();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if !now.is_empty() && now == last && now.ends_with('\n') {
                break;
            }
            last = now;
        }
        let config = envelope_proxy::config::load(&self.config_path).unwrap();
        let keyring = envelope_proxy::keys::keyring::Keyring::open(
            "local",
            &config.keyring.as_ref().unwrap().path,
            &config.keyring.as_ref().unwrap().master_key,
        )
        .unwrap();
        let key = envelope_proxy::audit::key_for(&config, &keyring).unwrap();
        envelope_proxy::audit::verify(&path, Some(&key), None).unwrap_or_else(|e| panic!("{e}"));
        last.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

const LOOPBACK_API: &str = "auth = \"none\"";

async fn pair(dir: &Path) -> (Replica, Replica) {
    // B reads the grants file only at start (and when asked): what it knows otherwise comes
    // from tokens.
    let a = Replica::start(dir, "a", LOOPBACK_API, 1).await;
    let b = Replica::start(dir, "b", LOOPBACK_API, 3600).await;
    (a, b)
}

fn principal(name: &str) -> Arc<Principal> {
    Arc::new(Principal::new(name, RouteAuth::Jwt))
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    pairs.iter().copied().collect()
}

fn users() -> KeyRef {
    KeyRef::parse("users").unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn create_grant(http: &Http, r: &Replica, body: Value) -> (String, String) {
    let reply = http.post_json(&r.api("/v1/grants"), &[], &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let v = reply.json();
    (
        v["grant_id"].as_str().unwrap().to_string(),
        v["grant_token"].as_str().unwrap().to_string(),
    )
}

fn allowed_by(d: Decision) -> Option<String> {
    match d {
        Decision::Allow(Basis::Grant(id)) => Some(id.to_string()),
        Decision::Allow(other) => panic!("allowed by {other}, not a grant"),
        Decision::Deny(_) => None,
    }
}

#[tokio::test]
async fn a_grant_made_on_one_replica_works_on_another_by_token_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let http = Http::default();
    let (id, token) = create_grant(
        &http,
        &a,
        json!({"key": "users", "grantee": "app", "operations": ["open", "seal"],
               "constraints": {"subset": {"tenant": "acme"}}, "retiring_principal": "ops"}),
    )
    .await;
    assert!(token.starts_with("ept1."));
    let app = principal("app");
    let acme = ctx(&[("tenant", "acme"), ("region", "eu")]);

    // B has not read the file: without the token nothing allows app; with it, the grant does.
    assert_eq!(
        allowed_by(
            b.policies()
                .decide(&app, &users(), Action::Open, &acme, &[])
        ),
        None
    );
    let tokens = [token.as_str()];
    assert_eq!(
        allowed_by(
            b.policies()
                .decide(&app, &users(), Action::Open, &acme, &tokens)
        ),
        Some(id.clone())
    );
    // The grant's limits hold on the token too: action, context, grantee, key.
    for (who, key, action, c) in [
        ("app", users(), Action::Reencrypt, acme.clone()),
        ("app", users(), Action::Open, ctx(&[("tenant", "globex")])),
        ("bob", users(), Action::Open, acme.clone()),
        (
            "app",
            KeyRef::parse("locked").unwrap(),
            Action::Open,
            acme.clone(),
        ),
    ] {
        assert_eq!(
            allowed_by(
                b.policies()
                    .decide(&principal(who), &key, action, &c, &tokens)
            ),
            None,
            "{who} {action} {key}"
        );
    }
    // A wrote the file: it allows without a token.
    assert_eq!(
        allowed_by(
            a.policies()
                .decide(&app, &users(), Action::Seal, &acme, &[])
        ),
        Some(id.clone())
    );

    // Listing on B reads the file now.
    let listed = http.get(&b.api("/v1/grants?key=users"), &[]).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert_eq!(listed.json()["grants"][0]["id"], json!(id));
    assert_eq!(listed.json()["grants"][0]["grantee"], json!("app"));
    assert!(!listed.text().contains(&token), "tokens are never listed");

    // Revoke on A: A refuses the grant at once, token or not.
    let revoked = http
        .send(Method::DELETE, &a.api(&format!("/v1/grants/{id}")), &[], "")
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    assert_eq!(
        allowed_by(
            a.policies()
                .decide(&app, &users(), Action::Open, &acme, &tokens)
        ),
        None
    );
    // B, once it has read the file, refuses it too, the still-valid token included.
    assert!(b.grants().reload_if_changed().unwrap());
    assert_eq!(
        allowed_by(
            b.policies()
                .decide(&app, &users(), Action::Open, &acme, &tokens)
        ),
        None
    );
    assert_eq!(
        allowed_by(
            b.policies()
                .decide(&app, &users(), Action::Open, &acme, &[])
        ),
        None
    );
    // Revoking again: gone.
    let again = http
        .send(Method::DELETE, &a.api(&format!("/v1/grants/{id}")), &[], "")
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.error_code(), "not_found");

    // The grants file holds the id as revoked, and no grant.
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("grants.json")).unwrap()).unwrap();
    assert_eq!(file["body"]["grants"], json!([]));
    assert!(file["body"]["revoked"].get(&id).is_some());
    assert!(!file.to_string().contains(&token));

    // Audit: who created and revoked which grant; no token anywhere.
    let lines = a.audit_lines().await;
    let text = serde_json::to_string(&lines).unwrap();
    assert!(!text.contains(&token), "the token is never audited");
    let create = lines
        .iter()
        .find(|l| l["action"] == "admin:create-grant")
        .expect("create audited");
    assert_eq!(create["principal"], "anonymous");
    assert_eq!(create["grant"], json!(id));
    assert_eq!(create["outcome"], "ok");
    assert_eq!(create["keys"], json!(["local:users"]));
    let revoke = lines
        .iter()
        .filter(|l| l["action"] == "admin:revoke-grant")
        .collect::<Vec<_>>();
    assert_eq!(revoke.len(), 2);
    assert_eq!(revoke[0]["grant"], json!(id));
    assert_eq!(revoke[0]["principal"], "anonymous");
    assert_eq!(revoke[0]["status"], 200);
    assert_eq!(revoke[1]["status"], 404);
}

#[tokio::test]
async fn forged_tampered_expired_and_oversized_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let http = Http::default();
    let (id, token) = create_grant(
        &http,
        &a,
        json!({"key": "users", "grantee": "app", "operations": ["open"]}),
    )
    .await;
    let app = principal("app");
    let c = ctx(&[("tenant", "acme")]);
    let decide = |t: &str| allowed_by(b.policies().decide(&app, &users(), Action::Open, &c, &[t]));
    assert_eq!(decide(&token), Some(id.clone()));

    // The same grant, signed with another key (another keyring's, or a guess).
    let elsewhere = tempfile::tempdir().unwrap();
    let forger = Grants::open_with(
        elsewhere.path().join("grants.json"),
        GrantKeys::derive(b"not the master key"),
        Duration::from_secs(300),
    )
    .unwrap();
    let grant = a.grants().get(&id).unwrap().unwrap();
    let forged = forger.issue_token(&grant, now()).unwrap();
    assert_eq!(decide(&forged), None);
    // A grant made up for another principal, with the real token's tag.
    let (_, tag) = token.rsplit_once('.').unwrap();
    let mut other = grant.clone();
    other.grantee = "mallory".into();
    let payload = forger.issue_token(&other, now()).unwrap();
    let (head, _) = payload.rsplit_once('.').unwrap();
    let spliced = format!("{head}.{tag}");
    assert_eq!(
        allowed_by(b.policies().decide(
            &principal("mallory"),
            &users(),
            Action::Open,
            &c,
            &[&spliced]
        )),
        None
    );
    // Every single-character change of the token.
    for i in 5..token.len() {
        let mut bytes = token.clone().into_bytes();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(bytes).unwrap();
        assert_eq!(decide(&t), None, "changed at {i}");
    }
    // Expired (issued longer ago than token_lifetime), issued in the future, oversized.
    let expired = a.grants().issue_token(&grant, now() - 301).unwrap();
    assert_eq!(decide(&expired), None);
    let future = a.grants().issue_token(&grant, now() + 3600).unwrap();
    assert_eq!(decide(&future), None);
    let fresh = a.grants().issue_token(&grant, now()).unwrap();
    assert_eq!(decide(&fresh), Some(id.clone()), "a fresh token works");
    let oversized = format!("{token}{}", "A".repeat(4096));
    assert_eq!(decide(&oversized), None);
    assert_eq!(decide("ept1."), None);
    assert_eq!(decide(""), None);
    // A good token among bad ones still counts.
    assert_eq!(
        allowed_by(b.policies().decide(
            &app,
            &users(),
            Action::Open,
            &c,
            &[&oversized, &forged, &token]
        )),
        Some(id)
    );
}

#[tokio::test]
async fn constraints_equals_and_subset_and_grant_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let http = Http::default();
    let (eq_id, eq_token) = create_grant(
        &http,
        &a,
        json!({"key": "users", "grantee": "app", "operations": ["seal"],
               "constraints": {"equals": {"tenant": "acme"}}}),
    )
    .await;
    let app = principal("app");
    let decide = |c: &Context, t: &str, action| {
        allowed_by(b.policies().decide(&app, &users(), action, c, &[t]))
    };
    assert_eq!(
        decide(&ctx(&[("tenant", "acme")]), &eq_token, Action::Seal),
        Some(eq_id.clone())
    );
    assert_eq!(
        decide(
            &ctx(&[("tenant", "acme"), ("region", "eu")]),
            &eq_token,
            Action::Seal
        ),
        None,
        "equals: no other pairs"
    );
    assert_eq!(decide(&ctx(&[]), &eq_token, Action::Seal), None);

    // Both constraints at once, or an operation that cannot be granted: 400.
    for bad in [
        json!({"key": "users", "grantee": "app", "operations": ["seal"],
               "constraints": {"equals": {"a": "b"}, "subset": {"a": "b"}}}),
        json!({"key": "users", "grantee": "app", "operations": ["rotate"]}),
        json!({"key": "users", "grantee": "app", "operations": []}),
        json!({"key": "users", "grantee": "app", "operations": ["seal"], "extra": 1}),
        // A key without a policy is never managed through the API (403, before its
        // existence is looked up).
        json!({"key": "nope", "grantee": "app", "operations": ["seal"]}),
    ] {
        let r = http.post_json(&a.api("/v1/grants"), &[], &bad).await;
        assert!(
            r.status == StatusCode::BAD_REQUEST
                || r.status == StatusCode::NOT_FOUND
                || (bad["key"] == "nope" && r.status == StatusCode::FORBIDDEN),
            "{bad}: {} {}",
            r.status,
            r.text()
        );
        assert!(r.json()["error"]["code"].is_string());
    }

    // A grant that expires: its token stops working with it.
    let (_, short) = create_grant(
        &http,
        &a,
        // Expiry is in whole seconds: 2 s leave at least 1 s of validity for the first check.
        json!({"key": "users", "grantee": "app", "operations": ["open"], "expires_in_secs": 2}),
    )
    .await;
    let c = ctx(&[("tenant", "acme")]);
    assert!(decide(&c, &short, Action::Open).is_some());
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(decide(&c, &short, Action::Open), None);
    assert_eq!(
        allowed_by(a.policies().decide(&app, &users(), Action::Open, &c, &[])),
        None
    );
}

#[tokio::test]
async fn retire_by_the_grantee_or_retiring_principal_from_any_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let http = Http::default();
    // anonymous (the loopback admin caller) is neither grantee nor retiring principal: 403.
    let (id, token) = create_grant(
        &http,
        &a,
        json!({"key": "users", "grantee": "app", "operations": ["open"], "retiring_principal": "ops"}),
    )
    .await;
    let r = http
        .send(
            Method::POST,
            &a.api(&format!("/v1/grants/{id}/retire")),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), "access_denied");
    // The retiring principal retires it on B (B writes the shared file under the lock).
    b.grants().retire(&id, "ops").unwrap();
    assert!(a.grants().reload_if_changed().unwrap());
    let c = ctx(&[]);
    assert_eq!(
        allowed_by(
            a.policies()
                .decide(&principal("app"), &users(), Action::Open, &c, &[&token])
        ),
        None
    );

    // A grant to anonymous: it retires its own grant through the API.
    let (own, _) = create_grant(
        &http,
        &a,
        json!({"key": "users", "grantee": "anonymous", "operations": ["open"]}),
    )
    .await;
    let mine = http.get(&a.api("/v1/grants?grantee=anonymous"), &[]).await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.text());
    assert_eq!(mine.json()["grants"].as_array().unwrap().len(), 1);
    // Somebody else's grants need key=... and list-grants on it.
    let theirs = http.get(&a.api("/v1/grants?grantee=app"), &[]).await;
    assert_eq!(theirs.status, StatusCode::BAD_REQUEST);
    let r = http
        .send(
            Method::POST,
            &a.api(&format!("/v1/grants/{own}/retire")),
            &[],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(a.grants().list(None, None).unwrap().is_empty());

    let lines = a.audit_lines().await;
    let retires: Vec<_> = lines
        .iter()
        .filter(|l| l["action"] == "admin:retire-grant")
        .collect();
    assert_eq!(retires.len(), 2);
    assert_eq!(retires[0]["outcome"], "denied");
    assert_eq!(retires[0]["grant"], json!(id));
    assert_eq!(retires[1]["outcome"], "ok");
    assert_eq!(retires[1]["grant"], json!(own));
    assert_eq!(retires[1]["principal"], "anonymous");
}

#[tokio::test]
async fn concurrent_creates_on_two_replicas_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path()).await;
    let mut handles = Vec::new();
    for (n, g) in [a.grants().clone(), b.grants().clone()]
        .into_iter()
        .enumerate()
    {
        for i in 0..20 {
            let g = g.clone();
            handles.push(std::thread::spawn(move || {
                g.create(
                    NewGrant {
                        key: users(),
                        grantee: format!("app-{n}-{i}"),
                        operations: vec![Action::Open],
                        constraints: Constraints::default(),
                        retiring_principal: None,
                        expires_at: None,
                    },
                    "test",
                )
                .unwrap()
                .0
                .id
            }));
        }
    }
    let ids: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids.len(), 40);
    // Another process's view: a fresh handle on the file.
    let keyring = envelope_proxy::keys::keyring::Keyring::open(
        "local",
        &dir.path().join("keyring.json"),
        &envelope_proxy::keys::keyring::MasterKeySource::File(dir.path().join("master.key")),
    )
    .unwrap();
    let fresh = Grants::open_with(
        dir.path().join("grants.json"),
        envelope_proxy::policy::grants::GrantKeys::from_keyring(&keyring),
        Duration::from_secs(300),
    )
    .unwrap();
    let stored: Vec<String> = fresh
        .list(None, None)
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    for id in &ids {
        assert!(stored.contains(id), "grant {id} was lost");
    }
    assert_eq!(stored.len(), 40);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("grants.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn the_admin_api_authenticates_and_authorizes_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = pair(dir.path()).await;
    let http = Http::default();
    // Allowed by the policy: describe, rotate, create-grant on users.
    let d = http.get(&a.api("/v1/keys/users"), &[]).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text());
    assert_eq!(d.json()["key"], "local:users");
    assert_eq!(d.json()["current_version"], 1);
    let r = http
        .send(Method::POST, &a.api("/v1/keys/users/rotate"), &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["current_version"], 2);
    // The policy of "locked" allows describe only.
    let d = http.get(&a.api("/v1/keys/local%3Alocked"), &[]).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text());
    for (method, path, body) in [
        (Method::POST, "/v1/keys/locked/rotate", json!(null)),
        (Method::POST, "/v1/keys/locked/disable", json!(null)),
        (
            Method::POST,
            "/v1/grants",
            json!({"key": "locked", "grantee": "app", "operations": ["open"]}),
        ),
        (Method::GET, "/v1/grants?key=locked", json!(null)),
        (
            Method::POST,
            "/v1/keys/locked/schedule-deletion",
            json!({"days": 7}),
        ),
    ] {
        let r = http
            .send(
                method.clone(),
                &a.api(path),
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "access_denied");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("anonymous")
        );
    }
    // "list" shows only the keys the caller may list.
    let l = http.get(&a.api("/v1/keys"), &[]).await;
    assert_eq!(l.status, StatusCode::OK);
    assert_eq!(
        l.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["local:users"]
    );
    // A key without a policy is never managed through the API (its data may be used by the
    // routes' principals; management needs a policy naming who may).
    let c = http
        .post_json(&a.api("/v1/keys"), &[], &json!({"name": "fresh"}))
        .await;
    assert_eq!(c.status, StatusCode::FORBIDDEN, "{}", c.text());
    assert!(c.text().contains("has no key policy"), "{}", c.text());
    // A key whose policy allows "create" (written before the key exists) can be created once.
    let c = http
        .post_json(&a.api("/v1/keys"), &[], &json!({"name": "planned"}))
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let c = http
        .post_json(&a.api("/v1/keys"), &[], &json!({"name": "planned"}))
        .await;
    assert_eq!(c.status, StatusCode::CONFLICT);
    // Scheduled deletion through the API (issue 11): the waiting period is checked, the key
    // is pending deletion with its date, and a cancelled deletion leaves it disabled.
    let s = http
        .post_json(
            &a.api("/v1/keys/planned/schedule-deletion"),
            &[],
            &json!({"days": 3}),
        )
        .await;
    assert_eq!(s.status, StatusCode::BAD_REQUEST, "{}", s.text());
    assert!(s.text().contains("7 to 30 days"), "{}", s.text());
    let s = http
        .post_json(
            &a.api("/v1/keys/planned/schedule-deletion"),
            &[],
            &json!({"days": 7}),
        )
        .await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text());
    assert_eq!(s.json()["state"], "pending_deletion");
    assert!(s.json()["deletion_date"].is_string(), "{}", s.text());
    let s = http
        .send(
            Method::POST,
            &a.api("/v1/keys/planned/cancel-deletion"),
            &[],
            "",
        )
        .await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text());
    assert_eq!(s.json()["state"], "disabled");
    let unknown = http.get(&a.api("/v1/nothing"), &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let lines = a.audit_lines().await;
    let denied: Vec<_> = lines.iter().filter(|l| l["outcome"] == "denied").collect();
    assert_eq!(denied.len(), 6);
    assert!(
        denied
            .iter()
            .all(|l| l["principal"] == "anonymous" && l["status"] == 403)
    );
    assert!(lines.iter().any(|l| l["action"] == "admin:rotate"
        && l["keys"] == json!(["local:users"])
        && l["outcome"] == "ok"));
}

#[tokio::test]
async fn the_admin_api_with_jwt_authenticates_then_authorizes_every_call() {
    use common::jwt::{TestKey, jwks, now};
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::ed("admin-key");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).unwrap();
    let admin = format!(
        "auth = \"jwt\"\n[auth.jwt]\njwks_file = \"{}\"\nissuer = \"https://issuer.test\"\naudience = \"envelope-admin\"\n",
        jwks_file.display()
    );
    let r = Replica::start(dir.path(), "jwt", &admin, 1).await;
    let http = Http::default();
    for (method, path) in [
        (Method::GET, "/v1/keys"),
        (Method::POST, "/v1/grants"),
        (Method::DELETE, "/v1/grants/abc"),
    ] {
        let reply = http.send(method, &r.api(path), &[], "{}").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(reply.error_code(), "unauthenticated");
        assert_eq!(
            reply.headers["www-authenticate"],
            "Bearer realm=\"envelope-proxy\""
        );
    }
    // A bearer token that does not verify: 401 with invalid_token.
    let reply = http
        .get(&r.api("/v1/keys"), &[("authorization", "Bearer not-a-jwt")])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    // The policy lets "anonymous" describe and rotate "users"; a JWT principal is named by
    // its `sub`, so "ops-bot" is refused and a token for "anonymous" would be allowed.
    let token = |sub: &str| {
        key.token(
            &serde_json::json!({"iss": "https://issuer.test", "aud": "envelope-admin",
            "sub": sub, "exp": now() + 300}),
        )
    };
    let bot = format!("Bearer {}", token("ops-bot"));
    let reply = http
        .get(&r.api("/v1/keys/users"), &[("authorization", bot.as_str())])
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(reply.text().contains("ops-bot may not describe"));
    let named = format!("Bearer {}", token("anonymous"));
    let reply = http
        .get(
            &r.api("/v1/keys/users"),
            &[("authorization", named.as_str())],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A token from another issuer's key: refused.
    let other = TestKey::ed("admin-key");
    let forged = format!(
        "Bearer {}",
        other.token(
            &serde_json::json!({"iss": "https://issuer.test", "aud": "envelope-admin",
            "sub": "anonymous", "exp": now() + 300})
        )
    );
    let reply = http
        .get(
            &r.api("/v1/keys/users"),
            &[("authorization", forged.as_str())],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Nothing was created; every call is audited, naming the principal when there is one.
    assert!(!dir.path().join("grants.json").exists());
    let lines = r.audit_lines().await;
    let auth: Vec<_> = lines
        .iter()
        .filter(|l| l["action"] == "admin:authenticate")
        .collect();
    assert_eq!(auth.len(), 5);
    assert_eq!(auth[0]["outcome"], "denied");
    assert_eq!(auth[0]["reason"], "missing");
    assert!(auth[0].get("principal").is_none());
    assert!(
        lines
            .iter()
            .any(|l| l["principal"] == "ops-bot" && l["status"] == 403)
    );
    assert!(lines.iter().any(|l| l["principal"] == "anonymous"
        && l["action"] == "admin:describe"
        && l["status"] == 200));
    let text = std::fs::read_to_string(dir.path().join("audit-jwt.log")).unwrap();
    assert!(
        !text.contains(&token("x")[..24]),
        "no token in the audit log"
    );
}

#[test]
fn admin_auth_none_only_on_loopback() {
    let base = |admin: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nauth = \"none\"\n[admin]\n{admin}\n\
             [keyring]\npath = \"k.json\"\nmaster_key_file = \"m.key\"\n{POLICIES}"
        )
    };
    let e = envelope_proxy::config::parse(&base(
        "listen = \"0.0.0.0:9090\"\ntoken_file = \"t\"\nauth = \"none\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("admin.auth"), "{e}");
    let e = envelope_proxy::config::parse(&base("listen = \"127.0.0.1:9090\"\nauth = \"jwt\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[auth.jwt]"), "{e}");
    let e = envelope_proxy::config::parse(&base("listen = \"127.0.0.1:9090\"\nauth = \"mtls\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_ca_file"), "{e}");
    let e = envelope_proxy::config::parse(&base("listen = \"127.0.0.1:9090\"\nauth = \"sigv4\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.auth"), "{e}");
    let ok = envelope_proxy::config::parse(&base("listen = \"127.0.0.1:9090\"\nauth = \"none\""))
        .unwrap();
    assert_eq!(ok.admin.unwrap().api_auth, Some(RouteAuth::None));
}

#[tokio::test]
async fn the_admin_api_is_off_without_admin_auth() {
    let dir = tempfile::tempdir().unwrap();
    let r = Replica::start(dir.path(), "off", "", 1).await;
    let reply = Http::default().get(&r.api("/v1/keys"), &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "admin_api_off");
}

#[tokio::test]
async fn the_cli_manages_the_same_grants_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = pair(dir.path()).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .arg("--config")
            .arg(&a.config_path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&[
        "grants",
        "create",
        "--key",
        "users",
        "--grantee",
        "batch",
        "--operations",
        "open,seal",
        "--context-subset",
        "tenant=acme",
    ]);
    assert!(ok, "{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("grant_id "))
        .unwrap()
        .to_string();
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("grant_token "))
        .unwrap()
        .to_string();
    // The running proxy accepts the CLI's token at once, and the grant after reading the file.
    let batch = principal("batch");
    let c = ctx(&[("tenant", "acme")]);
    assert_eq!(
        allowed_by(
            a.policies()
                .decide(&batch, &users(), Action::Open, &c, &[&token])
        ),
        Some(id.clone())
    );
    a.grants().reload_if_changed().unwrap();
    assert_eq!(
        allowed_by(a.policies().decide(&batch, &users(), Action::Open, &c, &[])),
        Some(id.clone())
    );
    let (ok, out, _) = cli(&["grants", "list", "--grantee", "batch"]);
    assert!(ok);
    assert!(out.contains(&id));
    let (ok, _, err) = cli(&[
        "grants",
        "create",
        "--key",
        "users",
        "--grantee",
        "x",
        "--operations",
        "rotate",
    ]);
    assert!(!ok);
    assert!(err.contains("rotate"), "{err}");
    let (ok, _, err) = cli(&["grants", "retire", &id, "--as", "mallory"]);
    assert!(!ok, "only the grantee or retiring principal retires");
    assert!(err.contains("mallory"), "{err}");
    let (ok, out, err) = cli(&["grants", "revoke", &id]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"));
    a.grants().reload_if_changed().unwrap();
    assert_eq!(
        allowed_by(
            a.policies()
                .decide(&batch, &users(), Action::Open, &c, &[&token])
        ),
        None
    );
}
