"""Chat fine-tuning end to end on CPU with gloo (real DeepSpeed and Accelerate): the example config
accelerate_configs/sft_tiny_tp2_dp2.yaml at tp2 x dp2 (document packing) and tp1 x dp1 (no packing)
against the independent single-process loop of tests/reference_chat.py, fp32, over the same
conversations; the HF export carries the chat template. One launch per layout, shared by the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from accel_tp.checkpoint.format import step_name
from accel_tp.config import load_config
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE

from .mp_utils import ROOT, accelerate_launch, read_metrics, run
from .reference_chat import label_by_characters, reference_chat_run

pytestmark = pytest.mark.slow

SFT = ROOT / "accelerate_configs" / "sft_tiny_tp2_dp2.yaml"
STEPS = 12
GLOBAL_BATCH = 8
MICRO = 2
RTOL = 2e-6  # as tests/test_multiprocess.py: fp32, the runs differ only in summation order
GRAD_NORM_RTOL = 5e-5
MARKER = "<|endoftext|>"  # the example template ends every turn with the eos token

LAYOUTS = {"tp2xdp2": (2, 2, "document"), "tp1xdp1": (1, 1, "none")}


def overrides(cache: Path, out: Path, name: str) -> dict[str, object]:
    tp, dp, packing = LAYOUTS[name]
    return {
        "run.name": f"sft-{name}",
        "run.seed": 11,
        "run.output_dir": str(out),
        "data.cache_dir": str(cache),
        "data.seq_length": 128,
        "data.packing": packing,
        "data.eval_fraction": 0.05,
        "parallelism.tp_size": tp,
        "parallelism.dp_size": dp,
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
        "checkpoint.at_end": name == "tp2xdp2",
        "checkpoint.export_hf": name == "tp2xdp2",
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat-cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("chat-runs")
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            tp, dp, _ = LAYOUTS[name]
            ov = overrides(cache, out, name)
            proc = accelerate_launch(tp * dp, ov, config=SFT)
            assert proc.returncode == 0, f"{name} failed"
            run_dir = out / str(ov["run.name"])
            done[name] = {
                "dir": run_dir,
                "metrics": read_metrics(run_dir / METRICS_FILE),
                "stdout": proc.stdout,
            }
        return done[name]

    return get


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            ov = overrides(cache, tmp_path_factory.mktemp("ref"), name)
            cfg = load_config(SFT, [f"{k}={v}" for k, v in ov.items()])
            done[name] = reference_chat_run(cfg, GLOBAL_BATCH, MARKER)
        return done[name]

    return get


def worst(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_chat_parity_with_single_process_reference(runs, reference, name):
    got, ref = runs(name), reference(name)
    metrics = got["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    loss_err = worst([m["loss"] for m in metrics], ref["losses"])
    norm_err = worst([m["grad_norm"] for m in metrics], ref["grad_norms"])
    print(f"{name}: worst relative loss difference {loss_err:.2e}, grad norm {norm_err:.2e}")
    assert loss_err <= RTOL, (metrics, ref["losses"])
    assert norm_err <= GRAD_NORM_RTOL
    # The held-out loss is the mean over every labelled held-out token, each counted once.
    assert metrics[-1]["eval_tokens"] == ref["eval_tokens"] > 0
    assert metrics[-1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL)
    # The loss falls, or parity would prove little; the count line was printed once per split.
    assert ref["losses"][-1] < ref["losses"][0] - 1.0
    lines = [line for line in got["stdout"].splitlines() if line.startswith("[accel-tp] chat data (train)")]
    assert len(lines) == 1 and "0 dropped" in lines[0]


def test_export_carries_the_chat_template(runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = runs("tp2xdp2")["dir"] / EXPORT_DIR
    template = load_config(SFT).model.chat_template
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.chat_template == template
    # The exported tokenizer renders like the run did: its labels by characters match training's.
    ids, labels = label_by_characters(
        tok,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        MARKER,
        "assistant",
    )
    assert tok.decode([t for t in labels if t != -100]) == "Hello." + MARKER
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    check = torch.load(export / EXPORT_CHECK_FILE)
    with torch.no_grad():
        assert model(**check["batch"]).loss.item() == pytest.approx(check["loss"], rel=1e-6)

    # scripts/export_hf.py from the run's checkpoint writes the same template.
    out = tmp_path / "exported"
    ckpt = runs("tp2xdp2")["dir"] / CHECKPOINTS_DIR / step_name(STEPS)
    proc = run(
        [sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(ckpt), "--out", str(out)]
    )
    assert proc.returncode == 0
    assert (
        (out / "chat_template.jinja").read_text() == (export / "chat_template.jinja").read_text() == template
    )
