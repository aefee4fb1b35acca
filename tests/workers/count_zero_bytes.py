"""Count the bytes one rank holds for the model's parameters, the optimizer (fp32 master
partitions and Adam moments) and the gradients after accel-tp's setup and one training step, for the ZeRO stage the
config says; rank 0 writes the per-rank table as JSON. Run under torchrun (gloo, CPU).

python -m torch.distributed.run --nproc_per_node 4 tests/workers/count_zero_bytes.py CONFIG OUT [--set ...]

With `--zero-stages 1,2,3` (before CONFIG) the stages are counted one after another in the same
processes (one launch instead of three; between them Accelerate's process-wide state is cleared
as in tests/workers/train_families.py, the process group is kept), and OUT holds {stage: table}.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from accel_tp.config import load_config
from accel_tp.trainer import setup, train_step


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gradient_bytes(rt, batch) -> int:
    """Bytes of gradient this rank holds after one micro-batch's backward: the parameters' own
    .grad and, ZeRO-1/2, the partitions DeepSpeed reduced them into (averaged_gradients) or its
    contiguous reduce buffers; then the gradients are dropped again."""
    inputs = batch.to(rt.accelerator.device).inputs
    out = rt.model(**inputs, use_cache=False)
    rt.model.backward(out.loss)
    total = sum(nbytes(p.grad) for p in rt.model.module.parameters() if p.grad is not None)
    zero = rt.optimizer.optimizer
    for parts in (getattr(zero, "averaged_gradients", None) or {}).values():
        total += sum(nbytes(t) for t in parts or [] if t is not None)
    for buf in getattr(zero, "ipg_buffer", None) or []:
        total += nbytes(buf)
    rt.model.zero_grad()
    rt.optimizer.zero_grad()
    return total


def count(cfg, last: bool) -> dict | None:
    """One stage: set up, one step, the per-rank table (rank 0; None elsewhere)."""
    rt = setup(cfg)
    stream = rt.loader.stream()
    grads = gradient_bytes(rt, next(stream)[1])
    train_step(rt, [next(stream)[1] for _ in range(cfg.train.grad_accum_steps)], 0)
    # Parameters: the local storage of each module parameter (ZeRO-3 keeps its partition in
    # ds_tensor and leaves the parameter itself empty outside a forward).
    params = sum(
        nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p.data)
        for p in rt.model.module.parameters()
    )
    zero = rt.optimizer.optimizer  # DeepSpeed's ZeRO optimizer (Accelerate's wrapper holds it)
    # fp32 master partitions: stage 1/2 keep one flat partition per group, stage 3 one per sub-group.
    flat = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    master = sum(nbytes(t) for t in flat)
    state = zero.optimizer.state  # the torch AdamW that steps those partitions
    moments = sum(nbytes(v) for s in state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    row = torch.tensor([params, master, moments, grads], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    report = None
    if dist.get_rank() == 0:
        report = {
            "zero_stage": cfg.deepspeed.zero_stage,
            "tp": rt.topo.tp_size,
            "dp": rt.topo.dp_size,
            "n_params": rt.n_params,
            "ranks": [
                dict(zip(("params", "master", "moments", "grads"), map(int, r.tolist()))) for r in rows
            ],
        }
    if last:
        rt.accelerator.end_training()  # destroys the process group: only after the last stage
    else:
        from accelerate.state import AcceleratorState, GradientState

        dist.barrier()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return report


def main() -> None:
    args = sys.argv[1:]
    stages = None
    if args[0] == "--zero-stages":
        stages = [int(s) for s in args[1].split(",")]
        args = args[2:]
    cfg_path, out, *sets = args
    sets = [s for s in sets if s != "--set"]
    if stages is None:
        report = count(load_config(cfg_path, sets), last=True)
    else:
        report = {
            str(z): count(
                load_config(cfg_path, [*sets, f"deepspeed.zero_stage={z}"]), last=i == len(stages) - 1
            )
            for i, z in enumerate(stages)
        }
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
