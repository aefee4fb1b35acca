"""Model and tokenizer loading. Knows nothing of ranks or parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelSection

__all__ = [
    "load_tokenizer",
    "model_config",
    "build_model",
    "architecture_config",
    "apply_liger_kernels",
    "compile_decoder_layers",
]

# Shapes for random-init models. The Qwen entries copy the published configs' shapes.
_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen2-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),
}


def load_tokenizer(section: ModelSection, cache_dir: Path) -> Any:
    """The run's tokenizer, with a pad token (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    name = section.tokenizer or section.name_or_path
    if name == "default":
        from .corpus import build_default_tokenizer

        tok = build_default_tokenizer(cache_dir / "tokenizers")
    else:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=section.trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"model.tokenizer: {name!r} has neither a pad nor an eos token; pick another tokenizer."
            )
        tok.pad_token = tok.eos_token
    return tok


def architecture_config(architecture: str, vocab_size: int) -> Any:
    """A Qwen2 config of a named shape; the vocab grows to fit the tokenizer if it must."""
    from transformers import Qwen2Config

    shape = dict(_SHAPES[architecture])
    # The embedding must cover every token id; round up to 64 for efficient matmuls.
    need = -(-vocab_size // 64) * 64
    shape["vocab_size"] = max(shape.get("vocab_size", 0), need)
    return Qwen2Config(**shape)


def model_config(section: ModelSection, vocab_size: int) -> Any:
    """The model's config, read without loading weights (cheap: used for up-front checks)."""
    if section.architecture is not None:
        return architecture_config(section.architecture, vocab_size)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: cannot read a model config from {section.name_or_path!r}: {e}"
        ) from e


def build_model(section: ModelSection, config: Any, seed: int) -> Any:
    """Pretrained weights from a hub id / directory, or a random init seeded identically on all ranks."""
    import torch
    from transformers import AutoModelForCausalLM

    if section.architecture is None:
        model = AutoModelForCausalLM.from_pretrained(
            section.name_or_path,
            trust_remote_code=section.trust_remote_code,
            attn_implementation=section.attn_implementation,
            dtype=torch.float32,
        )
    else:
        # Same seed on every rank: AutoTP shards the same full weights on each TP peer.
        torch.manual_seed(seed)
        config._attn_implementation = section.attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


# Liger's fused loss works through the tokens in chunks of about
# chunk_mem x hidden / vocab rows and adds each chunk's lm_head gradient into one buffer. Its default
# (1) cuts a 49k-token micro-batch into 96 chunks of 512 rows: skinny GEMMs, and the whole
# 151,936 x 896 gradient buffer is read and written 96 times. 8 gives 12 chunks of 4,096 rows
# (~1.2 GiB of bf16 logits per chunk). On an H100, 49k tokens: 80.6 ms per forward + backward with
# fp32 gradient sums, against 90.6 ms for Liger's own setting (1, bf16 sums); docs/performance.md.
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
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ConfigError(
            f"model.liger_kernel: liger-kernel is not importable ({e}); pip install liger-kernel "
            "(needs a GPU and triton) or set model.liger_kernel: false."
        ) from e
    # Liger only logs (at info level) for a model type it does not know; refuse instead.
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(
            f"model.liger_kernel: Liger has no kernels for model type {model_type!r}; set it false."
        )
    if layer_kernels:
        _apply_liger_kernel_to_instance(
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
        hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
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


def decoder_layers(model: Any) -> Any:
    """The model's list of transformer blocks (Hugging Face decoder-only layout)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(
            f"model.compile: cannot find the decoder layers of {type(model).__name__} "
            "(expected <model>.model.layers); set model.compile: false."
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
