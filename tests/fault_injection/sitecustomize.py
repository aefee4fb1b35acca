"""Imported by Python at start-up in a process whose PYTHONPATH holds this folder, which only the
tests' fault-injection environments do (tests/faults.py says how the faults work). The interpreter
has no sitecustomize of its own to shadow; one found further along sys.path would still be run."""

import importlib.util
import os
import sys

from tests import faults

faults.install()

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _other = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_other)) != _here and os.path.isfile(_other):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _other)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
