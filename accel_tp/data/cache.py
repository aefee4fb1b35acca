"""The tokenized cache and the data fingerprint: tokenize once per filesystem, never read a
half-written build, and name what decides the rows (the cache key) and their order (the
fingerprint a resume must match).

The cache is one folder per data spec, published atomically: built under a temporary name, its
manifest (row count, every file's size and sha256) written last, then renamed into place. A
folder without a valid manifest (half-written, truncated, edited) is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..chat import check_chat_tokenizer
from ..config import ConfigError, DataSection
from .tokenize import build_rows

__all__ = ["cache_key", "data_fingerprint", "elect_cache_builder", "cache_problem", "load_or_build_tokenized"]

# Bump when tokenization changes, so stale caches are not reused.
_CACHE_VERSION = 1
_MANIFEST = "accel_tp_cache.json"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(
        f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{vocab}".encode()
    ).hexdigest()[:16]


def _data_spec(section: DataSection, tokenizer: Any, file_mtimes: bool) -> dict[str, Any]:
    """The data settings that decide the tokenized rows (files by path, size and, for the cache,
    modification time)."""
    files = []
    for f in section.files:
        p = Path(f).expanduser().resolve()
        st = p.stat() if p.exists() else None
        entry = [str(p), st.st_size if st else None]
        files.append(entry + [st.st_mtime_ns if st else None] if file_mtimes else entry)
    return {
        "source": section.source,
        "name": section.name,
        "config_name": section.config_name,
        "split": section.split,
        "files": files,
        "text_field": section.text_field,
        "percentage": section.percentage,
        "seq_length": section.seq_length,
        "min_tokens": section.min_tokens,
        "packing": section.packing,
        "eval": [section.eval_split, section.eval_fraction],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        # Text specs keep their old keys (so existing caches and checkpoints stay valid).
        **(_chat_spec(section, tokenizer) if section.format == "chat" else {}),
    }


def _chat_spec(section: DataSection, tokenizer: Any) -> dict[str, Any]:
    """What else decides chat rows: the field, the labelling and the template itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "format": "chat",
        "messages_field": section.messages_field,
        "loss_on": section.label_mode,
        "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16],
    }


def _digest(spec: dict[str, Any], n: int) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:n]


def cache_key(section: DataSection, tokenizer: Any) -> str:
    return _digest({"v": _CACHE_VERSION, **_data_spec(section, tokenizer, file_mtimes=True)}, 20)


def data_fingerprint(section: DataSection, tokenizer: Any, seed: int, num_rows: int) -> str:
    """What decides the training data's order: source, files (paths and sizes), split, percentage,
    seq_length, packing, tokenizer, seed and shuffle (and the row count they give). A resume must
    match it, or the data position would point into different data."""
    spec = _data_spec(section, tokenizer, file_mtimes=False)
    return _digest({**spec, "seed": seed, "shuffle": section.shuffle, "rows": num_rows}, 16)


def elect_cache_builder(root: Path) -> bool:
    """Whether this rank builds the tokenized cache under `root`: one rank per filesystem.

    Detected, not guessed from node ranks: every rank drops a probe file into `root`, and the lowest
    rank whose probe a rank can see is its builder. A cache folder shared by the whole cluster (NFS,
    Lustre, or simulated nodes on one host) gets one builder; node-local disks get one per node.
    (A filesystem that shows a new file late only adds a builder: publishing stays atomic.)
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return True
    dist = torch.distributed
    rank = dist.get_rank()
    root.mkdir(parents=True, exist_ok=True)
    nonce = [os.urandom(8).hex() if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    probe = root / f".probe-{nonce[0]}-{rank}"
    probe.write_text("")
    dist.barrier()
    seen = sorted(int(p.name.rsplit("-", 1)[1]) for p in root.glob(f".probe-{nonce[0]}-*"))
    dist.barrier()  # everyone has listed before anyone removes its probe
    probe.unlink()
    return seen[0] == rank


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, rows: int) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file()
    }
    (folder / _MANIFEST).write_text(json.dumps({"version": _CACHE_VERSION, "rows": rows, "files": files}))


def cache_problem(folder: Path, full: bool) -> str | None:
    """Why a cache folder must not be read (None: it is complete). `full` also checks every
    file's sha256 (the builder does, once per run and filesystem); otherwise names and sizes."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no complete manifest (half-written or not built by accel-tp)"
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != _MANIFEST}
    if present != set(files):
        return f"files {sorted(present ^ set(files))} differ from its manifest"
    for name, want in files.items():
        p = folder / name
        if p.stat().st_size != want["bytes"] or (full and _file_digest(p) != want["sha256"]):
            return f"{name} does not match its manifest (truncated or changed)"
    return None


def _publish(tmp: Path, path: Path) -> None:
    """Rename a finished build into place, readable by every worker (mkdtemp makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        os.replace(tmp, path)
    except OSError as e:
        # Another builder (a second job on this cache, or a filesystem that showed our probe late)
        # published first: keep its complete copy. Anything else (ENOSPC, EACCES, ...) is raised.
        if path.is_dir() and cache_problem(path, full=False) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise OSError(e.errno, f"cannot publish the tokenized cache {str(path)!r}: {e.strerror}") from e


def load_or_build_tokenized(
    section: DataSection,
    tokenizer: Any,
    builder: bool,
    barrier: Callable[[], None],
    which: str = "train",
) -> Any:
    """Tokenize once per filesystem: the `builder` rank (elect_cache_builder) builds and publishes the
    cache, every rank reads it after the barrier.

    `which` is "train" or "eval"; the eval split is None when the data section configures none.
    """
    import datasets

    if which == "eval" and not (section.eval_split or section.eval_fraction):
        return None
    if section.format == "chat":
        check_chat_tokenizer(tokenizer)  # every rank, before the barrier: no rank waits on a failed build
    path = section.resolved_cache_dir() / "tokenized" / f"{cache_key(section, tokenizer)}-{which}"
    if builder:
        problem = cache_problem(path, full=True) if path.exists() else "absent"
        if problem not in (None, "absent"):
            aside = path.with_name(f"{path.name}.corrupt-{os.urandom(4).hex()}")
            print(
                f"[accel-tp] tokenized cache {path}: {problem}; moved to {aside.name}, rebuilding", flush=True
            )
            os.replace(path, aside)
        if problem is not None:
            print(f"[accel-tp] tokenizing the {which} data into {path}", flush=True)
            ds = build_rows(section, tokenizer, which)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
            try:
                ds.save_to_disk(str(tmp))
                _write_manifest(tmp, len(ds))
                _publish(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    barrier()
    problem = cache_problem(path, full=False) if path.exists() else "absent"
    if problem is not None:
        raise RuntimeError(
            f"tokenized cache {str(path)!r}: {problem}. Its builder did not publish it where this rank "
            "reads; data.cache_dir must be the same path on every node (shared) or node-local on each."
        )
    ds = datasets.load_from_disk(str(path))
    if len(ds) == 0 and section.format == "chat":
        raise ConfigError(
            f"data ({which}): no conversation in the {section.source!r} source keeps a labelled token within "
            f"data.seq_length {section.seq_length}; check data.seq_length / data.loss_on / data.percentage."
        )
    if len(ds) == 0:
        raise ConfigError(
            f"data ({which}): no documents with >= {section.min_tokens} tokens in the {section.source!r} source; "
            "check data.name / data.files / data.text_field / data.percentage."
        )
    return ds
