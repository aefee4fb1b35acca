"""Rows: what a tokenized row holds, and how documents are packed into rows of seq_length tokens."""

from __future__ import annotations

from typing import Any

__all__ = ["LABELS", "pack_rows", "pack_dataset"]

# Per-token labels of chat rows (IGNORE outside what carries the loss); text rows have none.
LABELS = "labels"


def pack_rows(
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
        lambda batch: pack_rows(batch["input_ids"], mode, seq_length, batch[LABELS] if has_labels else None),
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        desc=f"pack ({mode})",
    )
