"""GPU-only checks: skipped on CPU machines (CI), run on the GPU device."""

from __future__ import annotations

import pytest
import torch

from accel_tp.checkpoint.format import step_name
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE

from .mp_utils import accelerate_launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_one_gpu(tmp_path):
    """The full stack on one GPU in bf16 (auto precision), batches from DataLoader workers as the
    GPU YAMLs set: it trains and the loss falls."""
    ov = {
        "data.num_workers": 2,
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "parallelism.tp_size": 1,
        "parallelism.dp_size": 1,
        "train.max_steps": 30,
        "train.warmup_steps": 3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "checkpoint.at_end": True,
        "checkpoint.every_steps": 0,
    }
    proc = accelerate_launch(1, ov)
    assert proc.returncode == 0
    metrics = read_metrics(tmp_path / "tiny-tp2-dp2" / METRICS_FILE)
    assert "precision=bf16" in proc.stdout
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert (tmp_path / "tiny-tp2-dp2" / CHECKPOINTS_DIR / step_name(30)).is_dir()


def _losses(tmp_path, name: str, extra: dict[str, object]) -> list[float]:
    ov = {
        "run.name": name,
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "parallelism.tp_size": 1,
        "parallelism.dp_size": 1,
        "deepspeed.precision": "fp32",
        "train.max_steps": 12,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "data.eval_fraction": 0,
        "data.packing": "document",
        "data.seq_length": 256,
        "train.micro_batch_size": 4,
        # Two micro-batches with different label counts: a loss divisor that ignored
        # num_items_in_batch (a per-micro-batch mean) would change the losses.
        "train.grad_accum_steps": 2,
        "checkpoint.at_end": False,
        **extra,
    }
    proc = accelerate_launch(1, ov)
    assert proc.returncode == 0, proc.stdout[-3000:]
    if extra.get("model.liger_kernel"):
        assert "[accel-tp] speed levers: Liger (fused linear cross-entropy" in proc.stdout
    if extra.get("model.compile"):
        assert "compiled 4 decoder layers" in proc.stdout
    return [m["loss"] for m in read_metrics(tmp_path / name / METRICS_FILE)]


def test_liger_and_compile_keep_the_losses(tmp_path):
    """Speed levers must not change training: Liger's kernels (with the fused linear cross-entropy
    and the token-weighted loss divisor), compiled decoder layers and flex attention, in fp32 on
    document-packed rows, against eager HF with SDPA over 12 steps. Only the order of float sums differs (fused kernels, chunked loss): measured on
    an H100 (2026-11-24, then with grad_accum 1) every variant stays within 1.15e-7 relative of
    eager at every step (one float32 ulp of the loss); we assert 1e-4, while a wrong loss divisor,
    a document mask lost or a kernel fed the wrong input moves the loss by > 1e-2. This runs in
    fp32; the fused loss's bf16 gradient precision is test_fused_loss_lm_head_gradient_in_bf16."""
    eager = _losses(tmp_path, "eager", {})
    for name, extra in {
        "liger": {"model.liger_kernel": True},
        "liger-compile": {"model.liger_kernel": True, "model.compile": True},
        "compile": {"model.compile": True},
        # The GPU YAML's combination: flex attention's document masks instead of SDPA's.
        "flex-liger-compile": {
            "model.attn_implementation": "flex_attention",
            "model.liger_kernel": True,
            "model.compile": True,
        },
    }.items():
        got = _losses(tmp_path, name, extra)
        worst = max(abs(g - w) / abs(w) for g, w in zip(got, eager, strict=True))
        print(f"{name}: worst relative loss difference {worst:.2e}")
        assert worst < 1e-4, f"{name}: {got} vs eager {eager}"


