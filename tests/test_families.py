"""Every decoder family: TP with parity, or a clear error on the driver.

Each family is a tiny random-init model written by `save_pretrained` to a temp folder (with the
local BPE tokenizer) and trained for 12 steps in fp32 through the product, at tp2 x dp1 (2 gloo
processes, one `accelerate launch` for all families: tests/workers/train_families.py) and at tp1
(one process, likewise), against the independent single-process loop (tests/reference.py):
losses within 2e-6 relative, gradient norms within 5e-5 (the bounds and their reasons:
tests/test_multiprocess.py). The tp2 runs also export the model (`checkpoint.export_hf`), whose
logits in one plain process must equal the TP model's, and report the class and local shape of
every linear layer, so the partition each family claims (docs/families.md, "Tested") is checked
rather than assumed. The unit tests at the bottom cover the partition choice, the attention
kernel check and the refusals, which need no processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from accel_tp.config import ConfigError, ModelSection, config_from_dict, load_config
from accel_tp.env import free_port
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.families import (
    HOW_AUTO,
    HOW_DERIVED,
    HOW_FAMILY,
    HOW_HEURISTIC,
    HOW_USER,
    PLAIN_HEAD_TYPES,
    hf_config,
    plain_head,
    resolve_partition,
    tensor_parallel_block,
    to_regex,
    vocabulary_split,
)
from accel_tp.run_folder import EXPORT_DIR, METRICS_FILE

from .mp_utils import ROOT, TINY, read_metrics, run, set_args
from .reference import reference_run

STEPS = 12
GLOBAL_BATCH = 4
MICRO = 2
RTOL = 2e-6
GRAD_NORM_RTOL = 5e-5

# Tiny shapes: 4 query heads over 2 kv heads (tp2 splits them), 2 layers.
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# family -> (transformers config class, its extra settings, how it is partitioned at tp 2)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", {}, HOW_AUTO),
    "mistral": ("MistralConfig", {"sliding_window": 16}, HOW_AUTO),
    "qwen2": ("Qwen2Config", {}, HOW_AUTO),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, HOW_AUTO),
    "gemma": ("GemmaConfig", {"head_dim": 16}, HOW_AUTO),  # tied embeddings
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16}, HOW_AUTO),  # eager only
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16}, HOW_AUTO),
    "phi3": ("Phi3Config", {}, HOW_FAMILY),
    "olmo2": ("Olmo2Config", {}, HOW_DERIVED),
    "granite": (
        "GraniteConfig",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0625,
            "logits_scaling": 8.0,
        },
        HOW_AUTO,
    ),
    "starcoder2": ("Starcoder2Config", {}, HOW_AUTO),
    "glm4": ("Glm4Config", {}, HOW_FAMILY),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48},
        HOW_DERIVED,
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, HOW_DERIVED),
}
# What tp2 must have done to each linear layer, by the last part of its name ("column": output
# rows split, "row": input columns split, "whole": on every rank). Unlisted families: ATTN_MLP.
ATTN_MLP = {
    "q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
    "gate_proj": "column", "up_proj": "column", "down_proj": "row",
}  # fmt: skip
LAYOUTS: dict[str, dict[str, str]] = {
    "starcoder2": {**{k: v for k, v in ATTN_MLP.items() if "_proj" in k and k[0] in "qkvo"}, "c_fc": "column", "c_proj": "row"},
    "phi3": {"qkv_proj": "column", "o_proj": "row", "gate_up_proj": "column", "down_proj": "row"},
    "glm4": {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row", "gate_up_proj": "column", "down_proj": "row"},
    "qwen3_moe": {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"},
    "mixtral": {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"},
}  # fmt: skip


# The embedding and the output head at tp2 (parallelism.vocab_parallel_loss, on by default): the
# head is split by vocabulary in every family, a tied embedding with it (the same rows), an untied
# one stays whole (docs/families.md).
def _heads(model_dir: Path) -> tuple[str, str]:
    from transformers import AutoConfig

    tied = AutoConfig.from_pretrained(model_dir).get_text_config().tie_word_embeddings
    return ("column" if tied else "whole", "column")


# A user's own plan (model.tp_plan) for Llama: attention split, MLP left whole.
USER_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
# OLMo-2 split the naive way: q/k head-sharded, their norms left whole (all DeepSpeed can do with a
# norm: AutoTP partitions only linear and embedding weights; a norm can be skipped, optionally with
# its gradient summed). The norms are over the whole projection (Olmo2RMSNorm(num_heads * head_dim)).
NAIVE_OLMO2 = {**USER_PLAN, "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
               "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce"}  # fmt: skip


def _overrides(
    cache: Path, out: Path, model_dir: Path, name: str, tp: int, export: bool
) -> dict[str, object]:
    return {
        "run.seed": 7,
        "run.name": name,
        "run.output_dir": str(out),
        "data.cache_dir": str(cache),
        "data.seq_length": 64,
        "data.eval_fraction": 0.05,
        "deepspeed.precision": "fp32",
        "deepspeed.gradient_clipping": 1.0,
        "train.max_steps": STEPS,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-3,
        "train.weight_decay": 0.1,
        "train.micro_batch_size": MICRO,
        "train.grad_accum_steps": GLOBAL_BATCH // MICRO,
        "train.log_every": 1,
        "train.progress_bar": False,
        "train.log_with": [],
        "checkpoint.every_steps": 0,
        "checkpoint.at_end": False,
        "checkpoint.export_hf": export,
        "model.architecture": None,
        "model.tokenizer": None,
        "model.name_or_path": str(model_dir),
        "parallelism.tp_size": tp,
        "parallelism.dp_size": 1,
    }


def _set_list(overrides: dict[str, object]) -> list[str]:
    return [a for a in set_args(overrides) if a != "--set"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny random-init model, saved with the local BPE tokenizer."""
    import transformers

    from accel_tp.corpus import build_default_tokenizer

    root = tmp_path_factory.mktemp("zoo")
    tok = build_default_tokenizer(root / "tokenizer")
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    out = {}
    for family, (config_cls, extra, _) in FAMILIES.items():
        config = getattr(transformers, config_cls)(**COMMON, **ids, vocab_size=len(tok), **extra)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
            root / family
        )
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


