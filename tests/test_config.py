"""accel_tp.config: strict YAML loading, `--set` overrides, type checks and cross-field rules."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from accel_tp.config import (
    ARCHITECTURES,
    Config,
    ConfigError,
    DataSection,
    TrainSection,
    apply_overrides,
    config_from_dict,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
YAMLS = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])
SECTIONS = [f.name for f in dataclasses.fields(Config)]
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainSection)]

# The smallest valid config: everything else has a default.
MINIMAL: dict[str, Any] = {"model": {"architecture": "tiny", "tokenizer": "default"}}


def with_(**sections: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with some sections replaced/added (deep-copied, so tests cannot leak into each other)."""
    data = copy.deepcopy(MINIMAL)
    data.update(copy.deepcopy(sections))
    return data


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# The shipped YAMLs


def test_config_folder_has_yamls() -> None:
    assert YAMLS, f"no YAML in {CONFIG_DIR}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_shipped_yaml_loads_with_its_values(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Every value written in the YAML reaches the typed config unchanged (no key silently dropped).
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            assert got == value, f"{path.name}: {section}.{key} = {got!r}, YAML says {value!r}"
    # The dump round-trips to the same config.
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_minimal_config_gets_defaults() -> None:
    cfg = config_from_dict(copy.deepcopy(MINIMAL))
    assert cfg.train == TrainSection()
    assert cfg.data == DataSection()
    assert cfg.parallelism.tp_size == 1 and cfg.parallelism.dp_size is None
    assert cfg.deepspeed.zero_stage == 1 and cfg.deepspeed.overrides == {}


def test_null_section_means_defaults() -> None:
    cfg = config_from_dict(with_(train=None))
    assert cfg.train == TrainSection()


# --------------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_top_level_key_lists_sections_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(trian={"max_steps": 5}))
    msg = str(e.value)
    assert msg.startswith("trian: unknown key.")
    assert "Did you mean 'train'?" in msg
    assert f"Valid keys: {', '.join(SECTIONS)}." in msg


def test_unknown_key_in_section_lists_fields_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(train={"learning_rte": 1e-4}))
    msg = str(e.value)
    assert msg.startswith("train.learning_rte: unknown key.")
    assert "Did you mean 'learning_rate'?" in msg
    assert f"Valid keys: {', '.join(TRAIN_KEYS)}." in msg


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(data={"zzzzzz": 1}))
    assert "data.zzzzzz: unknown key." in str(e.value)
    assert "Did you mean" not in str(e.value)
    assert "seq_length" in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", with_(parallelism={"tp_sise": 2}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "parallelism.tp_sise: unknown key." in msg
    assert "Did you mean 'tp_size'?" in msg


def test_section_that_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^train: expected a mapping"):
        config_from_dict(with_(train=5))


