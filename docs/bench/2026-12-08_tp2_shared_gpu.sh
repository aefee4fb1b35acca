#!/usr/bin/env bash
# One device call: tp 2 as two processes sharing the one GPU (--shared-gpu) against tp 1, memory per
# process (issue "Tensor parallel on the GPU" targets). Output: $OUT/*.json and the logs.
set -u
B="python3 scripts/bench.py --config accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml --no-reference --steps 2 --warmup 1 --timeout 240"
case "${1:-all}" in
  big)
    # 1.5B, seq 4096, micro-batch 4 (16,384 tokens): tp 1 with Liger's fused loss (its best), tp 1 without,
    # tp 2 with the vocabulary-parallel loss. compile on in all (Liger's layer kernels yield to it).
    $B --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 16384 --nproc 1 \
       --variant 'noliger:model.liger_kernel=false' --json $OUT/big_tp1.json 2>&1 | tail -12
    $B --shapes qwen2.5-1.5b --seq 4096 --micro-batch-tokens 16384 --nproc 2 --tp 2 --shared-gpu --no-accel \
       --variant 'vocab:model.liger_kernel=false' --json $OUT/big_tp2.json 2>&1 | tail -12
    ;;
  small)
    # 0.5B, seq 2048, tp 2 on one GPU: micro-batches with the logits gathered and with the vocabulary-parallel loss.
    $B --shapes qwen2.5-0.5b --seq 2048 --nproc 2 --tp 2 --shared-gpu --no-accel \
       --variant 'gathered-mb8:model.liger_kernel=false parallelism.vocab_parallel_loss=false train.micro_batch_size=8' \
       --variant 'gathered-mb16:model.liger_kernel=false parallelism.vocab_parallel_loss=false train.micro_batch_size=16' \
       --variant 'vocab-mb16:model.liger_kernel=false train.micro_batch_size=16' \
       --variant 'vocab-mb32:model.liger_kernel=false train.micro_batch_size=32' \
       --json $OUT/small_tp2.json 2>&1 | tail -14
    ;;
esac
