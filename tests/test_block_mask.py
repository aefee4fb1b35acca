"""accel-tp's flex-attention block mask for document-packed rows (accel_tp/parallelize.py) against
the one Transformers builds for the same position ids (create_block_mask over its causal and
packed-sequence mask functions): the same blocks, in the same order, and the same mask per token.
CPU only (no attention kernel runs; tests/test_gpu.py runs flex attention with both)."""

from __future__ import annotations

import pytest
import torch

from accel_tp.tools.block_mask import document_block_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")
masking = pytest.importorskip("transformers.masking_utils")


def packed_positions(rows: int, length: int, seed: int, pad: bool = True) -> torch.Tensor:
    """Rows of documents (positions from 0 each), lengths from 1 to ~length/2, padding at the end
    as accel_tp.data's collate builds it (one more run of positions from 0)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        t = 0
        end = length - int(torch.randint(0, length // 4, (), generator=g)) if pad else length
        while t < end:
            n = min(end - t, int(torch.randint(1, length // 2, (), generator=g)))
            out[r, t : t + n] = torch.arange(n)
            t += n
        out[r, end:] = torch.arange(length - end)
    return out


def transformers_mask(pos: torch.Tensor):
    packed = masking.find_packed_sequence_indices(pos)
    fn = masking.causal_mask_function
    if packed is not None:
        fn = masking.and_masks(fn, masking.packed_sequence_mask_function(packed))
    rows, length = pos.shape
    return flex.create_block_mask(fn, rows, None, length, length, device="cpu", _compile=False)


def _blocks(count: torch.Tensor, index: torch.Tensor) -> list[list[int]]:
    flat_n, flat_i = count.reshape(-1), index.reshape(-1, index.shape[-1])
    return [flat_i[j, : int(flat_n[j])].tolist() for j in range(flat_n.numel())]


@pytest.mark.parametrize(
    "rows,length,seed,pad",
    [(3, 1024, 0, True), (2, 2048, 1, True), (4, 512, 2, False)],
)
def test_same_blocks_and_mask_as_transformers(rows, length, seed, pad):
    pos = packed_positions(rows, length, seed, pad)
    if seed == 2:
        pos[0] = torch.arange(length)  # one row a single document (Transformers' unpacked case)
    ours, theirs = document_block_mask(pos), transformers_mask(pos)
    assert ours.shape == theirs.shape == (rows, 1, length, length)
    for name in ("kv", "full_kv", "q", "full_q"):
        a = _blocks(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices"))
        b = _blocks(getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices"))
        assert a == b, name
    # Some blocks of each kind, so the comparison is not between two trivial masks.
    assert int(ours.full_kv_num_blocks.sum()) > 0
    assert int(ours.kv_num_blocks.sum()) > rows * (length // 128)
    dense = flex.create_mask(ours.mask_mod, rows, 1, length, length, device="cpu")
    assert torch.equal(dense, flex.create_mask(theirs.mask_mod, rows, 1, length, length, device="cpu"))
    # And the mask is what it should be: causal, within one document (padding its own).
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    want = (doc[:, :, None] == doc[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(dense[:, 0], want)


def test_the_forward_passes_the_mask_only_for_whole_blocks():
    from accel_tp.tools.block_mask import block_mask_forward

    seen = {}
    fwd = block_mask_forward(lambda **kw: seen.update(kw))
    fwd(input_ids=None, position_ids=packed_positions(2, 256, 3))
    assert isinstance(seen["attention_mask"], flex.BlockMask)
    seen.clear()
    fwd(position_ids=torch.arange(200)[None])  # not whole blocks: Transformers builds it
    assert "attention_mask" not in seen
    seen.clear()
    given = torch.ones(1, 256, dtype=torch.long)
    fwd(position_ids=torch.arange(256)[None], attention_mask=given)
    assert seen["attention_mask"] is given
