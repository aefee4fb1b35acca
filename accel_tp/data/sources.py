"""Where documents come from: the embedded corpus, the hub or local files, and the checks the
driver runs on local files before any worker starts.

Those checks read every file once (row by row, parquet by column) so that a bad file fails on the
driver in seconds, naming the file and row, not inside tokenizers / datasets on every worker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..chat import check_chat_tokenizer, check_conversation, load_default_conversations
from ..config import ConfigError, DataSection
from ..errors import DataError

__all__ = ["check_data_sources", "load_split", "load_text_dataset", "describe_value"]

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _first_percent(ds: Any, percentage: float) -> Any:
    if percentage >= 100:
        return ds
    return ds.select(range(math.ceil(len(ds) * percentage / 100)))


def check_data_sources(section: DataSection, tokenizer: Any = None, files: bool = True) -> None:
    """Check local data files before any worker starts: they exist, are readable, are UTF-8 (text
    and JSON), parse, have the text field holding a string in every row (chat: every row's messages
    field holds {role, content} messages of known roles), and hold at least one document; with a `tokenizer`, that chat data has a template to render
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
    """Non-empty documents (chat: conversations) in one file; a parse error, a missing field, a
    text that is not a string or a malformed conversation names the file and row, bytes that are
    not UTF-8 their offset and line."""
    kind = _FILE_BUILDERS[path.suffix.lower()]
    setting = "data.messages_field" if chat else "data.text_field"
    what = "messages" if chat else "text"
    if kind == "text":
        documents, offset = 0, 0
        with open(path, "rb") as f:
            # Line by line: a UTF-8 sequence never holds a newline byte, so no character spans two.
            for n, line in enumerate(f, start=1):
                try:
                    documents += bool(line.decode("utf-8").strip())
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, offset + e.start, n, line[e.start]) from None
                offset += len(line)
        return documents
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
        else:
            _check_text_column(pf, path, field)
        return pf.metadata.num_rows
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start, raw.count(b"\n", 0, e.start) + 1, raw[e.start]) from None
    del raw  # the parsed rows are held next; not the file twice
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
        elif isinstance(row[field], str):
            documents += bool(row[field].strip())
        else:
            raise _not_text(f"{str(path)!r} row {n}", field, describe_value(row[field]))
    return documents


def describe_value(value: Any) -> str:
    """What a JSON-like value is, for an error message ("null", "a number (42)", "a list", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _not_text(where: str, field: str, what: str) -> DataError:
    return DataError(
        f"data.text_field: {where}: {field!r} holds {what}, not a string; every document's {field!r} must be "
        "its text. Fix or remove that row, or set data.text_field to the field that holds the text."
    )


def _not_utf8(path: Path, offset: int, line: int, byte: int) -> DataError:
    return DataError(
        f"data.files: {str(path)!r} is not UTF-8 text: byte {offset} (line {line}) is 0x{byte:02x}. Data files "
        "are read as UTF-8: convert the file (e.g. iconv -f latin1 -t utf-8 IN > OUT) or fix that line."
    )


def _check_text_column(pf: Any, path: Path, field: str) -> None:
    """A parquet text column holds strings, none null (a null names its row). Row groups whose
    statistics count no null are not read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = pf.schema_arrow.field(field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)):
        first = (
            next(pf.iter_batches(batch_size=1, columns=[field])).column(0)[0].as_py()
            if pf.metadata.num_rows
            else None
        )
        raise DataError(
            f"data.text_field: {str(path)!r} column {field!r} is of type {kind} (row 1 holds "
            f"{describe_value(first)}), not text; set data.text_field to the column that holds the text."
        )
    meta = pf.metadata
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
    start = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(leaves.index(field)).statistics if field in leaves else None
        if stats is None or not stats.has_null_count or stats.null_count:
            nulls = pc.is_null(pf.read_row_group(g, columns=[field]).column(0))
            if pc.any(nulls).as_py():
                raise _not_text(
                    f"{str(path)!r} row {start + pc.index(nulls, True).as_py() + 1}", field, "null"
                )
        start += group.num_rows


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
            ds = datasets.Dataset.from_dict({column: load_default_conversations()})
        else:
            from ..corpus import load_default_corpus

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
