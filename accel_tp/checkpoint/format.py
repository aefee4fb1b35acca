"""A checkpoint on disk: every name in it, once, and the train state it carries.

One checkpoint is one folder, `step_NNNNNNNN` (`step_name`): under `<run>/checkpoints/` for an
`accelerate launch` run, under `<ray.storage_path>/<run.name>/` for a Ray run. Accelerate's
`save_state` writes it, with DeepSpeed writing the engine's part:

    step_00000500/
      accel_tp_config.yaml          RUN_CONFIG_FILE: the run's config (the export reads it)
      custom_checkpoint_0.pkl       TRAIN_STATE_FILE: TrainState (step, data position, identity)
      custom_checkpoint_1.pkl       SCHEDULER_FILE: the LR scheduler
      random_states_<rank>.pkl      rng_state_file(rank): Accelerate's RNG states, one per rank
      pytorch_model/                DS_TAG: DeepSpeed's checkpoint of the engine
        mp_rank_NN_model_states.pt      model_states_file(tp): module weights of TP rank NN
                                        (ZeRO-3: zero_pp_rank_D_mp_rank_NN_model_states.pt, per DP rank)
        [bf16_]zero_pp_rank_D_mp_rank_NN_optim_states.pt   optim_states_file(): ZeRO partitions

A save in progress is `.tmp-step_NNNNNNNN` (`tmp_name`, renamed when complete); a checkpoint's
universal (layout-free) conversion is cached beside it as `step_NNNNNNNN.universal`. Names that
Accelerate exports as constants are taken from it; DeepSpeed's and Ray's are spelled here (importing
them would load DeepSpeed, or a private Ray module, where only a name is needed) and
tests/test_checkpoint.py pins them to the installed libraries.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate.utils.constants import MODEL_NAME, RNG_STATE_NAME

from ..storage import exists, is_remote, join

__all__ = [
    "DS_TAG",
    "RUN_CONFIG_FILE",
    "TRAIN_STATE_FILE",
    "MANIFEST_FILE",
    "list_files",
    "write_manifest",
    "checkpoint_problem",
    "SCHEDULER_FILE",
    "TMP_PREFIX",
    "UNIVERSAL_SUFFIX",
    "UNIVERSAL_ZERO_DIR",
    "UNIVERSAL_LOG_FILE",
    "RAY_SNAPSHOT_FILE",
    "STEP_NAME_PATTERN",
    "step_name",
    "step_of",
    "tmp_name",
    "custom_state_file",
    "rng_state_file",
    "model_states_file",
    "optim_states_file",
    "TrainState",
    "register_for_checkpointing",
    "save_kwargs",
    "load_kwargs",
    "peek_train_state",
    "steps_under",
    "latest_checkpoint",
    "ray_registered",
]

# The DeepSpeed checkpoint tag (a sub-folder) Accelerate's save_state / load_state use for the model.
DS_TAG = MODEL_NAME
# The run's config (YAML), written into every checkpoint, so a checkpoint names its model and
# tokenizer (scripts/export_hf.py reads it).
RUN_CONFIG_FILE = "accel_tp_config.yaml"
# Every file of the checkpoint (all ranks') with its size, written last: a folder whose files do
# not match it is damaged or incomplete, and no library is handed it.
MANIFEST_FILE = "accel_tp_manifest.json"
# A folder being written; never listed as a checkpoint, replaced by the next save of its name.
TMP_PREFIX = ".tmp-"
# A step folder's universal conversion sits beside it under this suffix ("step_N.universal" is not
# a step name, so steps_under never lists it).
UNIVERSAL_SUFFIX = ".universal"
# Where DeepSpeed's converter puts the per-parameter states in its output (ds_to_universal.py).
UNIVERSAL_ZERO_DIR = "zero"
UNIVERSAL_LOG_FILE = "convert.log"  # the converter's own output, in the universal folder
# Ray Train's list of the checkpoints it registered, in a Ray run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

_STEP_PREFIX, _STEP_DIGITS = "step_", 8
STEP_NAME_PATTERN = _STEP_PREFIX + "N" * _STEP_DIGITS  # a step folder's name, as messages write it


def step_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (zero-padded: names sort by step)."""
    return f"{_STEP_PREFIX}{step:0{_STEP_DIGITS}d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint folder name stands for (None: not a complete checkpoint's name)."""
    tail = name[len(_STEP_PREFIX) :]
    return int(tail) if name.startswith(_STEP_PREFIX) and tail.isdigit() else None


