"""Train several models one after another in one `accelerate launch` job (tests/test_families.py).

Each run goes through the product as scripts/train.py does (launch.preflight, trainer.setup,
trainer.train_loop); between runs Accelerate's process-wide state is cleared (the process
group is kept, the trackers are off), so the next run builds its own accelerator and engine. Besides the run's own
outputs (metrics.jsonl, the HF export), rank 0 writes `<run dir>/shards.json`: for every linear
layer, the class AutoTP put there and the weight shape this rank holds, so the test can check the
partition is the one it claims to be (and not, say, everything left whole).

argv: the base YAML, then a JSON file holding a list of runs, each {"set": [`--set` strings],
"expect_error": bool} and optionally "config" (another base YAML for that run). A run expected to fail (it must be the last: every rank fails at the same
point, before any other collective) has its error written to `<run dir>/error.txt` instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from accel_tp.config import load_config
from accel_tp.launch import preflight
from accel_tp.trainer import setup, train_loop


def shards(module: torch.nn.Module) -> dict[str, list]:
    out = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            out[name] = [type(child).__name__, list(weight.shape)]
    return out


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState

    base, runs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for i, job in enumerate(runs):
        assert not job["expect_error"] or i == len(runs) - 1, "a run expected to fail must be the last"
        cfg = load_config(job.get("config", base), job["set"])
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        preflight(cfg, world)
        rt = setup(cfg)
        report = shards(rt.model.module)
        if rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "shards.json").write_text(json.dumps(report))
        try:
            train_loop(rt)
        except Exception as e:
            if not job["expect_error"]:
                raise
            if rank0:
                (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}")
        finally:
            # end_training destroys the process group, and a second init_process_group from the
            # same launch hangs on its store: only the last run ends it (trackers are off).
            if i == len(runs) - 1:
                rt.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


if __name__ == "__main__":
    main()
