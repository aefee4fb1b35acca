"""`accelerate launch` runs: numbered checkpoint folders under the run's folder, each complete or
invisible (written under a temporary name, renamed once every rank has written its files)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import CheckpointerBase, WrittenCheckpoint, write_run_config
from .format import TrainState, step_name, steps_under, tmp_name
from .rules import check_checkpoint, local_resume_path
from .universal import load_checkpoint, universal_cache_for

__all__ = ["LocalCheckpointer"]


class LocalCheckpointer(CheckpointerBase):
    """Folders `<root>/step_N`; resumes from `resume_from` (a folder under `root`, "latest", or one
    elsewhere with `allow_external`), keeps the newest `keep_last` (None: all)."""

    def __init__(
        self,
        accelerator: Any,
        state: TrainState,
        root: str | os.PathLike,
        resume_from: str | None,
        keep_last: int | None = None,
        allow_external: bool = False,
        run_config: dict[str, Any] | None = None,
        every_steps: int = 0,
        at_end: bool = False,
        trust_pickles: bool = False,
    ) -> None:
        super().__init__(accelerator, state, run_config, every_steps, at_end, trust_pickles)
        self.root = Path(root)
        self.resume_from = resume_from
        self.keep_last = keep_last
        self.allow_external = allow_external

    @contextmanager
    def save(self, step: int) -> Iterator[WrittenCheckpoint]:
        """Every rank writes its files into `.tmp-step_N`; the checkpoint becomes `step_N` when the
        block exits (not if it raises). `step_N` is its location."""
        acc = self.accelerator
        self._fill_zero_stage()
        name = step_name(step)
        final, tmp = self.root / name, self.root / tmp_name(name)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_run_config(tmp, self.run_config)
        acc.wait_for_everyone()
        self._save_state(tmp, step)
        acc.wait_for_everyone()
        self._write_manifest(tmp)  # last: a folder without it (or not matching it) is never loaded
        yield WrittenCheckpoint(name, str(tmp), str(final))
        if acc.is_main_process:
            # A crash before this rename leaves only a .tmp- folder, which load() never picks.
            if final.exists():
                shutil.rmtree(final)
            # A conversion of an earlier folder of this name would no longer match it.
            shutil.rmtree(universal_cache_for(final), ignore_errors=True)
            os.replace(tmp, final)
            if self.keep_last:
                for _, old in sorted(steps_under(self.root))[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
                    shutil.rmtree(universal_cache_for(old), ignore_errors=True)
        acc.wait_for_everyone()

    def _resume_path(self, say: bool = False) -> Path | None:
        notes: list[str] = []
        path = local_resume_path(self.resume_from, self.root, self.allow_external, notes)
        if say and self.accelerator.is_main_process:
            for note in notes:
                print(f"[accel-tp] {note}", flush=True)
        return path

    def precheck(self) -> None:
        """Refuse an incompatible checkpoint before the model is even built."""
        self._fill_zero_stage()
        path = self._resume_path()
        if path is not None:
            check_checkpoint(path, self.state, "checkpoint.resume_from")

    def load(self) -> int:
        self._fill_zero_stage()
        path = self._resume_path(say=True)
        if path is None:
            return 0
        load_checkpoint(
            self.accelerator,
            self.state,
            str(path),
            "checkpoint.resume_from",
            trust_pickles=self.trust_pickles,
        )
        return self.state.step
