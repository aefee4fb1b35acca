"""The command lines of scripts/train_ray.py, scripts/train.py and scripts/export_hf.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .config import Config, load_config
from .errors import (
    EXIT_CRASH,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    Stopped,
    UserError,
    WorkerCrash,
)
from .export import DTYPES, export_checkpoint
from .launch import run_local, run_ray

__all__ = ["parse_args", "main_ray", "main_local", "main_export", "add_set_argument"]


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` config override every entry point takes."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. --set train.learning_rate=3e-5; repeatable",
    )


def parse_args(argv: list[str] | None, ray: bool) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(
        description="accel-tp: tensor x data parallel training (DeepSpeed AutoTP + ZeRO)."
    )
    p.add_argument("--config", required=True, help="run YAML, e.g. accelerate_configs/tp2_dp2.yaml")
    add_set_argument(p)
    if ray:
        p.add_argument("--address", default=None, help="Ray address: 'auto' joins a running cluster")
    else:
        p.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'latest'")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if not ray and args.resume:
        overrides.append(f"checkpoint.resume_from={args.resume}")
    return args, load_config(args.config, overrides)


def _exit_code(run: Callable[[], object]) -> int:
    """The one place that turns an outcome into an exit code: a user error is one line and exit 2; a
    Ray worker's crash is its traceback and exit 1; any other exception propagates with its own
    traceback (Python exits 1)."""
    try:
        run()
    except UserError as e:
        print(f"accel-tp: {e.kind}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except WorkerCrash as e:
        print(f"accel-tp: a worker crashed:\n{e}", file=sys.stderr)
        return EXIT_CRASH
    except Stopped as e:
        print(f"accel-tp: {e}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        # The last published checkpoint is intact; a save in flight was never published.
        print("accel-tp: interrupted; resume with the same run.name (or --resume latest).", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def main_ray(argv: list[str] | None = None) -> int:
    def run() -> None:
        args, cfg = parse_args(argv, ray=True)
        run_ray(cfg, address=args.address)

    return _exit_code(run)


def main_local(argv: list[str] | None = None) -> int:
    def run() -> None:
        _, cfg = parse_args(argv, ray=False)
        run_local(cfg)

    return _exit_code(run)


def main_export(argv: list[str] | None = None) -> int:
    """scripts/export_hf.py: parse the arguments and run export_checkpoint."""
    p = argparse.ArgumentParser(
        description="Write a consolidated Hugging Face model (safetensors, config.json, tokenizer) from an "
        "accel-tp checkpoint (TP shards and ZeRO partitions; local or Ray run)."
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, e.g. .../checkpoints/step_00000500"
    )
    p.add_argument("--out", required=True, help="folder to write the model to (new or empty)")
    p.add_argument(
        "--config",
        default=None,
        help="the run's YAML; default: the config recorded in the checkpoint (accel_tp_config.yaml)",
    )
    add_set_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--trust-pickles",
        action="store_true",
        help="load the checkpoint's files even where they hold more than weights (unpickling can run "
        "code: only for a checkpoint you wrote)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights' dtype in the export (auto: the training precision)",
    )
    args = p.parse_args(argv)

    def run() -> None:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            args.config,
            args.overrides,
            args.overwrite,
            args.dtype,
            args.trust_pickles,
        )
        print(f"[accel-tp] exported {args.checkpoint} -> {out}")

    return _exit_code(run)