# --------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "micro_batch_size", "8", "train.micro_batch_size: expected an integer, got '8'"),
        ("train", "micro_batch_size", True, "train.micro_batch_size: expected an integer, got True"),
        ("train", "micro_batch_size", 2.5, "train.micro_batch_size: expected an integer, got 2.5"),
        ("train", "learning_rate", "fast", "train.learning_rate: expected a finite number, got 'fast'"),
        ("train", "learning_rate", True, "train.learning_rate: expected a finite number, got True"),
        ("train", "learning_rate", [1e-4], "train.learning_rate: expected a finite number"),
        ("train", "progress_bar", "yes", "train.progress_bar: expected true or false, got 'yes'"),
        ("train", "progress_bar", 1, "train.progress_bar: expected true or false, got 1"),
        ("train", "max_steps", "ten", "train.max_steps: expected int | null, got 'ten'"),
        ("train", "max_steps", False, "train.max_steps: expected int | null, got False"),
        (
            "train",
            "lr_schedule",
            "step",
            "train.lr_schedule: must be one of ['cosine', 'linear', 'constant']",
        ),
        ("deepspeed", "zero_stage", 4, "deepspeed.zero_stage: must be one of [0, 1, 2, 3], got 4"),
        ("deepspeed", "zero_stage", "1", "deepspeed.zero_stage: must be one of [0, 1, 2, 3], got '1'"),
        ("deepspeed", "zero_stage", True, "deepspeed.zero_stage: must be one of [0, 1, 2, 3], got True"),
        (
            "deepspeed",
            "precision",
            "fp8",
            "deepspeed.precision: must be one of ['auto', 'bf16', 'fp16', 'fp32']",
        ),
        ("deepspeed", "overrides", [1], "deepspeed.overrides: expected a mapping"),
        ("data", "padding", "right", "data.padding: must be one of ['longest', 'max_length']"),
        ("data", "files", "a.txt", "data.files: expected a list, got 'a.txt'"),
        ("data", "files", ["a.txt", 3], "data.files[1]: expected a string, got 3"),
        ("data", "seq_length", "512", "data.seq_length: expected an integer"),
        ("run", "name", 5, "run.name: expected a string, got 5"),
        ("parallelism", "dp_size", "2", "parallelism.dp_size: expected int | null, got '2'"),
        ("ray", "device", "tpu", "ray.device: must be one of ['auto', 'gpu', 'cpu']"),
    ],
)
def test_wrong_type_names_the_field(section: str, key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(**{section: {key: value}}))
    assert expected in str(e.value)


def test_accepted_conversions() -> None:
    cfg = config_from_dict(
        with_(
            train={"learning_rate": "1e-5", "micro_batch_size": 4.0, "max_steps": None},
            data={"percentage": 5},
            deepspeed={"zero_stage": 2, "overrides": {"a": {"b": [1]}}},
        )
    )
    # YAML reads 1e-5 (no dot) as a string; the loader accepts it as a float.
    assert cfg.train.learning_rate == 1e-5 and type(cfg.train.learning_rate) is float
    assert cfg.train.micro_batch_size == 4 and type(cfg.train.micro_batch_size) is int
    assert cfg.data.percentage == 5.0 and type(cfg.data.percentage) is float
    assert cfg.train.max_steps is None
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.deepspeed.overrides == {"a": {"b": [1]}}


@pytest.mark.parametrize("tp", [1, 2])
def test_zero3_is_accepted(tp: int) -> None:
    # ZeRO-3 trains with parity (tests/test_multiprocess.py) since models are built whole.
    cfg = config_from_dict(with_(deepspeed={"zero_stage": 3}, parallelism={"tp_size": tp}))
    assert cfg.deepspeed.zero_stage == 3


@pytest.mark.parametrize("tp", [1, 2])
def test_zero0_is_accepted_with_fp32(tp: int) -> None:
    # Parity with the reference and with ZeRO-1, native resume (tests/test_zero_stage0.py).
    cfg = config_from_dict(
        with_(deepspeed={"zero_stage": 0, "precision": "fp32"}, parallelism={"tp_size": tp, "dp_size": 2})
    )
    assert cfg.deepspeed.zero_stage == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_zero0_with_mixed_precision_is_refused(precision: str) -> None:
    # DeepSpeed's FP16_UnfusedOptimizer (stage 0 with bf16 / fp16) steps AdamW once at build time and
    # misses the other TP ranks' gradient shards in its norm (accel_tp/config.py DeepSpeedSection).
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(deepspeed={"zero_stage": 0, "precision": precision}))
    msg = str(e.value)
    assert msg.startswith(f"deepspeed.zero_stage: 0 needs deepspeed.precision: fp32 (got '{precision}')")
    assert "FP16_UnfusedOptimizer" in msg and "deepspeed.zero_stage: 1" in msg
    # The default precision is auto: stage 0 alone is refused, stage 0 with fp32 is not.
    with pytest.raises(ConfigError, match="needs deepspeed.precision: fp32"):
        load_config(CONFIG_DIR / "tiny_tp2_dp2.yaml", ["deepspeed.zero_stage=0"])
    cfg = load_config(
        CONFIG_DIR / "tiny_tp2_dp2.yaml", ["deepspeed.zero_stage=0", "deepspeed.precision=fp32"]
    )
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (0, "fp32")


