"""The run folder: one object that knows where a run lives and the name of everything in it.

A run's folder is `run.output_dir/run.name` under `accelerate launch`, and
`ray.storage_path/run.name` under Ray (a local path or an object-store URI). Every artifact name a
run writes is here, once: checkpoints, metrics, the loss plot, the HF export, the compile cache.
Where the folder is an object-store URI, this process writes into a node-local staging folder that
is mirrored up (`push`); otherwise it writes in place and `push` does nothing. Callers never ask
which of the two they have.
"""

from __future__ import annotations

import os
from pathlib import Path

from .storage import RunFolderSync, is_remote, join, staging_dir

__all__ = [
    "CHECKPOINTS_DIR",
    "METRICS_FILE",
    "PLOT_FILE",
    "EXPORT_DIR",
    "COMPILE_CACHE_DIR",
    "RunFolder",
    "LocalRunFolder",
    "MirroredRunFolder",
    "run_folder",
]

CHECKPOINTS_DIR = "checkpoints"  # `accelerate launch` runs: step folders (Ray keeps its own beside)
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EXPORT_DIR = "hf"
COMPILE_CACHE_DIR = "compile_cache"


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
