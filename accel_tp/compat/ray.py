"""Ray Train 2.60 internals accel-tp relies on (see accel_tp/compat/__init__.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "quiet_ray_train_reports",
    "elastic_worker_count_override",
    "count_limited_policy_class",
    "loopback_only",
]

# (reserved resources of each node, resources per worker) -> how many workers to start.
WorkerCount = Callable[[list[dict[str, float]], dict[str, float]], int]


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60's worker context logs every report ("Reporting training result N: ...") at INFO,
    to a logger named by its file path; on a multi-node cluster it reaches the driver's console."""
    try:
        from ray.train.v2._internal.execution import context as ray_train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def count_limited_policy_class() -> type:
    """A subclass of Ray's ElasticScalingPolicy whose worker count comes from `count(...)`."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    class CountLimitedElasticPolicy(ElasticScalingPolicy):
        def __init__(self, scaling_config: Any, count: WorkerCount) -> None:
            super().__init__(scaling_config)
            self.count = count

        def _count_possible_workers(self, reserved_resources: Any) -> int:
            per_worker = self.scaling_config._resources_per_worker_not_none
            return self.count(list(reserved_resources.values()), per_worker)

    return CountLimitedElasticPolicy


@contextlib.contextmanager
def elastic_worker_count_override(count: WorkerCount) -> Iterator[None]:
    """For the fits inside: Ray Train's elastic policy starts `count(...)` workers instead of as many
    as fit (ElasticScalingPolicy._count_possible_workers). Ray 2.60 has no public hook for that,
    so the policy the trainer creates is swapped for a subclass, and put back after."""
    try:
        import ray.train.v2.api.data_parallel_trainer as dpt
    except ImportError:  # another Ray layout: its own policy (the worker refuses an unusable count)
        yield
        return
    create = dpt.create_scaling_policy

    def limited(scaling_config: Any) -> Any:
        if not scaling_config.elasticity_enabled:
            return create(scaling_config)
        return count_limited_policy_class()(scaling_config, count)

    dpt.create_scaling_policy = limited
    try:
        yield
    finally:
        dpt.create_scaling_policy = create


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_only() -> Iterator[dict[str, Any]]:
    """Around a `ray.init` that starts a local instance: its kwargs, so that every Ray server
    (GCS, raylet, object manager, workers' gRPC, dashboard agent, runtime-env agent, metrics)
    listens on 127.0.0.1 only.

    Ray 2.60 binds loopback only when the node IP is a loopback address, but ray.init turns
    `_node_ip_address="127.0.0.1"` into the host's IP (_private/services.py resolve_ip_for_localhost)
    unless ray_constants.ENABLE_RAY_CLUSTER is false (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read at
    import; it would also stop `ray start` from joining nodes, so it is set only during the call)."""
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": LOOPBACK}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
