"""Helpers for the multi-process tests: launch real processes (torchrun / accelerate / Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from accel_tp.env import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "accelerate_configs" / "tiny_tp2_dp2.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def run(cmd: list[str], timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """cmd from the repo root, with the tests' environment plus env."""
    full_env = {**_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
    return proc


def set_args(overrides: dict[str, object]) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def accelerate_launch(
    nproc: int, overrides: dict[str, object], extra: list[str] | None = None, config: Path = TINY
):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
        "--num_processes", str(nproc), "--main_process_port", str(free_port()),
        str(ROOT / "scripts" / "train.py"), "--config", str(config), *set_args(overrides), *(extra or []),
    ]  # fmt: skip
    return run(cmd)


def torchrun(nproc: int, script: Path, args: list[str]):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return run(cmd)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
