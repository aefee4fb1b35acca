"""Tokenization: text documents and chat conversations to token ids, and the rows the loader reads."""

from __future__ import annotations

from typing import Any

from ..chat import IGNORE, check_chat_tokenizer, check_conversation, encode_conversation
from ..config import DataSection
from ..errors import DataError
from .packing import LABELS, pack_dataset
from .sources import describe_value, load_split

__all__ = ["tokenize_dataset", "tokenize_text_dataset", "tokenize_chat_dataset", "build_rows"]


def tokenize_text_dataset(
    ds: Any, tokenizer: Any, seq_length: int, min_tokens: int, truncate: bool = True
) -> tuple[Any, dict[str, int]]:
    """Token ids per document: eos appended, cut to seq_length (`truncate` False: kept whole, for
    packing to split), documents under min_tokens dropped. Returns the rows and the counts
    {documents, longer, tokens_beyond, dropped}: documents kept, those of them longer than
    seq_length, the tokens they hold beyond it (cut off when `truncate`), documents dropped."""
    import pyarrow.compute as pc

    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        # Files were checked on the driver; this names a bad row of any source (hub included).
        for text, i in zip(batch["text"], indices):
            if not isinstance(text, str):
                raise DataError(
                    f"data.text_field: document {i + 1} holds {describe_value(text)}, not a string; every "
                    "document must be text (fix or remove it, or set data.text_field to the field that holds it)."
                )
        enc = tokenizer(batch["text"], add_special_tokens=False, truncation=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "_length": []}
        for ids in enc:
            if eos is not None:
                ids = ids + [eos]
            out["input_ids"].append(ids[:seq_length] if truncate else ids)
            out["_length"].append(len(ids))
        return out

    tok = ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenize")
    tok = tok.filter(lambda ids: len(ids) >= min_tokens, input_columns="input_ids", desc="filter short")
    # Counted from the column, not in encode: a cached map never runs encode.
    lengths = tok.with_format("arrow")["_length"]
    longer = pc.greater(lengths, seq_length)
    stats = {
        "documents": len(tok),
        "longer": int(pc.sum(longer).as_py() or 0),
        "tokens_beyond": int(pc.sum(pc.if_else(longer, pc.subtract(lengths, seq_length), 0)).as_py() or 0),
        "dropped": len(ds) - len(tok),
    }
    return tok.remove_columns(["_length"]), stats


def tokenize_dataset(ds: Any, tokenizer: Any, seq_length: int | None, min_tokens: int) -> Any:
    """Token ids per document: eos appended, truncated to seq_length (None: kept whole), short documents dropped."""
    # Kept whole, the length only counts (counts this function does not return).
    whole = seq_length is None
    return tokenize_text_dataset(ds, tokenizer, 1 if whole else seq_length, min_tokens, truncate=not whole)[0]


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


def text_counts_line(n: dict[str, int], section: DataSection) -> str:
    """The count line of tokenize_text_dataset's counts, worded for data.packing."""
    s = section.seq_length
    if section.packing == "none":
        long = f"{n['longer']} truncated to data.seq_length {s} ({n['tokens_beyond']} tokens cut off)"
    elif section.packing == "document":
        long = f"{n['longer']} longer than data.seq_length {s} split into rows of {s} (no token cut off)"
    else:
        long = f"joined and cut into rows of data.seq_length {s} (no token cut off)"
    return f"{n['documents']} documents, {long}, {n['dropped']} dropped (under data.min_tokens {section.min_tokens})"


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
        ds, n = tokenize_text_dataset(
            raw, tokenizer, section.seq_length, section.min_tokens, truncate=not packed
        )
        # Once per split, by the process that tokenizes, as for chat: a cut is never silent.
        print(f"[accel-tp] text data ({which}): {text_counts_line(n, section)}", flush=True)
    if packed:
        ds = pack_dataset(ds, section.packing, section.seq_length)
    return ds
