"""Resuming on another tp x dp layout or ZeRO stage: the checkpoint is converted once with DeepSpeed's
universal checkpoint converter into a cache beside it and loaded from there
(accel_tp/checkpoint/universal.py).

The multi-process tests (slow) train tp2 x dp2 ZeRO-1 for 16 steps with a checkpoint at step 8, then
continue from that checkpoint to step 16 on other layouts and ZeRO-2. The universal load restores
every fp32 master weight and Adam moment bit for bit, and the data position is in samples, so steps
9-16 see the same samples and give the uninterrupted run's losses up to float rounding of the other
reduction order (measured worst below; asserted 1e-5, while a wrong shard, moment or data position
moves the loss by >1e-3 within a step or two).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from accel_tp.checkpoint import (
    LocalCheckpointer,
    TrainState,
    check_resume,
    latest_checkpoint,
    peek_train_state,
    reshard_plan,
    steps_under,
    universal_cache_for,
)
from accel_tp.checkpoint.format import (
    DS_TAG,
    TRAIN_STATE_FILE,
    UNIVERSAL_SUFFIX,
    UNIVERSAL_ZERO_DIR,
    model_states_file,
    step_name,
)
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE

from .mp_utils import accelerate_launch, read_metrics

STEPS = 16
EVERY = 8
GLOBAL_BATCH = 8
MICRO = 2
RTOL = 1e-5
RESHARD_LINE = f"[accel-tp] resharding checkpoint {step_name(EVERY)}: "


def overrides(cache: Path, out: Path, tp: int, dp: int, zero: int = 1) -> dict[str, object]:
    return {
        "run.seed": 7,
        "run.output_dir": str(out),
        "run.name": f"tp{tp}-dp{dp}-z{zero}",
        "data.cache_dir": str(cache),
        "data.seq_length": 64,
        "data.eval_fraction": 0.05,
        "deepspeed.precision": "fp32",
        "deepspeed.gradient_clipping": 1.0,
        "deepspeed.zero_stage": zero,
        "parallelism.tp_size": tp,
        "parallelism.dp_size": dp,
        "train.max_steps": STEPS,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-3,
        "train.weight_decay": 0.1,
        "train.micro_batch_size": MICRO,
        "train.grad_accum_steps": GLOBAL_BATCH // (MICRO * dp),
        "train.log_every": 1,
        "train.progress_bar": False,
        "checkpoint.every_steps": EVERY,
        "checkpoint.at_end": False,
        "checkpoint.export_hf": True,
    }


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """tp2 x dp2 ZeRO-1, 16 uninterrupted steps, checkpoints at 8 and 16 (4 gloo processes)."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("source")
    ov = overrides(cache, out, 2, 2)
    proc = accelerate_launch(4, ov)
    assert proc.returncode == 0
    run_dir = out / str(ov["run.name"])
    ckpt = run_dir / CHECKPOINTS_DIR / step_name(EVERY)
    return {
        "cache": cache,
        "dir": run_dir,
        "metrics": read_metrics(run_dir / METRICS_FILE),
        "ckpt": ckpt,
        "hash": digest(ckpt),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,dp,zero",
    [(1, 4, 1), (4, 1, 1), (2, 1, 1), (1, 1, 1), (2, 2, 2)],
    ids=["tp1xdp4", "tp4xdp1", "tp2xdp1", "tp1xdp1", "tp2xdp2-zero2"],
)
def test_resume_on_another_layout_continues_the_run(source, tmp_path, tp, dp, zero):
    ckpt = source["ckpt"]
    saved = peek_train_state(ckpt)
    assert (saved["layout"], saved["zero_stage"], saved["step"]) == ("tp2xdp2", 1, EVERY)
    ov = {**overrides(source["cache"], tmp_path, tp, dp, zero), "checkpoint.allow_external_resume": True}
    proc = accelerate_launch(tp * dp, ov, extra=["--resume", str(ckpt)])
    assert proc.returncode == 0
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if "[accel-tp] resharding checkpoint" in line]
    cache = universal_cache_for(ckpt)
    want = f"{RESHARD_LINE}tp2xdp2 ZeRO-1 -> tp{tp}xdp{dp} ZeRO-{zero} (DeepSpeed universal checkpoint, cached in {cache})"
    assert lines == [want], lines
    # The original is untouched; the conversion sits beside it and is not taken for a step folder.
    assert digest(ckpt) == source["hash"]
    assert (cache / DS_TAG / UNIVERSAL_ZERO_DIR).is_dir()
    assert [p for _, p in steps_under(ckpt.parent)] and cache not in [p for _, p in steps_under(ckpt.parent)]
    assert latest_checkpoint(ckpt.parent).name == step_name(STEPS)

    run_dir = tmp_path / str(ov["run.name"])
    resumed = read_metrics(run_dir / METRICS_FILE)
    tail = source["metrics"][EVERY:]
    assert [m["step"] for m in resumed] == list(range(EVERY + 1, STEPS + 1))
    assert [m["tokens_seen"] for m in resumed] == [m["tokens_seen"] for m in tail]
    got, ref = [m["loss"] for m in resumed], [m["loss"] for m in tail]
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, ref))
    print(f"tp{tp}xdp{dp} ZeRO-{zero}: worst relative loss difference over steps 9-16 {worst:.2e}")
    assert worst <= RTOL, f"{worst:.2e}\n got {got}\nwant {ref}"
    # The resumed run's own checkpoint names the layout and stage it was saved on.
    own = peek_train_state(run_dir / CHECKPOINTS_DIR / step_name(STEPS))
    assert (own["layout"], own["zero_stage"], own["step"]) == (f"tp{tp}xdp{dp}", zero, STEPS)
    assert own["samples"] == STEPS * GLOBAL_BATCH


