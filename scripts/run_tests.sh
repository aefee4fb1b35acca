#!/usr/bin/env bash
# Install, lint, then run the test suite (unit + multi-process gloo tests; GPU tests skip on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check accel_tp scripts tests
.venv/bin/ruff format --check accel_tp scripts tests
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
