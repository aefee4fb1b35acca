#!/bin/bash
# Issue #19 device calls of 2026-12-06 (asked for an H200 with needs_h200), run from the repo root on the
# device machine after
#   bash .devkit/install.sh && export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0
# as `bash docs/bench/2026-12-06_device_calls.sh <call>`; JSON and logs go to $OUT.
# The seams ACCEL_TP_EAGER_SYNC and ACCEL_TP_COMPILE_SCOPE exist at commit 2e9dc04 (the tree that ran
# `levers_h100`); both levers measured no gain and were removed after it (docs/performance.md).
set -u
Y=accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
stamp() { echo "   $(($(date +%s) - $1)) s"; }
bench() { # name timeout args...
  local name=$1 limit=$2; shift 2
  echo "== $name"; local t=$(date +%s)
  timeout "$limit" python scripts/bench.py --config $Y --corpus wikitext-like --json "$OUT/$name.json" "$@" 2>&1 |
    grep -v '^JSON' | grep -v -i "warn" | tail -30
  stamp $t
}

float8() { # one compiled decoder layer, bf16 vs torchao float8 (tensorwise, rowwise)
  echo "== float8 layers"; local t=$(date +%s)
  timeout 170 python docs/bench/2026-12-06_float8_layers.py --json "$OUT/float8_layers.json" 2>&1 |
    grep -v -i "warn" | tail -12
  stamp $t
}

levers_h100() { # the call that ran (an H100, at 2e9dc04): float8 layers; 0.5B mb 24 sync A/B/A/B, whole-stack compile
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  float8
  bench h100_05b_2048 380 --shapes qwen2.5-0.5b --seq 2048 --micro-batch-tokens 49152 --no-reference \
    --variant 'eager:env:ACCEL_TP_EAGER_SYNC=1' --variant 'stack:env:ACCEL_TP_COMPILE_SCOPE=stack' \
    --variant 'eager2:env:ACCEL_TP_EAGER_SYNC=1' --variant 'accel2:env:ACCEL_TP_BENCH_REPEAT=1' \
    --steps 8 --warmup 3 --timeout 120
}

long() { # not run (no H200 came): 1.5B long context on the H200's memory
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench long_15b_8192 230 --shapes qwen2.5-1.5b --seq 8192 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac0:model.activation_checkpointing=false' \
    --variant 'ac8:model.activation_checkpointing=8' --steps 3 --warmup 2 --timeout 110
  bench long_15b_32768 170 --shapes qwen2.5-1.5b --seq 32768 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac8:model.activation_checkpointing=8' --steps 3 --warmup 2 --timeout 150
}

target15() { # the 1.5B target: mb 8 (32k tokens per step), and mb 8 x ga 4 (DeepSpeed's step once per 131k tokens)
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  # ga 4 first: the first arm of a fresh machine also tokenizes and compiles cold (>130 s on the H100).
  bench mfu_15b_4096 460 --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 32768 --no-reference \
    --no-accel --variant 'ga4:train.grad_accum_steps=4' --variant 'ga1:env:ACCEL_TP_BENCH_REPEAT=1' \
    --steps 6 --warmup 2 --timeout 230
}

h200a() { # later session of 12-06: the 1.5B target (mb 8) and its profile
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  target15
  prof15
}

h200b() { # 1.5B long context, 64k-token micro-batches, 8 of 28 layers checkpointed
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench long_15b_8192_ac8 190 --shapes qwen2.5-1.5b --seq 8192 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac8:model.activation_checkpointing=8' --steps 3 --warmup 2 --timeout 170
  bench long_15b_32768_ac8 200 --shapes qwen2.5-1.5b --seq 32768 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac8:model.activation_checkpointing=8' --steps 3 --warmup 2 --timeout 180
}