def tmp_name(name: str) -> str:
    """The name `name` is written under until it is complete."""
    return f"{TMP_PREFIX}{name}"


def custom_state_file(index: int) -> str:
    """The file Accelerate's save_state writes the `index`-th registered object to
    (accelerate/checkpointing.py save_custom_state; Accelerate has no constant for it)."""
    return f"custom_checkpoint_{index}.pkl"


def rng_state_file(rank: int) -> str:
    return f"{RNG_STATE_NAME}_{rank}.pkl"


def _tp_part(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}"


def _dp_part(dp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}"


def model_states_file(tp_rank: int, dp_rank: int | None = None) -> str:
    """DeepSpeed's module file of TP rank `tp_rank` in the DS_TAG folder (engine._get_ckpt_name); under
    ZeRO-3 (`dp_rank` given) each DP rank writes its own."""
    name = f"{_tp_part(tp_rank)}_model_states.pt"
    return name if dp_rank is None else f"{_dp_part(dp_rank)}_{name}"


def optim_states_file(dp_rank: int, tp_rank: int, bf16: bool = False) -> str:
    """DeepSpeed's ZeRO optimizer partition of one DP x TP rank (engine._get_rank_zero_ckpt_name)."""
    return f"{'bf16_' if bf16 else ''}{_dp_part(dp_rank)}_{_tp_part(tp_rank)}_optim_states.pt"


# The objects registered with Accelerate, in order: save_state writes the i-th to
# custom_state_file(i), and load_state reads them back by position.
_REGISTERED = ("train_state", "scheduler")
TRAIN_STATE_FILE = custom_state_file(_REGISTERED.index("train_state"))
SCHEDULER_FILE = custom_state_file(_REGISTERED.index("scheduler"))


def register_for_checkpointing(accelerator: Any, state: TrainState, scheduler: Any) -> None:
    """Register the train state and the LR scheduler with Accelerate, in the order of _REGISTERED
    (which TRAIN_STATE_FILE is named after)."""
    objects = {"train_state": state, "scheduler": scheduler}
    accelerator.register_for_checkpointing(*(objects[k] for k in _REGISTERED))


@dataclass
class TrainState:
    """What the loop needs to continue at the exact step and batch; saved with every checkpoint."""

    step: int = 0
    # The data position: samples consumed since the start of the run, all DP ranks together
    # (step x global batch). In samples, not micro-batches, so a resume may split the same global
    # batch into other micro-batch / accumulation / DP sizes and continue at the same sample.
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens seen, all DP ranks together
    global_batch_size: int = 0  # sequences per optimizer step when saved; a resume must match
    model: str = ""  # fingerprint of the model's shape; a resume must match
    # "tp2xdp2" and the ZeRO stage (None: not recorded; 0 is ZeRO off): DeepSpeed's shards and
    # partitions follow them; a resume on another layout or stage is resharded through DeepSpeed's
    # universal checkpoint (except to or from stage 0: rules.check_resume).
    layout: str = ""
    data: str = ""  # fingerprint of the training data and its order (data_fingerprint); must match
    zero_stage: int | None = None
    # A LoRA run: digest of the frozen base weights (lora.base_digest), which the checkpoint does
    # not hold; set once the model is built, so only the load (not the precheck) compares it.
    base: str = ""

    # Only the position comes back from a checkpoint. The identity fields (global batch, model,
    # layout, data, ZeRO stage) stay what this run computed: check_resume has compared them, and a
    # resharded run's next checkpoint must name the layout it was saved on.
    POSITION = ("step", "samples", "tokens")

    def state_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "samples" not in state and "micro_batches" in state:
            # Checkpoints before the position was in samples: every step consumed one global batch.
            state["samples"] = state["step"] * state.get("global_batch_size", 0)
        for k in self.POSITION:
            if k in state:
                setattr(self, k, state[k])


