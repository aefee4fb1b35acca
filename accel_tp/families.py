"""How each decoder family is split across a TP group: DeepSpeed's own path, or a partition accel-tp writes.

DeepSpeed 0.19.8 (`runtime/engine.py` `_apply_autotp_partitioning`) converts a model's Hugging Face
`tp_plan` itself (`module_inject/tp_plan_converter.py`), but only six styles; a plan with any other
(`rowwise_split_input`: Phi-3, OLMo-2/3, GLM-4; `packed_colwise` / `moe_tp_experts`: Mixtral,
Qwen3-MoE) is rejected as a whole and it asks for `tensor_parallel.partition_config`. For those
accel-tp writes that partition config here, from the plan (HF styles mapped to DeepSpeed layer
specs with the same numerics) or from a per-family plan where a model's code needs one. The user
can give a plan of their own in the same vocabulary (`model.tp_plan`).

The HF styles and what they become (`module_inject/autotp_config.py` TPLayerSpec):

* `colwise` -> column; `colwise_gather_output` / `colwise_rep` -> column, output all-gathered.
* `rowwise` -> row (input already sharded, output all-reduced).
* `rowwise_split_input` / `rowwise_rep` -> row whose input is whole on every rank: DeepSpeed's
  `LinearAllreduceWithReplicatedInput` (each rank takes its slice of the input; the backward
  all-reduces the input gradient). DeepSpeed builds that layer only for names in the partition's
  `lm_head_patterns`, so those modules' names are added there (a name must then mean one style).
* `packed_colwise` on a linear layer (a fused [gate; up] weight) -> column with shape (2, -1): each
  half split separately, so a rank's output is [gate_r, up_r] and the model's `chunk(2)` pairs them.
* `replicated_with_grad_allreduce` -> left whole, gradient summed over the TP group (norms applied
  to sharded heads, e.g. Qwen3's per-head q/k norms).
* `replicate`, `embedding_rowwise`, `local_params` -> left whole. A tied embedding and lm_head stay
  whole in an accel-tp partition (DeepSpeed's fallback for a gathered head tied to an embedding).
* MoE experts (`moe_tp_experts` and the packed expert weights under it) -> left whole: every TP rank
  runs every expert on the same (replicated) tokens, so they train exactly, without memory savings.

Knows nothing of ranks; imports only config (and transformers, lazily).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ConfigError, ModelSection

__all__ = [
    "EXPERT_PRESETS",
    "num_experts",
    "check_expert_parallel",
    "expert_parallel_block",
    "Partition",
    "DEEPSPEED_STYLES",
    "FAMILY_PLANS",
    "hf_config",
    "causal_lm_class",
    "hf_tp_plan",
    "resolve_partition",
    "partition_for",
    "with_lora",
    "split_module_names",
    "tensor_parallel_block",
    "vocabulary_split",
    "PLAIN_HEAD_TYPES",
    "plain_head",
    "check_against_model",
    "to_regex",
    "localize_attention",
]

# The styles DeepSpeed 0.19.8's TPPlanConverter takes (module_inject/tp_plan_converter.py SUPPORTED_STYLES).
DEEPSPEED_STYLES = frozenset(
    {
        "colwise",
        "colwise_rep",
        "colwise_gather_output",
        "rowwise",
        "replicated_with_grad_allreduce",
        "embedding_rowwise",
    }
)
_COLUMN = {"colwise": False, "colwise_gather_output": True, "colwise_rep": True}
_ROW = {"rowwise": False, "rowwise_split_input": True, "rowwise_rep": True}
_WHOLE = {"replicate", "embedding_rowwise", "local_params"}
_MOE_STYLES = {"moe_tp_experts", "moe_identity_expert"}
_LM_HEADS = ["lm_head", "embed_out"]  # DeepSpeed's default lm_head_patterns

HOW_AUTO = "DeepSpeed auto"
HOW_DERIVED = "accel-tp spec from the model's tp_plan"
HOW_FAMILY = "accel-tp spec (per family)"
HOW_USER = "model.tp_plan"
HOW_HEURISTIC = "DeepSpeed heuristic (the model has no tp_plan)"

# Plans written per family, where the model's own plan is not what its code can run sharded (or
# not efficiently). Each says why; tests/test_families.py trains each against the reference.
# accel-tp's own style for a fused [q; k; v] projection: a column split of each part, sized from
# the model's head counts (DeepSpeed's TPLayerSpec shape ((q, k, v), -1)). Only in per-family plans.
PACKED_QKV = "packed_qkv"
_FUSED_MLP = {"layers.*.mlp.gate_up_proj": "packed_colwise", "layers.*.mlp.down_proj": "rowwise"}
_QKV = {f"layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"} | {"layers.*.self_attn.o_proj": "rowwise"}
FAMILY_PLANS: dict[str, tuple[dict[str, str], str]] = {
    "phi3": (
        {
            # The fused [q; k; v] weight is split per part (q by query heads, k and v by kv heads), so
            # a rank holds [q_r; k_r; v_r]. Phi3Attention slices it at config.num_attention_heads x
            # head_dim and self.num_key_value_heads x head_dim: AutoTP makes the second local, and
            # localize_attention gives each attention module a config with the local head counts.
            "layers.*.self_attn.qkv_proj": PACKED_QKV,
            "layers.*.self_attn.o_proj": "rowwise",
            **_FUSED_MLP,
            "lm_head": "colwise_gather_output",
        },
        "fused qkv split per q / k / v part by heads, o_proj row-parallel; fused gate_up split per half, "
        "down_proj row-parallel",
    ),
    "glm4": (
        {**_QKV, **_FUSED_MLP, "lm_head": "colwise_gather_output"},
        "fused gate_up split per half and down_proj row-parallel (the HF plan gathers the MLP "
        "activations and splits them again)",
    ),
    "glm": (
        {**_QKV, **_FUSED_MLP, "lm_head": "colwise_gather_output"},
        "fused gate_up split per half and down_proj row-parallel",
    ),
}


@dataclass(frozen=True)
class Partition:
    """What a run's TP group does with the model: `how` (docs/families.md), and the
    DeepSpeed `tensor_parallel.partition_config` (None: DeepSpeed's own path)."""

    how: str
    model_type: str
    plan: dict[str, str] = field(default_factory=dict)
    partition_config: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


def hf_config(section: ModelSection) -> Any:
    """The model's Hugging Face config from model.name_or_path, without weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: cannot read a model config from {section.name_or_path!r}: {e}"
        ) from e


def causal_lm_class(mconf: Any) -> type | None:
    """The transformers class AutoModelForCausalLM builds for `mconf` (None: not a built-in one)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(mconf)]
    except KeyError:
        return None


