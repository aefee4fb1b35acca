"""Tensor parallelism on a GPU: tp 2 as two processes sharing the one GPU (skipped on CPU machines).

NCCL refuses two ranks on one device, so the ranks talk through accel_tp/staged_gloo.py (gloo on
host copies) via accel_tp/tools/shared_gpu.py; the kernels are the GPU's: sharded bf16 / fp32
matmuls, SDPA and flex attention over a rank's local heads, compiled decoder layers around
DeepSpeed's row layers, Liger's kernels on split MLPs, document packing, activation checkpointing,
and the vocabulary-parallel loss (parallelism.vocab_parallel_loss, on by default at tp 2).

Bounds. fp32: tp 2 against tp 1 within FP32_RTOL relative per step: the two differ only in the
order of sums (row layers all-reduce two partial products, the loss's softmax sums two vocabulary
halves), about an ulp per op; measured on an H100 in docs/performance.md. bf16: tp 2 against tp 1
within twice the spread of two tp 1 runs that differ only in reduction order (micro-batch 4 x
accumulation 2 against 2 x 4: the same samples, the gradient summed in another order), measured in
the same test, so a wrong shard (a lost head, a gathered-twice gradient) moving the loss by far
more than bf16 rounding fails.
"""

from __future__ import annotations

import sys

import pytest
import torch

from accel_tp.checkpoint.format import step_name
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE
from accel_tp.tools import shared_gpu

from .mp_utils import ROOT, TINY, _env, read_metrics, set_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP32_RTOL = 1e-5
STEPS = 12


def _launch(nproc: int, ov: dict[str, object], extra: list[str] | None = None):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config",
        str(TINY),
        *set_args(ov),
        *(extra or []),
    ]
    proc = shared_gpu.run(nproc, cmd, _env(), timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _overrides(tmp_path, name: str, tp: int, **extra: object) -> dict[str, object]:
    return {
        "run.name": name,
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "parallelism.tp_size": tp,
        "parallelism.dp_size": 1,
        "deepspeed.precision": "fp32",
        "train.max_steps": STEPS,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "data.eval_fraction": 0,
        "data.packing": "document",
        "data.seq_length": 256,
        "train.micro_batch_size": 4,
        "train.grad_accum_steps": 2,
        "model.activation_checkpointing": True,
        "checkpoint.at_end": False,
        "checkpoint.every_steps": 0,
        **extra,
    }


def _losses(tmp_path, name: str) -> list[float]:
    return [m["loss"] for m in read_metrics(tmp_path / name / METRICS_FILE)]


def _worst(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def test_tp2_fp32_matches_tp1_resumes_across_layouts_and_exports(tmp_path):
    """fp32, SDPA, document packing, activation checkpointing: tp 2 (vocabulary-parallel loss) and
    tp 1 give the same losses; a tp 2 checkpoint resumed at tp 1, and a tp 1 one at tp 2, continue
    with the losses of the uninterrupted run; the tp 2 export gives the trained model's logits."""
    ck = {"checkpoint.every_steps": STEPS // 2, "checkpoint.export_hf": True}
    _launch(1, _overrides(tmp_path, "tp1", 1, **ck))  # first: builds the caches the tp 2 ranks read
    tp2 = _launch(2, _overrides(tmp_path, "tp2", 2, **ck))
    assert "vocabulary-parallel loss" in tp2.stdout
    tp1_losses, tp2_losses = _losses(tmp_path, "tp1"), _losses(tmp_path, "tp2")
    worst = _worst(tp2_losses, tp1_losses)
    print(f"[gpu-tp] fp32 tp2 vs tp1: worst relative loss difference {worst:.2e}")
    assert worst <= FP32_RTOL, (tp2_losses, tp1_losses)
    assert tp1_losses[-1] < tp1_losses[0] - 0.5

    half = step_name(STEPS // 2)
    for src, tp, name in (("tp2", 1, "tp2-to-tp1"), ("tp1", 2, "tp1-to-tp2")):
        ov = _overrides(tmp_path, name, tp, **{"checkpoint.allow_external_resume": True})
        _launch(tp, ov, ["--resume", str(tmp_path / src / CHECKPOINTS_DIR / half)])
        resumed = _losses(tmp_path, name)
        whole = _losses(tmp_path, src)[STEPS // 2 :]
        worst = _worst(resumed, whole)
        print(f"[gpu-tp] {name}: worst relative loss difference after the resume {worst:.2e}")
        assert worst <= FP32_RTOL, (name, resumed, whole)

    from transformers import AutoModelForCausalLM

    export = tmp_path / "tp2" / EXPORT_DIR
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).cuda().eval()
    check = torch.load(export / EXPORT_CHECK_FILE)
    with torch.no_grad():
        out = model(**{k: v.cuda() for k, v in check["batch"].items()})
    assert check["logits"].shape == out.logits.shape  # the whole vocabulary, gathered from both ranks
    torch.testing.assert_close(out.logits.cpu(), check["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "levers",
    [
        {"model.attn_implementation": "flex_attention", "model.compile": True},
        {"model.attn_implementation": "flex_attention", "model.liger_kernel": True},
    ],
    ids=["flex-compile", "flex-liger"],
)
def test_tp2_bf16_levers_within_the_spread_of_tp1(tmp_path, levers):
    """bf16 with flex attention and compiled layers or Liger's layer kernels, 30 steps: tp 2 within
    twice the spread of two tp 1 runs that differ only in their reduction order."""
    common = {"deepspeed.precision": "bf16", "train.max_steps": 30, "train.warmup_steps": 3, **levers}
    _launch(1, _overrides(tmp_path, "a", 1, **common))
    _launch(
        1,
        _overrides(tmp_path, "b", 1, **common, **{"train.micro_batch_size": 2, "train.grad_accum_steps": 4}),
    )
    proc = _launch(2, _overrides(tmp_path, "tp2", 2, **common))
    if levers.get("model.compile"):
        assert "compiled 4 decoder layers" in proc.stdout
    if levers.get("model.liger_kernel"):
        assert "Liger (" in proc.stdout
    a, b, tp2 = (_losses(tmp_path, n) for n in ("a", "b", "tp2"))
    spread, worst = _worst(b, a), _worst(tp2, a)
    print(f"[gpu-tp] bf16 {levers}: tp1 spread {spread:.2e}, tp2 vs tp1 {worst:.2e}")
    assert a[-1] < a[0] - 1.0
    assert worst <= 2 * spread, (tp2, a, b)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_sp2_fp32_matches_sp1(tmp_path, attn):
    """Ulysses sequence parallelism on the GPU's kernels: sp 2 (two processes, the all-to-alls through
    the staged transport) against sp 1, fp32, document packing (the flex BlockMask and the sdpa mask
    rebuilt per document for the whole rows), activation checkpointing: the same losses."""
    extra = {"model.attn_implementation": attn}
    _launch(1, _overrides(tmp_path, "sp1", 1, **extra))
    proc = _launch(2, _overrides(tmp_path, "sp2", 1, **extra, **{"parallelism.sp_size": 2}))
    assert "Ulysses sequence parallel (2 ranks" in proc.stdout
    sp1, sp2 = _losses(tmp_path, "sp1"), _losses(tmp_path, "sp2")
    worst = _worst(sp2, sp1)
    print(f"[gpu-sp] fp32 {attn} sp2 vs sp1: worst relative loss difference {worst:.2e}")
    assert worst <= FP32_RTOL, (sp2, sp1)
