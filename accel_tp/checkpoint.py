"""Checkpointing behind one small object: `save(step)` and `load() -> step`.

Both variants wrap `accelerator.save_state` / `load_state`, i.e. DeepSpeed's native checkpoint
(TP model shards, ZeRO optimizer partitions) plus the scheduler, RNG states and the registered
`TrainState` (step and data position). Ray runs hand the folder to Ray Train
(`ray.train.report(checkpoint=...)`), which persists it to the run's storage; `accelerate launch`
runs keep numbered folders under the run's output directory. Given the run's config, both also
write it into each checkpoint (`accel_tp_config.yaml`), so the checkpoint names its model and
tokenizer (scripts/export_hf.py reads it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    layout: str = ""  # "tp2xdp2": DeepSpeed's shards and partitions follow it; a resume must match
    data: str = ""  # fingerprint of the training data and its order (data_fingerprint); must match

    def state_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "samples" not in state and "micro_batches" in state:
            # Checkpoints before the position was in samples: every step consumed one global batch.
            state["samples"] = state["step"] * state.get("global_batch_size", 0)
        for k, v in state.items():
            if k in self.__dataclass_fields__:
                setattr(self, k, v)


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


def peek_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The TrainState saved in a checkpoint folder, read without loading the model (None if absent).

    `save_state` writes registered objects in order; TrainState is registered first.
    """
    import torch

    f = Path(path) / "custom_checkpoint_0.pkl"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def check_resume(saved: dict[str, Any] | None, current: TrainState, where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint of another model or another global batch."""
    if saved is None:
        raise ValueError(
            f"{where}: not an accel-tp checkpoint (no custom_checkpoint_0.pkl with the train state)."
        )
    if saved.get("model") and current.model and saved["model"] != current.model:
        raise ValueError(
            f"{where}: checkpoint is of another model ({saved['model']}), this run builds {current.model}. "
            "Point the resume at a checkpoint of this model, or change model.* back."
        )
    if saved.get("layout") and current.layout and saved["layout"] != current.layout:
        # DeepSpeed's universal checkpoint converts between layouts, but in our test (tp2xdp2 ->
        # tp1xdp4 / tp4xdp1, DeepSpeed 0.19.8) the continuation did not match continuing on the
        # original layout (3% loss difference within 10 steps), so it is refused, not loaded wrong.
        raise ValueError(
            f"{where}: checkpoint was saved on layout {saved['layout']}, this run is {current.layout}. "
            "Resuming on another tp x dp layout is not supported; resume with the original "
            "parallelism.tp_size and dp_size."
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
            os.replace(tmp, final)
            if self.keep_last:
                for old in sorted(steps_under(self.root))[: -self.keep_last]:
                    shutil.rmtree(old[1], ignore_errors=True)
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
        path = self._resume_path()
        if path is not None:
            check_resume(peek_train_state(path), self.state, "checkpoint.resume_from")

    def load(self) -> int:
        path = self._resume_path()
        if path is None:
            return 0
        check_resume(peek_train_state(path), self.state, "checkpoint.resume_from")
        self.accelerator.load_state(str(path))
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

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as path:
                check_resume(peek_train_state(path), self.state, "ray checkpoint")

    def load(self) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as path:
            check_resume(peek_train_state(path), self.state, "ray checkpoint")
            self.accelerator.load_state(path)
        return self.state.step
