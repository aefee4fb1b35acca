"""torchrun worker (2 gloo processes) for tests/test_vocab_parallel.py; rank 0 writes a JSON report.

`parity OUT`: accel_tp.vocab_parallel.vocab_parallel_cross_entropy on each rank's vocabulary slice
against torch's cross_entropy on the whole logits (computed on every rank): loss, hidden-state and
head-weight gradients, untied and tied (an embedding vocab-split Megatron-style, sharing the head's
rows), with and without a bias, chunked and whole, an uneven split. Also the largest tensor any op
makes inside the loss's forward and backward (a TorchDispatchMode sees every aten op).

`train OUT MODEL_DIR...`: each tiny saved model trained 3 steps at tp 2 through Accelerate +
DeepSpeed AutoTP with the product's DeepSpeed config (accel_tp.parallel.build_deepspeed_config), in
four arms (ARMS): "default" (`vocab_parallel_lm_head: false`: the head gathered, or with a tied
embedding left whole, and Hugging Face's loss on the whole vocabulary), "ours" (AutoTP's vocab-split
head via `tensor_parallel.vocab_parallel_lm_head: true`, our forward), "deepspeed" (the same head,
the model's own forward with the loss DeepSpeed installs), "ours_zero3" (ours at ZeRO-3, every
parameter partitioned). Reports each arm's losses, the head's class and local shape, and the whole
trained weights' largest difference to the default arm's. SGD rather than Adam: Adam's first steps
move each weight by about lr whatever its gradient's size, so they would hide a wrong gradient.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from accel_tp.vocab_parallel import IGNORE_INDEX, vocab_parallel_cross_entropy


class _LargestTensor(TorchDispatchMode):
    """The largest element count of any tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), list(t.shape)
        return out


class _ReduceForward(torch.autograd.Function):
    """Megatron's reduce-from-TP-region: all-reduce forward, identity backward (the output's
    gradient is the same on every rank)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


def _vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
    return _ReduceForward.apply(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _grads(dtype, ids, labels, w0, b0, a0, h_in, items, tied, sl=None, chunk=None) -> dict:
    """Loss and gradients of tanh(x A) through the head: the plain loss on the whole vocabulary
    (`sl` None), or this rank's rows `sl` = (start, end) with the vocabulary-parallel loss."""
    start, end = sl or (0, w0.shape[0])
    w = w0[start:end].to(dtype, copy=True).requires_grad_()
    a = a0.to(dtype, copy=True).requires_grad_()
    b = None if b0 is None else b0[start:end].to(dtype, copy=True).requires_grad_()
    if tied:
        x = F.embedding(ids, w) if sl is None else _vocab_parallel_embedding(ids, w, start)
    else:
        x = h_in.to(dtype, copy=True).requires_grad_()
    h = torch.tanh(x @ a)
    h.retain_grad()
    if sl is None:
        logits = F.linear(h, w, b)[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, labels[:, 1:].reshape(-1), reduction="sum") / items
    else:
        loss = vocab_parallel_cross_entropy(
            h, w, labels, vocab_start=start, group=dist.group.WORLD, bias=b,
            num_items_in_batch=items, chunk_tokens=chunk,
        )  # fmt: skip
    loss.backward()
    out = {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad, "grad_a": a.grad}
    if b is not None:
        out["grad_bias"] = b.grad
    return {k: v.double() for k, v in out.items()}


