"""torchrun worker: the real dp-sharded loader on N gloo processes; rank 0 checks and writes a report.

TP peers must see identical batches; DP groups must see disjoint samples that cover the epoch.
"""

import json
import sys

import torch.distributed as dist

from accel_tp.config import load_config
from accel_tp.data import load_or_build_tokenized, prepare_dataloader
from accel_tp.model import load_tokenizer
from accel_tp.parallel import Topology


def main() -> None:
    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology.from_config(cfg, world, rank)
    if rank == 0:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    dist.barrier()
    if rank != 0:
        tok = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    ds = load_or_build_tokenized(cfg.data, tok, rank == 0, dist.barrier)
    loader = prepare_dataloader(
        ds, topo, cfg.train.micro_batch_size, tok.pad_token_id, cfg.data, cfg.run.seed
    )
    per_epoch = loader.batches_per_epoch
    mine = {"rank": rank, "tp_rank": topo.tp_rank, "dp_rank": topo.dp_rank, "epochs": []}
    stream = loader.stream(0)
    for epoch in range(2):
        batches, indices = [], loader.sampler.epoch_indices(epoch)
        for _ in range(per_epoch):
            e, b = next(stream)
            assert e == epoch
            batches.append(b["input_ids"].tolist())
        mine["epochs"].append({"batches": batches, "indices": indices})
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {"world": world, "tp": topo.tp_size, "dp": topo.dp_size, "n": len(ds), "ranks": gathered}, f
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
