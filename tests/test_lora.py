"""LoRA on AutoTP x ZeRO (accel_tp/lora.py): parity, shards, resume, export; and the unit rules.

One `accelerate launch` of 4 gloo processes (tests/workers/train_families.py) trains, in fp32 through
the product, with dropout 0:

* the tiny Qwen2 shape with adapters on every attention and MLP projection at tp2 x dp2 ZeRO-1, 2
  and 3 and tp1 x dp4 ZeRO-1; five families (Llama, Qwen2, Mistral, Qwen3, Phi-3 with its fused
  qkv and gate_up) at tp2 x dp2; chat SFT with document packing and assistant-only loss at tp2 x dp2;
* resumes of the tp2 x dp2 ZeRO-1 run's step-6 checkpoint: on the same layout, on tp1 x dp4 and on
  ZeRO-2.

Each is compared with the independent single-process loop (tests/reference.py, plain transformers
+ peft + torch AdamW, no accel-tp code) on the same global batches: losses 1e-5 relative, gradient
norms 5e-5 (as tests/test_multiprocess.py), held-out loss 1e-5, and each trained adapter tensor
within 1e-3 (||delta|| / ||ref||: Adam moves near-zero-gradient elements by float noise).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from accel_tp.checkpoint.format import DS_TAG, model_states_file, step_name
from accel_tp.config import ConfigError, LoraSection, config_from_dict, load_config
from accel_tp.env import free_port
from accel_tp.export import EXPORT_CHECK_FILE
from accel_tp.run_folder import ADAPTER_DIR, CHECKPOINTS_DIR, EXPORT_DIR, METRICS_FILE

from .mp_utils import ROOT, TINY, read_metrics, run, set_args
from .reference import reference_run
from .reference_chat import reference_chat_run
from .test_families import COMMON  # the tiny family shapes (4 query / 2 kv heads)

STEPS = 12
GLOBAL_BATCH = 4
MICRO = 1
RTOL = 1e-5
GRAD_NORM_RTOL = 5e-5
ADAPTER_RTOL = 1e-3
SFT = ROOT / "accelerate_configs" / "sft_tiny_tp2_dp2.yaml"
CHAT_MARKER = "<|endoftext|>"
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {
    "llama": ("LlamaConfig", {}, ATTN_MLP),
    "qwen2": ("Qwen2Config", {}, ATTN_MLP),
    "mistral": ("MistralConfig", {"sliding_window": 16}, ATTN_MLP),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ATTN_MLP),
    "phi3": ("Phi3Config", {}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
# The split of each base layer at tp2 by its last name: "column" (output rows) or "row" (input columns).
SPLIT = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "qkv_proj": "column",
         "gate_proj": "column", "up_proj": "column", "gate_up_proj": "column",
         "o_proj": "row", "down_proj": "row"}  # fmt: skip
R = 4


def _common(cache: Path, out: Path, name: str, tp: int, dp: int, zero: int) -> dict[str, object]:
    return {
        "run.seed": 7,
        "run.name": name,
        "run.output_dir": str(out),
        "data.cache_dir": str(cache),
        "data.seq_length": 64,
        "data.eval_fraction": 0.05,
        "deepspeed.precision": "fp32",
        "deepspeed.gradient_clipping": 1.0,
        "deepspeed.zero_stage": zero,
        "train.max_steps": STEPS,
        "train.warmup_steps": 2,
        "train.learning_rate": 5e-3,
        "train.weight_decay": 0.1,
        "train.micro_batch_size": MICRO,
        "train.grad_accum_steps": GLOBAL_BATCH // (MICRO * dp),
        "train.log_every": 1,
        "train.progress_bar": False,
        "train.log_with": [],
        "train.eval_every": 0,
        "checkpoint.every_steps": 0,
        "checkpoint.at_end": False,
        "checkpoint.export_hf": False,
        "parallelism.tp_size": tp,
        "parallelism.dp_size": dp,
        "lora.enabled": True,
        "lora.r": R,
        "lora.alpha": 16,
        "lora.target_modules": ATTN_MLP,
    }


def _family(cache: Path, out: Path, family: str, model_dir: Path) -> dict[str, object]:
    return {
        **_common(cache, out, f"{family}-lora", 2, 2, 1),
        "model.architecture": None,
        "model.tokenizer": None,
        "model.name_or_path": str(model_dir),
        "lora.target_modules": FAMILIES[family][2],
        "checkpoint.export_hf": "both",
    }


def _chat(cache: Path, out: Path) -> dict[str, object]:
    return {
        **_common(cache, out, "chat-lora", 2, 2, 1),
        "data.seq_length": 128,
        "data.packing": "document",
        "run.seed": 11,
    }


def _set_list(overrides: dict[str, object]) -> list[str]:
    return [a for a in set_args(overrides) if a != "--set"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    import transformers

    from accel_tp.corpus import build_default_tokenizer

    root = tmp_path_factory.mktemp("lora-zoo")
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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-cache")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cache, zoo) -> dict[str, dict]:
    """name -> (overrides, base YAML) of every run of the one launch."""
    out = tmp_path_factory.mktemp("lora-runs")
    runs: dict[str, tuple[dict, Path]] = {}
    main = {
        **_common(cache, out, "tp2dp2-z1", 2, 2, 1),
        "checkpoint.every_steps": 6,
        "checkpoint.export_hf": "both",
    }
    runs["tp2dp2-z1"] = (main, TINY)
    runs["tp1dp4-z1"] = (_common(cache, out, "tp1dp4-z1", 1, 4, 1), TINY)
    runs["tp2dp2-z2"] = (_common(cache, out, "tp2dp2-z2", 2, 2, 2), TINY)
    runs["tp2dp2-z3"] = (
        {
            **_common(cache, out, "tp2dp2-z3", 2, 2, 3),
            "checkpoint.export_hf": "merged",
            "checkpoint.at_end": True,
        },
        TINY,
    )
    ckpt = out / "tp2dp2-z1" / CHECKPOINTS_DIR / step_name(6)
    for name, (tp, dp, zero) in {
        "resume-same": (2, 2, 1),
        "resume-tp1dp4": (1, 4, 1),
        "resume-z2": (2, 2, 2),
    }.items():
        runs[name] = (
            {
                **_common(cache, out, name, tp, dp, zero),
                "checkpoint.resume_from": str(ckpt),
                "checkpoint.allow_external_resume": True,
            },
            TINY,
        )
    for family in FAMILIES:
        runs[f"{family}-lora"] = (_family(cache, out, family, zoo[family]), TINY)
    runs["chat-lora"] = (_chat(cache, out), SFT)
    return {"out": out, "runs": runs}


@pytest.fixture(scope="module")
def launched(jobs) -> dict[str, dict]:
    """Two launches of 4 processes: the tp2 runs, then the tp1 ones (DeepSpeed keeps its TP
    groups process-wide, so one process does not switch AutoTP sizes)."""
    out, runs = jobs["out"], jobs["runs"]
    stdout = ""
    for tp in (2, 1):
        spec = out / f"runs-tp{tp}.json"
        chosen = [(ov, base) for ov, base in runs.values() if ov["parallelism.tp_size"] == tp]
        spec.write_text(
            json.dumps(
                [{"set": _set_list(ov), "expect_error": False, "config": str(base)} for ov, base in chosen]
            )
        )
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "4",
            "--main_process_port", str(free_port()), str(ROOT / "tests" / "workers" / "train_families.py"),
            str(TINY), str(spec),
        ]  # fmt: skip
        proc = run(cmd, timeout=1800)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        stdout += proc.stdout
    done = {}
    for name in runs:
        d = out / name
        done[name] = {
            "dir": d,
            "metrics": read_metrics(d / METRICS_FILE),
            "shards": json.loads((d / "shards.json").read_text()),
        }
    done["_stdout"] = stdout
    return done


@pytest.fixture(scope="module")
def reference(jobs):
    cached: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cached:
            ov, base = jobs["runs"][name]
            ov = {k: v for k, v in ov.items() if not k.startswith("checkpoint.")}
            cfg = load_config(base, _set_list(ov))
            if name.startswith("chat"):
                cached[name] = reference_chat_run(cfg, GLOBAL_BATCH, CHAT_MARKER)
            else:
                cached[name] = reference_run(cfg, GLOBAL_BATCH)
        return cached[name]

    return get


def worst(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


pytestmark = pytest.mark.slow

PARITY = ["tp2dp2-z1", "tp1dp4-z1", "tp2dp2-z2", "tp2dp2-z3", *[f"{f}-lora" for f in FAMILIES], "chat-lora"]


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_peft_reference(launched, reference, name):
    got, ref = launched[name]["metrics"], reference(name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert worst([m["loss"] for m in got], ref["losses"]) <= RTOL
    assert worst([m["grad_norm"] for m in got], ref["grad_norms"]) <= GRAD_NORM_RTOL
    assert got[-1]["eval_loss"] == pytest.approx(ref["eval_loss"], rel=RTOL)
    # Training moved the loss, so parity says something.
    assert ref["losses"][-1] < ref["losses"][0] - 0.05


@pytest.mark.parametrize("name", ["tp2dp2-z1", *[f"{f}-lora" for f in FAMILIES]])
def test_trained_adapters_match_the_reference(launched, reference, name):
    from safetensors.torch import load_file

    got = load_file(str(launched[name]["dir"] / ADAPTER_DIR / "adapter_model.safetensors"))
    want = reference(name)["trained"]
    assert set(got) == set(want)
    for key, ref in want.items():
        rel = float((got[key] - ref).norm() / ref.norm())
        assert rel <= ADAPTER_RTOL, f"{key}: ||delta|| / ||ref|| = {rel:.2e}"
    # lora_B starts at zero: training moved every one of them.
    assert all(float(v.norm()) > 1e-3 for k, v in got.items() if ".lora_B." in k)


@pytest.mark.parametrize("name", ["tp2dp2-z1", *[f"{f}-lora" for f in FAMILIES]])
def test_adapter_shards_follow_their_base_layer(launched, name):
    """Rank 0's modules after AutoTP: a column-split base has lora_A whole and lora_B split on the
    output; a row-split base has lora_A split on the input and lora_B whole; the base weights,
    frozen, carry no gradient."""
    shards = launched[name]["shards"]
    wrapped = [n.removesuffix(".base_layer") for n in shards if n.endswith(".base_layer")]
    assert wrapped, "no PEFT wrapper reached AutoTP"
    for module in wrapped:
        last = module.rsplit(".", 1)[-1]
        base_cls, (out_rows, in_cols) = shards[f"{module}.base_layer"]
        a_cls, a_shape = shards[f"{module}.lora_A.default"]
        b_cls, b_shape = shards[f"{module}.lora_B.default"]
        if SPLIT[last] == "column":
            assert a_shape == [R, in_cols] and a_cls == "Linear", (module, a_cls, a_shape)
            assert b_shape == [out_rows, R] and b_cls != "Linear", (module, b_cls, b_shape)
            assert base_cls != "Linear"
        else:
            assert a_shape == [R, in_cols] and a_cls == "LinearAllreduce", (module, a_cls, a_shape)
            assert b_shape[1] == R and b_cls == "Linear", (module, b_cls, b_shape)
            assert base_cls == "LinearAllreduce"
    # Split for real: the tp2 base holds half of the whole layer (the export has the whole).
    from safetensors.torch import load_file

    if (launched[name]["dir"] / EXPORT_DIR).is_dir():
        whole = load_file(str(launched[name]["dir"] / EXPORT_DIR / "model.safetensors"))
        module = wrapped[0]
        full = whole[f"{module}.weight"].shape
        local = shards[f"{module}.base_layer"][1]
        assert local[0] * local[1] * 2 == full[0] * full[1]


def test_checkpoint_holds_adapters_not_the_frozen_base(launched):
    """The step-6 checkpoint's module files hold the adapters only; its optimizer partitions only
    their fp32 state (ZeRO-1)."""
    ckpt = launched["tp2dp2-z1"]["dir"] / CHECKPOINTS_DIR / step_name(6) / DS_TAG
    states = torch.load(ckpt / model_states_file(0), weights_only=False, map_location="cpu")
    module = states["module"]
    assert module and all(".lora_" in k for k in module), sorted(module)[:5]
    trained = sum(v.numel() for v in module.values())
    base_numel = 1_000_000  # the tiny model's frozen base is ~1.9M elements; the adapters far fewer
    assert trained < base_numel / 10


@pytest.mark.parametrize("name", ["resume-same", "resume-tp1dp4", "resume-z2"])
def test_resume_continues_the_run(launched, reference, name):
    full = launched["tp2dp2-z1"]["metrics"]
    got = launched[name]["metrics"]
    assert [m["step"] for m in got] == list(range(7, STEPS + 1))
    if name == "resume-same":
        # Same processes, kernels and position: bit-identical.
        assert [(m["loss"], m["grad_norm"]) for m in got] == [(m["loss"], m["grad_norm"]) for m in full[6:]]
    ref = reference("tp2dp2-z1")
    assert worst([m["loss"] for m in got], ref["losses"][6:]) <= RTOL
    assert worst([m["grad_norm"] for m in got], ref["grad_norms"][6:]) <= GRAD_NORM_RTOL


@pytest.mark.parametrize("name", ["tp2dp2-z1", "tp2dp2-z3", *[f"{f}-lora" for f in FAMILIES]])
def test_exports_reproduce_the_tp_model(launched, zoo, name):
    """The merged model (hf/) and base + PEFT adapter (adapter/, PeftModel.from_pretrained) give
    the TP model's logits on the export check batch (rtol 1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from accel_tp.model import build_model, model_config

    d = launched[name]["dir"]
    exported = [p for p in (d / EXPORT_DIR, d / ADAPTER_DIR) if p.is_dir()]
    assert exported
    for folder in exported:
        check = torch.load(folder / EXPORT_CHECK_FILE, weights_only=True)
        batch = {k: v for k, v in check["batch"].items() if k in ("input_ids", "attention_mask", "labels")}
        if folder.name == EXPORT_DIR:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            family = name.removesuffix("-lora")
            if family in zoo:
                base = AutoModelForCausalLM.from_pretrained(zoo[family], dtype=torch.float32)
            else:  # the tiny architecture: random init with the run's seed
                cfg = load_config(TINY, ["data.cache_dir=/nonexistent"])
                base = build_model(cfg.model, model_config(cfg.model, check["logits"].shape[-1]), 7)
            model = PeftModel.from_pretrained(base, folder)
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits
        torch.testing.assert_close(logits, check["logits"], rtol=1e-4, atol=1e-4)


