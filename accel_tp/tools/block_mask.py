"""A lever measured and not kept: flex attention's per-document block masks built by accel-tp.

`document_block_mask` builds the BlockMask of causal attention within each packed document in a
few tensor ops on the device (no host sync), the mask Transformers' `create_causal_mask` builds
with `create_block_mask` and a host sync in every forward. The masks are identical (same losses,
bit for bit), but the training step was not faster with them (docs/performance.md), so the
training path never uses this; it stays here, tested, for the benchmark to measure again
(`block_mask_forward` wraps a model's forward to pass the masks).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["document_block_mask", "block_mask_forward"]

# flex attention's default sparse block (what create_block_mask and Transformers use).
_MASK_BLOCK = 128


def block_mask_forward(inner: Any) -> Any:
    """A forward that turns packed rows' position_ids into a flex BlockMask passed as the attention
    mask (Transformers hands a ready 4-D mask to the attention layers as is); any other input
    (an attention mask given, no position ids, a length that is not whole blocks) goes to `inner`
    unchanged, and Transformers builds the mask as before."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        pos = kwargs.get("position_ids")
        if (
            pos is not None
            and kwargs.get("attention_mask") is None
            and pos.dim() == 2
            and pos.shape[1] % _MASK_BLOCK == 0
        ):
            kwargs["attention_mask"] = document_block_mask(pos)
        return inner(*args, **kwargs)

    return forward


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of the true blocks in each row of a boolean block matrix, indices in
    ascending order first: the layout BlockMask stores (as create_block_mask orders them)."""
    as_int = dense.to(torch.int32)
    count = as_int.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    # Contiguous, as create_block_mask's are (the q-side matrices arrive transposed).
    return count.contiguous(), order.contiguous()


def document_block_mask(position_ids: torch.Tensor, block: int = _MASK_BLOCK) -> Any:
    """The flex-attention BlockMask of causal attention within each packed document.

    Documents are split where position_ids do not step by one (Transformers'
    `find_packed_sequence_indices`), so this is the mask Transformers builds for packed rows
    (`causal_mask_function` and `packed_sequence_mask_function`), with the same block layout as
    `create_block_mask` gives: a kv block before a q block is full when both lie in one document,
    partial when they share one (the kv block's last document is the q block's first), empty
    otherwise; diagonal blocks are partial. Computed from per-block first/last document ids: a
    few (rows x blocks x blocks) tensor ops on the device instead of evaluating the mask per token,
    and no host sync. `position_ids`: (rows, length), length a multiple of `block`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = position_ids.shape
    if length % block:
        raise ValueError(f"length {length} is not a multiple of the block size {block}")
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1, dtype=torch.int32)
    n = length // block
    per_block = doc.view(rows, n, block)
    head, tail = per_block[..., 0], per_block[..., -1]  # each block's first and last document
    idx = torch.arange(n, device=position_ids.device)
    before = (idx[:, None] > idx[None, :])[None]  # [1, q block, kv block]: kv block strictly earlier
    # Document ids never decrease along a row, so a kv block before a q block shares a document
    # with it exactly when its last document is the q block's first, and is full when its first
    # is the q block's last.
    touching = before & (tail[:, None, :] == head[:, :, None])
    full = touching & (head[:, None, :] == tail[:, :, None])
    partial = (touching & ~full) | (idx[:, None] == idx[None, :])[None]
    partial, full = partial[:, None], full[:, None]  # [rows, heads (1: all alike), q, kv]
    kv_count, kv_index = _ordered(partial)
    full_kv_count, full_kv_index = _ordered(full)
    q_count, q_index = _ordered(partial.transpose(-2, -1))
    full_q_count, full_q_index = _ordered(full.transpose(-2, -1))

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return BlockMask(
        (length, length),
        kv_count,
        kv_index,
        full_kv_count,
        full_kv_index,
        q_count,
        q_index,
        full_q_count,
        full_q_index,
        (block, block),
        mask_mod,
    )