def test_yaml_exponent_without_dot_from_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  architecture: tiny\n  tokenizer: default\ntrain:\n  learning_rate: 3e-4\n")
    assert load_config(path).train.learning_rate == pytest.approx(3e-4)


# NaN passes every `x <= 0` / `x < 0` range check, so a NaN learning rate or clip reaches the
# optimizer. float("nan") comes from YAML `.nan` or from the string path ("nan" -> float).
@pytest.mark.parametrize(
    ("section", "key"),
    [("train", "learning_rate"), ("deepspeed", "gradient_clipping"), ("train", "weight_decay")],
)
def test_nan_is_rejected(section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        config_from_dict(with_(**{section: {key: "nan"}}))


# --------------------------------------------------------------------------------------------
# --set overrides


def test_set_overrides_are_yaml_typed() -> None:
    path = CONFIG_DIR / "tiny_tp2_dp2.yaml"
    if not path.is_file():
        path = YAMLS[0]
    cfg = load_config(
        path,
        [
            "train.max_steps=50",
            "train.warmup_steps=5",
            "train.learning_rate=3e-4",
            "train.progress_bar=false",
            "data.padding=max_length",
            "run.name=other-run",
            "parallelism.dp_size=null",
            "deepspeed.zero_stage=2",
        ],
    )
    assert cfg.train.max_steps == 50 and type(cfg.train.max_steps) is int
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.progress_bar is False
    assert cfg.data.padding == "max_length"
    assert cfg.run.name == "other-run"
    assert cfg.parallelism.dp_size is None
    assert cfg.deepspeed.zero_stage == 2
    # Keys not overridden keep the YAML value.
    raw = yaml.safe_load(path.read_text())
    assert cfg.parallelism.tp_size == raw["parallelism"]["tp_size"]


def test_set_list_value_and_value_with_equals() -> None:
    data = apply_overrides(
        copy.deepcopy(MINIMAL), ["data.source=files", "data.files=[a.txt, b.txt]", "run.name=a=b"]
    )
    cfg = config_from_dict(data)
    assert cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.run.name == "a=b"


def test_set_empty_value_is_null_and_last_wins() -> None:
    data = apply_overrides(with_(train={"max_steps": 10}), ["train.max_steps="])
    assert data["train"]["max_steps"] is None
    data = apply_overrides({}, ["train.max_steps=5", "train.max_steps=7"])
    assert data == {"train": {"max_steps": 7}}


def test_set_wrong_type_is_rejected() -> None:
    data = apply_overrides(copy.deepcopy(MINIMAL), ["train.micro_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: expected an integer, got 'abc'"):
        config_from_dict(data)


def test_set_nested_deepspeed_override_merges() -> None:
    base = with_(deepspeed={"overrides": {"y": 2, "zero_optimization": {"a": 1}}})
    before = copy.deepcopy(base)
    data = apply_overrides(base, ["deepspeed.overrides.x=1", "deepspeed.overrides.zero_optimization.b=true"])
    cfg = config_from_dict(data)
    assert cfg.deepspeed.overrides == {"y": 2, "x": 1, "zero_optimization": {"a": 1, "b": True}}
    assert base == before, "apply_overrides must not mutate its input"


def test_set_creates_missing_sections() -> None:
    assert apply_overrides({}, ["deepspeed.overrides.x=1"]) == {"deepspeed": {"overrides": {"x": 1}}}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.learning_rte=1e-4", "train.learning_rte: unknown key. Did you mean 'learning_rate'?"),
        ("trian.max_steps=3", "trian: unknown key. Did you mean 'train'?"),
        ("deepspeed.zero_stag=3", "deepspeed.zero_stag: unknown key. Did you mean 'zero_stage'?"),
    ],
)
def test_set_unknown_key_is_rejected(item: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(copy.deepcopy(MINIMAL), [item])
    assert expected in str(e.value)
    assert "Valid keys:" in str(e.value)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.max_steps", "expected section.key=value"),
        ("max_steps=5", "the key must be section.key"),
        ("train..x=1", "the key must be section.key"),
        (".max_steps=1", "the key must be section.key"),
        ("=5", "the key must be section.key"),
    ],
)
def test_malformed_set_is_rejected(item: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(copy.deepcopy(MINIMAL), [item])
    assert str(e.value).startswith(f"--set {item!r}:")
    assert expected in str(e.value)


def test_malformed_set_through_load_config(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", MINIMAL)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.max_steps"])


