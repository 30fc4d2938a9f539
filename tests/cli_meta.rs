//! The packager-facing commands: `--version` with the git revision, `completions`, `man`.

use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(args)
        // None of these read a config; a missing one must not matter.
        .env("ENVELOPE_PROXY_CONFIG", "/nonexistent/envelope-proxy.toml")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn version_names_the_git_revision() {
    let v = stdout(&proxy(&["--version"]));
    let expected = match Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        _ => "unknown".to_string(),
    };
    // ENVELOPE_PROXY_GIT_REV at build time wins over git (image builds).
    let expected = std::env::var("ENVELOPE_PROXY_GIT_REV")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or(expected);
    assert_eq!(
        v.trim(),
        format!(
            "envelope-proxy {} (rev {expected})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn completions_cover_every_command() {
    let bash = stdout(&proxy(&["completions", "bash"]));
    assert!(bash.contains("complete -F _envelope__proxy"), "{bash}");
    for cmd in [
        "serve",
        "check-config",
        "keys",
        "audit-verify",
        "completions",
        "man",
    ] {
        assert!(bash.contains(cmd), "bash completion lacks {cmd}");
    }
    let zsh = stdout(&proxy(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef envelope-proxy"), "{zsh}");
    let fish = stdout(&proxy(&["completions", "fish"]));
    assert!(fish.contains("complete -c envelope-proxy"), "{fish}");
    // An unknown shell is refused with the list.
    let out = Command::new(env!("CARGO_BIN_EXE_envelope-proxy"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}

#[test]
fn man_pages_render() {
    let page = stdout(&proxy(&["man"]));
    assert!(page.contains(".TH envelope-proxy 1"), "{page}");
    assert!(page.contains("check\\-config"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    proxy(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    for name in [
        "envelope-proxy.1",
        "envelope-proxy-serve.1",
        "envelope-proxy-keys-create.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name}");
    }
}
