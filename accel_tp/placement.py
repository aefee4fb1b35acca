"""Where the ranks run: TP groups must be node-local, and the mesh is printed once.

Tensor parallelism all-reduces activations in every layer, so a TP group split across nodes runs at
network speed instead of NVLink speed. DeepSpeed puts TP peers on consecutive ranks, and Ray Train
numbers its workers node by node, so TP groups are node-local exactly when every node holds a
multiple of tp_size workers, in rank order. This module checks that (on the driver, from the
cluster's resources, and in the workers, from where they actually landed) and describes the mesh.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .config import ConfigError
from .parallel import Topology

__all__ = [
    "this_node",
    "gather_nodes",
    "check_tp_node_local",
    "describe_mesh",
    "workers_per_node",
    "check_cluster_fits",
]


def this_node() -> str:
    """This process's node: Ray's node id under Ray (several raylets may share a host), else the host."""
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except ImportError:
        pass
    return socket.gethostname()


def gather_nodes() -> list[str]:
    """Every rank's node, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    mine = this_node()
    if not dist.is_initialized():
        return [mine]
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


def _ranks(ranks: Sequence[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def check_tp_node_local(topo: Topology, nodes: Sequence[str]) -> None:
    """Refuse a placement in which a TP group spans nodes, naming the fix."""
    for d in range(topo.replicas):
        group = topo.tp_group_ranks(d)
        spans = sorted({nodes[r] for r in group})
        if len(spans) > 1:
            per_node = {n: sum(1 for x in nodes if x == n) for n in dict.fromkeys(nodes)}
            raise ConfigError(
                f"parallelism.tp_size: TP group {d} (ranks {_ranks(group)}) spans nodes {spans}; tensor "
                f"parallelism all-reduces every layer and must stay inside one node. The workers landed "
                f"{list(per_node.values())} per node: tp_size ({topo.tp_size}) must divide the GPUs (or, "
                "on CPU, the workers) of every node. Lower tp_size, or give each node a multiple of "
                "tp_size GPUs / CPUs (ray.cpus_per_worker)."
            )


def describe_mesh(topo: Topology, nodes: Sequence[str]) -> str:
    """Which node holds which (dp, sp, tp) ranks, one line per node."""
    order = list(dict.fromkeys(nodes))
    lines = [f"[accel-tp] mesh: {topo.describe()} on {len(order)} node(s)"]
    per_dp = topo.tp_size * topo.sp_size
    for i, node in enumerate(order):
        ranks = [r for r, n in enumerate(nodes) if n == node]
        dps = sorted({r // per_dp for r in ranks})
        sps = sorted({r // topo.tp_size % topo.sp_size for r in ranks})
        sp = f" x sp {_ranks(sps)}" if topo.sp_size > 1 else ""
        lines.append(
            f"[accel-tp]   node {i} ({node}): ranks {_ranks(ranks)} = dp {_ranks(dps)}{sp} x tp 0-{topo.tp_size - 1}"
        )
    return "\n".join(lines)


def workers_per_node(node_resources: Sequence[dict[str, float]], per_worker: dict[str, float]) -> list[int]:
    """How many workers each node can hold."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    return [int(min(res.get(k, 0.0) // v for k, v in need.items())) if need else 0 for res in node_resources]


def check_cluster_fits(capacity: Sequence[int], tp_size: int, world_size: int, field: str) -> None:
    """Refuse, on the driver, a cluster on which Ray could split a TP group across nodes.

    Ray places the workers' bundles with PACK, filling node after node: a node that holds a number
    of workers that is not a multiple of tp_size can end up with part of a TP group (capacity [3, 3],
    tp 2, 4 workers: 3 + 1). So unless one node holds the whole group, every node that can hold a
    worker must hold a multiple of tp_size, and together they must hold world_size."""
    if max(capacity, default=0) >= world_size:
        return  # PACK puts the whole group on one node
    usable = sum(c // tp_size * tp_size for c in capacity)
    ragged = [c for c in capacity if c % tp_size]
    if usable < world_size or ragged:
        raise ConfigError(
            f"{field}: {world_size} workers in TP groups of {tp_size} need nodes that each hold a multiple of "
            f"{tp_size} workers (Ray packs workers node by node, so another count can split a TP group "
            f"across nodes); the cluster's nodes hold {list(capacity)} workers. tp_size must divide the GPUs "
            "per node (on CPU: the node's CPUs / ray.cpus_per_worker): lower tp_size, or resize the nodes."
        )
