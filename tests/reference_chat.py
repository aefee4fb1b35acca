"""The single-process reference for the chat parity tests (data.format: chat).

Like tests/reference.py (whose model, schedule and epoch-order helpers it reuses: they are the
definitions of docs/parallelism.md, not product code) it shares no accel_tp logic. Written from docs/chat.md:

* Conversations: the shipped set (read straight from its .jsonl.gz, an input like the corpus) or
  local .jsonl files; the first `percentage` percent; `eval_fraction` held out with datasets'
  train_test_split(seed=1234).
* Rendering: the tokenizer's apply_chat_template(tokenize=False) with model.chat_template when set;
  tokens: tokenizer(text, add_special_tokens=False).
* Labels, found a third way (the product uses generation markers or growing-prefix diffs): by
  characters. Each message's content is located in the rendered text in order; an assistant span
  is its content plus the end-of-turn marker the caller names (which must follow it); a token is
  labelled when its character offsets lie inside a span. loss_on all labels every token.
* Truncation to seq_length; a conversation with no labelled token after position 0 is dropped.
* Rows: `none` one conversation per row; `document` conversations packed first-fit-decreasing
  (longest first, ties in order, windows of 1000) into rows of seq_length. Since packing must not
  let attention cross conversations, a packed row's loss is computed here from its conversations
  one by one (padded side by side, attention mask), which is what the product must equal.
* Step: global batch = G rows by reference.py's epoch order; loss = summed cross-entropy over every
  labelled token of those rows / their count; clipping, AdamW and schedule as reference.py.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accel_tp.config import Config

from .reference import SPLIT_SEED, _lr_factor, _model, _order, _tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "accel_tp" / "assets" / "default_conversations.jsonl.gz"
WINDOW = 1000  # docs/packing.md's packing window
IGNORE = -100


def _conversations(cfg: Config) -> list[list[dict]]:
    d = cfg.data
    if d.source == "embedded":
        lines = gzip.decompress(SHIPPED.read_bytes()).decode("utf-8").splitlines()
    else:
        assert d.source == "files" and all(f.endswith(".jsonl") for f in d.files), (
            "reference: .jsonl files only"
        )
        lines = [line for f in d.files for line in Path(f).read_text(encoding="utf-8").splitlines()]
    convs = [json.loads(line)[d.messages_field] for line in lines if line.strip()]
    return convs if d.percentage >= 100 else convs[: math.ceil(len(convs) * d.percentage / 100)]


def _split(cfg: Config, convs: list[list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    if not cfg.data.eval_fraction:
        return convs, []
    import datasets

    idx = datasets.Dataset.from_dict({"i": list(range(len(convs)))}).train_test_split(
        test_size=cfg.data.eval_fraction, seed=SPLIT_SEED, shuffle=True
    )
    return [convs[i] for i in idx["train"]["i"]], [convs[i] for i in idx["test"]["i"]]


def label_by_characters(
    tok: Any, messages: list[dict], marker: str, loss_on: str
) -> tuple[list[int], list[int]]:
    """Ids and labels of one conversation, the assistant spans found in the rendered characters."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        start = text.index(m["content"], cursor)
        end = start + len(m["content"])
        if m["role"] == "assistant":
            assert text.startswith(marker, end), f"reference: no {marker!r} after an assistant message"
            end += len(marker)
            spans.append((start, end))
        cursor = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if loss_on == "all":
        return ids, list(ids)
    labels = [t if any(a <= s and e <= b for a, b in spans) and e > s else IGNORE
              for t, (s, e) in zip(ids, enc["offset_mapping"])]  # fmt: skip
    return ids, labels


def _encode(cfg: Config, tok: Any, convs: list[list[dict]], marker: str) -> list[tuple[list[int], list[int]]]:
    out = []
    for messages in convs:
        ids, labels = label_by_characters(tok, messages, marker, cfg.data.label_mode)
        ids, labels = ids[: cfg.data.seq_length], labels[: cfg.data.seq_length]
        if len(ids) >= cfg.data.min_tokens and any(t != IGNORE for t in labels[1:]):
            out.append((ids, labels))
    return out


def _rows(cfg: Config, n: int, lengths: list[int]) -> list[list[int]]:
    """Each row as the list of conversation indices it holds."""
    if cfg.data.packing == "none":
        return [[i] for i in range(n)]
    assert cfg.data.packing == "document", f"reference: packing {cfg.data.packing!r}"
    rows: list[list[int]] = []
    for w in range(0, n, WINDOW):
        window_rows: list[tuple[int, list[int]]] = []  # (used tokens, conversations)
        for i in sorted(range(w, min(n, w + WINDOW)), key=lambda i: -lengths[i]):
            for k, (used, members) in enumerate(window_rows):
                if used + lengths[i] <= cfg.data.seq_length:
                    window_rows[k] = (used + lengths[i], [*members, i])
                    break
            else:
                window_rows.append((lengths[i], [i]))
        rows += [members for _, members in window_rows]
    return rows


def _loss_sum(model: Any, convs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    width = max(len(ids) for ids, _ in convs)
    ids = torch.full((len(convs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(convs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(convs), width), dtype=torch.long)
    for r, (i, lab) in enumerate(convs):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    target = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((target != IGNORE).sum())


def reference_chat_run(cfg: Config, global_batch: int, marker: str) -> dict[str, Any]:
    """Train in one process on the distributed run's global batches of chat rows, then evaluate.
    `marker` is the template's end-of-turn string. Returns losses, grad_norms, eval_loss, eval_tokens."""
    tr = cfg.train
    tok = _tokenizer(cfg)
    if cfg.model.chat_template is not None:
        t = cfg.model.chat_template
        tok.chat_template = (
            t if ("{%" in t or "{{" in t) else Path(t).expanduser().read_text(encoding="utf-8")
        )
    train_convs, eval_convs = _split(cfg, _conversations(cfg))
    train = _encode(cfg, tok, train_convs, marker)
    held_out = _encode(cfg, tok, eval_convs, marker)
    rows = _rows(cfg, len(train), [len(ids) for ids, _ in train])
    steps = tr.max_steps or max(1, len(rows) // global_batch * tr.epochs)
    order = _order(len(rows), cfg, steps, global_batch)

    model = _model(cfg, len(tok))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": tr.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=tr.learning_rate,
        betas=(tr.adam_beta1, tr.adam_beta2),
        eps=tr.adam_eps,
    )
    clip = cfg.deepspeed.gradient_clipping
    model.train()
    losses, grad_norms = [], []
    for s in range(steps):
        convs = [train[i] for r in order[s * global_batch : (s + 1) * global_batch] for i in rows[r]]
        loss_sum, count = _loss_sum(model, convs, tok.pad_token_id)
        (loss_sum / count).backward()
        norm = torch.nn.utils.get_total_norm([p.grad.double() for p in params if p.grad is not None])
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        for group in opt.param_groups:
            group["lr"] = tr.learning_rate * _lr_factor(cfg, s, steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / count)
        grad_norms.append(float(norm))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_out), 16):
            part, n = _loss_sum(model, held_out[i : i + 16], tok.pad_token_id)
            total, count = total + float(part), count + n
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "eval_loss": total / count if count else math.nan,
        "eval_tokens": float(count),
    }