# --------------------------------------------------------------------------------------------
# Cross-field rules (validate)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({}, "model: set exactly one of model.name_or_path"),
        ({"name_or_path": "some/dir", "architecture": "tiny", "tokenizer": "default"}, "set exactly one of"),
        ({"architecture": "gpt5", "tokenizer": "default"}, "model.architecture: unknown 'gpt5'"),
        ({"architecture": "tiny"}, "model.tokenizer: a random-init architecture needs a tokenizer"),
    ],
)
def test_model_rules(model: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": model})
    assert expected in str(e.value)
    if "unknown" in expected:
        assert str(list(ARCHITECTURES)) in str(e.value)


def test_model_name_or_path_alone_is_valid() -> None:
    cfg = config_from_dict({"model": {"name_or_path": "some/dir"}})
    assert cfg.model.name_or_path == "some/dir" and cfg.model.tokenizer is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"source": "hub"}, "data.name: source 'hub' needs a dataset name"),
        ({"source": "files"}, "data.files: source 'files' needs at least one"),
        ({"source": "embedded", "files": ["a.txt"]}, "data.files: only used with data.source: files"),
        ({"percentage": 0}, "data.percentage: must be in (0, 100], got 0"),
        ({"percentage": -5}, "data.percentage: must be in (0, 100]"),
        ({"percentage": 100.5}, "data.percentage: must be in (0, 100], got 100.5"),
        ({"percentage": "nan"}, "data.percentage"),
        ({"seq_length": 4}, "data.seq_length: must be >= 8, got 4"),
        ({"min_tokens": 1}, "data.min_tokens: must be >= 2"),
        ({"num_workers": -1}, "data.num_workers: must be >= 0"),
    ],
)
def test_data_rules(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(data=data))
    assert expected in str(e.value)


@pytest.mark.parametrize("percentage", [0.5, 5, 100])
def test_data_percentage_in_range_is_valid(percentage: float) -> None:
    assert config_from_dict(with_(data={"percentage": percentage})).data.percentage == percentage


def test_data_sources_with_their_inputs_are_valid() -> None:
    assert config_from_dict(with_(data={"source": "hub", "name": "wikitext"})).data.name == "wikitext"
    assert config_from_dict(with_(data={"source": "files", "files": ["a.txt"]})).data.files == ["a.txt"]


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        (
            {"warmup_steps": 10, "max_steps": 10},
            "train.warmup_steps (10) must be smaller than train.max_steps (10)",
        ),
        (
            {"warmup_steps": 11, "max_steps": 10},
            "train.warmup_steps (11) must be smaller than train.max_steps (10)",
        ),
        ({"micro_batch_size": 0}, "train.micro_batch_size: must be >= 1, got 0"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps: must be >= 1, got 0"),
        ({"epochs": 0}, "train.epochs: must be >= 1, got 0"),
        ({"log_every": -1}, "train.log_every: must be >= 1, got -1"),
        ({"max_steps": 0}, "train.max_steps: must be >= 1 or null"),
        ({"learning_rate": 0}, "train.learning_rate: must be > 0, got 0.0"),
        ({"learning_rate": -1e-4}, "train.learning_rate: must be > 0"),
        ({"weight_decay": -0.1}, "train.weight_decay: must be >= 0"),
        ({"min_lr_ratio": 1.5}, "train.min_lr_ratio: must be in [0, 1]"),
        ({"warmup_steps": -1}, "train.warmup_steps: must be >= 0"),
    ],
)
def test_train_rules(train: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(train=train))
    assert expected in str(e.value)


