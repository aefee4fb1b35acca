"""Many nodes: a real multi-node Ray cluster on this host and a real S3-compatible server.

`ray.cluster_utils.Cluster` starts a head (no CPUs: it only holds the driver and Ray Train's
controller) and two nodes of 2 CPUs, each its own raylet; `scripts/train_ray.py --address` joins it.
moto's server is the object store (a real HTTP S3 endpoint on 127.0.0.1, reached through the standard
AWS_* variables). Nothing is mocked. The tests run in order on one cluster; the last removes a node.

Measured here (2 cores, whole file 3.7 min): cluster start ~20 s; each tiny tp2 x dp2 run 40-50 s;
the lost-node run ~90 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel_tp.checkpoint.format import DS_TAG, TRAIN_STATE_FILE, model_states_file, step_name
from accel_tp.config import load_config
from accel_tp.run_folder import EXPORT_DIR, METRICS_FILE, PLOT_FILE

from . import faults
from .mp_utils import ROOT, TINY, _env, set_args
from .reference import reference_run

pytestmark = pytest.mark.slow

BUCKET = "accel-tp-test"
RTOL = 2e-6
MICRO, ACCUM, DP = 2, 2, 2
GLOBAL = MICRO * ACCUM * DP
HANG_STEP = 8  # the lost-node run hangs rank 2 in this step's save (no other run saves at it)


# moto takes any key; a unique one can be searched for in every file the run and Ray wrote.
SECRET = "accel-tp-test-" + "secret-4b1f9e"


def _free_port() -> int:
    from accel_tp.env import free_port

    return free_port()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, one bucket, and the AWS variables that point at it."""
    import boto3

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - the server writes it
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.1)
    yield env, client
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head without CPUs + 2 nodes x 2 CPUs. The raylets inherit this environment: the lost-node
    test's fault (it fires only in workers whose driver puts tests/fault_injection on PYTHONPATH),
    fast health checks, and a short worker-group start timeout (a group sized before Ray noticed a
    dead node is given up in 20 s instead of 60)."""
    from ray.cluster_utils import Cluster

    marker = tmp_path_factory.mktemp("hang") / "hung"
    env = {
        **faults.hang_in_save(HANG_STEP, 2, marker),  # with PYTHONPATH: the repository, the fault folder
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        nodes = [c.add_node(num_cpus=2) for _ in range(2)]
        c.wait_for_nodes()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield {"cluster": c, "nodes": nodes, "marker": marker}
    c.shutdown()


def overrides(tmp: Path, name: str, cache: Path, **extra: object) -> dict[str, object]:
    return {
        "run.name": name,
        "run.seed": 3,
        "data.cache_dir": str(cache),
        "data.seq_length": 64,
        "deepspeed.precision": "fp32",
        "parallelism.tp_size": 2,
        "parallelism.dp_size": DP,
        "train.micro_batch_size": MICRO,
        "train.grad_accum_steps": ACCUM,
        "train.lr_schedule": "constant",
        "train.warmup_steps": 1,
        "train.learning_rate": 2e-3,
        "train.log_every": 1,
        "train.progress_bar": False,
        "checkpoint.at_end": True,
        **extra,
    }


def train_ray(cluster, ov: dict[str, object], env: dict[str, str] | None = None, timeout: int = 600):
    cmd = [sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY),
           "--address", cluster["cluster"].address, *set_args(ov)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    proc.seconds = time.monotonic() - t0
    return proc


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows if "loss" in r]


def assert_close(got: list[float], want: list[float], rtol: float = RTOL) -> None:
    assert len(got) == len(want), (len(got), len(want))
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"worst relative loss difference {worst:.2e} over {len(got)} steps")
    assert worst <= rtol, f"worst relative difference {worst:.2e} > {rtol:g}: {got} vs {want}"


def objects(client, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"][len(prefix) :]: o["Size"] for o in page.get("Contents", [])})
    return out


def read_object(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one folder every simulated node sees: shared


@pytest.fixture(scope="module")
def s3_run(cluster, s3, cache, tmp_path_factory):
    """tp2 x dp2 on the two nodes, run folder in the bucket, HF export at the end: 6 steps."""
    env, client = s3
    ov = overrides(tmp_path_factory.mktemp("s3run"), "on-s3", cache, **{
        "ray.storage_path": f"s3://{BUCKET}/runs", "train.max_steps": 6, "checkpoint.every_steps": 3,
        "checkpoint.export_hf": True,
    })  # fmt: skip
    proc = train_ray(cluster, ov, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"ov": ov, "proc": proc, "text": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The independent single-process loop over the same global batches, 12 steps."""
    ov = overrides(tmp_path_factory.mktemp("ref"), "ref", cache, **{"train.max_steps": 12})
    return reference_run(load_config(TINY, [f"{k}={v}" for k, v in ov.items()]), GLOBAL)["losses"]


