"""Accelerate internals accel-tp reads (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

from typing import Any

__all__ = ["prepared_engines"]


def prepared_engines(accelerator: Any) -> list[Any]:
    """The DeepSpeed engines `accelerator.prepare` built (Accelerate keeps them in `_models`)."""
    return [m for m in getattr(accelerator, "_models", []) if hasattr(m, "_config")]
