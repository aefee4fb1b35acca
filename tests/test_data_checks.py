"""Bad text data fails up front: on the driver's preflight (check_data_sources), naming the file and
row, as a DataError; and a document cut to data.seq_length is counted in one line."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from accel_tp.config import DataSection
from accel_tp.corpus import load_default_corpus
from accel_tp.data import build_rows, check_data_sources
from accel_tp.data.tokenize import tokenize_text_dataset
from accel_tp.errors import DataError, UserError

GOOD = [{"text": "a first document"}, {"text": ""}, {"text": "caf\u00e9 \u2014 \u65e5\u672c"}]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))


def files(path: Path, **kw) -> DataSection:
    return DataSection(source="files", files=[str(path)], **kw)


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize(
    "value,what", [(42, r"a number \(42\)"), (None, "null"), (["a", "b"], "a list"), ({"t": 1}, "an object")]
)
def test_a_text_row_that_is_not_a_string_is_refused_naming_file_and_row(tmp_path, suffix, value, what):
    path = write_rows(tmp_path / f"d{suffix}", [*GOOD, {"text": value}])
    with pytest.raises(
        DataError, match=rf"data.text_field: '{re.escape(str(path))}' row 4: 'text' holds {what}"
    ):
        check_data_sources(files(path))


def test_good_text_rows_pass(tmp_path):
    """Not too strict: strings (empty ones and non-ASCII included) in every kind of file pass."""
    for name in ("d.jsonl", "d.json"):
        check_data_sources(files(write_rows(tmp_path / name, GOOD)))
    pq.write_table(pa.table({"text": [r["text"] for r in GOOD]}), tmp_path / "d.parquet")
    check_data_sources(files(tmp_path / "d.parquet"))
    (tmp_path / "d.txt").write_text("a first line\n\ncaf\u00e9 \u2014 \u65e5\u672c\n", encoding="utf-8")
    check_data_sources(files(tmp_path / "d.txt"))


@pytest.mark.parametrize("statistics", [True, False])
def test_a_null_in_a_parquet_text_column_names_its_row(tmp_path, statistics):
    """The row counts across row groups; with or without the row groups' null counts."""
    texts = [f"document {i}" for i in range(25)]
    texts[17] = None
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10, write_statistics=statistics)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    with pytest.raises(DataError, match=rf"'{re.escape(str(path))}' row 18: 'text' holds null"):
        check_data_sources(files(path))


@pytest.mark.parametrize(
    "column,kind",
    [(pa.array([1, 2, 3]), r"int64 \(row 1 holds a number \(1\)\)"), (pa.array([["a"]]), "list")],
)
def test_a_parquet_text_column_of_another_type_is_refused(tmp_path, column, kind):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": column}), path)
    with pytest.raises(DataError, match=rf"'{re.escape(str(path))}' column 'body' is of type {kind}"):
        check_data_sources(files(path, text_field="body"))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_that_is_not_utf8_is_refused_naming_byte_and_line(tmp_path, suffix):
    lines = ["first line", "second line", "caf\u00e9 au lait"]
    if suffix == ".jsonl":
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in lines]
    raw = "\n".join(lines).encode("latin-1")
    path = tmp_path / f"d{suffix}"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"'{re.escape(str(path))}' is not UTF-8 text: byte {offset} \(line 3\)"
    ):
        check_data_sources(files(path))


def test_the_workers_name_a_bad_row_of_any_source(default_tokenizer):
    """Where the driver checks nothing (a hub dataset), tokenization names the document, not tokenizers."""
    ds = datasets.Dataset.from_dict({"text": ["fine", None, "also fine"]})
    with pytest.raises(DataError, match=r"data.text_field: document 2 holds null"):
        tokenize_text_dataset(ds, default_tokenizer, 16, 2)


def test_data_errors_are_user_errors():
    assert issubclass(DataError, UserError)


def test_preflight_of_the_shipped_corpus_is_quick(tmp_path):
    """The embedded corpus as every kind of file: each check well within the preflight budget."""
    docs = load_default_corpus()
    (tmp_path / "c.txt").write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    write_rows(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    for name in ("c.txt", "c.jsonl", "c.parquet"):
        t = time.perf_counter()
        check_data_sources(files(tmp_path / name))
        assert time.perf_counter() - t < 15, name


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + eos


@pytest.mark.parametrize("packing", ["none", "document", "concat"])
def test_documents_longer_than_seq_length_are_counted_in_one_line(
    tmp_path, default_tokenizer, capsys, packing
):
    texts = ["the value of item seven is forty nine " * 20, "short text here", "x", "item " * 30]
    path = write_rows(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    lengths = _lengths(default_tokenizer, texts)
    seq, min_tokens = 16, 3
    kept = [n for n in lengths if min(n, seq) >= min_tokens]
    longer = [n for n in kept if n > seq]
    assert len(longer) == 2 and len(kept) == 3  # the case this test is about
    rows = build_rows(files(path, seq_length=seq, packing=packing, min_tokens=min_tokens), default_tokenizer)
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[accel-tp] text data")]
    head = f"[accel-tp] text data (train): {len(kept)} documents, "
    tail = f", {len(lengths) - len(kept)} dropped (under data.min_tokens {min_tokens})"
    if packing == "none":
        cut = sum(n - seq for n in longer)
        assert (
            line == head + f"{len(longer)} truncated to data.seq_length {seq} ({cut} tokens cut off)" + tail
        )
        assert sum(len(r) for r in rows["input_ids"]) == sum(kept) - cut
    else:
        assert sum(len(r) for r in rows["input_ids"]) == sum(kept)  # packing loses no token
        if packing == "document":
            assert (
                line
                == head
                + f"{len(longer)} longer than data.seq_length {seq} split into rows of {seq} "
                + ("(no token cut off)" + tail)
            )
        else:
            assert (
                line == head + f"joined and cut into rows of data.seq_length {seq} (no token cut off)" + tail
            )
