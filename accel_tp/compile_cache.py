"""torch.compile's artifacts saved with the run, so a restarted or resumed worker does not recompile.

With `model.compile` each worker compiles its decoder layers on its first step (Dynamo traces,
AOTAutograd builds the backward, Inductor generates and autotunes Triton kernels). Inductor keeps
what it built in a node-local cache (/tmp/torchinductor_<user>), which a new node, or a new
container, does not have. `torch.compiler.save_cache_artifacts` serialises every artifact the
process compiled or read from that cache (Inductor's compiled graphs, AOTAutograd entries,
autotuning results) and `load_cache_artifacts` writes them back into the local caches, so the next
process finds them there. Entries are keyed by content (graph, shapes, device, torch version):
an artifact that no longer fits is simply not used, never used wrongly.

One file per rank (`<run folder>/compile_cache/rank_<rank>.bin`), since a key names the device
index a rank runs on. Written once, after the rank's first step (the training graphs: what a
restart waits for), read before the first step. Once only: torch 2.11-2.13 appends each save to
the last, and `load_cache_artifacts` reads the appended lists into a dict by artifact type, so a
second save's file would load only its own new artifacts (measured: a file saved after the first
step and again after an evaluation gave 0 of 4 cache hits). Evaluation graphs compile as before.
The run folder may be local or an object-store URI.

Measured on one H100 (docs/performance.md, 2026-12-05): Qwen2.5-0.5B, first step 36.9 s compiling
from an empty Inductor cache, 5.8 s on an empty Inductor cache with this file (every graph a hit).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .storage import download, exists, is_remote, join, upload

__all__ = ["CompileCache", "COMPILE_CACHE_DIR"]

COMPILE_CACHE_DIR = "compile_cache"


class CompileCache:
    """Load and save one rank's compile artifacts under a run folder (local path or URI)."""

    def __init__(self, run_folder: str | os.PathLike, rank: int) -> None:
        self.location = join(str(run_folder), COMPILE_CACHE_DIR, f"rank_{rank:05d}.bin")
        self._saved = False

    def load(self) -> str:
        """Hot-load the artifacts a previous process of this run saved; returns what happened."""
        import torch

        data = self._read()
        if data is None:
            return "compile cache: none saved yet for this rank (compiling)"
        info = torch.compiler.load_cache_artifacts(data)
        if info is None:
            return f"compile cache: {self.location} is unreadable (compiling; it is replaced after the first step)"
        return (
            f"compile cache: loaded {len(info.inductor_artifacts)} Inductor, {len(info.aot_autograd_artifacts)} "
            f"AOTAutograd and {len(info.autotune_artifacts)} autotuning entries ({len(data) / 2**20:.1f} MiB)"
        )

    def save(self) -> int | None:
        """Write every artifact this process has compiled or used so far (replacing the file whole),
        once per process (see the module's note); returns the bytes written, None when nothing was."""
        import torch

        if self._saved:
            return None
        result = torch.compiler.save_cache_artifacts()
        self._saved = True
        if result is None:
            return None
        data = result[0]
        if is_remote(self.location):
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / "rank.bin"
                staged.write_bytes(data)
                upload(staged, self.location)  # an object is replaced whole
        else:
            final = Path(self.location)
            final.parent.mkdir(parents=True, exist_ok=True)
            part = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            part.write_bytes(data)
            os.replace(part, final)  # readers never see half a file
        return len(data)

    def _read(self) -> bytes | None:
        if not is_remote(self.location):
            path = Path(self.location)
            return path.read_bytes() if path.is_file() else None
        if not exists(self.location):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return download(self.location, Path(tmp) / "rank.bin").read_bytes()
