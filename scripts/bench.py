"""Reference loop (the tutorial's way) vs accel-tp's full stack, side by side on one GPU.

python scripts/bench.py --config accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml \
    --shapes tiny,qwen2.5-0.5b,qwen2.5-1.5b --seq 512,2048 --tutorial --json bench.json

Prints a table and JSON: real tokens/s, MFU, step time, peak memory and the ratios. See
docs/performance.md for the numbers and what each setting gave.
"""

import sys

from accel_tp.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