h200c() { # 0.5B mb 48 vs the reference at the same global batch, again (12-02 was one run)
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench mfu_05b_2048_mb48 300 --shapes qwen2.5-0.5b --seq 2048 --micro-batch-tokens 98304 \
    --reference-micro-batch-tokens 16384 --steps 8 --warmup 3 --timeout 140
}

prof15() { # where a 1.5B seq-4096 step (micro-batch MB, default 8)'s time goes (GPU busy fraction, idle gaps by host code)
  python -c "import json;from accel_tp.corpus import wikitext_like;open('/tmp/wt.jsonl','w').write(''.join(json.dumps({'text':x})+'\\n' for x in wikitext_like(20000)))"
  echo "== profile 1.5B seq 4096 mb ${MB:-8}"; local t=$(date +%s)
  timeout 200 python scripts/profile_step.py --config $Y --set model.architecture=qwen2.5-1.5b \
    --set model.name_or_path=null --set data.seq_length=4096 --set train.micro_batch_size=${MB:-8} \
    --set data.source=files --set 'data.files=[/tmp/wt.jsonl]' --set data.name=null --steps 2 \
    --trace /tmp/trace15.json > "$OUT/profile_15b_4096_mb${MB:-8}.txt" 2>&1
  tail -45 "$OUT/profile_15b_4096_mb${MB:-8}.txt"
  stamp $t
}

ga_h100() { # 1.5B seq 4096 on an H100's memory: mb 4 x ga 1 vs mb 4 x ga 4 (DeepSpeed's step once per 64k tokens), A/B/A/B
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench h100_15b_4096_ga 420 --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 16384 --no-reference \
    --variant 'ga4:train.grad_accum_steps=4' --variant 'accel2:env:ACCEL_TP_BENCH_REPEAT=1' \
    --variant 'ga4b:train.grad_accum_steps=4' --steps 6 --warmup 2 --timeout 130
}

mask_h100() { # 1.5B seq 4096 mb 4 x ga 4: Transformers' masks (a host sync per micro-batch) vs accel-tp's (none)
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  # The first arm tokenizes and compiles cold: not counted. Then doc / hf / doc2 on the warm machine.
  bench h100_15b_4096_ga4_mask 470 --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 16384 --no-reference \
    --no-accel --variant 'cold:train.grad_accum_steps=4' \
    --variant 'doc:train.grad_accum_steps=4 env:ACCEL_TP_DOCUMENT_BLOCK_MASK=1' \
    --variant 'hf:train.grad_accum_steps=4 env:ACCEL_TP_BENCH_REPEAT=1' \
    --variant 'doc2:train.grad_accum_steps=4 env:ACCEL_TP_DOCUMENT_BLOCK_MASK=1 env:ACCEL_TP_BENCH_REPEAT=1' \
    --steps 5 --warmup 2 --timeout 200
}

h200min() { # what the last 268 s of device time allow: only the 1.5B mb 8 x ga 4 arm (cold)
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench mfu_15b_4096_ga4 215 --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 32768 --no-reference \
    --no-accel --variant 'ga4:train.grad_accum_steps=4' --steps 5 --warmup 2 --timeout 200
}

h200d() { # session 3 of 12-06: 0.5B at global batch 96: the reference (8 x 12) vs accel-tp mb 48 x ga 2
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench mfu_05b_2048_gb96 330 --shapes qwen2.5-0.5b --seq 2048 --micro-batch-tokens 98304 \
    --reference-micro-batch-tokens 16384 --set train.grad_accum_steps=2 --docs 40000 \
    --steps 6 --warmup 3 --timeout 200
}

h200e() { # session 3 of 12-06: the 1.5B mb 8 x ga 4 arm again, twice on one machine
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench mfu_15b_4096_ga4_x2 400 --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 32768 --no-reference \
    --no-accel --variant 'ga4:train.grad_accum_steps=4' \
    --variant 'ga4b:train.grad_accum_steps=4 env:ACCEL_TP_BENCH_REPEAT=1' --steps 5 --warmup 2 --timeout 200
}

"$@"