def test_tp_groups_are_node_local_and_the_mesh_is_printed(s3_run):
    """Ray numbers workers node by node: ranks 0-1 on one node, 2-3 on the other; each TP group
    (consecutive ranks) is node-local, and rank 0 prints which node holds which ranks."""
    text = s3_run["text"]
    assert "mesh: tp2 x dp2 on 2 node(s)" in text, text[-4000:]
    lines = [ln.split("[accel-tp]   ", 1)[1] for ln in text.splitlines() if "[accel-tp]   node " in ln]
    assert (
        len(lines) == 2
        and "ranks 0-1 = dp 0 x tp 0-1" in lines[0]
        and "ranks 2-3 = dp 1 x tp 0-1" in lines[1]
    )
    node_ids = [ln.split("(", 1)[1].split(")", 1)[0] for ln in lines]
    assert node_ids[0] != node_ids[1]
    # What a lost node would do, said up front.
    assert "a lost worker or node ends the run (ray.max_failures: 0;" in text


def test_one_tokenization_per_cluster_on_a_shared_cache(s3_run):
    """Both nodes see one cache folder: one rank of the cluster tokenizes (train and eval once each).
    (The resumed run below finds the published cache and tokenizes nothing.)"""
    text = s3_run["text"]
    assert text.count("tokenizing the train data") == 1, text[-4000:]
    assert text.count("tokenizing the eval data") == 1


