"""The training loop: one `train_loop`, a small `train_step`, and the set-up that feeds them.

Runs inside each worker, under Ray Train or `accelerate launch`. The loss is the mean over every
real token of the global batch (all micro-batches of all DP ranks), so gradient accumulation and
data parallelism give exactly the gradient of one big batch, whatever the padding.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer, LocalCheckpointer, RayCheckpointer, TrainState
from .compat.deepspeed import keep_clipping_grad_norm
from .compat.torch import compiled_graph_counts
from .compat.transformers import without_hf_zero3_init
from .compile_cache import CompileCache
from .config import Config, ConfigError, elastic_worker_counts
from .data import (
    ShardedLoader,
    data_fingerprint,
    elect_cache_builder,
    eval_batches,
    load_or_build_tokenized,
    prepare_dataloader,
)
from .env import apply_worker_env, quiet_libraries
from .export import export_hf
from .metrics import MetricsLog, flat_config, flops_per_token, mfu, peak_bf16_flops, plot_losses, summary_line
from .model import build_model, load_tokenizer, model_config, model_fingerprint, param_groups
from .parallel import (
    Topology,
    build_deepspeed_config,
    check_tp_heads,
    global_batch_size,
    make_deepspeed_plugin,
    resolve_precision,
)
from .parallelize import apply_after_sharding, apply_before_sharding, check_device_support
from .placement import check_tp_node_local, describe_mesh, gather_nodes
from .storage import RunFolderSync, is_remote, staging_dir

__all__ = [
    "Runtime",
    "setup",
    "build_accelerator",
    "build_tokenizer",
    "build_data",
    "build_checkpointer",
    "build_model_and_optimizer",
    "train_step",
    "train_loop",
    "run_worker",
    "lr_lambda",
    "param_groups",
]


def lr_lambda(cfg: Config, total_steps: int):  # -> Callable[[int], float]
    """Linear warmup, then cosine / linear decay to min_lr_ratio (or constant)."""
    tr = cfg.train

    def factor(step: int) -> float:
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        if tr.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - tr.warmup_steps)
        progress = min(1.0, (step - tr.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if tr.lr_schedule == "cosine" else 1 - progress
        return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * shape

    return factor


@dataclass
class Runtime:
    """Everything one worker trains with, built by `setup`."""

    cfg: Config
    topo: Topology
    accelerator: Any
    model: Any  # the DeepSpeed engine
    optimizer: Any
    scheduler: Any
    loader: ShardedLoader
    state: TrainState
    checkpointer: Checkpointer
    total_steps: int
    precision: str
    log: MetricsLog
    eval_data: list[dict[str, torch.Tensor]] | None = None
    tokenizer: Any = None
    mconf: Any = None  # the model's config (shapes for the FLOP count)
    n_params: int = 0  # of the whole (unsharded) model
    peak_flops: float | None = None
    # A remote run folder's mirror (rank 0 of a Ray run on object storage); None: written in place.
    sync: RunFolderSync | None = None
    # torch.compile's artifacts kept with the run (model.compile with model.compile_cache); None: off.
    compile_cache: CompileCache | None = None

    @property
    def metrics_path(self) -> Path | None:
        return self.log.path


def total_steps_for(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, steps_per_epoch * cfg.train.epochs)


def output_dir(cfg: Config, run_uri: str | None) -> Path:
    """Where this run's metrics, trackers, plot and export go: a Ray run's folder beside its
    checkpoints (a local staging folder, mirrored there, when that folder is remote); else
    run.output_dir/run.name."""
    if run_uri is None:
        return Path(cfg.run.output_dir) / cfg.run.name
    return staging_dir(run_uri) if is_remote(run_uri) else Path(run_uri)


# ------------------------------------------------------------------------------------------------
# Set-up, in named stages. `setup` validates what it can before touching the process environment,
# then builds in dependency order: accelerator (process group, DeepSpeed plugin), tokenizer, data,
# checkpointer (which refuses an incompatible checkpoint before the model is built), model and
# optimizer.


def build_accelerator(cfg: Config, run_dir: Path) -> tuple[Any, Topology, str]:
    """Accelerate's Accelerator with our DeepSpeed plugin; the rank's topology and the precision."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, is_tensorboard_available

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.deepspeed.precision, device_type, bf16_ok)
    topo = Topology.from_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
    log_with = cfg.train.log_with
    if log_with is None:
        log_with = ["tensorboard"] if is_tensorboard_available() else []
    accelerator = Accelerator(
        log_with=log_with or None,
        # Trackers write to <project_dir>/<run name>, i.e. into the run's output folder.
        project_dir=str(run_dir.parent),
        deepspeed_plugin=make_deepspeed_plugin(build_deepspeed_config(cfg, topo, precision)),
        mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision],
        # We step the scheduler once per optimizer step ourselves; Accelerate would otherwise step
        # it num_processes times per step.
        step_scheduler_with_optimizer=False,
        # The same count as the DeepSpeed config (Accelerate warns on every rank when they differ).
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if device_type == "cuda" else "gloo")],
    )
    assert accelerator.num_processes == topo.world_size and accelerator.process_index == topo.rank
    if log_with:
        accelerator.init_trackers(cfg.run.name, config=flat_config(cfg))
    return accelerator, topo, precision


