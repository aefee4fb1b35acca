#!/bin/bash
# Issue #19 device calls of 2026-12-05 (asked for an H200; all four ran on one H100 80GB), run from the repo
# root on the device machine after
#   bash .devkit/install.sh && export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0
# as `bash docs/bench/2026-12-05_device_calls.sh <call>`; JSON and logs go to $OUT.
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
    grep -v '^JSON' | grep -v -i "warn" | tail -40
  stamp $t
}

long() { # call 1: 1.5B, 64k-token micro-batches (on the H100: ac28 timed out cold, ac12 / ac6 out of memory)
  nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
  bench long_15b_8192_ac 330 --shapes qwen2.5-1.5b --seq 8192 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac28:model.activation_checkpointing=true' --variant 'ac12:model.activation_checkpointing=12' \
    --variant 'ac6:model.activation_checkpointing=6' --steps 3 --warmup 2 --timeout 110
  bench long_15b_32768_ac 200 --shapes qwen2.5-1.5b --seq 32768 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac12:model.activation_checkpointing=12' --steps 3 --warmup 2 --timeout 150
}

long_h100() { # calls 3 and 4: what fits an 80 GB H100
  bench long_15b_8192_selective_ac 420 --shapes qwen2.5-1.5b --seq 8192 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac28:model.activation_checkpointing=true' --variant 'ac20:model.activation_checkpointing=20' \
    --steps 3 --warmup 2 --timeout 200
  bench long_15b_32768_ac20 260 --shapes qwen2.5-1.5b --seq 32768 --micro-batch-tokens 65536 --no-reference \
    --no-accel --variant 'ac20:model.activation_checkpointing=20' --steps 3 --warmup 2 --timeout 240
}

# A checkpoint hook (ACCEL_TP_CHECKPOINT_HOOK) that SIGKILLs the worker once, inside one step's save,
# after recording the time: a worker lost mid-checkpoint.
make_kill_hook() {
  mkdir -p /tmp/hooks
  cat > /tmp/hooks/killhook.py <<'EOF'
import os, signal, time
from pathlib import Path

def kill_once(point, step, rank, folder):
    marker = Path(os.environ["KILL_MARKER"])
    if point == "written" and step == int(os.environ["KILL_AT"]) and rank == 0 and not marker.exists():
        marker.write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
EOF
}

report_times() { # metrics.jsonl driver-start [kill-marker]
  python - "$@" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
t0 = float(sys.argv[2])
first = rows[0]
print(f"   driver start -> step {first['step']} done: {first['time'] - t0:.1f} s (that step {first['step_time_s']:.1f} s)")
if len(sys.argv) > 3:
    killed = float(open(sys.argv[3]).read())
    r = [r for r in rows if r["time"] > killed][0]
    print(f"   SIGKILL -> resumed step {r['step']} done: {r['time'] - killed:.1f} s (that step {r['step_time_s']:.1f} s)")
print("   steps:", [(r["step"], round(r["loss"], 4), round(r["step_time_s"], 2)) for r in rows])
EOF
}

ray_run() { # log-name args...
  local name=$1; shift
  local t0=$(date +%s.%N)
  timeout 300 python scripts/train_ray.py --config $Y --set ray.storage_path=/tmp/rr --set train.log_every=1 \
    --set train.progress_bar=false "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"
  grep -h "\[accel-tp\]" "$OUT/$name.log" | grep -v "mesh\|rank " | cut -c1-400
  echo "$t0" > "/tmp/$name.t0"
}

restart() { # call 2: Ray start to step 1, SIGKILL to the resumed step, compile cache on a fresh Inductor cache
  make_kill_hook
  export PYTHONPATH=$PYTHONPATH:/tmp/hooks
  echo "== ray: cold start, SIGKILL in the step-8 save, restart (max_failures 1)"
  export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a KILL_MARKER=/tmp/killed KILL_AT=8 ACCEL_TP_CHECKPOINT_HOOK=killhook:kill_once
  local t=$(date +%s)
  ray_run rec1 --set run.name=rec --set train.max_steps=12 --set checkpoint.every_steps=4 --set ray.max_failures=1
  report_times /tmp/rr/rec/metrics.jsonl "$(cat /tmp/rec1.t0)" /tmp/killed
  stamp $t
  unset ACCEL_TP_CHECKPOINT_HOOK
  echo "== ray: the same run resumed on an empty Inductor cache (a fresh node), compile cache on"
  export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_b; t=$(date +%s)
  ray_run rec2 --set run.name=rec --set train.max_steps=14 --set checkpoint.every_steps=0
  stamp $t
  echo "== ray: a new run on an empty Inductor cache, compile cache off (cold compile)"
  export TORCHINDUCTOR_CACHE_DIR=/tmp/ind_c; t=$(date +%s)
  ray_run cold --set run.name=cold --set train.max_steps=6 --set checkpoint.every_steps=0 --set checkpoint.at_end=false \
    --set model.compile_cache=false
  report_times /tmp/rr/cold/metrics.jsonl "$(cat /tmp/cold.t0)"
  stamp $t
  ls -la /tmp/rr/rec/compile_cache
}

"$@"
