"""torch internals accel-tp reads (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

__all__ = ["compiled_graph_counts"]


def compiled_graph_counts() -> tuple[int, int, int, int]:
    """This process's compiled graphs so far: (AOTAutograd cache hits, AOTAutograd graphs, Inductor
    cache hits, Inductor graphs), from dynamo's counters (torch has no public API for them)."""
    from torch._dynamo.utils import counters

    aot, ind = counters["aot_autograd"], counters["inductor"]
    return (
        aot["autograd_cache_hit"],
        aot["autograd_cache_hit"] + aot["autograd_cache_miss"],
        ind["fxgraph_cache_hit"],
        ind["fxgraph_cache_hit"] + ind["fxgraph_cache_miss"],
    )
