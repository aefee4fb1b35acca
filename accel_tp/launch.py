"""Launching: the Ray Train driver and the `accelerate launch` worker entry point."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import check_run_folder
from .compat.ray import WorkerCount, elastic_worker_count_override, loopback_only
from .config import Config, config_from_dict, elastic_worker_counts
from .data import check_data_sources
from .env import VERBOSE_ENV, ray_driver_env, ray_worker_env
from .errors import ConfigError, UserError, WorkerCrash
from .export import ray_registered
from .model import load_tokenizer, model_config
from .modes import LocalMode, RayMode
from .parallel import Topology, check_sp_heads, check_tp_heads
from .parallelize import check_device_support, checkpointed_layer_count
from .placement import check_cluster_fits, workers_per_node
from .run_folder import METRICS_FILE, run_folder
from .storage import AWS_ENV, Credentials, check_storage, exists, is_remote, join, read_text
from .trainer import run_worker

__all__ = ["preflight", "check_writable", "run_ray", "run_local", "worker_failure"]


def preflight(cfg: Config, world_size: int | None = None, tokenizer: bool = False) -> None:
    """Checks that need no worker: layout against world size and the model's heads, sequence
    length, the data files; with `tokenizer`, also loads the tokenizer (the driver of a Ray run:
    it is cached for the workers on this node, and a bad one fails here, not on every rank)."""
    par = cfg.parallelism
    if cfg.ray.device == "cpu":
        check_device_support(cfg.model, "cpu")
    if world_size is not None:
        Topology.from_config(cfg, world_size)
    # The vocab only matters for random-init shapes and does not affect the head checks.
    mconf = model_config(cfg.model, vocab_size=1)
    check_tp_heads(par.tp_size, mconf.num_attention_heads, getattr(mconf, "num_key_value_heads", None))
    check_sp_heads(
        par.tp_size, par.sp_size, mconf.num_attention_heads, getattr(mconf, "num_key_value_heads", None)
    )
    # The attention kernel and the TP partition are decided here, from the config and the model
    # built on the meta device: a model accel-tp cannot split fails in seconds with one message.
    from .families import check_against_model, resolve_partition
    from .model import build_meta_model, check_attn_implementation

    check_attn_implementation(cfg.model, mconf)
    partition = resolve_partition(cfg.model, mconf, par.tp_size)
    if partition.partition_config is not None:
        check_against_model(partition, build_meta_model(mconf, cfg.model.trust_remote_code))
    if cfg.lora.enabled:
        from .families import split_module_names, with_lora
        from .lora import check_lora, resolve_adapter

        lora = resolve_adapter(cfg.lora)
        check_lora(lora, build_meta_model(mconf, cfg.model.trust_remote_code), split_module_names(partition))
        if par.tp_size > 1:
            with_lora(partition, lora.targets(), mconf)  # refuses a target AutoTP cannot split with PEFT
    checkpointed_layer_count(cfg.model.activation_checkpointing, mconf.num_hidden_layers)
    max_pos = getattr(mconf, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_length > max_pos:
        raise ConfigError(
            f"data.seq_length: {cfg.data.seq_length} exceeds the model's max_position_embeddings ({max_pos}); "
            f"use data.seq_length <= {max_pos}."
        )
    check_data_sources(cfg.data)
    # Chat data needs the tokenizer's chat template (or model.chat_template): checked here too.
    if tokenizer or cfg.data.format == "chat":
        check_data_sources(cfg.data, load_tokenizer(cfg.model, cfg.data.resolved_cache_dir()), files=False)


def check_writable(path: str | Path, field: str) -> None:
    """Create `path` if needed and prove it takes a file, or fail naming the config field."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".accel-tp-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{field}: cannot write to {str(path)!r} ({e.strerror or e}); pick a writable folder."
        ) from e


def _ray_worker(loop_config: dict[str, Any]) -> None:
    if loop_config.get("credentials") is not None:
        loop_config["credentials"].apply()  # before anything touches storage
    run_worker(config_from_dict(loop_config["config"]), RayMode(loop_config["run_root"]))


