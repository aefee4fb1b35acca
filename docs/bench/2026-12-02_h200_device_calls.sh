######## call1.sh
#!/bin/bash
# Device call 1: block-mask A/B, micro-batch 48 vs reference, profile. Run from .gputree.
set -u
Y=accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv
python -c "import torch,transformers,deepspeed;print(torch.__version__,transformers.__version__,deepspeed.__version__)"
echo "== gpu test: block mask"; t=$(date +%s)
timeout 110 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k block_mask -x 2>&1 | tail -12
echo "   $(( $(date +%s) - t )) s"
echo "== bench 0.5B seq 2048 mb 24: block mask A/B"; t=$(date +%s)
timeout 200 python scripts/bench.py --config $Y --shapes qwen2.5-0.5b --seq 2048 --corpus wikitext-like \
  --micro-batch-tokens 49152 --no-reference --variant 'hfmask:env:ACCEL_TP_HF_BLOCK_MASK=1' \
  --steps 8 --warmup 3 --timeout 120 --json $OUT/b05_mask_ab.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== bench 0.5B seq 2048 mb 48 vs reference"; t=$(date +%s)
timeout 180 python scripts/bench.py --config $Y --shapes qwen2.5-0.5b --seq 2048 --corpus wikitext-like \
  --micro-batch-tokens 98304 --reference-micro-batch-tokens 16384 \
  --steps 8 --warmup 3 --timeout 110 --json $OUT/b05_mb48.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== profile 0.5B mb 24 (wikitext-like)"; t=$(date +%s)
python -c "import json;from accel_tp.corpus import wikitext_like;open('/tmp/wt.jsonl','w').write(''.join(json.dumps({'text':x})+'\n' for x in wikitext_like(20000)))"
timeout 100 python scripts/profile_step.py --config $Y --set data.source=files --set 'data.files=[/tmp/wt.jsonl]' \
  --set data.name=null --steps 2 --trace /tmp/trace.json > $OUT/profile_05b.txt 2>&1
tail -32 $OUT/profile_05b.txt
echo "   $(( $(date +%s) - t )) s"
######## call2.sh
#!/bin/bash
# Device call 2: GPU mask test (full traceback), block-mask A/B/A/B, long context. Run from .gputree.
set -u
Y=accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml
echo "== gpu test: block mask"; t=$(date +%s)
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k block_mask -x --tb=short -W ignore > $OUT/gpu_mask_test.txt 2>&1
grep -v "^  warnings\|Warning" $OUT/gpu_mask_test.txt | grep -A4 "Error\|error\|Mismatch\|assert\|passed\|failed" | head -40
echo "   $(( $(date +%s) - t )) s"
timeout 60 python maskbench.py 2>&1 | grep "^mask"
echo "== bench 0.5B seq 2048 mb 24: block mask A/B/A/B"; t=$(date +%s)
timeout 260 python scripts/bench.py --config $Y --shapes qwen2.5-0.5b --seq 2048 --corpus wikitext-like \
  --micro-batch-tokens 49152 --no-reference --variant 'hfmask:env:ACCEL_TP_HF_BLOCK_MASK=1' \
  --variant 'accel2:env:ACCEL_TP_BENCH_REPEAT=1' --variant 'hfmask2:env:ACCEL_TP_HF_BLOCK_MASK=1' \
  --steps 8 --warmup 3 --timeout 90 --json $OUT/b05_mask_abab.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== long context 0.5B, 64k-token micro-batches"; t=$(date +%s)
timeout 150 python scripts/bench.py --config $Y --shapes qwen2.5-0.5b --seq 8192,32768 --corpus wikitext-like \
  --micro-batch-tokens 65536 --no-reference --steps 4 --warmup 2 --timeout 70 --json $OUT/long_05b.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== long context 1.5B, 64k-token micro-batches, activation checkpointing"; t=$(date +%s)
timeout 170 python scripts/bench.py --config $Y --shapes qwen2.5-1.5b --seq 8192,32768 --corpus wikitext-like \
  --micro-batch-tokens 65536 --no-reference --no-accel --variant 'ac:model.activation_checkpointing=true' \
  --steps 4 --warmup 2 --timeout 80 --json $OUT/long_15b_ac.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
######## call3.sh
#!/bin/bash
# Device call 3: 0.5B mb 48 vs reference (Transformers' masks), 1.5B seq 4096 mb 8, 1.5B long context.
set -u
Y=accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml
echo "== bench 0.5B seq 2048 mb 48 vs reference"; t=$(date +%s)
timeout 150 python scripts/bench.py --config $Y --shapes qwen2.5-0.5b --seq 2048 --corpus wikitext-like \
  --micro-batch-tokens 98304 --reference-micro-batch-tokens 16384 \
  --steps 8 --warmup 3 --timeout 80 --json $OUT/b05_mb48_hfmask.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== bench 1.5B seq 4096 mb 8"; t=$(date +%s)
timeout 100 python scripts/bench.py --config $Y --shapes qwen2.5-1.5b --seq 4096 --corpus wikitext-like \
  --micro-batch-tokens 32768 --no-reference --steps 6 --warmup 3 --timeout 95 --json $OUT/b15_4096_mb8.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== 1.5B seq 8192 mb 8 without activation checkpointing"; t=$(date +%s)
timeout 90 python scripts/bench.py --config $Y --shapes qwen2.5-1.5b --seq 8192 --corpus wikitext-like \
  --micro-batch-tokens 65536 --no-reference --steps 4 --warmup 2 --timeout 85 --json $OUT/long_15b_8192_noac.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
echo "== 1.5B seq 32768 mb 2 with activation checkpointing"; t=$(date +%s)
timeout 90 python scripts/bench.py --config $Y --shapes qwen2.5-1.5b --seq 32768 --corpus wikitext-like \
  --micro-batch-tokens 65536 --no-reference --no-accel --variant 'ac:model.activation_checkpointing=true' \
  --steps 4 --warmup 2 --timeout 85 --json $OUT/long_15b_32768_ac.json 2>&1 | grep -v '^JSON'
echo "   $(( $(date +%s) - t )) s"
######## maskbench.py
"""Host and device time of one document block mask: accel-tp's builder vs Transformers' path."""
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import masking_utils as mu

from accel_tp.parallelize import document_block_mask
from tests.test_block_mask import packed_positions

for rows, length in ((24, 2048), (8, 8192), (2, 32768)):
    pos = packed_positions(rows, length, 0).cuda()

    def hf():
        packed = mu.find_packed_sequence_indices(pos)  # host sync inside
        fn = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(packed))
        return create_block_mask(fn, rows, None, length, length, device="cuda", _compile=True)

    for name, fn in (("accel-tp", lambda: document_block_mask(pos)), ("transformers", hf)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        host, wall = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        host.sort()
        wall.sort()
        print(f"mask {rows}x{length} {name}: host {1e3 * host[10]:.2f} ms, to done {1e3 * wall[10]:.2f} ms (median of 20)")
