"""The training loop: one `train_loop`, a small `train_step`, and the set-up that feeds them.

Runs inside each worker, under Ray Train or `accelerate launch` (accel_tp/modes.py says which
parts differ). The loss is the mean over every real token of the global batch (all micro-batches of
all DP ranks), so gradient accumulation and data parallelism give exactly the gradient of one big
batch, whatever the padding. The loop asks its components when to act: the validator when to
evaluate, the checkpointer when to save, the reporter what to log where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer, TrainState
from .compat.deepspeed import keep_clipping_grad_norm, universal_info_without_frozen
from .compat.transformers import output_recorders_keyed_by_name, without_hf_zero3_init
from .compile_cache import CompileCache, CompileWatch
from .config import Config
from .data import (
    Batch,
    ShardedLoader,
    data_fingerprint,
    elect_cache_builder,
    eval_batches,
    load_or_build_tokenized,
    prepare_dataloader,
)
from .env import apply_worker_env, process_group_backend, quiet_libraries
from .errors import Stopped
from .evaluation import Validator, all_reduce_floats
from .experts import expert_layers
from .export import AdapterExport, export_hf
from .families import check_expert_parallel
from .lora import apply_lora, base_digest, describe, hidden_from_autotp, resolve_adapter, trainable_count
from .metrics import flat_config, flops_per_token, peak_bf16_flops
from .model import build_model, load_tokenizer, model_config, model_fingerprint, param_groups
from .modes import LocalMode, WorkerMode
from .parallel import (
    Topology,
    build_deepspeed_config,
    check_sp_heads,
    check_tp_heads,
    global_batch_size,
    make_deepspeed_plugin,
    resolve_precision,
)
from .parallelize import apply_after_sharding, apply_before_sharding, check_device_support
from .placement import check_tp_node_local, describe_mesh, gather_nodes
from .reporting import Reporter
from .run_folder import RunFolder
from .sequence_parallel import SequenceParallel
from .stopping import StopRequest

__all__ = [
    "Runtime",
    "setup",
    "build_accelerator",
    "build_tokenizer",
    "build_data",
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
    reporter: Reporter
    validator: Validator
    compile_watch: CompileWatch
    folder: RunFolder
    total_steps: int
    precision: str
    tokenizer: Any = None
    mconf: Any = None  # the model's config (shapes for the FLOP count)
    n_params: int = 0  # of the whole (unsharded) model
    n_trained: int = 0  # of them, those that train (a LoRA run: the adapters)
    peak_flops: float | None = None
    sp: SequenceParallel | None = None  # sp_size > 1: this rank's SP group
    stop: StopRequest | None = None  # SIGTERM: stop at the next step boundary, after saving

    def on_device(self, batch: Batch) -> contextlib.AbstractContextManager[Batch]:
        """`batch` as this rank runs it, for a forward and its backward: on the device, and under
        sequence parallelism this rank's slice of every row."""
        return batch_on_device(batch, self.accelerator.device, self.sp)


@contextlib.contextmanager
def batch_on_device(batch: Batch, device: Any, sp: SequenceParallel | None) -> Iterator[Batch]:
    if sp is None:
        yield batch.to(device, non_blocking=True)
        return
    with sp.split(batch, device) as part:
        yield part


def build_sequence_parallel(topo: Topology) -> SequenceParallel | None:
    """This rank's SP group (None at sp_size 1); every rank creates every group."""
    if topo.sp_size == 1:
        return None
    groups = [topo.sp_group_ranks(d, t) for d in range(topo.dp_size) for t in range(topo.tp_size)]
    return SequenceParallel.build(groups, topo.rank)


def total_steps_for(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, steps_per_epoch * cfg.train.epochs)


# ------------------------------------------------------------------------------------------------
# Set-up, in named stages. `setup` validates what it can before touching the process environment,
# then builds in dependency order: accelerator (process group, DeepSpeed plugin), tokenizer, data,
# checkpointer (which refuses an incompatible checkpoint before the model is built), model and
# optimizer.


