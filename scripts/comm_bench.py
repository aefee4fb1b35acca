"""Tensor-parallel traffic per micro-batch (counted from AutoTP's layers) and the bus bandwidth of
all-reduce / all-gather within the TP groups, measured on --nproc processes (NCCL on GPUs, gloo on CPU).

python scripts/comm_bench.py --config accelerate_configs/tp2_dp2.yaml --nproc 4 --json comm.json
"""

import sys

from accel_tp.tools.commbench import main

if __name__ == "__main__":
    sys.exit(main())
