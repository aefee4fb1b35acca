"""Typed run configuration: one YAML is the single source of a run.

Every section is a dataclass. Loading is strict: unknown keys are rejected with the valid ones
listed, values are type-checked, and cross-field rules are checked in `validate()` so that bad
input fails on the driver before any worker, model or dataset is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "RunSection",
    "ModelSection",
    "DataSection",
    "ParallelismSection",
    "DeepSpeedSection",
    "TrainSection",
    "CheckpointSection",
    "RaySection",
    "LoraSection",
    "Config",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "ARCHITECTURES",
    "elastic_worker_counts",
]

# Named architectures that are built with random init (no download). "tiny" is for tests and the
# embedded default; the Qwen shapes are for benchmarks.
ARCHITECTURES = ("tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2-7b")


def elastic_worker_counts(tp_size: int, dp_size: int, grad_accum_steps: int) -> list[int]:
    """Worker counts (up to tp_size x dp_size) that keep the global batch: tp_size x dp' where dp'
    divides the micro-batches per global batch (grad_accum_steps x dp_size), so the accumulation
    becomes grad_accum_steps x dp_size / dp'."""
    per_global = grad_accum_steps * dp_size
    return [tp_size * d for d in range(1, dp_size + 1) if per_global % d == 0]


def is_jinja_template(value: str) -> bool:
    """model.chat_template holds a template itself (not a file path) when it has Jinja syntax."""
    return "{%" in value or "{{" in value


@dataclass
class RunSection:
    # Name of the run: the Ray run name (checkpoints go to <ray.storage_path>/<name>) and the folder
    # under output_dir for `accelerate launch` runs.
    name: str = "accel-tp"
    # Where `accelerate launch` runs write checkpoints and metrics (Ray runs use ray.storage_path).
    output_dir: str = "outputs"
    seed: int = 42

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name: {self.name!r} is not a valid folder name; use e.g. 'my-run'.")


@dataclass
class ModelSection:
    # The styles model.tp_plan takes (Hugging Face names; accel_tp/families.py maps them onto DeepSpeed).
    TP_STYLES: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "colwise", "colwise_gather_output", "colwise_rep", "rowwise", "rowwise_split_input", "rowwise_rep",
            "packed_colwise", "replicated_with_grad_allreduce", "replicate", "embedding_rowwise", "local_params",
        }
    )  # fmt: skip

    # A hub id (e.g. Qwen/Qwen2.5-0.5B) or a local directory written by save_pretrained ...
    name_or_path: str | None = None
    # ... or a named architecture built with random init (see ARCHITECTURES).
    architecture: str | None = None
    # Tokenizer: a hub id or local directory; None means the model's own (name_or_path), and
    # "default" means the byte-level BPE trained locally on the embedded corpus.
    tokenizer: str | None = None
    trust_remote_code: bool = False
    # None: what transformers picks for the model (sdpa where the model supports it, else eager,
    # e.g. Gemma-2). One the model does not support is refused on the driver, naming those it does.
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] | None = None
    # The tensor-parallel plan, in Hugging Face's tp_plan vocabulary: {module pattern: style}, e.g.
    # {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}; '*' is one
    # name segment. Replaces the model's own plan (None: the model's, or accel-tp's for its family;
    # docs/families.md). Styles: TP_STYLES.
    tp_plan: dict[str, str] | None = None
    # Liger's Triton kernels (GPU only): RMSNorm, RoPE, SwiGLU, and at tp_size 1 the fused linear
    # cross-entropy, which never materialises the vocab-sized logits (under AutoTP the lm_head is
    # vocab-sharded, so that one kernel is left out there).
    liger_kernel: bool = False
    # torch.compile each decoder layer (fuses norms, rotary and activations; the first steps compile).
    compile: bool = False
    # With compile: keep torch.compile's artifacts in the run folder (compile_cache/, one file per
    # rank) and load them when a worker starts, so a restart on a fresh node skips most compiling.
    compile_cache: bool = True
    # Recompute activations in the backward pass: only when memory requires it (costs ~1/3 more
    # compute). true: every decoder layer; a number N: only the first N layers (selective: frees
    # N layers' activations for 1/L of the recompute each, so use the smallest N that fits).
    activation_checkpointing: bool | int = False
    # data.format chat: a Jinja chat template (a string holding "{%" or "{{") or the path of a file
    # holding one; replaces the tokenizer's own template (and is saved with the HF export).
    chat_template: str | None = None

    def validate(self) -> None:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ConfigError(
                "model: set exactly one of model.name_or_path (hub id or local directory) or "
                f"model.architecture (random init, one of {list(ARCHITECTURES)})."
            )
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"model.architecture: unknown {self.architecture!r}; valid: {list(ARCHITECTURES)}."
            )
        template = self.chat_template
        if (
            template is not None
            and not is_jinja_template(template)
            and not Path(template).expanduser().is_file()
        ):
            raise ConfigError(
                f"model.chat_template: {template!r} is neither a Jinja template (no '{{%' or '{{{{') nor an "
                "existing file; give the template itself or the path of a file holding it."
            )
        if self.architecture is not None and self.tokenizer is None:
            raise ConfigError(
                "model.tokenizer: a random-init architecture needs a tokenizer; set "
                "model.tokenizer: default (local BPE on the embedded corpus) or a hub id / directory."
            )
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and ac < 1:
            raise ConfigError(
                f"model.activation_checkpointing: {ac} layers; give a layer count >= 1, true (every layer) "
                "or false (none)."
            )
        if self.tp_plan is not None:
            bad = {k: v for k, v in self.tp_plan.items() if not isinstance(k, str) or v not in self.TP_STYLES}
            if not self.tp_plan or bad:
                raise ConfigError(
                    f"model.tp_plan: {bad or 'empty'}: each entry maps a module pattern (a string such as "
                    f"'layers.*.mlp.up_proj') to one of {sorted(self.TP_STYLES)}; or remove model.tp_plan "
                    "to use the model's own plan."
                )


