#!/usr/bin/env bash
# Set up every test peer and run the whole suite. CI (.ci/run) calls exactly this.
# Peers: json-server 0.17 (npm, pinned in tests/peers/package-lock.json).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if need apt-get; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@";
    else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; fi
  else
    echo "error: cannot install $* (no apt-get); install it and re-run" >&2; exit 1
  fi
}

need node && need npm || apt_install nodejs npm
need cargo || { echo "error: cargo (Rust toolchain) is required" >&2; exit 1; }

echo "==> test peers: json-server (tests/peers)"
(cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
tests/peers/node_modules/.bin/json-server --version >/dev/null

echo "==> cargo test"
cargo test --all-targets "$@"
