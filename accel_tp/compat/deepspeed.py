"""DeepSpeed internals accel-tp relies on (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "keep_clipping_grad_norm",
    "universal_load",
    "universal_info_without_frozen",
    "vocab_splittable_embedding",
    "steps_beside_params",
]


def keep_clipping_grad_norm(engine: Any) -> bool:
    """Make `engine.get_global_grad_norm()` report the norm DeepSpeed clips with where it discards it.

    Without ZeRO and in fp32, DeepSpeed clips in `clip_fp32_gradients` with
    `runtime.utils.clip_grad_norm_` (TP-aware through `engine.mpu`, averaged over DP) and drops the
    norm it returns (deepspeed 0.19.8 runtime/engine.py:3503), so `get_global_grad_norm()` stays None.
    The same call, with its result kept where `get_global_grad_norm` reads it: one computation, the
    one that clipped. Returns whether it applied (stage 0, fp32, clipping on); without clipping
    DeepSpeed computes no norm at all and none is reported.
    """
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return False  # torch autocast (deepspeed.overrides): an inf norm is a step GradScaler skips
    if not engine.gradient_clipping() > 0.0:
        return False
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True


@contextmanager
def universal_load(engines: list[Any]) -> Iterator[None]:
    """Switch the engines' `load_universal_checkpoint` on for one load, then back (the engine reads
    this config flag in load_checkpoint; there is no load argument for it)."""
    if not engines:
        raise RuntimeError("resharding a checkpoint needs the DeepSpeed engine (accelerator.prepare) first.")
    configs = [e._config for e in engines]
    before = [c.load_universal_checkpoint for c in configs]
    for c in configs:
        c.load_universal_checkpoint = True
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c.load_universal_checkpoint = b
    for engine in engines:
        steps_beside_params(engine.optimizer)


def steps_beside_params(optimizer: Any) -> int:
    """After a universal load: DeepSpeed 0.19.8 restores each parameter's Adam `step` as a CPU
    tensor (runtime/zero/stage_1_and_2.py / stage3.py, universal loads), which torch's fused and
    capturable AdamW refuse ("state_steps is on cpu"; measured on an H100, tp2 -> tp1). Moves them
    to their parameter's device for those optimizers; returns how many moved."""
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    moved = 0
    for group in getattr(base, "param_groups", []):
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = base.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                base.state[p]["step"] = step.to(p.device)
                moved += 1
    return moved


def universal_info_without_frozen(module: Any) -> int:
    """Drop frozen parameters from the AutoTP universal-checkpoint schema DeepSpeed saves with
    every checkpoint (`module.UNIVERSAL_CHECKPOINT_INFO`, built at partition time over all
    parameters: module_inject/layers.py collect_autotp_universal_checkpoint_info). A checkpoint
    saved without its frozen weights (a LoRA run's base) has no slices for them, and the strict
    converter refuses a schema pattern that matched nothing (checkpoint/ds_to_universal.py
    "Unused patterns"). Returns how many patterns were dropped."""
    import re

    from deepspeed.checkpoint import constants as c

    info = getattr(module, c.UNIVERSAL_CHECKPOINT_INFO, None)
    if not info:
        return 0
    frozen = {rf"^{re.escape(n)}$" for n, p in module.named_parameters() if not p.requires_grad}
    dropped = 0
    for key in (
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        c.TP_REPLICATED_PARAMETER_PATTERNS,
        c.VOCABULARY_PARAMETER_PATTERNS,
    ):
        kept = [p for p in info.get(key, []) if p not in frozen]
        dropped += len(info.get(key, [])) - len(kept)
        info[key] = kept
    if c.PARAMETER_WITH_SUB_PARAMS in info:
        info[c.PARAMETER_WITH_SUB_PARAMS] = [
            d for d in info[c.PARAMETER_WITH_SUB_PARAMS] if not set(d["patterns"]) <= frozen
        ]
    for key in (c.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS, c.SUB_PARAM_SHARD_WIDTHS):
        if key in info:
            info[key] = {k: v for k, v in info[key].items() if k not in frozen}
    if c.AFFINE_MAP in info:
        params = info[c.AFFINE_MAP][c.AFFINE_MAP_PARAMS]
        info[c.AFFINE_MAP][c.AFFINE_MAP_PARAMS] = {k: v for k, v in params.items() if k not in frozen}
    return dropped


# Scaled word embeddings whose forward is, line for line, Gemma-3's (the weight's lookup times
# `embed_scale` in the weight's dtype), which DeepSpeed 0.19.8 alone lets it split by vocabulary
# (module_inject/layers.py VocabParallelEmbedding.validate_embedding checks the class by name).
# tests/test_vocab_parallel.py compares the forwards' source.
SCALED_AS_GEMMA3 = (
    ("transformers.models.gemma.modeling_gemma", "GemmaTextScaledWordEmbedding"),
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2TextScaledWordEmbedding"),
)


def vocab_splittable_embedding(model: Any) -> None:
    """Before AutoTP: let DeepSpeed split a tied input embedding by vocabulary with its head. A
    scaled embedding of SCALED_AS_GEMMA3 takes Gemma-3's class (the same forward, buffers and
    weight); any other it cannot split raises NotImplementedError with DeepSpeed's reason."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embedding is None or embedding.weight is not head.weight:
        return  # untied: DeepSpeed splits only the head
    kind = type(embedding)
    if (kind.__module__, kind.__name__) in SCALED_AS_GEMMA3:
        embedding.__class__ = Gemma3TextScaledWordEmbedding
    VocabParallelEmbedding.validate_embedding(embedding)
