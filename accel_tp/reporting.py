"""What a run tells the world about itself, decided and written in one place.

The `Reporter` builds each step's metrics, decides which steps are logged (`train.log_every`, the
last step, a step with an evaluation, a step that saves), and writes a logged step to every sink:
the run's metrics.jsonl (rank 0), the progress bar (rank 0, every step), Accelerate's trackers
(every step), the run folder's mirror, and, under Ray Train, `ray.train.report` on every rank.
Ray registers a checkpoint through a report, so a save step's report carries its checkpoint
(`checkpoint_saved`): one report per logged step. A save step's row is written before the save
(`log(..., saving=True)`) and mirrored before the checkpoint is published, so a resume from it finds
that row, and a save that hangs or is killed loses none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WrittenCheckpoint
from .metrics import mfu, plot_losses, summary_line
from .run_folder import RunFolder

__all__ = ["MetricsFile", "Reporter", "RayReporter"]


class MetricsFile:
    """metrics.jsonl of a run: one JSON object per logged step, written by rank 0 only."""

    def __init__(self, path: Path, is_writer: bool) -> None:
        self.path = path
        self.is_writer = is_writer

    def append(self, metrics: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def trim(self, last_step: int) -> None:
        """A fresh run starts a new file; a resumed one drops lines past its checkpoint."""
        if not self.is_writer or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))


class Reporter:
    """Metrics of an `accelerate launch` run (no Ray); RayReporter adds Ray Train's reports."""

    def __init__(
        self,
        cfg: Any,
        accelerator: Any,
        folder: RunFolder,
        world_size: int,
        global_batch: int,
        total_steps: int,
        flops_per_token_at: Any = None,
        peak_flops: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.folder = folder
        self.world_size = world_size
        self.global_batch = global_batch
        self.total_steps = total_steps
        # context -> training FLOPs per token (None: no MFU, e.g. on CPU)
        self.flops_per_token_at = flops_per_token_at
        self.peak_flops = peak_flops
        self._last_save: dict[str, float] = {}  # the last save's times, for the next logged row
        self.metrics_file = MetricsFile(folder.metrics, accelerator.is_main_process)
        self.bar: Any = None
        self.last_checkpoint: str | None = None

    def begin(self, start: int, banner: str) -> None:
        """Before the first step: the metrics file trimmed to the resumed step, the banner, the bar."""
        self.metrics_file.trim(start)
        if not self.accelerator.is_main_process:
            return
        print(banner, flush=True)
        if self.cfg.train.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0
            )

    def step_metrics(
        self, step: int, epoch: int, lr: float, stats: dict[str, float], tokens_seen: int, seconds: float
    ) -> dict[str, Any]:
        """One step's metrics from train_step's global-batch stats and the step's wall time."""
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": stats["loss"],
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens_seen": tokens_seen,
            "tokens_per_s": stats["tokens"] / seconds,
            "tokens_per_s_per_device": stats["tokens"] / seconds / self.world_size,
            "step_time_s": seconds,
            "time": time.time(),  # wall clock (Unix seconds): when this step ended
            "global_batch": self.global_batch,
        }
        metrics.update(self._last_save)  # the previous save's times, once
        self._last_save = {}
        if "aux_loss" in stats:  # a mixture of experts' router load-balancing loss (in `loss` already)
            metrics["aux_loss"] = stats["aux_loss"]
        if self.peak_flops and self.flops_per_token_at is not None:
            # Real tokens only: padding does not count as useful work.
            flops = self.flops_per_token_at(stats["attn_context"])
            metrics["mfu"] = mfu(stats["tokens"] / seconds, flops, self.peak_flops, self.world_size)
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def should_log(self, step: int, last: bool, metrics: dict[str, Any]) -> bool:
        return step % self.cfg.train.log_every == 0 or last or "eval_loss" in metrics

    def log(self, metrics: dict[str, Any], last: bool, saving: bool = False) -> None:
        """Every step: the bar and the trackers. A logged step, or one that is about to save: its row
        in metrics.jsonl (before the save, so a save that hangs or dies loses no metrics). A logged
        step that does not save: also the mirror and the Ray report (a save step's come with its
        checkpoint: checkpoint_saved)."""
        step = metrics["step"]
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                gnorm=f"{metrics['grad_norm']:.3f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                refresh=False,
            )
        if not saving and not self.should_log(step, last, metrics):
            return
        self.metrics_file.append(metrics)
        if saving:
            return
        if self.accelerator.is_main_process:
            self.folder.push()
        self._publish(metrics, None)

    def checkpoint_saved(self, metrics: dict[str, Any], checkpoint: WrittenCheckpoint) -> None:
        """A save step, once every rank has written `checkpoint`: the mirror, then the report that
        publishes the checkpoint (under Ray, registers it), so a resume from it finds its row."""
        if self.accelerator.is_main_process:
            self.folder.push(force=True)
        self._publish(metrics, checkpoint)
        self.last_checkpoint = checkpoint.location

    def save_timed(self, checkpoint: WrittenCheckpoint, stall: float, write: float, hand_over: float) -> None:
        """A save's times (seconds, this rank's): `stall`, all the time training stood still for it;
        of that, `checkpoint.waited_s` waiting for the previous save's upload, `write` writing the
        files, `hand_over` publishing them (a synchronous Ray save: the upload itself). Printed
        and added to the next logged row (save_stall_s, save_wait_s, save_write_s, save_publish_s)."""
        self._last_save = {
            "save_stall_s": stall,
            "save_wait_s": checkpoint.waited_s,
            "save_write_s": write,
            "save_publish_s": hand_over,
        }
        if self.accelerator.is_main_process:
            wait = (
                f"waited {checkpoint.waited_s:.2f} s for the previous upload, "
                if checkpoint.waited_s > 0.01
                else ""
            )
            print(
                f"[accel-tp] {checkpoint.name}: training stood still {stall:.2f} s ({wait}wrote {write:.2f} s, "
                f"{self._publish_word} {hand_over:.2f} s)",
                flush=True,
            )

    _publish_word = "published"

    def _publish(self, metrics: dict[str, Any], checkpoint: WrittenCheckpoint | None) -> None:
        """Where a logged step goes beyond the run folder (nowhere without Ray)."""

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, metrics: dict[str, Any], seconds: float, tokens: int, export: Path | None) -> None:
        """Rank 0, after the last step: the loss plot, the last push, the one-line summary."""
        if not self.accelerator.is_main_process:
            return
        plot = None
        if self.folder.metrics.exists():
            plot = plot_losses(self.folder.metrics, self.folder.plot)
        self.folder.push(force=True)
        shown_plot = plot and self.folder.remote(plot)
        shown_export = export and self.folder.remote(export)
        print(
            summary_line(metrics, seconds, tokens, self.last_checkpoint, shown_plot, shown_export), flush=True
        )


class RayReporter(Reporter):
    """Under Ray Train: every logged step is also a `ray.train.report` on every rank (Ray waits for
    all workers' reports of a step), with the step's checkpoint when it saves one."""

    @property
    def _publish_word(self) -> str:  # type: ignore[override]
        return "handed to Ray's upload thread" if self.cfg.checkpoint.upload == "async" else "uploaded"

    def _publish(self, metrics: dict[str, Any], checkpoint: WrittenCheckpoint | None) -> None:
        import ray.train

        mode = ray.train.CheckpointUploadMode
        # Asynchronous (checkpoint.upload): a report returns once Ray's upload thread has it. Also
        # a report without a checkpoint: Ray keeps reports in order, so a synchronous one would wait
        # for the upload in flight (measured: the step after each save took twice as long).
        upload = mode.ASYNC if self.cfg.checkpoint.upload == "async" else mode.SYNC
        if checkpoint is None:
            ray.train.report(metrics, checkpoint_upload_mode=upload)
            return
        # Every worker reports its own files (its DeepSpeed shards); Ray merges them into one
        # checkpoint folder and registers it only once every worker has uploaded.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint.folder),
            checkpoint_dir_name=checkpoint.name,
            checkpoint_upload_mode=upload,
        )
