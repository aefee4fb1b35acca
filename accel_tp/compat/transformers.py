"""Transformers internals accel-tp relies on (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["without_hf_zero3_init"]


@contextmanager
def without_hf_zero3_init() -> Iterator[None]:
    """Build a model whole, also under ZeRO-3; DeepSpeed partitions it in prepare().

    Accelerate publishes the DeepSpeed config to transformers whatever zero3_init_flag says
    (accelerate/utils/dataclasses.py DeepSpeedPlugin.set_deepspeed_weakref creates HfDeepSpeedConfig
    unconditionally since Accelerate 1.0). At stage 3 transformers then builds the model under
    deepspeed.zero.Init, which skips the layers' constructor draws: every random weight comes out
    another sample for the same seed (the first loss differed from the unsharded model's), and
    from_pretrained with AutoTP raises NotImplementedError. So the published config is cleared for
    the build and restored after it. tests/test_zero3_upstream.py reproduces the upstream behaviour.
    """
    from transformers.integrations import deepspeed as hf_ds

    published = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if published is not None:
            hf_ds.set_hf_deepspeed_config(published)
