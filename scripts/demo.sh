#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, compile the bundled PP-OCR classifier
# for this machine, run it, and check it against onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec tvm-hybrid demo "$@"