def _runs(zoo, tp: int, tmp_path_factory) -> dict[str, dict]:
    """All families (tp2: also the two user plans) trained in one launch of `tp` processes."""
    out = tmp_path_factory.mktemp(f"tp{tp}")
    cache = tmp_path_factory.getbasetemp() / "families-cache"
    jobs = {f: _overrides(cache, out, zoo[f], f"{f}-tp{tp}", tp, export=tp > 1) for f in FAMILIES}
    if tp > 1:
        jobs["llama-user-plan"] = {
            **_overrides(cache, out, zoo["llama"], "llama-user-plan", tp, False),
            "model.tp_plan": USER_PLAN,
        }
        # The head gathered (vocabulary-parallel loss off): a tied pair whole, an untied head's logits gathered.
        for family in ("gemma", "llama"):
            jobs[f"{family}-gathered-head"] = {
                **_overrides(cache, out, zoo[family], f"{family}-gathered-head", tp, False),
                "parallelism.vocab_parallel_loss": False,
            }
        jobs["olmo2-naive-plan"] = {
            **_overrides(cache, out, zoo["olmo2"], "olmo2-naive-plan", tp, False),
            "model.tp_plan": NAIVE_OLMO2,
        }
    spec = out / "runs.json"
    expect_error = {"olmo2-naive-plan"}
    spec.write_text(
        json.dumps([{"set": _set_list(ov), "expect_error": k in expect_error} for k, ov in jobs.items()])
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", str(tp),
        "--main_process_port", str(free_port()), str(ROOT / "tests" / "workers" / "train_families.py"),
        str(TINY), str(spec),
    ]  # fmt: skip
    proc = run(cmd, timeout=1500)
    assert proc.returncode == 0, f"tp{tp} family runs failed"
    done = {}
    for key, ov in jobs.items():
        run_dir = out / str(ov["run.name"])
        done[key] = {
            "overrides": ov,
            "dir": run_dir,
            "metrics": read_metrics(run_dir / METRICS_FILE) if key not in expect_error else [],
            "shards": json.loads((run_dir / "shards.json").read_text()),
            "error": (run_dir / "error.txt").read_text() if key in expect_error else None,
        }
    return done


