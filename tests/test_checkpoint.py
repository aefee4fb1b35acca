"""LocalCheckpointer's folder protocol: complete-or-invisible saves, retention, cadence, resume
checks; and the on-disk names of accel_tp/checkpoint/format.py against the libraries that write them.

The accelerator here is mostly a small stand-in whose save_state writes files (or dies half-way):
this tests our rename / retention logic; the real DeepSpeed save and load run in
tests/test_multiprocess.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accel_tp.checkpoint import LocalCheckpointer, TrainState, latest_checkpoint
from accel_tp.checkpoint.format import (
    DS_TAG,
    MANIFEST_FILE,
    RAY_SNAPSHOT_FILE,
    SCHEDULER_FILE,
    TRAIN_STATE_FILE,
    UNIVERSAL_SUFFIX,
    model_states_file,
    optim_states_file,
    peek_train_state,
    register_for_checkpointing,
    rng_state_file,
    step_name,
    step_of,
    tmp_name,
)
from accel_tp.checkpoint.ray import remove_stale_saves
from accel_tp.checkpoint.rules import check_checkpoint, local_resume_path
from accel_tp.errors import CheckpointError, StorageError
from accel_tp.run_folder import CHECKPOINTS_DIR


class Crash(Exception):
    pass


class StandIn:
    is_main_process = True

    def __init__(self, crash_after_files: int | None = None) -> None:
        self.crash_after_files = crash_after_files

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        for i in range(3):
            if self.crash_after_files is not None and i == self.crash_after_files:
                raise Crash("worker died while saving")
            (Path(path) / f"shard_{i}.pt").write_bytes(b"x" * 10)


def save(ck: LocalCheckpointer, step: int) -> Path:
    """One save, published: the folder it ends up in."""
    with ck.save(step) as written:
        assert Path(written.folder).name == tmp_name(step_name(step))  # unpublished until the block ends
        assert not Path(written.location).exists()
    return Path(written.location)


def test_save_renames_complete_checkpoint(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None)
    out = save(ck, 10)
    assert out == tmp_path / step_name(10)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, *(f"shard_{i}.pt" for i in range(3))]
    )
    assert not list(tmp_path.glob(tmp_name("*")))


def test_interrupted_save_never_becomes_latest(tmp_path):
    save(LocalCheckpointer(StandIn(), TrainState(), tmp_path, None), 10)
    with pytest.raises(Crash):
        save(LocalCheckpointer(StandIn(crash_after_files=2), TrainState(), tmp_path, None), 20)
    # The half-written step 20 exists only under its temporary name; resume still finds step 10.
    assert (tmp_path / tmp_name(step_name(20))).is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / step_name(10)
    # A save whose publishing step fails (its metrics row, its report) is not published either.
    with pytest.raises(Crash), LocalCheckpointer(StandIn(), TrainState(), tmp_path, None).save(20):
        raise Crash("the step's metrics row could not be written")
    assert latest_checkpoint(tmp_path) == tmp_path / step_name(10)
    # A later save of the same step replaces the leftover and completes.
    save(LocalCheckpointer(StandIn(), TrainState(), tmp_path, None), 20)
    assert latest_checkpoint(tmp_path) == tmp_path / step_name(20)
    assert not list(tmp_path.glob(tmp_name("*")))


def test_keep_last_prunes_oldest(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None, keep_last=2)
    for step in (5, 10, 15, 20):
        save(ck, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_name(15), step_name(20)]


def test_the_checkpointer_owns_its_cadence(tmp_path):
    every5 = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None, every_steps=5, at_end=False)
    assert [s for s in range(1, 13) if every5.should_save(s, last=s == 12)] == [5, 10]
    at_end = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None, every_steps=0, at_end=True)
    assert [s for s in range(1, 13) if at_end.should_save(s, last=s == 12)] == [12]
    both = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None, every_steps=5, at_end=True)
    assert [s for s in range(1, 13) if both.should_save(s, last=s == 12)] == [5, 10, 12]


def test_resume_from_missing_folder_is_clear(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="checkpoint.resume_from: no checkpoint folder"):
        ck.load()


def test_resume_latest_with_nothing_saved_starts_fresh(tmp_path):
    assert LocalCheckpointer(StandIn(), TrainState(), tmp_path, "latest").load() == 0


def test_resume_from_outside_the_run_needs_opt_in(tmp_path):
    other = save(LocalCheckpointer(StandIn(), TrainState(), tmp_path / "elsewhere", None), 10)
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path / "run" / CHECKPOINTS_DIR, str(other))
    with pytest.raises(CheckpointError, match="allow_external_resume"):
        ck.precheck()
    trusted = LocalCheckpointer(StandIn(), TrainState(), tmp_path / "run", str(other), allow_external=True)
    assert trusted._resume_path() == other


# --- Ray checkpoints on remote storage -------------------------------------------------------------
# A SubTreeFileSystem is not pyarrow's LocalFileSystem, so Ray (and accel-tp) treat it as remote
# storage, like S3: the same code path, without a server. tests/test_cluster.py runs it against S3.


def _remote_checkpoint(tmp_path: Path, step: int = 6):
    import pyarrow.fs
    import ray.train
    import torch

    name = step_name(step)
    src = tmp_path / "bucket" / name
    (src / DS_TAG).mkdir(parents=True)
    torch.save(TrainState(step=step, samples=step * 4).state_dict(), src / TRAIN_STATE_FILE)
    (src / DS_TAG / "shard.pt").write_bytes(b"w" * 1_000_000)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    return ray.train.Checkpoint(name, filesystem=fs)


def test_remote_train_state_is_read_in_place(tmp_path):
    from accel_tp.checkpoint.ray import is_local, peek_ray_train_state

    ckpt = _remote_checkpoint(tmp_path)
    assert not is_local(ckpt)
    assert peek_ray_train_state(ckpt)["step"] == 6
    (tmp_path / "bucket" / step_name(6) / TRAIN_STATE_FILE).unlink()
    assert peek_ray_train_state(ckpt) is None  # check_resume then says "not an accel-tp checkpoint"


def test_remote_download_is_complete_or_absent_and_never_rewritten(tmp_path):
    """A worker that comes second reuses the node's complete download: the files an earlier worker
    is reading are not written again (Checkpoint.as_directory downloads again in place)."""
    from accel_tp.checkpoint.ray import download_once

    ckpt = _remote_checkpoint(tmp_path)
    folder = tmp_path / "node" / step_name(6)
    download_once(ckpt, folder)
    shard = folder / DS_TAG / "shard.pt"
    assert shard.read_bytes() == b"w" * 1_000_000
    before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))]
    download_once(ckpt, folder)
    assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))] == before
    assert [p.name for p in folder.parent.iterdir()] == [step_name(6)]  # no temporary left


def _download_in_process(args: tuple[str, str]) -> int:
    import pyarrow.fs
    import ray.train

    from accel_tp.checkpoint.ray import download_once

    bucket, folder = args
    fs = pyarrow.fs.SubTreeFileSystem(bucket, pyarrow.fs.LocalFileSystem())
    download_once(ray.train.Checkpoint(step_name(6), filesystem=fs), Path(folder))
    return len((Path(folder) / DS_TAG / "shard.pt").read_bytes())


def test_concurrent_downloads_sharing_a_tmp_all_see_the_whole_checkpoint(tmp_path):
    """Several raylets on one host share /tmp: their nodes' local rank 0s download the same checkpoint
    at once. Each writes a private copy and the first rename wins; every one reads whole files."""
    import multiprocessing

    _remote_checkpoint(tmp_path)
    folder = tmp_path / "node" / step_name(6)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sizes = pool.map(_download_in_process, [(str(tmp_path / "bucket"), str(folder))] * 3)
    assert sizes == [1_000_000] * 3
    assert [p.name for p in folder.parent.iterdir()] == [step_name(6)]


# --- The on-disk names ------------------------------------------------------------------------------


def test_step_names_round_trip_and_sort_by_step():
    assert [step_of(step_name(s)) for s in (0, 7, 12345678)] == [0, 7, 12345678]
    assert sorted(step_name(s) for s in (100, 20, 3)) == [step_name(s) for s in (3, 20, 100)]
    # Neither a save in progress nor a universal conversion is a step.
    assert step_of(tmp_name(step_name(5))) is None and step_of(step_name(5) + UNIVERSAL_SUFFIX) is None


def test_train_state_is_the_file_accelerate_writes_it_to(tmp_path):
    """A real Accelerator's save_state writes the registered objects in registration order: the train
    state lands in TRAIN_STATE_FILE, the scheduler in SCHEDULER_FILE, and load_state brings both back."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    try:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
        state = TrainState(step=7, samples=28, tokens=99)
        register_for_checkpointing(acc, state, scheduler)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        acc.save_state(str(tmp_path))
        assert {TRAIN_STATE_FILE, SCHEDULER_FILE, rng_state_file(0)} <= {p.name for p in tmp_path.iterdir()}
        assert peek_train_state(tmp_path)["step"] == 7
        assert torch.load(tmp_path / SCHEDULER_FILE, weights_only=False)["last_epoch"] == 3
        state.step, state.samples, state.tokens = 0, 0, 0
        optimizer.step()
        scheduler.step()
        acc.load_state(str(tmp_path))
        assert (state.step, state.samples, state.tokens, scheduler.last_epoch) == (7, 28, 99, 3)
    finally:
        AcceleratorState._reset_state(True)


