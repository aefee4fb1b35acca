"""Loading a checkpoint, natively or resharded through DeepSpeed's universal checkpoint.

A checkpoint saved on another tp x dp layout or ZeRO stage is converted once with DeepSpeed's
universal checkpoint converter (deepspeed/checkpoint/ds_to_universal.py) into a cache folder beside
it (`step_N.universal`; the original is never modified) and loaded from there with the engine's
`load_universal_checkpoint` switched on for that one load. Every fp32 master weight and Adam moment
is then bit-identical after the load, and the continuation gives the losses of continuing on the
original layout to float rounding (tests/test_reshard.py). ZeRO-0 checkpoints hold each TP rank's
whole state, so they load natively at stage 0 with the same tp_size on any dp_size; resharding to or
from ZeRO-0 is refused (rules.check_resume says why; tests/test_zero_stage0.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..compat.accelerate import prepared_engines
from ..compat.deepspeed import universal_load
from .format import (
    DS_TAG,
    UNIVERSAL_LOG_FILE,
    UNIVERSAL_SUFFIX,
    TrainState,
    load_kwargs,
    tmp_name,
)
from .rules import check_checkpoint, reshard_plan
from .safe_load import verify_checkpoint, weights_only_loads

__all__ = ["universal_cache_for", "convert_to_universal", "load_checkpoint"]


def universal_cache_for(path: str | os.PathLike) -> Path:
    """Where the universal conversion of a local step folder is cached: beside it, `<name>.universal`."""
    path = Path(path)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def convert_to_universal(src: str | os.PathLike, dest: str | os.PathLike, private_tmp: bool = False) -> float:
    """Convert the accel-tp checkpoint `src` into a universal one at `dest` (seconds taken; 0 if
    `dest` already exists). Written under a temporary name and renamed when complete; `src` is only
    read. `dest` holds what Accelerate's load_state reads: the universal DS_TAG tree (per-parameter
    fp32 / exp_avg / exp_avg_sq / step, plus the model-state files) and copies of the checkpoint's
    top-level files (the registered objects, the RNG states, the run config). The converter's own
    output goes to UNIVERSAL_LOG_FILE in `dest`. `private_tmp`: several processes may convert into `dest` at
    once (node-local space shared by several raylets on one host); each then writes under its own
    temporary name and the first complete rename wins."""
    import argparse

    src, dest = Path(src), Path(dest)
    if dest.is_dir():
        return 0.0
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    # Otherwise one fixed name, so the next conversion replaces what an interrupted one left (beside
    # the checkpoints, where only the main process converts).
    tmp = dest.with_name(tmp_name(dest.name) + (f"-{os.getpid()}" if private_tmp else ""))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    args = argparse.Namespace(
        input_folder=str(src / DS_TAG),
        output_folder=str(tmp / DS_TAG),
        # In-process, one worker: the converter forks a pool for more, which a trainer process
        # (threads, process group) should not do.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with (
        open(tmp / UNIVERSAL_LOG_FILE, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        ds_to_universal.main(args)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process's identical conversion won
    return time.perf_counter() - t0


def load_checkpoint(
    accelerator: Any,
    state: TrainState,
    path: str,
    where: str,
    cache: Path | None = None,
    node_local: bool = False,
    trust_pickles: bool = False,
) -> None:
    """check_checkpoint, then load `path` natively, or resharded through the universal cache `cache`
    (default: beside `path`). `node_local`: the cache is in node-local temporary space (a remote
    Ray checkpoint), converted by each node's local main process and removed after the load.
    Every pickle of `path` (and of its universal conversion) is checked weights-only on every rank
    before anything loads it, and each load is forced weights-only (safe_load.py), unless
    `trust_pickles` (checkpoint.trust_pickles)."""
    saved = check_checkpoint(path, state, where)
    plan = reshard_plan(saved, state)
    guard = contextlib.nullcontext if trust_pickles else weights_only_loads
    if not trust_pickles:
        verify_checkpoint(path)  # every rank, before any collective: all fail alike, naming the file
    if plan is None:
        with guard():
            accelerator.load_state(path, **load_kwargs(accelerator))
        return
    cache = cache or universal_cache_for(path)
    converter = accelerator.is_local_main_process if node_local else accelerator.is_main_process
    error = None
    if converter:
        try:
            with guard():
                convert_to_universal(path, cache, private_tmp=node_local)
        except Exception as e:  # noqa: BLE001 - every rank must pass the barrier, then fail together
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise RuntimeError(f"{where}: converting {path} to a universal checkpoint failed: {error}") from error
    if not (cache / DS_TAG).is_dir():
        raise RuntimeError(
            f"{where}: the universal checkpoint {cache} is missing (its conversion failed on rank 0)."
        )
    if accelerator.is_main_process:
        print(
            f"[accel-tp] resharding checkpoint {Path(path).name}: {plan} "
            f"(DeepSpeed universal checkpoint, cached in {cache})",
            flush=True,
        )
    if not trust_pickles:
        verify_checkpoint(cache)  # written by us, but in a folder others may write to
    with guard(), universal_load(prepared_engines(accelerator)):
        accelerator.load_state(str(cache), **load_kwargs(accelerator))
    if node_local:
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(cache, ignore_errors=True)
