"""What may be resumed, and from where: pure functions of a checkpoint's train state, this run's, and
the run folder. Each refusal is a CheckpointError (a user error: one line, exit 2) raised before
anything is loaded or written.

A checkpoint of another model, data or global batch is refused. Another tp x dp layout or ZeRO stage
is accepted and resharded through DeepSpeed's universal checkpoint (`reshard_plan` says how; see
universal.py), except to or from ZeRO-0 and ZeRO-3 (`check_resume` says why).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..run_folder import CHECKPOINTS_DIR, METRICS_FILE
from .format import (
    TRAIN_STATE_FILE,
    TrainState,
    checkpoint_problem,
    latest_checkpoint,
    peek_train_state,
    step_of,
    steps_under,
)

__all__ = ["check_checkpoint", "check_resume", "reshard_plan", "check_run_folder", "local_resume_path"]


def check_checkpoint(path: str | os.PathLike, current: TrainState, where: str) -> dict[str, Any]:
    """Refuse the checkpoint folder `path` before anything loads it; returns its saved train state.

    Whose checkpoint it is comes first (check_resume: one small file, and the more telling answer),
    then whether it is complete (checkpoint_problem: every file the manifest lists, naming the one
    that is not), so that DeepSpeed never meets a damaged folder, whose own errors name no file.
    """
    try:
        saved = peek_train_state(path)
    except Exception as e:  # noqa: BLE001 - truncated, or refused by the weights-only unpickler
        saved, unreadable = (
            None,
            f"{TRAIN_STATE_FILE} is unreadable ({str(e).splitlines()[0] if str(e) else e})",
        )
    else:
        unreadable = None
    if saved is not None:
        check_resume(saved, current, where)
    problem = checkpoint_problem(path) or unreadable
    if problem is not None:
        raise CheckpointError(
            f"{where}: {str(path)!r} is damaged or incomplete: {problem}. Resume from another "
            "checkpoint (--resume latest takes the newest complete one)."
        )
    check_resume(saved, current, where)
    return saved  # type: ignore[return-value]  # check_resume refused None


def check_resume(saved: dict[str, Any] | None, current: TrainState, where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint of another model, data or global batch.

    Another tp x dp layout or ZeRO stage is accepted: the load reshards it (see reshard_plan).
    """
    if saved is None:
        raise CheckpointError(
            f"{where}: not an accel-tp checkpoint (no {TRAIN_STATE_FILE} with the train state)."
        )
    plan = reshard_plan(saved, current)
    s_ep, c_ep = _ep_of(saved.get("layout") or ""), _ep_of(current.layout)
    if (s_ep > 1) != (c_ep > 1):
        # Measured (DeepSpeed 0.19.8, tiny Mixtral): an AutoEP model's state has other modules
        # (router.gate, experts.w1/w2/w3 per EP rank, one file per expert) than the Hugging Face
        # one (gate, experts.gate_up_proj / down_proj): loading one into the other fails with
        # missing and unexpected keys, and the universal checkpoint keeps that module structure.
        raise CheckpointError(
            f"{where}: the checkpoint was saved with parallelism.ep_size {s_ep} and this run has {c_ep}: "
            "experts split by AutoEP and whole experts are different modules (DeepSpeed cannot load one "
            f"into the other). Resume with an ep_size {'> 1' if s_ep > 1 else 'of 1'} (another ep_size > 1 "
            "reshards), or start a new run from the checkpoint's export (checkpoint.export_hf, model.name_or_path)."
        )
    stages = (_stage(saved.get("zero_stage")), _stage(current.zero_stage))
    if plan and 0 in stages:
        # DeepSpeed 0.19.8. From ZeRO-0: its checkpoint keeps each TP rank's whole torch optimizer
        # state in the mp_rank model-state files and writes no ZeRO partition files, the only
        # optimizer files the converter reads (deepspeed/checkpoint/ds_to_universal.py
        # _get_optim_files: "can't find *_optim_states.pt files"). To ZeRO-0: a universal load
        # assumes a ZeRO optimizer; a ZeRO-0 engine skips the module weights under it
        # (runtime/engine.py _load_checkpoint, left to the ZeRO optimizer's universal loader), then
        # hands torch AdamW the mp_rank file's 'optimizer' entry, None in a ZeRO checkpoint
        # (AttributeError 'NoneType' object has no attribute 'copy'), and would call
        # optimizer.update_lp_params(), which torch AdamW lacks.
        raise CheckpointError(
            f"{where}: resharding {plan} is not supported: DeepSpeed's universal checkpoint neither "
            "reads a ZeRO-0 checkpoint (it has no *_optim_states.pt partition files; ds_to_universal.py "
            "_get_optim_files) nor loads into a ZeRO-0 engine (engine.py _load_checkpoint hands torch "
            "AdamW no state). Resume with the checkpoint's deepspeed.zero_stage and parallelism.tp_size "
            "(at ZeRO-0 dp_size may differ: every DP rank holds the whole state of its TP rank), or start "
            "a new run from its weights (checkpoint.export_hf, model.name_or_path)."
        )
    if plan and 3 in stages:
        # Resharding is tested for ZeRO-1/2 (DeepSpeed's ds_to_universal merges their optimizer
        # partitions); ZeRO-3 keeps the weights in its own partition files, which that path has not
        # been checked on: refuse rather than continue a different model.
        raise CheckpointError(
            f"{where}: resharding {plan} is not supported yet (to or from ZeRO-3); resume with the "
            "checkpoint's parallelism.tp_size / dp_size and deepspeed.zero_stage."
        )
    if saved.get("model") and current.model and saved["model"] != current.model:
        raise CheckpointError(
            f"{where}: checkpoint is of another model ({saved['model']}), this run builds {current.model}. "
            "Point the resume at a checkpoint of this model, or change model.* back."
        )
    if saved.get("data") and current.data and saved["data"] != current.data:
        raise CheckpointError(
            f"{where}: checkpoint was trained on other data or another data order (fingerprint "
            f"{saved['data']}, this run {current.data}: data.source / files / split / percentage / "
            "seq_length / packing / min_tokens, the tokenizer, run.seed or data.shuffle differ). Resume "
            "with the data settings it was trained with, or start a new run.name."
        )
    if saved.get("base") and current.base and saved["base"] != current.base:
        raise CheckpointError(
            f"{where}: checkpoint's adapters were trained on another base model (its frozen weights' "
            f"digest {saved['base']}, this run's {current.base}); the checkpoint holds only the adapters and "
            "the base is re-read from model.name_or_path. Point model.name_or_path at the base it was "
            "trained on."
        )
    gbs = saved.get("global_batch_size", 0)
    if gbs and gbs != current.global_batch_size:
        raise CheckpointError(
            f"{where}: checkpoint was trained with a global batch of {gbs} sequences, this run has "
            f"{current.global_batch_size} (micro_batch_size x grad_accum_steps x dp_size); the data "
            "position would not line up. Resume with the same batch settings."
        )


