"""accel_tp.data: text sources, tokenization + cache, DP-sharded sampler, collate and loader."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

import accel_tp.data.tokenize as tokenize_mod
from accel_tp.config import ConfigError, DataSection
from accel_tp.corpus import build_default_tokenizer, load_default_corpus
from accel_tp.data import (
    Batch,
    DPShardedSampler,
    load_or_build_tokenized,
    load_text_dataset,
    make_collate,
    prepare_dataloader,
    tokenize_dataset,
)
from accel_tp.parallel import Topology


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep `datasets.load_dataset` caches out of ~/.cache/huggingface."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))


def rows(n: int, start_len: int = 1) -> datasets.Dataset:
    """n token sequences; sample i is [100+i] * (1 + i % 7) so every sample is recognisable."""
    return datasets.Dataset.from_dict({"input_ids": [[100 + i] * (start_len + i % 7) for i in range(n)]})


def sample_id(batch_row: torch.Tensor) -> int:
    return int(batch_row[0]) - 100


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return path


# --------------------------------------------------------------------------------------------
# DPShardedSampler


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 3, 4])
@pytest.mark.parametrize("num_samples", [37, 64, 103])
def test_sampler_shards_are_disjoint_equal_whole_batches(dp_size: int, micro: int, num_samples: int) -> None:
    shards = []
    for r in range(dp_size):
        s = DPShardedSampler(num_samples, r, dp_size, micro, seed=7)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    per_rank = num_samples // (dp_size * micro) * micro
    assert all(len(sh) == per_rank for sh in shards)  # equal, whole micro-batches
    assert per_rank % micro == 0 and per_rank > 0
    union = [i for sh in shards for i in sh]
    assert len(set(union)) == len(union)  # disjoint, no repeats within a shard either
    assert set(union) <= set(range(num_samples))
    dropped = num_samples - len(union)
    assert 0 <= dropped < dp_size * micro


def test_sampler_deterministic_per_seed_and_epoch() -> None:
    def order(seed: int, epoch: int, rank: int = 0) -> list[int]:
        s = DPShardedSampler(100, rank, 2, 5, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0)
    assert order(1, 2, rank=1) == order(1, 2, rank=1)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != list(range(0, 100, 2))[:50]  # actually shuffled
    # Different epochs still cover the same set of samples across ranks (when nothing is trimmed).
    assert sorted(order(1, 0) + order(1, 0, 1)) == sorted(order(1, 5) + order(1, 5, 1)) == list(range(100))


def test_sampler_without_shuffle_deals_round_robin() -> None:
    s0 = DPShardedSampler(11, 0, 2, 2, seed=0, shuffle=False)
    s1 = DPShardedSampler(11, 1, 2, 2, seed=0, shuffle=False)
    s1.set_epoch(4)
    assert list(s0) == [0, 2, 4, 6]
    assert list(s1) == [1, 3, 5, 7]


def test_sampler_rejects_bad_dp_rank() -> None:
    with pytest.raises(ValueError):
        DPShardedSampler(10, 2, 2, 1, seed=0)


@pytest.mark.parametrize(("world", "tp"), [(4, 2), (8, 2), (8, 4), (4, 4)])
def test_tp_peers_get_identical_batches_dp_groups_disjoint(world: int, tp: int) -> None:
    ds = rows(97)
    section = DataSection(seq_length=16)
    by_rank = {}
    for rank in range(world):
        loader = prepare_dataloader(ds, Topology(world, tp, rank), 3, 0, section, seed=11)
        loader.sampler.set_epoch(2)
        by_rank[rank] = list(loader.sampler)
        # the batches themselves carry those samples, in that order
        ids = [sample_id(row) for batch in loader.loader for row in batch["input_ids"]]
        assert ids == by_rank[rank]
    topo0 = Topology(world, tp, 0)
    for d in range(topo0.dp_size):
        group = topo0.tp_group_ranks(replica=d)
        assert all(by_rank[r] == by_rank[group[0]] for r in group)
    firsts = [by_rank[topo0.tp_group_ranks(replica=d)[0]] for d in range(topo0.dp_size)]
    flat = [i for f in firsts for i in f]
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize("start_batch", [0, 1, 4, 7, 8])
def test_set_epoch_start_batch_yields_the_tail(start_batch: int) -> None:
    micro = 3
    s = DPShardedSampler(50, 1, 2, micro, seed=5)
    assert s.batches_per_epoch == 8
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=start_batch)
    tail = list(s)
    assert tail == full[start_batch * micro :]
    assert len(s) == len(tail) == (8 - start_batch) * micro
    s.set_epoch(2)  # start_batch resets to 0
    assert list(s) == full


@pytest.mark.parametrize("dp_rank", [0, 1])
@pytest.mark.parametrize("start", [0, 1, 3, 4, 5, 9, 13])
def test_stream_resume_equals_skipped_uninterrupted_stream(start: int, dp_rank: int) -> None:
    ds = rows(40)
    section = DataSection(seq_length=16)
    topo = Topology(4, 2, rank=dp_rank * 2 + 1)
    loader = prepare_dataloader(ds, topo, 5, 0, section, seed=3)
    bpe = loader.batches_per_epoch
    assert bpe == 4
    total = 3 * bpe + 2  # crosses two epoch boundaries
    full = list(itertools.islice(loader.stream(), total))
    assert [e for e, _ in full] == [i // bpe for i in range(total)]
    # consecutive epochs are reshuffled
    assert [sample_id(r) for _, b in full[:bpe] for r in b["input_ids"]] != [
        sample_id(r) for _, b in full[bpe : 2 * bpe] for r in b["input_ids"]
    ]
    resumed = list(itertools.islice(loader.stream(start), total - start))
    assert len(resumed) == total - start
    for (e1, b1), (e2, b2) in zip(full[start:], resumed):
        assert e1 == e2
        assert b1.inputs.keys() == b2.inputs.keys()
        for k in b1.inputs:
            assert torch.equal(b1[k], b2[k])


def test_worker_processes_yield_the_same_stream() -> None:
    """data.num_workers builds batches in other processes; the stream, resumes included, is unchanged."""
    ds = rows(40)
    topo = Topology(4, 2, rank=3)
    inline = prepare_dataloader(ds, topo, 5, 0, DataSection(seq_length=16), seed=3)
    workers = prepare_dataloader(ds, topo, 5, 0, DataSection(seq_length=16, num_workers=2), seed=3)
    assert workers.loader.num_workers == 2
    for start in (0, 5):
        want = list(itertools.islice(inline.stream(start), 10))  # crosses epoch boundaries
        got = list(itertools.islice(workers.stream(start), 10))
        assert [e for e, _ in got] == [e for e, _ in want]
        for (_, b1), (_, b2) in zip(want, got):
            assert all(torch.equal(b1[k], b2[k]) for k in b1)


def test_stream_reads_each_epochs_shuffled_indices_in_order() -> None:
    """The endless pass yields exactly epoch_indices(e) in micro-batches, epoch after epoch,
    labelled with its epoch; an endless sampler refuses len()."""
    ds = rows(40)
    loader = prepare_dataloader(ds, Topology(2, 1, rank=1), 4, 0, DataSection(seq_length=16), seed=9)
    bpe = loader.batches_per_epoch
    got = list(itertools.islice(loader.stream(), 3 * bpe))
    for e in range(3):
        ids = [sample_id(r) for epoch, b in got[e * bpe : (e + 1) * bpe] for r in b["input_ids"]]
        assert {epoch for epoch, _ in got[e * bpe : (e + 1) * bpe]} == {e}
        assert ids == loader.sampler.epoch_indices(e)
    assert not loader.loader.pin_memory  # only for a CUDA run (the trainer passes pin_memory)
    with pytest.raises(TypeError, match="endless"):
        len(loader.sampler)


def test_prepare_dataloader_needs_one_batch_per_dp_rank() -> None:
    section = DataSection(seq_length=16)
    with pytest.raises(ConfigError) as e:
        prepare_dataloader(rows(7), Topology(4, 1), 2, 0, section, seed=0)
    assert (
        "7 sequences cannot fill one global batch of 8 (train.micro_batch_size 2 x grad_accum_steps 1 x 4"
        in str(e.value)
    )
    # TP does not multiply the need: 8 samples fill micro 2 on dp 4, also with tp 2 (world 8).
    assert prepare_dataloader(rows(8), Topology(4, 1), 2, 0, section, seed=0).batches_per_epoch == 1
    assert prepare_dataloader(rows(8), Topology(8, 2), 2, 0, section, seed=0).batches_per_epoch == 1
    with pytest.raises(ConfigError):
        prepare_dataloader(rows(7), Topology(8, 2), 2, 0, section, seed=0)


def test_prepare_dataloader_uses_section_padding_and_shuffle() -> None:
    section = DataSection(seq_length=32, padding="max_length", shuffle=False)
    loader = prepare_dataloader(rows(10), Topology(1, 1), 4, 9, section, seed=0)
    batch = next(iter(loader.loader))
    assert batch["input_ids"].shape == (4, 32)
    assert [sample_id(r) for r in batch["input_ids"]] == [0, 1, 2, 3]
    assert int(batch["input_ids"][0, -1]) == 9  # pad id


# --------------------------------------------------------------------------------------------
# make_collate


def check_labels(batch: dict[str, torch.Tensor]) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape
    assert torch.equal(labels == -100, mask == 0)
    assert torch.equal(labels[mask == 1], ids[mask == 1])


@pytest.mark.parametrize(
    ("lengths", "seq_length", "padding", "width"),
    [
        ([3, 9, 5], 64, "longest", 16),
        ([8, 2], 64, "longest", 8),
        ([1], 64, "longest", 8),
        ([17, 4], 64, "longest", 24),
        ([11, 3], 12, "longest", 12),  # rounded up to 16 but capped at seq_length
        ([3, 9, 5], 64, "max_length", 64),
        ([12], 12, "max_length", 12),
    ],
)
def test_collate_width_mask_and_labels(lengths: list[int], seq_length: int, padding: str, width: int) -> None:
    pad = 7
    rows_ = [{"input_ids": [10 + i + j for j in range(n)]} for i, n in enumerate(lengths)]
    batch = make_collate(pad, padding, seq_length)(rows_)
    assert batch["input_ids"].shape == (len(lengths), width)
    check_labels(batch)
    for i, (r, n) in enumerate(zip(rows_, lengths)):
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][i, n:] == pad).all()
    # Metadata: every real token, and each target (a real token after the first of its row).
    assert int(batch.real_tokens) == sum(lengths)
    assert int(batch.label_tokens) == sum(n - 1 for n in lengths)


def test_collate_labels_follow_mask_not_pad_id() -> None:
    # pad falls back to eos for many tokenizers: a real eos (same id as pad) must keep its label.
    eos = 0
    batch = make_collate(eos, "longest", 64)([{"input_ids": [5, 6, eos]}, {"input_ids": [eos, eos]}])
    check_labels(batch)
    assert batch["labels"][0, :3].tolist() == [5, 6, eos]
    assert batch["labels"][1, :2].tolist() == [eos, eos]
    assert (batch["labels"][:, 3:] == -100).all()


# --------------------------------------------------------------------------------------------
# tokenize_dataset


def test_tokenize_appends_eos_truncates_and_drops_short(default_tokenizer) -> None:
    tok = default_tokenizer
    eos = tok.eos_token_id
    long_text = " ".join(["interpreter statement expression"] * 20)
    texts = ["", "a", "The quick brown fox.", long_text]
    out = tokenize_dataset(datasets.Dataset.from_dict({"text": texts}), tok, seq_length=16, min_tokens=2)
    assert out.column_names == ["input_ids"]
    expected = []
    for t in texts:
        ids = (tok(t, add_special_tokens=False)["input_ids"] + [eos])[:16]
        if len(ids) >= 2:
            expected.append(ids)
    assert [list(x) for x in out["input_ids"]] == expected
    got = [list(x) for x in out["input_ids"]]
    assert len(got) == 3  # "" -> [eos] (1 token) is dropped
    assert got[0] == [*tok("a", add_special_tokens=False)["input_ids"], eos]
    assert got[1][-1] == eos and len(got[1]) < 16
    assert len(got[2]) == 16 and got[2][-1] != eos  # truncated: eos cut off

    stricter = tokenize_dataset(datasets.Dataset.from_dict({"text": texts}), tok, seq_length=16, min_tokens=3)
    assert [list(x) for x in stricter["input_ids"]] == [g for g in got if len(g) >= 3]
    assert len(stricter) == 2


# --------------------------------------------------------------------------------------------
# load_text_dataset


def test_embedded_source_is_the_corpus() -> None:
    ds = load_text_dataset(DataSection(source="embedded"))
    corpus = load_default_corpus()
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == corpus
    part = load_text_dataset(DataSection(source="embedded", percentage=10))
    assert list(part["text"]) == corpus[: math.ceil(len(corpus) * 0.1)]


def test_txt_files(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.TXT"
    a.write_text("first line\nsecond line\n")
    b.write_text("third line\n")
    ds = load_text_dataset(DataSection(source="files", files=[str(a), str(b)]))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == ["first line", "second line", "third line"]


def test_jsonl_files_rename_text_field_and_percentage(tmp_path: Path) -> None:
    recs = [{"id": i, "content": f"document number {i}"} for i in range(10)]
    p = write_jsonl(tmp_path / "d.jsonl", recs)
    ds = load_text_dataset(DataSection(source="files", files=[str(p)], text_field="content"))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == [r["content"] for r in recs]
    part = load_text_dataset(DataSection(source="files", files=[str(p)], text_field="content", percentage=30))
    assert list(part["text"]) == [r["content"] for r in recs[:3]]


def test_json_and_jsonl_mix(tmp_path: Path) -> None:
    p1 = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    p2 = write_jsonl(tmp_path / "b.json", [{"text": "two"}])
    ds = load_text_dataset(DataSection(source="files", files=[str(p1), str(p2)]))
    assert list(ds["text"]) == ["one", "two"]


def test_parquet_files(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "d.parquet", {"body": ["x y", "z"], "n": [1, 2]})
    ds = load_text_dataset(DataSection(source="files", files=[str(p)], text_field="body"))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == ["x y", "z"]


def test_missing_text_field_lists_columns(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"body": "hi", "id": 1}])
    with pytest.raises(ConfigError) as e:
        load_text_dataset(DataSection(source="files", files=[str(p)]))
    msg = str(e.value)
    assert "data.text_field: column 'text' not in the dataset" in msg
    assert "'body'" in msg and "'id'" in msg


def test_mixed_file_kinds_rejected(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("x\n")
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    with pytest.raises(ConfigError, match="all files must be one kind"):
        load_text_dataset(DataSection(source="files", files=[str(a), str(b)]))


def test_unknown_file_kind_rejected(tmp_path: Path) -> None:
    c = tmp_path / "a.csv"
    c.write_text("text\nx\n")
    with pytest.raises(ConfigError, match="all files must be one kind"):
        load_text_dataset(DataSection(source="files", files=[str(c)]))


def test_missing_file_rejected(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("x\n")
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as e:
        load_text_dataset(DataSection(source="files", files=[str(a), str(missing)]))
    assert "data.files: not found" in str(e.value) and str(missing) in str(e.value)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    """A local dataset folder: `datasets.load_dataset(<dir>)` reads it like a hub repo."""
    d = tmp_path / "hub-ds"
    d.mkdir()
    write_parquet(
        d / "train.parquet", {"body": [f"hub document {i}" for i in range(10)], "n": list(range(10))}
    )
    return d


def test_hub_source_from_local_dir(hub_dir: Path) -> None:
    ds = load_text_dataset(DataSection(source="hub", name=str(hub_dir), text_field="body"))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == [f"hub document {i}" for i in range(10)]


@pytest.mark.parametrize(("percentage", "count"), [(50, 5), (30, 3), (100, 10)])
def test_hub_percentage_selects_prefix(hub_dir: Path, percentage: float, count: int) -> None:
    ds = load_text_dataset(
        DataSection(source="hub", name=str(hub_dir), text_field="body", percentage=percentage)
    )
    assert list(ds["text"]) == [f"hub document {i}" for i in range(count)]


def test_hub_fractional_percentage(tmp_path: Path) -> None:
    d = tmp_path / "hub-40"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": f"doc {i}"} for i in range(40)])
    ds = load_text_dataset(DataSection(source="hub", name=str(d), percentage=2.5))
    assert list(ds["text"]) == ["doc 0"]


def test_hub_jsonl_dir_and_missing_field(tmp_path: Path) -> None:
    d = tmp_path / "hub-jsonl"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": "alpha", "meta": 1}, {"text": "beta", "meta": 2}])
    ds = load_text_dataset(DataSection(source="hub", name=str(d)))
    assert ds.column_names == ["text"] and list(ds["text"]) == ["alpha", "beta"]
    with pytest.raises(ConfigError, match=r"data.text_field: column 'body' not in the dataset"):
        load_text_dataset(DataSection(source="hub", name=str(d), text_field="body"))


def test_hub_unloadable_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_text_dataset(DataSection(source="hub", name=str(tmp_path / "does-not-exist")))
    assert "data.name: cannot load dataset" in str(e.value)
    assert "does-not-exist" in str(e.value)


# --------------------------------------------------------------------------------------------
# load_or_build_tokenized


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "tokenized").iterdir())


def test_tokenized_cache_build_reuse_and_keys(tmp_path: Path, default_tokenizer, monkeypatch) -> None:
    src = write_jsonl(
        tmp_path / "d.jsonl", [{"text": f"the value of item {i} is {i * i}"} for i in range(12)]
    )
    cache = tmp_path / "cache"
    section = DataSection(source="files", files=[str(src)], seq_length=8, cache_dir=str(cache))
    barrier_calls = []

    def barrier() -> None:
        barrier_calls.append(1)

    first = load_or_build_tokenized(section, default_tokenizer, True, barrier)
    assert barrier_calls == [1]
    assert len(entries(cache)) == 1 and not entries(cache)[0].startswith(".")
    expected = tokenize_dataset(load_text_dataset(section), default_tokenizer, 8, 2)
    assert [list(x) for x in first["input_ids"]] == [list(x) for x in expected["input_ids"]]
    assert len(first) == 12

    # Same settings: read back, never re-tokenized (also on non-main ranks).
    def no_tokenize(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("re-tokenized although the cache exists")

    monkeypatch.setattr(tokenize_mod, "tokenize_text_dataset", no_tokenize)
    for is_main in (True, False):
        again = load_or_build_tokenized(section, default_tokenizer, is_main, barrier)
        assert [list(x) for x in again["input_ids"]] == [list(x) for x in first["input_ids"]]
    assert len(entries(cache)) == 1
    monkeypatch.undo()

    # A different seq_length: a new entry.
    longer = DataSection(source="files", files=[str(src)], seq_length=16, cache_dir=str(cache))
    out = load_or_build_tokenized(longer, default_tokenizer, True, barrier)
    assert len(entries(cache)) == 2
    assert max(len(x) for x in out["input_ids"]) > 8

    # A different tokenizer: another new entry, with other ids.
    small_tok = build_default_tokenizer(tmp_path / "tok512", vocab_size=512)
    out_small = load_or_build_tokenized(section, small_tok, True, barrier)
    assert len(entries(cache)) == 3
    assert [list(x) for x in out_small["input_ids"]] != [list(x) for x in first["input_ids"]]

    # Changed file contents: a new entry, not the stale one.
    write_jsonl(src, [{"text": "completely different text here"}] * 3)
    changed = load_or_build_tokenized(section, default_tokenizer, True, barrier)
    assert len(changed) == 3 and len(entries(cache)) == 4


def test_tokenized_empty_result_raises(tmp_path: Path, default_tokenizer) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": ""}])
    section = DataSection(source="files", files=[str(src)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        ConfigError, match=r"data \(train\): no documents with >= 2 tokens in the .files. source"
    ):
        load_or_build_tokenized(section, default_tokenizer, True, lambda: None)


def test_tokenized_min_tokens_above_seq_length_is_empty(tmp_path: Path, default_tokenizer) -> None:
    section = DataSection(
        source="embedded", percentage=1, seq_length=8, min_tokens=9, cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(ConfigError, match="no documents with >= 9 tokens"):
        load_or_build_tokenized(section, default_tokenizer, True, lambda: None)


def test_collate_counts_attention_per_document_when_packed():
    """The FLOP count's attention context: sum of n^2 over documents under document packing (a
    token attends within its own document), real tokens x seq_length otherwise."""
    from accel_tp.data import make_collate

    rows = [
        {"input_ids": list(range(7)), "position_ids": [0, 1, 2, 0, 1, 0, 1]},  # documents 3, 2, 2
        {"input_ids": list(range(4)), "position_ids": [0, 1, 2, 3]},  # one document of 4
    ]
    packed = make_collate(0, "longest", 8, "document")(rows)
    assert float(packed.attn_context) == 3**2 + 2**2 + 2**2 + 4**2
    flat = make_collate(0, "longest", 8, "concat")([{"input_ids": list(range(8))}])
    assert float(flat.attn_context) == 8 * 8
    unpacked = make_collate(0, "longest", 16, "none")([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert float(unpacked.attn_context) == 4 * 16


def test_batch_splits_model_inputs_from_counts():
    """Batch: only model inputs in `inputs` (a model called with them must not see the counts),
    the counts as fields, kept on the host by .to()."""
    rows = [{"input_ids": list(range(5)), "position_ids": [0, 1, 2, 0, 1]}, {"input_ids": [1, 2]}]
    rows[1]["position_ids"] = [0, 1]
    batch = make_collate(0, "longest", 8, "document")(rows)
    assert isinstance(batch, Batch) and set(batch.inputs) == {"input_ids", "labels", "position_ids"}
    assert float(batch.real_tokens) == 7 and float(batch.attn_context) == 3**2 + 2**2 + 2**2
    # Labels: every token but each document's first (and the row's first).
    assert int(batch.label_tokens) == int((batch.inputs["labels"][:, 1:] != -100).sum()) == 7 - 3
    moved = batch.to("meta")
    assert all(v.device.type == "meta" for v in moved.inputs.values())
    assert moved.real_tokens.device.type == "cpu"
    assert {k: v.shape for k, v in batch.first(1).items()} == {k: (1, 8) for k in batch.inputs}


@pytest.mark.parametrize("split", [(4, 1, 2), (1, 4, 2), (2, 1, 4), (1, 2, 4), (8, 1, 1)])
def test_every_split_of_a_global_batch_serves_the_same_samples_per_step(split) -> None:
    """The data position is in samples: with global batch 8 = micro x accum x dp, step s covers
    the same samples however 8 is split, across epochs too (each epoch is whole global batches)."""
    from accel_tp.data import DPShardedSampler

    def steps(mb: int, ga: int, dp: int, epochs: int = 3) -> list[set[int]]:
        per_rank = []
        for r in range(dp):
            s = DPShardedSampler(43, r, dp, mb, seed=5, grad_accum_steps=ga)
            s.set_epoch(0, endless=True)
            it = iter(s)
            per_rank.append([next(it) for _ in range(s.batches_per_epoch * mb * epochs)])
        n_steps = len(per_rank[0]) // (mb * ga)
        return [{i for r in per_rank for i in r[k * mb * ga : (k + 1) * mb * ga]} for k in range(n_steps)]

    base = steps(2, 2, 2)
    assert len(base) == 3 * (43 // 8) and all(len(step) == 8 for step in base)
    assert steps(*split) == base
