"""Side-by-side training throughput: a reference loop written the tutorial's way against accel-tp.

For each model shape and sequence length, every arm runs in its own process (a fresh CUDA context,
no monkey-patching leaking from one arm into the next), on the same micro-batches from accel-tp's
data pipeline, and reports on rank 0:

- reference: raw `deepspeed.initialize` with torch AdamW, ZeRO-1 and Hugging Face's own loss (the
  tutorial's loop), doing the same optimization as accel-tp: the same samples, LR schedule and
  warm-up, weight-decay groups, clipping, master-weight precision, and for packed rows the same
  per-document attention (position ids). Its per-step losses are compared with the accel arm's:
  more than LOSS_RTOL apart fails the run.
- accel (and any `--variant`): `trainer.setup` + `trainer.train_step`, i.e. Accelerate +
  DeepSpeed exactly as the YAML configures them, with --set overrides per variant.
- tutorial (`--tutorial`): the reference loop at the tutorial's own setting: micro-batch 1, every
  document padded to 512 tokens.

Tokens/s counts real (non-padding) tokens. MFU = tokens/s x FLOPs per token / the GPU's dense bf16
peak, with FLOPs per token as training counts them (accel_tp/metrics.py: 6 x parameters + 12 x
layers x hidden x the mean length a token attends over, its document's under document packing). Timings come after
`--warmup` steps (which absorb compilation and allocator growth), over `--steps` optimizer steps,
from one CUDA synchronisation to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..cli import add_set_argument
from ..config import load_config
from ..env import allocator_env, free_port, process_group_backend, single_process_env, worker_env
from ..metrics import FLOPS_FORMULA, flops_per_token, mfu, peak_bf16_flops
from .common import measurement_overrides

__all__ = ["main", "worker_main", "format_table"]

_RESULT = "BENCH_RESULT "


# ------------------------------------------------------------------------------------------------
# Worker side: one arm, in its own process (or torchrun process group).


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _GpuSampler:
    """Samples the GPU's SM clock, power and temperature once a second while steps are timed
    (nvidia-smi; nothing where there is none), so a slow run can be told from a throttled GPU."""

    _QUERY = "clocks.sm,clocks.max.sm,power.draw,temperature.gpu"

    def __init__(self, device: Any) -> None:
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = visible.split(",")[device.index or 0] if visible else str(device.index or 0)
            self._cmd = ["nvidia-smi", "-i", index, f"--query-gpu={self._QUERY}"]
            self._cmd.append("--format=csv,noheader,nounits")
            self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                out = subprocess.run(self._cmd, capture_output=True, text=True, timeout=5).stdout
                self.samples.append([float(v) for v in out.strip().split(",")])

    def start(self) -> None:
        if self._thread:
            self._thread.start()

    def summary(self) -> dict[str, float] | None:
        self._stop.set()
        if self._thread and self._thread.is_alive():
            self._thread.join()
        if not self.samples:
            return None
        clock, max_clock, power, temp = zip(*self.samples, strict=True)
        return {
            "sm_clock_mhz_mean": sum(clock) / len(clock),
            "sm_clock_mhz_min": min(clock),
            "sm_clock_mhz_max_rated": max(max_clock),
            "power_w_mean": sum(power) / len(power),
            "temperature_c_max": max(temp),
            "samples": len(clock),
        }


def _time_steps(
    step, next_micro_batches, warmup: int, steps: int, device: Any, attends_per_document: bool
) -> dict[str, float]:
    """Run warmup + steps optimizer steps; time the last `steps` between two synchronisations.

    `attends_per_document`: the arm masks attention per packed document (the FLOP count then uses
    each token's document length, as the collate counts it), else over the whole row."""
    import torch

    real = positions = context = 0
    t0 = 0.0
    first_step = None
    t_first = 0.0
    sampler = _GpuSampler(device)
    for i in range(warmup + steps):
        if i == 1 and warmup >= 1:
            # The first step's time (its compilation included): part of the time to a first step.
            _sync(device)
            first_step = time.perf_counter() - t_first
        if i == warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sampler.start()
            t0 = time.perf_counter()
        mbs = next_micro_batches()
        if i >= warmup:
            real += sum(int(mb.real_tokens) for mb in mbs)
            context += sum(
                float(mb.attn_context)
                if attends_per_document
                else float(mb.real_tokens) * mb.inputs["input_ids"].shape[1]
                for mb in mbs
            )
            positions += sum(mb.inputs["input_ids"].numel() for mb in mbs)
        if i == 0:
            t_first = time.perf_counter()
        step(mbs, i)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        # The process's peak resident memory (host; on CPU where the tensors live), its whole life.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "seconds": seconds,
        "real": real,
        "positions": positions,
        "context": context,
        "peak_gib": peak,
        "gpu": sampler.summary(),
        "first_step_s": first_step,
    }


