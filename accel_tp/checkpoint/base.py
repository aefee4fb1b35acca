"""What every checkpointer does the same way: its cadence, what it registers, the run config it
writes into each checkpoint, and the checkpoint it hands back while the save is still unpublished."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import StorageError
from .format import (
    RUN_CONFIG_FILE,
    TrainState,
    list_files,
    register_for_checkpointing,
    save_kwargs,
    write_manifest,
)

# Below this, a failed write is taken to be a full disk.
_LOW_SPACE = 64 * 2**20

__all__ = ["Checkpointer", "WrittenCheckpoint", "CheckpointerBase", "write_run_config"]


@dataclass(frozen=True)
class WrittenCheckpoint:
    """A checkpoint whose files this rank has written and that is not yet published."""

    name: str  # its folder name (step_name)
    folder: str  # where this rank's files are now
    location: str  # where the checkpoint is once published (for the run's summary line)
    waited_s: float = 0.0  # how long this save first waited for the previous one's upload


class Checkpointer(Protocol):
    def register(self, scheduler: Any) -> None: ...

    def should_save(self, step: int, last: bool) -> bool: ...

    def save(self, step: int) -> AbstractContextManager[WrittenCheckpoint]: ...

    def load(self) -> int: ...

    def precheck(self) -> None: ...

    def flush(self) -> None: ...


def write_run_config(folder: str | os.PathLike, run_config: dict[str, Any] | None) -> None:
    """Record the run's config in a checkpoint folder (YAML: reading it back unpickles nothing)."""
    if run_config is None:
        return
    import yaml

    (Path(folder) / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))


def _zero_stage_of(accelerator: Any) -> int | None:
    """The ZeRO stage of the accelerator's DeepSpeed plugin (None when it has none, e.g. a stand-in)."""
    try:
        plugin = accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return None


class CheckpointerBase:
    """The cadence (`every_steps`: 0 never mid-run; `at_end`: the last step too) and the objects
    saved with the engine. `run_config`: the run's config, written into every checkpoint.
    `trust_pickles`: load checkpoints without the weights-only check (checkpoint.trust_pickles)."""

    def flush(self) -> None:
        """Wait until every save is where a resume finds it (a local save is, once save() returns)."""

    def __init__(
        self,
        accelerator: Any,
        state: TrainState,
        run_config: dict[str, Any] | None = None,
        every_steps: int = 0,
        at_end: bool = False,
        trust_pickles: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.trust_pickles = trust_pickles
        self.state = state
        self.run_config = run_config
        self.every_steps = every_steps
        self.at_end = at_end

    def register(self, scheduler: Any) -> None:
        """Have Accelerate's save_state / load_state carry the train state and the LR scheduler."""
        register_for_checkpointing(self.accelerator, self.state, scheduler)

    def should_save(self, step: int, last: bool) -> bool:
        """Whether the optimizer step `step` ends with a checkpoint (`last`: it is the run's last)."""
        return bool(self.every_steps and step % self.every_steps == 0) or (last and self.at_end)

    def _save_state(self, folder: str | os.PathLike, step: int) -> None:
        """Accelerate's save_state into `folder`; a full disk is said as such (torch's zip writer
        reports it as "unexpected pos" or a bare write error)."""
        import errno
        import shutil

        try:
            self.accelerator.save_state(str(folder), **save_kwargs(self.accelerator))
        except (OSError, RuntimeError) as e:
            free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
            full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e)
            if not full and (free is None or free > _LOW_SPACE):
                raise
            left = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
            raise StorageError(
                f"checkpoint: the disk holding {str(folder)!r} is full ({left}) while saving step {step}; "
                "nothing of this save is used and the previous checkpoints are intact. Free space, or point "
                "run.output_dir / ray.storage_path (and TMPDIR for Ray) at a larger disk, then resume."
            ) from e

    def _write_manifest(self, folder: str | os.PathLike) -> None:
        """After every rank has written its files into `folder` (its own, under Ray; a shared one
        otherwise): rank 0 records all of them, with their sizes, as the checkpoint's manifest."""
        import torch.distributed as dist

        mine = list_files(folder)
        every: list[Any] = [mine]
        if dist.is_initialized():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        if self.accelerator.is_main_process:
            write_manifest(folder, {k: v for files in every for k, v in files.items()})
        self.accelerator.wait_for_everyone()

    def _fill_zero_stage(self) -> None:
        # trainer.setup records it; until then (or for callers that do not) take it from the plugin.
        if self.state.zero_stage is None:
            self.state.zero_stage = _zero_stage_of(self.accelerator)
