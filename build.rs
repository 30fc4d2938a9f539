//! Records the git revision for `envelope-proxy --version` as ENVELOPE_PROXY_GIT_REV.
//!
//! Order: the ENVELOPE_PROXY_GIT_REV environment variable (image builds: the build context has
//! no .git; pass `--build-arg ENVELOPE_PROXY_GIT_REV=$(git rev-parse --short=12 HEAD)`), then
//! `git rev-parse` (12 hex digits, "-dirty" never: the tree is not looked at), then "unknown".
//! The script reruns only when HEAD moves (the HEAD file, the branch's ref file, packed-refs),
//! not on every source change.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ENVELOPE_PROXY_GIT_REV");
    let from_env = std::env::var("ENVELOPE_PROXY_GIT_REV")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s != "unknown");
    let rev = match from_env {
        Some(rev) => rev,
        None => {
            // Watch what moves when a commit is made or checked out: HEAD, the branch's ref,
            // packed-refs (paths from git itself: worktrees keep HEAD apart from the refs).
            let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
            if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch.push(head);
            }
            for name in watch {
                if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                    let path = PathBuf::from(path);
                    // A missing file would make cargo rerun the script on every build.
                    if path.exists() {
                        println!("cargo:rerun-if-changed={}", path.display());
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=ENVELOPE_PROXY_GIT_REV={rev}");
}
