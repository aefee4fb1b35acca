"""Expert parallelism (DeepSpeed AutoEP): a model's experts back in its Hugging Face layout.

AutoEP replaces each MoE block of a Hugging Face model with an `AutoEPMoELayer` holding this EP
rank's experts as grouped tensors (w1 gate, w3 up: [experts/ep, ffn, hidden]; w2 down:
[experts/ep, hidden, ffn]) and the router as `router.gate`. DeepSpeed 0.19.8 converts the Hugging
Face layout into that one (moe/ep_repack.py) but has no way back, so a `save_pretrained` of the
trained model would write AutoEP's names with one rank's experts. `hf_state_dict` gathers every
rank's experts over the EP group and writes them under the names, shapes and fused layout of the
model class the run started from (read off a meta-device copy of it, whose MoE layers AutoEP's own
parser describes: moe_module_name, router_name, experts_name, expert storage and weight names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["expert_layers", "hf_state_dict", "zero3_state_dict"]


def expert_layers(module: Any) -> dict[str, Any]:
    """The MoE layers AutoEP put in place, by module name (each holds its EP rank's experts)."""
    return {n: m for n, m in module.named_modules() if getattr(type(m), "_is_autoep_layer", False)}


def _gather_experts(t: torch.Tensor, layer: Any) -> torch.Tensor:
    """[experts/ep, ...] on each EP rank -> [experts, ...], in expert order (EP rank r holds experts
    r x experts/ep onwards: AutoEP's uniform placement)."""
    t = t.detach().to(next(layer.parameters()).device).contiguous()
    if layer.ep_size == 1:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
    dist.all_gather(parts, t, group=layer.ep_group)
    return torch.cat(parts).cpu()


def _specs(meta_model: Any, preset: str) -> dict[str, Any]:
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig

    config = AutoEPConfig()
    config.enabled, config.preset_model = True, preset
    return {s.moe_module_name: s for s in AutoEP(meta_model, config).ep_parser()}


def hf_state_dict(
    state_dict: dict[str, torch.Tensor] | None, module: Any, meta_model: Any
) -> dict[str, torch.Tensor] | None:
    """`state_dict` (the gathered state dict of `module`, an AutoEP model) with every MoE layer in
    the Hugging Face layout of `meta_model` (the same model class and config on the meta device).
    Collective over each layer's EP group: every rank calls it; the result is the same on all."""
    layers = expert_layers(module)
    if not layers:
        return state_dict

    # The collective part first, on every rank (a rank other than the main one may hold no state
    # dict: Accelerate's get_state_dict gathers to the main process at tp > 1).
    def local(name: str, layer: Any, w: str) -> torch.Tensor:
        # Under ZeRO-3 the parameter is a partition; zero3_state_dict holds it gathered (on every rank).
        held = state_dict.get(f"{name}.experts.{w}") if state_dict else None
        return held if held is not None and held.ndim == 3 else getattr(layer.experts, w)

    grouped = {
        n: tuple(_gather_experts(local(n, m, w), m) for w in ("w1", "w2", "w3")) for n, m in layers.items()
    }
    if not state_dict:
        return state_dict
    specs = _specs(meta_model, module.config.model_type)
    original = {k: v.shape for k, v in meta_model.state_dict().items()}
    out = {k: v for k, v in state_dict.items() if not any(k.startswith(f"{n}.") for n in layers)}
    for name in layers:
        spec = specs[name]
        w1, w2, w3 = grouped[name]
        prefix = f"{name}."
        made: dict[str, torch.Tensor] = {}
        for part in ("weight", "bias"):  # the router (gathered under ZeRO-3: zero3_state_dict)
            value = state_dict.get(f"{prefix}router.gate.{part}")
            if value is not None:
                made[f"{prefix}{spec.router_name}.{part}"] = value
        experts = f"{prefix}{spec.experts_name}."
        if spec.expert_storage == "module_list":
            for e in range(w1.shape[0]):
                made[f"{experts}{e}.{spec.expert_w1_name}.weight"] = w1[e]
                made[f"{experts}{e}.{spec.expert_w2_name}.weight"] = w2[e]
                if spec.expert_w3_name is not None:
                    made[f"{experts}{e}.{spec.expert_w3_name}.weight"] = w3[e]
                else:
                    made[f"{experts}{e}.{spec.expert_w1_name}.weight"] = torch.cat([w1[e], w3[e]], 0)
        elif spec.expert_w3_name is not None:
            made[f"{experts}{spec.expert_w1_name}"] = w1
            made[f"{experts}{spec.expert_w2_name}"] = w2
            made[f"{experts}{spec.expert_w3_name}"] = w3
        else:
            # Fused gate+up: [E, 2 ffn, hidden] (gate rows first) or the transposed [E, hidden, 2 ffn].
            want = tuple(original[f"{experts}{spec.expert_w1_name}"])
            if want == (w1.shape[0], 2 * w1.shape[1], w1.shape[2]):
                made[f"{experts}{spec.expert_w1_name}"] = torch.cat([w1, w3], 1)
                made[f"{experts}{spec.expert_w2_name}"] = w2
            else:
                made[f"{experts}{spec.expert_w1_name}"] = torch.cat(
                    [w1.transpose(1, 2), w3.transpose(1, 2)], 2
                )
                made[f"{experts}{spec.expert_w2_name}"] = w2.transpose(1, 2)
        for key, shape in original.items():
            if not key.startswith(prefix):
                continue
            if key in made:
                value = made[key]
            elif key in state_dict:  # kept by AutoEP under its own name (e.g. shared experts)
                value = state_dict[key]
            else:
                raise RuntimeError(f"export: no trained tensor for {key} (AutoEP layer {name})")
            if tuple(value.shape) != tuple(shape):
                raise RuntimeError(f"export: {key} is {tuple(value.shape)}, the model expects {tuple(shape)}")
            out[key] = value
    return out


def zero3_state_dict(module: Any) -> dict[str, torch.Tensor]:
    """The whole state dict of a ZeRO-3 AutoEP model on every rank, module by module.

    DeepSpeed refuses its consolidated export here (engine.py
    _raise_if_autoep_zero3_consolidated_export: expert parameters are partitioned over expert
    replica groups, so a gather over the whole DP group would be incomplete). Each parameter is
    gathered over its own ZeRO group instead (`GatheredParameters` uses the parameter's
    ds_process_group: the expert data-parallel group for experts), one module at a time, so at
    most one module's weights are whole at once; the experts are then one EP rank's (hf_state_dict
    gathers those). Collective: every rank calls it."""
    from deepspeed import zero

    params = dict(module.named_parameters())
    out = {k: v.detach().cpu() for k, v in module.state_dict().items() if k not in params}
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        with zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            for name, p in own:
                out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    return out
