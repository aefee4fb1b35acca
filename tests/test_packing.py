"""Sequence packing: no token lost or duplicated; document masking equals one-by-one training."""

from __future__ import annotations

import datasets
import pytest
import torch

from accel_tp.config import ModelSection
from accel_tp.data import DPShardedSampler, make_collate, pack_dataset, pack_rows, tokenize_dataset
from accel_tp.model import architecture_config, build_model

DOCS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], list(range(20, 33)), [40, 41]]


def test_concat_keeps_every_token_in_order():
    rows = pack_rows(DOCS, "concat", 5)["input_ids"]
    assert [t for r in rows for t in r] == [t for d in DOCS for t in d]
    assert all(len(r) == 5 for r in rows[:-1]) and 0 < len(rows[-1]) <= 5


def test_document_rows_restart_positions_and_keep_every_token():
    out = pack_rows(DOCS, "document", 8)
    rows, pos = out["input_ids"], out["position_ids"]
    assert sorted(t for r in rows for t in r) == sorted(t for d in DOCS for t in d)
    assert all(len(r) <= 8 and len(r) == len(p) for r, p in zip(rows, pos))
    # Rebuild the documents from the position resets: whole documents, long ones cut at 8.
    pieces = []
    for r, p in zip(rows, pos):
        for t, q in zip(r, p):
            if q == 0:
                pieces.append([])
            pieces[-1].append(t)
    expected = [d[i : i + 8] for d in DOCS for i in range(0, len(d), 8)]
    assert sorted(pieces) == sorted(expected)
    assert len(rows) == 4  # first-fit-decreasing: 30 tokens fill 4 rows of 8


@pytest.mark.parametrize("mode", ["concat", "document"])
def test_packed_rows_cover_corpus_once_per_epoch(default_tokenizer, mode):
    """Across DP ranks an epoch sees every packed row at most once, and misses < dp x micro rows."""
    ds = tokenize_dataset(
        datasets.Dataset.from_dict({"text": [f"document number {i} " * (1 + i % 7) for i in range(300)]}),
        default_tokenizer,
        None,
        2,
    )
    packed = pack_dataset(ds, mode, 64)
    total = sum(len(r) for r in ds["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == total  # packing itself loses nothing
    dp, micro = 3, 2
    for epoch in range(2):
        seen = []
        for rank in range(dp):
            s = DPShardedSampler(len(packed), rank, dp, micro, seed=5)
            seen += s.epoch_indices(epoch)
        assert len(seen) == len(set(seen)), "a row is duplicated across DP ranks"
        assert len(packed) - len(seen) < dp * micro


def test_document_mode_loss_equals_one_by_one(default_tokenizer):
    """fp32, CPU: a packed batch's token-mean loss equals the documents run one at a time."""
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Python is a programming language.",
        "A much longer document that talks about lists, tuples, dictionaries and sets in some detail.",
        "Short.",
        "Packing puts several documents into one row of the batch.",
    ]
    docs = tokenize_dataset(datasets.Dataset.from_dict({"text": texts}), default_tokenizer, None, 2)[
        "input_ids"
    ]
    torch.manual_seed(0)
    section = ModelSection(architecture="tiny", tokenizer="default", attn_implementation="sdpa")
    model = build_model(section, architecture_config("tiny", len(default_tokenizer)), seed=0).eval()
    pad = default_tokenizer.pad_token_id

    packed = pack_rows(docs, "document", 48)
    assert len(packed["input_ids"]) < len(docs), "the test must actually pack documents together"
    rows = [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])]
    batch = make_collate(pad, "longest", 48, "document")(rows)
    label_tokens = int(batch.label_tokens)
    batch = batch.inputs
    with torch.no_grad():
        packed_loss = model(**batch).loss.item()

        total, count = 0.0, 0
        for d in docs:
            one = make_collate(pad, "longest", 48)([{"input_ids": d}])
            n = int((one["labels"][:, 1:] != -100).sum())
            one = one.inputs
            total += model(**one).loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, rel=1e-5)
    assert label_tokens == count  # the trainer's loss divisor: no label crosses a document

    # Without the per-document positions (plain concatenation) attention crosses documents and
    # the loss differs: the equality above is not an accident.
    concat = make_collate(pad, "longest", 48, "concat")([{"input_ids": r} for r in packed["input_ids"]])
    concat = concat.inputs
    with torch.no_grad():
        assert model(**concat).loss.item() != pytest.approx(total / count, rel=1e-3)
