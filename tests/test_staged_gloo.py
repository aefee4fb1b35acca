"""The staged gloo backend (accel_tp/staged_gloo.py) and the shared-GPU launcher
(accel_tp/tools/shared_gpu.py), on CPU: what lets tp 2 run on one GPU (tests/test_gpu_tp.py).

Every collective DeepSpeed, AutoTP and Accelerate use gives, through the staged backend, exactly
what plain gloo gives on the same inputs (both sum on the host), on CPU tensors here and on
cuda:0 on a GPU machine; and a tp 2 x dp 2 ZeRO-3 training run launched as 4 ranks with
LOCAL_RANK 0 over the staged backend has the per-step losses of the same run under accelerate
launch with gloo, to the bit.
"""

from __future__ import annotations

import json
import sys

import pytest

from accel_tp.env import PROCESS_GROUP_ENV, process_group_backend
from accel_tp.run_folder import METRICS_FILE
from accel_tp.tools import shared_gpu

from .mp_utils import ROOT, TINY, _env, accelerate_launch, read_metrics, set_args, torchrun


def test_backend_choice():
    assert process_group_backend("cpu", {}) == "gloo"
    assert process_group_backend("cuda", {}) == "nccl"
    assert process_group_backend("cuda", {PROCESS_GROUP_ENV: "staged_gloo"}) == "staged_gloo"
    with pytest.raises(ValueError, match="the only choice is 'staged_gloo'"):
        process_group_backend("cuda", {PROCESS_GROUP_ENV: "mpi"})


def test_every_collective_equals_gloo(tmp_path):
    out = tmp_path / "ops.json"
    proc = torchrun(2, ROOT / "tests" / "workers" / "staged_gloo_ops.py", [str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in json.loads(out.read_text()):
        assert rank["backend"] == "staged_gloo"
        diffs = rank["max_abs_diff"]
        assert len(diffs) == 15 * len(rank["devices"])
        assert all(d == 0.0 for d in diffs.values()), diffs
        assert rank["sub_group"] == ["staged_gloo", [2.0, 2.0]]


@pytest.mark.slow
def test_tp2_dp2_zero3_run_through_the_shared_launcher_equals_gloo(tmp_path):
    ov = {
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "train.max_steps": 6,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "train.progress_bar": False,
        "deepspeed.zero_stage": 3,
        "deepspeed.precision": "fp32",
        "checkpoint.at_end": False,
        "checkpoint.export_hf": False,
    }
    plain = accelerate_launch(4, {**ov, "run.name": "gloo"})  # also builds the caches
    assert plain.returncode == 0
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY)]
    staged = shared_gpu.run(4, cmd + set_args({**ov, "run.name": "staged"}), _env(), 600, str(ROOT))
    assert staged.returncode == 0, (staged.stdout + staged.stderr)[-4000:]
    assert "mesh: tp2 x dp2" in staged.stdout and "vocabulary-parallel loss" in staged.stdout
    losses = {n: [m["loss"] for m in read_metrics(tmp_path / n / METRICS_FILE)] for n in ("gloo", "staged")}
    assert len(losses["gloo"]) == 6 and losses["staged"] == losses["gloo"]
