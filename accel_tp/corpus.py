"""Embedded default corpus and a locally trained byte-level BPE tokenizer.

The trainer's default run must work without any network access, so the package ships a
small English corpus (``assets/default_corpus.txt.gz``) and trains its own tokenizer on it.

Corpus provenance and licence: the documents are the Python language-reference help
topics shipped with CPython as ``pydoc_data.topics`` (the text behind ``help("if")``),
Copyright (c) Python Software Foundation, redistributed under the PSF licence for the
Python documentation (https://docs.python.org/3/license.html). The asset is produced by
``scripts/build_default_corpus.py``: UTF-8, gzip, documents separated by one blank line.

Tokenizer: byte-level BPE (GPT-2 style pre-tokenizer and decoder, full 256-byte initial
alphabet, so any text round-trips; the corpus supports at most ~4.9k tokens, so ask for
at most that) with ``<|endoftext|>`` (id 0; eos and bos) and
``<|pad|>`` (id 1; pad). It is cached on disk under
``<cache_dir>/default-bpe-<vocab_size>-<corpus hash>``; the cache is written atomically so
several processes (e.g. one per rank) may call :func:`build_default_tokenizer` at once.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_CORPUS_PATH",
    "EOS_TOKEN",
    "wikitext_like",
    "PAD_TOKEN",
    "build_default_tokenizer",
    "default_corpus_hash",
    "load_default_corpus",
]

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_PATH: Path = Path(__file__).resolve().parent / "assets" / "default_corpus.txt.gz"

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order

MODEL_MAX_LENGTH = 1 << 30  # the tokenizer itself imposes no length limit
_RECIPE_VERSION = "bytelevel-bpe-v1"  # bump when the training recipe changes (invalidates caches)
_TOKENIZER_FILE = "tokenizer.json"


@functools.lru_cache(maxsize=1)
def _corpus_text() -> str:
    return gzip.decompress(DEFAULT_CORPUS_PATH.read_bytes()).decode("utf-8")


@functools.lru_cache(maxsize=1)
def _corpus_documents() -> tuple[str, ...]:
    return tuple(doc.strip() for doc in _corpus_text().split("\n\n") if doc.strip())


def load_default_corpus() -> list[str]:
    """The documents of the embedded corpus, in file order (a fresh list on every call)."""
    return list(_corpus_documents())


def default_corpus_hash(length: int = 12) -> str:
    """Short hex digest of the corpus text and the tokenizer recipe (used as the cache key)."""
    digest = hashlib.sha256(_RECIPE_VERSION.encode("utf-8") + b"\0" + _corpus_text().encode("utf-8"))
    return digest.hexdigest()[:length]


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the default corpus (deterministic; a few seconds)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_documents(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        logger.warning(
            "default corpus only supports %d tokens; requested vocab_size=%d",
            tokenizer.get_vocab_size(),
            vocab_size,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def _load_cached(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def default_tokenizer_dir(cache_dir: str | os.PathLike[str], vocab_size: int = 4096) -> Path:
    """Where :func:`build_default_tokenizer` caches the tokenizer for ``vocab_size``."""
    return Path(cache_dir) / f"default-bpe-{vocab_size}-{default_corpus_hash()}"


def build_default_tokenizer(
    cache_dir: str | os.PathLike[str], vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on the default corpus, cached under ``cache_dir``.

    Loads ``<cache_dir>/default-bpe-<vocab_size>-<hash>`` if it exists; otherwise trains,
    saves into a temporary sibling directory and renames it into place (atomic; if another
    process won the race, its copy is used). The returned tokenizer is always the one
    loaded from the cache directory, so first and later calls behave identically.
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    target = default_tokenizer_dir(cache_dir, vocab_size)
    if (target / _TOKENIZER_FILE).is_file():
        return _load_cached(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _train_tokenizer(vocab_size).save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache may be shared
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is not empty
        except OSError:
            if not (target / _TOKENIZER_FILE).is_file():
                raise
            logger.debug("another process cached %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(target)


def wikitext_like(n: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic lines with wikitext-2's length shape (many short headings, paragraphs averaging
    ~70 tokens, a long tail), cut from the embedded corpus: a padding-waste test without a download."""
    rng = random.Random(seed)
    words = " ".join(load_default_corpus()).split()
    docs = []
    for _ in range(n):
        if rng.random() < 0.25:  # " = = Heading = = " lines
            length = rng.randint(2, 6)
        else:
            length = max(3, int(rng.lognormvariate(3.9, 0.7)))  # median ~50 words, mean ~65
        start = rng.randrange(len(words) - length)
        docs.append(" ".join(words[start : start + length]))
    return docs
