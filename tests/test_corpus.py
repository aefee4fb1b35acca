"""Embedded default corpus and the locally trained default tokenizer (CPU, no network)."""

from __future__ import annotations

import gzip
import statistics
import threading
from pathlib import Path

import pytest

from accel_tp import corpus
from accel_tp.corpus import (
    DEFAULT_CORPUS_PATH,
    EOS_TOKEN,
    PAD_TOKEN,
    build_default_tokenizer,
    default_tokenizer_dir,
    load_default_corpus,
)

VOCAB = 4096


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok-cache")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_cache: Path):
    return build_default_tokenizer(tokenizer_cache, vocab_size=VOCAB)


def test_corpus_asset_is_gzip_of_documents() -> None:
    raw = DEFAULT_CORPUS_PATH.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert len(raw) < 300_000
    text = gzip.decompress(raw).decode("utf-8")
    assert 250_000 <= len(text.encode("utf-8")) <= 700_000
    assert "\n\n\n" not in text  # exactly one blank line between documents


def test_corpus_documents() -> None:
    docs = load_default_corpus()
    assert len(docs) >= 1500
    assert all(doc and doc == doc.strip() and "\n\n" not in doc for doc in docs)
    lengths = [len(doc) for doc in docs]
    assert min(lengths) >= 20
    assert 100 <= statistics.median(lengths) <= 400
    assert max(lengths) >= 1000  # varied lengths, not fixed-size chunks
    assert len(set(docs)) > 0.95 * len(docs)
    joined = " ".join(docs)
    assert "Python" in joined and ">>>" not in joined and "::=" not in joined


def test_corpus_is_deterministic_and_fresh_list() -> None:
    first = load_default_corpus()
    first.append("mutated")
    second = load_default_corpus()
    assert second == load_default_corpus()
    assert second[-1] != "mutated"
    assert second == first[:-1]


def test_tokenizer_round_trip_and_specials(tokenizer) -> None:
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        'Call "__init__()" twice:\n\tx = {1: [2, 3]}  # café ✓ 日本語',
        load_default_corpus()[123],
    ]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert {tokenizer.eos_token_id, tokenizer.pad_token_id} == {0, 1}
    # special tokens are atomic and not added implicitly to plain encodes
    assert tokenizer.encode(f"a{EOS_TOKEN}") == [*tokenizer.encode("a"), tokenizer.eos_token_id]
    assert tokenizer.eos_token_id not in tokenizer.encode("plain text")
    assert len(tokenizer) == VOCAB
    assert tokenizer.model_max_length >= 1 << 20


def test_tokenizer_compresses_corpus(tokenizer) -> None:
    docs = load_default_corpus()[:200]
    n_tokens = sum(len(ids) for ids in tokenizer(docs)["input_ids"])
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    assert n_bytes / n_tokens > 3.5  # a trained BPE, not bytes


def test_second_call_loads_from_cache(tokenizer, tokenizer_cache: Path, monkeypatch) -> None:
    target = default_tokenizer_dir(tokenizer_cache, VOCAB)
    assert target.parent == tokenizer_cache
    assert target.name.startswith(f"default-bpe-{VOCAB}-")
    assert (target / "tokenizer.json").is_file()
    mtime = (target / "tokenizer.json").stat().st_mtime_ns

    def no_training(vocab_size: int):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(corpus, "_train_tokenizer", no_training)
    again = build_default_tokenizer(tokenizer_cache, vocab_size=VOCAB)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (target / "tokenizer.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tokenizer_cache.iterdir()] == [target.name]  # no temp dirs left


def test_training_is_deterministic(tokenizer, tmp_path: Path) -> None:
    other = build_default_tokenizer(tmp_path / "other", vocab_size=VOCAB)
    assert other.get_vocab() == tokenizer.get_vocab()
    assert other.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_vocab_size_is_honoured_and_keyed(tmp_path: Path) -> None:
    small = build_default_tokenizer(tmp_path, vocab_size=512)
    assert len(small) == 512
    assert small.pad_token_id != small.eos_token_id
    assert default_tokenizer_dir(tmp_path, 512).is_dir()
    with pytest.raises(ValueError):
        build_default_tokenizer(tmp_path, vocab_size=100)


def test_lost_rename_race_uses_existing_copy(tmp_path: Path, monkeypatch) -> None:
    """Another process finishes writing the cache while this one is still training."""
    real_train = corpus._train_tokenizer
    calls: list[int] = []

    def train_while_other_process_wins(vocab_size: int):
        calls.append(vocab_size)
        if len(calls) == 1:
            # the "other process" trains and publishes first
            build_default_tokenizer(tmp_path, vocab_size=vocab_size)
        return real_train(vocab_size)

    monkeypatch.setattr(corpus, "_train_tokenizer", train_while_other_process_wins)
    tok = build_default_tokenizer(tmp_path, vocab_size=300)
    assert calls == [300, 300]
    assert len(tok) == 300
    assert [p.name for p in tmp_path.iterdir()] == [default_tokenizer_dir(tmp_path, 300).name]


def test_concurrent_callers_share_one_cache(tmp_path: Path) -> None:
    results: list = [None] * 4
    barrier = threading.Barrier(len(results))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = build_default_tokenizer(tmp_path, vocab_size=1024).get_vocab()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r == results[0] for r in results)
    assert [p.name for p in tmp_path.iterdir()] == [default_tokenizer_dir(tmp_path, 1024).name]