def build_accelerator(cfg: Config, folder: RunFolder) -> tuple[Any, Topology, str]:
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
        project_dir=str(folder.local.parent),
        deepspeed_plugin=make_deepspeed_plugin(build_deepspeed_config(cfg, topo, precision)),
        mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision],
        # We step the scheduler once per optimizer step ourselves; Accelerate would otherwise step
        # it num_processes times per step.
        step_scheduler_with_optimizer=False,
        # The same count as the DeepSpeed config (Accelerate warns on every rank when they differ).
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(backend=process_group_backend(device_type))],
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
    kv = getattr(mconf, "num_key_value_heads", None)
    check_tp_heads(topo.tp_size, mconf.num_attention_heads, kv)
    check_sp_heads(topo.tp_size, topo.sp_size, mconf.num_attention_heads, kv)
    check_expert_parallel(mconf, topo.ep_size, topo.tp_size, cfg.deepspeed.zero_stage)
    return tokenizer, mconf


def build_data(
    cfg: Config, accelerator: Any, topo: Topology, tokenizer: Any
) -> tuple[ShardedLoader, list[Batch] | None]:
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


def build_model_and_optimizer(
    cfg: Config,
    accelerator: Any,
    topo: Topology,
    mconf: Any,
    total_steps: int,
    sp: SequenceParallel | None = None,
) -> tuple[Any, Any, Any, int, int, str]:
    """The DeepSpeed engine (AutoTP-sharded, ZeRO-partitioned), its optimizer and LR scheduler, the
    unsharded model's parameter count, how many of them train (all but a LoRA run's base) and a
    LoRA run's base digest ("" otherwise)."""
    with without_hf_zero3_init():  # whole, then partitioned by prepare(): the same init for every stage
        model = build_model(cfg.model, mconf, cfg.run.seed)
    base = base_digest(model) if cfg.lora.enabled else ""
    adapters = apply_lora(model, cfg.lora, cfg.run.seed) if cfg.lora.enabled else None
    levers = apply_before_sharding(model, cfg, topo.tp_size)
    n_trained, n_params = trainable_count(model)
    # The routed experts' weights of the whole model (Hugging Face names them <moe block>.experts).
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    tr = cfg.train
    if cfg.parallelism.ep_size > 1:
        # DeepSpeed builds an EP run's AdamW after AutoEP (parallel.build_deepspeed_config says why).
        from accelerate.utils import DummyOptim

        optimizer = DummyOptim(
            param_groups(model, tr.weight_decay), lr=tr.learning_rate, weight_decay=tr.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            param_groups(model, tr.weight_decay),
            lr=tr.learning_rate,
            betas=(tr.adam_beta1, tr.adam_beta2),
            eps=tr.adam_eps,
            fused=tr.fused_optimizer,
        )
    # AutoTP splits PEFT's adapters with their layers (accel_tp/lora.py); AutoEP reads Transformers'
    # output-capture registry (compat.transformers.output_recorders_keyed_by_name).
    with (
        hidden_from_autotp(model) if adapters else contextlib.nullcontext(),
        output_recorders_keyed_by_name() if cfg.parallelism.ep_size > 1 else contextlib.nullcontext(),
    ):
        model, optimizer = accelerator.prepare(model, optimizer)
    keep_clipping_grad_norm(model)  # ZeRO-0 fp32: DeepSpeed would log no gradient norm
    if adapters:
        universal_info_without_frozen(model.module)  # the checkpoint holds no frozen weights
    levers += apply_after_sharding(model.module, cfg, sp)
    local_experts = [
        getattr(p, "ds_numel", p.numel())
        for m in expert_layers(model.module).values()
        for p in m.experts.parameters()
    ]
    if local_experts and accelerator.is_main_process:
        print(f"[accel-tp] expert parameters per rank: {sum(local_experts)} of {expert_numel}", flush=True)
    if accelerator.is_main_process:
        if adapters:
            print(f"[accel-tp] {adapters}", flush=True)
        if levers:
            print(f"[accel-tp] speed levers: {'; '.join(levers)}", flush=True)
    # Built on the prepared optimizer (DeepSpeed's ZeRO optimizer owns the param groups that step)
    # and checkpointed as a registered object: under DeepSpeed, Accelerate neither wraps nor saves
    # a scheduler prepared on its own.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    # from_pretrained leaves the model in eval mode (no dropout, and Liger's fused loss only runs
    # in training mode); train_step must always see training mode.
    model.train()
    return model, optimizer, scheduler, n_params, n_trained, base