@dataclass
class DataSection:
    # embedded: the corpus shipped with accel-tp (no network); hub: datasets.load_dataset(name,
    # config_name); files: local .txt / .jsonl / .json / .parquet files.
    source: Literal["embedded", "hub", "files"] = "embedded"
    name: str | None = None
    config_name: str | None = None
    split: str = "train"
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    # text: one document per row in `text_field`; chat: one conversation per row, a list of
    # {role, content} messages (roles system / user / assistant) in `messages_field`, rendered
    # with the tokenizer's chat template (or model.chat_template).
    format: Literal["text", "chat"] = "text"
    messages_field: str = "messages"
    # Which tokens carry the loss (chat): assistant = what the assistant produces (each assistant
    # message's content and the end-of-turn marker after it); all = every token. None: assistant
    # for chat, all for text (the only choice there).
    loss_on: Literal["assistant", "all"] | None = None
    # Use only the first `percentage` percent of the split (the tutorial uses 5).
    percentage: float = 100.0
    # Chat: a conversation longer than seq_length loses its tail, and one left with no labelled
    # token is dropped (both counted in one log line per split).
    seq_length: int = 512
    # longest: pad each micro-batch to its longest sequence (rounded up to 8); max_length: pad
    # every sequence to seq_length (the tutorial's behaviour, kept for comparison).
    padding: Literal["longest", "max_length"] = "longest"
    # none: one document per row (padded as `padding` says); concat: documents joined with eos and
    # cut into rows of seq_length, full causal attention (pretraining style); document: whole
    # documents packed into rows of seq_length with position ids restarting per document, so no
    # token attends across a document boundary.
    packing: Literal["none", "concat", "document"] = "none"
    # Drop documents shorter than this many tokens (they carry no next-token signal).
    min_tokens: int = 2
    # Tokenized-dataset and tokenizer cache; None: $ACCEL_TP_CACHE or ~/.cache/accel_tp.
    cache_dir: str | None = None
    shuffle: bool = True
    # Held-out evaluation data: a split of the hub dataset (e.g. "validation"), or a fraction of the
    # documents held out of training (deterministic). Neither: no evaluation.
    eval_split: str | None = None
    eval_fraction: float = 0.0
    # Processes that build micro-batches ahead of the training step (torch DataLoader workers).
    # 0 builds each one in the training process between steps, while the GPU waits; on a GPU 2
    # hides that time (docs/performance.md).
    num_workers: int = 0

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}.")
        if self.eval_split and self.source != "hub":
            raise ConfigError(
                "data.eval_split: only for source 'hub'; use data.eval_fraction for other sources."
            )
        if self.eval_split and self.eval_fraction:
            raise ConfigError("data.eval_split / data.eval_fraction: set one of them, not both.")
        if not 0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"data.eval_fraction: must be in [0, 0.5], got {self.eval_fraction}.")
        if self.source == "hub" and not self.name:
            raise ConfigError("data.name: source 'hub' needs a dataset name, e.g. data.name: wikitext.")
        if self.source == "files" and not self.files:
            raise ConfigError(
                "data.files: source 'files' needs at least one .txt/.jsonl/.json/.parquet path."
            )
        if self.source != "files" and self.files:
            raise ConfigError(f"data.files: only used with data.source: files (source is {self.source!r}).")
        if not 0 < self.percentage <= 100:
            raise ConfigError(f"data.percentage: must be in (0, 100], got {self.percentage}.")
        if self.seq_length < 8:
            raise ConfigError(f"data.seq_length: must be >= 8, got {self.seq_length}.")
        if self.format == "text" and self.loss_on == "assistant":
            raise ConfigError(
                "data.loss_on: 'assistant' needs data.format: chat (text has no assistant turns); "
                "remove data.loss_on or set data.format: chat."
            )
        if self.format == "chat" and self.packing == "concat":
            raise ConfigError(
                "data.packing: 'concat' cuts conversations anywhere; with data.format: chat use "
                "'document' (whole conversations per row, no attention across them) or 'none'."
            )
        if self.format == "chat" and not self.messages_field:
            raise ConfigError("data.messages_field: must name the column that holds the messages.")
        if self.min_tokens < 2:
            raise ConfigError(
                f"data.min_tokens: must be >= 2 (a label needs a next token), got {self.min_tokens}."
            )

    @property
    def label_mode(self) -> str:
        """The effective data.loss_on: 'assistant' or 'all'."""
        if self.loss_on is not None:
            return self.loss_on
        return "assistant" if self.format == "chat" else "all"

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        return Path(os.environ.get("ACCEL_TP_CACHE", "~/.cache/accel_tp")).expanduser().resolve()


