"""Fault injection for the tests, through accel-tp's checkpoint seam (ACCEL_TP_CHECKPOINT_HOOK).

`hang_in_save` stops one rank inside one step's save, after its files are written and before they
are reported, so a test can kill it mid-checkpoint. Set ACCEL_TP_CHECKPOINT_HOOK to
"tests.faults:hang_in_save" and HANG_IN_SAVE to "<step>:<rank>:<marker file>". The hanging rank
writes its pid to the marker first (atomically), and passes through once the marker exists (the
restarted run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HOOK = "tests.faults:hang_in_save"
SPEC_ENV = "HANG_IN_SAVE"


def hang_in_save(point: str, step: int, rank: int, folder: str) -> None:
    spec = os.environ.get(SPEC_ENV)
    if point != "written" or not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if (int(at_step), int(at_rank)) != (step, rank) or os.path.exists(marker):
        return
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)  # the test never reads a half-written pid
    time.sleep(600)


FAIL_HOOK = "tests.faults:fail_in_save"
FAIL_ENV = "FAIL_IN_SAVE"


def fail_in_save(point: str, step: int, rank: int, folder: str) -> None:
    """Raise inside the save of step $FAIL_IN_SAVE (every rank), before it is reported: the run
    fails there and its previous checkpoint stays the latest."""
    if point == "written" and os.environ.get(FAIL_ENV) == str(step):
        raise RuntimeError(f"injected failure in the step-{step} save")
