"""How a worker was started, as two implementations of one small interface.

`LocalMode` is a worker of `accelerate launch` (or torchrun): its run folder is
`run.output_dir/run.name`, its checkpoints are numbered folders there, its metrics go to that
folder only. `RayMode` is a Ray Train worker: its run folder is `ray.storage_path/run.name` (a path,
or an object-store URI mirrored from node-local staging), Ray registers its checkpoints, every
logged step is a Ray report, and an elastic restart on fewer workers refits the layout. The trainer
asks the mode for these parts and never asks which mode it has.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from .checkpoint import Checkpointer, LocalCheckpointer, RayCheckpointer, TrainState
from .config import Config, ConfigError, elastic_worker_counts
from .reporting import RayReporter, Reporter
from .run_folder import LocalRunFolder, RunFolder, run_folder

__all__ = ["WorkerMode", "LocalMode", "RayMode", "fit_to_world"]


class WorkerMode(Protocol):
    folder: RunFolder

    def fit(self, cfg: Config, world_size: int) -> Config: ...

    def checkpointer(self, cfg: Config, accelerator: Any, state: TrainState) -> Checkpointer: ...

    def reporter(self, cfg: Config, accelerator: Any, **kwargs: Any) -> Reporter: ...


class LocalMode:
    """A worker of `accelerate launch` / torchrun."""

    def __init__(self, cfg: Config) -> None:
        self.folder: RunFolder = LocalRunFolder(Path(cfg.run.output_dir) / cfg.run.name)

    def fit(self, cfg: Config, world_size: int) -> Config:
        return cfg

    def checkpointer(self, cfg: Config, accelerator: Any, state: TrainState) -> Checkpointer:
        return LocalCheckpointer(
            accelerator,
            state,
            self.folder.checkpoints,
            cfg.checkpoint.resume_from,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.allow_external_resume,
            run_config=cfg.to_dict(),
            every_steps=cfg.checkpoint.every_steps,
            at_end=cfg.checkpoint.at_end,
            trust_pickles=cfg.checkpoint.trust_pickles,
        )

    def reporter(self, cfg: Config, accelerator: Any, **kwargs: Any) -> Reporter:
        return Reporter(cfg, accelerator, self.folder, **kwargs)


class RayMode:
    """A Ray Train worker of the run stored at `run_root` (ray.storage_path/run.name)."""

    def __init__(self, run_root: str) -> None:
        self.folder = run_folder(run_root)

    def fit(self, cfg: Config, world_size: int) -> Config:
        return fit_to_world(cfg, world_size)

    def checkpointer(self, cfg: Config, accelerator: Any, state: TrainState) -> Checkpointer:
        return RayCheckpointer(
            accelerator,
            state,
            run_config=cfg.to_dict(),
            every_steps=cfg.checkpoint.every_steps,
            at_end=cfg.checkpoint.at_end,
            trust_pickles=cfg.checkpoint.trust_pickles,
            upload=cfg.checkpoint.upload,
        )

    def reporter(self, cfg: Config, accelerator: Any, **kwargs: Any) -> Reporter:
        return RayReporter(cfg, accelerator, self.folder, **kwargs)


def fit_to_world(cfg: Config, world_size: int) -> Config:
    """An elastic Ray run (ray.min_workers) restarted on fewer workers: same tp_size, dp lowered and
    gradient accumulation raised so that the global batch (micro x accum x dp) is unchanged."""
    par, tr = cfg.parallelism, cfg.train
    if cfg.ray.min_workers is None or par.dp_size is None or world_size == par.replica_size * par.dp_size:
        return cfg
    valid = elastic_worker_counts(par.replica_size, par.dp_size, tr.grad_accum_steps)
    if world_size not in valid:
        raise ConfigError(
            f"ray.min_workers: Ray started {world_size} workers; this run keeps its global batch only on "
            f"{valid} workers."
        )
    dp = world_size // par.replica_size
    accum = tr.grad_accum_steps * par.dp_size // dp
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"[accel-tp] elastic: {world_size} of {par.replica_size * par.dp_size} workers: tp{par.tp_size}"
            f"{f' x sp{par.sp_size}' if par.sp_size > 1 else ''} x dp{dp}, "
            f"grad_accum_steps {tr.grad_accum_steps} -> {accum} (global batch {tr.micro_batch_size * accum * dp} kept)",
            flush=True,
        )
    return replace(cfg, parallelism=replace(par, dp_size=dp), train=replace(tr, grad_accum_steps=accum))