@dataclass
class ParallelismSection:
    tp_size: int = 1
    # None: world_size // (tp_size x sp_size) (accelerate launch decides the world); Ray needs it to
    # size the worker group, so a Ray run requires it.
    dp_size: int | None = None
    # Ulysses sequence parallelism (accel_tp/sequence_parallel.py): the ranks of an SP group share one
    # batch and each holds 1/sp_size of every row's tokens; attention exchanges heads for sequence
    # by all-to-all, so every attention kernel sees whole rows of its heads. world = tp x sp x dp.
    sp_size: int = 1
    # Expert parallelism (DeepSpeed AutoEP) for mixture-of-experts models: each MoE layer's experts
    # split over ep_size ranks (folded onto the DP ranks of a TP shard), tokens routed to them by
    # all-to-all. 1: every rank holds every expert.
    ep_size: int = 1
    # At tp_size > 1: the output head split by vocabulary and the loss computed on each rank's slice
    # (accel_tp/vocab_parallel.py), so no rank holds the whole vocabulary's logits. false: the head's
    # logits gathered on every rank (and a tied embedding whole), the model's own loss.
    vocab_parallel_loss: bool = True

    def validate(self) -> None:
        if self.tp_size < 1:
            raise ConfigError(f"parallelism.tp_size: must be >= 1, got {self.tp_size}.")
        if self.dp_size is not None and self.dp_size < 1:
            raise ConfigError(f"parallelism.dp_size: must be >= 1, got {self.dp_size}.")
        if self.sp_size < 1:
            raise ConfigError(f"parallelism.sp_size: must be >= 1, got {self.sp_size}.")
        if self.ep_size < 1:
            raise ConfigError(f"parallelism.ep_size: must be >= 1, got {self.ep_size}.")

    @property
    def replica_size(self) -> int:
        """Ranks that share one batch: a TP group per SP rank (tp_size x sp_size)."""
        return self.tp_size * self.sp_size


