"""Ulysses sequence parallelism around AutoTP's mesh: a row's tokens split over the ranks of an SP group.

The ranks of an SP group hold the same weights and the same batch; each runs the model on 1/sp of
every row (global position ids, labels shifted before the split). Attention is the one place that
needs whole rows: there an all-to-all turns [batch, heads, seq/sp] into [batch, heads/sp, seq] for
query, key and value, the model's own attention kernel (sdpa, eager, flex, flash) runs on whole rows
of its heads, and a second all-to-all turns the output back. The heads are the TP rank's local
heads, so tp and sp compose: tp splits heads over the TP group, sp splits those over the SP group.

Why not DeepSpeed's `UlyssesSPAttentionHF` (deepspeed/runtime/sequence_parallel/ulysses_sp.py,
0.19.8): it builds its SP groups from consecutive ranks (parallel_state_sp.initialize_sequence_parallel),
the ranks AutoTP's mesh uses for its TP groups; it asserts the query shape against the model
config's head count, which AutoTP has divided by tp; and it drops the attention mask (sdpa then runs
plain causal, flex a hard-coded causal BlockMask), so packed documents would attend to each other.
Here the SP groups follow accel-tp's mesh (parallel.Topology), the heads are read off the tensors,
and the mask is rebuilt for the whole row from its position ids (documents restart at 0) and the
layer's sliding window.

The gradient: each SP rank's loss covers its own tokens, DeepSpeed averages gradients over its DP
group (sp x dp ranks, parallel.Topology.replicas), and the trainer's divisor counts them, so the
gradient is exactly that of the whole batch. Imports nothing of accel-tp.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SequenceParallel", "IGNORE_INDEX", "shard_inputs"]

IGNORE_INDEX = -100
# The attribute that ties an attention module to its SequenceParallel (None: not split).
_SP_ATTR = "_accel_tp_sequence_parallel"
# Marks a dispatcher we installed (so installing twice wraps once).
_DISPATCH_ATTR = "_accel_tp_ulysses_core"


class _AllToAll(torch.autograd.Function):
    """all_to_all over dim 0 (one chunk per rank). With equal chunks the exchange is its own
    inverse, so the backward sends the gradient through the same exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _seq_to_heads(x: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
    """[b, h, s/sp, d] (this rank's tokens, all its heads) -> [b, h/sp, s, d] (whole rows, its heads)."""
    b, h, s_local, d = x.shape
    x = x.reshape(b, sp, h // sp, s_local, d).permute(1, 0, 2, 3, 4)  # [sp(head chunk), b, h/sp, s/sp, d]
    x = _AllToAll.apply(x, group)  # chunk j now: rank j's tokens of my head chunk
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * s_local, d)


def _heads_to_seq(x: torch.Tensor, sp: int, group: Any) -> torch.Tensor:
    """[b, s, h/sp, d] (an attention output: whole rows, my heads) -> [b, s/sp, h, d]."""
    b, s, h_local, d = x.shape
    x = x.reshape(b, sp, s // sp, h_local, d).permute(1, 0, 2, 3, 4)  # [sp(token chunk), b, s/sp, h/sp, d]
    x = _AllToAll.apply(x, group)  # chunk j now: rank j's heads of my tokens
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // sp, sp * h_local, d)


def shard_inputs(inputs: dict[str, torch.Tensor], index: int, count: int) -> dict[str, torch.Tensor]:
    """Slice `index` of `count` of a micro-batch's model inputs along the sequence.

    Labels are shifted before the split (position i predicts token i + 1, also across a slice
    boundary) and handed over as `shift_labels` (Hugging Face's loss then does not shift again).
    Position ids are the row's own (document restarts under packing, 0..s-1 otherwise), so rotary
    embeddings see global positions. A padding mask is dropped: rows are right-padded and attention
    is causal, so no real token attends to padding (its labels are IGNORE_INDEX). The width is padded
    to a multiple of `count` with ignored tokens.
    """
    ids = inputs["input_ids"]
    b, s = ids.shape
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("sequence parallelism needs right-padded rows (a padding gap inside a row)")
    pos = inputs.get("position_ids")
    if pos is None:
        pos = torch.arange(s, dtype=torch.long).expand(b, s)
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    pad = -s % count
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        shifted = torch.nn.functional.pad(shifted, (0, pad), value=IGNORE_INDEX)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1)], dim=1)
    width = (s + pad) // count
    cut = slice(index * width, (index + 1) * width)
    local = shifted[:, cut].contiguous()
    return {
        "input_ids": ids[:, cut].contiguous(),
        "position_ids": pos[:, cut].contiguous(),
        # `labels` only tells the model to compute a loss; `shift_labels` are the targets.
        "labels": local,
        "shift_labels": local,
    }


def _documents(positions: torch.Tensor) -> torch.Tensor:
    """Document index of every position ([b, s]): a document starts where the position is 0."""
    return torch.cumsum(positions == 0, dim=1)


