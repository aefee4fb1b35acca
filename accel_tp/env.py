"""Process-environment rules, written once: every process accel-tp starts or runs in uses these.

Imports only accel_tp.compat: the allocator default, the switch that makes
Accelerate use DeepSpeed, the libraries' log levels, a free local port, and the torch.distributed
variables of a one-process world.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

from .compat.ray import quiet_ray_train_reports
from .compat.torch import clear_stale_build_locks

__all__ = [
    "allocator_env",
    "worker_env",
    "ray_worker_env",
    "ray_driver_env",
    "apply_worker_env",
    "quiet_libraries",
    "free_port",
    "single_process_env",
    "PROCESS_GROUP_ENV",
    "process_group_backend",
]

# Whether the user chose the extensions folder (a shared one may be held from another host: its
# stale locks are named, never removed). Read once, before accel-tp sets its default.
_USER_SET = frozenset(k for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ)
_ALLOC_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# Shows the libraries' info logs and warnings again (they repeat on every rank otherwise).
VERBOSE_ENV = "ACCEL_TP_VERBOSE"
# Tests and benchmarks only: several ranks on one GPU through accel_tp/staged_gloo.py
# (ACCEL_TP_PROCESS_GROUP=staged_gloo on every rank, each with LOCAL_RANK=0). Not a user setting.
PROCESS_GROUP_ENV = "ACCEL_TP_PROCESS_GROUP"


def allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The CUDA caching-allocator settings a process should get: the user's own (either name;
    torch >= 2.9 reads PYTORCH_ALLOC_CONF, the older name wins when both are set), else
    expandable_segments: faster, and no fragmentation OOM at large micro-batches (docs/performance.md)."""
    mine = {n: environ[n] for n in _ALLOC_NAMES if n in environ}
    return mine or {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir(environ: Mapping[str, str]) -> str:
    """Where torch JIT-builds extensions (DeepSpeed's CPU shm comm op): the user's TORCH_EXTENSIONS_DIR,
    else a folder of this virtualenv's own, per host. Under torch's default (~/.cache/torch_extensions,
    shared by every venv of the user) two venvs with different DeepSpeed builds rebuild each other's
    op at run time, and a build killed there leaves a lock every later process waits on, silently.
    scripts/install.sh builds the op into the same folder."""
    if EXTENSIONS_ENV in environ:
        return environ[EXTENSIONS_ENV]
    return str(Path(sys.prefix) / "torch_extensions" / socket.gethostname())


def worker_env(environ: Mapping[str, str], device_type: str | None = None) -> dict[str, str]:
    """Variables every training / export worker needs, before torch or Accelerate initialise:
    Accelerate picks DeepSpeed from ACCELERATE_USE_DEEPSPEED (without it a CPU Accelerator drops
    to DDP), tokenizers' thread pool is off (workers fork DataLoader processes), and the
    allocator default (the user's own setting wins). On a CPU worker (`device_type` "cpu") DeepSpeed
    is told so (DS_ACCELERATOR), instead of warning on every rank that it found no GPU."""
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "TOKENIZERS_PARALLELISM": environ.get("TOKENIZERS_PARALLELISM", "false"),
        EXTENSIONS_ENV: extensions_dir(environ),
        **allocator_env(environ),
    }
    if device_type == "cpu":
        env["DS_ACCELERATOR"] = environ.get("DS_ACCELERATOR", "cpu")
    return env


def ray_worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """worker_env plus what Ray Train workers need: Ray Train 2.60 patches print() in its workers
    to log through the root logger as well as print (RAY_TRAIN_ENABLE_PRINT_PATCH, default on). That
    printed every line twice, and it leaked output that libraries capture by swapping sys.stdout:
    datasets hashes its map functions with dill, which reads `dis.dis` output that way, so
    hundreds of bytecode lines reached the console. Plain prints still reach the driver through
    Ray's worker log streaming."""
    env = {**worker_env(environ), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if EXTENSIONS_ENV not in environ:
        del env[EXTENSIONS_ENV]  # each worker takes its own venv's (apply_worker_env): not the driver's path
    return env


# Ray Train 2.60's controller collects at most one report per worker per poll of its workers
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a worker's ray.train.report blocks until
# its previous report has been collected: a tiny tp2 x dp2 run logging every 0.5 s step trained at
# one step per 2 s. At 0.2 s a run logging every step is held up only where steps are shorter than
# that; a dead worker is also noticed sooner.
RAY_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_POLL_S = "0.2"


def ray_driver_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What the Ray driver sets in its own environment before Ray Train starts its controller,
    which takes RAY_TRAIN_* variables from there: the poll interval above, unless the user set one."""
    return {RAY_POLL_ENV: environ.get(RAY_POLL_ENV, RAY_POLL_S)}


def apply_worker_env(device_type: str | None = None) -> None:
    """worker_env applied to this process (call before CUDA initialises and DeepSpeed is imported)."""
    os.environ.update(worker_env(os.environ, device_type))
    # A lock a killed build left behind would make DeepSpeed wait forever without a word.
    clear_stale_build_locks(os.environ[EXTENSIONS_ENV], remove=EXTENSIONS_ENV not in _USER_SET)


def quiet_libraries() -> None:
    """Keep worker output to accel-tp's progress and errors (ACCEL_TP_VERBOSE=1 shows the
    libraries' info logs)."""
    if os.environ.get(VERBOSE_ENV):
        return
    for name in ("accelerate", "DeepSpeed", "deepspeed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_ray_train_reports()
    # Tokenization runs once per node and is quick; its per-step bars would bury the training bar.
    import datasets

    datasets.disable_progress_bars()
    # DeepSpeed 0.19 still calls this torch API; the warning repeats on every rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(port: int) -> dict[str, str]:
    """The torch.distributed environment of a one-process world (what torchrun would set)."""
    return dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def process_group_backend(device_type: str, environ: Mapping[str, str] = os.environ) -> str:
    """The torch.distributed backend of a run's processes: NCCL on GPUs, gloo on CPUs, or the
    staged backend a test or benchmark asks for (PROCESS_GROUP_ENV)."""
    asked = environ.get(PROCESS_GROUP_ENV)
    if not asked:
        return "nccl" if device_type == "cuda" else "gloo"
    from . import staged_gloo  # registers its backend

    if asked != staged_gloo.NAME:
        raise ValueError(f"{PROCESS_GROUP_ENV}={asked!r}: the only choice is {staged_gloo.NAME!r} (or unset)")
    return asked