@dataclass
class DeepSpeedSection:
    # 1-3: ZeRO partitions optimizer state (1), gradients (2) and parameters (3) over the DP ranks.
    # 0: no ZeRO: every DP rank keeps the whole optimizer state of its TP shard, DeepSpeed all-reduces
    # the gradients over DP and steps the optimizer itself (no ZeRO bucketing or partition copies).
    # Only with precision fp32 (bf16 / fp16 are refused: validate). Its checkpoints resume at stage 0
    # with the same tp_size on any dp_size, not on another stage or tp_size (checkpoint.check_resume).
    zero_stage: Literal[0, 1, 2, 3] = 1
    # auto: bf16 on GPUs that support it, fp16 (with dynamic loss scaling) on GPUs that do not,
    # fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_clipping: float = 1.0
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    # Keep fp32 master weights, gradients and optimizer state under bf16 (correct by default);
    # true halves optimizer memory at a cost in accuracy.
    bf16_master_weights: bool = False
    # Raw DeepSpeed keys merged last, for settings this schema does not name (advanced).
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.gradient_clipping < 0:
            raise ConfigError(
                f"deepspeed.gradient_clipping: must be >= 0 (0 turns it off), got {self.gradient_clipping}."
            )
        if self.zero_stage == 0 and self.precision != "fp32":
            # DeepSpeed 0.19.8 without ZeRO wraps a bf16 / fp16 model's torch AdamW in
            # FP16_UnfusedOptimizer (runtime/engine.py _do_optimizer_sanity_check: DDP_BFLOAT16 / FP16;
            # its BF16_Optimizer is only taken with pipeline parallelism), which is wrong for us twice:
            # its constructor steps the optimizer once on zero gradients
            # (runtime/fp16/unfused_optimizer.py initialize_optimizer_states, line 425): AdamW counts a
            # step (bias correction off by one for the whole run) and applies one weight decay at the
            # base lr; and at tp > 1 its gradient norm drops the shards of TP ranks > 0 (step() hands
            # get_weight_norm plain gradient tensors, on which runtime/utils.py:575
            # is_model_parallel_parameter is false), so clipping uses too small a norm (the loss drifts
            # far more than ZeRO-1 bf16's: docs/performance.md).
            # "auto" is refused too: it resolves to bf16 or fp16 on GPUs.
            raise ConfigError(
                f"deepspeed.zero_stage: 0 needs deepspeed.precision: fp32 (got {self.precision!r}): DeepSpeed "
                "without ZeRO trains a bf16 / fp16 model through its FP16_UnfusedOptimizer, which takes one "
                "AdamW step on zero gradients when it is built (an extra weight decay, Adam's bias correction "
                "off by one step) and, at tp_size > 1, clips with a gradient norm that misses the other TP "
                "ranks' shards. Use deepspeed.zero_stage: 1 for bf16 / fp16, or precision: fp32 with stage 0."
            )
        clashes = []
        for key, value in self.overrides.items():
            if key in _OWNED_DEEPSPEED_KEYS:
                clashes.append(f"{key} ({_OWNED_DEEPSPEED_KEYS[key]})")
            elif key in _OWNED_DEEPSPEED_SUBKEYS and isinstance(value, dict):
                owned = _OWNED_DEEPSPEED_SUBKEYS[key]
                clashes += [f"{key}.{k} ({owned[k]})" for k in sorted(value) if k in owned]
        if clashes:
            raise ConfigError(
                f"deepspeed.overrides: {', '.join(sorted(clashes))}: set by accel-tp from its typed config; "
                "set those fields instead (overrides is for DeepSpeed keys accel-tp does not own)."
            )