def _stage(value: Any) -> int | None:
    return None if value is None else int(value)


def _describe(layout: str, stage: int | None) -> str:
    return f"{layout or '?'} ZeRO-{stage}" if stage is not None else (layout or "?")


def _ep_of(layout: str) -> int:
    """The expert-parallel size a layout names ('tp1xdp4xep2' -> 2; none: 1)."""
    return int(layout.partition("xep")[2] or 1)


def _tp_of(layout: str) -> str:
    return layout.partition("xdp")[0]


def reshard_plan(saved: dict[str, Any], current: TrainState) -> str | None:
    """'tp2xdp2 ZeRO-1 -> tp1xdp4 ZeRO-2' when the checkpoint's layout or ZeRO stage differs from
    this run's (it must then be loaded as a universal checkpoint), None when it loads natively.
    A field either side did not record (old checkpoints: no zero_stage) counts as the same.
    ZeRO-0 on both sides with the same tp_size loads natively whatever the dp sizes: every DP rank
    holds the whole model and optimizer state of its TP rank, saved once per TP rank (the mp_rank
    model-state files), and DeepSpeed checks the saved DP size only for ZeRO partitions."""
    s_layout, c_layout = saved.get("layout") or "", current.layout
    s_stage, c_stage = _stage(saved.get("zero_stage")), _stage(current.zero_stage)
    layout_differs = bool(s_layout and c_layout and s_layout != c_layout)
    stage_differs = s_stage is not None and c_stage is not None and s_stage != c_stage
    if layout_differs and s_stage == 0 and c_stage == 0 and _tp_of(s_layout) == _tp_of(c_layout):
        layout_differs = False
    if not (layout_differs or stage_differs):
        return None
    return f"{_describe(s_layout, s_stage)} -> {_describe(c_layout, c_stage)}"


