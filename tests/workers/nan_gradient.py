"""torchrun worker: a non-finite gradient under bf16 stops training at that step.

accel-tp turns off DeepSpeed's per-tensor bf16 overflow scan (one host round trip and ~6 kernels
per parameter every step); the trainer's own guard must still stop the run. Rank 0 writes a report.
"""

import json
import sys

import torch

from accel_tp.config import load_config
from accel_tp.trainer import setup, train_step


def main() -> None:
    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    rt = setup(cfg)
    stream = rt.loader.stream()
    ga = cfg.train.grad_accum_steps
    norms = [train_step(rt, [next(stream)[1] for _ in range(ga)], s)["grad_norm"] for s in range(2)]
    # A NaN in one weight's gradient, on every rank, with a finite loss.
    weight = rt.model.module.model.layers[0].mlp.down_proj.weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    error = None
    try:
        train_step(rt, [next(stream)[1] for _ in range(ga)], 2)
    except FloatingPointError as e:
        error = str(e)
    if rt.accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump({"norms": norms, "error": error, "bf16": rt.model.config.get("bf16")}, f)
    rt.accelerator.end_training()


if __name__ == "__main__":
    main()
