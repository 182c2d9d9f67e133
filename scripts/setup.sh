#!/usr/bin/env bash
# Installs what tvm-hybrid and its tests need on a fresh Debian/Ubuntu machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Debian packages: a C++ compiler links the artifacts (export_library); a Vulkan loader and
# Mesa's lavapipe (Vulkan on the CPU) run the Vulkan targets' tests without a GPU.
need=()
command -v g++ >/dev/null || need+=(g++)
[ -e /usr/lib/x86_64-linux-gnu/libvulkan.so.1 ] || ldconfig -p | grep -q 'libvulkan\.so\.1' || need+=(libvulkan1)
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages: the tool (pinned TVM and tvm-ffi, see pyproject.toml) and the test extras.
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
