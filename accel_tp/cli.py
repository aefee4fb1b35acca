"""Command-line parsing shared by scripts/train_ray.py and scripts/train.py."""

from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, load_config

__all__ = ["parse_args", "main_ray", "main_local", "add_set_argument"]


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


def main_ray(argv: list[str] | None = None) -> int:
    from .launch import run_ray

    try:
        args, cfg = parse_args(argv, ray=True)
        run_ray(cfg, address=args.address)
    except ConfigError as e:
        print(f"accel-tp: config error: {e}", file=sys.stderr)
        return 2
    return 0


def main_local(argv: list[str] | None = None) -> int:
    from .launch import run_local

    try:
        _, cfg = parse_args(argv, ray=False)
        run_local(cfg)
    except ConfigError as e:
        print(f"accel-tp: config error: {e}", file=sys.stderr)
        return 2
    return 0
