"""accel_tp.parallel: rank math, TP head check, precision and the DeepSpeed config dict."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from accel_tp.config import Config, ConfigError, config_from_dict
from accel_tp.parallel import (
    Topology,
    build_deepspeed_config,
    check_sp_heads,
    check_tp_heads,
    global_batch_size,
    resolve_precision,
)

LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4), (8, 8), (12, 4)]


def make_cfg(**sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"model": {"architecture": "tiny", "tokenizer": "default"}}
    data.update(copy.deepcopy(sections))
    return config_from_dict(data)


# --------------------------------------------------------------------------------------------
# Topology


@pytest.mark.parametrize(("world", "tp"), LAYOUTS)
def test_rank_major_mapping(world: int, tp: int) -> None:
    seen = set()
    for rank in range(world):
        t = Topology(world_size=world, tp_size=tp, rank=rank)
        assert t.dp_size == world // tp
        assert t.tp_rank == rank % tp
        assert t.dp_rank == rank // tp
        assert t.dp_rank * tp + t.tp_rank == rank
        assert 0 <= t.tp_rank < tp and 0 <= t.dp_rank < t.dp_size
        seen.add((t.dp_rank, t.tp_rank))
    assert len(seen) == world  # a bijection onto the (dp, tp) grid


@pytest.mark.parametrize(
    ("world", "tp", "rank", "dp_rank", "tp_rank"),
    [(8, 2, 5, 2, 1), (8, 4, 5, 1, 1), (8, 4, 3, 0, 3), (4, 2, 2, 1, 0), (6, 3, 4, 1, 1), (4, 1, 3, 3, 0)],
)
def test_rank_mapping_examples(world: int, tp: int, rank: int, dp_rank: int, tp_rank: int) -> None:
    t = Topology(world, tp, rank)
    assert (t.dp_rank, t.tp_rank) == (dp_rank, tp_rank)


@pytest.mark.parametrize(("world", "tp"), LAYOUTS)
def test_groups_partition_the_world(world: int, tp: int) -> None:
    topos = [Topology(world, tp, r) for r in range(world)]
    dp = world // tp
    tp_groups = {tuple(t.tp_group_ranks()) for t in topos}
    dp_groups = {tuple(t.dp_group_ranks()) for t in topos}
    assert len(tp_groups) == dp and len(dp_groups) == tp
    assert all(len(g) == tp for g in tp_groups) and all(len(g) == dp for g in dp_groups)
    for groups in (tp_groups, dp_groups):
        flat = [r for g in groups for r in g]
        assert sorted(flat) == list(range(world))  # every rank exactly once
    for g in tp_groups:  # TP groups are blocks of consecutive ranks
        assert list(g) == list(range(g[0], g[0] + tp))
    for g in dp_groups:  # DP groups stride by tp
        assert list(g) == list(range(g[0], world, tp))
    for t in topos:
        # a rank's own groups contain it, and meet only in it
        assert set(t.tp_group_ranks()) & set(t.dp_group_ranks()) == {t.rank}
        # TP peers share dp_rank (same data); DP peers share tp_rank (same shard)
        assert {topos[r].dp_rank for r in t.tp_group_ranks()} == {t.dp_rank}
        assert {topos[r].tp_rank for r in t.dp_group_ranks()} == {t.tp_rank}


def test_group_ranks_with_explicit_index() -> None:
    t = Topology(8, 2, rank=0)
    assert t.tp_group_ranks(replica=1) == [2, 3]
    assert t.tp_group_ranks(replica=3) == [6, 7]
    assert t.dp_group_ranks(tp_rank=1) == [1, 3, 5, 7]
    assert Topology(8, 4, rank=6).tp_group_ranks() == [4, 5, 6, 7]
    assert Topology(8, 4, rank=6).dp_group_ranks() == [2, 6]


@pytest.mark.parametrize(
    ("world", "tp", "valid"), [(6, 4, [1, 2, 3, 6]), (4, 3, [1, 2, 4]), (8, 3, [1, 2, 4, 8]), (2, 4, [1, 2])]
)
def test_tp_not_dividing_world(world: int, tp: int, valid: list[int]) -> None:
    with pytest.raises(ConfigError) as e:
        Topology(world, tp)
    msg = str(e.value)
    assert f"parallelism.tp_size ({tp}) must divide the world size ({world})" in msg
    assert f"use a tp_size among {valid}" in msg


@pytest.mark.parametrize(("world", "tp", "rank"), [(4, 2, 4), (4, 2, -1), (0, 1, 0), (4, 0, 0)])
def test_invalid_topology(world: int, tp: int, rank: int) -> None:
    with pytest.raises(ConfigError):
        Topology(world, tp, rank)


def test_from_config() -> None:
    cfg = make_cfg(parallelism={"tp_size": 2, "dp_size": 2})
    t = Topology.from_config(cfg, world_size=4, rank=3)
    assert (t.world_size, t.tp_size, t.dp_size, t.dp_rank, t.tp_rank) == (4, 2, 2, 1, 1)
    # dp_size unset: the world decides
    t = Topology.from_config(make_cfg(parallelism={"tp_size": 2}), world_size=8)
    assert t.dp_size == 4


def test_from_config_dp_size_mismatch() -> None:
    cfg = make_cfg(parallelism={"tp_size": 2, "dp_size": 2})
    with pytest.raises(ConfigError) as e:
        Topology.from_config(cfg, world_size=8)
    msg = str(e.value)
    assert "tp_size (2) x dp_size (2) = 4" in msg and "8 processes" in msg
    assert "parallelism.dp_size: 4" in msg


def test_from_config_tp_not_dividing_world() -> None:
    with pytest.raises(ConfigError, match="must divide the world size"):
        Topology.from_config(make_cfg(parallelism={"tp_size": 4}), world_size=6)


# --------------------------------------------------------------------------------------------
# check_tp_heads


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen25_05b_accepts(tp: int) -> None:
    check_tp_heads(tp, 14, 2)


@pytest.mark.parametrize("tp", [4, 7, 14])
def test_qwen25_05b_rejects(tp: int) -> None:
    with pytest.raises(ConfigError) as e:
        check_tp_heads(tp, 14, 2)
    msg = str(e.value)
    assert f"parallelism.tp_size: {tp} does not divide the model's 2 key-value heads (14 query heads)" in msg
    assert "Use tp_size in [1, 2]." in msg


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qwen2_7b_accepts(tp: int) -> None:
    check_tp_heads(tp, 28, 4)


@pytest.mark.parametrize("tp", [3, 7, 8])
def test_qwen2_7b_rejects(tp: int) -> None:
    with pytest.raises(ConfigError, match=r"Use tp_size in \[1, 2, 4\]\."):
        check_tp_heads(tp, 28, 4)


def test_heads_without_gqa() -> None:
    check_tp_heads(4, 12, None)  # kv = query heads
    check_tp_heads(6, 12, 12)
    with pytest.raises(ConfigError, match=r"Use tp_size in \[1, 2, 3, 4, 6, 12\]\."):
        check_tp_heads(5, 12, None)


# --------------------------------------------------------------------------------------------
# resolve_precision


@pytest.mark.parametrize(
    ("requested", "device", "bf16_ok", "expected"),
    [
        ("auto", "cpu", False, "fp32"),
        ("auto", "cpu", True, "fp32"),
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "fp16"),
        ("bf16", "cpu", False, "bf16"),
        ("fp32", "cuda", True, "fp32"),
        ("fp16", "cuda", True, "fp16"),
        ("bf16", "cuda", False, "bf16"),
    ],
)
def test_resolve_precision(requested: str, device: str, bf16_ok: bool, expected: str) -> None:
    assert resolve_precision(requested, device, bf16_ok) == expected


def test_fp16_on_cpu_is_rejected() -> None:
    with pytest.raises(ConfigError, match="deepspeed.precision: fp16 is not supported on CPU"):
        resolve_precision("fp16", "cpu")


# --------------------------------------------------------------------------------------------
# build_deepspeed_config / global_batch_size


@pytest.mark.parametrize(("world", "tp"), [(1, 1), (4, 2), (8, 2), (8, 4), (8, 8), (4, 1)])
def test_batch_bookkeeping(world: int, tp: int) -> None:
    cfg = make_cfg(train={"micro_batch_size": 3, "grad_accum_steps": 5})
    topo = Topology(world, tp)
    ds = build_deepspeed_config(cfg, topo, "fp32")
    # No train_batch_size: DeepSpeed derives it, once against the world size (no mpu) and, at
    # ZeRO-3 with AutoTP, again against the DP size; no single value passes both at tp > 1.
    assert "train_batch_size" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    # The real global batch counts each TP group once.
    assert global_batch_size(cfg, topo) == 3 * 5 * (world // tp)
    # At tp > 1 the head is split by vocabulary (parallelism.vocab_parallel_loss, the default).
    assert ds["tensor_parallel"] == {
        "autotp_size": tp,
        **({"vocab_parallel_lm_head": True} if tp > 1 else {}),
    }
    json.dumps(ds)  # plain JSON-able dict (DeepSpeed / Accelerate may serialise it)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage(stage: int) -> None:
    cfg = make_cfg(
        deepspeed={
            "zero_stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": False,
            "reduce_bucket_size": 123,
            "allgather_bucket_size": 456,
            "gradient_clipping": 0.5,
        }
    )
    ds = build_deepspeed_config(cfg, Topology(4, 2), "fp32")
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
    assert zero["reduce_bucket_size"] == 123 and zero["allgather_bucket_size"] == 456
    assert ds["gradient_clipping"] == 0.5


def test_precision_sections() -> None:
    cfg = make_cfg()
    topo = Topology(2, 2)
    bf16 = build_deepspeed_config(cfg, topo, "bf16")
    assert bf16["bf16"] == {"enabled": True, "check_grad_overflow": False} and "fp16" not in bf16
    fp16 = build_deepspeed_config(cfg, topo, "fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # 0: dynamic
    assert "bf16" not in fp16
    fp32 = build_deepspeed_config(cfg, topo, "fp32")
    assert not fp32.get("bf16", {}).get("enabled", False)
    assert not fp32.get("fp16", {}).get("enabled", False)


def test_bf16_master_weights() -> None:
    ds = build_deepspeed_config(make_cfg(deepspeed={"bf16_master_weights": True}), Topology(2, 1), "bf16")
    assert ds["bf16"]["enabled"] is True
    assert ds["bf16"]["bf16_master_weights_and_grads"] is True
    assert ds["bf16"]["bf16_optimizer_states"] is True
    # Ignored outside bf16.
    ds = build_deepspeed_config(make_cfg(deepspeed={"bf16_master_weights": True}), Topology(2, 1), "fp16")
    assert "bf16" not in ds


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ConfigError, match="deepspeed.precision: unknown 'int8'"):
        build_deepspeed_config(make_cfg(), Topology(1, 1), "int8")


def test_overrides_merge_into_nested_dicts() -> None:
    cfg = make_cfg(
        deepspeed={
            "zero_stage": 2,
            "overrides": {
                "zero_optimization": {"sub_group_size": 1000, "round_robin_gradients": True},
                "bf16": {"immediate_grad_update": True},
                "activation_checkpointing": {"partition_activations": True},
            },
        }
    )
    ds = build_deepspeed_config(cfg, Topology(4, 2), "bf16")
    zero = ds["zero_optimization"]
    assert zero["sub_group_size"] == 1000 and zero["round_robin_gradients"] is True  # added
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True  # kept
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False, "immediate_grad_update": True}
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": True}
    # The config's own overrides dict is not mutated by the merge.
    assert cfg.deepspeed.overrides["zero_optimization"] == {
        "sub_group_size": 1000,
        "round_robin_gradients": True,
    }


def test_build_is_repeatable() -> None:
    cfg = make_cfg(deepspeed={"overrides": {"zero_optimization": {"x": 1}}})
    first = build_deepspeed_config(cfg, Topology(4, 2), "bf16")
    first["zero_optimization"]["stage"] = 99
    second = build_deepspeed_config(cfg, Topology(4, 2), "bf16")
    assert second["zero_optimization"]["stage"] == 1 and second["zero_optimization"]["x"] == 1


def test_partition_config_for_a_family_deepspeed_refuses(tmp_path) -> None:
    """OLMo-2's plan has rowwise_split_input (DeepSpeed's converter rejects the whole plan): the
    dict carries accel-tp's partition_config instead, at tp > 1 only; a model DeepSpeed takes
    (Llama) gets the bare AutoTP size."""
    from transformers import LlamaConfig, Olmo2Config

    small = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    Olmo2Config(**small, pad_token_id=0).save_pretrained(tmp_path / "olmo2")
    LlamaConfig(**small).save_pretrained(tmp_path / "llama")
    olmo = make_cfg(model={"name_or_path": str(tmp_path / "olmo2"), "architecture": None, "tokenizer": None})
    ds = build_deepspeed_config(olmo, Topology(4, 2), "fp32")
    tp = ds["tensor_parallel"]
    assert tp["autotp_size"] == 2 and tp["partition_config"]["use_default_specs"] is False
    assert "o_proj" in tp["partition_config"]["lm_head_patterns"]
    assert tp["vocab_parallel_lm_head"] is False  # DeepSpeed would take o_proj for a head too
    json.dumps(ds)
    assert build_deepspeed_config(olmo, Topology(4, 1), "fp32")["tensor_parallel"] == {"autotp_size": 1}
    llama = make_cfg(model={"name_or_path": str(tmp_path / "llama"), "architecture": None, "tokenizer": None})
    assert build_deepspeed_config(llama, Topology(4, 2), "fp32")["tensor_parallel"] == {
        "autotp_size": 2,
        "vocab_parallel_lm_head": True,
    }


@pytest.mark.parametrize(
    ("world", "tp", "sp"), [(4, 1, 2), (4, 2, 2), (8, 2, 2), (8, 1, 4), (8, 2, 4), (4, 1, 4)]
)
def test_sequence_parallel_mesh(world: int, tp: int, sp: int) -> None:
    """tp x sp x dp: TP groups stay consecutive, SP groups next (stride tp), and DeepSpeed's DP group
    (same tp_rank) holds the sp x dp ranks; every rank is in one group of each kind."""
    topos = [Topology(world, tp, r, sp_size=sp) for r in range(world)]
    dp = world // (tp * sp)
    assert all(t.dp_size == dp and t.replicas == world // tp for t in topos)
    sp_groups = {tuple(t.sp_group_ranks()) for t in topos}
    assert len(sp_groups) == dp * tp and sorted(r for g in sp_groups for r in g) == list(range(world))
    for t in topos:
        assert t.rank == (t.dp_rank * sp + t.sp_rank) * tp + t.tp_rank
        assert list(t.tp_group_ranks()) == list(range(t.rank - t.tp_rank, t.rank - t.tp_rank + tp))
        group = t.sp_group_ranks()
        assert t.rank in group and [topos[r].sp_rank for r in group] == list(range(sp))
        # SP peers share the batch (dp_rank) and the weight shard (tp_rank)
        assert {(topos[r].dp_rank, topos[r].tp_rank) for r in group} == {(t.dp_rank, t.tp_rank)}
        assert set(group) <= set(t.dp_group_ranks())
        assert t.layout == f"tp{tp}xdp{world // tp}"


def test_sequence_parallel_mesh_refuses_an_uneven_world() -> None:
    with pytest.raises(
        ConfigError, match=r"parallelism.sp_size \(2\) x tp_size \(2\) must divide the world size \(6\)"
    ):
        Topology(6, 2, 0, sp_size=2)


@pytest.mark.parametrize(
    ("tp", "sp", "heads", "kv", "ok"),
    [
        (1, 2, 4, 4, True),
        (2, 2, 4, 4, True),
        (1, 4, 8, 2, True),  # 2 kv heads over 4 ranks: each gets a copy of one
        (2, 2, 8, 2, True),  # 1 kv head per TP rank, replicated over sp
        (1, 3, 4, 4, False),  # 4 query heads do not split over 3
        (1, 4, 12, 3, False),  # 3 kv heads: neither divides the other
    ],
)
def test_sp_heads(tp: int, sp: int, heads: int, kv: int, ok: bool) -> None:
    if ok:
        check_sp_heads(tp, sp, heads, kv)
    else:
        with pytest.raises(ConfigError, match="parallelism.sp_size: .* Use sp_size in"):
            check_sp_heads(tp, sp, heads, kv)


def test_expert_parallel_checks_and_layout() -> None:
    from transformers import LlamaConfig, MixtralConfig

    from accel_tp.families import check_expert_parallel

    mixtral = MixtralConfig(num_local_experts=4)
    check_expert_parallel(mixtral, 2, 1, 1)
    check_expert_parallel(mixtral, 4, 2, 2)
    with pytest.raises(
        ConfigError,
        match=r"ep_size: 3 does not divide the model's 4 experts per layer; use ep_size in \[1, 2, 4\]",
    ):
        check_expert_parallel(mixtral, 3, 1, 1)
    with pytest.raises(ConfigError, match="has no routed experts"):
        check_expert_parallel(LlamaConfig(), 2, 1, 1)
    with pytest.raises(ConfigError, match="ZeRO-3 excludes AutoTP"):
        check_expert_parallel(mixtral, 2, 2, 3)
    with pytest.raises(ConfigError, match=r"parallelism.ep_size \(4\) must divide the world size \(2\)"):
        Topology(2, 1, 0, ep_size=4)
    assert Topology(4, 2, 0, ep_size=2).layout == "tp2xdp2xep2"
    assert Topology(4, 2, 0).layout == "tp2xdp2"
