"""Where a training step's time goes: a torch.profiler trace of accel-tp's own step, and the GPU's
idle gaps attributed to what the host was doing when each began.

A step can only be as fast as the GPU is kept busy. The trace (Python stacks on) shows each gap
between GPU kernels; the innermost accel-tp / DeepSpeed / Accelerate / Transformers / data-loading
frame on the training thread at that moment says who kept the GPU waiting.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..cli import add_set_argument
from ..config import load_config
from ..env import apply_worker_env, free_port, single_process_env
from .common import measurement_overrides

__all__ = ["idle_gaps", "profile_steps", "main"]

_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_OWNERS = (
    "accel_tp",
    "deepspeed",
    "accelerate",
    "transformers",
    "torch/utils/data",
    "liger_kernel",
    "torch/nn/attention",
    "torch/optim",
)


def idle_gaps(trace_path: str | Path, min_gap_us: float = 200.0, top: int = 12) -> dict[str, Any]:
    """GPU busy time and idle gaps between the first and last `train_step` of a chrome trace."""
    path = str(trace_path)
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted(
        (e for e in events if e.get("cat") == "python_function" and e["name"].endswith(": train_step")),
        key=lambda e: e["ts"],
    )
    if not steps:
        raise ValueError(f"{path}: no train_step in the trace (was it recorded with with_stack=True?)")
    t0, t1, tid = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"], steps[0]["tid"]
    frames = [e for e in events if e.get("cat") == "python_function" and e["tid"] == tid]
    busy_spans: list[list[float]] = []
    for e in sorted((e for e in events if e.get("cat") in _GPU_CATEGORIES), key=lambda e: e["ts"]):
        a, b = max(e["ts"], t0), min(e["ts"] + e["dur"], t1)
        if b <= a:
            continue
        if busy_spans and a <= busy_spans[-1][1]:
            busy_spans[-1][1] = max(busy_spans[-1][1], b)
        else:
            busy_spans.append([a, b])
    gaps, prev = [], t0
    for a, b in busy_spans + [[t1, t1]]:
        if a - prev >= min_gap_us:
            gaps.append((a - prev, prev))
        prev = max(prev, b)

    def short(name: str) -> str:
        # "/…/site-packages/deepspeed/x.py(12): f" or "/repo/accel_tp/y.py(3): g" -> from the package on
        return name[min(i for i in (name.find(k) for k in _OWNERS) if i >= 0) :]

    def owners(t: float) -> list[str]:
        around = sorted((e for e in frames if e["ts"] <= t <= e["ts"] + e["dur"]), key=lambda e: e["dur"])
        return [short(e["name"]) for e in around if any(k in e["name"] for k in _OWNERS)]

    n = len(steps)
    wall = t1 - t0
    busy = sum(b - a for a, b in busy_spans)
    by_frame: dict[str, float] = defaultdict(float)
    largest = []
    for gap, start in sorted(gaps, reverse=True):
        stack = owners(start + 1)
        by_frame[stack[0] if stack else "(no owner frame)"] += gap / 1e3 / n
        if len(largest) < top:
            largest.append({"ms": gap / 1e3, "at_ms": (start - t0) / 1e3, "frames": stack[:3]})
    return {
        "steps": n,
        "wall_ms_per_step": wall / 1e3 / n,
        "gpu_busy_ms_per_step": busy / 1e3 / n,
        "gpu_busy_fraction": busy / wall if wall else 0.0,
        "idle_ms_per_step": sum(g for g, _ in gaps) / 1e3 / n,
        "idle_by_frame_ms_per_step": dict(sorted(by_frame.items(), key=lambda kv: -kv[1])[:top]),
        "largest_gaps": largest,
    }


def format_report(rep: dict[str, Any]) -> str:
    lines = [
        f"{rep['steps']} steps: {rep['wall_ms_per_step']:.1f} ms/step, GPU busy "
        f"{rep['gpu_busy_ms_per_step']:.1f} ms/step ({100 * rep['gpu_busy_fraction']:.0f}%), "
        f"idle gaps {rep['idle_ms_per_step']:.1f} ms/step",
        "GPU idle by the innermost frame on the training thread (ms/step):",
    ]
    if rep["gpu_busy_ms_per_step"] == 0:
        lines[1] = "no GPU kernels in the trace (a CPU run): the gap analysis needs a GPU"
        return "\n".join(lines)
    lines += [f"  {ms:8.2f}  {frame}" for frame, ms in rep["idle_by_frame_ms_per_step"].items()]
    lines.append("largest gaps:")
    lines += [
        f"  {g['ms']:8.2f} ms at +{g['at_ms']:.1f} ms: " + " <- ".join(g["frames"])
        for g in rep["largest_gaps"]
    ]
    return "\n".join(lines)


def profile_steps(cfg: Any, warmup: int, steps: int, trace_path: Path) -> dict[str, Any]:
    """Run `warmup` steps, then trace `steps` optimizer steps of accel-tp's own train_step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..trainer import setup, train_step

    rt = setup(cfg)
    stream = rt.loader.stream()
    ga = cfg.train.grad_accum_steps

    def micro_batches() -> list[dict]:
        return [next(stream)[1] for _ in range(ga)]

    for i in range(warmup):
        train_step(rt, micro_batches(), i)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, with_stack=True) as prof:
        for i in range(steps):
            train_step(rt, micro_batches(), warmup + i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)
    rt.accelerator.end_training()
    return {"report": idle_gaps(trace_path), "top_ops": table}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run YAML (one process: tp 1 x dp 1)")
    add_set_argument(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps to trace")
    p.add_argument("--trace", default="step_trace.json", help="chrome trace output (open in Perfetto)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_worker_env()  # the allocator setting training and the bench use
    # One process, its own rendezvous (unless launched under torchrun).
    for key, value in single_process_env(free_port()).items():
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="accel_tp_profile_") as workdir:
        overrides = [*args.overrides, "parallelism.dp_size=1"]
        overrides += measurement_overrides(Path(workdir) / "runs", args.warmup + args.steps + 1)
        cfg = load_config(args.config, overrides)
        if cfg.parallelism.tp_size != 1:
            raise SystemExit(
                "profile_step runs one process: set parallelism.tp_size=1 (--set parallelism.tp_size=1)."
            )
        out = profile_steps(cfg, args.warmup, args.steps, Path(args.trace))
    print(out["top_ops"])
    print(format_report(out["report"]))
    print(f"trace: {args.trace}")
    return 0
