"""Parallel layout: topology math, checks, and the DeepSpeed config / Accelerate plugin.

Nothing here loads a model or data. The layout follows DeepSpeed's AutoTP mesh
(`deepspeed.utils.groups._init_tp_mesh_device`, a (dp', tp) device mesh): TP groups are blocks of
consecutive ranks. Sequence parallelism (accel_tp/sequence_parallel.py) splits DeepSpeed's dp' axis
into sp x dp: rank = (dp_rank * sp_size + sp_rank) * tp_size + tp_rank, so TP groups stay
node-local, SP groups come next, and DeepSpeed's DP group (same tp_rank) holds the sp x dp ranks
whose gradients it averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError
from .families import expert_parallel_block, tensor_parallel_block, vocabulary_split

__all__ = [
    "Topology",
    "check_tp_heads",
    "check_sp_heads",
    "resolve_precision",
    "build_deepspeed_config",
    "make_deepspeed_plugin",
    "global_batch_size",
]


@dataclass(frozen=True)
class Topology:
    """Where one rank sits in the tp x sp x dp mesh."""

    world_size: int
    tp_size: int
    rank: int = 0
    sp_size: int = 1
    ep_size: int = 1  # experts split over this many of DeepSpeed's DP ranks (AutoEP)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.world_size < 1 or self.sp_size < 1:
            raise ConfigError(
                f"tp_size ({self.tp_size}), sp_size ({self.sp_size}) and world_size ({self.world_size}) must be >= 1."
            )
        if self.world_size % self.tp_size:
            raise ConfigError(
                f"parallelism.tp_size ({self.tp_size}) must divide the world size ({self.world_size}); "
                f"use a tp_size among {[d for d in range(1, self.world_size + 1) if self.world_size % d == 0]}."
            )
        if self.world_size % (self.tp_size * self.sp_size):
            per = self.world_size // self.tp_size
            raise ConfigError(
                f"parallelism.sp_size ({self.sp_size}) x tp_size ({self.tp_size}) must divide the world size "
                f"({self.world_size}); use an sp_size among {[d for d in range(1, per + 1) if per % d == 0]}."
            )
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ConfigError(
                f"parallelism.ep_size ({self.ep_size}) must divide the world size ({self.world_size}): DeepSpeed "
                "AutoEP folds the experts' ranks onto the world's (runtime/engine.py build_folding_spec); use an "
                f"ep_size among {[d for d in range(1, self.world_size + 1) if self.world_size % d == 0]}."
            )
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} outside world of {self.world_size}.")

    @classmethod
    def from_config(cls, cfg: Config, world_size: int, rank: int = 0) -> Topology:
        """The topology of `world_size` processes, checked against parallelism.dp_size if set."""
        par = cfg.parallelism
        unit = par.replica_size
        if par.dp_size is not None and unit * par.dp_size != world_size:
            shape = (
                f"tp_size ({par.tp_size}) x sp_size ({par.sp_size})"
                if par.sp_size > 1
                else f"tp_size ({par.tp_size})"
            )
            raise ConfigError(
                f"parallelism: {shape} x dp_size ({par.dp_size}) = {unit * par.dp_size}, but the world has "
                f"{world_size} processes; launch {unit * par.dp_size} processes or set parallelism.dp_size: "
                f"{world_size // unit}."
            )
        return cls(
            world_size=world_size, tp_size=par.tp_size, rank=rank, sp_size=par.sp_size, ep_size=par.ep_size
        )

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each holds its own share of the global batch."""
        return self.world_size // (self.tp_size * self.sp_size)

    @property
    def replicas(self) -> int:
        """DeepSpeed's DP size (ranks with one tp_rank: sp x dp), over which it partitions ZeRO state
        and averages gradients; its checkpoint files follow it."""
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def sp_rank(self) -> int:
        return self.rank // self.tp_size % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp_size * self.sp_size)

    @property
    def layout(self) -> str:
        """The layout DeepSpeed's checkpoint files follow (SP ranks are DeepSpeed DP ranks; the
        expert partition, when AutoEP splits the experts)."""
        ep = f"xep{self.ep_size}" if self.ep_size > 1 else ""
        return f"tp{self.tp_size}xdp{self.replicas}{ep}"

    def describe(self) -> str:
        """'tp2 x sp2 x dp1' (sp left out at 1)."""
        sp = f" x sp{self.sp_size}" if self.sp_size > 1 else ""
        return f"tp{self.tp_size}{sp} x dp{self.dp_size}"

    def tp_group_ranks(self, replica: int | None = None) -> list[int]:
        """World ranks sharing a model replica (same tokens, sharded weights); `replica` indexes
        DeepSpeed's dp' axis (dp_rank x sp_size + sp_rank), default this rank's."""
        d = self.rank // self.tp_size if replica is None else replica
        return list(range(d * self.tp_size, (d + 1) * self.tp_size))

    def sp_group_ranks(self, dp_rank: int | None = None, tp_rank: int | None = None) -> list[int]:
        """World ranks splitting one batch's sequences (same batch, same weights)."""
        d = self.dp_rank if dp_rank is None else dp_rank
        t = self.tp_rank if tp_rank is None else tp_rank
        return [(d * self.sp_size + s) * self.tp_size + t for s in range(self.sp_size)]

    def dp_group_ranks(self, tp_rank: int | None = None) -> list[int]:
        """World ranks holding the same weight shard (DeepSpeed's DP group: the gradient all-reduce)."""
        t = self.tp_rank if tp_rank is None else tp_rank
        return [t + d * self.tp_size for d in range(self.replicas)]


