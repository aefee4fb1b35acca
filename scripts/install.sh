#!/usr/bin/env bash
# Creates .venv (if missing) and installs accel-tp with its dependencies.
# torch goes first: DeepSpeed's build imports it. TORCH_SPEC picks the build (default torch==2.13.0;
# e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" for a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's output less two known notices: index locations this machine lacks, and setuptools' note
# that an editable install reads the package from the working tree (it is meant to).
pip() {
  .venv/bin/python -m pip "$@" --disable-pip-version-check 2>&1 | grep -v "^WARNING: Location" |
    awk '/BuildBackendWarning: Editable installation/{skip=1} !skip{print} /WheelFile\(wheel_path/{skip=0}' || true
}
pip install -q --upgrade pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q ${TORCH_SPEC:-torch==2.13.0}
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} .venv/bin/python -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation "deepspeed>=0.19.4"
pip install -q -e ".[dev]"
# DeepSpeed JIT-compiles its CPU shared-memory collective op on first use; build it once here, so
# concurrent process groups (tests, exports) only load it and never race on the build lock.
# Into the folder training processes load it from (accel_tp.env.extensions_dir: this venv's own).
TORCH_EXTENSIONS_DIR=$(.venv/bin/python -c "import os; from accel_tp.env import extensions_dir; print(extensions_dir(os.environ))") \
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
  >/dev/null 2>&1 || true
# (DeepSpeed only picks its accelerator here; training processes choose their own.)
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} .venv/bin/python -c "import torch, deepspeed, accelerate, ray, transformers, datasets, accel_tp" \
  && echo "accel-tp installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