def hf_tp_plan(mconf: Any) -> dict[str, str]:
    """The model's merged plan as DeepSpeed reads it (tensor_parallel/config.py `_get_hf_tp_plan`):
    the config's base_model_tp_plan, then the class's own entries (lm_head)."""
    text = _text_config(mconf)
    plan = dict(getattr(text, "base_model_tp_plan", None) or getattr(mconf, "base_model_tp_plan", None) or {})
    cls = causal_lm_class(mconf)
    for pattern, style in (getattr(cls, "_tp_plan", None) or {}).items():
        plan.setdefault(pattern, style)
    return plan


def _text_config(mconf: Any) -> Any:
    try:
        return mconf.get_text_config()
    except (AttributeError, ValueError):  # no sub-configs, or several (encoder-decoder): the config itself
        return mconf


def _is_moe(mconf: Any, plan: dict[str, str]) -> bool:
    text = _text_config(mconf)
    experts = [getattr(text, k, 0) or 0 for k in ("num_local_experts", "num_experts", "n_routed_experts")]
    return any(s in _MOE_STYLES for s in plan.values()) or max(experts) > 1


def _experts_prefixes(plan: dict[str, str]) -> list[str]:
    return [p for p, s in plan.items() if s in _MOE_STYLES]


def resolve_partition(section: ModelSection, mconf: Any, tp_size: int) -> Partition:
    """The run's partition, or a ConfigError (naming the field and what works) for a model it
    cannot split soundly. Decided from the config alone: the driver and every worker agree."""
    model_type = str(getattr(mconf, "model_type", "?"))
    if tp_size <= 1:
        return Partition(how="none (tp 1)", model_type=model_type)
    notes: list[str] = []
    if section.tp_plan is not None:
        plan, how = dict(section.tp_plan), HOW_USER
    elif model_type in FAMILY_PLANS:
        plan, why = FAMILY_PLANS[model_type]
        plan, how = dict(plan), HOW_FAMILY
        notes.append(why)
    else:
        plan, how = hf_tp_plan(mconf), HOW_AUTO
        if not plan:
            # No plan in transformers (GPT-2, Falcon, OPT, ...): DeepSpeed's name heuristics, as
            # before; not tested here. model.tp_plan gives an explicit one.
            return Partition(how=HOW_HEURISTIC, model_type=model_type)
    moe = _is_moe(mconf, plan)
    if moe:
        # Experts (fused 3-D weights in transformers 5) stay whole: AutoTP shards only linear layers.
        prefixes = _experts_prefixes(plan)
        for pattern in list(plan):
            if any(pattern == p or pattern.startswith(p + ".") for p in prefixes):
                plan[pattern] = "replicate"
        notes.append("MoE experts replicated on every TP rank (attention sharded)")
        if how == HOW_AUTO:
            how = HOW_DERIVED
    known = ModelSection.TP_STYLES | ({PACKED_QKV} if how == HOW_FAMILY else set())
    unknown = sorted({s for s in plan.values() if s not in known})
    if unknown:
        field_name = "model.tp_plan" if how == HOW_USER else "model.name_or_path"
        raise ConfigError(
            f"{field_name}: the {model_type!r} tensor-parallel plan uses style(s) {unknown}, which accel-tp "
            f"cannot map onto DeepSpeed AutoTP (it maps {sorted(ModelSection.TP_STYLES)}). Train it with "
            "parallelism.tp_size: 1, or give your own model.tp_plan in the styles accel-tp maps."
        )
    if how == HOW_AUTO and set(plan.values()) <= DEEPSPEED_STYLES:
        return Partition(how=HOW_AUTO, model_type=model_type, plan=plan, notes=tuple(notes))
    if how == HOW_AUTO:
        how = HOW_DERIVED
    return Partition(
        how=how,
        model_type=model_type,
        plan=plan,
        partition_config=_partition_config(plan, how, _qkv_sizes(mconf)),
        notes=tuple(notes),
    )


