"""torchrun worker (4 gloo processes): the Ulysses exchange of accel_tp/sequence_parallel.py against
the plain Hugging Face forward, and the activation memory per rank at sp 1, 2 and 4.

For each case a model is built identically on every rank. The whole-row forward (the model's own
attention, position ids restarting per document so Transformers masks per document) is the
reference; the first `sp` ranks then run the same model with its attention split over them. Checked:
each rank's logits equal the reference's for its tokens, the slices' loss sums add up to the
reference's, and the gradients summed over the SP ranks equal the reference's gradients. Cases:
eager and sdpa, 8 query / 2 key-value heads at sp 4 (each rank gets a copy of one kv head), packed
documents, and a sliding window shorter than the documents (Mistral).

Memory: bytes of the tensors autograd saves for the backward (deduplicated by storage) in one
forward of a 2 x 2,048-token batch, per rank, at sp 1, 2 and 4. Writes a JSON report to argv[1].
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from accel_tp.data.loader import Batch
from accel_tp.sequence_parallel import SequenceParallel


def model_for(kind: str, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    shape = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        use_cache=False,
    )
    config = MistralConfig(**shape, sliding_window=24) if kind == "mistral" else LlamaConfig(**shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).train()


def packed_batch(rows: int, width: int, docs: list[int]) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (rows, width), generator=g)
    pos = torch.cat([torch.arange(n) for n in docs])[None].expand(rows, width).contiguous()
    labels = ids.masked_fill(pos == 0, -100)
    n = (labels[:, 1:] != -100).sum()
    return Batch({"input_ids": ids, "position_ids": pos, "labels": labels}, n, n, torch.tensor(0.0))


def loss_sum(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**inputs, num_items_in_batch=torch.tensor(1.0))  # a sum of token losses
    return out.loss, out.logits


def check_exchange(kind: str, attn: str, sp_size: int, groups: dict, rank: int) -> dict:
    batch = packed_batch(2, 128, [40, 50, 38])
    ref_model = model_for(kind, attn)
    ref_loss, ref_logits = loss_sum(ref_model, batch.inputs)
    ref_loss.backward()
    # Controls: the case's document mask and sliding window change the logits, so matching them
    # proves the exchange applies both.
    with torch.no_grad():
        whole = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
        controls = {"no_documents": float((loss_sum(ref_model, whole)[1] - ref_logits).abs().max())}
        if kind == "mistral":
            unwindowed = copy.deepcopy(ref_model)
            unwindowed.config.sliding_window = None
            for m in unwindowed.modules():
                if hasattr(m, "sliding_window"):
                    m.sliding_window = None
            controls["no_window"] = float((loss_sum(unwindowed, batch.inputs)[1] - ref_logits).abs().max())
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    group = groups[sp_size]
    result: dict = {}
    if rank < sp_size:
        sp = SequenceParallel(group, sp_size, rank)
        model = copy.deepcopy(ref_model)
        model.zero_grad(set_to_none=True)
        layers = sp.install(model, attn)
        with sp.split(batch, "cpu") as part:
            loss, logits = loss_sum(model, part.inputs)
            loss.backward()
        width = logits.shape[1]
        mine = ref_logits[:, rank * width : (rank + 1) * width]
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        worst_grad = 0.0
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=group)
            worst_grad = max(
                worst_grad, float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12))
            )
        result = {
            "layers": layers,
            "controls": controls,
            "logits_max_abs_diff": float((logits.detach() - mine.detach()).abs().max()),
            "loss_sum_rel_diff": float(abs(total - ref_loss.detach()) / ref_loss.detach().abs()),
            "grad_worst_rel_diff": worst_grad,
        }
    dist.barrier()
    return result


def saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_sum(model, inputs)
    del loss
    return sum(seen.values())


def measure_memory(sp_size: int, groups: dict, rank: int) -> int | None:
    batch = packed_batch(2, 2048, [2048])
    model = model_for("llama", "sdpa")
    out = None
    if sp_size == 1:
        if rank == 0:
            out = saved_bytes(model, batch.inputs)
    elif rank < sp_size:
        sp = SequenceParallel(groups[sp_size], sp_size, rank)
        sp.install(model, "sdpa")
        with sp.split(batch, "cpu") as part:
            out = saved_bytes(model, part.inputs)
    dist.barrier()
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    groups = {2: dist.new_group([0, 1]), 4: dist.new_group([0, 1, 2, 3])}
    report: dict = {"exchange": {}, "saved_bytes": {}}
    for kind, attn, sp_size in [
        ("llama", "sdpa", 2),
        ("llama", "eager", 2),
        ("llama", "sdpa", 4),
        ("llama", "eager", 4),
        ("mistral", "sdpa", 2),
        ("mistral", "eager", 4),
    ]:
        r = check_exchange(kind, attn, sp_size, groups, rank)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r)
        report["exchange"][f"{kind}-{attn}-sp{sp_size}"] = [x for x in gathered if x]
    for sp_size in (1, 2, 4):
        b = measure_memory(sp_size, groups, rank)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, b)
        report["saved_bytes"][str(sp_size)] = max(x for x in gathered if x is not None)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
