#!/usr/bin/env bash
# Install SoftHSM2 (the software PKCS#11 token tests/pkcs11.rs runs against) when it is missing,
# and print the path of its PKCS#11 module.
#
#   scripts/softhsm-setup.sh            # install if needed; last line of stdout = module path
#
# tests/pkcs11.rs finds the module at the usual places (or at $SOFTHSM2_MODULE) and runs
# `softhsm2-util` from $PATH. Tokens live in per-test temp directories (SOFTHSM2_CONF is set per
# child process by the tests), so nothing is written to /var/lib/softhsm.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }

find_module() {
  if [ -n "${SOFTHSM2_MODULE:-}" ] && [ -f "$SOFTHSM2_MODULE" ]; then
    echo "$SOFTHSM2_MODULE"; return 0
  fi
  local p
  for p in /usr/lib/softhsm/libsofthsm2.so \
           /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/local/lib/softhsm/libsofthsm2.so \
           /usr/lib64/pkcs11/libsofthsm2.so \
           /usr/lib/pkcs11/libsofthsm2.so \
           /opt/homebrew/lib/softhsm/libsofthsm2.so \
           /usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so; do
    if [ -f "$p" ]; then echo "$p"; return 0; fi
  done
  if need dpkg; then
    # Debian/Ubuntu ship the module in libsofthsm2 (a dependency of softhsm2).
    p="$(dpkg -L libsofthsm2 softhsm2 2>/dev/null | grep -m1 '/libsofthsm2\.so$' || true)"
    if [ -n "$p" ] && [ -f "$p" ]; then echo "$p"; return 0; fi
  fi
  return 1
}

install_softhsm() {
  if need apt-get; then
    echo "==> installing softhsm2 (apt-get)" >&2
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
    else
      sudo apt-get update -qq >&2
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
    fi
  elif need brew; then
    echo "==> installing softhsm (brew)" >&2
    brew install softhsm >&2
  else
    echo "error: SoftHSM2 is missing and there is no apt-get or brew to install it;" \
         "install SoftHSM2 (softhsm2-util and libsofthsm2.so) and re-run" >&2
    exit 1
  fi
}

if ! need softhsm2-util || ! find_module >/dev/null; then
  install_softhsm
fi

need softhsm2-util || { echo "error: softhsm2-util is still not on PATH after installing" >&2; exit 1; }
module="$(find_module)" || {
  echo "error: libsofthsm2.so not found after installing; set SOFTHSM2_MODULE to its path" >&2
  exit 1
}
echo "softhsm2-util: $(command -v softhsm2-util) ($(softhsm2-util --version 2>/dev/null || echo '?'))" >&2
echo "$module"