def test_mfu_counts_a_lora_step_honestly(launched):
    from accel_tp.metrics import flops_per_token

    class Conf:
        num_hidden_layers, hidden_size = 2, 64

    # 4 FLOPs per frozen parameter per token, 6 per trained one, attention as for a full fine-tune.
    assert flops_per_token(Conf, 1000, 10, n_trained=100) == 4 * 900 + 6 * 100 + 12 * 2 * 64 * 10
    assert flops_per_token(Conf, 1000, 10) == 6 * 1000 + 12 * 2 * 64 * 10
    assert "LoRA r=4" in launched["_stdout"]


# ---------------------------------------------------------------------------------------- units


def _cfg(**lora) -> dict:
    return {
        "model": {"architecture": "tiny", "tokenizer": "default"},
        "lora": {"enabled": True, **lora},
    }


@pytest.mark.parametrize(
    "lora,field",
    [({"r": 0}, "lora.r"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
     ({"target_modules": []}, "lora.target_modules"), ({"bias": "some"}, "lora.bias")],
)  # fmt: skip
def test_bad_lora_fields_are_named(lora, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict(_cfg(**lora)).validate()


def test_adapter_needs_lora_enabled_and_export_choice_needs_lora():
    with pytest.raises(ConfigError, match=r"lora\.adapter"):
        config_from_dict({**_cfg(), "lora": {"adapter": "/x"}}).validate()
    with pytest.raises(ConfigError, match=r"checkpoint\.export_hf"):
        config_from_dict({"model": {"architecture": "tiny", "tokenizer": "default"},
                          "checkpoint": {"export_hf": "adapter"}}).validate()  # fmt: skip


def test_unknown_target_modules_are_refused_with_those_that_exist():
    from accel_tp.lora import check_lora
    from accel_tp.model import architecture_config, build_meta_model

    meta = build_meta_model(architecture_config("tiny", 4096))
    with pytest.raises(ConfigError, match=r"lora\.target_modules: \['qproj'\].*'q_proj'"):
        check_lora(LoraSection(enabled=True, target_modules=["qproj"]), meta)
    with pytest.raises(ConfigError, match=r"lora\.modules_to_save: \['nope'\]"):
        check_lora(LoraSection(enabled=True, modules_to_save=["nope"]), meta)
    with pytest.raises(ConfigError, match=r"lora\.modules_to_save: \['lm_head'\].*split"):
        check_lora(LoraSection(enabled=True, modules_to_save=["lm_head"]), meta, frozenset({"lm_head"}))
    check_lora(LoraSection(enabled=True), meta)  # the defaults: the names the model has


def test_partition_splits_adapters_with_their_layer():
    from accel_tp.config import ModelSection
    from accel_tp.families import partition_for, to_regex

    section = ModelSection(architecture="tiny", tokenizer="default")
    specs = partition_for(section, 2, frozenset({"q_proj", "o_proj"})).partition_config["layer_specs"]
    by_pattern = {p: s for s in specs for p in s["patterns"]}
    q = "layers.*.self_attn.q_proj"
    o = "layers.*.self_attn.o_proj"
    assert by_pattern[to_regex(q, r"(?:\.base_layer)?")]["partition_type"] == "column"
    assert by_pattern[to_regex(q, r"\.lora_B\.[^.]+")]["partition_type"] == "column"
    assert by_pattern[to_regex(o, r"(?:\.base_layer)?")]["partition_type"] == "row"
    assert by_pattern[to_regex(o, r"\.lora_A\.[^.]+")]["partition_type"] == "row"
    assert not any("lora_A" in p and "q_proj" in p for p in by_pattern)  # column base: lora_A whole
    assert not any("lora_B" in p and "o_proj" in p for p in by_pattern)  # row base: lora_B whole
    import re

    assert re.match(to_regex(q, r"\.lora_B\.[^.]+"), "model.layers.0.self_attn.q_proj.lora_B.default.weight")
    assert re.match(to_regex(q, r"(?:\.base_layer)?"), "model.layers.0.self_attn.q_proj.base_layer.weight")


def test_split_input_row_targets_are_refused_with_the_cause():
    from accel_tp.config import ModelSection
    from accel_tp.families import partition_for

    section = ModelSection(
        architecture="tiny",
        tokenizer="default",
        tp_plan={"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise_split_input"},
    )
    with pytest.raises(ConfigError, match=r"lora\.target_modules: 'o_proj'.*_is_lm_head_name"):
        partition_for(section, 2, frozenset({"o_proj"}))
    partition_for(section, 2, frozenset({"q_proj"}))  # the other layers take adapters


def test_adapter_config_fills_the_section_and_conflicts_are_refused(tmp_path):
    from accel_tp.lora import resolve_adapter

    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "target_modules": ["v_proj", "q_proj"],
                "bias": "none",
                "modules_to_save": None,
            }
        )  # fmt: skip
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    got = resolve_adapter(LoraSection(enabled=True, adapter=str(tmp_path)))
    assert (got.r, got.alpha, got.dropout, got.target_modules) == (16, 32, 0.05, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"lora\.r: 4 disagrees with the adapter's r \(16\)"):
        resolve_adapter(LoraSection(enabled=True, r=4, adapter=str(tmp_path)))
    assert resolve_adapter(LoraSection(enabled=True, r=16, adapter=str(tmp_path))).r == 16
    with pytest.raises(ConfigError, match=r"lora\.adapter: .* is not a PEFT adapter folder"):
        resolve_adapter(LoraSection(enabled=True, adapter=str(tmp_path / "none")))