def parity(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    B, S, H = 2, 24, 16
    report: dict = {"cases": []}
    for vocab, bounds in ((40, (0, 20, 40)), (37, (0, 19, 37))):
        start, end = bounds[rank], bounds[rank + 1]
        for tied in (False, True):
            for with_bias in (False, True):
                for chunk in (None, 5):
                    g = torch.Generator().manual_seed(vocab + 2 * tied + with_bias)
                    ids = torch.randint(0, vocab, (B, S), generator=g)
                    labels = ids.clone()
                    labels[0, :3] = IGNORE_INDEX
                    labels[1, -4:] = IGNORE_INDEX
                    w0 = torch.randn(vocab, H, generator=g) * 2
                    b0 = torch.randn(vocab, generator=g) if with_bias else None
                    a0 = torch.randn(H, H, generator=g) / H**0.5
                    h_in = torch.randn(B, S, H, generator=g)
                    items = float((labels[..., 1:] != IGNORE_INDEX).sum()) + 3.0
                    args = (ids, labels, w0, b0, a0, h_in, items, tied)
                    case = {"vocab": vocab, "tied": tied, "bias": with_bias, "chunk": chunk}
                    # fp32 against the plain fp32 loss, and each against the fp64 loss (exact to
                    # ~1e-16): how far the plain loss itself is from exact sets the bound.
                    exact = _grads(torch.float64, *args)
                    plain = _grads(torch.float32, *args)
                    ours = _grads(torch.float32, *args, sl=(start, end), chunk=chunk)
                    ours64 = _grads(torch.float64, *args, sl=(start, end), chunk=chunk)
                    for key in exact:
                        sliced = key in ("grad_weight", "grad_bias")
                        e, p = (t[start:end] if sliced else t for t in (exact[key], plain[key]))
                        case[key] = {
                            "ours_vs_plain": _rel(ours[key], p),
                            "plain_vs_exact": _rel(p, e),
                            "ours_vs_exact": _rel(ours[key], e),
                            "ours64_vs_exact": _rel(ours64[key], e),
                        }
                    report["cases"].append(case)
        # The mean (no num_items_in_batch) and the unshifted form on the last slice.
        hm = torch.randn(B * S, H, generator=g)
        tm = torch.randint(0, vocab, (B * S,), generator=g)
        tm[:5] = IGNORE_INDEX
        mean = vocab_parallel_cross_entropy(
            hm, w0[start:end], tm, vocab_start=start, group=dist.group.WORLD, shift=False, chunk_tokens=7
        )
        report.setdefault("mean", []).append(_rel(mean, F.cross_entropy(hm @ w0.t(), tm)))

    # Memory: N = 128 tokens, H = 2 (so N x H is below a chunk's logits), 32 vocabulary rows per
    # rank, chunks of 16 tokens: a chunk's logits are 16 x 32, a rank's whole slice 128 x 32.
    n, hidden, vocab, chunk = 128, 2, 64, 16
    g = torch.Generator().manual_seed(7)
    w0, h0 = torch.randn(vocab, hidden, generator=g), torch.randn(n, hidden, generator=g)
    t0 = torch.randint(0, vocab, (n,), generator=g)
    local = vocab // 2
    for name, c in (("chunked", chunk), ("whole", None)):
        wl = w0[rank * local : (rank + 1) * local].clone().requires_grad_()
        hl = h0.clone().requires_grad_()
        with _LargestTensor() as fwd:
            loss = vocab_parallel_cross_entropy(
                hl, wl, t0, vocab_start=rank * local, group=dist.group.WORLD, shift=False, chunk_tokens=c
            )
        with _LargestTensor() as bwd:
            loss.backward()
        report[f"memory_{name}"] = {"forward": [fwd.largest, fwd.shape], "backward": [bwd.largest, bwd.shape]}
    report["memory_shape"] = {"tokens": n, "hidden": hidden, "local_vocab": local, "chunk": chunk}

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()  # every rank's report is gathered and written
    # gloo's teardown can abort ("terminate called without an active exception") when ranks
    # destroy their groups at different moments under load; the work is done, so skip it.
    sys.stdout.flush()
    os._exit(0)


def _batches(vocab: int, steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        ids = torch.randint(2, vocab, (2, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -6:] = 0  # right padding: no loss there
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[0, :2] = IGNORE_INDEX  # a prompt without loss
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# (name, vocab_parallel_lm_head, our forward, ZeRO stage)
ARMS = (
    ("default", False, False, 1),
    ("ours", True, True, 1),
    ("deepspeed", True, False, 1),
    ("ours_zero3", True, True, 3),
)


def _train_arm(model_dir: str, vocab_parallel: bool, ours: bool, stage: int) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM

    from accel_tp.compat.transformers import without_hf_zero3_init
    from accel_tp.config import config_from_dict
    from accel_tp.parallel import Topology, build_deepspeed_config, make_deepspeed_plugin
    from accel_tp.vocab_parallel import vocab_parallel_head, vocab_parallel_loss_forward

    cfg = config_from_dict(
        {
            "model": {"name_or_path": model_dir},
            "parallelism": {"tp_size": 2, "dp_size": 1},
            "deepspeed": {"zero_stage": stage, "precision": "fp32", "gradient_clipping": 0.0},
            "train": {"micro_batch_size": 2, "grad_accum_steps": 1},
        }
    )
    topo = Topology.from_config(cfg, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))
    ds_config = build_deepspeed_config(cfg, topo, "fp32")
    # True: what families.tensor_parallel_block would add for the vocabulary-parallel loss. The
    # default arm says False: DeepSpeed's own default (None) already splits a tied head (with its
    # embedding) where the model's tp_plan holds embedding_rowwise, as transformers adds for every
    # model, and installs its own unchunked distributed loss.
    ds_config["tensor_parallel"]["vocab_parallel_lm_head"] = vocab_parallel
    if stage == 3:
        # Every parameter partitioned, however small (the default keeps small ones whole, which
        # would hide a head weight our forward reads outside the head's own forward).
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    acc = Accelerator(
        deepspeed_plugin=make_deepspeed_plugin(ds_config),
        mixed_precision="no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    with without_hf_zero3_init():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, optimizer = acc.prepare(model, optimizer)
    module = engine.module
    head = vocab_parallel_head(module)
    if ours:
        module.forward = vocab_parallel_loss_forward(module, head, chunk_tokens=7)
    engine.train()
    losses = []
    for batch in _batches(module.config.vocab_size, 3):
        items = torch.tensor(float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        res = engine(**batch, num_items_in_batch=items, use_cache=False)
        losses.append(float(res.loss))
        acc.backward(res.loss)
        optimizer.step()
        optimizer.zero_grad()
    whole = acc.get_state_dict(engine)  # collective; the whole weights on rank 0 only
    embedding = module.get_input_embeddings()
    report = {
        "losses": losses,
        "head": None
        if head is None
        else [type(head).__name__, list(getattr(head.weight, "ds_shape", head.weight.shape))],
        "embedding": type(embedding).__name__,
        "tied": embedding.weight is module.get_output_embeddings().weight,
        # ZeRO-3: the head's weight is partitioned, its data a placeholder between steps.
        "head_zero3": None if head is None else [hasattr(head.weight, "ds_id"), head.weight.data.numel()],
        "state": None if whole is None else {k: v.detach().clone() for k, v in whole.items()},
    }
    acc.wait_for_everyone()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return report


def train(out: str, model_dirs: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from accel_tp.compat.transformers import without_hf_zero3_init

    report: dict = {}
    for model_dir in model_dirs:
        arms = {name: _train_arm(model_dir, *how) for name, *how in ARMS}
        base = arms["default"]["state"]
        if base is not None:  # rank 0
            with without_hf_zero3_init():
                initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
            # How far training moved the weights: the scale the arms' differences are judged against.
            arms["default"]["weights_moved"] = max(float((base[k] - initial[k]).abs().max()) for k in base)
            for arm in arms.values():
                assert arm["state"].keys() == base.keys(), (sorted(arm["state"]), sorted(base))
                arm["weights_max_abs_diff"] = max(
                    float((arm["state"][k] - base[k]).abs().max()) for k in base
                )
        for arm in arms.values():
            arm.pop("state")
        report[os.path.basename(model_dir)] = arms
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()  # every rank's report is gathered and written
    # gloo's teardown can abort ("terminate called without an active exception") when ranks
    # destroy their groups at different moments under load; the work is done, so skip it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "parity":
        parity(sys.argv[2])
    else:
        train(sys.argv[2], sys.argv[3:])
