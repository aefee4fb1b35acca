#!/usr/bin/env bash
# Install, then train the embedded default through Ray: tiny model, tp=2 x dp=2, no network, CPU or GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/train_ray.py --config accelerate_configs/tiny_tp2_dp2.yaml "$@"