def test_train_warmup_below_max_steps_or_without_max_steps_is_valid() -> None:
    assert config_from_dict(with_(train={"warmup_steps": 9, "max_steps": 10})).train.warmup_steps == 9
    assert config_from_dict(with_(train={"warmup_steps": 1000})).train.max_steps is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train_batch_size": 1}, "train.micro_batch_size"),
        ({"train_micro_batch_size_per_gpu": 1}, "train.micro_batch_size"),
        ({"gradient_accumulation_steps": 1}, "train.grad_accum_steps"),
        ({"tensor_parallel": {"autotp_size": 4}}, "parallelism.tp_size"),
        ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage"),
        ({"zero_optimization": {"overlap_comm": True}}, "deepspeed.overlap_comm"),
        ({"bf16": {"enabled": True}}, "deepspeed.precision"),
        ({"fp16": {"enabled": True}}, "deepspeed.precision"),
        ({"gradient_clipping": 0.5}, "deepspeed.gradient_clipping"),
        ({"optimizer": {"type": "Adam"}}, "accel-tp builds torch AdamW"),
    ],
)
def test_deepspeed_overrides_of_owned_keys_name_the_typed_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(deepspeed={"overrides": overrides}))
    key = next(iter(overrides))
    sub = overrides[key]
    dotted = f"{key}.{next(iter(sub))}" if key in ("zero_optimization", "bf16", "fp16") else key
    assert f"deepspeed.overrides: {dotted} (" in str(e.value) and field in str(e.value)


def test_deepspeed_overrides_lists_all_clashes_and_allows_others() -> None:
    with pytest.raises(ConfigError, match=r"tensor_parallel \(.*train_batch_size \("):
        config_from_dict(with_(deepspeed={"overrides": {"train_batch_size": 8, "tensor_parallel": {}}}))
    ok = {"zero_optimization": {"sub_group_size": 10}, "bf16": {"immediate_grad_update": True}}
    cfg = config_from_dict(with_(deepspeed={"overrides": ok}))
    assert cfg.deepspeed.overrides == ok


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"deepspeed": {"gradient_clipping": -1}}, "deepspeed.gradient_clipping: must be >= 0"),
        ({"parallelism": {"tp_size": 0}}, "parallelism.tp_size: must be >= 1, got 0"),
        ({"parallelism": {"dp_size": 0}}, "parallelism.dp_size: must be >= 1, got 0"),
        ({"checkpoint": {"every_steps": -1}}, "checkpoint.every_steps: must be >= 0"),
        ({"ray": {"cpus_per_worker": 0}}, "ray.cpus_per_worker: must be >= 1"),
        ({"ray": {"max_failures": -2}}, "ray.max_failures: must be >= -1"),
        ({"run": {"name": "a/b"}}, "run.name: 'a/b' is not a valid folder name"),
        ({"run": {"name": ""}}, "run.name: '' is not a valid folder name"),
        ({"run": {"name": ".."}}, "run.name: '..' is not a valid folder name"),
    ],
)
def test_other_section_rules(sections: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(with_(**sections))
    assert expected in str(e.value)


def test_boundary_values_are_valid() -> None:
    cfg = config_from_dict(
        with_(
            deepspeed={"gradient_clipping": 0},
            ray={"max_failures": -1},
            checkpoint={"every_steps": 0},
            train={"min_lr_ratio": 0, "weight_decay": 0},
        )
    )
    assert cfg.deepspeed.gradient_clipping == 0 and cfg.ray.max_failures == -1


# --------------------------------------------------------------------------------------------
# Files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "not valid YAML" in str(e.value) and str(path) in str(e.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(path)


def test_empty_file_fails_on_the_model_rule(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="set exactly one of model.name_or_path"):
        load_config(path)


def test_value_error_in_file_names_file_and_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", with_(train={"micro_batch_size": "big"}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: train.micro_batch_size: expected an integer")
