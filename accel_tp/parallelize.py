"""Speed levers, applied in one place after the model is built and around DeepSpeed's sharding.

Like torchtitan's `parallelize`: model loading (accel_tp/model.py) builds a plain Hugging Face
model; this module decides what runs on top of it. Liger's kernels and activation checkpointing go
on before AutoTP shards the model, torch.compile of the decoder layers after (so the compiled
graphs include AutoTP's sharded linears). `check_device_support` is the one rule for which
levers and attention kernels a device can run, used by the driver and by every worker.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat.deepspeed import vocab_splittable_embedding
from .compat.liger import liger_api
from .config import Config, ConfigError, ModelSection
from .experts import expert_layers
from .families import localize_attention, partition_for, plain_head, vocabulary_split
from .sequence_parallel import SequenceParallel
from .vocab_parallel import DEFAULT_CHUNK_TOKENS, vocab_parallel_head, vocab_parallel_loss_forward

__all__ = [
    "check_device_support",
    "apply_before_sharding",
    "apply_after_sharding",
    "apply_liger_kernels",
    "compile_decoder_layers",
    "checkpointed_layer_count",
    "enable_activation_checkpointing",
    "install_vocab_parallel_loss",
    "prepare_vocabulary_split",
    "FUSED_LOSS_CHUNK_MEM",
]


def check_device_support(section: ModelSection, device_type: str) -> None:
    """Refuse GPU-only kernels for CPU workers (`device_type` "cpu" or "cuda")."""
    if device_type != "cpu":
        return
    if section.liger_kernel:
        raise ConfigError(
            "model.liger_kernel: Liger's kernels are Triton (GPU) kernels and this run's workers are CPU "
            "workers; set it false (or run on GPUs)."
        )
    if section.attn_implementation in ("flex_attention", "flash_attention_2"):
        raise ConfigError(
            f"model.attn_implementation: {section.attn_implementation} needs a GPU (no CPU backward); "
            "use sdpa on CPU."
        )


def apply_before_sharding(model: Any, cfg: Config, tp_size: int) -> list[str]:
    """Levers on the whole model, before DeepSpeed shards it; returns what was applied."""
    applied = []
    if cfg.model.liger_kernel:
        # Under AutoTP the lm_head is vocab-sharded; the fused loss would read one shard as the whole.
        # With model.compile the compiler fuses norms, rotary and SwiGLU itself, and is faster
        # than Liger's kernels inside the compiled layers (docs/performance.md); Liger then adds only
        # the fused linear cross-entropy.
        kernels = apply_liger_kernels(
            model, fused_linear_cross_entropy=tp_size == 1, layer_kernels=not cfg.model.compile
        )
        applied.append(f"Liger ({', '.join(kernels)})")
    if cfg.model.activation_checkpointing:
        applied.append(enable_activation_checkpointing(model, cfg.model.activation_checkpointing))
    prepare_vocabulary_split(model, cfg)
    return applied


def prepare_vocabulary_split(model: Any, cfg: Config) -> None:
    """Before AutoTP, when it will split the head by vocabulary (families.vocabulary_split): a tied
    embedding must be one DeepSpeed can split with it (compat.deepspeed.vocab_splittable_embedding),
    else a ConfigError names the setting. The training and the export both call it."""
    if not vocabulary_split(cfg)[0]:
        return
    try:
        vocab_splittable_embedding(model)
    except NotImplementedError as e:
        raise ConfigError(
            f"parallelism.vocab_parallel_loss: the {model.config.model_type!r} model's embedding is tied to its "
            f"output head and DeepSpeed cannot split it by vocabulary ({e}); set "
            "parallelism.vocab_parallel_loss: false (every rank then holds the whole logits)."
        ) from e


def checkpointed_layer_count(setting: bool | int, num_layers: int) -> int:
    """How many decoder layers `model.activation_checkpointing` recomputes (true: all of them)."""
    if setting is True:
        return num_layers
    if setting is False:
        return 0
    if setting > num_layers:
        raise ConfigError(
            f"model.activation_checkpointing: {setting} layers, but the model has {num_layers}; use a count "
            f"<= {num_layers}, or true for every layer."
        )
    return setting


def enable_activation_checkpointing(model: Any, setting: bool | int) -> str:
    """Transformers' non-reentrant checkpointing on all decoder layers, then off again on all but
    the first N (each layer checks its own flag), so a run trades only as much recompute for
    memory as it needs. Returns what was applied."""
    layers = decoder_layers(model, "model.activation_checkpointing")
    n = checkpointed_layer_count(setting, len(layers))
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in list(layers)[n:]:
        layer.gradient_checkpointing = False
    return f"activation checkpointing ({n} of {len(layers)} layers)"


def apply_after_sharding(module: Any, cfg: Config, sp: SequenceParallel | None = None) -> list[str]:
    """Fix-ups and levers on the sharded module (the engine's `.module`); returns the levers applied.
    `sp`: this rank's SP group (sequence parallelism), whose exchange goes around every attention."""
    tp = cfg.parallelism.tp_size
    localize_attention(module, partition_for(cfg.model, tp), tp)  # before compile traces the forward
    applied = []
    experts = list(expert_layers(module).values())
    if experts:
        layer = experts[0]
        applied.append(
            f"expert parallel (AutoEP: {layer.num_local_experts} of {layer.num_experts} experts per rank, "
            f"ep {layer.ep_size}, {len(experts)} MoE layers)"
        )
    if sp is not None:
        n = sp.install(module, module.config._attn_implementation)
        applied.append(f"Ulysses sequence parallel ({sp.size} ranks, {n} attention layers)")
    loss = install_vocab_parallel_loss(module, cfg)
    if loss:
        applied.append(loss)
    if cfg.model.compile:
        applied.append(f"compiled {compile_decoder_layers(module)} decoder layers")
    return applied


def install_vocab_parallel_loss(module: Any, cfg: Config) -> str | None:
    """At tp > 1 with the head split by vocabulary (families.vocabulary_split): the training loss
    from the final hidden states and this rank's head rows, in chunks of tokens, for a model whose
    forward is head-then-loss (families.plain_head); for any other, its own forward with the
    vocabulary-parallel loss DeepSpeed installed. Returns what runs (None: the whole-vocabulary loss)."""
    split, why = vocabulary_split(cfg)
    if not split:
        return f"whole-vocabulary logits on every rank ({why})" if cfg.parallelism.tp_size > 1 else None
    head = vocab_parallel_head(module)
    if head is None:  # DeepSpeed raises first when it cannot split the head (engine.py finalize_autotp)
        raise RuntimeError("parallelism.vocab_parallel_loss: AutoTP left the output head unsplit")
    if not plain_head(module.config):
        kind = module.config.model_type
        return f"vocabulary-parallel head, DeepSpeed's loss (the {kind} forward transforms its logits)"
    module.forward = vocab_parallel_loss_forward(module, head, chunk_tokens=DEFAULT_CHUNK_TOKENS)
    rows = head.vocab_end_index - head.vocab_start_index
    return f"vocabulary-parallel loss ({rows} of {head.vocab_size} rows per rank, {DEFAULT_CHUNK_TOKENS}-token chunks)"


# Liger's fused loss works through the tokens in chunks of about
# chunk_mem x hidden / vocab rows and adds each chunk's lm_head gradient into one buffer. Its default
# (1) cuts a 49k-token micro-batch into 96 chunks of 512 rows: skinny GEMMs, and the whole
# 151,936 x 896 gradient buffer is read and written 96 times. 8 gives 12 chunks of 4,096 rows
# (~1.2 GiB of bf16 logits per chunk), which measured faster than Liger's own setting even with
# fp32 gradient sums (docs/performance.md).
FUSED_LOSS_CHUNK_MEM = 8


def apply_liger_kernels(
    model: Any, fused_linear_cross_entropy: bool, layer_kernels: bool = True
) -> list[str]:
    """Swap in Liger's Triton kernels on this model instance (GPU only); returns their names.

    `fused_linear_cross_entropy` computes the loss from the last hidden states and the lm_head
    weight in chunks, so the (tokens x vocab) logits are never stored; it reads lm_head.weight
    directly and is only correct when that weight is whole (not vocab-sharded by tensor parallelism).
    """
    try:
        apply_to_instance, liger_fused_linear_cross_entropy, known_types = liger_api()
    except ImportError as e:
        raise ConfigError(
            f"model.liger_kernel: liger-kernel is not importable ({e}); pip install liger-kernel "
            "(needs a GPU and triton) or set model.liger_kernel: false."
        ) from e
    # Liger only logs (at info level) for a model type it does not know; refuse instead.
    model_type = getattr(model.config, "model_type", None)
    if model_type not in known_types:
        raise ConfigError(
            f"model.liger_kernel: Liger has no kernels for model type {model_type!r}; set it false."
        )
    if layer_kernels:
        apply_to_instance(
            model=model, fused_linear_cross_entropy=False, rope=True, rms_norm=True, swiglu=True
        )
    applied = []
    if fused_linear_cross_entropy:
        # Our own forward rather than Liger's: its Transformers integration leaves the lm_head
        # gradient accumulating in the weight's dtype (bf16) and its chunks small.
        model.forward = _fused_loss_forward(model, liger_fused_linear_cross_entropy)
        applied.append("fused linear cross-entropy")
    return applied + (["RMSNorm", "RoPE", "SwiGLU"] if layer_kernels else [])


def _fused_loss_forward(model: Any, fused_loss: Any) -> Any:
    """A forward for `model` that, in training with labels, returns only the loss, computed by
    `fused_loss` from the final hidden states (Hugging Face's causal-LM loss: labels shifted by one,
    -100 ignored, summed over tokens and divided by `num_items_in_batch` when given, else the mean).
    In eval mode or without labels the model's own forward runs, so evaluation and the export
    check get logits (as with Liger's own integration)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    full_forward = model.forward
    base = getattr(model, model.base_model_prefix)

    def forward(
        input_ids: Any = None, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any
    ) -> Any:
        if labels is None or not model.training:
            return full_forward(
                input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        shift_labels = kwargs.pop("shift_labels", None)  # already shifted (sequence parallelism)
        hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
        if shift_labels is not None:
            target = shift_labels
        else:
            target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = fused_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            model.lm_head.weight,
            target.reshape(-1).to(hidden.device),
            bias=model.lm_head.bias,
            reduction="mean" if num_items_in_batch is None else "sum",
            # fp32 sum of the per-chunk lm_head gradients (cast to the weight's dtype once at the end).
            accum_dtype=torch.float32,
            chunk_mem_const=FUSED_LOSS_CHUNK_MEM,
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss)

    return forward


def decoder_layers(model: Any, field: str = "model.compile") -> Any:
    """The model's list of transformer blocks (Hugging Face decoder-only layout); `field` is the
    setting that needs them (named in the error)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(
            f"{field}: cannot find the decoder layers of {type(model).__name__} "
            f"(expected <model>.model.layers); set {field}: false."
        )
    return layers


def compile_decoder_layers(model: Any) -> int:
    """torch.compile each decoder layer in place; the embedding and loss stay eager.

    Layer by layer rather than the whole model: one graph is compiled once and reused by every
    layer, the compile time stays short, and DeepSpeed's hooks on the model are untouched.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