def build_tokenizer(cfg: Config, accelerator: Any, topo: Topology) -> tuple[Any, Any]:
    """The tokenizer (built once per node: the local main process first) and the model's config."""
    cache_dir = cfg.data.resolved_cache_dir()
    if accelerator.is_local_main_process:
        tokenizer = load_tokenizer(cfg.model, cache_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        tokenizer = load_tokenizer(cfg.model, cache_dir)
    mconf = model_config(cfg.model, len(tokenizer))
    check_tp_heads(topo.tp_size, mconf.num_attention_heads, getattr(mconf, "num_key_value_heads", None))
    return tokenizer, mconf


def build_data(
    cfg: Config, accelerator: Any, topo: Topology, tokenizer: Any
) -> tuple[ShardedLoader, list[dict[str, torch.Tensor]] | None]:
    """This DP rank's training loader and its share of the held-out batches (None: no eval data)."""
    # One rank per filesystem tokenizes (once per cluster on a shared cache, once per node on local disks).
    builder, barrier = elect_cache_builder(cfg.data.resolved_cache_dir()), accelerator.wait_for_everyone
    dataset = load_or_build_tokenized(cfg.data, tokenizer, builder, barrier)
    loader = prepare_dataloader(
        dataset,
        topo,
        cfg.train.micro_batch_size,
        tokenizer.pad_token_id,
        cfg.data,
        seed=cfg.run.seed,
        pin_memory=accelerator.device.type == "cuda",
        grad_accum_steps=cfg.train.grad_accum_steps,
    )
    eval_ds = load_or_build_tokenized(cfg.data, tokenizer, builder, barrier, "eval")
    eval_data = None
    if eval_ds is not None:
        eval_mb = cfg.train.eval_micro_batch_size or cfg.train.micro_batch_size
        eval_data = eval_batches(eval_ds, topo, eval_mb, tokenizer.pad_token_id, cfg.data)
    return loader, eval_data


def build_checkpointer(
    cfg: Config, accelerator: Any, state: TrainState, under_ray: bool, run_dir: Path
) -> Checkpointer:
    """Ray's checkpointer under Ray Train, numbered local folders under `accelerate launch`."""
    if under_ray:
        return RayCheckpointer(accelerator, state, run_config=cfg.to_dict())
    return LocalCheckpointer(
        accelerator,
        state,
        run_dir / "checkpoints",
        cfg.checkpoint.resume_from,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.allow_external_resume,
        run_config=cfg.to_dict(),
    )


def build_model_and_optimizer(
    cfg: Config, accelerator: Any, topo: Topology, mconf: Any, total_steps: int
) -> tuple[Any, Any, Any, int]:
    """The DeepSpeed engine (AutoTP-sharded, ZeRO-partitioned), its optimizer and LR scheduler, and
    the unsharded model's parameter count."""
    with without_hf_zero3_init():  # whole, then partitioned by prepare(): the same init for every stage
        model = build_model(cfg.model, mconf, cfg.run.seed)
    levers = apply_before_sharding(model, cfg, topo.tp_size)
    n_params = sum(p.numel() for p in model.parameters())
    tr = cfg.train
    optimizer = torch.optim.AdamW(
        param_groups(model, tr.weight_decay),
        lr=tr.learning_rate,
        betas=(tr.adam_beta1, tr.adam_beta2),
        eps=tr.adam_eps,
        fused=tr.fused_optimizer,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    keep_clipping_grad_norm(model)  # ZeRO-0 fp32: DeepSpeed would log no gradient norm
    levers += apply_after_sharding(model.module, cfg)
    if levers and accelerator.is_main_process:
        print(f"[accel-tp] speed levers: {'; '.join(levers)}", flush=True)
    # Built on the prepared optimizer (DeepSpeed's ZeRO optimizer owns the param groups that step)
    # and checkpointed as a registered object: under DeepSpeed, Accelerate neither wraps nor saves
    # a scheduler prepared on its own.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    # from_pretrained leaves the model in eval mode (no dropout, and Liger's fused loss only runs
    # in training mode); train_step must always see training mode.
    model.train()
    return model, optimizer, scheduler, n_params


def setup(cfg: Config, under_ray: bool, run_uri: str | None = None) -> Runtime:
    """Build accelerator, data, checkpointer, model, optimizer and scheduler for this worker.

    `run_uri`: a Ray run's folder (local path or object-store URI) for its metrics and export."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_support(cfg.model, device_type)  # before anything is set or built
    quiet_libraries()
    # Ray workers get these from the runtime env already (launch.run_ray); `accelerate launch`
    # and torchrun workers get them here, before CUDA initialises.
    apply_worker_env(device_type)
    from accelerate.utils import set_seed

    run_dir = output_dir(cfg, run_uri)
    sync = None
    if run_uri is not None and is_remote(run_uri) and int(os.environ.get("RANK", "0")) == 0:
        # Before the trackers open their files: the staging folder starts from the run's metrics.
        sync = RunFolderSync(run_dir, run_uri)
        sync.start()
    accelerator, topo, precision = build_accelerator(cfg, run_dir)
    nodes = gather_nodes()
    check_tp_node_local(topo, nodes)
    if accelerator.is_main_process:
        print(describe_mesh(topo, nodes), flush=True)
    set_seed(cfg.run.seed)
    tokenizer, mconf = build_tokenizer(cfg, accelerator, topo)
    loader, eval_data = build_data(cfg, accelerator, topo, tokenizer)
    total_steps = total_steps_for(cfg, loader.steps_per_epoch)
    state = TrainState(
        global_batch_size=global_batch_size(cfg, topo),
        model=model_fingerprint(mconf),
        layout=f"tp{topo.tp_size}xdp{topo.dp_size}",
        data=data_fingerprint(cfg.data, tokenizer, cfg.run.seed, loader.sampler.num_samples),
        zero_stage=cfg.deepspeed.zero_stage,
    )
    checkpointer = build_checkpointer(cfg, accelerator, state, under_ray, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    # A checkpoint of another model, data or batch fails here, before the model is built; another
    # layout or ZeRO stage is resharded in load().
    checkpointer.precheck()
    model, optimizer, scheduler, n_params = build_model_and_optimizer(
        cfg, accelerator, topo, mconf, total_steps
    )
    accelerator.register_for_checkpointing(state, scheduler)
    compile_cache = None
    if cfg.model.compile and cfg.model.compile_cache:
        # Before the first forward compiles anything.
        compile_cache = CompileCache(run_uri if run_uri is not None else run_dir, topo.rank)
        loaded = compile_cache.load()
        if accelerator.is_main_process:
            print(f"[accel-tp] {loaded}", flush=True)
    return Runtime(
        cfg=cfg,
        topo=topo,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        state=state,
        checkpointer=checkpointer,
        total_steps=total_steps,
        precision=precision,
        log=MetricsLog(metrics_path, accelerator.is_main_process),
        eval_data=eval_data,
        tokenizer=tokenizer,
        mconf=mconf,
        n_params=n_params,
        peak_flops=peak_bf16_flops() if device_type == "cuda" else None,
        sync=sync,
        compile_cache=compile_cache,
    )


def evaluate(rt: Runtime) -> dict[str, float]:
    """Mean loss over every held-out token, each DP shard once (TP peers count once), and perplexity."""
    acc, model = rt.accelerator, rt.model
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for mb in rt.eval_data or []:
            n = float(mb["_label_tokens"])
            if n == 0:
                continue
            batch = {k: v.to(acc.device) for k, v in mb.items() if not k.startswith("_")}
            total += float(model(**batch, use_cache=False).loss) * n
            count += n
    model.train()
    total, count = _all_reduce([total, count], acc.device)  # both counted tp_size times: ratio unchanged
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count / rt.topo.tp_size}


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_step(rt: Runtime, micro_batches: list[dict[str, torch.Tensor]], step: int) -> dict[str, float]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the global-batch stats."""
    acc, model, topo = rt.accelerator, rt.model, rt.topo
    device = acc.device
    ga = len(micro_batches)
    # Every TP peer holds the same batch, so world-wide sums count each DP batch tp_size times.
    local = [
        sum(float(mb[k]) for mb in micro_batches) for k in ("_label_tokens", "_real_tokens", "_attn_context")
    ]
    label_tokens, real_tokens, attn_context = (v / topo.tp_size for v in _all_reduce(local, device))
    # HF's loss is sum(token losses) / num_items_in_batch. DeepSpeed then divides by ga (micro-steps)
    # and averages over the dp ranks, so this divisor makes the gradient exactly that of
    # sum(all token losses of the global batch) / label_tokens.
    items = label_tokens / (topo.dp_size * ga)
    num_items = torch.tensor(items, dtype=torch.float32, device=device)
    # Summed on the device: one host sync per step (at the last micro-batch), not one per micro-batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items() if not k.startswith("_")}
        with acc.accumulate(model):
            out = model(**mb, num_items_in_batch=num_items, use_cache=False)
            loss_sum += out.loss.detach().double() * items
            if i == ga - 1:
                # Check before the last backward, i.e. before the optimizer step touches weights.
                if dist.is_initialized():
                    dist.all_reduce(loss_sum)
                loss = loss_sum.item() / topo.tp_size / label_tokens
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step + 1}: loss is {loss}, not finite; stopping before the optimizer step "
                        "(weights and checkpoints are unchanged). Lower train.learning_rate or check the data."
                    )
            acc.backward(out.loss)
            rt.optimizer.step()
            rt.optimizer.zero_grad()
    rt.scheduler.step()
    norm = model.get_global_grad_norm()  # None where DeepSpeed did not compute one
    grad_norm = float(norm) if norm is not None else float("nan")
    # Under fp16 an overflow is routine (the loss scaler skips the step); under bf16 / fp32 it means
    # the run has diverged, so stop rather than train on.
    if norm is not None and rt.precision != "fp16" and not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"step {step + 1}: gradient norm is {grad_norm}, not finite; stopping (the last checkpoint "
            "precedes this step). Lower train.learning_rate or keep deepspeed.gradient_clipping on."
        )
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens": real_tokens,
        "label_tokens": label_tokens,
        "attn_context": attn_context / max(real_tokens, 1.0),  # mean positions a token attends over
    }


