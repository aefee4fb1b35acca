"""What can go wrong, by whose fault: a leaf module (imports nothing of accel-tp).

A `UserError` is something the user can fix (a config field, a data file, a checkpoint that does
not fit this run, unreachable storage); its message names the field or file and the fix, and the
command lines print it as one line and exit 2, under `accel-tp`'s Ray driver and `accelerate
launch` alike. Anything else is a crash: it keeps its traceback and exits 1.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "StorageError",
    "ExportError",
    "WorkerCrash",
    "EXIT_USER_ERROR",
    "EXIT_CRASH",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "Stopped",
]

EXIT_USER_ERROR = 2
EXIT_CRASH = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped on request, after saving


class UserError(ValueError):
    """A problem the user can fix; the message names the field or file and the fix."""

    kind = "error"  # printed as "accel-tp: <kind>: <message>"


class ConfigError(UserError):
    """A configuration value: the message names the field (`section.key`) and the fix."""

    kind = "config error"


class DataError(UserError):
    """A data file or row that cannot be trained on: the message names the file (and row)."""

    kind = "data error"


class CheckpointError(UserError):
    """A checkpoint that this run must not load: of another model, data or batch, incomplete,
    damaged, untrusted, or not a checkpoint at all. The message names the folder or file."""

    kind = "checkpoint error"


class StorageError(UserError):
    """A storage location that cannot be written or read (disk full, permissions, object store)."""

    kind = "storage error"


class ExportError(UserError):
    """scripts/export_hf.py's arguments (`--checkpoint`, `--out`)."""

    kind = "export error"


class WorkerCrash(RuntimeError):
    """A Ray worker failed with something that is not a UserError: the message carries the worker's
    own traceback (the command line prints it whole and exits 1)."""


class Stopped(Exception):
    """The run was asked to stop (SIGTERM) and stopped at a step boundary after saving that step;
    the message names the checkpoint and how to resume."""