def setup(cfg: Config, mode: WorkerMode | None = None) -> Runtime:
    """Build accelerator, data, checkpointer, model, optimizer, scheduler and reporter for this
    worker. `mode`: how it was started (default: `accelerate launch` / torchrun, LocalMode)."""
    mode = mode or LocalMode(cfg)
    cfg = dataclasses.replace(cfg, lora=resolve_adapter(cfg.lora))  # lora.adapter's config fills the section
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_support(cfg.model, device_type)  # before anything is set or built
    quiet_libraries()
    # Ray workers get these from the runtime env already (launch.run_ray); `accelerate launch`
    # and torchrun workers get them here, before CUDA initialises.
    apply_worker_env(device_type)
    from accelerate.utils import set_seed

    folder = mode.folder
    if int(os.environ.get("RANK", "0")) == 0:
        folder.start()  # before the trackers open their files
    accelerator, topo, precision = build_accelerator(cfg, folder)
    nodes = gather_nodes()
    check_tp_node_local(topo, nodes)
    if accelerator.is_main_process:
        print(describe_mesh(topo, nodes), flush=True)
    set_seed(cfg.run.seed)
    sp = build_sequence_parallel(topo)
    tokenizer, mconf = build_tokenizer(cfg, accelerator, topo)
    loader, eval_data = build_data(cfg, accelerator, topo, tokenizer)
    total_steps = total_steps_for(cfg, loader.steps_per_epoch)
    state = TrainState(
        global_batch_size=global_batch_size(cfg, topo),
        model=model_fingerprint(mconf) + describe(cfg.lora),
        layout=topo.layout,
        data=data_fingerprint(cfg.data, tokenizer, cfg.run.seed, loader.sampler.num_samples),
        zero_stage=cfg.deepspeed.zero_stage,
    )
    checkpointer = mode.checkpointer(cfg, accelerator, state)
    # A checkpoint of another model, data or batch fails here, before the model is built; another
    # layout or ZeRO stage is resharded in load().
    checkpointer.precheck()
    model, optimizer, scheduler, n_params, n_trained, state.base = build_model_and_optimizer(
        cfg, accelerator, topo, mconf, total_steps, sp
    )
    checkpointer.register(scheduler)
    compile_cache = None
    if cfg.model.compile and cfg.model.compile_cache:
        # Before the first forward compiles anything.
        compile_cache = CompileCache(folder.compile_cache_root, topo.rank)
        loaded = compile_cache.load()
        if accelerator.is_main_process:
            print(f"[accel-tp] {loaded}", flush=True)
    peak_flops = peak_bf16_flops() if device_type == "cuda" else None
    reporter = mode.reporter(
        cfg,
        accelerator,
        world_size=topo.world_size,
        global_batch=state.global_batch_size,
        total_steps=total_steps,
        flops_per_token_at=lambda context: flops_per_token(mconf, n_params, context, n_trained),
        peak_flops=peak_flops,
    )
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
        reporter=reporter,
        validator=Validator(
            accelerator,
            model,
            eval_data,
            topo.tp_size,
            cfg.train.eval_every,
            on_device=lambda batch: batch_on_device(batch, accelerator.device, sp),
        ),
        compile_watch=CompileWatch(cfg.model.compile, compile_cache, accelerator.is_main_process),
        folder=folder,
        total_steps=total_steps,
        precision=precision,
        tokenizer=tokenizer,
        mconf=mconf,
        n_params=n_params,
        n_trained=n_trained,
        peak_flops=peak_flops,
        sp=sp,
        stop=StopRequest().install(),
    )


