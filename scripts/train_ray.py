"""Train on a Ray cluster: python scripts/train_ray.py --config accelerate_configs/tp2_dp2.yaml"""

import sys

from accel_tp.cli import main_ray

if __name__ == "__main__":
    sys.exit(main_ray())
