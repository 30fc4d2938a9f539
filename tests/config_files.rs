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
