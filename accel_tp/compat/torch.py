"""torch internals accel-tp reads (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["compiled_graph_counts", "clear_stale_build_locks"]


def compiled_graph_counts() -> tuple[int, int, int, int]:
    """This process's compiled graphs so far: (AOTAutograd cache hits, AOTAutograd graphs, Inductor
    cache hits, Inductor graphs), from dynamo's counters (torch has no public API for them)."""
    from torch._dynamo.utils import counters

    aot, ind = counters["aot_autograd"], counters["inductor"]
    return (
        aot["autograd_cache_hit"],
        aot["autograd_cache_hit"] + aot["autograd_cache_miss"],
        ind["fxgraph_cache_hit"],
        ind["fxgraph_cache_hit"] + ind["fxgraph_cache_miss"],
    )


def _holders(path: str) -> tuple[list[int], list[int], bool]:
    """Processes on this host that have `path` open (torch's FileBaton keeps its lock file open for
    as long as it builds), those working in its folder (the compiler torch started: a builder
    killed with SIGKILL leaves it running, orphaned), and whether every process could be read."""
    folder = os.path.dirname(path)
    owners, builders, complete = [], [], True
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.readlink(proc / "cwd") == folder:
                builders.append(int(proc.name))
        except OSError:  # best effort: torch's compiler is this user's own child, always readable
            pass
        try:
            fds = list((proc / "fd").iterdir())
        except PermissionError:
            complete = False
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == path:
                    owners.append(int(proc.name))
                    break
            except OSError:
                continue
    return owners, builders, complete


def clear_stale_build_locks(root: str, remove: bool = True, recheck_s: float = 1.0) -> None:
    """torch's build lock (`<root>/<op>/lock`) has no owner and no timeout: a build killed while it
    held it makes every later process wait forever, without a word. A lock no process on this host
    has open is stale: once the compiler it may have left running has finished, and the file is
    still the same a moment later, it is removed in one line (`remove`: only where `root` is this
    host's own; a shared one may be held from another host). A lock that is held, or whose holder
    cannot be seen (another user's processes), is named and left."""
    locks = sorted(Path(root).glob("*/lock")) if os.path.isdir(root) else []
    for lock in locks:
        path = str(lock.resolve())
        try:
            first = os.stat(path)
        except FileNotFoundError:
            continue  # released meanwhile
        owners, builders, complete = _holders(path)
        if remove and not owners and complete:
            if builders:
                print(
                    f"[accel-tp] waiting for the compiler a killed build left running in {os.path.dirname(path)} "
                    f"(pid {', '.join(map(str, builders))}) before removing its stale lock.",
                    file=sys.stderr,
                    flush=True,
                )
            while builders and not owners:
                time.sleep(recheck_s)
                owners, builders, complete = _holders(path)
            time.sleep(recheck_s)  # a holder between close() and remove() at release
            try:
                again = os.stat(path)
            except FileNotFoundError:
                continue
            same = (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
            if same and not any(_holders(path)[:2]):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                age = time.time() - first.st_mtime
                print(
                    f"[accel-tp] removed a stale torch-extension build lock {path} ({age / 60:.0f} min old, "
                    "left by a build that was killed; no process holds it).",
                    file=sys.stderr,
                    flush=True,
                )
                continue
        who = (
            f"held by pid {', '.join(map(str, owners))}" if owners else "its holder is not visible from here"
        )
        print(
            f"[accel-tp] waiting for the torch-extension build lock {path} ({who}); if no build is "
            "running, remove that file.",
            file=sys.stderr,
            flush=True,
        )
