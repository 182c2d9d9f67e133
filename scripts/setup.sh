#!/usr/bin/env bash
# Installs what tvm-hybrid and its tests need on a fresh Debian/Ubuntu machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Debian packages: a C++ compiler links the artifacts (export_library); for the arm64 targets, the
# aarch64 cross compiler, and qemu-user to run their artifacts here (TVM_HYBRID_SETUP_ARM=0 skips).
ARM=${TVM_HYBRID_SETUP_ARM:-1}
need=()
command -v g++ >/dev/null || need+=(g++)
if [ "$ARM" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages: the tool (pinned TVM and tvm-ffi, see pyproject.toml) and the test extras.
$PY -m pip install -q --disable-pip-version-check -e ".[test]"

# The aarch64 sysroot `tvm-hybrid run --emulate` runs arm64 artifacts in (Debian arm64 python3.11
# + the pinned wheels, ~/.cache/tvm-hybrid/aarch64-sysroot); returns at once when it is ready.
if [ "$ARM" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  $PY -m tvm_hybrid.emulate setup >/dev/null
fi
