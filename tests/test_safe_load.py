"""Loading a checkpoint never runs code (accel_tp/checkpoint/safe_load.py).

A malicious file is a pickle whose `__reduce__` would create a marker file. In-process: the upstream
loads that unpickle with weights_only=False (DeepSpeed's checkpoint engine, Accelerate's custom-state
load, the universal converter) do run it (the controls), and do not inside `weights_only_loads`;
`verify_checkpoint` names the file. Multi-process (one torchrun launch per ZeRO stage, 1 and 3;
2 gloo ranks, tp2): a real Accelerate + DeepSpeed checkpoint, four copies each with one file
poisoned, each refused through `safe_loading` with a CheckpointError naming it and no marker; the
untouched checkpoint then loads exactly (natively, as the export loads it, and through its
universal conversion), with every load's torch.load forced weights-only.

This file is also the torchrun worker (`python tests/test_safe_load.py <out> <zero stage>`).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def cases(zero_stage: int) -> dict[str, str]:
    """The four files of a tp2 checkpoint the cases poison, relative to the checkpoint folder."""
    from accel_tp.checkpoint.format import (
        DS_TAG,
        SCHEDULER_FILE,
        model_states_file,
        optim_states_file,
        rng_state_file,
    )

    return {
        "model_states": f"{DS_TAG}/{model_states_file(1, 0 if zero_stage == 3 else None)}",
        "optim_states": f"{DS_TAG}/{optim_states_file(0, 1)}",
        "scheduler": SCHEDULER_FILE,
        "rng_states": rng_state_file(1),
    }


MARKER = "PWNED"  # created by any malicious file that is unpickled


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def poison(path: Path, marker: Path) -> None:
    """Replace the file at `path` with a torch archive (as DeepSpeed / Accelerate write) holding a Payload."""
    path.unlink()
    torch.save({"state": Payload(marker)}, path)


# ----------------------------------------------------------------------------- torchrun worker


def _params(engine, zero_stage: int) -> list[torch.Tensor]:
    """This rank's model shards (ZeRO-3: its partition of each)."""
    return [(p.ds_tensor if zero_stage == 3 else p).detach().clone() for p in engine.module.parameters()]


def _tensors(engine, zero_stage: int) -> list[torch.Tensor]:
    """This rank's model shards, ZeRO fp32 partitions and their Adam moments, in a fixed order."""
    zero = engine.optimizer
    flat = zero.fp32_partitioned_groups_flat if zero_stage == 3 else zero.single_partition_of_fp32_groups
    out = _params(engine, zero_stage) + [t.detach().clone() for t in flat]
    for t in flat:
        st = zero.optimizer.state[t]
        out += [st["exp_avg"].clone(), st["exp_avg_sq"].clone(), torch.as_tensor(st["step"]).clone()]
    return out