class SequenceParallel:
    """One rank's SP group, the split of its batches, and the attention that joins them."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        self.positions: torch.Tensor | None = None  # the whole rows' position ids while a split runs
        self._masks: dict[tuple, Any] = {}

    @classmethod
    def build(cls, sp_group_ranks: list[list[int]], rank: int) -> SequenceParallel:
        """Every rank creates every SP group (torch's rule for new_group), in the same order."""
        mine = None
        for ranks in sp_group_ranks:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = (group, len(ranks), ranks.index(rank))
        if mine is None:
            raise ValueError(f"rank {rank} is in no SP group of {sp_group_ranks}")
        return cls(*mine)

    # -- the batch -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def split(self, batch: Any, device: torch.device | str) -> Iterator[Any]:
        """This rank's slice of `batch` (an accel-tp Batch) on `device`, for a forward and its backward
        (activation checkpointing recomputes attention inside the backward). `label_tokens` becomes
        the slice's own count (evaluation weighs each slice's mean loss by it); the other counts stay
        the whole batch's."""
        inputs = batch.inputs
        full = inputs.get("position_ids")
        if full is None:
            b, s = inputs["input_ids"].shape
            full = torch.arange(s, dtype=torch.long).expand(b, s)
        local = shard_inputs(inputs, self.rank, self.size)
        pad = local["position_ids"].shape[1] * self.size - full.shape[1]
        if pad:
            full = torch.cat([full, full[:, -1:] + torch.arange(1, pad + 1)], dim=1)
        part = replace(
            batch,
            inputs={k: v.to(device, non_blocking=True) for k, v in local.items()},
            label_tokens=(local["shift_labels"] != IGNORE_INDEX).sum(),
        )
        self.positions, self._masks = full.to(device, non_blocking=True), {}
        try:
            yield part
        finally:
            self.positions, self._masks = None, {}

    # -- attention --------------------------------------------------------------------------------

    def install(self, model: torch.nn.Module, implementation: str) -> int:
        """Route the attention of `model`'s layers through the exchange; returns how many layers.

        The model's kernel is looked up per call (Transformers' ALL_ATTENTION_FUNCTIONS, or a
        modeling file's `eager_attention_forward`), so a dispatcher goes in its place that runs the
        exchange for modules tagged with this object and the kernel unchanged for every other model
        (an export's copy, a reference model in the same process)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        count = 0
        for module in model.modules():
            if not _is_attention(module):
                continue
            setattr(module, _SP_ATTR, self)
            count += 1
            if implementation == "eager":
                modeling = sys.modules[type(module).__module__]
                core = getattr(modeling, "eager_attention_forward", None)
                if core is None:
                    raise NotImplementedError(
                        f"{type(module).__name__}: no eager_attention_forward in {modeling.__name__} to split"
                    )
                if not hasattr(core, _DISPATCH_ATTR):
                    modeling.eager_attention_forward = _dispatcher(core, "eager")
        if implementation != "eager":
            core = ALL_ATTENTION_FUNCTIONS[implementation]
            if not hasattr(core, _DISPATCH_ATTR):
                ALL_ATTENTION_FUNCTIONS[implementation] = _dispatcher(core, implementation)
        if count == 0:
            raise NotImplementedError(f"{type(model).__name__}: found no attention layers to split")
        return count

    def attention(
        self,
        core: Callable[..., Any],
        implementation: str,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Ulysses around `core`: whole rows of 1/sp of this rank's heads, the output back to its tokens."""
        sp, group = self.size, self.group
        q_heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads < sp:
            # Fewer key-value heads than SP ranks: each rank gets a copy of the one its queries use.
            key = key.repeat_interleave(sp // kv_heads, dim=1)
            value = value.repeat_interleave(sp // kv_heads, dim=1)
        q = _seq_to_heads(query, sp, group)
        k = _seq_to_heads(key, sp, group)
        v = _seq_to_heads(value, sp, group)
        kwargs["position_ids"] = self.positions  # flash kernels find the documents from them
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        mask = self._mask(implementation, q.dtype, window)
        groups = module.num_key_value_groups if hasattr(module, "num_key_value_groups") else None
        try:
            if groups is not None:
                module.num_key_value_groups = q.shape[1] // k.shape[1]
            out, weights = core(module, q, k, v, mask, *args, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        assert out.shape[2] * sp == q_heads, (out.shape, q_heads)
        return _heads_to_seq(out, sp, group), weights

    def _mask(self, implementation: str, dtype: torch.dtype, window: int | None) -> Any:
        """The attention mask of the whole rows: causal, within a document, inside the sliding
        window; built once per split and kind (every layer of a forward shares it)."""
        key = (implementation, dtype, window)
        if key not in self._masks:
            self._masks[key] = _build_mask(self.positions, implementation, dtype, window)
        return self._masks[key]


def _build_mask(positions: torch.Tensor, implementation: str, dtype: torch.dtype, window: int | None) -> Any:
    doc = _documents(positions)
    b, s = positions.shape
    if implementation.startswith("flash") or "flash" in implementation:
        return None  # varlen kernels take documents from position_ids, causal and window themselves
    packed = bool((doc[:, -1] > 1).any())
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(bi: Any, hi: Any, qi: Any, ki: Any) -> Any:
            ok = (ki <= qi) & (doc[bi, qi] == doc[bi, ki])
            if window is not None:
                ok = ok & (qi - ki < window)
            return ok

        return create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=s, device=positions.device)
    if implementation == "sdpa" and not packed and (window is None or window >= s):
        return None  # sdpa runs its causal kernel
    q = torch.arange(s, device=positions.device)
    allowed = (q[None, :] <= q[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        allowed = allowed & (q[:, None] - q[None, :] < window)[None]
    allowed = allowed[:, None]  # [b, 1, s, s]
    if implementation == "sdpa":
        return allowed
    # eager adds the mask to the scores
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _is_attention(module: torch.nn.Module) -> bool:
    """A Transformers attention layer: it carries the head geometry its kernel reads."""
    return (
        hasattr(module, "num_key_value_groups")
        and hasattr(module, "head_dim")
        and type(module).__name__.endswith("Attention")
    )


def _dispatcher(core: Callable[..., Any], implementation: str) -> Callable[..., Any]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        sp = getattr(module, _SP_ATTR, None)
        if sp is None or sp.positions is None:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        # The model built attention_mask for this rank's tokens only; the exchange builds the rows'.
        return sp.attention(core, implementation, module, query, key, value, *args, **kwargs)

    setattr(attention, _DISPATCH_ATTR, core)
    return attention
