"""scripts/profile_step.py: the idle-gap analysis on a hand-built trace (unit), and a CPU smoke run
of the real profiler on accel-tp's step (nothing about timings is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from accel_tp.tools.profile import idle_gaps

from .mp_utils import ROOT, TINY


def _ev(cat: str, name: str, ts: float, dur: float, tid: int | str = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_idle_gaps_attributed_to_the_training_thread(tmp_path):
    """Two 1 ms steps: in each the GPU waits 100 us for a batch at the start and 150 us inside
    DeepSpeed's step; another thread's short calls inside those gaps (the innermost frames, were
    threads mixed) must not take the blame."""
    pin = "/v/site-packages/torch/utils/data/_utils/pin_memory.py(26): do_one_step"
    events = []
    for t in (0.0, 1000.0):
        events += [
            _ev("python_function", pin, t, 2, 2),
            _ev("python_function", pin, t + 700, 2, 2),
            _ev("python_function", "/repo/accel_tp/trainer.py(327): train_step", t, 1000),
            _ev("python_function", "/repo/accel_tp/data.py(331): stream", t, 100),
            _ev(
                "python_function",
                "/venv/site-packages/deepspeed/runtime/zero/stage_1_and_2.py(3013): step",
                t + 700,
                150,
            ),
            _ev("kernel", "gemm", t + 100, 400, "stream 7"),
            _ev("kernel", "gemm", t + 450, 250, "stream 7"),  # overlaps the previous one
            _ev("kernel", "adam", t + 850, 150, "stream 7"),
        ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    rep = idle_gaps(path, min_gap_us=50)
    assert rep["steps"] == 2
    assert rep["wall_ms_per_step"] == pytest.approx(1.0)
    assert rep["gpu_busy_ms_per_step"] == pytest.approx(0.75)
    assert rep["idle_ms_per_step"] == pytest.approx(0.25)
    assert rep["idle_by_frame_ms_per_step"] == pytest.approx(
        {"accel_tp/data.py(331): stream": 0.1, "deepspeed/runtime/zero/stage_1_and_2.py(3013): step": 0.15}
    )
    assert rep["largest_gaps"][0]["ms"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="no train_step"):
        path.write_text(json.dumps({"traceEvents": events[:1]}))
        idle_gaps(path)


def test_profile_step_smoke_on_cpu(tmp_path):
    trace = tmp_path / "step.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--config", str(TINY),
        "--set", "parallelism.tp_size=1", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "data.seq_length=64", "--warmup", "1", "--steps", "2", "--trace", str(trace),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 steps:" in proc.stdout
    if not torch.cuda.is_available():
        assert "GPU busy 0.0 ms/step" in proc.stdout and "no GPU kernels in the trace" in proc.stdout
    assert trace.exists() and idle_gaps(trace)["steps"] == 2
