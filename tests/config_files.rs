//! Every file in config/ parses, so the examples cannot drift from the code.

#[test]
fn every_example_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            envelope_proxy::config::load(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the quickstart and reference configs, found {checked}"
    );
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "nowhere"
[keyring]
path = "k.json"
[[route]]
name = "a"
path = "/a/**"
upstream = "http://127.0.0.1:1"
fields = ["$.x"]
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.listen",
        "master_key_file or master_key_env",
        "route[0] (\"a\"): needs key",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
}

/// An S3 upstream with a path would turn `PUT /reports` (a bucket-level request, whose body
/// the gateway does not seal) into `PUT /uploads/reports`, an object stored in clear.
/// check-config refuses it, and bad host names and clear_metadata values.
#[test]
fn check_config_refuses_s3_upstreams_with_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s3.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "127.0.0.1:0"
auth = "none"
[keyring]
path = "k.json"
master_key_env = "NOT_NEEDED_FOR_CHECKS"
[[route]]
name = "objects"
kind = "s3"
path = "/**"
upstream = "http://127.0.0.1:5000/uploads"
key = "objects"
[route.s3]
region = "us-east-1"
path_style_hosts = ["gateway.internal:9000"]
clear_metadata = "encrypt"
upstream_access_key_id_env = "A"
upstream_secret_access_key_env = "B"
[[route.s3.client]]
access_key_id = "AK"
secret_access_key_env = "C"
identity = "app"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "route[0] (\"objects\").upstream: an S3 upstream is the storage's endpoint, without a path",
        "path_style_hosts: \"gateway.internal:9000\" is not a host name",
        "clear_metadata: \"encrypt\" is not one of",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
    // The same route without a path is fine.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("5000/uploads", "5000/")
        .replace("gateway.internal:9000", "gateway.internal")
        .replace("\"encrypt\"", "\"refuse\"");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pass-through route before an encrypting route it overlaps would take its requests (in
/// clear): check-config refuses it, names both routes and the option that allows it.
#[test]
fn check_config_refuses_a_pass_through_shadowing_an_encrypting_route() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shadow.toml");
    let text = |marked: &str| {
        format!(
            r#"
[server]
listen = "127.0.0.1:8080"
auth = "none"
[keyring]
path = "k.json"
master_key_file = "m.key"

[[route]]
name = "everything"
path = "/TENANTS/**"
upstream = "http://127.0.0.1:3000"
passthrough = true
{marked}

[[route]]
name = "users"
path = "/tenants/{{tenant}}/users/**"
upstream = "http://127.0.0.1:3000"
key = "users"
fields = ["$.ssn"]
"#
        )
    };
    let run = |text: String| {
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
            .args(["check-config", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run(text(""));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "route \"everything\".path",
        "encrypting route \"users\"",
        "dangerous_shadows_encrypted_routes",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
    let out = run(text("dangerous_shadows_encrypted_routes = true"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const POLICY_CONFIG: &str = r#"
[server]
listen = "0.0.0.0:8080"
[keyring]
path = "k.json"
master_key_file = "m.key"
[auth.jwt]
jwks_file = "jwks.json"
issuer = "https://issuer.example"
audience = "envelope-proxy"
[[route]]
name = "users"
path = "/tenants/{tenant}/users/{id?}"
upstream = "http://127.0.0.1:3000"
auth = "jwt"
require = { "path.tenant" = "{claim.tenant}" }
key = "users"
fields = ["$.ssn"]
context = { tenant = "{claim.tenant}" }
[[route]]
name = "health"
path = "/health"
upstream = "http://127.0.0.1:3000"
auth = "none"
passthrough = true
[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "own-tenant"
effect = "allow"
principals = ["*"]
actions = ["seal", "open"]
conditions = { "context.tenant" = "{claim.tenant}" }
[[key_policy.statement]]
sid = "no-interns"
effect = "deny"
principals = ["intern-*"]
actions = ["open"]
"#;

fn cli(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn policy_simulate_answers_what_a_request_would_get() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), POLICY_CONFIG).unwrap();
    let sim = |extra: &[&str]| {
        let mut args = vec!["--config", "p.toml", "policy", "simulate", "--key", "users"];
        args.extend_from_slice(extra);
        cli(dir.path(), &args)
    };
    let (ok, out) = sim(&[
        "--principal",
        "alice",
        "--claim",
        "tenant=acme",
        "--context",
        "tenant=acme",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("allow (statement:own-tenant)"), "{out}");
    let (ok, out) = sim(&[
        "--principal",
        "alice",
        "--claim",
        "tenant=acme",
        "--context",
        "tenant=globex",
    ]);
    assert!(!ok && out.contains("no statement allows it"), "{out}");
    // A grant (from the grants file, as the running proxy reads it) allows what the policy
    // does not.
    let (ok, out) = cli(
        dir.path(),
        &[
            "--config",
            "p.toml",
            "grants",
            "create",
            "--key",
            "users",
            "--grantee",
            "alice",
            "--operations",
            "open",
            "--context-equals",
            "tenant=globex",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = sim(&[
        "--principal",
        "alice",
        "--claim",
        "tenant=acme",
        "--context",
        "tenant=globex",
    ]);
    assert!(ok && out.contains("allow (grant:"), "{out}");
    let (ok, out) = sim(&[
        "--principal",
        "intern-bob",
        "--claim",
        "tenant=acme",
        "--context",
        "tenant=acme",
    ]);
    assert!(!ok && out.contains("statement no-interns denies"), "{out}");
    let (ok, out) = sim(&["--principal", "alice", "--action", "fly"]);
    assert!(!ok && out.contains("is not an action"), "{out}");
}

#[test]
fn check_config_warns_about_unauthenticated_routes_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), POLICY_CONFIG).unwrap();
    let (ok, out) = cli(dir.path(), &["check-config", "p.toml"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: route \"health\" has auth = \"none\"")
            && !out.contains("route \"users\" has auth"),
        "{out}"
    );
}

#[test]
fn routes_must_say_how_clients_authenticate() {
    let text = POLICY_CONFIG.replace("auth = \"none\"\n", "");
    let e = envelope_proxy::config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("route[1] (\"health\").auth: not set"), "{e}");
    // Principal values only where a principal is authenticated.
    let text = POLICY_CONFIG.replace("auth = \"jwt\"", "auth = \"none\"");
    let e = envelope_proxy::config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("claim.tenant is only known on routes with auth = \"jwt\""),
        "{e}"
    );
    let text = POLICY_CONFIG.replace("\"open\"]\n\"#", "\"fly\"]\n\"#");
    let bad = text.replace("actions = [\"open\"]", "actions = [\"fly\"]");
    let e = envelope_proxy::config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("\"fly\" is not one of"), "{e}");
}

#[test]
fn key_policy_statements_can_live_in_a_file_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("users.policy.toml");
    std::fs::write(
        &policy,
        "[[statement]]\nsid = \"from-file\"\neffect = \"allow\"\nprincipals = [\"*\"]\nactions = [\"open\"]\n",
    )
    .unwrap();
    let start = POLICY_CONFIG.find("[[key_policy]]").unwrap();
    let text = format!(
        "{}[[key_policy]]\nkey = \"users\"\nfile = \"{}\"\n",
        &POLICY_CONFIG[..start],
        policy.display()
    );
    let cfg = envelope_proxy::config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.access.key_policies[0].statements[0].sid, "from-file");
    std::fs::write(
        &policy,
        "[[statement]]\neffect = \"maybe\"\nprincipals = [\"*\"]\nactions = [\"open\"]\n",
    )
    .unwrap();
    let e = envelope_proxy::config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"maybe\" is not \"allow\" or \"deny\""), "{e}");
    std::fs::remove_file(&policy).unwrap();
    let e = envelope_proxy::config::parse(&text)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key_policy[0].file"), "{e}");
}
