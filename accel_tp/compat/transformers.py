"""Transformers internals accel-tp relies on (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["without_hf_zero3_init", "output_recorders_keyed_by_name"]


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


@contextmanager
def output_recorders_keyed_by_name() -> Iterator[None]:
    """Let DeepSpeed's AutoEP read Transformers' output-capture registry as the dict it was.

    AutoEP (deepspeed/module_inject/auto_ep_presets/base.py, 0.19.8) re-points the router-logit
    recorders at its replacement layers and calls `registry.get(class_name, default)` on
    transformers.utils.output_capturing._CAN_RECORD_REGISTRY. Since Transformers 5.2x that registry
    is a `_CanRecordRegistry` whose `get(model)` takes a model and no default, so AutoEP fails with
    "TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given" (and a
    string key would look up the class of `str`). For the engine's initialisation a string key gets
    the plain dict lookup; a model, Transformers' own.
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:  # older Transformers: a plain dict, nothing to do
        yield
        return
    registry_type = type(getattr(output_capturing, "_CAN_RECORD_REGISTRY", {}))
    if registry_type is dict or "get" not in registry_type.__dict__:
        yield
        return
    own_get = registry_type.get

    def get(self: Any, key: Any, *default: Any) -> Any:
        return dict.get(self, key, *default) if isinstance(key, str) else own_get(self, key)

    registry_type.get = get
    try:
        yield
    finally:
        registry_type.get = own_get
