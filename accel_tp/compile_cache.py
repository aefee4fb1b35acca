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
artifact type, so a file saved twice loads only the newest list of each type (a file saved after the
first step and again after an evaluation loads none of the training graphs). The eval
file therefore holds the training lists too, but loads the lists recorded after the first step
(and the training list of a type nothing new was recorded for); with the training file beside it,
every graph is found (some entries are then loaded, and counted, twice: harmless). The run folder
may be local or an object-store URI.

What it saves on a restart is measured in docs/performance.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .compat.torch import compiled_graph_counts
from .run_folder import COMPILE_CACHE_DIR
from .storage import download, exists, is_remote, join, upload

__all__ = ["CompileCache", "CompileWatch", "PHASES", "rank_cache_file"]


PHASES = ("train", "eval")


def rank_cache_file(rank: int, phase: str = "train") -> str:
    """The name of one rank's artifact file of `phase` in the run's COMPILE_CACHE_DIR:
    `rank_00003.bin` (training), `rank_00003.eval.bin` (evaluation)."""
    return f"rank_{rank:05d}{'' if phase == 'train' else f'.{phase}'}.bin"


class CompileCache:
    """Load and save one rank's compile artifacts under a run folder (local path or URI)."""

    def __init__(self, run_folder: str | os.PathLike, rank: int) -> None:
        folder = join(str(run_folder), COMPILE_CACHE_DIR)
        self.locations = {phase: join(folder, rank_cache_file(rank, phase)) for phase in PHASES}
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


def _hits_text(now: tuple[int, ...], before: tuple[int, ...] = (0, 0, 0, 0)) -> str:
    a, b, c, d = (x - y for x, y in zip(now, before))
    return f"compiled graphs taken from the cache: AOTAutograd {a} of {b}, Inductor {c} of {d}"


class CompileWatch:
    """What this worker's first step and first evaluation cost, and their compile artifacts kept.

    After the first step: how long the start took (the number a restart costs), the compiled
    graphs' cache hits, and the training artifacts saved (`cache`); after the first evaluation, the
    same for its graphs. Later calls do nothing. `compiled`: model.compile is on."""

    def __init__(self, compiled: bool, cache: CompileCache | None, is_main: bool) -> None:
        self.compiled = compiled
        self.cache = cache
        self.is_main = is_main
        self._at_first_step: tuple[int, ...] | None = None
        self._evaluated = False

    def after_step(self, seconds: float) -> None:
        if self._at_first_step is not None:
            return
        saved = self.cache.save("train") if self.cache is not None else None
        self._at_first_step = compiled_graph_counts() if self.compiled else (0, 0, 0, 0)
        if not self.is_main:
            return
        import time

        import psutil

        since_start = time.time() - psutil.Process().create_time()
        note = f"; {_hits_text(self._at_first_step)}" if self.compiled else ""
        if saved:
            note += f"; compile cache saved ({saved / 2**20:.1f} MiB)"
        print(
            f"[accel-tp] first step of this worker done {since_start:.1f} s after it started "
            f"(the step itself {seconds:.1f} s, compiling included){note}",
            flush=True,
        )

    def after_eval(self) -> None:
        if self._evaluated or not self.compiled:
            return
        self._evaluated = True
        saved = self.cache.save("eval") if self.cache is not None else None
        counts = compiled_graph_counts()
        if self.is_main:
            note = f"; compile cache saved ({saved / 2**20:.1f} MiB)" if saved else ""
            # Since the first step: the evaluation's graphs, and any training graph compiled in between.
            before = _hits_text(counts, self._at_first_step or (0, 0, 0, 0))
            print(
                f"[accel-tp] first evaluation of this worker done; since the first step {before}{note}",
                flush=True,
            )
