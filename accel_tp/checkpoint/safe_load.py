"""Loading a checkpoint never runs code: every pickle a load reads is unpickled weights-only.

`torch.load(..., weights_only=True)` rebuilds only tensors, plain containers and allow-listed
globals; a pickle whose `__reduce__` would run code fails to load instead. DeepSpeed and Accelerate
unpickle checkpoint files with `weights_only=False` themselves (DeepSpeed 0.19.8: every checkpoint
engine, e.g. runtime/checkpoint_engine/torch_checkpoint_engine.py:37, the ZeRO-3 and universal loads
in runtime/zero/stage3.py:3660, 3770 and checkpoint/universal_checkpoint.py:251, and every load of
the universal converter checkpoint/ds_to_universal.py; Accelerate 1.16: `load_custom_state`,
checkpointing.py:327, i.e. our TrainState and LR scheduler; its RNG-state load is weights-only but
drops any failure with an info-level "Could not load random states", checkpointing.py:283-305).
`safe_loading(folder)` makes a load of `folder` safe in two layers:

1. `verify_checkpoint`: before any library sees the folder, every pickle file in it is loaded
   weights-only with the allow-list below (memory-mapped: no tensor data is read). A file that does
   not load so is a CheckpointError naming it, on every rank alike (each rank checks every file, so
   all fail together, before any collective).
2. `weights_only_loads`: while the library loads, every `torch.load` of the process is forced to
   `weights_only=True` (torch's documented TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call, which
   overrides a call site's `weights_only=False`), with the allow-list in force. A file replaced after
   the check can then only fail to load, never run code: the check gives the named error, this
   layer the guarantee.

`trust_pickles=True` (the user's opt-in for a checkpoint they trust whose files need other globals)
skips both. Every global of accel-tp's own checkpoints is in the allow-list (tests/test_safe_load.py).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "TRUST_PICKLES_FIELD",
    "allowed_globals",
    "pickle_files",
    "verify_checkpoint",
    "weights_only_loads",
    "safe_loading",
]

# The config field by which a user opts in to unpickling a checkpoint's other globals (named in
# the refusal).
TRUST_PICKLES_FIELD = "checkpoint.trust_pickles"

# torch.load's switches (torch/serialization.py load; docs: "Miscellaneous Environment Variables").
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both set; cleared for the scope

# Files torch.load may be handed by DeepSpeed and Accelerate (*.pt shards, *.pkl registered objects
# and RNG states, *.bin Accelerate's non-DeepSpeed states); any other file starting like a torch
# archive (zip) or a pickle (protocol >= 2) is checked too.
_PICKLE_SUFFIXES = (".pt", ".pkl", ".bin", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


@functools.cache
def allowed_globals() -> tuple[Any, ...]:
    """The globals, beyond torch's own weights-only set, that accel-tp's checkpoints hold (each with
    its reason). Names are the classes' own, as pickled by the installed DeepSpeed (checked on
    0.19.8) and numpy (1.x and 2.x names both)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    allowed: list[Any] = [
        # ZeRO optimizer partitions (stage_1_and_2.py / stage3.py state_dict) and the universal
        # optimizer_state.pt: the loss scaler object (LossScaler: fp32 / bf16; DynamicLossScaler:
        # fp16 with dynamic scaling, GPU), the ZeRO stage as an int Enum, and (stages 1-2) the
        # per-parameter slice mapping, a dataclass of two ints. Plain classes: rebuilt from their
        # attribute dict, no __setstate__ / __reduce__ of their own.
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
        # Accelerate's random_states_<rank>.pkl: numpy's MT19937 state is a uint32 ndarray, pickled
        # as _reconstruct(ndarray, shape, dtype) + ndarray.__setstate__, its dtype as np.dtype("u4")
        # + the dtype's __setstate__ (which the weights-only unpickler allows only on an allow-listed
        # type: the uint32 dtype's own class, numpy.dtypes.UInt32DType in numpy 2). Arrays of objects
        # stay refused (their dtype class is not listed). _reconstruct under both module names: numpy
        # 2 pickles numpy._core, numpy 1 numpy.core (Accelerate's own list names only the installed
        # one, and then drops the RNG state of a checkpoint written under the other).
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    return tuple(allowed)


def _starts_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def pickle_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under `folder` a library may unpickle: by name, or by its first bytes."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in _PICKLE_SUFFIXES or _starts_like_pickle(p))
    )


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return text.split(". ")[0].rstrip(".")[:200]


def _refusal(path: Path, error: BaseException) -> CheckpointError:
    """The one-line error for a file that did not load: refused (not weights-only) or damaged."""
    message = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in message:
        found = re.search(r"GLOBAL (\S+)", message)
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", message, re.S)
        if found:
            what = f"it needs the global {found.group(1).rstrip('.')}, which is not allow-listed"
        else:
            what = _first_sentence(detail.group(1) if detail else message)
        return CheckpointError(
            f"{path}: refused: this file does not load weights-only ({what}); unpickling it could run "
            f"code. If you wrote this checkpoint and trust every file in it, set {TRUST_PICKLES_FIELD}: "
            "true; otherwise do not load it."
        )
    what = f"{type(error).__name__}: {_first_sentence(message)}" if message.strip() else type(error).__name__
    return CheckpointError(
        f"{path}: cannot be read ({what}); the file is damaged or incomplete. Resume from another checkpoint."
    )


def verify_checkpoint(folder: str | os.PathLike) -> int:
    """Load every pickle file under `folder` weights-only (tensor data memory-mapped, not read);
    the first that does not load is a CheckpointError naming it. Returns the number checked."""
    import torch

    files = pickle_files(folder)
    with weights_only_loads():
        for path in files:
            try:
                with open(path, "rb") as f:
                    zipped = f.read(4).startswith(_ZIP_MAGIC)
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
            except Exception as e:  # noqa: BLE001 - every failure names the file
                raise _refusal(path, e) from e
    return len(files)


# The forcing and the allow-list are process-wide (torch reads one environment variable and keeps one
# allow-list): nested or concurrent scopes share them, the last to leave restores both.
_lock = threading.Lock()
_depth = 0
_saved_env: dict[str, str | None] = {}
_scope: Any = None


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every torch.load of this process unpickles weights-only (even where the
    call site passes weights_only=False), with `allowed_globals()` allowed."""
    global _depth, _scope
    import torch

    with _lock:
        if _depth == 0:
            _saved_env.clear()
            _saved_env.update({k: os.environ.get(k) for k in (_FORCE_ENV, _NO_FORCE_ENV)})
            os.environ[_FORCE_ENV] = "1"
            os.environ.pop(_NO_FORCE_ENV, None)
            _scope = torch.serialization.safe_globals(list(allowed_globals()))
            _scope.__enter__()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _scope.__exit__(None, None, None)
                _scope = None
                for k, v in _saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


@contextmanager
def safe_loading(folder: str | os.PathLike, trust_pickles: bool = False) -> Iterator[None]:
    """Wrap a library's load of the checkpoint `folder` (Accelerate's load_state, DeepSpeed's
    load_checkpoint, the universal converter): verify_checkpoint, then weights_only_loads for the
    block. `trust_pickles`: the user trusts this checkpoint; the libraries unpickle it as they do."""
    if trust_pickles:
        yield
        return
    verify_checkpoint(folder)
    with weights_only_loads():
        yield
