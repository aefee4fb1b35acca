"""Data: text and chat sources, tokenization with a shared cache, and the dp-rank-sharded loader.

Under tensor parallelism every rank of a TP group must see the same batch, so the loader shards
by dp_rank / dp_size (not by world rank): TP peers get identical batches, DP groups get disjoint
slices, and the shuffle is a deterministic function of (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .chat import IGNORE, check_chat_tokenizer, check_conversation, encode_conversation
from .config import ConfigError, DataSection
from .parallel import Topology

__all__ = [
    "check_data_sources",
    "data_fingerprint",
    "load_text_dataset",
    "tokenize_dataset",
    "tokenize_chat_dataset",
    "build_rows",
    "load_or_build_tokenized",
    "elect_cache_builder",
    "cache_problem",
    "DPShardedSampler",
    "ShardedLoader",
    "make_collate",
    "prepare_dataloader",
]

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Bump when tokenization changes, so stale caches are not reused.
_CACHE_VERSION = 1
# Per-token labels of chat rows (IGNORE outside what carries the loss); text rows have none.
LABELS = "labels"


def _first_percent(ds: Any, percentage: float) -> Any:
    if percentage >= 100:
        return ds
    return ds.select(range(math.ceil(len(ds) * percentage / 100)))


def check_data_sources(section: DataSection, tokenizer: Any = None, files: bool = True) -> None:
    """Check local data files before any worker starts: they exist, are readable, parse, have the
    text field (chat: every row's messages field holds {role, content} messages of known roles),
    and hold at least one document; with a `tokenizer`, that chat data has a template to render
    with (`files` False: only that). (Hub datasets are checked where they load.)"""
    if section.format == "chat" and tokenizer is not None:
        check_chat_tokenizer(tokenizer)
    if section.source != "files" or not files:
        return
    if section.format == "chat" and any(Path(f).suffix.lower() in (".txt", ".text") for f in section.files):
        raise ConfigError(
            "data.files: data.format: chat reads conversations from .jsonl / .json / .parquet files, "
            f"not text files; got {section.files}."
        )
    paths, _ = _data_files(section)
    field = section.messages_field if section.format == "chat" else section.text_field
    documents = 0
    for p in paths:
        try:
            documents += _count_documents(p, field, section.format == "chat")
        except PermissionError as e:
            raise ConfigError(f"data.files: cannot read {str(p)!r} ({e.strerror}).") from e
    if documents == 0:
        raise ConfigError(
            f"data.files: no documents in {[str(p) for p in paths]} (empty files, or every "
            f"{field!r} is empty); add data or point data.files at other files."
        )


def _data_files(section: DataSection) -> tuple[list[Path], str]:
    """The data files and their one `datasets` builder (text / json / parquet), or a ConfigError."""
    paths = [Path(f).expanduser() for f in section.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"data.files: not found: {missing}.")
    kinds = {_FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"data.files: all files must be one kind of {sorted(_FILE_BUILDERS)}; got {[p.name for p in paths]}."
        )
    return paths, kinds.pop()


def _count_documents(path: Path, field: str, chat: bool = False) -> int:
    """Non-empty documents (chat: conversations) in one file; a parse error, a missing field or a
    malformed conversation names the file and row."""
    kind = _FILE_BUILDERS[path.suffix.lower()]
    setting = "data.messages_field" if chat else "data.text_field"
    what = "messages" if chat else "text"
    if kind == "text":
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own error types for a bad file
            raise ConfigError(f"data.files: {str(path)!r} is not a readable parquet file ({e}).") from e
        names = pf.schema_arrow.names
        if field not in names:
            raise ConfigError(
                f"{setting}: column {field!r} not in {str(path)!r}; its columns: {names}. Set "
                f"{setting} to one of them."
            )
        if chat:  # one column at a time: the check never holds the whole file in memory
            n = 0
            for batch in pf.iter_batches(columns=[field]):
                for messages in batch.column(0).to_pylist():
                    n += 1
                    check_conversation(messages, f"{str(path)!r} row {n}")
        return pf.metadata.num_rows
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows: list[tuple[int, Any]]
    try:  # a .json file may hold one JSON array (or object) instead of JSON lines
        whole = json.loads(text)
        rows = list(enumerate(whole if isinstance(whole, list) else [whole], start=1))
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"data.files: {str(path)!r} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                    "each line of a .jsonl file must be one JSON object."
                ) from e
    documents = 0
    for n, row in rows:
        if not isinstance(row, dict) or field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(
                f"{setting}: {str(path)!r} row {n} has no {field!r} field (it has {keys}); set "
                f"{setting} to the field that holds the {what}."
            )
        if chat:
            check_conversation(row[field], f"{str(path)!r} row {n}")
            documents += 1
        else:
            documents += bool(str(row[field] or "").strip())
    return documents


def load_split(section: DataSection, which: str) -> Any:
    """The training or the held-out documents (None when no evaluation data is configured)."""
    if which == "eval" and section.eval_split:
        return load_text_dataset(section, split=section.eval_split)
    if which == "eval" and not section.eval_fraction:
        return None
    ds = load_text_dataset(section)
    if section.eval_fraction:
        parts = ds.train_test_split(test_size=section.eval_fraction, seed=1234, shuffle=True)
        ds = parts["train" if which == "train" else "test"]
    return ds


def load_text_dataset(section: DataSection, split: str | None = None) -> Any:
    """A `datasets.Dataset` with a `text` column (chat: a `messages` column), from the embedded
    corpus (chat: the embedded conversations), the hub, or local files."""
    import datasets

    column = "messages" if section.format == "chat" else "text"
    field = section.messages_field if section.format == "chat" else section.text_field
    if section.source == "embedded":
        if section.format == "chat":
            from .chat import load_default_conversations

            ds = datasets.Dataset.from_dict({column: load_default_conversations()})
        else:
            from .corpus import load_default_corpus

            ds = datasets.Dataset.from_dict({column: load_default_corpus()})
        return _first_percent(ds, section.percentage)
    if section.source == "hub":
        # The prefix is taken after loading (not as "train[:2.5%]", which datasets refuses for
        # fractions) so every source rounds a percentage the same way.
        split = split or section.split
        try:
            ds = _first_percent(
                datasets.load_dataset(section.name, section.config_name, split=split), section.percentage
            )
        except Exception as e:  # the hub raises many types; all mean "cannot get this dataset"
            raise ConfigError(
                f"data.name: cannot load dataset {section.name!r} (config {section.config_name!r}, split "
                f"{split!r}): {type(e).__name__}: {e}"
            ) from e
    else:
        paths, kind = _data_files(section)
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train")
        ds = _first_percent(ds, section.percentage)
    if field not in ds.column_names:
        setting = "data.messages_field" if section.format == "chat" else "data.text_field"
        raise ConfigError(f"{setting}: column {field!r} not in the dataset; columns: {ds.column_names}.")
    ds = ds.select_columns([field])
    if field != column:
        ds = ds.rename_column(field, column)
    return ds


def tokenize_dataset(ds: Any, tokenizer: Any, seq_length: int | None, min_tokens: int) -> Any:
    """Token ids per document: eos appended, truncated to seq_length (None: kept whole), short documents dropped."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], add_special_tokens=False, truncation=False)["input_ids"]
        out = []
        for ids in enc:
            if eos is not None:
                ids = ids + [eos]
            out.append(ids if seq_length is None else ids[:seq_length])
        return {"input_ids": out}

    tok = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")
    return tok.filter(lambda ids: len(ids) >= min_tokens, input_columns="input_ids", desc="filter short")


def tokenize_chat_dataset(
    ds: Any, tokenizer: Any, seq_length: int, loss_on: str, min_tokens: int = 2
) -> tuple[Any, dict[str, int]]:
    """Token ids and per-token labels per conversation (see accel_tp.chat), the tail beyond
    seq_length cut off; conversations left with no labelled token (or under min_tokens) dropped.
    Returns the rows and the counts {conversations, truncated, dropped}."""
    check_chat_tokenizer(tokenizer)

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], LABELS: [], "_truncated": [], "_keep": []}
        for messages, i in zip(batch["messages"], indices):
            where = f"conversation {i}"
            ids, labels = encode_conversation(check_conversation(messages, where), tokenizer, loss_on, where)
            ids, labels, cut = ids[:seq_length], labels[:seq_length], len(ids) > seq_length
            out["input_ids"].append(ids)
            out[LABELS].append(labels)
            out["_truncated"].append(cut)
            # Position 0 is never a target (nothing precedes it), so it does not count as labelled.
            out["_keep"].append(len(ids) >= min_tokens and any(t != IGNORE for t in labels[1:]))
        return out

    tok = ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="render chat")
    # Counted from the columns, not in encode: a cached map never runs encode.
    keep, truncated = tok["_keep"], tok["_truncated"]
    stats = {
        "conversations": len(tok),
        "truncated": sum(t and k for t, k in zip(truncated, keep)),
        "dropped": len(keep) - sum(keep),
    }
    tok = tok.filter(lambda k: k, input_columns="_keep", desc="drop unlabelled")
    return tok.remove_columns(["_truncated", "_keep"]), stats


