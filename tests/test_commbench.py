"""accel_tp.tools.commbench: the TP traffic formula against the collectives real DeepSpeed AutoTP issues
(gloo, 4 processes), and a CPU run of scripts/comm_bench.py (bandwidths are never asserted)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from accel_tp.tools.commbench import predict_ms, tp_traffic

from .mp_utils import ROOT, TINY, torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("vocab_parallel", [True, False])
def test_formula_counts_what_autotp_sends(tmp_path, vocab_parallel):
    out = tmp_path / "count.json"
    overrides = [
        "data.padding=max_length", "data.seq_length=64", "train.micro_batch_size=2",
        "deepspeed.precision=fp32", f"run.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.eval_fraction=0", "train.log_with=[]", f"parallelism.vocab_parallel_loss={str(vocab_parallel).lower()}",
    ]  # fmt: skip
    proc = torchrun(
        4, ROOT / "tests" / "workers" / "count_tp_collectives.py", [str(TINY), str(out), *overrides]
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(out.read_text())
    seen = collections.Counter((op, size) for op, size in report["seen"])
    want = report["predicted"]
    tokens = report["tokens"]
    act = tokens * 128 * 4  # tokens x hidden x 4 bytes (fp32)
    known = {("all_reduce", act): want["all_reduce_calls"]}
    if vocab_parallel:
        # 7 per layer and the loss's input gradient (the tiny model is untied: no embedding's); no logits.
        assert want["all_reduce_calls"] == 7 * 4 + 1 and want["all_gather_calls"] == 0
        assert want["all_reduce_bytes"] == want["all_reduce_calls"] * act
        # One chunk: its max (4 bytes a token), then sum-exp and target logit together (8).
        known.update({("all_reduce", 4 * tokens): 1, ("all_reduce", 8 * tokens): 1})
        assert want["loss_all_reduce_calls"] == 2 and want["loss_all_reduce_bytes"] == 12 * tokens
    else:
        assert want["all_reduce_calls"] == 7 * 4 + 1  # 7 per layer + lm_head's input grad
        assert want["all_reduce_bytes"] == want["all_reduce_calls"] * act
        assert want["all_gather_calls"] == 1  # the logits
        known[("all_gather", want["all_gather_bytes"])] = 1
    for key, n in known.items():
        assert seen[key] == n, (key, seen[key], n)
    others = {k: n for k, n in seen.items() if k not in known}
    assert all(size <= 16 for _, size in others), f"unexpected TP collectives: {others}"


def test_prediction_scales_with_traffic():
    rows = [
        {"op": "all_reduce", "size_mb": 1.0, "busbw_gbs": 100.0},
        {"op": "all_gather", "size_mb": 1.0, "busbw_gbs": 50.0},
    ]
    t = tp_traffic(tokens=1024, hidden=512, vocab=0, layers=2, dtype_bytes=2, lm_head_sharded=False)
    assert (t.all_reduce_calls, t.all_gather_calls) == (14, 0)
    # 14 all-reduces of 1 MiB on 2 ranks move 2(n-1)/n = 1x their size over the bus at 100 GB/s.
    assert predict_ms(t, rows, tp_size=2) == pytest.approx(1e3 * 14 * 2**20 / 100e9)


def test_comm_bench_cli_on_cpu(tmp_path):
    out = tmp_path / "comm.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "comm_bench.py"), "--config", str(TINY), "--nproc", "2",
        "--set", "parallelism.dp_size=1", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "parallelism.vocab_parallel_loss=false",
        "--sizes-mb", "0.25,1", "--iters", "3", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["op"] for r in report["bandwidth"]} == {"all_reduce", "all_gather"}
    assert all(r["busbw_gbs"] > 0 for r in report["bandwidth"])
    traffic = report["traffic_per_micro_batch"]
    assert traffic["all_reduce_calls"] == 7 * 4 + 1
    # The logits' all-gather: micro-batch 8 x 256 tokens x the tokenizer-sized vocab (fp32 on CPU).
    assert report["micro_batch_tokens"] == 8 * 256
    vocab = traffic["all_gather_bytes"] / (8 * 256 * 4)
    assert vocab == int(vocab) and vocab % 64 == 0 and vocab > 1000
    assert report["predicted_tp_ms_per_micro_batch"] > 0
    assert "all-reduces" in proc.stdout