def check_tp_heads(tp_size: int, num_attention_heads: int, num_key_value_heads: int | None) -> None:
    """Refuse a TP size that would split attention unevenly.

    DeepSpeed's rule (module_inject/tp_shard.get_shard_size): attention projections are split in
    whole key-value heads (with their query-head groups); TP rank r gets kv // tp heads, plus one if
    r < kv % tp, and ranks beyond the kv-head count get no attention shard at all. That is correct
    but leaves attention work unbalanced, so accel-tp requires tp_size to divide the kv-head count
    (and hence the query-head count).
    """
    kv = num_key_value_heads or num_attention_heads
    if kv % tp_size or num_attention_heads % tp_size:
        valid = [d for d in range(1, kv + 1) if kv % d == 0 and num_attention_heads % d == 0]
        raise ConfigError(
            f"parallelism.tp_size: {tp_size} does not divide the model's {kv} key-value heads "
            f"({num_attention_heads} query heads). DeepSpeed AutoTP shards attention by whole kv heads, "
            f"so the TP ranks would get unequal (or no) attention work. Use tp_size in {valid}."
        )


def check_sp_heads(
    tp_size: int, sp_size: int, num_attention_heads: int, num_key_value_heads: int | None
) -> None:
    """Refuse an SP size Ulysses cannot split this TP rank's heads over: the all-to-all hands each SP
    rank (query heads / tp) / sp query heads, and (kv heads / tp) / sp key-value heads, or one
    replicated key-value head where there are fewer than sp (DeepSpeed's rule, ulysses_sp.py)."""
    if sp_size <= 1:
        return
    q = num_attention_heads // tp_size
    kv = (num_key_value_heads or num_attention_heads) // tp_size

    def fits(s: int) -> bool:
        return q % s == 0 and (kv % s == 0 or s % kv == 0)

    if not fits(sp_size):
        valid = [s for s in range(1, q + 1) if fits(s)]
        raise ConfigError(
            f"parallelism.sp_size: {sp_size} cannot split the {q} query and {kv} key-value heads each TP rank "
            f"holds (tp_size {tp_size}): Ulysses gives every SP rank whole heads. Use sp_size in {valid}."
        )


