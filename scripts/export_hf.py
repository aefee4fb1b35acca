"""Export a checkpoint as a consolidated Hugging Face model (safetensors, config.json, tokenizer):

python scripts/export_hf.py --checkpoint outputs/<run>/checkpoints/step_00000500 --out hf-model [--config run.yaml]
"""

import sys

from accel_tp.cli import main_export as main

if __name__ == "__main__":
    sys.exit(main())
