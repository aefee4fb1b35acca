"""LoRA fine-tuning: PEFT's adapters on a frozen base, split by AutoTP together with their layers.

PEFT (`inject_adapter_in_model`) wraps each target on the whole model before DeepSpeed sees it:
`<name>` becomes `<name>.base_layer` (the frozen linear) beside `<name>.lora_A.default` and
`<name>.lora_B.default`. DeepSpeed's AutoTP then splits them by the partition that
accel_tp/families.py writes (`_partition_config` with `lora_targets`):

* column-split base (`LinearLayer`): lora_A whole, lora_B column-split like the base's output, so
  the rank's `B_r(A(x))` adds onto its own output slice. lora_B is itself a DeepSpeed
  `LinearLayer`, whose backward all-reduces the gradient of A's output over the TP group.
* row-split base (`LinearAllreduce`): lora_A row-split on the input (`LinearAllreduce`: the partial
  `A_r x_r` all-reduced, as the base's output is), lora_B whole.

So every adapter shard is a DeepSpeed TP parameter (marked `tensor_model_parallel`, counted once
per shard by the gradient norm, gathered by the consolidated state dict and the universal
checkpoint) and every whole adapter is replicated with identical gradients on all TP ranks.

AutoTP replaces any module with a 2-D `.weight` that a pattern matches, and skips one that no
pattern matches without visiting its children. PEFT's wrapper exposes its base's `.weight`, so it
would be replaced whole (the adapters dropped) or skipped (the base never split); during
`deepspeed.initialize` the wrappers hide that property (`hidden_from_autotp`).

Only adapters (and `modules_to_save`, and trained biases) require gradients: the optimizer, ZeRO's
partitions and the checkpoint's optimizer state hold nothing else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, LoraSection

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "peft_config",
    "resolve_adapter",
    "check_lora",
    "apply_lora",
    "base_digest",
    "describe",
    "hidden_from_autotp",
    "trainable_count",
    "adapter_state_dict",
    "merged_state_dict",
    "save_adapter",
]

ADAPTER_NAME = "default"  # PEFT's adapter name inside the modules (removed in saved files)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's file names (peft.utils.constants)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_SAVED_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors

# lora section field -> adapter_config.json key
_PEFT_KEYS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "modules_to_save": "modules_to_save",
    "bias": "bias",
}


def peft_config(section: LoraSection, base_model: str | None = None) -> Any:
    """PEFT's LoraConfig for the section (targets resolved to the names given or the defaults)."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=sorted(section.targets()),
        modules_to_save=list(section.modules_to_save) or None,
        bias=section.bias,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def resolve_adapter(section: LoraSection) -> LoraSection:
    """With `lora.adapter`: the section filled from the folder's adapter_config.json. A field set
    here (not at its default) that disagrees with the adapter is refused, naming both values."""
    import dataclasses

    if section.adapter is None:
        return section
    folder = Path(section.adapter).expanduser()
    cfg_file, weights = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(
            f"lora.adapter: {str(folder)!r} is not a PEFT adapter folder (needs {ADAPTER_CONFIG_FILE} and "
            f"{ADAPTER_WEIGHTS_FILE}); point it at one (e.g. a run's adapter export)."
        )
    saved = json.loads(cfg_file.read_text())
    if saved.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"lora.adapter: {str(folder)!r} holds a {saved['peft_type']} adapter, not LoRA.")
    defaults = LoraSection()
    filled = {}
    for name, key in _PEFT_KEYS.items():
        if key not in saved:
            continue
        theirs = saved[key]
        if name == "target_modules" and isinstance(theirs, list):
            theirs = sorted(theirs)
        if name == "modules_to_save":
            theirs = list(theirs or [])
        ours = getattr(section, name)
        ours_cmp = sorted(ours) if name == "target_modules" and ours is not None else ours
        if ours_cmp != getattr(defaults, name) and ours_cmp != theirs:
            raise ConfigError(
                f"lora.{name}: {ours!r} disagrees with the adapter's {key} ({theirs!r}) in {str(cfg_file)!r}; "
                f"remove lora.{name} (the adapter's value is used) or start a new adapter."
            )
        if not isinstance(theirs, (list, int, float, str)):
            raise ConfigError(
                f"lora.adapter: {key} = {theirs!r} in {str(cfg_file)!r} is not a plain list of module names."
            )
        filled[name] = theirs
    return dataclasses.replace(section, **filled)