def build_rows(section: DataSection, tokenizer: Any, which: str = "train") -> Any:
    """The rows the loader reads: documents (chat: conversations) tokenized and, unless
    data.packing is none, packed; chat rows carry their labels."""
    packed = section.packing != "none"
    raw = load_split(section, which)
    if section.format == "chat":
        ds, n = tokenize_chat_dataset(
            raw, tokenizer, section.seq_length, section.label_mode, section.min_tokens
        )
        # Once per split, by the process that tokenizes (a cached split is not re-counted).
        print(
            f"[accel-tp] chat data ({which}): {n['conversations']} conversations, {n['truncated']} "
            f"truncated to data.seq_length {section.seq_length}, {n['dropped']} dropped "
            f"(no {'assistant ' if section.label_mode == 'assistant' else ''}token with a label left)",
            flush=True,
        )
    else:
        ds = tokenize_dataset(raw, tokenizer, None if packed else section.seq_length, section.min_tokens)
    if packed:
        ds = pack_dataset(ds, section.packing, section.seq_length)
    return ds


def _pack_rows(
    docs: list[list[int]], mode: str, seq_length: int, labels: list[list[int]] | None = None
) -> dict[str, list]:
    """Rows of at most seq_length tokens; every input token lands in exactly one row (and its
    label, when `labels` gives per-token labels, with it)."""
    if mode == "concat":
        assert labels is None, "concat packing has no per-token labels"
        stream = [t for d in docs for t in d]
        return {"input_ids": [stream[i : i + seq_length] for i in range(0, len(stream), seq_length)]}
    # A document longer than a row is cut into row-sized pieces, each its own document. Pieces
    # go first-fit-decreasing into rows, which leaves far less padding than filling in order.
    labs = labels if labels is not None else docs
    pieces = [
        (doc[i : i + seq_length], lab[i : i + seq_length])
        for doc, lab in zip(docs, labs)
        for i in range(0, len(doc), seq_length)
    ]
    pieces.sort(key=lambda p: len(p[0]), reverse=True)  # stable: ties keep corpus order (deterministic)
    rows: list[list[int]] = []
    row_labels: list[list[int]] = []
    positions: list[list[int]] = []
    for piece, lab in pieces:
        for row, rlab, pos in zip(rows, row_labels, positions):
            if len(row) + len(piece) <= seq_length:
                row.extend(piece)
                rlab.extend(lab)
                pos.extend(range(len(piece)))
                break
        else:
            rows.append(list(piece))
            row_labels.append(list(lab))
            positions.append(list(range(len(piece))))
    out = {"input_ids": rows, "position_ids": positions}
    if labels is not None:
        out[LABELS] = row_labels
    return out