@pytest.mark.slow
def test_ray_run_restored_under_its_name_on_another_layout(source, tmp_path):
    """Through Ray: a run saved as tp2 x dp1 and restored under its name as tp1 x dp2 continues from
    its step-8 checkpoint with the uninterrupted tp2 x dp2 run's losses, and its export gives that
    run's exported model's logits."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from . import faults
    from .mp_utils import ROOT, TINY, _env, set_args

    def ray_run(tp: int, dp: int, env: dict[str, str]) -> subprocess.CompletedProcess:
        ov = {
            **overrides(source["cache"], tmp_path, tp, dp),
            "run.name": "restored",
            "ray.storage_path": str(tmp_path / "ray"),
        }
        cmd = [sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY), *set_args(ov)]
        return subprocess.run(
            cmd, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=900
        )

    # tp2 x dp1 saves step 8, then fails in its step-16 save (the same 16-step schedule as the source).
    first = ray_run(2, 1, faults.fail_in_save(STEPS))
    # A crash in a worker (not a user error): its own traceback on the console, exit 1.
    assert first.returncode == 1 and "injected failure in the step-16 save" in first.stderr, first.stderr[
        -3000:
    ]
    assert (
        "accel-tp: a worker crashed:" in first.stderr and "Traceback (most recent call last)" in first.stderr
    )
    assert "config error" not in first.stderr
    second = ray_run(1, 2, {})  # the same name: Ray restores it, accel-tp reshards
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    text = second.stdout + second.stderr
    assert "tp2xdp1 ZeRO-1 -> tp1xdp2 ZeRO-1" in text and "steps=8->16" in text
    run_dir = tmp_path / "ray" / "restored"
    metrics = read_metrics(run_dir / METRICS_FILE)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    got, ref = [m["loss"] for m in metrics], [m["loss"] for m in source["metrics"]]
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, ref))
    assert worst <= RTOL, f"{worst:.2e}\n got {got}\nwant {ref}"
    # The resharded run's export against the export of the run that never changed layout.
    check = torch.load(source["dir"] / EXPORT_DIR / EXPORT_CHECK_FILE)
    logits = {}
    for name, folder in (("resharded", run_dir / EXPORT_DIR), ("uninterrupted", source["dir"] / EXPORT_DIR)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(**check["batch"], use_cache=False).logits
    torch.testing.assert_close(logits["resharded"], logits["uninterrupted"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Fast: what is accepted, what is still refused before anything loads, what a load restores.


class NoLoad:
    """Fails the test if anything reaches the real load (or the conversion's barrier)."""

    is_main_process = True
    is_local_main_process = True

    def load_state(self, path):  # pragma: no cover - reaching it is the failure
        raise AssertionError("an incompatible checkpoint reached load_state")

    def wait_for_everyone(self):  # pragma: no cover
        raise AssertionError("an incompatible checkpoint reached the conversion")


def _checkpoint(tmp_path: Path, **state) -> Path:
    ckpt = tmp_path / "ckpt" / step_name(10)
    ckpt.mkdir(parents=True)
    torch.save(TrainState(step=10, **state).state_dict(), ckpt / TRAIN_STATE_FILE)
    (ckpt / DS_TAG).mkdir()
    (ckpt / DS_TAG / model_states_file(0)).write_bytes(b"weights")
    return ckpt


SAVED = {"model": "tiny", "global_batch_size": 8, "layout": "tp2xdp2", "data": "d1", "zero_stage": 1}
CURRENT = {"model": "tiny", "global_batch_size": 8, "layout": "tp1xdp4", "data": "d1", "zero_stage": 2}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model": "qwen2:896-24"}, r"checkpoint is of another model \(qwen2:896-24\)"),
        ({"global_batch_size": 16}, r"global batch of 16 sequences, this run has 8"),
        ({"data": "d2"}, r"other data or another data order"),
    ],
)
def test_other_batch_model_or_data_still_refused_before_anything_loads(tmp_path, change, match):
    ckpt = _checkpoint(tmp_path, **{**SAVED, **change})
    before = digest(ckpt)
    ck = LocalCheckpointer(NoLoad(), TrainState(**CURRENT), tmp_path / "run", str(ckpt), allow_external=True)
    with pytest.raises(ValueError, match=match):
        ck.precheck()
    with pytest.raises(ValueError, match=match):
        ck.load()
    assert digest(ckpt) == before and not universal_cache_for(ckpt).exists()