def test_fused_loss_lm_head_gradient_in_bf16():
    """accel-tp's fused linear cross-entropy forward (Liger's kernel, lm_head gradient summed
    over the chunks in fp32) in bf16: the lm_head gradient is as close to an fp32 computation from the
    same hidden states as rounding that fp32 gradient to bf16 once allows (within 1.5x)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from accel_tp.parallelize import apply_liger_kernels

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).cuda().bfloat16().train()
    assert apply_liger_kernels(model, fused_linear_cross_entropy=True, layer_kernels=False) == [
        "fused linear cross-entropy"
    ]
    seen = {}
    model.model.register_forward_hook(lambda m, i, o: seen.update(h=o.last_hidden_state.detach()))
    ids = torch.randint(0, cfg.vocab_size, (16, 1024), device="cuda")  # 16k tokens: 16 loss chunks
    n = torch.tensor(float(ids[:, 1:].numel()), device="cuda")
    model(input_ids=ids, labels=ids, num_items_in_batch=n).loss.backward()
    got = model.lm_head.weight.grad.float()

    h = seen["h"].reshape(-1, cfg.hidden_size)
    target = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)
    w = model.lm_head.weight.detach().float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h.float() @ w.T, target, reduction="sum") / n
    loss.backward()
    want = w.grad

    def rel(a: torch.Tensor) -> float:
        return float((a - want).norm() / want.norm())

    floor = rel(want.bfloat16().float())
    err = rel(got)
    # What Liger's own integration does (the chunk sums in bf16), for the record.
    # Liger computes the weight gradient only when its input needs a gradient too.
    wb = model.lm_head.weight.detach().clone().requires_grad_()
    liger_fused_linear_cross_entropy(
        h.clone().requires_grad_(), wb, target, reduction="sum", chunk_mem_const=8
    ).backward()
    print(
        f"lm_head grad vs fp32: ours {err:.2e}, bf16 sums {rel(wb.grad.float() / n):.2e}, floor {floor:.2e}"
    )
    assert err < 1.5 * floor


def test_fused_loss_run_evaluates_and_exports(tmp_path):
    """With the fused loss on, evaluation and the end-of-training export (which checks the trained
    model's logits) still get logits: the fused path is for training only."""
    import torch

    ov = {
        "run.name": "liger-export",
        "run.output_dir": str(tmp_path),
        "data.cache_dir": str(tmp_path / "cache"),
        "parallelism.tp_size": 1,
        "parallelism.dp_size": 1,
        "model.liger_kernel": True,
        "train.max_steps": 4,
        "train.warmup_steps": 1,
        "train.progress_bar": False,
        "data.eval_fraction": 0.05,
        "checkpoint.at_end": False,
        "checkpoint.export_hf": True,
    }
    proc = accelerate_launch(1, ov)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "[accel-tp] speed levers: Liger (fused linear cross-entropy" in proc.stdout
    assert "eval_loss" in read_metrics(tmp_path / "liger-export" / METRICS_FILE)[-1]
    check = torch.load(tmp_path / "liger-export" / EXPORT_DIR / EXPORT_CHECK_FILE)
    assert check["logits"].shape[:2] == check["batch"]["input_ids"].shape


def test_document_block_mask_gives_the_transformers_model_output():
    """accel-tp's document block mask (tools/block_mask.py document_block_mask, passed by the forward
    wrapper) in place of the one Transformers builds from packed position ids: the same flex
    attention blocks, so the same logits and gradients, eager and with compiled decoder layers
    (which also must not recompile for a new batch's mask)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from accel_tp.tools.block_mask import block_mask_forward

    from .test_block_mask import packed_positions

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "flex_attention"
    model = Qwen2ForCausalLM(cfg).cuda().train()
    ours = block_mask_forward(model.forward)

    def run(fwd, ids, pos):
        model.zero_grad(set_to_none=True)
        logits = fwd(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.detach().clone() for p in model.parameters()]

    for compiled in (False, True):
        if compiled:
            for layer in model.model.layers:
                layer.compile()
        for seed in range(3):  # a new mask per batch
            pos = packed_positions(3, 1024, seed).cuda()
            ids = torch.randint(0, cfg.vocab_size, pos.shape, device="cuda")
            want, want_g = run(model.forward, ids, pos)
            got, got_g = run(ours, ids, pos)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for g, w in zip(got_g, want_g, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # Documents really are separated: another document's tokens leave this one's logits alone.
    pos = packed_positions(1, 1024, 7).cuda()
    ids = torch.randint(0, cfg.vocab_size, pos.shape, device="cuda")
    start = int((pos[0] == 0).nonzero()[1])  # the second document
    other = ids.clone()
    other[0, :start] = (other[0, :start] + 1) % cfg.vocab_size
    with torch.no_grad():
        a = ours(input_ids=ids, position_ids=pos, use_cache=False).logits[0, start:]
        b = ours(input_ids=other, position_ids=pos, use_cache=False).logits[0, start:]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