def train_step(rt: Runtime, micro_batches: list[Batch], step: int) -> dict[str, float]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the global-batch stats."""
    acc, model, topo = rt.accelerator, rt.model, rt.topo
    device = acc.device
    ga = len(micro_batches)
    # Every TP and SP peer holds the same (whole) batch, so world-wide sums count each DP batch
    # tp x sp times.
    local = [
        sum(float(getattr(mb, k)) for mb in micro_batches)
        for k in ("label_tokens", "real_tokens", "attn_context")
    ]
    # A stop request (SIGTERM) rides along, so every rank sees it at the same step.
    local.append(1.0 if rt.stop is not None and rt.stop.requested else 0.0)
    *counts, stop = all_reduce_floats(local, device)
    if stop > 0:
        return {"stop": 1.0}  # nothing trained: train_loop saves the state as it is and stops
    peers = topo.tp_size * topo.sp_size
    label_tokens, real_tokens, attn_context = (v / peers for v in counts)
    # HF's loss is sum(token losses) / num_items_in_batch. DeepSpeed then divides by ga (micro-steps)
    # and averages over its DP ranks (sp x dp: parallel.Topology.replicas), so this divisor makes the
    # gradient exactly that of sum(all token losses of the global batch) / label_tokens.
    items = label_tokens / (topo.replicas * ga)
    num_items = torch.tensor(items, dtype=torch.float32, device=device)
    # Summed on the device: one host sync per step (at the last micro-batch), not one per micro-batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    has_aux = False
    for i, mb in enumerate(micro_batches):
        with acc.accumulate(model), rt.on_device(mb) as part:
            out = model(**part.inputs, num_items_in_batch=num_items, use_cache=False)
            loss_sum += out.loss.detach().double() * items
            aux = getattr(out, "aux_loss", None)  # MoE with output_router_logits: inside out.loss too
            if aux is not None:
                aux_sum += aux.detach().double()
                has_aux = True
            if i == ga - 1:
                # Check before the last backward, i.e. before the optimizer step touches weights.
                if dist.is_initialized():
                    dist.all_reduce(loss_sum)
                    if has_aux:
                        dist.all_reduce(aux_sum)
                # Each SP peer summed its own tokens' losses; each TP peer all of its replica's.
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
    stats = {
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens": real_tokens,
        "label_tokens": label_tokens,
        "attn_context": attn_context / max(real_tokens, 1.0),  # mean positions a token attends over
    }
    if has_aux:
        # The mean over micro-batches and ranks of each forward's load-balancing loss: what the
        # loss holds (each forward adds coef x its own), and what DeepSpeed's average trains.
        stats["aux_loss"] = aux_sum.item() / (ga * topo.world_size)
    return stats


def _micro_batch_groups(stream: Iterator[tuple[int, Batch]], ga: int) -> Iterator[tuple[int, list[Batch]]]:
    while True:
        group = [next(stream) for _ in range(ga)]
        yield group[-1][0], [b for _, b in group]


class _StepClock:
    """Wall time per step, leaving out what is not training (evaluation, checkpoints). Logging and
    Ray's reports do count, in the next step: a report that waits on Ray slows training, and
    tokens/s must show it."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t += time.perf_counter() - t0


def _banner(rt: Runtime, start: int) -> str:
    cfg, topo = rt.cfg, rt.topo
    return (
        f"[accel-tp] world={topo.world_size} tp={topo.tp_size} "
        f"{f'sp={topo.sp_size} ' if topo.sp_size > 1 else ''}dp={topo.dp_size} "
        f"precision={rt.precision} zero={cfg.deepspeed.zero_stage} global_batch={rt.state.global_batch_size} "
        f"seqs (micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum_steps} x dp {topo.dp_size}) "
        f"steps={start}->{rt.total_steps} batches/epoch/dp-rank={rt.loader.batches_per_epoch}"
    )


