"""Checkpointing behind one small object: `save(step)` and `load() -> step`.

Both variants wrap `accelerator.save_state` / `load_state`, i.e. DeepSpeed's native checkpoint
(TP model shards, ZeRO optimizer partitions) plus the scheduler, RNG states and the registered
`TrainState` (step and data position). Ray runs hand the folder to Ray Train
(`ray.train.report(checkpoint=...)`), which persists it to the run's storage; `accelerate launch`
runs keep numbered folders under the run's output directory. Given the run's config, both also
write it into each checkpoint (`accel_tp_config.yaml`), so the checkpoint names its model and
tokenizer (scripts/export_hf.py reads it).

A checkpoint saved on another tp x dp layout or ZeRO stage is resharded: converted once with
DeepSpeed's universal checkpoint converter (deepspeed/checkpoint/ds_to_universal.py) into a cache
folder beside it (`step_N.universal`; the original is never modified) and loaded from there with the
engine's `load_universal_checkpoint` switched on for that one load. Measured with DeepSpeed 0.19.8
(tp2xdp2 ZeRO-1 -> tp1xdp4, tp4xdp1, tp2xdp1, tp1xdp1, tp2xdp2 ZeRO-2): every fp32 master weight and
Adam moment is bit-identical after the load, and the continuation gives the losses of continuing
on the original layout to float rounding (tests/test_reshard.py). ZeRO-0 checkpoints hold each TP
rank's whole state, so they load natively at stage 0 with the same tp_size on any dp_size; resharding
to or from ZeRO-0 is refused (check_resume says why; tests/test_zero_stage0.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError

__all__ = [
    "TrainState",
    "Checkpointer",
    "LocalCheckpointer",
    "RayCheckpointer",
    "latest_checkpoint",
    "peek_train_state",
    "check_resume",
    "reshard_plan",
    "universal_cache_for",
    "convert_to_universal",
    "check_run_folder",
    "write_run_config",
    "RUN_CONFIG_FILE",
    "HOOK_ENV",
    "load_save_hook",
]

_PREFIX = "step_"
# The run's config (YAML), written into every checkpoint when the checkpointer is given it, so a
# checkpoint says which model and tokenizer it belongs to (scripts/export_hf.py reads it).
RUN_CONFIG_FILE = "accel_tp_config.yaml"
# A step folder's universal (layout-free) conversion sits beside it under this suffix; steps_under
# never lists it ("00000008.universal" is not all digits).
UNIVERSAL_SUFFIX = ".universal"
# The DeepSpeed checkpoint tag Accelerate's save_state / load_state use for the (first) model.
_DS_TAG = "pytorch_model"


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
    # universal checkpoint (except to or from stage 0: check_resume).
    layout: str = ""
    data: str = ""  # fingerprint of the training data and its order (data_fingerprint); must match
    zero_stage: int | None = None

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


class Checkpointer(Protocol):
    def save(self, step: int, metrics: dict[str, Any]) -> str | None: ...

    def load(self) -> int: ...

    def precheck(self) -> None: ...


def steps_under(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete `step_N` checkpoints under `root` (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        (int(p.name[len(_PREFIX) :]), p)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()
    ]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete `step_N` folder under `root` (temporary folders are ignored)."""
    steps = steps_under(root)
    return max(steps)[1] if steps else None


_STATE_FILE = "custom_checkpoint_0.pkl"


