"""The run folder: one object that knows where a run lives and the name of everything in it.

A run's folder is `run.output_dir/run.name` under `accelerate launch`, and
`ray.storage_path/run.name` under Ray (a local path or an object-store URI). Every artifact name a
run writes is here, once: checkpoints, metrics, the loss plot, the HF export, the compile cache.
Where the folder is an object-store URI, this process writes into a node-local staging folder that
is mirrored up (`push`); otherwise it writes in place and `push` does nothing. Callers never ask
which of the two they have.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from .storage import download, exists, is_remote, join, upload

__all__ = [
    "CHECKPOINTS_DIR",
    "METRICS_FILE",
    "PLOT_FILE",
    "EXPORT_DIR",
    "ADAPTER_DIR",
    "COMPILE_CACHE_DIR",
    "RunFolder",
    "LocalRunFolder",
    "MirroredRunFolder",
    "run_folder",
    "staging_dir",
    "RunFolderSync",
]

CHECKPOINTS_DIR = "checkpoints"  # `accelerate launch` runs: step folders (Ray keeps its own beside)
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EXPORT_DIR = "hf"
ADAPTER_DIR = "adapter"  # a LoRA run's PEFT adapter export
COMPILE_CACHE_DIR = "compile_cache"


def staging_dir(run_uri: str) -> Path:
    """The node-local folder a worker writes a remote run's files into before they are copied up
    (under $TMPDIR; removed after the run's last upload)."""
    key = hashlib.sha256(run_uri.encode()).hexdigest()[:12]
    # Named like the run: Accelerate's trackers write to <project_dir>/<run name>.
    return Path(tempfile.gettempdir()) / "accel-tp-runs" / key / run_uri.rstrip("/").rsplit("/", 1)[-1]


class RunFolderSync:
    """Mirror a staging folder's files to a remote run folder (rank 0 only).

    `start` clears the staging folder and brings down the run's metrics file (a resumed run appends
    to it); `push` uploads new or changed files, at most every `min_interval_s` unless forced.
    """

    def __init__(self, staging: Path, run_uri: str, min_interval_s: float = 30.0) -> None:
        self.staging = staging
        self.run_uri = run_uri
        self.min_interval_s = min_interval_s
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = 0.0

    def start(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        remote = join(self.run_uri, METRICS_FILE)
        if exists(remote):
            download(remote, self.staging / METRICS_FILE)

    def remote(self, local: str | os.PathLike) -> str:
        """The URI a staged file or folder is mirrored to."""
        return join(self.run_uri, Path(local).relative_to(self.staging).as_posix())

    def close(self) -> None:
        """The last upload, then the staging folder is removed. Best effort when the run is already
        failing (its own error is the one to see); an upload error of a finished run is raised."""
        import sys

        failing = sys.exc_info()[0] is not None
        try:
            self.push(force=True)
        except Exception as e:
            if not failing:
                raise
            # Kept: the staging folder is now the only copy of what did not go up.
            print(f"[accel-tp] could not copy {self.staging} to {self.run_uri}: {e}", flush=True)
            return
        shutil.rmtree(self.staging, ignore_errors=True)

    def push(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        for p in sorted(self.staging.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.staging).as_posix()
            st = p.stat()
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            upload(p, join(self.run_uri, rel))
            self._sent[rel] = (st.st_size, st.st_mtime_ns)


class RunFolder:
    """A run's folder. `root`: where it lives (path or URI); `local`: where this process writes."""

    def __init__(self, root: str, local: Path) -> None:
        self.root = root
        self.local = local

    # Artifact paths this process writes (in `local`) ...
    @property
    def metrics(self) -> Path:
        return self.local / METRICS_FILE

    @property
    def plot(self) -> Path:
        return self.local / PLOT_FILE

    @property
    def export(self) -> Path:
        return self.local / EXPORT_DIR

    @property
    def adapter(self) -> Path:
        return self.local / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        """The step folders of an `accelerate launch` run."""
        return self.local / CHECKPOINTS_DIR

    # ... and where they end up (in `root`).
    def uri(self, name: str) -> str:
        """Where the artifact `name` (e.g. METRICS_FILE) of this run is stored."""
        return join(self.root, name) if is_remote(self.root) else str(Path(self.root) / name)

    def remote(self, local: str | os.PathLike) -> str:
        """Where a file this process wrote under `local` is stored (itself when written in place)."""
        return self.uri(Path(local).relative_to(self.local).as_posix())

    @property
    def compile_cache_root(self) -> str:
        """The compile cache is read and written where the run is stored, by every rank."""
        return self.root

    def start(self) -> None:
        """Before anything is written (rank 0)."""

    def push(self, force: bool = False) -> None:
        """Bring the stored run folder up to date with what this process wrote (rate-limited
        unless `force`)."""

    def close(self) -> None:
        """The last push; then any staging space is released."""


class LocalRunFolder(RunFolder):
    """A folder on a filesystem this process sees: written in place."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = str(root).removeprefix("file://")
        super().__init__(root, Path(root))


class MirroredRunFolder(RunFolder):
    """An object-store run folder: this process writes to a node-local staging folder, mirrored up."""

    def __init__(self, root: str) -> None:
        super().__init__(root, staging_dir(root))
        self._sync = RunFolderSync(self.local, root)

    def start(self) -> None:
        # The staging folder starts from the run's stored metrics (a resumed run appends to them).
        self._sync.start()

    def push(self, force: bool = False) -> None:
        self._sync.push(force=force)

    def remote(self, local: str | os.PathLike) -> str:
        return self._sync.remote(local)

    def close(self) -> None:
        self._sync.close()


def run_folder(root: str | os.PathLike) -> RunFolder:
    """The run folder at `root` (a local path or an object-store URI)."""
    return MirroredRunFolder(str(root)) if is_remote(str(root)) else LocalRunFolder(root)
