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


# --- Ray checkpoints on remote storage -------------------------------------------------------------
# A SubTreeFileSystem is not pyarrow's LocalFileSystem, so Ray (and accel-tp) treat it as remote
# storage, like S3: the same code path, without a server. tests/test_cluster.py runs it against S3.


def _remote_checkpoint(tmp_path: Path, step: int = 6):
    import pyarrow.fs
    import ray.train
    import torch

    name = f"step_{step:08d}"
    src = tmp_path / "bucket" / name
    (src / "pytorch_model").mkdir(parents=True)
    torch.save(TrainState(step=step, samples=step * 4).state_dict(), src / "custom_checkpoint_0.pkl")
    (src / "pytorch_model" / "shard.pt").write_bytes(b"w" * 1_000_000)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    return ray.train.Checkpoint(name, filesystem=fs)


def test_remote_train_state_is_read_in_place(tmp_path):
    from accel_tp.checkpoint import _is_local, _peek_ray_train_state

    ckpt = _remote_checkpoint(tmp_path)
    assert not _is_local(ckpt)
    assert _peek_ray_train_state(ckpt)["step"] == 6
    (tmp_path / "bucket" / "step_00000006" / "custom_checkpoint_0.pkl").unlink()
    assert _peek_ray_train_state(ckpt) is None  # check_resume then says "not an accel-tp checkpoint"


def test_remote_download_is_complete_or_absent_and_never_rewritten(tmp_path):
    """A worker that comes second reuses the node's complete download: the files an earlier worker
    is reading are not written again (Checkpoint.as_directory downloads again in place)."""
    from accel_tp.checkpoint import _download_once

    ckpt = _remote_checkpoint(tmp_path)
    folder = tmp_path / "node" / "step_00000006"
    _download_once(ckpt, folder)
    shard = folder / "pytorch_model" / "shard.pt"
    assert shard.read_bytes() == b"w" * 1_000_000
    before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))]
    _download_once(ckpt, folder)
    assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))] == before
    assert [p.name for p in folder.parent.iterdir()] == ["step_00000006"]  # no temporary left


def _download_in_process(args: tuple[str, str]) -> int:
    import pyarrow.fs
    import ray.train

    from accel_tp.checkpoint import _download_once

    bucket, folder = args
    fs = pyarrow.fs.SubTreeFileSystem(bucket, pyarrow.fs.LocalFileSystem())
    _download_once(ray.train.Checkpoint("step_00000006", filesystem=fs), Path(folder))
    return len((Path(folder) / "pytorch_model" / "shard.pt").read_bytes())


def test_concurrent_downloads_sharing_a_tmp_all_see_the_whole_checkpoint(tmp_path):
    """Several raylets on one host share /tmp: their nodes' local rank 0s download the same checkpoint
    at once. Each writes a private copy and the first rename wins; every one reads whole files."""
    import multiprocessing

    _remote_checkpoint(tmp_path)
    folder = tmp_path / "node" / "step_00000006"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sizes = pool.map(_download_in_process, [(str(tmp_path / "bucket"), str(folder))] * 3)
    assert sizes == [1_000_000] * 3
    assert [p.name for p in folder.parent.iterdir()] == ["step_00000006"]