def local_resume_path(
    resume_from: str | None, root: str | os.PathLike, allow_external: bool, notes: list[str] | None = None
) -> Path | None:
    """The folder an `accelerate launch` run resumes from (None: a fresh start). `root`: the run's
    checkpoint folder; "latest" is its newest complete checkpoint (None if it has none; each newer
    damaged or incomplete one, and a latest that found nothing, is said in `notes`). Paths are
    resolved, symlinks included, before the trust check; check_checkpoint judges the folder itself."""
    if not resume_from:
        return None
    root = Path(root)
    if resume_from == "latest":
        skipped: list[str] = []
        path = latest_checkpoint(root, skipped)
        if notes is not None:
            notes += [f"--resume latest: skipping {s}" for s in skipped]
            if path is None:
                notes.append(
                    f"--resume latest: no complete checkpoint in {str(root)!r}; starting from step 0."
                )
        where = "--resume latest"
    else:
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume_from: no checkpoint folder {str(path)!r}.")
        where = "checkpoint.resume_from"
    if path is not None and not allow_external and not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(
            f"{where}: {str(path)!r} resolves to {str(path.resolve())!r}, outside this run's checkpoint "
            f"folder {str(root)!r}. A checkpoint from elsewhere may be another run's; if you trust it, set "
            "checkpoint.allow_external_resume: true."
        )
    return path


def check_run_folder(run_dir: str | os.PathLike, resume_from: str | None, run_name: str) -> None:
    """An `accelerate launch` run never writes over what an earlier run of the same name saved.

    A fresh start (no resume) is refused when the run folder already holds checkpoints or
    metrics; a resume from an older checkpoint than the run's newest is refused too, since
    continuing from it would overwrite (and prune) the newer ones.
    """
    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    steps = sorted(steps_under(checkpoints))
    metrics = run_dir / METRICS_FILE
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    if not resume_from and (steps or has_metrics):
        what = f"checkpoints up to {steps[-1][1].name}" if steps else METRICS_FILE
        raise CheckpointError(
            f"run.name: {run_name!r} already exists in {str(run_dir)!r} ({what}); a fresh run would "
            "overwrite it. Continue it with --resume latest (checkpoint.resume_from: latest), or pick "
            "a new run.name."
        )
    if resume_from and not steps and has_metrics:
        raise CheckpointError(
            f"checkpoint.resume_from: {run_name!r} in {str(run_dir)!r} has metrics but no checkpoint to "
            "resume from; pick a new run.name (or remove that folder)."
        )
    if resume_from and resume_from != "latest" and steps:
        path = Path(resume_from).resolve()
        at = step_of(path.name)
        newer = [p.name for s, p in steps if p.resolve() != path and s > (-1 if at is None else at)]
        if path.is_relative_to(checkpoints.resolve()) and newer:
            raise CheckpointError(
                f"checkpoint.resume_from: {path.name} is older than this run's newest checkpoints "
                f"({', '.join(newer[-3:])}), which continuing from it would overwrite. Resume with "
                "--resume latest, or start a new run.name from it (with checkpoint.allow_external_resume)."
            )
