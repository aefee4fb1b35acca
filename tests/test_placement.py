"""Placement rules, the lost-node plan and ray.min_workers: unit tests (the cluster runs are in
tests/test_cluster.py)."""

from __future__ import annotations

import pytest

from accel_tp.checkpoint.format import step_name
from accel_tp.config import ConfigError, elastic_worker_counts, load_config
from accel_tp.launch import _failure_plan
from accel_tp.modes import fit_to_world
from accel_tp.parallel import Topology
from accel_tp.placement import check_cluster_fits, check_tp_node_local, describe_mesh, workers_per_node

from .mp_utils import TINY


def test_tp_groups_must_not_span_nodes():
    topo = Topology(world_size=4, tp_size=2, rank=0)
    check_tp_node_local(topo, ["a", "a", "b", "b"])
    with pytest.raises(ConfigError, match=r"TP group 0 \(ranks 0-1\) spans nodes \['a', 'b'\]") as e:
        check_tp_node_local(topo, ["a", "b", "b", "b"])
    assert "[1, 3] per node" in str(e.value) and "tp_size (2) must divide" in str(e.value)


def test_mesh_names_each_nodes_ranks():
    text = describe_mesh(Topology(world_size=8, tp_size=2, rank=0), ["n1"] * 4 + ["n2"] * 4)
    assert text.splitlines() == [
        "[accel-tp] mesh: tp2 x dp4 on 2 node(s)",
        "[accel-tp]   node 0 (n1): ranks 0-3 = dp 0-1 x tp 0-1",
        "[accel-tp]   node 1 (n2): ranks 4-7 = dp 2-3 x tp 0-1",
    ]


def test_cluster_capacity_in_whole_tp_groups():
    caps = workers_per_node([{"CPU": 3.0}, {"CPU": 2.0}, {"CPU": 0.0}], {"CPU": 1})
    assert caps == [3, 2, 0]
    # Ray packs 4 workers as 3 + 1 on [3, 2]: a TP group would span nodes. Refused up front.
    with pytest.raises(ConfigError, match=r"4 workers in TP groups of 2 .*nodes hold \[3, 2, 0\] workers"):
        check_cluster_fits(caps, 2, 4, "parallelism.tp_size")
    check_cluster_fits([2, 2, 0], 2, 4, "parallelism.tp_size")  # 2 + 2
    check_cluster_fits([4, 3], 2, 4, "parallelism.tp_size")  # one node holds the whole group
    check_cluster_fits([8, 8], 4, 16, "parallelism.tp_size")
    with pytest.raises(ConfigError, match="tp_size must divide the GPUs per node"):
        check_cluster_fits([2, 2], 4, 4, "parallelism.tp_size")
    assert workers_per_node([{"CPU": 8.0, "GPU": 4.0}], {"CPU": 1, "GPU": 1}) == [4]


def cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def test_min_workers_must_keep_the_global_batch():
    assert elastic_worker_counts(2, 4, 1) == [2, 4, 8]  # dp in {1, 2, 4} divides 4 micro-batches
    assert elastic_worker_counts(2, 3, 2) == [2, 4, 6]  # 6 micro-batches: dp 1, 2, 3
    cfg("ray.min_workers=2")
    with pytest.raises(
        ConfigError, match=r"ray.min_workers: 3 workers cannot keep .* Nearest valid: \[2, 4\]"
    ):
        cfg("ray.min_workers=3")
    with pytest.raises(ConfigError, match=r"Nearest valid: \[4\]"):
        cfg("ray.min_workers=6")


def test_fit_to_world_lowers_dp_and_raises_accumulation():
    c = cfg("ray.min_workers=2", "train.grad_accum_steps=2")
    small = fit_to_world(c, 2)
    assert (small.parallelism.tp_size, small.parallelism.dp_size, small.train.grad_accum_steps) == (2, 1, 4)
    mb = c.train.micro_batch_size
    assert mb * 4 * 1 == mb * 2 * 2  # the global batch is unchanged
    assert fit_to_world(c, 4) is c
    plain = cfg()
    assert fit_to_world(plain, 2) is plain  # without min_workers: Topology refuses a smaller world


def test_the_lost_node_plan_says_what_happens():
    assert "ends the run (ray.max_failures: 0;" in _failure_plan(cfg(), 4)
    waits = _failure_plan(cfg("ray.max_failures=3"), 4)
    assert "3 times" in waits and "once 4 workers fit again, waiting" in waits
    elastic = _failure_plan(cfg("ray.max_failures=-1", "ray.min_workers=2"), 4)
    assert "unlimited times" in elastic and "down to 2 workers" in elastic


def test_elastic_policy_counts_whole_tp_groups_that_keep_the_global_batch():
    """The scaling policy accel-tp swaps in: per node, whole TP groups; overall, a count whose dp
    divides the micro-batches per global batch (Ray's own policy would take every free slot)."""
    from ray.train import ScalingConfig

    from accel_tp.compat.ray import count_limited_policy_class
    from accel_tp.launch import tp_aligned_worker_count

    sc = ScalingConfig(num_workers=(2, 8), resources_per_worker={"CPU": 1})
    counts = elastic_worker_counts(2, 4, 1)  # valid: 2, 4, 8
    policy = count_limited_policy_class()(sc, tp_aligned_worker_count(2, counts))
    count = policy._count_possible_workers
    assert count({"a": {"CPU": 3.0}, "b": {"CPU": 3.0}}) == 4  # 2 + 2 usable, not 6
    assert count({"a": {"CPU": 3.0}, "b": {"CPU": 4.0}}) == 4  # 6 usable: dp 3 does not divide 4
    assert count({"a": {"CPU": 8.0}}) == 8
    assert count({"a": {"CPU": 1.0}, "b": {"CPU": 1.0}}) == 0  # no whole TP group anywhere


def test_zero3_with_min_workers_is_refused():
    with pytest.raises(ConfigError, match="ray.min_workers: .*ZeRO-3 checkpoint cannot be resharded"):
        cfg("ray.min_workers=2", "deepspeed.zero_stage=3")


def test_storage_uri_options_and_overlapping_export_are_refused(tmp_path):
    from accel_tp.export import export_checkpoint
    from accel_tp.storage import check_storage, replace_folder

    with pytest.raises(ConfigError, match=r"ray.storage_path: .* has URI options"):
        check_storage("s3://bucket/runs?region=eu-west-1", "ray.storage_path")
    with pytest.raises(ConfigError, match="overlaps --checkpoint"):
        export_checkpoint(f"s3://b/runs/r/{step_name(9)}", "s3://b/runs/r", overwrite=True)
    # replace_folder: the new files first, then the old-only ones go (here on the local filesystem).
    old, new = tmp_path / "remote", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "a.bin").write_text("old a")
    (old / "b.bin").write_text("old b")
    (new / "b.bin").write_text("new b")
    (new / "c.bin").write_text("new c")
    replace_folder(new, str(old))
    assert {p.name: p.read_text() for p in old.iterdir()} == {"b.bin": "new b", "c.bin": "new c"}