def test_a_resume_on_another_base_or_other_adapters_is_refused():
    import transformers

    from accel_tp.checkpoint.format import TrainState
    from accel_tp.checkpoint.rules import check_resume
    from accel_tp.errors import CheckpointError
    from accel_tp.lora import base_digest, describe
    from accel_tp.model import architecture_config

    conf = architecture_config("tiny", 4096)
    torch.manual_seed(1)
    a = base_digest(transformers.AutoModelForCausalLM.from_config(conf))
    torch.manual_seed(2)
    b = base_digest(transformers.AutoModelForCausalLM.from_config(conf))
    assert a != b
    saved = TrainState(model="m" + describe(LoraSection(enabled=True, r=8)), base=a).state_dict()
    check_resume(saved, TrainState(model=saved["model"], base=a), "x")
    check_resume(saved, TrainState(model=saved["model"]), "x")  # the precheck: no digest yet
    with pytest.raises(CheckpointError, match="another base model"):
        check_resume(saved, TrainState(model=saved["model"], base=b), "x")
    with pytest.raises(CheckpointError, match="another model"):
        check_resume(saved, TrainState(model="m" + describe(LoraSection(enabled=True, r=16)), base=a), "x")
    with pytest.raises(CheckpointError, match="another model"):
        check_resume(saved, TrainState(model="m", base=""), "x")  # a full fine-tune


