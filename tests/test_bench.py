"""scripts/bench.py: arm construction (unit) and a CPU smoke run of the real thing (timings are
never asserted: only that every arm ran and the report is complete)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from accel_tp.config import load_config
from accel_tp.data import load_or_build_tokenized, prepare_dataloader
from accel_tp.model import load_tokenizer
from accel_tp.parallel import Topology
from accel_tp.tools import bench

from .mp_utils import ROOT, TINY


def _arms(tmp_path, *argv: str) -> list[dict]:
    args = bench.parse_args(["--config", str(TINY), "--set", "parallelism.tp_size=1", *argv])
    return bench.build_arms(args, tmp_path)


def test_arms_share_batches_and_the_reference_keeps_the_global_batch(tmp_path):
    arms = _arms(
        tmp_path,
        "--seq", "256,1024",
        "--micro-batch-tokens", "4096",
        "--reference-micro-batch-tokens", "1024",
        "--tutorial",
        "--variant", "compiled:model.compile=true",
    )  # fmt: skip
    cfgs = {(a["name"], a["group"][1]): load_config(TINY, a["overrides"]) for a in arms}
    assert [a["name"] for a in arms] == ["tutorial"] + ["reference", "accel", "compiled"] * 2
    for seq in (256, 1024):
        acc, ref = cfgs[("accel", seq)], cfgs[("reference", seq)]
        assert acc.train.micro_batch_size == 4096 // seq
        assert ref.data.seq_length == acc.data.seq_length == seq
        assert ref.train.micro_batch_size <= 1024 // seq
        assert (
            ref.train.micro_batch_size * ref.train.grad_accum_steps
            == acc.train.micro_batch_size * acc.train.grad_accum_steps
        )
        assert cfgs[("compiled", seq)].model.compile
    tut = cfgs[("tutorial", 512)]
    assert (tut.train.micro_batch_size, tut.data.packing, tut.data.padding) == (1, "none", "max_length")
    assert all(c.checkpoint.at_end is False and c.train.log_with == [] for c in cfgs.values())


def test_per_shape_values():
    assert bench._per_shape("4096", "tiny") == 4096
    assert bench._per_shape("tiny=10,*=20", "tiny") == 10
    assert bench._per_shape("tiny=10,*=20", "qwen2.5-0.5b") == 20
    assert bench._per_shape("tiny=10", "qwen2.5-0.5b") is None
    assert bench._per_shape(None, "tiny") is None


def test_bad_variant_fails_before_any_arm_runs(tmp_path):
    with pytest.raises(Exception, match="train.micro_batch: unknown key"):
        _arms(tmp_path, "--variant", "typo:train.micro_batch=4")


@pytest.mark.slow
def test_cpu_smoke_run_tp2(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(TINY), "--nproc", "2",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--seq", "128", "--steps", "2", "--warmup", "1", "--tutorial", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"tutorial", "reference", "accel"}
    for r in rows.values():
        assert "error" not in r
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and 0 < r["real_fraction"] <= 1
        assert r["mfu"] is None  # no GPU peak on CPU
    assert rows["accel"]["x_reference"] == pytest.approx(
        rows["accel"]["tokens_per_s"] / rows["reference"]["tokens_per_s"]
    )
    assert rows["tutorial"]["real_fraction"] < rows["accel"]["real_fraction"]
    # tp=2 on 2 processes: both arms see the same batches, so the same real tokens per step (a
    # per-rank count not summed over the world, or summed twice, would break this).
    per_step = {n: r["tokens_per_s"] * r["step_ms"] / 1e3 for n, r in rows.items()}
    assert per_step["accel"] == pytest.approx(per_step["reference"], rel=1e-9)
    assert rows["accel"]["tp"] == 2 and rows["accel"]["dp"] == 1
    # ... and that count equals one made here, from the same data pipeline (rank 0's batches; the
    # TP peer holds the same), so a count shared by both arms cannot be off either.
    cfg = load_config(TINY, rows["accel"]["overrides"])
    tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    ds = load_or_build_tokenized(cfg.data, tok, True, lambda: None)
    stream = prepare_dataloader(ds, Topology(2, 2), 8, tok.pad_token_id, cfg.data, cfg.run.seed).stream()
    batches = [next(stream)[1] for _ in range(3)]  # 1 warm-up + 2 timed steps, grad_accum 1
    assert per_step["accel"] == pytest.approx(sum(int(b.real_tokens) for b in batches[1:]) / 2, rel=1e-9)
    for r in rows.values():  # the timed steps fit in the arm's wall time
        assert r["step_ms"] * r["steps"] <= r["wall_s"] * 1e3
    assert "| tiny | 128 | accel |" in proc.stdout
    # The arms do the same optimization (init, samples, schedule, weight-decay groups, clipping):
    # fp32 on CPU, one micro-batch per step, so their per-step losses agree to rounding.
    assert len(rows["accel"]["losses"]) == len(rows["reference"]["losses"]) == 3
    assert rows["accel"]["loss_rdiff_vs_reference"] < 1e-5, (
        rows["accel"]["losses"],
        rows["reference"]["losses"],
    )
    assert report["versions"]["torch"] and report["flops_per_token"]


def test_variant_environment_and_losses_against_the_accel_arm(tmp_path):
    """A variant's env:NAME=VALUE items become that arm's environment (not config overrides), and a
    variant's losses are checked against the accel arm of its group, side by side."""
    arms = _arms(tmp_path, "--no-reference", "--variant", "seam:env:ACCEL_TP_X=1 train.grad_accum_steps=1")
    seam = next(a for a in arms if a["name"] == "seam")
    assert seam["env"] == {"ACCEL_TP_X": "1"} and not any("ACCEL_TP_X" in o for o in seam["overrides"])
    assert next(a for a in arms if a["name"] == "accel")["env"] == {}
    with pytest.raises(SystemExit, match="env:NAME=VALUE"):
        _arms(tmp_path, "--variant", "bad:env:NOVALUE")
    row = {"kind": "accel", "shape": "tiny", "seq": 128, "micro_batch": 2, "grad_accum": 1, "dp": 1}
    rows = [
        {**row, "name": "accel", "losses": [2.0, 1.0]},
        {**row, "name": "same", "losses": [2.0, 1.0]},
        {**row, "name": "off", "losses": [2.0, 1.5]},
    ]
    failures = bench.compare_losses(rows)
    assert rows[1]["loss_rdiff_vs_accel"] == 0.0 and rows[2]["loss_rdiff_vs_accel"] == 0.5
    assert len(failures) == 1 and failures[0].startswith("off tiny seq 128")
    table = bench.format_losses(rows)
    assert "global batch 2" in table and "  off   2.0000 1.5000" in table
