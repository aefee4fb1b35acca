"""Train without Ray (single-node debugging):

accelerate launch --use_deepspeed --num_processes 4 scripts/train.py --config accelerate_configs/tp2_dp2.yaml
"""

import sys

from accel_tp.cli import main_local

if __name__ == "__main__":
    sys.exit(main_local())
