"""User errors end as one line and exit 2; crashes keep their traceback and exit 1 (accel_tp/errors.py).

Ray Train hands the driver each failed worker's exception object (its traceback lost on the way)
and the workers' tracebacks as text; launch.worker_failure decides which the user sees.
"""

from __future__ import annotations

import pytest
from ray.train import WorkerGroupError

from accel_tp.cli import _exit_code
from accel_tp.errors import CheckpointError, ConfigError, DataError, UserError, WorkerCrash
from accel_tp.launch import worker_failure

TRACEBACK = (
    "[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
    '  File "accel_tp/trainer.py", line 1, in train_step\nRuntimeError: CUDA out of memory'
)


def test_every_user_error_is_a_user_error_with_its_own_kind():
    kinds = {cls.kind for cls in (ConfigError, DataError, CheckpointError)}
    assert len(kinds) == 3 and all(
        issubclass(c, UserError) for c in (ConfigError, DataError, CheckpointError)
    )


def test_a_workers_user_error_stays_that_error_on_one_line():
    """The peer's broken collective is a consequence: the user sees the data error, naming the worker."""
    failures = {
        1: RuntimeError("Connection closed by peer"),
        0: DataError("data.files: a.jsonl row 3: text is null"),
    }
    err = worker_failure(WorkerGroupError("...", failures))
    assert type(err) is DataError
    assert str(err) == "worker 0 (and 1 more workers): data.files: a.jsonl row 3: text is null"


def test_a_workers_crash_is_a_crash_with_the_workers_traceback():
    err = worker_failure(WorkerGroupError(TRACEBACK, {0: RuntimeError("CUDA out of memory")}))
    assert isinstance(err, WorkerCrash) and not isinstance(err, UserError)
    assert "Traceback (most recent call last)" in str(err) and "RuntimeError: CUDA out of memory" in str(err)


def test_exit_codes(capsys):
    def raises(exc: BaseException):
        def run() -> None:
            raise exc

        return run

    assert _exit_code(raises(CheckpointError("checkpoint.resume_from: x is of another model"))) == 2
    assert (
        capsys.readouterr().err
        == "accel-tp: checkpoint error: checkpoint.resume_from: x is of another model\n"
    )
    assert _exit_code(raises(WorkerCrash(TRACEBACK))) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("accel-tp: a worker crashed:\n") and "Traceback" in err and "config error" not in err
    )
    with pytest.raises(KeyError):  # anything else keeps its own traceback (Python exits 1)
        _exit_code(raises(KeyError("bug")))
    assert _exit_code(raises(KeyboardInterrupt())) == 130  # Ctrl-C: the shell's convention
    assert "interrupted" in capsys.readouterr().err
    assert _exit_code(lambda: None) == 0