def init_ray(address: str | None, runtime_env: dict[str, Any], local_cpus: int | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or with `local_cpus` start a local instance
    whose servers all listen on 127.0.0.1 only (nothing else is meant to join it)."""
    import ray

    if local_cpus is None:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    with loopback_only() as bind:
        # address "local": a new instance even where another one's ray_current_cluster file is
        # left in /tmp/ray (a killed run's), which ray.init would otherwise try to join.
        ray.init(address="local", runtime_env=runtime_env, log_to_driver=True, num_cpus=local_cpus, **bind)


def run_ray(cfg: Config, address: str | None = None) -> Any:
    """Run the job on Ray Train with tp_size x sp_size x dp_size workers; returns Ray's Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    par = cfg.parallelism
    if par.dp_size is None:
        raise ConfigError(
            "parallelism.dp_size: a Ray run needs it to size the worker group (tp_size x sp_size x dp_size workers)."
        )
    world_size = par.replica_size * par.dp_size
    resume = cfg.checkpoint.resume_from
    if resume not in (None, "latest"):
        # Ray Train restores a run only from its own registered checkpoints (run.name under
        # ray.storage_path); an arbitrary folder cannot be handed to it.
        raise ConfigError(
            f"checkpoint.resume_from: {resume!r}: a Ray run resumes from its own latest checkpoint (the same "
            "run.name under ray.storage_path), never from a given folder. Resubmit that run.name, or start "
            "a new run from the checkpoint's weights (scripts/export_hf.py, then model.name_or_path), or "
            "resume the folder with accelerate launch (--resume)."
        )
    preflight(cfg, world_size, tokenizer=True)

    storage = cfg.ray.storage_path
    if is_remote(storage):
        # Before Ray starts: an unreachable store or bad credentials fail here, nothing registered.
        check_storage(storage, "ray.storage_path")
    else:
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
        check_writable(storage, "ray.storage_path")
    folder = run_folder(join(storage, cfg.run.name) if is_remote(storage) else Path(storage) / cfg.run.name)
    address = address if address is not None else cfg.ray.address
    # An elastic run may start on as few as ray.min_workers.
    min_workers = cfg.ray.min_workers or world_size
    cpus_needed = min_workers * cfg.ray.cpus_per_worker
    joined = address is not None or bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    if not ray.is_initialized():
        # Workers import accel_tp from where the driver did, also when it is not pip-installed.
        pkg_root = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
        # Workers initialise CUDA before our code runs: the worker environment (DeepSpeed switch,
        # allocator default) goes into their runtime env.
        # The plain AWS variables too (nodes started without them still find the run's storage); the
        # secret ones travel in memory (storage.Credentials): Ray logs a runtime env in clear text.
        aws = {k: os.environ[k] for k in AWS_ENV if k in os.environ}
        env = {"env_vars": {**ray_worker_env(os.environ), **aws, "PYTHONPATH": pythonpath}}
        # A local instance gets enough logical CPUs for the worker group even on a small machine
        # (CPU workers then share cores); a cluster reports what it has.
        init_ray(address, env, None if joined else max(os.cpu_count() or 1, cpus_needed + 1))
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if resources.get("CPU", 0) < cpus_needed:
        raise ConfigError(
            f"ray.cpus_per_worker: {min_workers} workers x {cfg.ray.cpus_per_worker} CPUs = {cpus_needed}, "
            f"but the Ray cluster has {resources.get('CPU', 0):g} CPUs; lower ray.cpus_per_worker."
        )
    use_gpu = cfg.ray.device == "gpu" or (cfg.ray.device == "auto" and gpus > 0)
    check_device_support(cfg.model, "cuda" if use_gpu else "cpu")
    if use_gpu and gpus < min_workers:
        raise ConfigError(
            f"ray.device: {min_workers} GPU workers need {min_workers} GPUs; the Ray cluster has {int(gpus)}. "
            "Lower parallelism.* or set ray.device: cpu."
        )
    per_worker = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    capacity = workers_per_node([n.get("Resources", {}) for n in nodes], per_worker)
    check_cluster_fits(capacity, par.tp_size, min_workers, "parallelism.tp_size")
    if not is_remote(storage):
        # Only nodes that can host a worker write checkpoints.
        check_shared_storage(storage, [n for n, c in zip(nodes, capacity) if c > 0])
    print(_failure_plan(cfg, world_size), flush=True)
    # Ray Train restores a run whose name exists under the storage path: say so up front.
    registered = ray_registered(folder.root)
    if registered:
        print(
            f"[accel-tp] run.name {cfg.run.name!r} exists in {storage}: resuming it from its latest "
            f"checkpoint ({registered[-1].name}); pick a new run.name to start fresh.",
            flush=True,
        )
    elif resume == "latest":
        print(
            f"[accel-tp] checkpoint.resume_from: latest: run.name {cfg.run.name!r} has no checkpoint in "
            f"{storage}; starting from step 0.",
            flush=True,
        )
    os.environ.update(ray_driver_env(os.environ))  # read by the controller that fit() starts
    # A local instance's processes inherit this environment, credentials included. On a cluster the
    # workers get them from the loop config, and Ray Train's controller (which writes the run's
    # checkpoint records, on whichever node it lands) through a filesystem holding them.
    credentials = Credentials.from_environ()
    where: dict[str, Any] = {"storage_path": storage}
    if joined and credentials is not None and storage.startswith("s3://"):
        where = {
            "storage_path": storage.removeprefix("s3://"),
            "storage_filesystem": credentials.s3_filesystem(),
        }
    trainer = TorchTrainer(
        train_loop_per_worker=_ray_worker,
        train_loop_config={"config": cfg.to_dict(), "run_root": folder.root, "credentials": credentials},
        scaling_config=ScalingConfig(
            num_workers=(min_workers, world_size) if cfg.ray.min_workers else world_size,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            **({"elastic_resize_monitor_interval_s": cfg.ray.regrow_check_s} if cfg.ray.min_workers else {}),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            **_ray_train_logging(),
            **where,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    try:
        with _elastic_policy(cfg):
            result = trainer.fit()
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        raise worker_failure(e) from None
    print(f"[accel-tp] run folder:  {result.path}")
    if result.checkpoint is not None:
        print(f"[accel-tp] checkpoint:  {result.checkpoint.path}")
    final = result.metrics
    metrics_uri = folder.uri(METRICS_FILE)
    print(f"[accel-tp] metrics:     {metrics_uri}")
    lines = read_text(metrics_uri).splitlines() if exists(metrics_uri) else []
    final = json.loads(lines[-1]) if lines else final
    print(f"[accel-tp] final:       {final}")
    return result


def _failure_plan(cfg: Config, world_size: int) -> str:
    """What a lost worker or node does to this run, in one line."""
    r = cfg.ray
    tries = "unlimited" if r.max_failures == -1 else str(r.max_failures)
    if r.max_failures == 0:
        return (
            "[accel-tp] a lost worker or node ends the run (ray.max_failures: 0; Ray still retries a node "
            "its cloud preempts); resubmit the same run.name to resume from its last checkpoint."
        )
    if r.min_workers:
        return (
            f"[accel-tp] a lost worker or node: Ray restarts the group ({tries} times, ray.max_failures) on "
            f"what is left, down to {r.min_workers} workers (ray.min_workers; tp kept, dp lowered, the same "
            f"global batch), from the last checkpoint; when the {world_size} workers fit again (Ray looks every "
            f"{r.regrow_check_s:g} s, ray.regrow_check_s) it restarts the group at full size from the last "
            "checkpoint, resharded up."
        )
    return (
        f"[accel-tp] a lost worker or node: Ray restarts the group ({tries} times, ray.max_failures) from "
        f"the last checkpoint once {world_size} workers fit again, waiting until they do (set ray.min_workers "
        "to continue on fewer)."
    )


def check_shared_storage(storage: str, nodes: list[dict[str, Any]]) -> None:
    """A local ray.storage_path on several nodes must be one shared filesystem: every node that can
    run a worker (`nodes`) must see a file the driver writes there (a task pinned to each node looks)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(nodes) <= 1 and all(n.get("NodeID") == ray.get_runtime_context().get_node_id() for n in nodes):
        return
    probe = Path(storage) / f".accel-tp-shared-{os.urandom(6).hex()}"
    probe.write_text("")
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        seen = ray.get(
            [
                sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(probe))
                for n in nodes
            ]
        )
    finally:
        probe.unlink()
    blind = [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            f"ray.storage_path: {storage!r} is not shared: nodes {blind} do not see it, so their "
            "checkpoints would be lost. Mount one shared filesystem at that path on every node, or use "
            "object storage (ray.storage_path: s3://bucket/prefix)."
        )


def tp_aligned_worker_count(tp_size: int, counts: list[int]) -> WorkerCount:
    """How many workers an elastic run can use on the nodes Ray reserved: whole, node-local TP groups,
    and a count that keeps the global batch (`counts`, elastic_worker_counts); Ray's own policy
    would take every free slot."""

    def count(reserved: list[dict[str, float]], per_worker: dict[str, float]) -> int:
        usable = sum(c // tp_size * tp_size for c in workers_per_node(reserved, per_worker))
        return max([c for c in counts if c <= usable], default=0)

    return count


def _elastic_policy(cfg: Config) -> contextlib.AbstractContextManager[None]:
    if not cfg.ray.min_workers:
        return contextlib.nullcontext()
    par, tr = cfg.parallelism, cfg.train
    counts = elastic_worker_counts(par.replica_size, par.dp_size or 1, tr.grad_accum_steps)
    return elastic_worker_count_override(tp_aligned_worker_count(par.tp_size, counts))


def _ray_train_logging() -> dict[str, Any]:
    """Ray Train's own INFO lines (every report, every checkpoint) off the console, unless
    ACCEL_TP_VERBOSE is set; its warnings and errors still show (where this Ray version has LoggingConfig)."""
    import ray.train

    config = getattr(ray.train, "LoggingConfig", None)
    if config is None or os.environ.get(VERBOSE_ENV):
        return {}
    return {"logging_config": config(log_level="WARNING")}


def _root_cause(error: BaseException) -> BaseException:
    while getattr(error, "cause", None) is not None or error.__cause__ is not None:
        error = getattr(error, "cause", None) or error.__cause__
    return error


def worker_failure(error: Exception) -> Exception:
    """What a failed Ray worker group means to the user. When a worker raised a UserError (a config
    field, a data file, a checkpoint), that error, as one line naming the worker: the other workers'
    errors are its consequences (a collective its peer left). Anything else is a crash, shown with
    the workers' own tracebacks (Ray Train keeps them as text: the exception objects lose theirs
    on the way to the driver)."""
    failures = getattr(error, "worker_failures", None) or {}
    user = sorted((r, _root_cause(e)) for r, e in failures.items() if isinstance(_root_cause(e), UserError))
    if user:
        rank, root = user[0]
        others = f" (and {len(failures) - 1} more workers)" if len(failures) > 1 else ""
        message = str(root).strip().splitlines()
        return type(root)(f"worker {rank}{others}: {message[-1] if message else type(root).__name__}")
    return WorkerCrash(str(error).strip())


def run_local(cfg: Config) -> dict[str, Any]:
    """One worker of an `accelerate launch` (or torchrun) job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        preflight(cfg, world_size)
    except ConfigError as e:
        if world_size == 1 and cfg.parallelism.replica_size * (cfg.parallelism.dp_size or 1) > 1:
            n = cfg.parallelism.replica_size * (cfg.parallelism.dp_size or 1)
            raise ConfigError(
                f"{e} Launch with: accelerate launch --use_deepspeed --num_processes {n} ..."
            ) from e
        raise
    mode = LocalMode(cfg)
    folder = mode.folder
    check_run_folder(folder.local, cfg.checkpoint.resume_from, cfg.run.name)
    if int(os.environ.get("RANK", "0")) == 0:
        check_writable(folder.local, "run.output_dir")
    metrics = run_worker(cfg, mode)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[accel-tp] checkpoints: {folder.checkpoints}")
        print(f"[accel-tp] metrics:     {folder.metrics}")
        print(f"[accel-tp] final:       {metrics}")
    return metrics
