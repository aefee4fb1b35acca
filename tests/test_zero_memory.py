"""What each ZeRO stage holds per rank, counted on real DeepSpeed (tp2 x dp2, 4 gloo processes, fp32):
the model-state formula (docs/parallelism.md), checked tensor by tensor on the tiny model.

With P the parameters one TP rank holds (AutoTP shards every linear layer; the untied embedding and
the norms are replicated), fp32 on CPU: stages 1 and 2 keep the whole TP shard (4P bytes) and a 1/dp
partition of the fp32 master weights (4P/dp) and of both Adam moments (8P/dp); stage 3 also
partitions the parameters (4P/dp). (Gradients are not counted here: stage 1 keeps them whole,
stages 2 and 3 partitioned.)"""

from __future__ import annotations

import json

import pytest

from .mp_utils import ROOT, TINY, torchrun

pytestmark = pytest.mark.slow


def tp_shard_params(tp: int) -> int:
    from accel_tp.model import architecture_config

    conf = architecture_config("tiny", 4096)  # the default tokenizer's vocabulary
    d, layers = conf.hidden_size, conf.num_hidden_layers
    embed = conf.vocab_size * d
    norms = (2 * layers + 1) * d
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
    return embed + norms + (total - embed - norms) // tp


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    """The three stages counted in one torchrun of 4 processes (tests/workers/count_zero_bytes.py
    --zero-stages: one engine after another in the same process group)."""
    tmp = tmp_path_factory.mktemp("zero-bytes")
    out = tmp / "bytes.json"
    sets = [
        "deepspeed.precision=fp32",
        f"data.cache_dir={tmp / 'cache'}",
        f"run.output_dir={tmp / 'runs'}",
        "data.eval_fraction=0",
        "train.log_with=[]",
        "train.progress_bar=false",
    ]
    script = ROOT / "tests" / "workers" / "count_zero_bytes.py"
    proc = torchrun(4, script, ["--zero-stages", "1,2,3", str(TINY), str(out), *sets])
    assert proc.returncode == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bytes_per_rank_follow_the_formula(reports, zero):
    rep = reports[str(zero)]
    p, dp = tp_shard_params(2), 2
    want = {"params": 4 * p // (dp if zero == 3 else 1), "master": 4 * p // dp, "moments": 8 * p // dp}
    assert (rep["tp"], rep["dp"], rep["zero_stage"]) == (2, 2, zero)
    for rank in rep["ranks"]:
        assert {k: rank[k] for k in want} == want, (rank, want)
        assert rank["grads"] > 0  # measured after one backward (docs/lora.md compares them)
