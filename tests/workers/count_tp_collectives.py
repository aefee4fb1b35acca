"""torchrun worker: count the collectives AutoTP issues on the TP group in one forward + backward
(real DeepSpeed, gloo) and write them, with accel_tp.tools.commbench's prediction, to a JSON report."""

import json
import sys

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist

from accel_tp.config import load_config
from accel_tp.families import vocabulary_split
from accel_tp.tools.commbench import tp_traffic
from accel_tp.trainer import setup


def main() -> None:
    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    rt = setup(load_config(config, overrides))
    tp_ranks = rt.topo.tp_group_ranks()
    seen: list[tuple[str, int]] = []

    def on_tp(group) -> bool:
        return group is not None and dist.get_process_group_ranks(group) == tp_ranks

    # AutoTP's layers call deepspeed.comm (deepspeed/module_inject/layers.py). Its all_reduce calls
    # torch.distributed's, as the vocabulary-parallel loss does: counted there. Its all-gather holds
    # torch's function from its start (comm/torch.py all_gather_function): counted in deepspeed.comm.
    real_all_reduce, real_all_gather = dist.all_reduce, ds_comm.all_gather_into_tensor

    def all_reduce(tensor, *a, group=None, **k):
        if on_tp(group):
            seen.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return real_all_reduce(tensor, *a, group=group, **k)

    def all_gather_into_tensor(output, input, *a, group=None, **k):
        if on_tp(group):
            seen.append(("all_gather", output.numel() * output.element_size()))
        return real_all_gather(output, input, *a, group=group, **k)

    mb = next(rt.loader.stream())[1]
    batch = mb.inputs
    dist.all_reduce, ds_comm.all_gather_into_tensor = all_reduce, all_gather_into_tensor
    out_ = rt.model(**batch, use_cache=False)
    rt.model.backward(out_.loss)
    dist.all_reduce, ds_comm.all_gather_into_tensor = real_all_reduce, real_all_gather
    conf = rt.model.module.config
    element = torch.finfo(torch.float32).bits // 8  # fp32 on CPU
    want = tp_traffic(
        mb["input_ids"].numel(),
        conf.hidden_size,
        conf.vocab_size,
        conf.num_hidden_layers,
        element,
        vocab_parallel=vocabulary_split(rt.cfg)[0],
        tied=conf.tie_word_embeddings,
    )
    if dist.get_rank() == 0:
        report = {"seen": seen, "predicted": want.__dict__, "tokens": mb["input_ids"].numel()}
        with open(out, "w") as f:
            json.dump(report, f)
    rt.accelerator.end_training()


if __name__ == "__main__":
    main()