def test_another_layout_or_stage_is_accepted_and_planned():
    check_resume(SAVED, TrainState(**CURRENT), "x")  # no refusal
    assert reshard_plan(SAVED, TrainState(**CURRENT)) == "tp2xdp2 ZeRO-1 -> tp1xdp4 ZeRO-2"
    assert (
        reshard_plan(SAVED, TrainState(**{**CURRENT, "zero_stage": 1})) == "tp2xdp2 ZeRO-1 -> tp1xdp4 ZeRO-1"
    )
    assert (
        reshard_plan(SAVED, TrainState(**{**CURRENT, "layout": "tp2xdp2"}))
        == "tp2xdp2 ZeRO-1 -> tp2xdp2 ZeRO-2"
    )
    assert reshard_plan(SAVED, TrainState(**{**CURRENT, "layout": "tp2xdp2", "zero_stage": 1})) is None
    # A stage either side did not record (older checkpoints: None or no key) counts as the same;
    # 0 is ZeRO-0, another stage.
    assert reshard_plan({**SAVED, "zero_stage": None}, TrainState(**{**CURRENT, "layout": "tp2xdp2"})) is None
    saved = {k: v for k, v in SAVED.items() if k != "zero_stage"}
    assert reshard_plan(saved, TrainState(**{**CURRENT, "layout": "tp2xdp2"})) is None
    assert reshard_plan(SAVED, TrainState(**{**CURRENT, "layout": "tp2xdp2", "zero_stage": None})) is None
    assert (
        reshard_plan(SAVED, TrainState(**{**CURRENT, "layout": "tp2xdp2", "zero_stage": 0}))
        == "tp2xdp2 ZeRO-1 -> tp2xdp2 ZeRO-0"
    )


def test_load_restores_only_the_position():
    state = TrainState(**CURRENT)
    state.load_state_dict({**SAVED, "step": 8, "samples": 64, "tokens": 999, "model": "other"})
    assert (state.step, state.samples, state.tokens) == (8, 64, 999)
    assert {k: getattr(state, k) for k in CURRENT} == CURRENT


def test_universal_cache_is_beside_and_not_a_step(tmp_path):
    (tmp_path / step_name(8)).mkdir()
    cache = universal_cache_for(tmp_path / step_name(8))
    assert cache == tmp_path / (step_name(8) + UNIVERSAL_SUFFIX)
    cache.mkdir()
    assert [p for _, p in steps_under(tmp_path)] == [tmp_path / step_name(8)]


def test_universal_load_puts_fused_adam_steps_beside_their_parameters():
    """DeepSpeed's universal load restores Adam's `step` as a CPU tensor; fused (and capturable)
    AdamW refuse that on a GPU ('state_steps is on cpu', seen on an H100 resuming tp2 -> tp1). The
    fix moves them to the parameter's device for those optimizers only (here meta stands in for the
    GPU)."""
    from accel_tp.compat.deepspeed import steps_beside_params

    fused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    p, q = (torch.nn.Parameter(torch.zeros(2, device="meta")) for _ in range(2))  # on "the GPU"
    for opt, param in ((fused, p), (plain, q)):
        opt.param_groups[0]["params"] = [param]
        opt.state[param]["step"] = torch.zeros(())  # where DeepSpeed leaves it: the CPU

    class Wrapper:  # as ZeRO wraps the torch optimizer
        optimizer = fused

    assert steps_beside_params(Wrapper()) == 1 and fused.state[p]["step"].device == p.device
    assert steps_beside_params(plain) == 0 and plain.state[q]["step"].device.type == "cpu"


def test_expert_partition_reshards_between_ep_sizes_but_not_to_whole_experts():
    """An ep > 1 layout names its ep (parallel.Topology.layout): another ep > 1 is a reshard; ep 1 on
    either side is refused (AutoEP's modules are not the Hugging Face ones)."""
    ep2 = {**SAVED, "layout": "tp1xdp4xep2", "zero_stage": 1}
    here = {**CURRENT, "zero_stage": 1}
    assert (
        reshard_plan(ep2, TrainState(**{**here, "layout": "tp1xdp4xep4"}))
        == "tp1xdp4xep2 ZeRO-1 -> tp1xdp4xep4 ZeRO-1"
    )
    check_resume(ep2, TrainState(**{**here, "layout": "tp1xdp4xep4"}), "x")
    for saved, layout, sizes in (
        (ep2, "tp1xdp4", "ep_size 2 and this run has 1"),
        ({**SAVED, "layout": "tp1xdp4"}, "tp1xdp4xep2", "ep_size 1 and this run has 2"),
    ):
        with pytest.raises(ValueError, match=f"saved with parallelism.{sizes}"):
            check_resume(saved, TrainState(**{**here, "layout": layout}), "x")
