"""Tensor-parallel communication: what AutoTP sends per step, and what the interconnect delivers.

`tp_traffic` counts the collectives DeepSpeed's AutoTP training layers issue for one micro-batch
(deepspeed/module_inject/layers.py):

- row-parallel `LinearAllreduce` (o_proj, down_proj): an all-reduce of the (tokens x hidden)
  output in the forward pass;
- column-parallel `LinearLayer` (q, k, v, gate, up; and lm_head): an all-reduce of the
  (tokens x hidden) input gradient in the backward pass (`ColumnParallel`);
- lm_head with `gather_output` (parallelism.vocab_parallel_loss: false): an all-gather of the
  (tokens x vocab) logits in the forward pass; with the vocabulary-parallel loss instead its fp32
  input gradient once and two small statistics per chunk of tokens, and a tied embedding's output.

`measure` times all-reduce and all-gather inside the TP groups at several sizes and reports
nccl-tests' bus bandwidth (all-reduce: size/time x 2(n-1)/n; all-gather: size/time x (n-1)/n), so
the TP time per step can be predicted as traffic / bus bandwidth and set against the step time.

python scripts/comm_bench.py --config accelerate_configs/tp2_dp2.yaml --nproc 4 [--set ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..cli import add_set_argument
from ..config import load_config
from ..env import free_port
from ..families import vocabulary_split
from ..model import load_tokenizer, model_config
from ..vocab_parallel import DEFAULT_CHUNK_TOKENS

__all__ = ["TPTraffic", "tp_traffic", "measure", "main"]

_RESULT = "COMM_RESULT "


@dataclass(frozen=True)
class TPTraffic:
    """TP collectives of one micro-batch on one rank (sizes are the full, unsharded tensors).
    `all_reduce_*`: activation-sized all-reduces; `loss_*`: the vocabulary-parallel loss's small
    per-chunk statistics (max, sum-exp and target logit: 12 bytes a token, fp32)."""

    all_reduce_calls: int
    all_reduce_bytes: int
    all_gather_calls: int
    all_gather_bytes: int
    loss_all_reduce_calls: int = 0
    loss_all_reduce_bytes: int = 0


def tp_traffic(
    tokens: int,
    hidden: int,
    vocab: int,
    layers: int,
    dtype_bytes: int,
    lm_head_sharded: bool = True,
    column_linears_per_layer: int = 5,
    row_linears_per_layer: int = 2,
    vocab_parallel: bool = False,
    tied: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TPTraffic:
    """Collectives of one forward + backward through an AutoTP-sharded decoder (tp > 1).

    A gathered head (`vocab_parallel` false): its logits all-gathered, its input gradient
    all-reduced. A vocabulary-parallel head (parallelism.vocab_parallel_loss): no all-gather; the
    loss all-reduces its fp32 input gradient once and two statistics per chunk of tokens, and a tied,
    vocab-split embedding all-reduces its output in the forward (accel_tp/vocab_parallel.py)."""
    act = tokens * hidden * dtype_bytes
    layer_reduces = (row_linears_per_layer + column_linears_per_layer) * layers
    if vocab_parallel:
        chunks = -(-tokens // chunk_tokens)
        embed = 1 if tied else 0
        return TPTraffic(
            all_reduce_calls=layer_reduces + embed + 1,
            all_reduce_bytes=(layer_reduces + embed) * act + tokens * hidden * 4,
            all_gather_calls=0,
            all_gather_bytes=0,
            loss_all_reduce_calls=2 * chunks,
            loss_all_reduce_bytes=12 * tokens,
        )
    reduces = layer_reduces + (1 if lm_head_sharded else 0)
    gathers = 1 if lm_head_sharded else 0
    return TPTraffic(
        all_reduce_calls=reduces,
        all_reduce_bytes=reduces * act,
        all_gather_calls=gathers,
        all_gather_bytes=gathers * tokens * vocab * dtype_bytes,
    )


def _time_collective(op: str, nbytes: int, group: Any, device: Any, iters: int) -> float:
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    numel = max(n, nbytes // 2) // n * n  # bf16 elements, divisible by the group size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    full = torch.ones(numel, dtype=dtype, device=device)
    part = torch.ones(numel // n, dtype=dtype, device=device)

    def run() -> None:
        if op == "all_reduce":
            dist.all_reduce(full, group=group)
        else:
            dist.all_gather_into_tensor(full, part, group=group)

    run()  # warm-up: connection set-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def measure(tp_size: int, sizes_mb: list[float], iters: int) -> list[dict[str, float]]:
    """Bus bandwidth of all-reduce and all-gather within this rank's TP group (call on every rank)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(s, s + tp_size))) for s in range(0, world, tp_size)]
    group = groups[rank // tp_size]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    n = tp_size
    rows = []
    for mb in sizes_mb:
        nbytes = int(mb * 2**20)
        for op, factor in (("all_reduce", 2 * (n - 1) / n), ("all_gather", (n - 1) / n)):
            seconds = _time_collective(op, nbytes, group, device, iters)
            t = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            seconds = float(t)
            rows.append(
                {
                    "op": op,
                    "size_mb": mb,
                    "ms": 1e3 * seconds,
                    "algbw_gbs": nbytes / seconds / 1e9,
                    "busbw_gbs": nbytes / seconds / 1e9 * factor,
                }
            )
    return rows


def _bus_bw(rows: list[dict[str, float]], op: str, nbytes: float) -> float:
    """Bus bandwidth measured at the size closest to nbytes (log scale)."""
    import math

    cands = [r for r in rows if r["op"] == op]
    best = min(cands, key=lambda r: abs(math.log(r["size_mb"] * 2**20) - math.log(max(nbytes, 1))))
    return best["busbw_gbs"]


def predict_ms(traffic: TPTraffic, rows: list[dict[str, float]], tp_size: int) -> float:
    """TP communication time of one micro-batch at the measured bus bandwidths."""
    n = tp_size
    ms = 0.0
    if traffic.all_reduce_calls:
        size = traffic.all_reduce_bytes / traffic.all_reduce_calls
        ms += 1e3 * traffic.all_reduce_bytes * 2 * (n - 1) / n / (_bus_bw(rows, "all_reduce", size) * 1e9)
    if traffic.all_gather_calls:
        size = traffic.all_gather_bytes / traffic.all_gather_calls
        ms += 1e3 * traffic.all_gather_bytes * (n - 1) / n / (_bus_bw(rows, "all_gather", size) * 1e9)
    if traffic.loss_all_reduce_calls:  # small: latency-bound, priced at the smallest size measured
        size = traffic.loss_all_reduce_bytes / traffic.loss_all_reduce_calls
        ms += (
            1e3 * traffic.loss_all_reduce_bytes * 2 * (n - 1) / n / (_bus_bw(rows, "all_reduce", size) * 1e9)
        )
    return ms


def worker_main(args: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    cfg = load_config(args["config"], args["overrides"])
    tp = cfg.parallelism.tp_size
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() % tp:
        raise SystemExit(f"parallelism.tp_size {tp} does not divide the {dist.get_world_size()} processes")
    rows = measure(tp, args["sizes_mb"], args["iters"])
    # The vocab (the logits' width) can grow to fit the tokenizer; rank 0 builds its cache first.
    if dist.get_rank() == 0:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    dist.barrier()
    if dist.get_rank() != 0:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    mconf = model_config(cfg.model, len(tok))
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    dtype_bytes = 2 if cuda else 4
    traffic = tp_traffic(
        tokens,
        mconf.hidden_size,
        mconf.vocab_size,
        mconf.num_hidden_layers,
        dtype_bytes,
        vocab_parallel=vocabulary_split(cfg)[0],
        tied=bool(getattr(mconf, "tie_word_embeddings", False)),
    )
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (gloo)",
        "world": dist.get_world_size(),
        "tp_size": tp,
        "bandwidth": rows,
        "micro_batch_tokens": tokens,
        "traffic_per_micro_batch": asdict(traffic),
        "predicted_tp_ms_per_micro_batch": predict_ms(traffic, rows, tp) if tp > 1 else 0.0,
        "predicted_tp_ms_per_step": (predict_ms(traffic, rows, tp) if tp > 1 else 0.0)
        * cfg.train.grad_accum_steps,
    }
    if dist.get_rank() == 0:
        print(_RESULT + json.dumps(report), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="TP collectives per step and measured bus bandwidth.")
    p.add_argument("--config", required=True)
    add_set_argument(p)
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) to measure with")
    p.add_argument("--sizes-mb", default="1,16,64,256", help="message sizes for the bandwidth sweep")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    load_config(a.config, a.overrides)  # fail here on a bad YAML, not in the workers
    spec = {
        "config": a.config,
        "overrides": a.overrides,
        "sizes_mb": [float(x) for x in a.sizes_mb.split(",")],
        "iters": a.iters,
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}",
        f"--master_port={free_port()}", "-m", "accel_tp.tools.commbench", "--worker", json.dumps(spec),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(_RESULT)), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(line[len(_RESULT) :])
    print("| op | size MiB | ms | bus GB/s |\n|---|---|---|---|")
    for r in report["bandwidth"]:
        print(f"| {r['op']} | {r['size_mb']:g} | {r['ms']:.3f} | {r['busbw_gbs']:.2f} |")
    t = report["traffic_per_micro_batch"]
    print(
        f"TP traffic per micro-batch ({report['micro_batch_tokens']} tokens, tp {report['tp_size']}): "
        f"{t['all_reduce_calls']} all-reduces, {t['all_reduce_bytes'] / 2**30:.2f} GiB; "
        f"{t['all_gather_calls']} all-gather (logits), {t['all_gather_bytes'] / 2**30:.2f} GiB; "
        f"{t['loss_all_reduce_calls']} loss statistics all-reduces; predicted "
        f"{report['predicted_tp_ms_per_micro_batch']:.1f} ms per micro-batch"
    )
    print("JSON " + json.dumps(report))
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
