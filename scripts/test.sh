#!/usr/bin/env bash
# Install, then run the whole test suite (no GPU needed; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec python3 -m pytest -q -ra --durations=15 "$@"