def test_deepspeed_and_ray_names_are_the_libraries_own():
    """format.py spells DeepSpeed's and Ray's file names (importing them would load DeepSpeed, or a
    private Ray module); here they are checked against the installed libraries: DeepSpeed's engine
    names its files through these methods (called with a stand-in for the engine)."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine as Engine
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    def engine(zero3: bool) -> SimpleNamespace:
        return SimpleNamespace(
            checkpoint_mp_rank=3,
            zero_optimization_partition_weights=lambda: zero3,
            _get_zero_ckpt_prefix=lambda dp_rank, bf16_mode: Engine._get_zero_ckpt_prefix(
                None, dp_rank, bf16_mode
            ),
        )

    def name(path: str) -> str:
        tag, file = Path(path).parts[-2:]
        assert tag == DS_TAG
        return file

    assert name(Engine._get_ckpt_name(engine(False), "", DS_TAG)) == model_states_file(3)
    assert name(Engine._get_ckpt_name(engine(True), "", DS_TAG, pp_placeholder=1)) == model_states_file(3, 1)
    for bf16 in (False, True):
        got = Engine._get_rank_zero_ckpt_name(engine(False), "", DS_TAG, 3, 1, bf16)
        assert name(got) == optim_states_file(1, 3, bf16=bf16)
    assert RAY_SNAPSHOT_FILE == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


# --- Fault injection (tests/faults.py), as the fault tests use it -----------------------------------

_SAVES = """
import sys, torch
from accelerate import Accelerator
from accel_tp.checkpoint import TrainState, register_for_checkpointing
acc = Accelerator(cpu=True)
optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
state = TrainState()
register_for_checkpointing(acc, state, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
for step in (6, 7):
    state.step = step
    acc.save_state(f"{sys.argv[1]}/{step}")
    print("saved", step, flush=True)
"""


def test_injected_faults_fire_after_the_files_are_written(tmp_path):
    """A real Accelerator's save_state under faults.fail_in_save / hang_in_save: the step-7 save
    fails (or hangs, its pid in the marker) once its files are written; step 6 and a process
    without the fault environment save normally."""
    import signal
    import subprocess
    import sys
    import time

    from . import faults
    from .mp_utils import _env

    def start(out: Path, env: dict[str, str]) -> subprocess.Popen:
        cmd = [sys.executable, "-c", _SAVES, str(out)]
        return subprocess.Popen(
            cmd, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    failing = start(tmp_path / "fail", faults.fail_in_save(7))
    marker = tmp_path / "hung.pid"
    hanging = start(tmp_path / "hang", faults.hang_in_save(7, 0, marker))
    plain = start(tmp_path / "plain", {})
    out, err = failing.communicate(timeout=120)
    assert failing.returncode != 0 and "injected failure in the step-7 save" in err, err[-2000:]
    assert out.split("\n")[:1] == ["saved 6"] and peek_train_state(tmp_path / "fail" / "7")["step"] == 7
    deadline = time.monotonic() + 120
    while not marker.exists() and hanging.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert marker.exists(), hanging.communicate(timeout=30)
        assert (
            int(marker.read_text()) == hanging.pid and peek_train_state(tmp_path / "hang" / "7")["step"] == 7
        )
    finally:
        hanging.send_signal(signal.SIGKILL)
        hanging.wait(timeout=30)
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 0 and out.split() == ["saved", "6", "saved", "7"], err[-2000:]


def test_latest_skips_a_damaged_or_incomplete_checkpoint_and_says_so(tmp_path, capsys):
    """The manifest (written last) lists every file with its size: a newest step missing a file, or
    with a truncated one, is skipped by latest, naming the file; given explicitly it is refused."""
    for step in (10, 20, 30):
        save(LocalCheckpointer(StandIn(), TrainState(), tmp_path, None), step)
    (tmp_path / step_name(30) / "shard_1.pt").unlink()
    (tmp_path / step_name(20) / "shard_2.pt").write_bytes(b"x")
    notes: list[str] = []
    assert local_resume_path("latest", tmp_path, False, notes) == tmp_path / step_name(10)
    assert notes == [
        f"--resume latest: skipping {step_name(30)}: shard_1.pt is missing",
        f"--resume latest: skipping {step_name(20)}: shard_2.pt is 1 bytes, 10 when saved (truncated or replaced)",
    ]
    with pytest.raises(
        CheckpointError, match=f"{step_name(30)}.* damaged or incomplete: shard_1.pt is missing"
    ):
        check_checkpoint(local_resume_path(str(tmp_path / step_name(30)), tmp_path, False), TrainState(), "x")
    # What the checkpointer prints before it loads.
    LocalCheckpointer(StandIn(), TrainState(), tmp_path, "latest")._resume_path(say=True)
    assert f"skipping {step_name(30)}: shard_1.pt is missing" in capsys.readouterr().out


def test_latest_that_finds_nothing_says_so(tmp_path):
    notes: list[str] = []
    assert local_resume_path("latest", tmp_path, False, notes) is None
    assert notes == [f"--resume latest: no complete checkpoint in {str(tmp_path)!r}; starting from step 0."]


def test_latest_resolves_a_symlink_before_the_trust_check(tmp_path):
    elsewhere = save(LocalCheckpointer(StandIn(), TrainState(), tmp_path / "elsewhere", None), 30)
    root = tmp_path / "run"
    save(LocalCheckpointer(StandIn(), TrainState(), root, None), 10)
    (root / step_name(30)).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(
        CheckpointError, match=r"--resume latest: .* resolves to .*elsewhere.*allow_external_resume"
    ):
        local_resume_path("latest", root, False)
    assert local_resume_path("latest", root, True) == root / step_name(30)


class SavesRealTensors(StandIn):
    def save_state(self, path: str) -> None:
        torch.save(torch.zeros(200_000), Path(path) / "model.pt")  # 800 kB


def test_a_full_disk_is_said_as_such(tmp_path):
    """torch's zip writer reports a full disk as 'unexpected pos': the save names the disk and the fix."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        ck = LocalCheckpointer(SavesRealTensors(), TrainState(), disk, None)
        with pytest.raises(
            StorageError, match=r"is full .* while saving step 7; nothing of this save is used"
        ):
            save(ck, 7)
        assert latest_checkpoint(disk) is None
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_killed_workers_in_flight_save_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"accel-tp-ckpt-{dead.pid}-x1"
    mine = tmp_path / f"accel-tp-ckpt-{os.getpid()}-x2"
    for f in (stale, mine):
        f.mkdir()
    assert remove_stale_saves(str(tmp_path)) == [stale]
    assert not stale.exists() and mine.exists()
