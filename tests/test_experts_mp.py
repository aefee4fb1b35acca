"""Mixture of experts with DeepSpeed AutoEP (parallelism.ep_size) on CPU with gloo, fp32, real
DeepSpeed and Accelerate: tiny Mixtral and Qwen3-MoE (4 experts, top 2) written by save_pretrained.

Parity against the independent single-process loop of tests/reference.py (the plain Hugging Face
MoE model, no accel-tp code; the router's load-balancing loss included as the model config asks,
per micro-batch, as docs/parallelism.md defines it): ep2 (tp1 x dp2), ep2 x tp2 (4 processes:
AutoEP folds the experts' ranks onto the TP ranks), ep4 (tp1 x dp4). The runs differ from the
reference in summation order only (AutoEP's grouped expert matmuls, the token all-to-all), so the
bound is 1e-5 as the issue asks (measured about 1e-6). Then: each rank holds 1/ep of the expert
weights; a checkpoint resumes exactly on its layout and on another ep / dp (universal checkpoint);
an ep>1 checkpoint refused by an ep 1 run, naming the field; the export is the Hugging Face model
class the run started from, with the trained model's logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from accel_tp.checkpoint.format import step_name
from accel_tp.config import load_config
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE

from .mp_utils import TINY, accelerate_launch, read_metrics
from .reference import reference_run

pytestmark = pytest.mark.slow

STEPS = 12
GLOBAL_BATCH = 8
MICRO = 2
RTOL = 1e-5
SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    use_cache=False,
)
ZOO = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "mixtral_aux": (
        "MixtralConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.05,
        },
    ),
    "qwen3_moe_aux": (
        "Qwen3MoeConfig",
        {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.05,
        },
    ),
}
# name -> (model, tp, dp, ep)
RUNS = {
    "mixtral-ep2": ("mixtral", 1, 2, 2),
    "qwen3-ep2": ("qwen3_moe_aux", 1, 2, 2),
    "mixtral-ep2xtp2": ("mixtral_aux", 2, 2, 2),
    "qwen3-ep4": ("qwen3_moe_aux", 1, 4, 4),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    import transformers

    from accel_tp.corpus import build_default_tokenizer

    root = tmp_path_factory.mktemp("moe-zoo")
    tok = build_default_tokenizer(root / "tokenizer")
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    for name, (cls, extra) in ZOO.items():
        config = getattr(transformers, cls)(**SHAPE, **ids, **extra, vocab_size=len(tok))
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
            root / name
        )
        tok.save_pretrained(root / name)
    return {name: root / name for name in ZOO}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe-cache")


def overrides(
    zoo, cache: Path, out: Path, name: str, model: str, tp: int, dp: int, ep: int
) -> dict[str, object]:
    return {
        "run.name": name,
        "run.seed": 7,
        "run.output_dir": str(out),
        "model.architecture": "null",
        "model.name_or_path": str(zoo[model]),
        "model.tokenizer": "null",
        "data.cache_dir": str(cache),
        "data.seq_length": 64,
        "data.eval_fraction": 0.05,
        "parallelism.tp_size": tp,
        "parallelism.dp_size": dp,
        "parallelism.ep_size": ep,
        "deepspeed.precision": "fp32",
        "train.micro_batch_size": MICRO,
        "train.grad_accum_steps": GLOBAL_BATCH // (MICRO * dp),
        "train.max_steps": STEPS,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-3,
        "train.weight_decay": 0.1,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.progress_bar": False,
        "checkpoint.every_steps": 6 if name == "mixtral-ep2" else 0,
        "checkpoint.at_end": False,
        "checkpoint.export_hf": name in ("mixtral-ep2", "mixtral-ep2xtp2"),
    }


@pytest.fixture(scope="module")
def runs(zoo, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-runs")
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            model, tp, dp, ep = RUNS[name]
            ov = overrides(zoo, cache, out, name, model, tp, dp, ep)
            proc = accelerate_launch(tp * dp, ov)
            assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
            done[name] = {
                "dir": out / name,
                "metrics": read_metrics(out / name / METRICS_FILE),
                "stdout": proc.stdout,
            }
        return done[name]

    return get


@pytest.fixture(scope="module")
def reference(zoo, cache, tmp_path_factory):
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        model, tp, dp, _ = RUNS[name]
        key = (model, dp)  # the aux loss depends on how the global batch is split into micro-batches
        if key not in done:
            ov = overrides(zoo, cache, tmp_path_factory.mktemp("ref"), name, model, 1, dp, 1)
            done[key] = reference_run(load_config(TINY, [f"{k}={v}" for k, v in ov.items()]), GLOBAL_BATCH)
        return done[key]

    return get


def worst(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", list(RUNS))
def test_expert_parallel_parity_with_single_process_reference(runs, reference, name):
    got, ref = runs(name), reference(name)
    model, tp, dp, ep = RUNS[name]
    metrics = got["metrics"]
    loss_err = worst([m["loss"] for m in metrics], ref["losses"])
    print(f"{name}: worst relative loss difference {loss_err:.2e}")
    assert loss_err <= RTOL, ([m["loss"] for m in metrics], ref["losses"])
    # Looser than the loss: a token whose top-2 router scores nearly tie can pick another expert
    # after float-rounding differences, a discrete change the gradient norm shows first (measured
    # up to 2.5e-3 relative by step 12 while the losses stayed within 6e-6).
    assert worst([m["grad_norm"] for m in metrics], ref["grad_norms"]) <= 1e-2
    assert metrics[-1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL)  # the LM loss only
    assert metrics[-1]["eval_tokens"] == ref["eval_tokens"]
    assert ref["losses"][-1] < ref["losses"][0] - 0.1
    # AutoEP really split the experts; the load-balancing loss is logged where the config asks for it.
    assert f"AutoEP: {4 // ep} of 4 experts per rank, ep {ep}, 2 MoE layers" in got["stdout"]
    if model.endswith("_aux"):
        assert all(1.0 < m["aux_loss"] < 4.0 for m in metrics)  # top-2 of 4: balanced is 2
    else:
        assert all("aux_loss" not in m for m in metrics)


def test_expert_bytes_per_rank_are_one_ep_th(runs):
    """Each rank's expert parameters: 1/ep of the model's (counted by the run itself, per rank)."""
    for name in ("mixtral-ep2", "qwen3-ep4"):
        _, _, _, ep = RUNS[name]
        lines = re.findall(r"expert parameters per rank: (\d+) of (\d+)", runs(name)["stdout"])
        assert lines, runs(name)["stdout"][-2000:]
        local, whole = map(int, lines[0])
        assert local * ep == whole


def test_checkpoint_resumes_exactly_and_on_another_ep(runs, zoo, cache, tmp_path):
    """The step-6 checkpoint of mixtral ep2 (tp1 x dp2) continued on the same layout (bit for bit)
    and on ep4 (tp1 x dp4, through the universal checkpoint: the same losses to float rounding)."""
    full = runs("mixtral-ep2")
    ckpt = full["dir"] / CHECKPOINTS_DIR / step_name(6)
    tail = full["metrics"][6:]
    for dp, ep in ((2, 2), (4, 4)):
        out = tmp_path / f"ep{ep}"
        ov = overrides(zoo, cache, out, "mixtral-ep2", "mixtral", 1, dp, ep)
        ov.update(
            {
                "checkpoint.every_steps": 0,
                "checkpoint.export_hf": False,
                "checkpoint.allow_external_resume": True,
            }
        )
        proc = accelerate_launch(dp, ov, extra=["--resume", str(ckpt)])
        assert proc.returncode == 0, proc.stdout[-3000:]
        resumed = read_metrics(out / "mixtral-ep2" / METRICS_FILE)
        assert [m["step"] for m in resumed] == list(range(7, STEPS + 1))
        if ep == 2:
            assert [m["loss"] for m in resumed] == [m["loss"] for m in tail]
        else:
            assert worst([m["loss"] for m in resumed], [m["loss"] for m in tail]) <= 2e-6


def test_ep_checkpoint_refused_by_an_experts_whole_run(runs, zoo, cache, tmp_path):
    full = runs("mixtral-ep2")
    ov = overrides(zoo, cache, tmp_path, "mixtral-ep2", "mixtral", 1, 2, 1)
    ov.update({"checkpoint.allow_external_resume": True, "checkpoint.export_hf": False})
    proc = accelerate_launch(2, ov, extra=["--resume", str(full["dir"] / CHECKPOINTS_DIR / step_name(6))])
    assert proc.returncode != 0
    assert "saved with parallelism.ep_size 2 and this run has 1" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["mixtral-ep2", "mixtral-ep2xtp2"])
def test_export_is_the_hf_model_with_the_trained_logits(runs, name):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    export = runs(name)["dir"] / EXPORT_DIR
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert isinstance(model, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    keys = set(json.loads((export / "config.json").read_text()))
    assert "num_local_experts" in keys
    check = torch.load(export / EXPORT_CHECK_FILE)
    with torch.no_grad():
        out = model(**check["batch"])
    torch.testing.assert_close(out.logits, check["logits"], rtol=1e-5, atol=1e-5)
