"""Ray Train runs: each worker saves into a local temporary folder that its report hands to Ray
(Ray merges the workers' files into one checkpoint of the run's storage and registers it once every
worker has reported); a run resumes from Ray's latest registered checkpoint, local or remote."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import CheckpointerBase, WrittenCheckpoint, write_run_config
from .format import TRAIN_STATE_FILE, peek_train_state, step_name, tmp_name
from .rules import check_resume
from .universal import load_checkpoint

__all__ = ["RayCheckpointer", "is_local", "peek_ray_train_state", "download_once", "wait_for_uploads"]

_WHERE = "ray checkpoint"


class RayCheckpointer(CheckpointerBase):
    """Save into a local temp folder for Ray to collect; resume from Ray's latest checkpoint."""

    def __init__(self, *args: Any, upload: str = "sync", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upload = upload  # checkpoint.upload: "async" or "sync"

    @contextmanager
    def save(self, step: int) -> Iterator[WrittenCheckpoint]:
        """Every rank writes its files (its DeepSpeed shards) into a temporary folder that the block
        reports (`ray.train.report(checkpoint=...)`, by the reporter). Synchronous: the report
        uploads it and the folder is removed when the block exits. Asynchronous: Ray uploads it in
        the background and removes it once uploaded; this save first waits until the previous
        one's upload is registered (one upload in flight, and no pile of local copies)."""
        acc = self.accelerator
        self._fill_zero_stage()
        waited = wait_for_uploads() if self.upload == "async" else 0.0
        remove_stale_saves()
        tmp = tempfile.mkdtemp(prefix=f"{_SAVE_PREFIX}{os.getpid()}-")
        handed_over = False
        try:
            if acc.is_main_process:
                write_run_config(tmp, self.run_config)  # one copy; Ray merges the workers' files
            self._save_state(tmp, step)
            # No rank reports before every rank has written: a report uploads this rank's files.
            acc.wait_for_everyone()
            self._write_manifest(tmp)
            name = step_name(step)
            yield WrittenCheckpoint(name, tmp, f"{name} (reported to Ray)", waited_s=waited)
            handed_over = self.upload == "async"  # Ray's upload thread removes it when done
        finally:
            if not handed_over:
                shutil.rmtree(tmp, ignore_errors=True)

    def flush(self) -> None:
        """Asynchronous uploads: wait until Ray has registered every reported checkpoint."""
        if self.upload == "async":
            wait_for_uploads()

    def precheck(self) -> None:
        import ray.train

        self._fill_zero_stage()
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            # Only the small train-state file, read where it is stored: no download of the rest.
            check_resume(peek_ray_train_state(ckpt), self.state, _WHERE)

    def load(self) -> int:
        import ray.train

        self._fill_zero_stage()
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        if is_local(ckpt):
            # The storage folder itself: a resharding conversion is cached beside it like a local
            # checkpoint's.
            load_checkpoint(self.accelerator, self.state, ckpt.path, _WHERE, trust_pickles=self.trust_pickles)
            return self.state.step
        # Remote storage: one download per node, shared by its workers; a resharding conversion
        # goes to node-local temporary space too. Both are named after the checkpoint's storage
        # path, which only this run reads (it resumes from its own checkpoints only), and removed
        # once every worker has loaded.
        key = hashlib.sha256(str(ckpt.path).encode()).hexdigest()[:16]
        # Under the checkpoint's own name (step_N), which the resharding line prints.
        folder = Path(tempfile.gettempdir()) / f"accel-tp-download-{key}" / Path(ckpt.path).name
        cache = Path(tempfile.gettempdir()) / f"accel-tp-universal-{key}"
        acc = self.accelerator
        error = None
        if acc.is_local_main_process:
            try:
                download_once(ckpt, folder)
            except Exception as e:  # noqa: BLE001 - every rank must pass the barrier, then fail together
                error = e
        acc.wait_for_everyone()
        if error is not None:
            raise RuntimeError(f"{_WHERE}: downloading {ckpt.path} failed: {error}") from error
        if not folder.is_dir():
            raise RuntimeError(
                f"{_WHERE}: this node's download of {ckpt.path} failed (see its local rank 0)."
            )
        # No barrier on failure (another rank may be in a collective): the complete download is then
        # left for a retry of the same checkpoint, which reuses it and removes it after its load.
        load_checkpoint(
            acc, self.state, str(folder), _WHERE, cache, node_local=True, trust_pickles=self.trust_pickles
        )
        acc.wait_for_everyone()
        if acc.is_local_main_process:
            shutil.rmtree(folder.parent, ignore_errors=True)
        return self.state.step


def wait_for_uploads() -> float:
    """Block until every checkpoint this worker reported is uploaded and registered by Ray;
    returns the seconds waited."""
    import time

    import ray.train

    t0 = time.perf_counter()
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return time.perf_counter() - t0


# A worker's in-flight save, named after its pid: one a killed worker left (Ctrl-C on the driver
# ends workers without running their cleanup) is removed by the next save on that node.
_SAVE_PREFIX = "accel-tp-ckpt-"


def remove_stale_saves(tmp_root: str | None = None) -> list[Path]:
    """Remove the in-flight save folders of processes that no longer run; returns them."""
    removed = []
    for folder in Path(tmp_root or tempfile.gettempdir()).glob(f"{_SAVE_PREFIX}*-*"):
        pid = folder.name[len(_SAVE_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def is_local(ckpt: Any) -> bool:
    """Whether a Ray checkpoint is on a filesystem this process reads directly."""
    import pyarrow.fs

    return isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem)


def peek_ray_train_state(ckpt: Any) -> dict[str, Any] | None:
    """peek_train_state for a Ray checkpoint, local or remote, without downloading the checkpoint."""
    import pyarrow.fs
    import torch

    if is_local(ckpt):
        return peek_train_state(ckpt.path)
    path = f"{ckpt.path.rstrip('/')}/{TRAIN_STATE_FILE}"
    if ckpt.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with ckpt.filesystem.open_input_file(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def download_once(ckpt: Any, folder: Path) -> None:
    """Download `ckpt` into `folder` unless it is there already: into a private temporary folder,
    renamed when complete, so no reader ever sees a partial file. Not Checkpoint.as_directory: its
    shared folder is downloaded again, in place, by a later worker of the node while an earlier one
    reads it (ray/train/_checkpoint.py to_directory: the lock only covers a download in flight), which
    loaded a truncated train-state file ("EOFError: Ran out of input") in CI."""
    if folder.is_dir():
        return  # complete: only ever created by the rename below; checkpoints are immutable
    tmp = folder.with_name(f"{tmp_name(folder.name)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        ckpt.to_directory(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process (sharing this /tmp) renamed its copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