def peek_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The TrainState saved in a checkpoint folder, read without loading the model (None if absent)."""
    import torch

    f = Path(path) / TRAIN_STATE_FILE
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def list_files(folder: str | os.PathLike) -> dict[str, int]:
    """{relative path: size} of every file under `folder` (what this rank wrote there)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def write_manifest(folder: str | os.PathLike, files: dict[str, int]) -> None:
    """Record `files` (every rank's, merged) as the checkpoint's contents; called once all are written."""
    import json

    files = {k: v for k, v in files.items() if k != MANIFEST_FILE}
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=0))


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with the checkpoint folder `folder`, in a few words naming the file (None: it
    is complete). With a manifest: every listed file present at its size. Without one (saved before
    manifests): the train state and every TP rank's model file that rank 0's file names."""
    import json

    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            return f"{MANIFEST_FILE} is unreadable ({e})"
        for rel, size in files.items():
            f = folder / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} is {f.stat().st_size} bytes, {size} when saved (truncated or replaced)"
        return None
    if not (folder / TRAIN_STATE_FILE).is_file():
        return f"{TRAIN_STATE_FILE} is missing"
    rank0 = folder / DS_TAG / model_states_file(0)
    if not rank0.is_file():
        rank0 = folder / DS_TAG / model_states_file(0, 0)
    if not rank0.is_file():
        return f"{DS_TAG}/{model_states_file(0)} is missing"
    import torch

    try:
        meta = torch.load(rank0, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, or not a DeepSpeed file
        return f"{rank0.relative_to(folder).as_posix()} is unreadable ({str(e).splitlines()[0] if str(e) else e})"
    tp = int(meta.get("mp_world_size") or 1)
    zero3 = rank0.name != model_states_file(0)
    dp = int(meta.get("dp_world_size") or 1) if zero3 else 1
    del meta
    for t in range(tp):
        for d in range(dp) if zero3 else [None]:
            name = model_states_file(t, d)
            if not (folder / DS_TAG / name).is_file():
                return f"{DS_TAG}/{name} is missing (saved with tp_size {tp})"
    return None


def steps_under(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete `step_N` checkpoints under `root` (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = ((step_of(p.name), p) for p in root.iterdir() if p.is_dir())
    return [(step, p) for step, p in found if step is not None]


def latest_checkpoint(root: str | os.PathLike, skipped: list[str] | None = None) -> Path | None:
    """The newest complete `step_N` folder under `root` (temporary folders are ignored; a damaged
    or incomplete one is skipped, and what is wrong with it appended to `skipped`)."""
    for _, path in sorted(steps_under(root), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append(f"{path.name}: {problem}")
    return None


def ray_registered(run_dir: str | os.PathLike) -> list[Path] | None:
    """The checkpoints Ray registered in a Ray run folder (a local path or an object-store URI),
    oldest first (None: not a Ray run folder). For a URI the paths are in-bucket paths.

    Ray registers a checkpoint only once every worker has reported it, so a step folder that is not
    listed is a save a crash cut short (or one Ray is still collecting).
    """
    if is_remote(run_dir):
        if not exists(join(str(run_dir), RAY_SNAPSHOT_FILE)):
            return None
    elif not (Path(run_dir) / RAY_SNAPSHOT_FILE).is_file():
        return None
    import logging

    import ray.train

    log = logging.getLogger("ray.train")
    level = log.level
    log.setLevel(logging.ERROR)  # from_path explains at length how a restore would resume
    try:
        result = ray.train.Result.from_path(str(run_dir))
    finally:
        log.setLevel(level)
    return sorted((Path(c.path) for c, _ in result.best_checkpoints), key=lambda c: c.name)


def _has_frozen(accelerator: Any) -> bool:
    from ..compat.accelerate import prepared_engines

    return any(not p.requires_grad for e in prepared_engines(accelerator) for p in e.module.parameters())


def save_kwargs(accelerator: Any) -> dict[str, Any]:
    """Accelerate's save_state arguments: frozen weights (a LoRA run's base) are not saved; a
    resume re-reads them from model.name_or_path, as the run began."""
    return {"exclude_frozen_parameters": True} if _has_frozen(accelerator) else {}


def load_kwargs(accelerator: Any) -> dict[str, Any]:
    """Accelerate's load_state arguments for a checkpoint `save_kwargs` wrote: without its frozen
    weights the module state is partial, so DeepSpeed must not require every key."""
    return {"load_module_strict": False} if _has_frozen(accelerator) else {}
