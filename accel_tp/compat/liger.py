"""Liger-Kernel's API as accel-tp uses it (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

from typing import Any

__all__ = ["liger_api"]


def liger_api() -> tuple[Any, Any, Any]:
    """(apply the layer kernels to one model instance, the fused linear cross-entropy function, the
    model types Liger knows). The instance-level apply is private in Liger (the public one patches
    the model class for every instance); raises ImportError without liger-kernel."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return _apply_liger_kernel_to_instance, liger_fused_linear_cross_entropy, MODEL_TYPE_TO_APPLY_LIGER_FN
