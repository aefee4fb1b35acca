"""LocalCheckpointer's folder protocol: complete-or-invisible saves, retention, resume checks.

The accelerator here is a small stand-in whose save_state writes files (or dies half-way): this tests
our rename / retention logic; the real DeepSpeed save and load run in tests/test_multiprocess.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from accel_tp.checkpoint import LocalCheckpointer, TrainState, latest_checkpoint


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


def test_save_renames_complete_checkpoint(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None)
    out = Path(ck.save(10, {}))
    assert out == tmp_path / "step_00000010" and len(list(out.iterdir())) == 3
    assert not list(tmp_path.glob(".tmp-*"))


def test_interrupted_save_never_becomes_latest(tmp_path):
    LocalCheckpointer(StandIn(), TrainState(), tmp_path, None).save(10, {})
    with pytest.raises(Crash):
        LocalCheckpointer(StandIn(crash_after_files=2), TrainState(), tmp_path, None).save(20, {})
    # The half-written step 20 exists only under its temporary name; resume still finds step 10.
    assert (tmp_path / ".tmp-step_00000020").is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000010"
    # A later save of the same step replaces the leftover and completes.
    LocalCheckpointer(StandIn(), TrainState(), tmp_path, None).save(20, {})
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000020"
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_prunes_oldest(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, None, keep_last=2)
    for step in (5, 10, 15, 20):
        ck.save(step, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000015", "step_00000020"]


def test_resume_from_missing_folder_is_clear(tmp_path):
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="checkpoint.resume_from"):
        ck.load()


def test_resume_latest_with_nothing_saved_starts_fresh(tmp_path):
    assert LocalCheckpointer(StandIn(), TrainState(), tmp_path, "latest").load() == 0


def test_resume_from_outside_the_run_needs_opt_in(tmp_path):
    other = tmp_path / "elsewhere" / "step_00000010"
    other.mkdir(parents=True)
    ck = LocalCheckpointer(StandIn(), TrainState(), tmp_path / "run" / "checkpoints", str(other))
    with pytest.raises(PermissionError, match="allow_external_resume"):
        ck.precheck()
    trusted = LocalCheckpointer(StandIn(), TrainState(), tmp_path / "run", str(other), allow_external=True)
    assert trusted._resume_path() == other