# DeepSpeed keys accel-tp derives from its typed fields: an override would bypass their checks
# (or silently disagree with what the trainer assumes), so deepspeed.overrides refuses them.
_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.micro_batch_size, train.grad_accum_steps, parallelism.dp_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "tensor_parallel": "parallelism.tp_size",
    "amp": "deepspeed.precision",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "optimizer": "train.learning_rate, weight_decay, adam_*: accel-tp builds torch AdamW",
    "scheduler": "train.lr_schedule, warmup_steps, min_lr_ratio",
    "zero_allow_untested_optimizer": "accel-tp's torch AdamW needs it",
}
_OWNED_DEEPSPEED_SUBKEYS = {
    "zero_optimization": {
        "stage": "deepspeed.zero_stage",
        "overlap_comm": "deepspeed.overlap_comm",
        "contiguous_gradients": "deepspeed.contiguous_gradients",
        "reduce_bucket_size": "deepspeed.reduce_bucket_size",
        "allgather_bucket_size": "deepspeed.allgather_bucket_size",
        "gather_16bit_weights_on_model_save": "checkpoint.export_hf needs it on",
    },
    "bf16": {
        "enabled": "deepspeed.precision",
        "bf16_master_weights_and_grads": "deepspeed.bf16_master_weights",
        "bf16_optimizer_states": "deepspeed.bf16_master_weights",
    },
    "fp16": {"enabled": "deepspeed.precision"},
}


@dataclass
class TrainSection:
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # torch's fused AdamW kernel (one launch for all tensors); false: the multi-tensor (foreach) one.
    fused_optimizer: bool = True
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # The schedule decays to learning_rate * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    # Optimizer steps to run; None: as many as `epochs` passes over the data give.
    max_steps: int | None = None
    epochs: int = 1
    log_every: int = 1
    # Evaluate on the held-out data every N optimizer steps (0: only at the end) when data has one.
    eval_every: int = 0
    # Rows per evaluation micro-batch; None: micro_batch_size. Evaluation builds the full logits
    # (Liger's fused loss only runs in training), so with a large vocabulary keep this small.
    eval_micro_batch_size: int | None = None
    # Accelerate trackers: tensorboard, wandb, mlflow, ...; None: tensorboard when installed.
    # Their files land in the run's output folder.
    log_with: list[str] | None = None
    progress_bar: bool = True

    def validate(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}.")
        if self.eval_micro_batch_size is not None and self.eval_micro_batch_size < 1:
            raise ConfigError(
                f"train.eval_micro_batch_size: must be >= 1 or null (micro_batch_size), got {self.eval_micro_batch_size}."
            )
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every: must be >= 0 (0: only at the end), got {self.eval_every}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1 or null (use epochs), got {self.max_steps}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be > 0, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}.")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(
                f"train.adam_beta1 / adam_beta2: must be in [0, 1), got {self.adam_beta1} / {self.adam_beta2}."
            )
        if self.adam_eps <= 0:
            raise ConfigError(f"train.adam_eps: must be > 0, got {self.adam_eps}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}.")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps})."
            )


