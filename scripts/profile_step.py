"""Trace accel-tp's training step on one GPU and report what keeps the GPU idle.

python scripts/profile_step.py --config accelerate_configs/qwen2.5-0.5b_tp1_gpu.yaml --trace step.json

Prints the top operators by GPU time, the GPU's busy fraction and its idle gaps by the host code
that was running; the chrome trace opens in Perfetto. See docs/performance.md.
"""

import sys

from accel_tp.tools.profile import main

if __name__ == "__main__":
    sys.exit(main())
