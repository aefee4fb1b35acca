"""What the measuring tools share: the overrides that make a run a timing run."""

from __future__ import annotations

from pathlib import Path

__all__ = ["measurement_overrides"]


def measurement_overrides(output_dir: Path, max_steps: int) -> list[str]:
    """Settings for timing a run's steps: no logging, evaluation, checkpoints or LR warm-up."""
    return [
        f"run.output_dir={output_dir}",
        "train.log_with=[]",
        "train.progress_bar=false",
        "train.eval_every=0",
        "data.eval_fraction=0",
        "data.eval_split=null",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "checkpoint.export_hf=false",
        "checkpoint.resume_from=null",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=0",
    ]