def to_regex(pattern: str, inner: str = "") -> str:
    """A plan pattern ('layers.*.mlp.up_proj') as the regex DeepSpeed matches a weight's full name
    with: any prefix of whole name segments ('model.'), '*' one segment, then `inner` (a regex
    for the sub-module path inside the matched module, e.g. PEFT's '\\.base_layer') and '.weight'."""
    body = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    return rf"^(?:.*\.)?{body}{inner}\.weight$"


def _qkv_sizes(mconf: Any) -> list[int] | None:
    """Output rows of the q, k and v parts of a fused qkv projection (None: no head counts)."""
    text = _text_config(mconf)
    heads = getattr(text, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return [heads * head_dim, kv * head_dim, kv * head_dim]


# Under LoRA a target's base weight sits one module deeper (PEFT's `<name>.base_layer`) and its
# adapters at `<name>.lora_A.<adapter>` / `<name>.lora_B.<adapter>` (accel_tp/lora.py).
LORA_BASE = r"(?:\.base_layer)?"
LORA_A = r"\.lora_A\.[^.]+"
LORA_B = r"\.lora_B\.[^.]+"
LORA_SAVED = r"\.modules_to_save\.[^.]+"  # PEFT's trained copy of a lora.modules_to_save module


def _partition_config(
    plan: dict[str, str],
    how: str,
    qkv_sizes: list[int] | None = None,
    lora_targets: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """DeepSpeed's partition_config for `plan`. With `lora_targets` (module names, PEFT's
    target_modules), a targeted layer's adapters are split with it: a column-split base gets
    lora_B split like its output (same shape, same gathering) and lora_A whole; a row-split base
    gets lora_A split on its input (its output all-reduced, as the base's) and lora_B whole."""
    field_name = "model.tp_plan" if how == HOW_USER else "model.name_or_path"
    specs: list[dict[str, Any]] = []
    split_input: dict[str, str] = {}  # module name -> pattern (DeepSpeed routes by the last segment)
    other_names: dict[str, str] = {}
    for pattern, style in plan.items():
        last = pattern.split(".")[-1]
        lora = last in lora_targets
        if lora and _ROW.get(style):
            raise ConfigError(
                f"lora.target_modules: {last!r} is a {style} layer under tensor parallelism; DeepSpeed "
                "0.19.8 picks its whole-input row layer by the module's last name "
                "(module_inject/auto_tp.py _is_lm_head_name), which under PEFT's wrapper is 'base_layer', "
                f"so the base would be split as a plain row layer. Leave {last!r} out of "
                "lora.target_modules, or train with parallelism.tp_size: 1."
            )
        spec: dict[str, Any] = {"patterns": [to_regex(pattern, LORA_BASE if lora else "")]}
        if style in _COLUMN:
            spec.update(partition_type="column", gather_output=_COLUMN[style])
        elif style == "packed_colwise":
            spec.update(partition_type="column", shape=[2, -1], partition_dim=0)
        elif style == PACKED_QKV:
            assert qkv_sizes is not None, "a fused qkv split needs the model's head counts"
            spec.update(partition_type="column", shape=[qkv_sizes, -1], partition_dim=0)
        elif style in _ROW:
            spec.update(partition_type="row")
        elif style == "replicated_with_grad_allreduce":
            spec.update(partition_type="skip", grad_allreduce=True)
            if lora_targets:
                # Frozen under LoRA (DeepSpeed would hook a tensor without gradient:
                # auto_tp.py register_replicated_grad_hooks); only a lora.modules_to_save copy trains.
                spec["patterns"] = [to_regex(pattern, LORA_SAVED)]
        else:
            spec.update(partition_type="skip")
        (split_input if _ROW.get(style) else other_names).setdefault(last, pattern)
        specs.append(spec)
        if lora and spec["partition_type"] == "column":
            specs.append({**spec, "patterns": [to_regex(pattern, LORA_B)]})
        elif lora and spec["partition_type"] == "row":
            specs.append({"patterns": [to_regex(pattern, LORA_A)], "partition_type": "row"})
    clash = sorted(set(split_input) & set(other_names) - set(_LM_HEADS))
    if clash:
        raise ConfigError(
            f"{field_name}: {clash} name both a rowwise_split_input layer ({split_input[clash[0]]!r}) and "
            f"another style ({other_names[clash[0]]!r}); DeepSpeed picks its replicated-input row layer by "
            "the module's last name, so one name must have one style. Use rowwise with a colwise input "
            "layer, or the same style for both."
        )
    heads = _LM_HEADS + sorted(set(split_input) - set(_LM_HEADS))
    return {"use_default_specs": False, "layer_specs": specs, "lm_head_patterns": heads}


def split_module_names(partition: Partition) -> frozenset[str]:
    """Last names of the modules the partition splits across the TP group."""
    kept = _WHOLE | {"replicated_with_grad_allreduce"} | _MOE_STYLES
    return frozenset(p.split(".")[-1] for p, style in partition.plan.items() if style not in kept)


def with_lora(partition: Partition, targets: frozenset[str], mconf: Any) -> Partition:
    """`partition` with its adapters split along (accel_tp/lora.py): always an accel-tp spec,
    since DeepSpeed's own plan conversion knows nothing of PEFT's module names."""
    if not partition.plan:
        raise ConfigError(
            f"lora.enabled: the {partition.model_type!r} model has no tensor-parallel plan, and DeepSpeed's "
            "name heuristics (module_inject/auto_tp.py linear_policies) would split PEFT's lora_A / lora_B "
            "layers as if they were the model's own; give a model.tp_plan, or use parallelism.tp_size: 1."
        )
    how = HOW_DERIVED if partition.how == HOW_AUTO else partition.how
    config = _partition_config(partition.plan, how, _qkv_sizes(mconf), targets)
    return dataclasses.replace(partition, how=how, partition_config=config)


def partition_for(
    section: ModelSection, tp_size: int, lora_targets: frozenset[str] = frozenset()
) -> Partition:
    """The partition a run of `section` at `tp_size` gets (reads the model's config, not its
    weights); `lora_targets`: the modules carrying LoRA adapters (lora.target_modules)."""
    if tp_size <= 1:
        return Partition(how="none (tp 1)", model_type="qwen2")
    if section.architecture is not None:
        # The named architectures are Qwen2 shapes: DeepSpeed's own path.
        if section.tp_plan is None and not lora_targets:
            return Partition(how=HOW_AUTO, model_type="qwen2")
        from transformers import Qwen2Config

        mconf = Qwen2Config()
    else:
        mconf = hf_config(section)
    partition = resolve_partition(section, mconf, tp_size)
    if lora_targets:
        partition = with_lora(partition, lora_targets, mconf)
    return partition


def tensor_parallel_block(
    section: ModelSection,
    tp_size: int,
    lora_targets: frozenset[str] = frozenset(),
    vocab_parallel: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's `tensor_parallel` config block for this run; `vocab_parallel`: the output head
    split by vocabulary (`vocabulary_split`)."""
    block: dict[str, Any] = {"autotp_size": tp_size}
    partition = partition_for(section, tp_size, lora_targets)
    if partition.partition_config is not None:
        block["partition_config"] = partition.partition_config
    if tp_size > 1:
        # Always said: DeepSpeed's default (None) splits a tied head where the model's plan holds
        # embedding_rowwise and leaves every other head gathered (runtime/engine.py
        # _apply_autotp_partitioning), so one setting would mean different things per family.
        block["vocab_parallel_lm_head"] = vocab_parallel
    return block


# Model types DeepSpeed AutoEP has a preset for (deepspeed/module_inject/auto_ep_presets, 0.19.8):
# its preset names are the Hugging Face model_type.
EXPERT_PRESETS = ("mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3", "qwen3_5_moe", "minimax_m3")


def num_experts(mconf: Any) -> int | None:
    """The routed experts per MoE layer of a Hugging Face config (None: not a mixture of experts)."""
    text = mconf.get_text_config() if hasattr(mconf, "get_text_config") else mconf
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(text, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_expert_parallel(mconf: Any, ep_size: int, tp_size: int, zero_stage: int) -> None:
    """Refuse an ep_size AutoEP cannot run, naming the field and the valid values."""
    if ep_size <= 1:
        return
    kind = getattr(mconf, "model_type", None)
    experts = num_experts(mconf)
    if experts is None:
        raise ConfigError(
            f"parallelism.ep_size: {ep_size}, but the {kind!r} model has no routed experts; set ep_size: 1."
        )
    if kind not in EXPERT_PRESETS:
        raise ConfigError(
            f"parallelism.ep_size: DeepSpeed AutoEP has no preset for {kind!r} models (presets: "
            f"{', '.join(EXPERT_PRESETS)}); set ep_size: 1 (every rank then holds every expert)."
        )
    if experts % ep_size:
        valid = [d for d in range(1, experts + 1) if experts % d == 0]
        raise ConfigError(
            f"parallelism.ep_size: {ep_size} does not divide the model's {experts} experts per layer; "
            f"use ep_size in {valid}."
        )
    if zero_stage == 3 and tp_size > 1:
        raise ConfigError(
            "parallelism.ep_size: DeepSpeed AutoEP with ZeRO-3 excludes AutoTP (tp_size > 1); use "
            "deepspeed.zero_stage 1 or 2, or tp_size: 1."
        )


def expert_parallel_block(section: ModelSection, ep_size: int) -> dict[str, Any] | None:
    """DeepSpeed's `expert_parallel` config block (AutoEP) for ep_size > 1, else None."""
    if ep_size <= 1:
        return None
    kind = hf_config(section).model_type if section.architecture is None else "qwen2"
    return {"enabled": True, "autoep_size": ep_size, "preset_model": kind}


# Modules whose PEFT copy (lora.modules_to_save) would hide the head from DeepSpeed's
# vocabulary-parallel split: it finds the head by its last name (module_inject/auto_tp.py
# _is_lm_head_name), under PEFT's wrapper `modules_to_save.<adapter>`, and a tied embedding by
# sharing the head's weight.
_VOCAB_MODULES = frozenset({*_LM_HEADS, "embed_tokens", "wte", "embed_in"})


def vocabulary_split(cfg: Config, tp_size: int | None = None) -> tuple[bool, str]:
    """Whether AutoTP splits the output head by vocabulary (parallelism.vocab_parallel_loss at
    tp > 1; `tp_size` default parallelism.tp_size), and if not, why: the setting, or LoRA training a
    copy of the head or embedding, or a partition that routes other layers through DeepSpeed's
    head-name list."""
    tp = cfg.parallelism.tp_size if tp_size is None else tp_size
    if tp <= 1:
        return False, "tp 1"
    if not cfg.parallelism.vocab_parallel_loss:
        return False, "parallelism.vocab_parallel_loss: false"
    saved = _VOCAB_MODULES & set(cfg.lora.modules_to_save if cfg.lora.enabled else [])
    if saved:
        return False, f"lora.modules_to_save trains a copy of {sorted(saved)}"
    partition = partition_for(cfg.model, tp, cfg.lora.targets())
    heads = (partition.partition_config or {}).get("lm_head_patterns", _LM_HEADS)
    others = sorted(set(heads) - set(_LM_HEADS))
    if others:
        # DeepSpeed 0.19.8 takes every linear named in lm_head_patterns for the vocabulary head
        # (module_inject/auto_tp.py _is_vocab_parallel_lm_head); the names are there for its
        # replicated-input row layer, so it would find several heads and refuse.
        return False, (
            f"the {partition.model_type} partition's rowwise_split_input layers {others} share DeepSpeed's "
            "head-name list (module_inject/auto_tp.py _is_vocab_parallel_lm_head)"
        )
    return True, ""


# Causal-LM models whose forward applies the head and then the loss with nothing between (no
# soft-capping or scaling of the logits; tests/test_families.py reads each one's forward). For
# these the vocabulary-parallel loss starts from the final hidden states and works in chunks of
# tokens (accel_tp/vocab_parallel.py). Any other model keeps its own forward, and DeepSpeed's
# vocabulary-parallel loss takes the logits slice it computes (deepspeed/sequence/cross_entropy.py).
PLAIN_HEAD_TYPES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "olmo2", "olmo3",
        "starcoder2", "glm", "glm4", "qwen2_moe", "qwen3_moe", "mixtral",
    }
)  # fmt: skip


def plain_head(mconf: Any) -> bool:
    """Whether the model's loss is the head's logits' cross-entropy alone (PLAIN_HEAD_TYPES; an
    MoE model that adds its router's auxiliary loss is not)."""
    return mconf.model_type in PLAIN_HEAD_TYPES and not getattr(mconf, "output_router_logits", False)


def check_against_model(partition: Partition, model: Any) -> None:
    """Every entry of a user's plan must name a module (or parameter) of the model, built on the meta
    device on the driver: a pattern that matches nothing would leave half of a column / row pair
    unsplit. (A model's own plan may name optional modules, e.g. Qwen3-MoE's dense MLP layers.)"""
    if partition.partition_config is None or partition.how != HOW_USER:
        return
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    missing = []
    for pattern, style in partition.plan.items():
        regex = re.compile(to_regex(pattern)[: -len(r"\.weight$")] + "$")
        if not any(regex.match(n) for n in names) and style not in _WHOLE:
            missing.append(pattern)
    if missing:
        raise ConfigError(
            f"model.tp_plan: the tensor-parallel plan's {missing} match no module of the "
            f"{partition.model_type!r} model; fix the patterns (module names like "
            "'layers.*.self_attn.q_proj') or use parallelism.tp_size: 1."
        )


def localize_attention(module: Any, partition: Partition, tp_size: int) -> int:
    """After sharding: attention modules that read head counts from their config (Phi-3 slices its
    fused qkv output at config.num_attention_heads x head_dim) get a copy of the config with this
    rank's head counts. The model's own config (saved by the export) keeps the whole counts.
    Returns how many modules were changed."""
    import copy

    if tp_size <= 1 or PACKED_QKV not in partition.plan.values():
        return 0
    changed = 0
    for sub in module.modules():
        if type(sub).__name__ == "Phi3Attention":
            local = copy.copy(sub.config)
            local.num_attention_heads = sub.config.num_attention_heads // tp_size
            local.num_key_value_heads = sub.config.num_key_value_heads // tp_size
            sub.config = local
            changed += 1
    return changed
