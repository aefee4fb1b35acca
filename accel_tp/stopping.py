"""A request to stop (SIGTERM: a scheduler's or a cloud's notice before it ends the job), honoured at
a step boundary: the trainer saves that step, waits until the save is stored (an asynchronous upload
included) and ends with errors.Stopped (exit 143). A leaf: imports nothing of accel-tp.

The ranks may get the signal at different moments, so the flag travels with the step's first
all-reduce (trainer.train_step's token counts): every rank then stops at the same step, at no extra
collective.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Whether this process was asked to stop; `install` takes over SIGTERM (main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