@pytest.mark.parametrize("name", ["tp2dp2-z1", "tp2dp2-z3"])
def test_export_script_rebuilds_both_from_a_checkpoint(launched, tmp_path, name):
    """scripts/export_hf.py on the step-12 checkpoint (adapters only; the base re-read): the merged
    model equals the end-of-training export, and out/adapter holds the same adapter tensors."""
    from safetensors.torch import load_file

    d = launched[name]["dir"]
    ckpt = d / CHECKPOINTS_DIR / step_name(STEPS)
    proc = run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(ckpt),
                "--out", str(tmp_path / "out")])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(d / EXPORT_DIR / "model.safetensors"))
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6)
    adapter = load_file(str(tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    if (d / ADAPTER_DIR).is_dir():
        trained = load_file(str(d / ADAPTER_DIR / "adapter_model.safetensors"))
        assert set(adapter) == set(trained)
        for k in trained:
            torch.testing.assert_close(adapter[k], trained[k], rtol=0, atol=0)


def test_ray_trains_the_same_adapters(launched, jobs, tmp_path):
    """scripts/train_ray.py with the tp2 x dp2 ZeRO-1 run's settings: the same losses as under
    `accelerate launch`, its checkpoints resumable, the adapter exported."""
    ov, _ = jobs["runs"]["tp2dp2-z1"]
    ov = {**ov, "ray.storage_path": str(tmp_path / "ray"), "run.output_dir": str(tmp_path / "out")}
    proc = run([sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY), *set_args(ov)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "ray" / str(ov["run.name"])
    got = read_metrics(run_dir / METRICS_FILE)
    assert [m["loss"] for m in got] == [m["loss"] for m in launched["tp2dp2-z1"]["metrics"]]
    names = {p.name for p in (run_dir / step_name(6) / DS_TAG).iterdir()}
    assert model_states_file(1) in names, names
    adapters = list(tmp_path.rglob("adapter_model.safetensors"))
    assert adapters, "no adapter export"