def peek_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The TrainState saved in a checkpoint folder, read without loading the model (None if absent).

    `save_state` writes registered objects in order; TrainState is registered first.
    """
    import torch

    f = Path(path) / _STATE_FILE
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def check_resume(saved: dict[str, Any] | None, current: TrainState, where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint of another model, data or global batch.

    Another tp x dp layout or ZeRO stage is accepted: `load` reshards it (see reshard_plan).
    """
    if saved is None:
        raise ValueError(
            f"{where}: not an accel-tp checkpoint (no custom_checkpoint_0.pkl with the train state)."
        )
    plan = reshard_plan(saved, current)
    stages = (_stage(saved.get("zero_stage")), _stage(current.zero_stage))
    if plan and 0 in stages:
        # Measured with DeepSpeed 0.19.8. From ZeRO-0: its checkpoint keeps each TP rank's whole torch
        # optimizer state in pytorch_model/mp_rank_NN_model_states.pt and writes no ZeRO partition
        # files, the only optimizer files the converter reads (deepspeed/checkpoint/ds_to_universal.py
        # _get_optim_files, line 1026: "can't find *_optim_states.pt files"). To ZeRO-0: a universal
        # load assumes a ZeRO optimizer; a ZeRO-0 engine skips the module weights under it
        # (runtime/engine.py:4660, left to the ZeRO optimizer's universal loader), then hands torch
        # AdamW the mp_rank file's 'optimizer' entry, None in a ZeRO checkpoint (engine.py:4699:
        # AttributeError 'NoneType' object has no attribute 'copy'), and would call
        # optimizer.update_lp_params() (engine.py:4488), which torch AdamW lacks.
        raise ValueError(
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
        raise ValueError(
            f"{where}: resharding {plan} is not supported yet (to or from ZeRO-3); resume with the "
            "checkpoint's parallelism.tp_size / dp_size and deepspeed.zero_stage."
        )
    if saved.get("model") and current.model and saved["model"] != current.model:
        raise ValueError(
            f"{where}: checkpoint is of another model ({saved['model']}), this run builds {current.model}. "
            "Point the resume at a checkpoint of this model, or change model.* back."
        )
    if saved.get("data") and current.data and saved["data"] != current.data:
        raise ValueError(
            f"{where}: checkpoint was trained on other data or another data order (fingerprint "
            f"{saved['data']}, this run {current.data}: data.source / files / split / percentage / "
            "seq_length / packing / min_tokens, the tokenizer, run.seed or data.shuffle differ). Resume "
            "with the data settings it was trained with, or start a new run.name."
        )
    gbs = saved.get("global_batch_size", 0)
    if gbs and gbs != current.global_batch_size:
        raise ValueError(
            f"{where}: checkpoint was trained with a global batch of {gbs} sequences, this run has "
            f"{current.global_batch_size} (micro_batch_size x grad_accum_steps x dp_size); the data "
            "position would not line up. Resume with the same batch settings."
        )


def _stage(value: Any) -> int | None:
    return None if value is None else int(value)


def _describe(layout: str, stage: int | None) -> str:
    return f"{layout or '?'} ZeRO-{stage}" if stage is not None else (layout or "?")


def _tp_of(layout: str) -> str:
    return layout.partition("xdp")[0]


def reshard_plan(saved: dict[str, Any], current: TrainState) -> str | None:
    """'tp2xdp2 ZeRO-1 -> tp1xdp4 ZeRO-2' when the checkpoint's layout or ZeRO stage differs from
    this run's (it must then be loaded as a universal checkpoint), None when it loads natively.
    A field either side did not record (old checkpoints: no zero_stage) counts as the same.
    ZeRO-0 on both sides with the same tp_size loads natively whatever the dp sizes: every DP rank
    holds the whole model and optimizer state of its TP rank, saved once per TP rank
    (mp_rank_NN_model_states.pt), and DeepSpeed checks the saved DP size only for ZeRO partitions."""
    s_layout, c_layout = saved.get("layout") or "", current.layout
    s_stage, c_stage = _stage(saved.get("zero_stage")), _stage(current.zero_stage)
    layout_differs = bool(s_layout and c_layout and s_layout != c_layout)
    stage_differs = s_stage is not None and c_stage is not None and s_stage != c_stage
    if layout_differs and s_stage == 0 and c_stage == 0 and _tp_of(s_layout) == _tp_of(c_layout):
        layout_differs = False
    if not (layout_differs or stage_differs):
        return None
    return f"{_describe(s_layout, s_stage)} -> {_describe(c_layout, c_stage)}"


def _zero_stage_of(accelerator: Any) -> int | None:
    """The ZeRO stage of the accelerator's DeepSpeed plugin (None when it has none, e.g. a stand-in)."""
    try:
        plugin = accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return None


def _fill_zero_stage(state: TrainState, accelerator: Any) -> None:
    # trainer.setup records it; until then (or for callers that do not) take it from the plugin.
    if state.zero_stage is None:
        state.zero_stage = _zero_stage_of(accelerator)


def universal_cache_for(path: str | os.PathLike) -> Path:
    """Where the universal conversion of a local step folder is cached: beside it, `<name>.universal`."""
    path = Path(path)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def convert_to_universal(src: str | os.PathLike, dest: str | os.PathLike, private_tmp: bool = False) -> float:
    """Convert the accel-tp checkpoint `src` into a universal one at `dest` (seconds taken; 0 if
    `dest` already exists). Written under a temporary name and renamed when complete; `src` is only
    read. `dest` holds what Accelerate's load_state reads: the universal `pytorch_model/` tree
    (per-parameter fp32 / exp_avg / exp_avg_sq / step, plus the mp_rank model-state files) and
    copies of the checkpoint's top-level files (custom_checkpoint_*.pkl, random_states_*.pkl, the
    run config). The converter's own output goes to `<dest>/convert.log`. `private_tmp`: several
    processes may convert into `dest` at once (node-local space shared by several raylets on one
    host); each then writes under its own temporary name and the first complete rename wins."""
    import argparse

    src, dest = Path(src), Path(dest)
    if dest.is_dir():
        return 0.0
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    # Otherwise one fixed name, so the next conversion replaces what an interrupted one left (beside
    # the checkpoints, where only the main process converts).
    tmp = dest.with_name(f".tmp-{dest.name}" + (f"-{os.getpid()}" if private_tmp else ""))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    args = argparse.Namespace(
        input_folder=str(src / _DS_TAG),
        output_folder=str(tmp / _DS_TAG),
        # In-process, one worker: the converter forks a pool for more, which a trainer process
        # (threads, process group) should not do; 125M converts in ~13 s either way.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with (
        open(tmp / "convert.log", "w") as log,
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


@contextlib.contextmanager
def _universal_load(accelerator: Any):
    """Switch the DeepSpeed engines' `load_universal_checkpoint` on for one load, then off again
    (the engine reads it in load_checkpoint and in later loads)."""
    configs = [m._config for m in getattr(accelerator, "_models", []) if hasattr(m, "_config")]
    if not configs:
        raise RuntimeError("resharding a checkpoint needs the DeepSpeed engine (accelerator.prepare) first.")
    before = [c.load_universal_checkpoint for c in configs]
    for c in configs:
        c.load_universal_checkpoint = True
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c.load_universal_checkpoint = b


def _load(
    accelerator: Any, state: TrainState, path: str, where: str, cache: Path | None, node_local: bool
) -> None:
    """check_resume, then load `path` natively, or resharded through the universal cache `cache`
    (default: beside `path`). `node_local`: the cache is in node-local temporary space (a remote
    Ray checkpoint), converted by each node's local main process and removed after the load."""
    saved = peek_train_state(path)
    check_resume(saved, state, where)
    plan = reshard_plan(saved, state)
    if plan is None:
        accelerator.load_state(path)
        return
    cache = cache or universal_cache_for(path)
    converter = accelerator.is_local_main_process if node_local else accelerator.is_main_process
    error = None
    if converter:
        try:
            convert_to_universal(path, cache, private_tmp=node_local)
        except Exception as e:  # noqa: BLE001 - every rank must pass the barrier, then fail together
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise RuntimeError(f"{where}: converting {path} to a universal checkpoint failed: {error}") from error
    if not (cache / _DS_TAG).is_dir():
        raise RuntimeError(
            f"{where}: the universal checkpoint {cache} is missing (its conversion failed on rank 0)."
        )
    if accelerator.is_main_process:
        print(
            f"[accel-tp] resharding checkpoint {Path(path).name}: {plan} "
            f"(DeepSpeed universal checkpoint, cached in {cache})",
            flush=True,
        )
    with _universal_load(accelerator):
        accelerator.load_state(str(cache))
    if node_local:
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(cache, ignore_errors=True)


def check_run_folder(run_dir: str | os.PathLike, resume_from: str | None, run_name: str) -> None:
    """An `accelerate launch` run never writes over what an earlier run of the same name saved.

    A fresh start (no resume) is refused when the run folder already holds checkpoints or
    metrics; a resume from an older checkpoint than the run's newest is refused too, since
    continuing from it would overwrite (and prune) the newer ones.
    """
    run_dir = Path(run_dir)
    steps = sorted(steps_under(run_dir / "checkpoints"))
    metrics = run_dir / "metrics.jsonl"
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    if not resume_from and (steps or has_metrics):
        what = f"checkpoints up to {steps[-1][1].name}" if steps else "metrics.jsonl"
        raise ConfigError(
            f"run.name: {run_name!r} already exists in {str(run_dir)!r} ({what}); a fresh run would "
            "overwrite it. Continue it with --resume latest (checkpoint.resume_from: latest), or pick "
            "a new run.name."
        )
    if resume_from and not steps and has_metrics:
        raise ConfigError(
            f"checkpoint.resume_from: {run_name!r} in {str(run_dir)!r} has metrics but no checkpoint to "
            "resume from; pick a new run.name (or remove that folder)."
        )
    if resume_from and resume_from != "latest" and steps:
        path = Path(resume_from).resolve()
        newer = [p.name for s, p in steps if p.resolve() != path and s > _step_of(path)]
        if path.is_relative_to((run_dir / "checkpoints").resolve()) and newer:
            raise ConfigError(
                f"checkpoint.resume_from: {path.name} is older than this run's newest checkpoints "
                f"({', '.join(newer[-3:])}), which continuing from it would overwrite. Resume with "
                "--resume latest, or start a new run.name from it (with checkpoint.allow_external_resume)."
            )


def _step_of(path: Path) -> int:
    tail = path.name[len(_PREFIX) :]
    return int(tail) if path.name.startswith(_PREFIX) and tail.isdigit() else -1


def write_run_config(folder: str | os.PathLike, run_config: dict[str, Any] | None) -> None:
    """Record the run's config in a checkpoint folder (YAML: reading it back unpickles nothing)."""
    if run_config is None:
        return
    import yaml

    (Path(folder) / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))


# The fault-injection seam (used by the tests; also a site hook): ACCEL_TP_CHECKPOINT_HOOK names an
# importable "module:function", called on every rank as function(point, step, rank, folder) at the
# named points of a save. Points: "written" (this rank's files are in `folder`, not yet committed
# or reported). Unset: no hook.
HOOK_ENV = "ACCEL_TP_CHECKPOINT_HOOK"


def load_save_hook(spec: str | None = None) -> Callable[[str, int, int, str], None] | None:
    """The save hook named by `spec` (default: $ACCEL_TP_CHECKPOINT_HOOK), or None."""
    spec = spec if spec is not None else os.environ.get(HOOK_ENV)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{HOOK_ENV}: expected 'module:function', got {spec!r}.")
    return getattr(importlib.import_module(module), name)


class LocalCheckpointer:
    """`accelerate launch` runs: folders `<root>/step_N`, written under a temporary name first."""

    def __init__(
        self,
        accelerator: Any,
        state: TrainState,
        root: str | os.PathLike,
        resume_from: str | None,
        keep_last: int | None = None,
        allow_external: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.state = state
        self.root = Path(root)
        self.resume_from = resume_from
        self.keep_last = keep_last
        self.allow_external = allow_external
        self.run_config = run_config
        self.hook = load_save_hook()

    def save(self, step: int, metrics: dict[str, Any]) -> str:
        acc = self.accelerator
        _fill_zero_stage(self.state, acc)
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_PREFIX}{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_run_config(tmp, self.run_config)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.hook is not None:
            self.hook("written", step, acc.process_index, str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            # A crash before this rename leaves only a .tmp- folder, which load() never picks.
            if final.exists():
                shutil.rmtree(final)
            # A conversion of an earlier folder of this name would no longer match it.
            shutil.rmtree(universal_cache_for(final), ignore_errors=True)
            os.replace(tmp, final)
            if self.keep_last:
                for old in sorted(steps_under(self.root))[: -self.keep_last]:
                    shutil.rmtree(old[1], ignore_errors=True)
                    shutil.rmtree(universal_cache_for(old[1]), ignore_errors=True)
        acc.wait_for_everyone()
        return str(final)

    def _resume_path(self) -> Path | None:
        if not self.resume_from:
            return None
        if self.resume_from == "latest":
            return latest_checkpoint(self.root)
        path = Path(self.resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume_from: no checkpoint folder {str(path)!r}.")
        if not self.allow_external and not path.resolve().is_relative_to(self.root.resolve()):
            # torch.load unpickles: a checkpoint can run code. Only this run's own are trusted.
            raise PermissionError(
                f"checkpoint.resume_from: {str(path)!r} is outside this run's checkpoint folder "
                f"{str(self.root)!r}. Loading a checkpoint unpickles it (it can run code); if you trust it, "
                "set checkpoint.allow_external_resume: true."
            )
        return path

    def precheck(self) -> None:
        """Refuse an incompatible checkpoint before the model is even built."""
        _fill_zero_stage(self.state, self.accelerator)
        path = self._resume_path()
        if path is not None:
            check_resume(peek_train_state(path), self.state, "checkpoint.resume_from")

    def load(self) -> int:
        _fill_zero_stage(self.state, self.accelerator)
        path = self._resume_path()
        if path is None:
            return 0
        _load(self.accelerator, self.state, str(path), "checkpoint.resume_from", None, node_local=False)
        return self.state.step


class RayCheckpointer:
    """Ray runs: save into a local temp folder and report it; resume from Ray's latest checkpoint."""

    def __init__(self, accelerator: Any, state: TrainState, run_config: dict[str, Any] | None = None) -> None:
        self.accelerator = accelerator
        self.state = state
        self.run_config = run_config
        self.hook = load_save_hook()

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="accel-tp-ckpt-") as tmp:
            if self.accelerator.is_main_process:
                write_run_config(tmp, self.run_config)  # one copy; Ray merges the workers' files
            self.accelerator.save_state(tmp)
            if self.hook is not None:
                self.hook("written", step, self.accelerator.process_index, tmp)
            self.accelerator.wait_for_everyone()
            # Every worker reports its own files (its DeepSpeed shards); Ray merges them into one
            # checkpoint folder and only registers it once all workers have uploaded.
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"{_PREFIX}{step:08d}",
            )
        return None

    def precheck(self) -> None:
        import ray.train

        _fill_zero_stage(self.state, self.accelerator)
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            # Only the small train-state file, read where it is stored: no download of the rest.
            check_resume(_peek_ray_train_state(ckpt), self.state, "ray checkpoint")

    def load(self) -> int:
        import ray.train

        _fill_zero_stage(self.state, self.accelerator)
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        if _is_local(ckpt):
            # The storage folder itself: a resharding conversion is cached beside it like a local
            # checkpoint's.
            _load(self.accelerator, self.state, ckpt.path, "ray checkpoint", None, node_local=False)
            return self.state.step
        # Remote storage: one download per node, shared by its workers; a resharding conversion
        # goes to node-local temporary space too. Both are named after the checkpoint's storage
        # path, which only this run reads (it resumes from its own checkpoints only), and removed
        # once every worker has loaded.
        key = hashlib.sha256(str(ckpt.path).encode()).hexdigest()[:16]
        # Under the checkpoint's own name (step_N), which the resharding line prints.
        folder = Path(tempfile.gettempdir()) / f"accel-tp-download-{key}" / Path(ckpt.path).name
        cache = Path(tempfile.gettempdir()) / f"accel-tp-universal-{key}"
        acc = self.accelerator
        error = None
        if acc.is_local_main_process:
            try:
                _download_once(ckpt, folder)
            except Exception as e:  # noqa: BLE001 - every rank must pass the barrier, then fail together
                error = e
        acc.wait_for_everyone()
        if error is not None:
            raise RuntimeError(f"ray checkpoint: downloading {ckpt.path} failed: {error}") from error
        if not folder.is_dir():
            raise RuntimeError(
                f"ray checkpoint: this node's download of {ckpt.path} failed (see its local rank 0)."
            )
        # No barrier on failure (another rank may be in a collective): the complete download is then
        # left for a retry of the same checkpoint, which reuses it and removes it after its load.
        _load(acc, self.state, str(folder), "ray checkpoint", cache, node_local=True)
        acc.wait_for_everyone()
        if acc.is_local_main_process:
            shutil.rmtree(folder.parent, ignore_errors=True)
        return self.state.step


def _is_local(ckpt: Any) -> bool:
    import pyarrow.fs

    return isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem)


def _peek_ray_train_state(ckpt: Any) -> dict[str, Any] | None:
    """peek_train_state for a Ray checkpoint, local or remote, without downloading the checkpoint."""
    import io

    import pyarrow.fs
    import torch

    if _is_local(ckpt):
        return peek_train_state(ckpt.path)
    path = f"{ckpt.path.rstrip('/')}/{_STATE_FILE}"
    if ckpt.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with ckpt.filesystem.open_input_file(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _download_once(ckpt: Any, folder: Path) -> None:
    """Download `ckpt` into `folder` unless it is there already: into a private temporary folder,
    renamed when complete, so no reader ever sees a partial file. Not Checkpoint.as_directory: its
    shared folder is downloaded again, in place, by a later worker of the node while an earlier one
    reads it (ray/train/_checkpoint.py to_directory: the lock only covers a download in flight), which
    loaded a truncated custom_checkpoint_0.pkl ("EOFError: Ran out of input") in CI."""
    if folder.is_dir():
        return  # complete: only ever created by the rename below; checkpoints are immutable
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        ckpt.to_directory(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process (sharing this /tmp) renamed its copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