def _linear_names(model: Any) -> dict[str, list[str]]:
    """Last name segment -> full names, for every nn.Linear of the model."""
    names: dict[str, list[str]] = {}
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.setdefault(full.rsplit(".", 1)[-1], []).append(full)
    return names


def check_lora(section: LoraSection, model: Any, split_modules: frozenset[str] = frozenset()) -> None:
    """Refuse targets the model does not have (listing those it has) and modules_to_save that
    tensor parallelism splits (`split_modules`: their last names). `model` may be on meta."""
    if not section.enabled:
        return
    linear = _linear_names(model)
    wanted = section.targets()
    present = wanted & set(linear)
    if section.target_modules is not None:
        missing = sorted(set(section.target_modules) - set(linear))
        if missing:
            raise ConfigError(
                f"lora.target_modules: {missing} name no linear layer of {type(model).__name__}; it has "
                f"{sorted(linear)}."
            )
    elif not present:
        raise ConfigError(
            f"lora.target_modules: none of the default projections {sorted(wanted)} is a linear layer of "
            f"{type(model).__name__}; name some of {sorted(linear)}."
        )
    modules = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
    unknown = sorted(set(section.modules_to_save) - modules)
    if unknown:
        raise ConfigError(f"lora.modules_to_save: {unknown} name no module of {type(model).__name__}.")
    split = sorted(set(section.modules_to_save) & split_modules)
    if split:
        raise ConfigError(
            f"lora.modules_to_save: {split} are split by tensor parallelism, and PEFT's trained copy of a "
            "module sits beside the original, which AutoTP would replace whole as one layer; train them "
            "at parallelism.tp_size: 1, or save only modules left whole (norms, an untied embedding)."
        )


def base_digest(model: Any) -> str:
    """A digest of the model's weights (before the adapters go in): every 1009th element of each
    tensor, summed in float64, in name order. Cheap, equal on every rank, and it tells two bases of
    one shape apart, which the shape fingerprint cannot."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            h.update(f"{name}:{float(p.detach().flatten()[::1009].double().sum()):.10e};".encode())
    return h.hexdigest()[:16]


def describe(section: LoraSection) -> str:
    """The adapters' identity for the model fingerprint: a checkpoint of other adapters (or of a
    full fine-tune) is refused before anything is built."""
    if not section.enabled:
        return ""
    return f"+lora:r{section.r}:a{section.alpha:g}:{','.join(sorted(section.targets()))}"


def apply_lora(model: Any, section: LoraSection, seed: int) -> str:
    """Inject the adapters into `model` (whole, before DeepSpeed), freeze the rest, load
    `lora.adapter`'s weights if set. Returns a one-line summary. The adapters are initialised by
    PEFT from torch's generator seeded with `seed` just before, the same on every rank."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    inject_adapter_in_model(peft_config(section), model, adapter_name=ADAPTER_NAME)
    if section.adapter is not None:
        _load_adapter_weights(model, Path(section.adapter).expanduser())
    trained, total = trainable_count(model)
    wrapped = sum(1 for _ in _wrappers(model))
    return f"LoRA r={section.r} alpha={section.alpha:g} on {wrapped} layers: {trained:,} of {total:,} parameters train"


def _load_adapter_weights(model: Any, folder: Path) -> None:
    from safetensors.torch import load_file  # tensors only: loading runs no code

    saved = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = []
    with torch.no_grad():
        for key, value in saved.items():
            name = _live_name(key)
            if name not in params:
                missing.append(key)
                continue
            if params[name].shape != value.shape:
                raise ConfigError(
                    f"lora.adapter: {key} has shape {tuple(value.shape)}, the model's {tuple(params[name].shape)}; "
                    "the adapter was trained on another model (model.name_or_path) or rank."
                )
            params[name].copy_(value)
    if missing:
        raise ConfigError(
            f"lora.adapter: {len(missing)} tensors of {str(folder / ADAPTER_WEIGHTS_FILE)!r} match no adapter of "
            f"this model (e.g. {missing[0]!r}); it was trained on another model."
        )


