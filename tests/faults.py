"""Fault injection for the tests: a test-only mechanism, nothing of it is in accel_tp.

A test that wants a fault starts its processes with the environment `hang_in_save(...)` or
`fail_in_save(...)` returns: the fault's own variable, and PYTHONPATH with tests/fault_injection first.
That folder holds a `sitecustomize` module, which Python imports at start-up in every process of the
run (accelerate launch's ranks, Ray's workers: both are given the PYTHONPATH of their launcher), and
which calls `install` below. With a fault asked for, `install` wraps `accelerate.Accelerator.save_state`
once Accelerate is imported, so the fault fires on this rank right after its checkpoint files are
written, and before the checkpointer commits (renames) or reports them. Without one it does nothing.

* hang: one rank stops inside one step's save, so a test can kill it mid-checkpoint. It writes its
  pid to the marker file first (atomically), and passes through once the marker exists (the
  restarted run).
* fail: every rank raises inside the save of one step; the run fails there and its previous
  checkpoint stays the latest.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SITE_DIR = Path(__file__).resolve().parent / "fault_injection"  # holds the sitecustomize module
HANG_ENV = "HANG_IN_SAVE"  # "<step>:<rank>:<marker file>"
FAIL_ENV = "FAIL_IN_SAVE"  # "<step>"


def pythonpath(existing: str | None = None) -> str:
    """PYTHONPATH with the fault-injection folder and the repository first (default: after this
    process's PYTHONPATH)."""
    existing = os.environ.get("PYTHONPATH", "") if existing is None else existing
    return os.pathsep.join(p for p in (str(SITE_DIR), str(ROOT), existing) if p)


def hang_in_save(step: int, rank: int, marker: str | os.PathLike) -> dict[str, str]:
    """The environment that stops `rank` in the step-`step` save (its pid written to `marker`)."""
    return {HANG_ENV: f"{step}:{rank}:{marker}", "PYTHONPATH": pythonpath()}


def fail_in_save(step: int) -> dict[str, str]:
    """The environment that makes every rank raise in the step-`step` save."""
    return {FAIL_ENV: str(step), "PYTHONPATH": pythonpath()}


def install() -> None:
    """Called by tests/fault_injection/sitecustomize.py at interpreter start-up."""
    if os.environ.get(HANG_ENV) or os.environ.get(FAIL_ENV):
        sys.meta_path.insert(0, _AfterImport("accelerate.accelerator", _wrap_save_state))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after the module `name` is first imported (whoever imports it)."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then(module: ModuleType) -> None:
            exec_module(module)
            self.then(module)

        spec.loader.exec_module = exec_then
        return spec


def _wrap_save_state(module: ModuleType) -> None:
    save_state = module.Accelerator.save_state

    @functools.wraps(save_state)
    def with_fault(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = save_state(self, *args, **kwargs)
        _fault(_step(self), self.process_index)
        return out

    module.Accelerator.save_state = with_fault


def _step(accelerator: Any) -> int:
    """The step being saved: the registered TrainState's (set before the save)."""
    from accel_tp.checkpoint import TrainState

    # Accelerate's list of the objects register_for_checkpointing was given (test-only reading).
    (state,) = [o for o in accelerator._custom_objects if isinstance(o, TrainState)]
    return state.step


def _fault(step: int, rank: int) -> None:
    if os.environ.get(FAIL_ENV) == str(step):
        raise RuntimeError(f"injected failure in the step-{step} save")
    spec = os.environ.get(HANG_ENV)
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if (int(at_step), int(at_rank)) != (step, rank) or os.path.exists(marker):
        return
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)  # the test never reads a half-written pid
    time.sleep(600)