def resolve_precision(requested: str, device_type: str, bf16_supported: bool = False) -> str:
    """bf16 where the GPU supports it, fp16 (with loss scaling) where it does not, fp32 on CPU."""
    if requested != "auto":
        if device_type == "cpu" and requested == "fp16":
            raise ConfigError("deepspeed.precision: fp16 is not supported on CPU; use fp32 or bf16.")
        return requested
    if device_type == "cpu":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def global_batch_size(cfg: Config, topo: Topology) -> int:
    """Sequences per optimizer step: TP and SP peers share a batch, so only dp_size multiplies."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * topo.dp_size


def build_deepspeed_config(
    cfg: Config, topo: Topology, precision: str, zero_stage: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: training, the export and the benchmark's accel arm.

    `zero_stage` overrides deepspeed.zero_stage (the export loads module weights only: stage 0,
    precision "fp32" so DeepSpeed keeps the module in the dtype it was built in).
    """
    ds = cfg.deepspeed
    tr = cfg.train
    zero: dict[str, Any] = {
        "stage": ds.zero_stage if zero_stage is None else zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
        # Lets accelerator.get_state_dict gather the AutoTP shards into full weights (export).
        "gather_16bit_weights_on_model_save": True,
    }
    config: dict[str, Any] = {
        # No train_batch_size: DeepSpeed derives it from the two keys below. It checks it against the
        # world size when it parses the config (Accelerate passes no mpu) and, at ZeRO-3 with AutoTP,
        # again against the DP size when it partitions the module (zero.Init(module=..., mpu=groups),
        # deepspeed/runtime/zero/partition_parameters.py): at tp > 1 no value passes both. The true
        # global batch is global_batch_size() = micro x accum x dp.
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        # AutoTP's size and, for families DeepSpeed's own plan conversion refuses (or a model.tp_plan),
        # the partition accel-tp writes for it (accel_tp/families.py).
        "tensor_parallel": tensor_parallel_block(
            cfg.model,
            topo.tp_size,
            cfg.lora.targets(),
            vocab_parallel=vocabulary_split(cfg, topo.tp_size)[0],
        ),
        # Our optimizer is torch AdamW; ZeRO accepts it with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    experts = expert_parallel_block(cfg.model, cfg.parallelism.ep_size)
    if experts is not None:
        config["expert_parallel"] = experts
        # AutoEP replaces the MoE layers inside deepspeed.initialize, and DeepSpeed's ZeRO optimizer
        # needs the new expert parameters in param groups of their own ("moe": True); it builds
        # those only for an optimizer it creates itself (runtime/engine.py _configure_optimizer ->
        # moe.utils.configure_moe_param_groups). So an EP run's AdamW is built there: torch's
        # AdamW, the same settings, on our param groups (trainer: Accelerate's DummyOptim).
        tr = cfg.train
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": tr.learning_rate,
                "betas": [tr.adam_beta1, tr.adam_beta2],
                "eps": tr.adam_eps,
                "weight_decay": tr.weight_decay,
                "torch_adam": True,
            },
        }
    if precision == "bf16":
        # DeepSpeed's bf16 overflow check scans every gradient tensor (a few kernels per parameter
        # and a host sync each step: a visible share of a step, docs/performance.md). bf16 has fp32's
        # range, so a non-finite gradient means divergence, not a loss-scale overflow. Without the
        # scan DeepSpeed applies that step (the in-memory weights are spoilt) but reports the
        # gradient norm as inf, and train_step then raises before anything is saved: the run
        # stops at the same step, its checkpoints untouched, as with the scan (which would skip it).
        config["bf16"] = {"enabled": True, "check_grad_overflow": False}
        if ds.bf16_master_weights:
            config["bf16"].update({"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True})
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif precision != "fp32":
        raise ConfigError(f"deepspeed.precision: unknown {precision!r}")
    for key, value in ds.overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def make_deepspeed_plugin(ds_config: dict[str, Any]) -> Any:
    """Accelerate's DeepSpeedPlugin carrying our DeepSpeed dict (AutoTP block and ZeRO stage)."""
    from accelerate.utils import DeepSpeedPlugin

    # zero3_init_flag off: models are built whole and then partitioned. (That flag alone does not
    # stop transformers from using zero.Init: see compat.transformers.without_hf_zero3_init.)
    return DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False)