def _rng_states() -> list:
    """The RNG states Accelerate saves (python, numpy, torch); the draws after each keep it honest."""
    import random

    import numpy as np

    states = [random.getstate(), repr(np.random.get_state()), torch.get_rng_state().tolist()]
    random.random(), np.random.rand(), torch.rand(1)
    return states


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def worker(out: Path, zero_stage: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accel_tp.checkpoint.format import DS_TAG, TrainState, register_for_checkpointing
    from accel_tp.checkpoint.safe_load import safe_loading, verify_checkpoint
    from accel_tp.checkpoint.universal import convert_to_universal, universal_cache_for
    from accel_tp.compat.accelerate import prepared_engines
    from accel_tp.compat.deepspeed import universal_load
    from accel_tp.compat.transformers import without_hf_zero3_init
    from accel_tp.config import load_config
    from accel_tp.env import apply_worker_env, quiet_libraries
    from accel_tp.errors import CheckpointError
    from accel_tp.model import architecture_config, build_model, param_groups
    from accel_tp.parallel import Topology, build_deepspeed_config, make_deepspeed_plugin
    from accel_tp.trainer import lr_lambda
    from tests.mp_utils import TINY

    t0 = time.perf_counter()
    overrides = ["parallelism.dp_size=1", f"deepspeed.zero_stage={zero_stage}", "deepspeed.precision=fp32"]
    cfg = load_config(TINY, overrides)
    apply_worker_env("cpu")
    quiet_libraries()
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    topo = Topology(world_size=2, tp_size=2, rank=int(os.environ["RANK"]))
    acc = Accelerator(
        deepspeed_plugin=make_deepspeed_plugin(build_deepspeed_config(cfg, topo, "fp32")),
        mixed_precision="no",
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    with without_hf_zero3_init():
        model = build_model(cfg.model, architecture_config("tiny", 256), seed=0)
    engine, optimizer = acc.prepare(model, torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, 100))
    state = TrainState(step=0)
    register_for_checkpointing(acc, state, scheduler)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def train_step() -> None:
        acc.backward(engine(input_ids=batch, labels=batch).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step += 1

    train_step()
    good, marker = out / "good", out / MARKER
    acc.save_state(str(good))
    saved = _tensors(engine, zero_stage)
    saved_sched, saved_step = scheduler.state_dict(), state.step
    saved_rng = _rng_states()
    report: dict = {"rank": acc.process_index, "setup_and_save_s": time.perf_counter() - t0, "cases": {}}

    if acc.is_main_process:
        for case, rel in cases(zero_stage).items():
            shutil.copytree(good, out / case)
            poison(out / case / rel, marker)
    acc.wait_for_everyone()
    for case in cases(zero_stage):
        t = time.perf_counter()
        try:
            with safe_loading(out / case):
                acc.load_state(str(out / case))
            result = "loaded"
        except CheckpointError as e:
            result = str(e)
        report["cases"][case] = {"error": result, "s": time.perf_counter() - t}
        acc.wait_for_everyone()
    report["marker_after_cases"] = marker.exists()

    train_step()  # everything moves on: the loads below must bring back the saved values
    _rng_states()
    assert not _same(_tensors(engine, zero_stage), saved)
    t = time.perf_counter()
    with safe_loading(good):
        acc.load_state(str(good))
    report["native_load_s"] = time.perf_counter() - t
    report["native_exact"] = _same(_tensors(engine, zero_stage), saved)
    report["scheduler_exact"] = scheduler.state_dict() == saved_sched and state.step == saved_step
    # Accelerate's RNG load swallows any failure ("Could not load random states"): it must still work.
    report["rng_exact"] = _rng_states() == saved_rng

    # scripts/export_hf.py's load (accel_tp/export.py _export_worker): the module weights only;
    # ZeRO-3 keeps them in the partitions, read back with the optimizer's states.
    train_step()
    only_module = dict(load_module_only=True, load_optimizer_states=False) if zero_stage != 3 else {}
    with safe_loading(good):
        loaded, _ = engine.load_checkpoint(
            str(good), tag=DS_TAG, load_lr_scheduler_states=False, **only_module
        )
    n = len(list(engine.module.parameters()))
    report["export_load_exact"] = loaded is not None and _same(_params(engine, zero_stage), saved[:n])

    # A resharding resume: the universal conversion (main process), then the universal load.
    cache = universal_cache_for(good)
    if acc.is_main_process:
        t = time.perf_counter()
        with safe_loading(good):
            convert_to_universal(good, cache)
        report["convert_s"] = time.perf_counter() - t
    acc.wait_for_everyone()
    for name, folder in (("good", good), ("universal", cache)):
        t = time.perf_counter()
        report[f"verify_{name}"] = {"files": verify_checkpoint(folder), "s": time.perf_counter() - t}
    train_step()
    with safe_loading(cache), universal_load(prepared_engines(acc)):
        acc.load_state(str(cache))
    report["universal_exact"] = _same(_tensors(engine, zero_stage), saved)
    report["marker_at_end"] = marker.exists()
    report["total_s"] = time.perf_counter() - t0
    (out / f"report_{acc.process_index}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(0)


# ----------------------------------------------------------------------------- tests

import pytest  # noqa: E402

from accel_tp.checkpoint.format import (  # noqa: E402
    DS_TAG,
    RUN_CONFIG_FILE,
    model_states_file,
    optim_states_file,
    rng_state_file,
)
from accel_tp.checkpoint.safe_load import (  # noqa: E402
    TRUST_PICKLES_FIELD,
    allowed_globals,
    pickle_files,
    safe_loading,
    verify_checkpoint,
    weights_only_loads,
)
from accel_tp.errors import CheckpointError  # noqa: E402

from .mp_utils import torchrun  # noqa: E402

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _poisoned(tmp_path: Path, name: str = model_states_file(1)) -> tuple[Path, Path, Path]:
    folder, marker = tmp_path / "ckpt", tmp_path / MARKER
    (folder / DS_TAG).mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, folder / DS_TAG / model_states_file(0))
    bad = folder / DS_TAG / name
    bad.touch()
    poison(bad, marker)
    return folder, bad, marker


def _library_loads(bad: Path) -> list:
    """The upstream loads that unpickle checkpoint files with weights_only=False: DeepSpeed's
    checkpoint engine (every shard), Accelerate's `load` as load_custom_state calls it
    (accelerate/checkpointing.py: our TrainState and scheduler), and a bare torch.load."""
    from accelerate.utils import load
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return [
        lambda: TorchCheckpointEngine().load(str(bad), map_location="cpu"),
        lambda: load(str(bad), map_location="cpu", weights_only=False),
        lambda: torch.load(bad, weights_only=False),
    ]


def test_the_payload_runs_when_unpickled_as_the_libraries_do(tmp_path):
    """The control: each upstream load runs it."""
    _, bad, marker = _poisoned(tmp_path)
    for load in _library_loads(bad):
        load()
        assert marker.exists()
        marker.unlink()


def test_forced_weights_only_stops_the_libraries_own_loads(tmp_path):
    _, bad, marker = _poisoned(tmp_path)
    with weights_only_loads():
        for load in _library_loads(bad):
            with pytest.raises(Exception, match="Weights only load failed"):
                load()
    assert not marker.exists()


def test_verify_names_the_file_and_the_global(tmp_path):
    folder, bad, marker = _poisoned(tmp_path)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(folder)
    assert str(bad) in str(e.value) and "exec" in str(e.value) and TRUST_PICKLES_FIELD in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("form", ["raw pickle", "legacy torch.save", "os.system"])
def test_other_pickle_forms_are_refused(tmp_path, form):
    import pickle

    folder, marker = tmp_path / "ckpt", tmp_path / MARKER
    folder.mkdir()
    bad = folder / rng_state_file(0)

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if form == "raw pickle":
        bad.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    elif form == "legacy torch.save":
        torch.save(Payload(marker), bad, _use_new_zipfile_serialization=False)
    else:
        torch.save(System(), bad)
    with pytest.raises(CheckpointError, match="refused"):
        verify_checkpoint(folder)
    assert not marker.exists()


def test_a_pickle_under_any_name_is_checked(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / MARKER
    folder.mkdir()
    torch.save(Payload(marker), folder / "something")
    (folder / RUN_CONFIG_FILE).write_text("run: {}\n")
    assert pickle_files(folder) == [folder / "something"]


def test_damaged_file_is_named(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    f = folder / optim_states_file(0, 0)
    torch.save({"x": torch.zeros(1000)}, f)
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"{f}: cannot be read"):
        verify_checkpoint(folder)


def test_forcing_is_scoped_nests_and_restores(tmp_path):
    import numpy as np

    os.environ.pop(_FORCE, None)
    before = set(map(str, torch.serialization.get_safe_globals()))
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # torch refuses both set: cleared for the scope
    try:
        with weights_only_loads():
            with weights_only_loads():
                pass
            assert os.environ.get(_FORCE) == "1" and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
            assert np.ndarray in torch.serialization.get_safe_globals()  # still there after the inner exit
        assert _FORCE not in os.environ and os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
        assert set(map(str, torch.serialization.get_safe_globals())) == before
    finally:
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def test_trust_pickles_leaves_the_load_to_the_library(tmp_path):
    folder, bad, marker = _poisoned(tmp_path)
    with safe_loading(folder, trust_pickles=True):
        assert _FORCE not in os.environ
    with pytest.raises(CheckpointError), safe_loading(folder):
        pass


def test_fp16_loss_scaler_state_loads(tmp_path):
    """GPU fp16 ZeRO partitions hold a DynamicLossScaler (not written on CPU): it is allow-listed."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    scaler = CreateLossScaler(torch.half, 0, True, dict(init_scale=2**16, scale_window=1000, min_scale=1,
                                                         delayed_shift=2, consecutive_hysteresis=False))  # fmt: skip
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    verify_checkpoint(tmp_path)
    with weights_only_loads():
        back = torch.load(tmp_path / "optim_states.pt", weights_only=False)["loss_scaler"]
    assert type(back) is type(scaler) and vars(back) == vars(scaler)
    assert len(allowed_globals()) == len(set(map(str, allowed_globals())))


@pytest.mark.slow
def test_universal_converter_is_stopped(mp_checkpoints, tmp_path):
    """deepspeed/checkpoint/ds_to_universal.py unpickles every shard with weights_only=False: it runs
    the payload (control), and refuses it under safe_loading."""
    from accel_tp.checkpoint.universal import convert_to_universal

    src = tmp_path / "src"
    shutil.copytree(mp_checkpoints(1) / "good", src)
    marker, bad = tmp_path / MARKER, cases(1)["model_states"]
    poison(src / bad, marker)
    with pytest.raises(CheckpointError, match=bad), safe_loading(src):
        convert_to_universal(src, tmp_path / "dest")
    assert not marker.exists()
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        convert_to_universal(src, tmp_path / "dest2")
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - the converter fails after the payload ran
        convert_to_universal(src, tmp_path / "dest3")
    assert marker.exists()


@pytest.fixture(scope="module")
def mp_checkpoints(tmp_path_factory):
    """The torchrun run of `worker` (2 ranks) at a ZeRO stage, once per stage: its folder, with
    report_<rank>.json."""
    runs: dict[int, Path] = {}

    def get(zero_stage: int) -> Path:
        if zero_stage not in runs:
            out = tmp_path_factory.mktemp(f"safe-load-zero{zero_stage}")
            proc = torchrun(2, Path(__file__), [str(out), str(zero_stage)])
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[zero_stage] = out
        return runs[zero_stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_poisoned_files_are_refused_and_the_checkpoint_still_loads_exactly(mp_checkpoints, zero_stage):
    out = mp_checkpoints(zero_stage)
    for rank in (0, 1):
        report = json.loads((out / f"report_{rank}.json").read_text())
        for case, rel in cases(zero_stage).items():
            error = report["cases"][case]["error"]
            assert error.startswith(str(out / case / rel)) and "refused" in error, (case, error)
        assert not report["marker_after_cases"] and not report["marker_at_end"]
        assert report["native_exact"] and report["scheduler_exact"] and report["rng_exact"], report
        assert report["export_load_exact"] and report["universal_exact"], report
    assert not (out / MARKER).exists()