@pytest.fixture(scope="module")
def tp2_runs(zoo, tmp_path_factory):
    return _runs(zoo, 2, tmp_path_factory)


@pytest.fixture(scope="module")
def tp1_runs(zoo, tmp_path_factory):
    return _runs(zoo, 1, tmp_path_factory)


@pytest.fixture(scope="module")
def references(zoo, tmp_path_factory):
    """The independent loop per family (the same global batches as every layout)."""
    cache = tmp_path_factory.getbasetemp() / "families-cache"
    out = tmp_path_factory.mktemp("ref")
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            ov = _overrides(cache, out, zoo[family], family, 1, False)
            cfg = load_config(
                TINY, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]
            )
            done[family] = reference_run(cfg, GLOBAL_BATCH)
        return done[family]

    return get


def _assert_close(got: list[float], want: list[float], rtol: float) -> float:
    assert len(got) == len(want) == STEPS
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= rtol, f"max relative difference {worst:.2e} > {rtol:.0e}\n got {got}\nwant {want}"
    return worst


def _kind(local: list[int], full: list[int]) -> str:
    if local == full:
        return "whole"
    assert len(local) == len(full) == 2, (local, full)
    if local[0] < full[0] and local[1] == full[1]:
        return "column"
    if local[1] < full[1] and local[0] == full[0]:
        return "row"
    raise AssertionError(f"unexpected shard {local} of {full}")


