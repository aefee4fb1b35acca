"""torchrun worker for tests/test_staged_gloo.py: every collective DeepSpeed and AutoTP use, run
through accel_tp/staged_gloo.py and through plain gloo on the same inputs, on CPU (and on the one
GPU, when there is one, with every rank on cuda:0). Rank 0 writes a JSON report of each op's
largest difference (exact: the two compute the same sums on the host)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from accel_tp import staged_gloo


def _ops(group, device: str, world: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    out: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        t = rand(5, 3, dtype=dtype)
        dist.all_reduce(t, group=group)
        out[f"all_reduce_sum_{name}"] = t
        t = rand(4, dtype=dtype)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        out[f"all_reduce_max_{name}"] = t
        whole = torch.empty(world * 6, 2, dtype=dtype, device=device)
        dist.all_gather_into_tensor(whole, rand(6, 2, dtype=dtype), group=group)
        out[f"all_gather_into_tensor_{name}"] = whole
        part = torch.empty(3, 2, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(part, rand(world * 3, 2, dtype=dtype), group=group)
        out[f"reduce_scatter_tensor_{name}"] = part
    parts = [torch.empty(2, 2, device=device) for _ in range(world)]
    dist.all_gather(parts, rand(2, 2), group=group)
    out["all_gather"] = torch.stack(parts)
    t = rand(7)
    dist.broadcast(t, src=1, group=group)
    out["broadcast"] = t
    t = rand(3)
    work = dist.all_reduce(t, group=group, async_op=True)
    work.wait()
    out["all_reduce_async"] = t
    a2a = torch.empty(world * 2, device=device)
    dist.all_to_all_single(a2a, rand(world * 2), group=group)
    out["all_to_all_single"] = a2a
    lists = [torch.empty(2, device=device) for _ in range(world)]
    inputs = [rand(2) for _ in range(world)]
    if group is None:
        dist.all_to_all(lists, inputs, group=group)
    else:  # plain gloo: older torch has no list all-to-all for it
        flat = torch.empty(2 * world, device=device)
        dist.all_to_all_single(flat, torch.cat(inputs), group=group)
        lists = list(flat.chunk(world))
    out["all_to_all"] = torch.stack(lists)
    rs = torch.empty(2, 2, device=device)
    dist.reduce_scatter(rs, [rand(2, 2) for _ in range(world)], group=group)
    out["reduce_scatter"] = rs
    objs = [None] * world
    dist.all_gather_object(objs, {"rank": rank}, group=group)
    out["all_gather_object"] = torch.tensor([o["rank"] for o in objs])
    dist.barrier(group=group)
    return {k: v.float().cpu() for k, v in out.items()}


def main(out: str) -> None:
    dist.init_process_group(staged_gloo.NAME)
    rank, world = dist.get_rank(), dist.get_world_size()
    plain = dist.new_group(backend="gloo")
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    report = {"backend": dist.get_backend(), "devices": devices, "max_abs_diff": {}}
    for device in devices:
        ours = _ops(None, device, world, rank)
        ref = _ops(plain, "cpu", world, rank)
        for k in ref:
            report["max_abs_diff"][f"{device}/{k}"] = float((ours[k] - ref[k]).abs().max())
    # A sub-group (DeepSpeed's TP and DP groups are new_group()s of the default backend).
    sub = dist.new_group([0, 1])
    t = torch.ones(2)
    if rank in (0, 1):
        dist.all_reduce(t, group=sub)
    report["sub_group"] = [dist.get_backend(sub) if rank in (0, 1) else None, t.tolist()]
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