def _global(values: list[float], device: Any, tp_size: int) -> list[float]:
    """Sum per-rank token counts over the world; TP peers hold the same batch, so divide by tp."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return [v / tp_size for v in t.tolist()]


def _reference_arm(
    cfg: Any, warmup: int, steps: int, tutorial: bool = False
) -> tuple[dict[str, float], dict[str, Any]]:
    """The tutorial's loop (raw deepspeed.initialize, torch AdamW, ZeRO-1), doing accel-tp's optimization;
    `tutorial`: also its bf16 master weights."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from ..data import elect_cache_builder, load_or_build_tokenized, prepare_dataloader
    from ..model import load_tokenizer, model_config
    from ..parallel import Topology, resolve_precision
    from ..trainer import lr_lambda, param_groups

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=process_group_backend("cuda" if cuda else "cpu"))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    topo = Topology(world_size=world, tp_size=cfg.parallelism.tp_size, rank=rank)
    precision = resolve_precision(
        cfg.deepspeed.precision, device.type, cuda and torch.cuda.is_bf16_supported()
    )
    # As training does (trainer.build_data): one rank per filesystem builds the caches first.
    barrier = torch.distributed.barrier
    builder = elect_cache_builder(cfg.data.resolved_cache_dir())
    if builder:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    barrier()
    if not builder:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    mconf = model_config(cfg.model, len(tok))
    dataset = load_or_build_tokenized(cfg.data, tok, builder, barrier)
    tr = cfg.train
    loader = prepare_dataloader(
        dataset,
        topo,
        tr.micro_batch_size,
        tok.pad_token_id,
        cfg.data,
        cfg.run.seed,
        pin_memory=cuda,
        grad_accum_steps=tr.grad_accum_steps,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    torch.manual_seed(cfg.run.seed)
    mconf._attn_implementation = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_config(mconf, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    # The same optimization as the accel arm (weight decay on matrices only, the run's LR schedule
    # and warm-up), so the two arms' losses can be compared step by step.
    opt = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, tr.max_steps or warmup + steps))
    # The tutorial's own DeepSpeed dict, on purpose not accel-tp's build_deepspeed_config: this arm
    # measures the loop as the tutorial writes it (the accel arm uses the one builder via setup).
    ds_config: dict[str, Any] = {
        "train_batch_size": tr.micro_batch_size * tr.grad_accum_steps * world,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "tensor_parallel": {"autotp_size": topo.tp_size},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
        # The tutorial keeps bf16 master weights, gradients and optimizer state; the reference arm
        # does so only when the accel arm does (deepspeed.bf16_master_weights), since with fp32
        # masters on one side small updates round away on the other and the two arms would train
        # different models (measured: 4.2 % apart after 9 steps, 1.5B shape, seq 4096). The
        # tutorial arm keeps the tutorial's own setting.
        if cfg.deepspeed.bf16_master_weights or tutorial:
            ds_config["bf16"].update({"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True})
    elif precision == "fp16":
        ds_config["fp16"] = {"enabled": True}
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    engine.train()
    stream = loader.stream()
    step_losses: list[Any] = []

    def next_micro_batches() -> list[Any]:
        return [next(stream)[1] for _ in range(tr.grad_accum_steps)]

    def step(mbs: list[Any], _: int) -> None:
        total = 0.0
        for mb in mbs:
            ids = mb.inputs["input_ids"].to(device, non_blocking=True)
            if "position_ids" in mb.inputs:
                # Packed rows: the same per-document attention (and model function) as the accel
                # arm; attending across documents trains another model (measured 4.3 % apart
                # after 9 steps, 1.5B shape, seq 4096), so the losses could not be compared.
                extra = {"position_ids": mb.inputs["position_ids"].to(device, non_blocking=True)}
            else:
                extra = {"attention_mask": mb.inputs["attention_mask"].to(device, non_blocking=True)}
            out = engine(input_ids=ids, labels=mb.inputs["labels"].to(device), use_cache=False, **extra)
            engine.backward(out.loss)
            engine.step()  # steps the optimizer and the LR scheduler at the accumulation boundary
            total = total + out.loss.detach().float()
        step_losses.append(total / len(mbs))  # read after timing: no host sync in the loop

    packed = cfg.data.packing == "document"
    timing = _time_steps(step, next_micro_batches, warmup, steps, device, attends_per_document=packed)
    timing["losses"] = [float(x) for x in step_losses]
    timing["loss"] = timing["losses"][-1]
    info = {
        "params": n_params,
        "precision": precision,
        "mconf": mconf,
        "peak_flops": peak_bf16_flops() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "topo": topo,
    }
    return timing, info


def _accel_arm(cfg: Any, warmup: int, steps: int) -> tuple[dict[str, float], dict[str, Any]]:
    """accel-tp's full stack: the same setup() and train_step() that training runs."""
    import torch

    from ..trainer import setup, train_step

    t_setup = time.perf_counter()
    rt = setup(cfg)
    setup_s = time.perf_counter() - t_setup
    stream = rt.loader.stream()
    step_losses: list[float] = []

    def next_micro_batches() -> list[Any]:
        return [next(stream)[1] for _ in range(cfg.train.grad_accum_steps)]

    def step(mbs: list[Any], i: int) -> None:
        step_losses.append(train_step(rt, mbs, i)["loss"])

    timing = _time_steps(
        step,
        next_micro_batches,
        warmup,
        steps,
        rt.accelerator.device,
        attends_per_document=cfg.data.packing == "document",
    )
    timing["losses"] = step_losses
    timing["loss"] = step_losses[-1]
    timing["setup_s"] = setup_s
    info = {
        "params": rt.n_params,
        "trained": rt.n_trained,
        "precision": rt.precision,
        "mconf": rt.mconf,
        "peak_flops": rt.peak_flops,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "topo": rt.topo,
        # Ends the process group: only after worker_main's cross-rank sums.
        "cleanup": rt.accelerator.end_training,
    }
    return timing, info


def worker_main(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Run one arm; returns (and rank 0 prints) its result row."""
    import torch
    import torch.distributed as dist

    cfg = load_config(spec["config"], spec["overrides"])
    if spec["kind"] == "reference":
        timing, info = _reference_arm(cfg, spec["warmup"], spec["steps"], tutorial=spec["name"] == "tutorial")
    else:
        timing, info = _accel_arm(cfg, spec["warmup"], spec["steps"])
    topo = info.pop("topo")
    assert topo.world_size == 1 or dist.is_initialized(), "per-rank counts must be summed over the world"
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    # TP and SP peers count the same (whole) batches.
    peers = topo.tp_size * topo.sp_size
    real, positions, context, seconds = _global(
        [timing["real"], timing["positions"], timing["context"], timing["seconds"]], device, peers
    )
    # The same honest count as training: attention over each token's own document when packed.
    # A LoRA arm: 4 FLOPs per frozen parameter per token, 6 per trained one (metrics.flops_per_token).
    fpt = flops_per_token(info["mconf"], info["params"], context / max(real, 1.0), info.get("trained"))
    seconds = seconds * peers / topo.world_size  # mean over ranks (they are in lock step)
    peak = timing["peak_gib"]
    if peak is not None:
        peak = _global([peak], device, 1)[0] / topo.world_size
    peak_rss = _global([timing["peak_rss_gib"]], device, 1)[0] / topo.world_size  # mean per process
    tok_s = real / seconds
    row = {
        "name": spec["name"],
        "kind": spec["kind"],
        "shape": cfg.model.architecture or cfg.model.name_or_path,
        "seq": cfg.data.seq_length,
        "packing": cfg.data.packing,
        "attn_implementation": cfg.model.attn_implementation,
        "padding": cfg.data.padding,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum_steps,
        "tp": topo.tp_size,
        "sp": topo.sp_size,
        "dp": topo.dp_size,
        "zero": cfg.deepspeed.zero_stage if spec["kind"] != "reference" else 1,
        "precision": info["precision"],
        "params": info["params"],
        "trained_params": info.get("trained", info["params"]),
        "steps": spec["steps"],
        "step_ms": 1e3 * seconds / spec["steps"],
        "tokens_per_s": tok_s,
        "tokens_per_s_per_gpu": tok_s / topo.world_size,
        "real_fraction": real / positions,
        "attn_context": context / max(real, 1.0),
        "tflops_per_gpu": tok_s * fpt / topo.world_size / 1e12,
        "mfu": mfu(tok_s, fpt, info["peak_flops"], topo.world_size) if info["peak_flops"] else None,
        "peak_gib": peak,
        "peak_rss_gib": peak_rss,
        "final_loss": timing["loss"],
        "losses": timing["losses"],
        "attention": "per document" if cfg.data.packing == "document" else "whole row",
        "device": info["device"],
        "gpu_state": timing["gpu"],
        "setup_s": timing.get("setup_s"),  # accel arms: trainer.setup (model, data, engine)
        "first_step_s": timing["first_step_s"],  # the first step, compilation included
        "overrides": spec["overrides"],
    }
    if topo.rank == 0:
        print(_RESULT + json.dumps(row), flush=True)
    if "cleanup" in info:
        info["cleanup"]()
    return row


# ------------------------------------------------------------------------------------------------
# Driver side: build the arms, run each in a subprocess, print the table.


def run_arm(spec: dict[str, Any], nproc: int, timeout: float, shared_gpu: bool = False) -> dict[str, Any]:
    """One arm in a fresh process tree; a failure becomes a row with its error, not a crash.
    `shared_gpu`: the `nproc` ranks share the one GPU (accel_tp/tools/shared_gpu.py)."""
    port = free_port()
    env = dict(os.environ)
    # Every arm gets the environment accel-tp gives its own workers (allocator default, or the
    # user's own setting).
    env.update(worker_env(env))
    env.update(spec.get("env", {}))  # a variant's own environment (e.g. a measurement seam)
    payload = ["-m", "accel_tp.tools.bench", "--worker", json.dumps(spec)]
    if shared_gpu:
        from . import shared_gpu as shared

        t0 = time.perf_counter()
        done = shared.run(nproc, [sys.executable, *payload], env, timeout)
        return _arm_row(spec, done.stdout, done.stderr, done.returncode, time.perf_counter() - t0)
    if nproc == 1:
        env.update(single_process_env(port))
        cmd = [sys.executable, *payload]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
            *payload,
        ]
    t0 = time.perf_counter()
    # A session of its own, so a timed-out arm's whole tree (torchrun starts its workers in new
    # sessions and stops them on SIGTERM) can be stopped before the next arm is measured.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        out, err = proc.communicate()
        err += f"\ntimeout {timeout}s"
        rc = -1
    return _arm_row(spec, out, err, rc, time.perf_counter() - t0)


def _arm_row(spec: dict[str, Any], out: str, err: str, rc: int, wall: float) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith(_RESULT):
            row = json.loads(line[len(_RESULT) :])
            row["wall_s"] = wall
            return row
    tail = "\n".join((out + "\n" + err).strip().splitlines()[-25:])
    return {
        "name": spec["name"],
        "kind": spec["kind"],
        "error": f"exit {rc}",
        "log_tail": tail,
        "wall_s": wall,
    }


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    if not name or not sets.strip():
        raise SystemExit(
            f"--variant {text!r}: expected NAME:section.key=value [section.key=value ...] "
            "(env:NAME=VALUE for an environment variable of that arm)"
        )
    return name.strip(), sets.split()


_ENV_PREFIX = "env:"


def _split_env(sets: list[str]) -> tuple[list[str], dict[str, str]]:
    """A variant's `env:NAME=VALUE` items (environment of that arm's process) apart from its
    config overrides."""
    env = {}
    for item in sets:
        if item.startswith(_ENV_PREFIX):
            key, eq, value = item[len(_ENV_PREFIX) :].partition("=")
            if not key or not eq:
                raise SystemExit(f"--variant item {item!r}: expected env:NAME=VALUE")
            env[key] = value
    return [s for s in sets if not s.startswith(_ENV_PREFIX)], env


def build_arms(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """The arm specs, grouped by (shape, seq): reference first, then accel-tp's variants."""
    base_cfg = load_config(args.config, args.overrides)
    base = list(args.overrides)
    tp = base_cfg.parallelism.tp_size
    tps = [int(t) for t in args.tp.split(",")] if args.tp else [tp]
    for t in tps:
        if t < 1 or args.nproc % t:
            raise SystemExit(
                f"--nproc {args.nproc} is not a multiple of the TP size {t} (--tp / parallelism.tp_size)."
            )
    sps = [int(x) for x in args.sp.split(",")] if args.sp else [base_cfg.parallelism.sp_size]
    base += [f"parallelism.dp_size={args.nproc // (tp * base_cfg.parallelism.sp_size)}"]
    base += measurement_overrides(workdir / "runs", args.warmup + args.steps + 1)
    if args.corpus == "wikitext-like":
        from ..corpus import wikitext_like

        path = workdir / "wikitext_like.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in wikitext_like(args.docs)))
        base += ["data.source=files", f"data.files=[{path}]", "data.name=null"]
    variants = ([] if args.no_accel else [("accel", [])]) + [_parse_variant(v) for v in args.variant]
    shapes = args.shapes.split(",") if args.shapes else [None]
    seqs = [int(s) for s in args.seq.split(",")] if args.seq else [None]
    arms = []
    for shape in shapes:
        shape_sets = [f"model.architecture={shape}", "model.name_or_path=null"] if shape else []
        if args.tutorial:
            tut = [
                "data.seq_length=512",
                "data.packing=none",
                "data.padding=max_length",
                "train.micro_batch_size=1",
                "train.grad_accum_steps=1",
                "model.attn_implementation=sdpa",
            ]
            arms.append(_spec("tutorial", "reference", args, base + shape_sets + tut, shape, 512))
        for seq in seqs:
            seq_sets = [f"data.seq_length={seq}"] if seq else []
            cfg = load_config(args.config, base + shape_sets + seq_sets)
            mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
            tokens = _per_shape(args.micro_batch_tokens, shape)
            if tokens:
                mb = max(1, tokens // cfg.data.seq_length)
                seq_sets.append(f"train.micro_batch_size={mb}")
            sets = base + shape_sets + seq_sets
            if not args.no_reference:
                # The tutorial's loop uses Transformers' default attention (SDPA), whatever the YAML
                # gives accel-tp; --reference-set can change it.
                ref_sets = sets + ["model.attn_implementation=sdpa"] + list(args.reference_set)
                ref_tokens = _per_shape(args.reference_micro_batch_tokens, shape)
                if ref_tokens:
                    # The same global batch in smaller micro-batches where the reference (which
                    # materialises the logits) cannot fit accel-tp's.
                    cap = max(1, ref_tokens // cfg.data.seq_length)
                    ref_mb = max(d for d in range(1, mb * ga + 1) if (mb * ga) % d == 0 and d <= cap)
                    ref_sets += [
                        f"train.micro_batch_size={ref_mb}",
                        f"train.grad_accum_steps={mb * ga // ref_mb}",
                    ]
                arms.append(_spec("reference", "reference", args, ref_sets, shape, seq))
            for name, extra in variants:
                extra, env = _split_env(extra)
                # --tp / --sp: one arm per TP x SP size that divides --nproc, the rest of the ranks DP.
                for t, sp in [(t, sp) for t in tps for sp in sps if args.nproc % (t * sp) == 0]:
                    layout = []
                    if args.tp or args.sp:
                        layout = [
                            f"parallelism.tp_size={t}",
                            f"parallelism.sp_size={sp}",
                            f"parallelism.dp_size={args.nproc // (t * sp)}",
                        ]
                    label = name + (f"-tp{t}" if args.tp else "") + (f"-sp{sp}" if args.sp else "")
                    arms.append(_spec(label, "accel", args, sets + layout + extra, shape, seq, env))
    # Fail here, not in a worker, on a bad override.
    train = [(a["name"], load_config(args.config, a["overrides"]).train) for a in arms]
    ref = [t for name, t in train if name == "reference"]
    acc = [t for name, t in train if name == "accel"]
    if (
        ref
        and acc
        and ref[0].micro_batch_size * ref[0].grad_accum_steps
        != acc[0].micro_batch_size * acc[0].grad_accum_steps
    ):
        raise SystemExit(
            "--reference-set: the reference must see the same global batch (micro x accum) as accel."
        )
    return arms


def _per_shape(spec: str | None, shape: str | None) -> int | None:
    """'N' for every shape, or 'shape=N,shape=N' ('*=N' as the fallback)."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    table = dict(item.split("=", 1) for item in spec.split(","))
    value = table.get(shape or "*", table.get("*"))
    return int(value) if value else None


def _spec(
    name: str,
    kind: str,
    args: argparse.Namespace,
    sets: list[str],
    shape,
    seq,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "config": str(args.config),
        "overrides": list(sets),
        "env": dict(env or {}),
        "warmup": args.warmup,
        "steps": args.steps,
        "group": [shape, seq],
    }


# Both arms train the same model from the same init on the same samples with the same schedule, in
# bf16 (8 mantissa bits: 0.4 % per rounding); the reference averages per micro-batch means, accel
# the global token mean (equal for full packed rows). Per-step losses further apart than this are
# a different optimization, not noise, and fail the run.
LOSS_RTOL = 0.01


def compare_losses(rows: list[dict[str, Any]]) -> list[str]:
    """Per-step losses of each accel-tp arm against the reference arm, and of each other variant
    against the accel arm, of its shape, sequence length and global batch: records the worst
    relative difference (`loss_rdiff_vs_reference`, `loss_rdiff_vs_accel`), returns the failures."""
    failures = []
    for row in rows:
        if "error" in row or row["kind"] == "reference":
            continue
        against = ["reference"] + (["accel"] if row["name"] != "accel" else [])
        for base_name in against:
            base = next(
                (
                    r
                    for r in rows
                    if "error" not in r
                    and r["name"] == base_name
                    and (r["shape"], r["seq"]) == (row["shape"], row["seq"])
                    and _global_batch(r) == _global_batch(row)
                ),
                None,
            )
            if base is None:
                continue
            diffs = [abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"])]
            row[f"loss_rdiff_vs_{base_name}"] = max(diffs)
            if max(diffs) > LOSS_RTOL:
                failures.append(
                    f"{row['name']} {row['shape']} seq {row['seq']}: losses differ from the {base_name} "
                    f"arm's by {max(diffs):.2%} (bound {LOSS_RTOL:.0%}):\n  {row['name']}: "
                    + " ".join(f"{x:.4f}" for x in row["losses"])
                    + f"\n  {base_name}: "
                    + " ".join(f"{x:.4f}" for x in base["losses"])
                )
    return failures


def format_losses(rows: list[dict[str, Any]]) -> str:
    """Every arm's per-step losses, grouped by shape, sequence length and global batch, side by side."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["shape"], r["seq"], _global_batch(r)), []).append(r)
    lines = []
    for (shape, seq, gb), members in groups.items():
        lines.append(f"losses per step, {shape} seq {seq}, global batch {gb}:")
        width = max(len(r["name"]) for r in members)
        lines += [f"  {r['name']:<{width}} " + " ".join(f"{x:.4f}" for x in r["losses"]) for r in members]
    return "\n".join(lines)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x reference: against the reference arm of the same shape and sequence; x tutorial:
    against the tutorial-setting arm of the same shape (real tokens/s both)."""
    for row in rows:
        if "error" in row:
            continue
        same = [r for r in rows if "error" not in r and r.get("shape") == row["shape"]]
        ref = next((r for r in same if r["name"] == "reference" and r["seq"] == row["seq"]), None)
        tut = next((r for r in same if r["name"] == "tutorial"), None)
        # Only against a reference with the same global batch (sequences per optimizer step).
        same_batch = ref is not None and _global_batch(ref) == _global_batch(row)
        row["x_reference"] = row["tokens_per_s"] / ref["tokens_per_s"] if same_batch else None
        row["x_tutorial"] = row["tokens_per_s"] / tut["tokens_per_s"] if tut else None


def _global_batch(row: dict[str, Any]) -> int:
    return row["micro_batch"] * row["grad_accum"] * row["dp"]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| shape | seq | arm | mb x ga | attention | real tokens/s | real % | step ms | MFU | peak GiB "
        "| final loss | x reference | x tutorial |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| | | {r['name']} | | | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['seq']} | {r['name']} | {r['micro_batch']} x {r['grad_accum']} "
            f"| {r['attention']} | {r['tokens_per_s']:,.0f} | {100 * r['real_fraction']:.1f} | {r['step_ms']:.1f} "
            f"| {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
            f"| {_fmt(r['peak_gib'], '.1f')} | {r['final_loss']:.4f} | {_fmt(r.get('x_reference'), '.2f')} "
            f"| {_fmt(r.get('x_tutorial'), '.1f')} |"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "accelerate", "transformers", "liger-kernel"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reference loop vs accel-tp, side by side (tokens/s, MFU, memory)."
    )
    p.add_argument(
        "--config", required=True, help="run YAML for the accel arm (and shared data/train settings)"
    )
    add_set_argument(p)
    p.add_argument(
        "--shapes", default=None, help="comma list of model.architecture shapes (default: the YAML's)"
    )
    p.add_argument("--seq", default=None, help="comma list of sequence lengths (default: the YAML's)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V [K=V ...]",
        help="another accel-tp arm with these overrides, e.g. 'liger:model.liger_kernel=true'",
    )
    p.add_argument("--tutorial", action="store_true", help="add the tutorial's setting (mb 1, padded to 512)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument(
        "--reference-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override for the reference arm only, e.g. train.micro_batch_size=8 with "
        "train.grad_accum_steps=2 where the reference cannot fit accel-tp's micro-batch (keep mb x ga equal)",
    )
    p.add_argument(
        "--micro-batch-tokens",
        default=None,
        metavar="N | SHAPE=N,...",
        help="micro-batch size = N // seq for each sequence length (per shape: qwen2.5-0.5b=49152,*=16384)",
    )
    p.add_argument(
        "--reference-micro-batch-tokens",
        default=None,
        metavar="N | SHAPE=N,...",
        help="cap the reference's micro-batch at N tokens, keeping the global batch by accumulation",
    )
    p.add_argument("--no-accel", action="store_true", help="only the --variant arms, not the YAML as it is")
    p.add_argument("--corpus", choices=["config", "wikitext-like"], default="config")
    p.add_argument("--docs", type=int, default=20000, help="documents in the wikitext-like mix")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per arm")
    p.add_argument(
        "--tp",
        default=None,
        help="comma list of TP sizes: each accel arm once per size, DP = --nproc / TP (e.g. 1,2,4)",
    )
    p.add_argument(
        "--sp",
        default=None,
        help="comma list of sequence-parallel sizes: each accel arm once per (TP, SP) that divides "
        "--nproc, DP = --nproc / (TP x SP) (e.g. 1,2,4)",
    )
    p.add_argument(
        "--shared-gpu",
        action="store_true",
        help="the --nproc processes share one GPU (staged gloo transport: memory per process is "
        "meaningful, throughput is not)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per arm")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every arm)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="accel_tp_bench_"))
    arms = build_arms(args, workdir)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "versions": _versions(),
        "flops_per_token": FLOPS_FORMULA,
        "allocator": allocator_env(os.environ),  # what every arm runs with
        "rows": [],
    }
    for i, spec in enumerate(arms):
        print(f"[bench] {i + 1}/{len(arms)} {spec['name']} {spec['group']} ...", flush=True)
        row = run_arm(spec, args.nproc, args.timeout, args.shared_gpu)
        report["rows"].append(row)
        add_ratios(report["rows"])
        if "error" in row:
            print(f"[bench]   failed ({row['error']}):\n{row['log_tail']}", flush=True)
        else:
            gpu = row.get("gpu_state")
            clock = f", SM {gpu['sm_clock_mhz_mean']:.0f} MHz, {gpu['power_w_mean']:.0f} W" if gpu else ""
            print(
                f"[bench]   {row['tokens_per_s']:,.0f} real tokens/s, {row['step_ms']:.1f} ms/step{clock}",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    failures = compare_losses(report["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(format_table(report["rows"]))
    print(format_losses(report["rows"]))
    for line in failures:
        print(f"[bench] FAILED: {line}", flush=True)
    print("JSON " + json.dumps(report))
    return 0 if not failures and all("error" not in r for r in report["rows"]) else 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
