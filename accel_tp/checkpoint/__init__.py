"""Checkpointing behind one small object: `should_save(step, last)`, `save(step)`, `load() -> step`.

Both checkpointers wrap `accelerator.save_state` / `load_state`, i.e. DeepSpeed's native checkpoint
(TP model shards, ZeRO optimizer partitions) plus the scheduler, RNG states and the registered
`TrainState` (step and data position). `accelerate launch` runs keep numbered folders under the
run's folder (local.py); Ray runs hand each rank's folder to Ray Train, which persists it to the
run's storage (ray.py). A checkpoint saved on another tp x dp layout or ZeRO stage is resharded
through DeepSpeed's universal checkpoint (universal.py), within the resume rules (rules.py). Every
name a checkpoint has on disk is in format.py.
"""

from __future__ import annotations

from .base import Checkpointer, WrittenCheckpoint, write_run_config
from .format import (
    RUN_CONFIG_FILE,
    TRAIN_STATE_FILE,
    TrainState,
    latest_checkpoint,
    peek_train_state,
    ray_registered,
    register_for_checkpointing,
    step_name,
    step_of,
    steps_under,
)
from .local import LocalCheckpointer
from .ray import RayCheckpointer
from .rules import check_resume, check_run_folder, reshard_plan
from .universal import convert_to_universal, universal_cache_for

__all__ = [
    "TrainState",
    "Checkpointer",
    "WrittenCheckpoint",
    "LocalCheckpointer",
    "RayCheckpointer",
    "register_for_checkpointing",
    "latest_checkpoint",
    "steps_under",
    "step_name",
    "step_of",
    "peek_train_state",
    "ray_registered",
    "check_resume",
    "reshard_plan",
    "check_run_folder",
    "universal_cache_for",
    "convert_to_universal",
    "write_run_config",
    "RUN_CONFIG_FILE",
    "TRAIN_STATE_FILE",
]
