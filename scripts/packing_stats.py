"""Fraction of real (non-padding) tokens per batch for each packing mode.

python scripts/packing_stats.py [--seq-length 512] [--micro-batch 8]

Two corpora: the embedded default, and a wikitext-like length mix (synthetic lines whose token
lengths follow wikitext-2's shape: many short headings, paragraphs averaging ~70 tokens, a long
tail), so no download is needed.
"""

import argparse
import json
import tempfile

import datasets

from accel_tp.corpus import build_default_tokenizer, load_default_corpus, wikitext_like
from accel_tp.data import make_collate, pack_dataset, tokenize_dataset


def real_fraction(rows: list[dict], collate, micro: int) -> float:
    real = total = 0
    for i in range(0, len(rows) - micro + 1, micro):
        b = collate(rows[i : i + micro])
        real += int(b.real_tokens)
        total += b.inputs["input_ids"].numel()
    return real / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()
    tok = build_default_tokenizer(tempfile.mkdtemp())
    pad = tok.pad_token_id
    results = {}
    for corpus, texts in (("embedded", load_default_corpus()), ("wikitext-like", wikitext_like())):
        raw = datasets.Dataset.from_dict({"text": texts})
        per_doc = tokenize_dataset(raw, tok, args.seq_length, 2)
        whole = tokenize_dataset(raw, tok, None, 2)
        lengths = [len(x) for x in per_doc["input_ids"]]
        modes = {
            "none (pad to max_length, the tutorial)": (
                per_doc,
                make_collate(pad, "max_length", args.seq_length),
            ),
            "none (pad to longest in batch)": (per_doc, make_collate(pad, "longest", args.seq_length)),
            "concat": (pack_dataset(whole, "concat", args.seq_length), None),
            "document": (pack_dataset(whole, "document", args.seq_length), None),
        }
        res = {"docs": len(lengths), "mean_tokens_per_doc": round(sum(lengths) / len(lengths), 1)}
        for name, (ds, collate) in modes.items():
            mode = name.split()[0]
            collate = collate or make_collate(pad, "longest", args.seq_length, mode)
            res[name] = round(real_fraction(list(ds), collate, args.micro_batch), 4)
        results[corpus] = res
    print(json.dumps({"seq_length": args.seq_length, "micro_batch": args.micro_batch, **results}, indent=2))


if __name__ == "__main__":
    main()
