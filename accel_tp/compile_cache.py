"""torch.compile's artifacts saved with the run, so a restarted or resumed worker does not recompile.

With `model.compile` each worker compiles its decoder layers on its first step (Dynamo traces,
AOTAutograd builds the backward, Inductor generates and autotunes Triton kernels). Inductor keeps
what it built in a node-local cache (/tmp/torchinductor_<user>), which a new node, or a new
container, does not have. `torch.compiler.save_cache_artifacts` serialises every artifact the
process compiled or read from that cache (Inductor's compiled graphs, AOTAutograd entries,
autotuning results) and `load_cache_artifacts` writes them back into the local caches, so the next
process finds them there. Entries are keyed by content (graph, shapes, device, torch version):
an artifact that no longer fits is simply not used, never used wrongly.

One file per rank and phase, since a key names the device index a rank runs on:
`<run folder>/compile_cache/rank_<rank>.bin`, written after the rank's first step (the training
graphs: what a restart waits for), and `rank_<rank>.eval.bin`, written after its first evaluation;
both are read before the first step. Each once per process, into its own file: torch 2.11-2.13
appends each save to the last, and `load_cache_artifacts` reads the appended lists into a dict by
artifact type, so a file saved twice loads only the newest list of each type (measured: a file
saved after the first step and again after an evaluation gave 0 of 4 training hits). The eval
file therefore holds the training lists too, but loads the lists recorded after the first step
(and the training list of a type nothing new was recorded for); with the training file beside it,
every graph is found (some entries are then loaded, and counted, twice: harmless). The run folder
may be local or an object-store URI.

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


PHASES = ("train", "eval")


class CompileCache:
    """Load and save one rank's compile artifacts under a run folder (local path or URI)."""

    def __init__(self, run_folder: str | os.PathLike, rank: int) -> None:
        base = join(str(run_folder), COMPILE_CACHE_DIR, f"rank_{rank:05d}")
        self.locations = {"train": f"{base}.bin", "eval": f"{base}.eval.bin"}
        self._saved: set[str] = set()

    def load(self) -> str:
        """Hot-load the artifacts previous processes of this run saved; returns what happened."""
        import torch

        counts, size, bad = [0, 0, 0], 0, []
        for phase in PHASES:
            data = self._read(self.locations[phase])
            if data is None:
                continue
            info = torch.compiler.load_cache_artifacts(data)
            if info is None:
                bad.append(self.locations[phase])
                continue
            size += len(data)
            for i, n in enumerate(
                (info.inductor_artifacts, info.aot_autograd_artifacts, info.autotune_artifacts)
            ):
                counts[i] += len(n)
        note = f"; {', '.join(bad)} unreadable (replaced after the first step or evaluation)" if bad else ""
        if not size:
            return f"compile cache: none loaded for this rank (compiling){note}"
        return (
            f"compile cache: loaded {counts[0]} Inductor, {counts[1]} AOTAutograd and {counts[2]} "
            f"autotuning entries ({size / 2**20:.1f} MiB){note}"
        )

    def save(self, phase: str = "train") -> int | None:
        """After the first step ("train") or the first evaluation ("eval"): write every artifact this
        process has compiled or used so far to that phase's file (replacing it whole), once per
        phase and process (see the module's note); returns the bytes written, None when nothing was."""
        import torch

        if phase in self._saved:
            return None
        result = torch.compiler.save_cache_artifacts()
        self._saved.add(phase)
        if result is None:
            return None
        data, location = result[0], self.locations[phase]
        if is_remote(location):
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / "rank.bin"
                staged.write_bytes(data)
                upload(staged, location)  # an object is replaced whole
        else:
            final = Path(location)
            final.parent.mkdir(parents=True, exist_ok=True)
            part = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            part.write_bytes(data)
            os.replace(part, final)  # readers never see half a file
        return len(data)

    @staticmethod
    def _read(location: str) -> bytes | None:
        if not is_remote(location):
            path = Path(location)
            return path.read_bytes() if path.is_file() else None
        if not exists(location):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return download(location, Path(tmp) / "rank.bin").read_bytes()