@dataclass
class CheckpointSection:
    # Save every N optimizer steps (0: never mid-run); and at the end when at_end is true.
    every_steps: int = 0
    at_end: bool = True
    # Keep only the newest N checkpoints (Ray: CheckpointConfig(num_to_keep)); None keeps all.
    keep_last: int | None = None
    # resume_from must lie under this run's own checkpoint folder unless this is set: a checkpoint
    # from elsewhere may be of another run, and with trust_pickles its files could run code.
    allow_external_resume: bool = False
    # Every pickle of a checkpoint is loaded weights-only (tensors, plain containers and the few
    # DeepSpeed / numpy classes accel-tp's own checkpoints hold), so a file that would run code is
    # refused, naming it. True loads it as DeepSpeed and Accelerate do (a checkpoint you wrote whose
    # files hold other classes, e.g. from another DeepSpeed version): unpickling can then run code.
    # Read from your YAML / --set only, never from a checkpoint's own recorded config.
    trust_pickles: bool = False
    # At the end of training, also write a consolidated Hugging Face model (safetensors, config,
    # tokenizer) to <run output folder>/hf.
    # A LoRA run: true or "both" writes the merged model to hf/ and the PEFT adapter folder to
    # adapter/; "merged" or "adapter" only one of them.
    export_hf: bool | Literal["adapter", "merged", "both"] = False
    # `accelerate launch` only: resume from this checkpoint directory ("latest": the newest one
    # under <run.output_dir>/<run.name>/checkpoints). Ray runs resume from Ray's own checkpoint.
    resume_from: str | None = None
    # Ray runs: "async" hands a written checkpoint to Ray and trains on while Ray uploads it to
    # ray.storage_path (Ray registers it once every worker's upload is complete; a next save first
    # waits for it, so at most one upload is in flight); "sync" waits for the upload at every save.
    upload: Literal["async", "sync"] = "async"

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps: must be >= 0, got {self.every_steps}.")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1 or null (keep all), got {self.keep_last}.")


@dataclass
class LoraSection:
    # The projections PEFT wraps when target_modules is unset: a family's attention and MLP linears
    # (names absent from a model are skipped; its routers and experts are not among them).
    DEFAULT_TARGETS: typing.ClassVar[tuple[str, ...]] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
        "gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "c_proj",
    )  # fmt: skip

    # LoRA adapters (the peft library) on a frozen base model: only they train and are saved.
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (the last name segment, as PEFT matches them); None: DEFAULT_TARGETS.
    target_modules: list[str] | None = None
    # Modules trained whole beside the adapters (e.g. a norm); not a layer TP splits.
    modules_to_save: list[str] = field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"
    # Continue an existing PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    # its config fills this section; a value set here that disagrees is refused.
    adapter: str | None = None

    def validate(self) -> None:
        if not self.enabled:
            if self.adapter is not None:
                raise ConfigError("lora.adapter: needs lora.enabled: true.")
            return
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}.")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}.")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(
                "lora.target_modules: empty; name modules (e.g. [q_proj, v_proj]) or remove the key."
            )

    def targets(self) -> frozenset[str]:
        """The module names carrying adapters (empty when LoRA is off)."""
        if not self.enabled:
            return frozenset()
        return frozenset(self.target_modules or self.DEFAULT_TARGETS)


