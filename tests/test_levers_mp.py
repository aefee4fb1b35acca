"""Speed levers under tensor parallelism on CPU (gloo, real DeepSpeed): compiled decoder layers
must train exactly like eager ones. Same tolerance and reference as tests/test_multiprocess.py."""

from __future__ import annotations

import pytest

from accel_tp.config import load_config

from .mp_utils import TINY, accelerate_launch, read_metrics
from .reference import reference_losses
from .test_multiprocess import GLOBAL_BATCH, assert_close, base_overrides, layout

pytestmark = pytest.mark.slow


def test_compiled_layers_match_the_reference_under_tp(tmp_path):
    """model.compile with tp=2: the compiled graphs include AutoTP's sharded linears and their
    all-reduce; the losses must equal the single-process eager reference (rtol 2e-6)."""
    cache = tmp_path / "cache"
    ov = {**base_overrides(cache, tmp_path / "runs"), **layout(2, 1), "model.compile": True}
    ov.update({"run.name": "compiled", "checkpoint.export_hf": False, "checkpoint.every_steps": 0})
    proc = accelerate_launch(2, ov)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[accel-tp] speed levers: compiled 4 decoder layers" in proc.stdout  # engaged, not just configured
    got = [m["loss"] for m in read_metrics(tmp_path / "runs" / "compiled" / "metrics.jsonl")]
    ref_ov = {**base_overrides(cache, tmp_path / "ref"), **layout(1, 1)}
    want = reference_losses(load_config(TINY, [f"{k}={v}" for k, v in ref_ov.items()]), GLOBAL_BATCH)[0]
    assert_close(got, want)
