"""The tokenized cache: one builder per filesystem, atomic publish, and nothing incomplete is read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import accel_tp.data.cache as cache_mod
import accel_tp.data.tokenize as tokenize_mod
from accel_tp.config import DataSection
from accel_tp.data import cache_problem, load_or_build_tokenized

from .mp_utils import ROOT, torchrun


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"item {i} costs {i * 3} coins"}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def section(tmp_path: Path) -> DataSection:
    src = write_jsonl(tmp_path / "d.jsonl", 20)
    return DataSection(source="files", files=[str(src)], seq_length=16, cache_dir=str(tmp_path / "cache"))


def _entry(section: DataSection) -> Path:
    (folder,) = [
        p
        for p in (Path(section.cache_dir) / "tokenized").iterdir()
        if not p.name.startswith(".") and ".corrupt-" not in p.name
    ]
    return folder


class Counter:
    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = tokenize_mod.tokenize_text_dataset

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(tokenize_mod, "tokenize_text_dataset", counted)


def test_published_cache_has_a_manifest_and_is_readable_by_others(section, default_tokenizer, monkeypatch):
    counter = Counter(monkeypatch)
    ds = load_or_build_tokenized(section, default_tokenizer, True, lambda: None)
    folder = _entry(section)
    assert cache_problem(folder, full=True) is None
    assert json.loads((folder / "accel_tp_cache.json").read_text())["rows"] == len(ds) == 20
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    # Read back by a non-builder and by the builder: no second tokenization.
    for builder in (False, True):
        load_or_build_tokenized(section, default_tokenizer, builder, lambda: None)
    assert counter.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "extra-file"])
def test_a_damaged_cache_is_never_read(section, default_tokenizer, monkeypatch, damage, capsys):
    first = load_or_build_tokenized(section, default_tokenizer, True, lambda: None)
    want = [list(x) for x in first["input_ids"]]
    folder = _entry(section)
    arrow = max((p for p in folder.iterdir() if p.suffix == ".arrow"), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(arrow.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        arrow.write_bytes(bytes(raw))
    elif damage == "no-manifest":
        (folder / "accel_tp_cache.json").unlink()
    else:
        (folder / "stray.arrow").write_bytes(b"x")
    # A reader that is not the builder refuses it outright (a flip is only caught by the full check).
    if damage != "flip":
        with pytest.raises(RuntimeError, match="tokenized cache"):
            load_or_build_tokenized(section, default_tokenizer, False, lambda: None)
    counter = Counter(monkeypatch)
    again = load_or_build_tokenized(section, default_tokenizer, True, lambda: None)
    assert counter.calls == 1, "the builder must rebuild a damaged cache"
    assert [list(x) for x in again["input_ids"]] == want
    assert "moved to" in capsys.readouterr().out
    assert cache_problem(_entry(section), full=True) is None


def test_a_half_written_build_is_ignored(section, default_tokenizer, monkeypatch):
    """A builder killed mid-write leaves only a .tmp- folder: nobody reads it, the next builder builds."""
    parent = Path(section.cache_dir) / "tokenized"
    parent.mkdir(parents=True)
    (parent / ".tmp-abandoned").mkdir()
    (parent / ".tmp-abandoned" / "data-00000-of-00001.arrow").write_bytes(b"partial")
    with pytest.raises(RuntimeError, match="absent"):
        load_or_build_tokenized(section, default_tokenizer, False, lambda: None)
    counter = Counter(monkeypatch)
    load_or_build_tokenized(section, default_tokenizer, True, lambda: None)
    assert counter.calls == 1


def test_publish_errors_are_raised_not_swallowed(tmp_path):
    """Losing the rename to an incomplete folder (or ENOSPC / EACCES) is an error, not a silent skip."""
    tmp, path = tmp_path / ".tmp-x", tmp_path / "entry"
    tmp.mkdir()
    (tmp / "a").write_text("1")
    path.mkdir()
    (path / "junk").write_text("not a cache")
    with pytest.raises(OSError, match="cannot publish the tokenized cache"):
        cache_mod._publish(tmp, path)


def test_losing_the_race_to_a_complete_copy_keeps_it(section, default_tokenizer, tmp_path):
    load_or_build_tokenized(section, default_tokenizer, True, lambda: None)
    folder = _entry(section)
    tmp = folder.parent / ".tmp-second"
    tmp.mkdir()
    (tmp / "x").write_text("other build")
    cache_mod._publish(tmp, folder)
    assert not tmp.exists() and cache_problem(folder, full=True) is None


@pytest.mark.parametrize("mode,builders", [("shared", {0}), ("per-node", {0, 2})])
def test_one_builder_per_filesystem(tmp_path, mode, builders):
    """4 gloo processes: one folder seen by all elects rank 0 only; two node-local folders elect the
    lowest rank of each node. Probe files are cleaned up."""
    proc = torchrun(4, ROOT / "tests" / "workers" / "elect_builder.py", [str(tmp_path), mode])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elected = {r for r in range(4) if (tmp_path / f"rank{r}").read_text() == "1"}
    assert elected == builders
    for folder in (tmp_path / "shared", tmp_path / "node0", tmp_path / "node1"):
        if folder.exists():
            assert not list(folder.glob(".probe-*"))