def _micro_batch_groups(stream: Iterator[tuple[int, dict]], ga: int) -> Iterator[tuple[int, list[dict]]]:
    while True:
        group = [next(stream) for _ in range(ga)]
        yield group[-1][0], [b for _, b in group]


def _report(under_ray: bool, metrics: dict[str, Any]) -> None:
    if under_ray:
        import ray.train

        ray.train.report(metrics)


def train_loop(rt: Runtime, under_ray: bool) -> dict[str, Any]:
    """Resume, train to total_steps, log and report each step, checkpoint at the named points."""
    cfg, acc, state = rt.cfg, rt.accelerator, rt.state
    start = rt.checkpointer.load()
    if start:
        # The optimizer must step with the restored schedule's rate, not the fresh one's.
        for group, lr in zip(rt.optimizer.param_groups, rt.scheduler.get_last_lr()):
            group["lr"] = lr
    rt.log.trim(start)
    ga = cfg.train.grad_accum_steps
    gbs = state.global_batch_size
    if acc.is_main_process:
        print(
            f"[accel-tp] world={rt.topo.world_size} tp={rt.topo.tp_size} dp={rt.topo.dp_size} "
            f"precision={rt.precision} zero={cfg.deepspeed.zero_stage} global_batch={gbs} seqs "
            f"(micro {cfg.train.micro_batch_size} x accum {ga} x dp {rt.topo.dp_size}) "
            f"steps={start}->{rt.total_steps} batches/epoch/dp-rank={rt.loader.batches_per_epoch}",
            flush=True,
        )
    bar = None
    if cfg.train.progress_bar and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=rt.total_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
    t_start = time.perf_counter()
    tokens_start = state.tokens
    last_ckpt = None
    groups = _micro_batch_groups(rt.loader.stream(rt.loader.micro_batch_at(state.samples)), ga)
    rt.model.train()
    metrics: dict[str, Any] = {}
    t_last = time.perf_counter()
    graphs_at_first_step: tuple[int, ...] = (0, 0, 0, 0)  # compiled-graph counters (compiled_graph_counts)
    evaluated = False
    for step in range(start, rt.total_steps):
        epoch, micro_batches = next(groups)
        lr = rt.scheduler.get_last_lr()[0]  # the rate this step trains with
        stats = train_step(rt, micro_batches, step)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        state.step = step + 1
        state.samples += gbs
        state.tokens += int(stats["tokens"])
        if step == start:
            graphs_at_first_step = _first_step_done(rt, dt)
        metrics = {
            "step": state.step,
            "epoch": epoch,
            "loss": stats["loss"],
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens_seen": state.tokens,
            "tokens_per_s": stats["tokens"] / dt,
            "tokens_per_s_per_device": stats["tokens"] / dt / rt.topo.world_size,
            "step_time_s": dt,
            "time": time.time(),  # wall clock (Unix seconds): when this step ended
            "global_batch": gbs,
        }
        if rt.peak_flops:
            # Real tokens only: padding does not count as useful work.
            flops = flops_per_token(rt.mconf, rt.n_params, stats["attn_context"])
            metrics["mfu"] = mfu(stats["tokens"] / dt, flops, rt.peak_flops, rt.topo.world_size)
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        acc.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                gnorm=f"{metrics['grad_norm']:.3f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                refresh=False,
            )
        last = state.step == rt.total_steps
        ev = cfg.train.eval_every
        paused = 0.0  # evaluation and checkpoint time: not counted as training time
        if rt.eval_data is not None and (last or (ev and state.step % ev == 0)):
            t_pause = time.perf_counter()
            metrics.update(evaluate(rt))
            if not evaluated:
                _first_eval_done(rt, graphs_at_first_step)
                evaluated = True
            paused += time.perf_counter() - t_pause
        save = (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or (
            last and cfg.checkpoint.at_end
        )
        log = state.step % cfg.train.log_every == 0 or last or "eval_loss" in metrics
        if log or save:
            rt.log.append(metrics)
        if save:
            t_pause = time.perf_counter()
            if rt.sync is not None:
                # Before the checkpoint is reported: a resume from it then finds its metrics row upstream.
                rt.sync.push(force=True)
            last_ckpt = (
                rt.checkpointer.save(state.step, metrics) or f"step_{state.step:08d} (reported to Ray)"
            )
            paused += time.perf_counter() - t_pause
        elif log:
            if rt.sync is not None:
                rt.sync.push()
            _report(under_ray, metrics)
        # Logging and Ray's report count (in the next step's time): a report that waits on Ray's
        # controller slows training, and tokens/s shows it.
        t_last += paused
    if bar is not None:
        bar.close()
    acc.wait_for_everyone()
    exported = None
    if cfg.checkpoint.export_hf:
        # One row of a training batch to check the export against (a whole micro-batch's fp32
        # logits can be tens of GiB with a large vocabulary).
        probe = {k: v[:1] for k, v in next(iter(rt.loader.loader)).items() if not k.startswith("_")}
        exported = export_hf(acc, rt.model, rt.tokenizer, rt.metrics_path.parent / "hf", probe=probe)
    if acc.is_main_process:
        _finish(rt, metrics, time.perf_counter() - t_start, state.tokens - tokens_start, last_ckpt, exported)
    return metrics


def _hits_text(now: tuple[int, ...], before: tuple[int, ...] = (0, 0, 0, 0)) -> str:
    a, b, c, d = (x - y for x, y in zip(now, before))
    return f"compiled graphs taken from the cache: AOTAutograd {a} of {b}, Inductor {c} of {d}"


def _first_step_done(rt: Runtime, seconds: float) -> tuple[int, ...]:
    """After this process's first step: how long the start took (the number a restart costs), and
    the compile artifacts saved for the next start. Returns the graph counters (compiled_graph_counts)."""
    saved = rt.compile_cache.save("train") if rt.compile_cache is not None else None
    counts = compiled_graph_counts() if rt.cfg.model.compile else (0, 0, 0, 0)
    if rt.accelerator.is_main_process:
        import psutil

        since_start = time.time() - psutil.Process().create_time()
        cache = f"; {_hits_text(counts)}" if rt.cfg.model.compile else ""
        if saved:
            cache += f"; compile cache saved ({saved / 2**20:.1f} MiB)"
        print(
            f"[accel-tp] first step of this worker done {since_start:.1f} s after it started "
            f"(the step itself {seconds:.1f} s, compiling included){cache}",
            flush=True,
        )
    return counts


def _first_eval_done(rt: Runtime, before: tuple[int, ...]) -> None:
    """After this process's first evaluation: its graphs' cache hits, and their artifacts saved."""
    if not rt.cfg.model.compile:
        return
    saved = rt.compile_cache.save("eval") if rt.compile_cache is not None else None
    counts = compiled_graph_counts()
    if rt.accelerator.is_main_process:
        note = f"; compile cache saved ({saved / 2**20:.1f} MiB)" if saved else ""
        # Since the first step: the evaluation's graphs, and any training graph compiled in between.
        print(
            f"[accel-tp] first evaluation of this worker done; since the first step {_hits_text(counts, before)}{note}",
            flush=True,
        )


def _finish(
    rt: Runtime,
    metrics: dict[str, Any],
    seconds: float,
    tokens: int,
    checkpoint: str | None,
    export: Path | None,
) -> None:
    """The plot and a one-line summary on rank 0."""
    plot = None
    if rt.metrics_path is not None and rt.metrics_path.exists():
        plot = plot_losses(rt.metrics_path, rt.metrics_path.parent / "loss.png")
    if rt.sync is not None:
        rt.sync.push(force=True)
        plot = plot and rt.sync.remote(plot)
        export = export and rt.sync.remote(export)
    print(summary_line(metrics, seconds, tokens, checkpoint, plot, export), flush=True)


def fit_to_world(cfg: Config, world_size: int) -> Config:
    """An elastic Ray run (ray.min_workers) restarted on fewer workers: same tp_size, dp lowered and
    gradient accumulation raised so that the global batch (micro x accum x dp) is unchanged."""
    par, tr = cfg.parallelism, cfg.train
    if cfg.ray.min_workers is None or par.dp_size is None or world_size == par.tp_size * par.dp_size:
        return cfg
    valid = elastic_worker_counts(par.tp_size, par.dp_size, tr.grad_accum_steps)
    if world_size not in valid:
        raise ConfigError(
            f"ray.min_workers: Ray started {world_size} workers; this run keeps its global batch only on "
            f"{valid} workers."
        )
    dp = world_size // par.tp_size
    accum = tr.grad_accum_steps * par.dp_size // dp
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"[accel-tp] elastic: {world_size} of {par.tp_size * par.dp_size} workers: tp{par.tp_size} x dp{dp}, "
            f"grad_accum_steps {tr.grad_accum_steps} -> {accum} (global batch {tr.micro_batch_size * accum * dp} kept)",
            flush=True,
        )
    return replace(
        cfg,
        parallelism=replace(par, dp_size=dp),
        train=replace(tr, grad_accum_steps=accum),
    )


def run_worker(cfg: Config, under_ray: bool, run_uri: str | None = None) -> dict[str, Any]:
    """Entry point of one worker process."""
    if under_ray:
        cfg = fit_to_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rt = setup(cfg, under_ray, run_uri)
    try:
        metrics = train_loop(rt, under_ray)
    finally:
        rt.accelerator.end_training()
        if rt.sync is not None:
            # What the trackers flushed when they closed, and a failed run's last metrics lines.
            rt.sync.close()
    return metrics