def _full_shapes(model_dir: Path) -> dict[str, list[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {
        n: list(m.weight.shape) for n, m in model.named_modules() if getattr(m, "weight", None) is not None
    }


def _layout(shards: dict[str, list], model_dir: Path) -> dict[str, set[str]]:
    """Last name part -> the kinds of split found on this rank (one kind expected per name)."""
    full = _full_shapes(model_dir)
    kinds: dict[str, set[str]] = {}
    for name, (_, shape) in shards.items():
        kinds.setdefault(name.split(".")[-1], set()).add(_kind(shape, full[name]))
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_parity_and_partition(tp2_runs, references, zoo, family):
    got, ref = tp2_runs[family], references(family)
    worst = _assert_close([m["loss"] for m in got["metrics"]], ref["losses"], RTOL)
    worst_norm = _assert_close([m["grad_norm"] for m in got["metrics"]], ref["grad_norms"], GRAD_NORM_RTOL)
    print(f"[families] {family} tp2: loss {worst:.2e}, grad norm {worst_norm:.2e}")
    # The loss must move, or parity proves nothing (Granite's logits_scaling and Gemma's tied,
    # scaled embedding move slowest: -0.014 and -0.06 over the 12 steps).
    assert ref["losses"][-1] < ref["losses"][0] - 0.01
    assert got["metrics"][-1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL)
    kinds = _layout(got["shards"], zoo[family])
    embed, head = _heads(zoo[family])
    for name, kind in {**LAYOUTS.get(family, ATTN_MLP), "embed_tokens": embed, "lm_head": head}.items():
        assert kinds.get(name) == {kind}, f"{family}: {name} is {kinds.get(name)}, expected {kind}"
    # The claimed partition: DeepSpeed's own path only where its converter takes the model.
    section = ModelSection(name_or_path=str(zoo[family]))
    assert resolve_partition(section, hf_config(section), 2).how == FAMILIES[family][2]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_export_logits(tp2_runs, family):
    """The consolidated export loads as a plain HF model in one process and gives the trained TP
    model's logits and loss on a training batch."""
    from transformers import AutoModelForCausalLM

    export = tp2_runs[family]["dir"] / EXPORT_DIR
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    check = torch.load(export / EXPORT_CHECK_FILE)
    with torch.no_grad():
        out = model(**check["batch"])
    assert out.loss.item() == pytest.approx(check["loss"], rel=1e-6)
    # A vocab-parallel head (tied Gemma-3, Starcoder2) leaves each rank a slice of the vocabulary;
    # the export check gathers them, so every family's check holds the whole vocabulary.
    assert check["logits"].shape == out.logits.shape
    torch.testing.assert_close(out.logits, check["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_parity(tp1_runs, references, family):
    got, ref = tp1_runs[family], references(family)
    worst = _assert_close([m["loss"] for m in got["metrics"]], ref["losses"], RTOL)
    print(f"[families] {family} tp1: loss {worst:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_tp2_gathered_head(tp2_runs, references, zoo, family):
    """parallelism.vocab_parallel_loss: false keeps the whole-vocabulary logits on every rank (a
    tied embedding and head whole, an untied head column-split with its logits gathered): the
    same losses as the reference."""
    got = tp2_runs[f"{family}-gathered-head"]
    _assert_close([m["loss"] for m in got["metrics"]], references(family)["losses"], RTOL)
    kinds = _layout(got["shards"], zoo[family])
    tied = _heads(zoo[family])[0] == "column"
    assert kinds["embed_tokens"] == {"whole"}
    assert kinds["lm_head"] == ({"whole"} if tied else {"column"})


@pytest.mark.slow
def test_user_plan_is_what_trains(tp2_runs, references, zoo):
    """model.tp_plan replaces the model's plan: Llama with its MLP left whole still matches."""
    got = tp2_runs["llama-user-plan"]
    _assert_close([m["loss"] for m in got["metrics"]], references("llama")["losses"], RTOL)
    kinds = _layout(got["shards"], zoo["llama"])
    assert kinds["q_proj"] == {"column"} and kinds["o_proj"] == {"row"}
    assert kinds["gate_proj"] == kinds["up_proj"] == kinds["down_proj"] == {"whole"}


@pytest.mark.slow
def test_olmo2_norms_cannot_be_sharded_per_head(tp2_runs, zoo):
    """Why OLMo-2's q/k/v outputs are gathered (its HF plan, which accel-tp converts): split by
    heads, each rank holds half of q (32 of 64 features here), and the whole q_norm (weight of 64,
    a mean square over all 64) cannot be applied to it: the first forward fails on the shapes.
    Slicing the weight would not help either: each half would be normalised by its own mean
    square instead of the whole projection's, i.e. another model."""
    got = tp2_runs["olmo2-naive-plan"]
    assert _layout(got["shards"], zoo["olmo2"])["q_proj"] == {"column"}
    assert got["error"].startswith(
        "RuntimeError: The size of tensor a (64) must match the size of tensor b (32)"
    )


# ------------------------------------------------------------------------------------------ unit


def _config(family: str, **kw):
    import transformers

    config_cls, extra, _ = FAMILIES[family]
    return getattr(transformers, config_cls)(**COMMON, vocab_size=256, pad_token_id=0, **{**extra, **kw})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_partition_choice(family):
    part = resolve_partition(ModelSection(name_or_path="x"), _config(family), 2)
    assert part.how == FAMILIES[family][2]
    assert (part.partition_config is None) == (part.how == HOW_AUTO)
    assert resolve_partition(ModelSection(name_or_path="x"), _config(family), 1).partition_config is None


def test_rowwise_split_input_goes_to_deepspeeds_replicated_input_row_layer():
    """OLMo-2's o_proj takes the whole (gathered) attention output: a row layer that slices its
    input, which DeepSpeed builds for lm_head_patterns names only."""
    pc = resolve_partition(ModelSection(name_or_path="x"), _config("olmo2"), 2).partition_config
    assert pc["lm_head_patterns"] == ["lm_head", "embed_out", "o_proj"]
    specs = {s["patterns"][0]: s for s in pc["layer_specs"]}
    q = specs[to_regex("layers.*.self_attn.q_proj")]
    assert q["partition_type"] == "column" and q["gather_output"] is True
    assert specs[to_regex("layers.*.self_attn.o_proj")]["partition_type"] == "row"


def test_moe_experts_stay_whole():
    part = resolve_partition(ModelSection(name_or_path="x"), _config("mixtral"), 2)
    # transformers 5.17 lists the experts in Mixtral's plan (kept whole here); 5.25 no longer does.
    experts = {k: v for k, v in part.plan.items() if ".experts" in k}
    assert all(v == "replicate" for v in experts.values()), experts
    assert part.plan["layers.*.self_attn.q_proj"] == "colwise"
    assert any("experts replicated" in n for n in part.notes)


def test_pattern_regex_matches_whole_segments():
    import re

    rx = re.compile(to_regex("layers.*.mlp.up_proj"))
    assert rx.match("model.layers.3.mlp.up_proj.weight")
    assert not rx.match("model.layers.3.mlp.up_proj_extra.weight")
    assert not rx.match("model.xlayers.3.mlp.up_proj.weight")


def test_unmappable_style_is_refused_with_what_works():
    from transformers import DeepseekV2Config

    with pytest.raises(ConfigError) as e:
        resolve_partition(ModelSection(name_or_path="x"), DeepseekV2Config(), 2)
    msg = str(e.value)
    assert msg.startswith("model.name_or_path:") and "mla_kv_a_proj" in msg and "tp_size: 1" in msg
    # tp 1 needs no partition: the same model trains there.
    assert resolve_partition(ModelSection(name_or_path="x"), DeepseekV2Config(), 1).partition_config is None


def test_model_without_plan_keeps_deepspeeds_heuristics():
    from transformers import GPT2Config

    part = resolve_partition(ModelSection(name_or_path="x"), GPT2Config(), 2)
    assert part.how == HOW_HEURISTIC and part.partition_config is None


def test_user_plan_field_validated():
    with pytest.raises(ConfigError, match="model.tp_plan: {'layers.*.mlp.up_proj': 'sequence_parallel'}"):
        config_from_dict(
            {"model": {"name_or_path": "x", "tp_plan": {"layers.*.mlp.up_proj": "sequence_parallel"}}}
        )
    with pytest.raises(ConfigError, match="model.tp_plan: empty"):
        config_from_dict({"model": {"name_or_path": "x", "tp_plan": {}}})
    cfg = config_from_dict({"model": {"name_or_path": "x", "tp_plan": USER_PLAN}})
    part = resolve_partition(cfg.model, _config("llama"), 2)
    assert part.how == HOW_USER and part.plan == USER_PLAN


def test_user_plan_clash_refused():
    plan = {"layers.*.self_attn.o_proj": "rowwise_split_input", "layers.*.cross_attn.o_proj": "rowwise"}
    with pytest.raises(ConfigError, match=r"model.tp_plan: \['o_proj'\] name both"):
        resolve_partition(ModelSection(name_or_path="x", tp_plan=plan), _config("llama"), 2)


def test_named_architecture_block_is_deepspeeds_own():
    section = ModelSection(architecture="tiny", tokenizer="default")
    # Always said at tp > 1: DeepSpeed's own default (None) splits only some tied heads.
    assert tensor_parallel_block(section, 2) == {"autotp_size": 2, "vocab_parallel_lm_head": False}
    assert tensor_parallel_block(section, 2, vocab_parallel=True)["vocab_parallel_lm_head"] is True
    assert tensor_parallel_block(section, 1) == {"autotp_size": 1}


def test_vocabulary_split_rules(tmp_path):
    """parallelism.vocab_parallel_loss at tp > 1 splits the head, unless turned off, unless LoRA
    trains a copy of the head, unless the partition routes rowwise_split_input layers through
    DeepSpeed's head-name list (OLMo-2's plan); each refusal says why."""
    _config("olmo2").save_pretrained(tmp_path / "olmo2")
    _config("llama").save_pretrained(tmp_path / "llama")

    def cfg(model: str, **kw: object):
        d: dict = {"model": {"name_or_path": str(tmp_path / model)}, "parallelism": {"tp_size": 2}}
        for k, v in kw.items():
            section, key = k.split("__")
            d.setdefault(section, {})[key] = v
        return config_from_dict(d)

    assert vocabulary_split(cfg("llama")) == (True, "")
    assert vocabulary_split(cfg("llama", parallelism__tp_size=1)) == (False, "tp 1")
    assert vocabulary_split(cfg("llama", parallelism__vocab_parallel_loss=False))[1] == (
        "parallelism.vocab_parallel_loss: false"
    )
    split, why = vocabulary_split(cfg("llama", lora__enabled=True, lora__modules_to_save=["lm_head"]))
    assert not split and "lm_head" in why
    split, why = vocabulary_split(cfg("olmo2"))
    assert not split and "rowwise_split_input" in why and "o_proj" in why


def _between_head_and_loss(cls: type) -> list[str]:
    import inspect

    src = inspect.getsource(cls.forward)
    body = src[src.index("self.lm_head(") :]
    body = body[: body.index("loss = self.loss_function(")]
    return [ln.strip() for ln in body.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_TYPES))
def test_plain_head_types_apply_the_head_then_the_loss(model_type):
    """The vocabulary-parallel loss replaces the forward's head-and-loss for PLAIN_HEAD_TYPES: their
    forward (in the installed transformers) may do nothing to the logits in between."""
    import importlib

    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    classes = [c for n, c in vars(mod).items() if n.endswith("ForCausalLM") and isinstance(c, type)]
    assert classes
    for cls in classes:
        assert _between_head_and_loss(cls) == ["loss = None", "if labels is not None:"], cls


def test_logit_transforming_families_are_not_plain():
    from transformers import Gemma2ForCausalLM, GraniteForCausalLM

    for cls in (Gemma2ForCausalLM, GraniteForCausalLM):
        assert len(_between_head_and_loss(cls)) > 2  # soft-capping, scaling: DeepSpeed's loss
    assert not plain_head(_config("gemma2")) and not plain_head(_config("granite"))
    assert plain_head(_config("mixtral")) and not plain_head(_config("mixtral", output_router_logits=True))


def test_preflight_refuses_a_user_plan_naming_no_module(tmp_path, zoo):
    """On the driver, with the model built on the meta device: a pattern that matches nothing."""
    from accel_tp.launch import preflight

    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.attn.out": "rowwise"}
    ov = _overrides(tmp_path, tmp_path, zoo["llama"], "x", 2, False) | {"model.tp_plan": plan}
    cfg = load_config(TINY, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()])
    with pytest.raises(
        ConfigError, match=r"model.tp_plan: the tensor-parallel plan's \['layers.\*.attn.out'\]"
    ):
        preflight(cfg, 2)


def test_preflight_refuses_unsupported_attention(tmp_path, zoo):
    from accel_tp.launch import preflight

    ov = _overrides(tmp_path, tmp_path, zoo["gemma2"], "x", 2, False) | {"model.attn_implementation": "sdpa"}
    cfg = load_config(TINY, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()])
    with pytest.raises(
        ConfigError, match=r"model.attn_implementation: the Gemma2 model does not support 'sdpa'"
    ):
        preflight(cfg, 2)


def test_unsplittable_model_fails_on_the_driver_in_one_line(tmp_path, default_tokenizer):
    """A family accel-tp cannot split (DeepSeek-V2: mla_kv_a_proj) through the Ray entry point at
    tp2: exit 2 and one line naming the field and what works, before Ray starts (no worker, no
    stack trace). Only the config and tokenizer are needed: the decision reads the config."""
    import subprocess
    import time

    from transformers import DeepseekV2Config

    from .mp_utils import _env

    DeepseekV2Config(vocab_size=len(default_tokenizer), hidden_size=64, num_hidden_layers=2).save_pretrained(
        tmp_path
    )
    default_tokenizer.save_pretrained(tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY)]
    for s in (f"model.name_or_path={tmp_path}", "model.architecture=null", "model.tokenizer=null",
              "parallelism.dp_size=1", f"ray.storage_path={tmp_path / 'ray'}", f"data.cache_dir={tmp_path / 'c'}"):  # fmt: skip
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(err) == 1 and "model.name_or_path:" in err[0] and "mla_kv_a_proj" in err[0], proc.stderr
    assert "parallelism.tp_size: 1" in err[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "Ray" not in proc.stdout
    print(f"refused in {time.perf_counter() - t0:.1f} s")  # measured, not asserted (machine load)