def test_the_secret_key_is_in_no_log_or_file(s3_run, s3, cluster):
    """The nodes were started without credentials, so the workers and Ray Train's controller got them
    from the driver, but never through a runtime env (Ray writes those into its logs): the secret
    is in no file of the cluster's Ray session folders, the run's output, or the bucket."""
    env, client = s3
    assert SECRET not in s3_run["text"]
    session = Path(cluster["cluster"].head_node.get_session_dir_path())
    hits = [str(f) for f in session.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert not hits, hits
    assert list(session.rglob("runtime_env_agent.log"))  # where the runtime env used to be written
    keys = objects(client, "")
    assert keys and not [k for k in keys if SECRET.encode() in read_object(client, k)]


def test_the_run_folder_lands_in_the_bucket(s3_run, s3, reference):
    """Checkpoints, metrics.jsonl, loss.png, TensorBoard events and the HF export, all in the bucket;
    the losses are the reference loop's."""
    _, client = s3
    prefix = f"runs/{s3_run['ov']['run.name']}/"
    got = objects(client, prefix)
    for name in (f"{step_name(3)}/{TRAIN_STATE_FILE}", f"{step_name(6)}/{DS_TAG}/{model_states_file(1)}",
                 METRICS_FILE, PLOT_FILE, f"{EXPORT_DIR}/model.safetensors", f"{EXPORT_DIR}/config.json",
                 f"{EXPORT_DIR}/tokenizer.json"):  # fmt: skip
        assert got.get(name, 0) > 0, f"{name} missing from s3://{BUCKET}/{prefix}: {sorted(got)}"
    assert any(k.split("/")[-1].startswith("events.out.tfevents") and v > 0 for k, v in got.items()), sorted(
        got
    )
    rows = [json.loads(x) for x in read_object(client, prefix + METRICS_FILE).decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert_close(losses(rows), reference[:6])
    assert "plot: s3://" in s3_run["text"] and "export: s3://" in s3_run["text"]


def test_resume_and_export_read_from_the_bucket(s3_run, cluster, s3, reference, tmp_path):
    """The same run.name again with max_steps 9 resumes from the bucket's step-6 checkpoint; its
    metrics continue the same metrics.jsonl. scripts/export_hf.py reads a checkpoint from the bucket
    and writes the model to the bucket: the same weights as the run's own end-of-training export."""
    env, client = s3
    ov = {**s3_run["ov"], "train.max_steps": 9}
    proc = train_ray(cluster, ov, env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    assert f"resuming it from its latest checkpoint ({step_name(6)})" in text
    assert "tokenizing" not in text  # the cache the first run published, read by every node
    assert "steps=6->9" in text
    prefix = f"runs/{ov['run.name']}/"
    rows = [json.loads(x) for x in read_object(client, prefix + METRICS_FILE).decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert_close(losses(rows), reference[:9])

    out = f"s3://{BUCKET}/exports/step9"
    cmd = [sys.executable, str(ROOT / "scripts" / "export_hf.py"),
           "--checkpoint", f"s3://{BUCKET}/{prefix}{step_name(9)}", "--out", out]  # fmt: skip
    exp = subprocess.run(cmd, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, (exp.stdout + exp.stderr)[-4000:]
    from safetensors.torch import load

    a = load(read_object(client, "exports/step9/model.safetensors"))
    b = load(read_object(client, f"{prefix}{EXPORT_DIR}/model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # An unregistered or absent checkpoint in the bucket is refused, naming what to pass.
    bad = subprocess.run([*cmd[:3], f"s3://{BUCKET}/{prefix}{step_name(5)}", "--out", str(tmp_path / "x")],
                         cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "never registered" in bad.stderr and step_name(9) in bad.stderr


@pytest.mark.parametrize("where", ["unreachable endpoint", "no such bucket"])
def test_bad_object_storage_fails_before_training(cluster, s3, cache, tmp_path, where):
    env, client = s3
    env = dict(env)
    storage = f"s3://{BUCKET}/runs"
    if where == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
    else:
        storage = "s3://no-such-bucket/runs"
    ov = overrides(tmp_path, "never-starts", cache, **{"ray.storage_path": storage, "train.max_steps": 2})
    proc = train_ray(cluster, ov, env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line.startswith("accel-tp: config error: ray.storage_path: cannot write to"), line
    assert "TrainController" not in proc.stdout + proc.stderr  # Ray Train never started
    assert objects(client, "runs/never-starts/") == {}


def test_tp_larger_than_a_node_is_refused_up_front(cluster, cache, tmp_path):
    """tp4 on nodes of 2 CPUs (2 workers each): no TP group fits on one node; refused on the driver."""
    ov = overrides(tmp_path, "too-wide", cache, **{
        "ray.storage_path": str(tmp_path / "ray"), "parallelism.tp_size": 4, "parallelism.dp_size": 1,
        "train.grad_accum_steps": 4, "train.max_steps": 2,
    })  # fmt: skip
    proc = train_ray(cluster, ov, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "parallelism.tp_size: 4 workers in TP groups of 4" in proc.stderr
    assert "tp_size must divide the GPUs per node" in proc.stderr
    assert "TrainController" not in proc.stdout + proc.stderr


def test_local_storage_other_nodes_cannot_see_is_refused(cluster, cache, tmp_path):
    """The driver's ray.storage_path is a tmpfs mounted in the driver's own mount namespace: the
    nodes' raylets do not see it (as on machines without a shared filesystem). Refused before
    training, naming the nodes and the fix."""
    import shutil

    private = tmp_path / "private"
    private.mkdir()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (a private mount namespace) to hide a folder from the other nodes")
    ov = overrides(tmp_path, "not-shared", cache, **{"ray.storage_path": str(private), "train.max_steps": 2})
    cmd = [sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY),
           "--address", cluster["cluster"].address, *set_args(ov)]  # fmt: skip
    script = f"mount -t tmpfs none {private} && exec {' '.join(map(repr, cmd))}"
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"ray.storage_path: {str(private)!r} is not shared: nodes" in proc.stderr
    assert "s3://bucket/prefix" in proc.stderr
    assert "TrainController" not in proc.stdout + proc.stderr


def _node_of(pid: int, nodes) -> object:
    """The simulated node whose raylet is an ancestor of process `pid`."""
    import psutil
    from ray._private import ray_constants

    raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n for n in nodes}
    p = psutil.Process(pid)
    while p is not None:
        if p.pid in raylets:
            return raylets[p.pid]
        p = p.parent()
    raise AssertionError(f"process {pid} is not under any node's raylet")


def test_a_lost_node_continues_on_fewer_workers_with_the_same_losses(cluster, cache, tmp_path, reference):
    """tp2 x dp2 with ray.min_workers 2. Rank 2 hangs in the step-8 save (steps 4 is saved); its
    whole node is removed. Ray restarts the group on the remaining node as tp2 x dp1 with gradient
    accumulation doubled (global batch unchanged), resumes from step 4 resharded, and finishes with
    the uninterrupted run's losses (the reference loop's) within 1e-5. Runs last: it removes a node."""
    ov = overrides(tmp_path, "loses-a-node", cache, **{
        "ray.storage_path": str(tmp_path / "ray"), "train.max_steps": 12, "checkpoint.every_steps": 4,
        "ray.min_workers": 2, "ray.max_failures": 2,
    })  # fmt: skip
    cmd = [sys.executable, str(ROOT / "scripts" / "train_ray.py"), "--config", str(TINY),
           "--address", cluster["cluster"].address, *set_args(ov)]  # fmt: skip
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - the child writes it until it exits
    # The driver hands its PYTHONPATH to the workers (launch.run_ray): with the fault-injection folder
    # on it, rank 2 hangs in the step-8 save (the cluster's environment names the fault).
    env = {**_env(), "PYTHONPATH": faults.pythonpath()}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    marker, removed = cluster["marker"], None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        if removed is None and marker.exists():
            node = _node_of(int(marker.read_text()), cluster["nodes"])
            cluster["cluster"].remove_node(node, allow_graceful=False)
            removed = node
    proc.wait(timeout=max(1, deadline - time.time()))
    log.close()
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, text[-6000:]
    assert removed is not None, "the run ended before its node could be removed"
    assert "down to 2 workers (ray.min_workers" in text
    assert "elastic: 2 of 4 workers: tp2 x dp1, grad_accum_steps 2 -> 4 (global batch 8 kept)" in text
    assert f"resharding checkpoint {step_name(4)}: tp2xdp2 ZeRO-1 -> tp2xdp1 ZeRO-1" in text
    assert "steps=4->12" in text
    rows = [
        json.loads(x)
        for x in (tmp_path / "ray" / str(ov["run.name"]) / METRICS_FILE).read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert_close(losses(rows), reference, rtol=1e-5)
