#!/usr/bin/env bash
# Set up every test peer and run the whole suite. CI (.ci/run) calls exactly this.
# Peers (all on loopback, started by the tests themselves):
#   json-server 0.17   npm, pinned in tests/peers/package-lock.json
#   moto server        pip, pinned in tests/peers/requirements.txt (virtualenv tests/peers/venv)
#   SoftHSM2           Debian package softhsm2 (scripts/softhsm-setup.sh)
#   rclone, s3cmd      Debian packages: real S3 clients driven through the gateway
#   s3s-fs 0.14.1      crates.io (cargo install into tests/peers/cargo): a second S3 upstream
#   podman, mmdebstrap Debian packages: the image test (tests/packaging.rs) builds the
#                      Containerfile on a Debian base it makes itself (cached in podman's store)
#   kubernetes-validate pip (tests/peers/requirements.txt), with kubectl (expected on the
#                      machine): the manifest tests (tests/deploy.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if ! need apt-get; then
    echo "error: cannot install $* (no apt-get); install it and re-run" >&2; exit 1
  fi
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need cargo || { echo "error: cargo (Rust toolchain) is required" >&2; exit 1; }
missing=()
{ need node && need npm; } || missing+=(nodejs npm)
need python3 || missing+=(python3 python3-venv)
need rclone || missing+=(rclone)
need s3cmd || missing+=(s3cmd)
need podman || missing+=(podman)
need mmdebstrap || missing+=(mmdebstrap)
need objcopy || missing+=(binutils)
need openssl || missing+=(openssl)          # tests/lifecycle.rs wraps BYOK key material with it
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

echo "==> test peers: json-server (tests/peers)"
(cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
tests/peers/node_modules/.bin/json-server --version >/dev/null

echo "==> test peers: moto server (tests/peers/venv)"
if [ ! -x tests/peers/venv/bin/python ]; then
  python3 -m venv tests/peers/venv 2>/dev/null || { apt_install python3-venv; python3 -m venv tests/peers/venv; }
fi
tests/peers/venv/bin/pip install -q --disable-pip-version-check -r tests/peers/requirements.txt
tests/peers/venv/bin/moto_server --help >/dev/null

echo "==> test peers: s3s-fs"
if [ "$(tests/peers/cargo/bin/s3s-fs --version 2>/dev/null)" != "s3s-fs 0.14.1" ]; then
  cargo install -q --locked --root tests/peers/cargo s3s-fs --version 0.14.1 --features binary
fi

need kubectl || { echo "error: kubectl is required (tests/deploy.rs renders deploy/ with kubectl kustomize)" >&2; exit 1; }

if [ -f scripts/softhsm-setup.sh ]; then
  echo "==> test peers: SoftHSM2"
  bash scripts/softhsm-setup.sh
fi

echo "==> cargo fmt --check, cargo clippy"
cargo fmt --all -- --check
cargo clippy -q --all-targets -- -D warnings

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary, the last of which
# may be a target without tests).
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