def _live_name(saved_key: str) -> str:
    """A key of adapter_model.safetensors as the live model's parameter name."""
    name = saved_key.removeprefix(_SAVED_PREFIX)
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        name = name.replace(f".{part}.weight", f".{part}.{ADAPTER_NAME}.weight")
    name = name.replace(".modules_to_save.", f".modules_to_save.{ADAPTER_NAME}.")
    return name


def _saved_name(live: str) -> str:
    """A live parameter name as PEFT writes it in adapter_model.safetensors."""
    name = live.replace(f".{ADAPTER_NAME}.weight", ".weight").replace(f".{ADAPTER_NAME}.bias", ".bias")
    name = name.replace(f".modules_to_save.{ADAPTER_NAME}.", ".modules_to_save.")
    return _SAVED_PREFIX + name


def _wrappers(model: Any) -> Iterator[Any]:
    from peft.tuners.lora import LoraLayer

    return (m for m in model.modules() if isinstance(m, LoraLayer))


def trainable_count(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter elements of the whole (unsharded) model."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters())


_HIDDEN: dict[type, type] = {}


def _hidden_class(cls: type) -> type:
    def _no_weight(self: Any) -> Any:
        raise AttributeError("weight")  # hasattr(wrapper, "weight") is False: AutoTP visits the children

    if cls not in _HIDDEN:
        _HIDDEN[cls] = type(cls.__name__, (cls,), {"weight": property(_no_weight), "_accel_tp_hidden": True})
    return _HIDDEN[cls]


@contextlib.contextmanager
def hidden_from_autotp(model: Any) -> Iterator[None]:
    """While DeepSpeed's AutoTP walks the model, PEFT's wrappers show no `.weight` of their own."""
    swapped = []
    for module in _wrappers(model):
        swapped.append((module, type(module)))
        module.__class__ = _hidden_class(type(module))
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _scaling(model: Any) -> dict[str, float]:
    """Wrapper name -> PEFT's scaling (alpha / r)."""
    from peft.tuners.lora import LoraLayer

    return {name: m.scaling[ADAPTER_NAME] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_state_dict(full: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The trained tensors of a gathered (whole) state dict, under PEFT's saved names."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {_saved_name(k): v.contiguous() for k, v in full.items() if k in trained}


def merged_state_dict(full: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A plain model's state dict: each base weight + scaling x B @ A, PEFT's names unwound
    (`<name>.base_layer.weight` -> `<name>.weight`; a saved module's trained copy replaces it)."""
    out: dict[str, torch.Tensor] = {}
    scaling = _scaling(model)
    for key, value in full.items():
        if f".lora_A.{ADAPTER_NAME}." in key or f".lora_B.{ADAPTER_NAME}." in key:
            continue
        if ".modules_to_save." in key or ".original_module." in key:
            continue  # taken below
        out[key.replace(".base_layer.", ".")] = value
    for name, scale in scaling.items():
        a = full[f"{name}.lora_A.{ADAPTER_NAME}.weight"].float()
        b = full[f"{name}.lora_B.{ADAPTER_NAME}.weight"].float()
        base = out[f"{name}.weight"]
        out[f"{name}.weight"] = (base.float() + scale * (b @ a)).to(base.dtype)
    for key, value in full.items():
        if f".modules_to_save.{ADAPTER_NAME}." in key:
            out[key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")] = value
        elif ".original_module." in key:
            out.setdefault(key.replace(".original_module.", "."), value)
    return out


def save_adapter(
    out: Path, full: dict[str, torch.Tensor], model: Any, section: LoraSection, base_model: str | None
) -> Path:
    """Write a PEFT adapter folder that `PeftModel.from_pretrained(base, out)` loads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(full, model), str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config(section, base_model).save_pretrained(str(out))
    return out
