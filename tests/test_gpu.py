"""GPU-only checks: skipped on CPU machines (CI), run on the GPU device."""

from __future__ import annotations

import pytest
import torch

from .mp_utils import accelerate_launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_one_gpu(tmp_path):
    """The full stack on one GPU in bf16 (auto precision): it trains and the loss falls."""
    ov = {
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "parallelism.tp_size": 1,
        "parallelism.dp_size": 1,
        "train.max_steps": 30,
        "train.warmup_steps": 3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "checkpoint.at_end": True,
        "checkpoint.every_steps": 0,
    }
    proc = accelerate_launch(1, ov)
    assert proc.returncode == 0
    metrics = read_metrics(tmp_path / "tiny-tp2-dp2" / "metrics.jsonl")
    assert "precision=bf16" in proc.stdout
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert (tmp_path / "tiny-tp2-dp2" / "checkpoints" / "step_00000030").is_dir()