def train_loop(rt: Runtime) -> dict[str, Any]:
    """Resume, train to total_steps; the validator, checkpointer and reporter decide the rest."""
    state = rt.state
    start = rt.checkpointer.load()
    if start:
        # The optimizer must step with the restored schedule's rate, not the fresh one's.
        for group, lr in zip(rt.optimizer.param_groups, rt.scheduler.get_last_lr()):
            group["lr"] = lr
    rt.reporter.begin(start, _banner(rt, start))
    t_start, tokens_start = time.perf_counter(), state.tokens
    batches = rt.loader.stream(rt.loader.micro_batch_at(state.samples))
    groups = _micro_batch_groups(batches, rt.cfg.train.grad_accum_steps)
    rt.model.train()
    metrics: dict[str, Any] = {}
    clock = _StepClock()
    stepping = 0.0  # seconds spent in training steps (goodput: their share of the wall time)
    saved_at = start  # the last step whose state is saved (or was loaded)
    for step in range(start, rt.total_steps):
        epoch, micro_batches = next(groups)
        lr = rt.scheduler.get_last_lr()[0]  # the rate this step trains with
        stats = train_step(rt, micro_batches, step)
        if "stop" in stats:
            _stop(rt, metrics, saved_at)
        dt = clock.lap()
        state.step, state.samples = step + 1, state.samples + state.global_batch_size
        state.tokens += int(stats["tokens"])
        rt.compile_watch.after_step(dt)
        last = state.step == rt.total_steps
        metrics = rt.reporter.step_metrics(state.step, epoch, lr, stats, state.tokens, dt)
        stepping += dt
        metrics["goodput"] = stepping / max(time.perf_counter() - t_start, 1e-9)
        with clock.paused():
            if rt.validator.should_run(state.step, last):
                metrics.update(rt.validator.run())
                rt.compile_watch.after_eval()
        saving = rt.checkpointer.should_save(state.step, last)
        rt.reporter.log(metrics, last, saving)
        if saving:
            t0 = time.perf_counter()
            with clock.paused(), rt.checkpointer.save(state.step) as written:
                t1 = time.perf_counter()
                rt.reporter.checkpoint_saved(metrics, written)
                t2 = time.perf_counter()
            rt.reporter.save_timed(
                written,
                stall=time.perf_counter() - t0,
                write=t1 - t0 - written.waited_s,
                hand_over=t2 - t1,
            )
            saved_at = state.step
    rt.reporter.end()
    rt.accelerator.wait_for_everyone()
    exported = _export(rt) if rt.cfg.checkpoint.export_hf else None
    rt.reporter.summary(metrics, time.perf_counter() - t_start, state.tokens - tokens_start, exported)
    return metrics


def _stop(rt: Runtime, metrics: dict[str, Any], saved_at: int) -> None:
    """Asked to stop (SIGTERM) before a step: save the state of the last one unless it is saved,
    wait until the save is stored (an asynchronous upload too), end with errors.Stopped."""
    step = rt.state.step
    if step > saved_at:
        with rt.checkpointer.save(step) as written:
            rt.reporter.checkpoint_saved(metrics, written)
        what = f"{written.name} saved"
    else:
        what = "its checkpoint saved already" if step else "nothing trained yet"
    rt.checkpointer.flush()
    rt.reporter.end()
    raise Stopped(
        f"stopped on SIGTERM after step {step} ({what}); resume with the same run.name "
        "(--resume latest under accelerate launch)."
    )


def _export(rt: Runtime) -> Any:
    # One row of a training batch to check the export against (a whole micro-batch's fp32 logits
    # can be tens of GiB with a large vocabulary).
    probe = next(iter(rt.loader.loader)).first(1)
    cfg, adapters = rt.cfg, None
    if cfg.lora.enabled:
        what = "both" if cfg.checkpoint.export_hf is True else str(cfg.checkpoint.export_hf)
        base = cfg.model.name_or_path or cfg.model.architecture
        adapters = AdapterExport(cfg.lora, what, rt.folder.adapter, base)
    return export_hf(rt.accelerator, rt.model, rt.tokenizer, rt.folder.export, probe=probe, adapters=adapters)


def run_worker(cfg: Config, mode: WorkerMode | None = None) -> dict[str, Any]:
    """Entry point of one worker process (`mode`: how it was started; default `accelerate launch`)."""
    mode = mode or LocalMode(cfg)
    cfg = mode.fit(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rt = setup(cfg, mode)
    try:
        return train_loop(rt)
    finally:
        rt.accelerator.end_training()
        if int(os.environ.get("RANK", "0")) == 0:
            # What the trackers flushed when they closed, and a failed run's last metrics lines.
            rt.folder.close()
