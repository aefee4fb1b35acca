"""Model and tokenizer loading. Knows nothing of ranks or parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .chat import set_chat_template
from .config import ConfigError, ModelSection
from .families import causal_lm_class, hf_config

__all__ = [
    "load_tokenizer",
    "model_config",
    "supported_attn_implementations",
    "check_attn_implementation",
    "build_meta_model",
    "build_model",
    "architecture_config",
    "model_fingerprint",
    "param_groups",
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
        try:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=section.trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            field = "model.tokenizer" if section.tokenizer else "model.name_or_path"
            where = "a folder that does not exist" if _looks_local(name) and not Path(name).exists() else "it"
            raise ConfigError(
                f"{field}: cannot load a tokenizer from {name!r} ({where}; {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else e!r}). Point it at a folder with tokenizer files "
                "or a hub id, or set model.tokenizer: default."
            ) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"model.tokenizer: {name!r} has neither a pad nor an eos token; pick another tokenizer."
            )
        tok.pad_token = tok.eos_token
    set_chat_template(tok, section.chat_template)  # the training data and the HF export both use it
    return tok


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


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
    return hf_config(section)


# transformers' class flags for each attention kernel (eager is always there).
_ATTN_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
}


def supported_attn_implementations(mconf: Any) -> list[str] | None:
    """The attention kernels the model's class supports (None: not a built-in class, e.g. remote code)."""
    cls = causal_lm_class(mconf)
    if cls is None:
        return None
    return ["eager"] + [name for name, flag in _ATTN_FLAGS.items() if getattr(cls, flag, False)]


def check_attn_implementation(section: ModelSection, mconf: Any) -> None:
    """Refuse a requested attention kernel the model does not support (None lets transformers pick)."""
    want = section.attn_implementation
    supported = supported_attn_implementations(mconf)
    if want is None or supported is None or want in supported:
        return
    raise ConfigError(
        f"model.attn_implementation: the {type(mconf).__name__.removesuffix('Config')} model does not support "
        f"{want!r}; it supports {supported}. Set one of those, or remove the key to let transformers choose."
    )


def build_meta_model(mconf: Any, trust_remote_code: bool = False) -> Any:
    """The model's modules on the meta device (no memory, no weights): for the driver's checks."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mconf, trust_remote_code=trust_remote_code)


def build_model(section: ModelSection, config: Any, seed: int) -> Any:
    """Pretrained weights from a hub id / directory, or a random init seeded identically on all ranks."""
    import torch
    from transformers import AutoModelForCausalLM

    check_attn_implementation(section, config)
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


def model_fingerprint(mconf: Any) -> str:
    """The model's type and tensor shapes, to tell its checkpoints from another model's."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    shape = "-".join(str(getattr(mconf, k, "?")) for k in keys)
    return f"{mconf.model_type}:{shape}:kv{getattr(mconf, 'num_key_value_heads', '?')}"


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed. Named, as
    DeepSpeed's MoE grouping needs (moe.utils.split_params_into_different_moe_groups_for_optimizer)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
