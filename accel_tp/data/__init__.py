"""Data: text and chat sources, tokenization with a shared cache, and the dp-rank-sharded loader.

sources.py finds and checks the documents (embedded corpus, hub, local files; the driver's
preflight checks); tokenize.py turns them into token ids (chat: with labels) and builds the rows;
packing.py packs documents into rows of seq_length; cache.py tokenizes once per filesystem into
an atomically published cache and fingerprints the data for resume; loader.py shards rows by DP
rank and collates micro-batches.
"""

from __future__ import annotations

from .cache import cache_key, cache_problem, data_fingerprint, elect_cache_builder, load_or_build_tokenized
from .loader import Batch, DPShardedSampler, ShardedLoader, eval_batches, make_collate, prepare_dataloader
from .packing import LABELS, pack_dataset, pack_rows
from .sources import check_data_sources, load_split, load_text_dataset
from .tokenize import build_rows, tokenize_chat_dataset, tokenize_dataset

__all__ = [
    "check_data_sources",
    "load_split",
    "load_text_dataset",
    "tokenize_dataset",
    "tokenize_chat_dataset",
    "build_rows",
    "LABELS",
    "pack_rows",
    "pack_dataset",
    "cache_key",
    "data_fingerprint",
    "elect_cache_builder",
    "cache_problem",
    "load_or_build_tokenized",
    "Batch",
    "DPShardedSampler",
    "ShardedLoader",
    "make_collate",
    "prepare_dataloader",
    "eval_batches",
]
