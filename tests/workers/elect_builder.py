"""torchrun worker: which ranks elect themselves cache builder for a given folder layout.

argv: <out_dir> <mode>; mode "shared": every rank probes one folder; "per-node": ranks 0-1 and
2-3 probe two folders (two nodes with local disks). Each rank writes its answer to out_dir/rank.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from accel_tp.data import elect_cache_builder

out, mode = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
root = out / ("shared" if mode == "shared" else f"node{rank // 2}")
built = elect_cache_builder(root)
(out / f"rank{rank}").write_text(str(int(built)))
dist.destroy_process_group()