def pack_dataset(ds: Any, mode: str, seq_length: int) -> Any:
    """Pack tokenized documents (in order, 1000 at a time) into rows; see DataSection.packing."""
    has_labels = LABELS in ds.column_names
    return ds.map(
        lambda batch: _pack_rows(batch["input_ids"], mode, seq_length, batch[LABELS] if has_labels else None),
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        desc=f"pack ({mode})",
    )


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


# The tokenized cache is one folder per data spec, published atomically: built under a temporary
# name, its manifest (row count, every file's size and sha256) written last, then renamed into
# place. A folder without a valid manifest (half-written, truncated, edited) is never read.
_MANIFEST = "accel_tp_cache.json"


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


class DPShardedSampler(Sampler[int]):
    """Indices for one DP rank; resumable at any micro-batch.

    Each epoch permutes all samples with a generator seeded by (seed, epoch), trims the tail that
    cannot fill a whole global batch (micro_batch_size x grad_accum x dp_size samples), and deals
    sample j of the permutation to DP rank j % dp_size. TP peers share dp_rank, hence identical
    indices. Global step s of an epoch then covers positions [s*G, (s+1)*G) of the permutation
    however G is split into micro-batches, accumulation and DP ranks, so the data position is
    a number of samples and a resume may split the same global batch differently.
    """

    def __init__(
        self,
        num_samples: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        grad_accum_steps: int = 1,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside dp_size {dp_size}")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * grad_accum_steps * dp_size
        self.steps_per_epoch = num_samples // self.global_batch
        self.batches_per_epoch = self.steps_per_epoch * grad_accum_steps
        self.epoch = 0
        self.start_batch = 0
        self.endless = False

    def set_epoch(self, epoch: int, start_batch: int = 0, endless: bool = False) -> None:
        """Start at micro-batch `start_batch` of `epoch`; `endless` runs on into the next epochs."""
        self.epoch = epoch
        self.start_batch = start_batch
        self.endless = endless

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        used = self.steps_per_epoch * self.global_batch
        return order[:used][self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self.start_batch * self.micro_batch_size
        while True:
            yield from self.epoch_indices(epoch)[skip:]
            if not self.endless:
                return
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless DPShardedSampler has no length")
        return (self.batches_per_epoch - self.start_batch) * self.micro_batch_size


def make_collate(
    pad_id: int, padding: str, seq_length: int, packing: str = "none"
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Right-pad a micro-batch; labels are -100 on padding so it carries no loss.

    Rows with their own `labels` (chat) keep them: -100 outside what carries the loss.

    Packed rows are padded to seq_length. In `document` mode the rows carry position_ids that
    restart at every document (Transformers then masks attention per document) instead of an
    attention mask, and the first token of each document gets no label: in a row it would be
    predicted from the previous document, which one-document-at-a-time training never does.
    Entries starting with `_` are metadata, not model inputs: `_real_tokens` (non-padding tokens),
    `_label_tokens` (tokens with a label) and `_attn_context` (the sum over real tokens of the
    length each one attends over, for the FLOP count: its own document's length under
    `document` packing, seq_length otherwise), counted here so the training step needs no pass
    over the batch.
    """

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        fixed = padding == "max_length" or packing != "none"
        width = seq_length if fixed else min(seq_length, -(-longest // 8) * 8)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        own = LABELS in rows[0]
        labels = torch.full((len(rows), width), -100, dtype=torch.long) if own else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            if labels is not None:
                labels[i, :n] = torch.tensor(r[LABELS], dtype=torch.long)
        if labels is None:
            labels = ids.masked_fill(mask == 0, -100)
        out = {"input_ids": ids, "labels": labels, "_real_tokens": mask.sum()}
        out["_attn_context"] = torch.tensor(float(out["_real_tokens"]) * seq_length, dtype=torch.float64)
        if packing == "document":
            # Padding forms one more "document" (positions from 0), so it never joins a real one.
            pos = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["position_ids"])
                pos[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
                pos[i, n:] = torch.arange(width - n)
            out["labels"] = labels.masked_fill(pos == 0, -100)
            out["position_ids"] = pos
            # A document of n tokens costs n x n in attention: sum n^2 over the real documents
            # (a document is a run of positions from 0; count each run's real tokens).
            doc = torch.cumsum(pos == 0, dim=1) + torch.arange(len(rows))[:, None] * (width + 1)
            ctx = float((torch.bincount(doc[mask.bool()]).double() ** 2).sum())
            out["_attn_context"] = torch.tensor(float(ctx), dtype=torch.float64)
        else:
            out["attention_mask"] = mask
        # Each position predicts the next token: the first label of a row is never a target.
        out["_label_tokens"] = (out["labels"][:, 1:] != -100).sum()
        return out

    return collate


class ShardedLoader:
    """A DataLoader over one DP shard, read as an endless stream of micro-batches across epochs."""

    def __init__(self, loader: DataLoader, sampler: DPShardedSampler) -> None:
        self.loader = loader
        self.sampler = sampler

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batch_at(self, samples: int) -> int:
        """This rank's micro-batch index after `samples` samples (all DP ranks) of the run."""
        per_micro_batch = self.sampler.micro_batch_size * self.sampler.dp_size
        if samples % per_micro_batch:
            raise ValueError(
                f"the data position ({samples} samples) is not a whole number of micro-batches of "
                f"{self.sampler.micro_batch_size} x {self.sampler.dp_size} DP ranks"
            )
        return samples // per_micro_batch

    def stream(self, start_micro_batch: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(epoch, batch) pairs from micro-batch number `start_micro_batch` of the whole run on."""
        epoch, offset = divmod(start_micro_batch, self.batches_per_epoch)
        # One endless pass, so DataLoader workers keep building batches ahead across epoch
        # boundaries (a new pass per epoch would start them cold). Every epoch is whole
        # micro-batches, so a batch never straddles two epochs.
        self.sampler.set_epoch(epoch, offset, endless=True)
        for i, batch in enumerate(self.loader, start=start_micro_batch):
            yield i // self.batches_per_epoch, batch


def prepare_dataloader(
    dataset: Any,
    topo: Topology,
    micro_batch_size: int,
    pad_id: int,
    section: DataSection,
    seed: int,
    pin_memory: bool = False,
    grad_accum_steps: int = 1,
) -> ShardedLoader:
    """The dataloader preparer: shards by dp_rank / dp_size instead of process index.

    `pin_memory` (for a CUDA run) page-locks the batches so the trainer's non_blocking
    host-to-device copies are asynchronous."""
    sampler = DPShardedSampler(
        len(dataset),
        topo.dp_rank,
        topo.dp_size,
        micro_batch_size,
        seed=seed,
        shuffle=section.shuffle,
        grad_accum_steps=grad_accum_steps,
    )
    if sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"data: {len(dataset)} sequences cannot fill one global batch of {sampler.global_batch} "
            f"(train.micro_batch_size {micro_batch_size} x grad_accum_steps {grad_accum_steps} x "
            f"{topo.dp_size} DP ranks); add data or lower train.micro_batch_size / grad_accum_steps."
        )
    loader = DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=make_collate(pad_id, section.padding, section.seq_length, section.packing),
        drop_last=True,
        num_workers=section.num_workers,
        # Workers live across epochs (the sampler is still iterated here, so set_epoch holds).
        persistent_workers=section.num_workers > 0,
        pin_memory=pin_memory,
    )
    return ShardedLoader(loader, sampler)


def eval_batches(
    dataset: Any, topo: Topology, micro_batch_size: int, pad_id: int, section: DataSection
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's share of the held-out rows (every row once across DP ranks; TP peers alike)."""
    collate = make_collate(pad_id, section.padding, section.seq_length, section.packing)
    mine = list(range(topo.dp_rank, len(dataset), topo.dp_size))
    return [
        collate([dataset[i] for i in mine[j : j + micro_batch_size]])
        for j in range(0, len(mine), micro_batch_size)
    ]
