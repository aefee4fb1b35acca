"""Several ranks on one GPU, for tests and benchmarks: torchrun's environment per rank, with every
rank on cuda:0 and the staged gloo backend (accel_tp/staged_gloo.py).

NCCL refuses two ranks on one device, so the ranks talk through gloo on host copies; the GPU
kernels are the real ones. Each rank is the only process of its "node" (LOCAL_RANK 0,
LOCAL_WORLD_SIZE 1): Accelerate and DeepSpeed both pick the device from LOCAL_RANK. That makes
every rank a local main process, so the data and tokenizer caches should exist before (a tp 1
run with the same data.cache_dir builds them). Throughput of ranks sharing one GPU says little;
memory per process does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping

from ..env import PROCESS_GROUP_ENV, free_port
from ..staged_gloo import NAME

__all__ = ["rank_env", "run"]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment of rank `rank` of `world` ranks sharing the one GPU."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        PROCESS_GROUP_ENV: NAME,
    }


def run(
    nproc: int, cmd: list[str], env: Mapping[str, str], timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """`cmd` as `nproc` ranks on the one GPU; rank 0's stdout, every rank's stderr, the first
    non-zero exit status (or 0). Ranks still running after `timeout` seconds are killed (-9)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="accel-tp-shared-gpu-") as tmp, contextlib.ExitStack() as files:
        logs = [
            (
                files.enter_context(open(f"{tmp}/{r}.out", "w+")),
                files.enter_context(open(f"{tmp}/{r}.err", "w+")),
            )
            for r in range(nproc)
        ]
        procs = [
            subprocess.Popen(
                cmd, env={**env, **rank_env(r, nproc, port)}, cwd=cwd, stdout=o, stderr=e, text=True
            )
            for r, (o, e) in enumerate(logs)
        ]
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                p.wait()
        texts = []
        for o, e in logs:
            o.seek(0)
            e.seek(0)
            texts.append((o.read(), e.read()))
    rc = next((p.returncode for p in procs if p.returncode != 0), 0)
    return subprocess.CompletedProcess(cmd, rc, texts[0][0], "\n".join(e for _, e in texts))


if __name__ == "__main__":  # python -m accel_tp.tools.shared_gpu N cmd...: a command run as N ranks
    import sys

    done = run(int(sys.argv[1]), sys.argv[2:], os.environ, timeout=3600)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