@dataclass
class RaySection:
    # None: start a local Ray instance; "auto": join the running cluster; or ray://host:port.
    address: str | None = None
    # auto: GPU workers when the Ray cluster has GPUs, else CPU workers (gloo).
    device: Literal["auto", "gpu", "cpu"] = "auto"
    storage_path: str = "ray_results"
    cpus_per_worker: int = 1
    # Worker-group restarts Ray Train allows after a worker (or its node) fails; -1: unlimited.
    max_failures: int = 0
    # Elastic: the fewest workers to continue with after losing nodes (a multiple of tp_size whose
    # dp keeps the global batch); None: always tp_size x dp_size. A smaller group keeps tp_size,
    # lowers dp and raises gradient accumulation so the global batch is unchanged, and resumes from
    # the last checkpoint resharded. The group grows back when the nodes return.
    min_workers: int | None = None
    # Elastic: how often (seconds) Ray looks for room to grow a smaller group back to the full one
    # (ScalingConfig.elastic_resize_monitor_interval_s); it then restarts the group from the last
    # checkpoint, resharded up.
    regrow_check_s: float = 60.0

    def validate(self) -> None:
        if self.min_workers is not None and self.min_workers < 1:
            raise ConfigError(f"ray.min_workers: must be >= 1, got {self.min_workers}.")
        if self.regrow_check_s <= 0:
            raise ConfigError(f"ray.regrow_check_s: must be > 0 seconds, got {self.regrow_check_s}.")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"ray.cpus_per_worker: must be >= 1, got {self.cpus_per_worker}.")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures: must be >= -1 (-1: unlimited), got {self.max_failures}.")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    ray: RaySection = field(default_factory=RaySection)
    lora: LoraSection = field(default_factory=LoraSection)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.model.liger_kernel and self.model.compile and self.parallelism.tp_size > 1:
            # At tp > 1 the fused loss is left out (vocab-sharded lm_head) and with compile the
            # layer kernels are too: Liger would silently do nothing.
            raise ConfigError(
                "model.liger_kernel: with model.compile and parallelism.tp_size > 1 no Liger kernel applies "
                "(the fused loss needs a whole lm_head, compile replaces the layer kernels); set it false."
            )
        if isinstance(self.checkpoint.export_hf, str) and not self.lora.enabled:
            raise ConfigError(
                f"checkpoint.export_hf: {self.checkpoint.export_hf!r} chooses what a LoRA run exports; without "
                "lora.enabled set it true (the whole model) or false."
            )
        self._validate_min_workers()
        return self

    def _validate_min_workers(self) -> None:
        """ray.min_workers must leave a layout that keeps the global batch (micro x accum x dp)."""
        n, par, tr = self.ray.min_workers, self.parallelism, self.train
        if n is None:
            return
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "ray.min_workers: an elastic restart resumes on another dp size, and a ZeRO-3 checkpoint "
                "cannot be resharded yet; use deepspeed.zero_stage 1 or 2 with ray.min_workers."
            )
        if par.dp_size is None:
            raise ConfigError(
                "ray.min_workers: needs parallelism.dp_size (the full group is tp_size x dp_size)."
            )
        full = par.replica_size * par.dp_size
        per_dp = tr.grad_accum_steps * par.dp_size  # micro-batches per global batch
        valid = elastic_worker_counts(par.replica_size, par.dp_size, tr.grad_accum_steps)
        if n not in valid:
            below = [c for c in valid if c < n][-1:]
            above = [c for c in valid if c > n][:1]
            raise ConfigError(
                f"ray.min_workers: {n} workers cannot keep the global batch ({tr.micro_batch_size * per_dp} "
                f"sequences = micro {tr.micro_batch_size} x accum {tr.grad_accum_steps} x dp {par.dp_size}) in TP "
                f"groups of {par.replica_size} (at most {full} workers): the count must be tp_size x dp with dp dividing "
                f"{per_dp}. Nearest valid: {below + above}; all valid: {valid}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Strict dict -> dataclass conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        # nan passes every range check (nan <= 0 is False), so reject non-finite numbers here.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _unknown_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    prefix = f"{where}." if where else ""
    return ConfigError(f"{prefix}{key}: unknown key.{hint} Valid keys: {', '.join(valid)}.")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(where, str(key), list(fields))
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain dict (e.g. parsed YAML)."""
    return _from_dict(Config, data, "").validate()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.learning_rate=3e-5.")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.max_steps.")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for item in overrides:
        parts, value = _parse_override(item)
        cls: Any = Config
        node = data
        for depth, part in enumerate(parts):
            if cls is not None:
                names = [f.name for f in dataclasses.fields(cls)]
                if part not in names:
                    raise _unknown_key_error(".".join(parts[:depth]), part, names)
            if depth == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
            hint = typing.get_type_hints(cls)[part] if cls is not None else None
            cls = hint if hint is not None and dataclasses.is_dataclass(hint) else None
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a run YAML, apply `--set` overrides and validate; errors name the field and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(p)!r}.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--config: {str(p)!r} is not a text file (byte {e.start} is not UTF-8); pass a run YAML, e.g. "
            "accelerate_configs/tp2_dp2.yaml."
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections.")
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
