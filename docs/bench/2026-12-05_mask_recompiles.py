"""Do compiled decoder layers recompile per step with accel-tp's document block masks vs Transformers'?

CPU, forward only (flex attention has no CPU backward). Run from the repository root:
    TORCH_LOGS=recompiles .venv/bin/python docs/bench/2026-12-05_mask_recompiles.py hf|doc
Each step packs 2 rows of 256 tokens with new document boundaries; the line per step prints
Dynamo's graph and frame counters. Result in docs/performance.md (2026-12-05, CPU).
"""

import os
import sys
import time

import torch
from torch._dynamo.utils import counters
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from accel_tp import parallelize  # noqa: E402

use_doc = sys.argv[1] == "doc"
torch.manual_seed(0)
cfg = Qwen2Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
cfg._attn_implementation = "flex_attention"
model = Qwen2ForCausalLM(cfg)
if use_doc:  # what ACCEL_TP_DOCUMENT_BLOCK_MASK=1 installs
    model.model.forward = parallelize._block_mask_forward(model.model.forward)
for layer in model.model.layers:
    layer.compile()
g = torch.Generator().manual_seed(1)
for step in range(12):
    rows, length = 2, 256
    pos = []
    for _ in range(rows):
        cuts = sorted(torch.randint(1, length, (3,), generator=g).tolist())
        segs = [b - a for a, b in zip([0] + cuts, cuts + [length]) if b > a]
        pos.append(torch.cat([torch.arange(s) for s in segs]))
    ids = torch.randint(0, 256, (rows, length), generator=g)
    t = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.stack(pos), labels=ids)
    print(
        step,
        f"{out.loss.item():.6f}",
        f"{time.perf_counter() - t:.2f}s",
        "unique_graphs",
        counters["stats"]["unique_graphs"],
        "frames",
        dict(counters["frames"]),
        flush=True,
    )
