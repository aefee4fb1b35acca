"""Consolidated Hugging Face export of a TP-sharded, ZeRO-partitioned model.

All ranks take part: `accelerator.get_state_dict` calls DeepSpeed's
`engine._consolidated_16bit_state_dict()`, which all-gathers the AutoTP shards (and ZeRO partitions)
into full tensors; rank 0 then writes safetensors, config and tokenizer with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["export_hf"]


def export_hf(
    accelerator: Any, engine: Any, tokenizer: Any, out_dir: str | Path, probe: dict | None = None
) -> Path:
    """Write the trained model as a plain HF model to `out_dir`; returns the folder.

    With `probe` (a batch), rank 0 also saves that batch and the trained model's logits and loss
    on it as `export_check.pt` beside the export, so the export can be verified against them.
    """
    out = Path(out_dir)
    state_dict = accelerator.get_state_dict(engine)  # collective: every rank must call it
    check = None
    if probe is not None:
        batch = {k: v.to(accelerator.device) for k, v in probe.items() if not k.startswith("_")}
        engine.eval()
        with torch.no_grad():
            res = engine(**batch, use_cache=False)
        engine.train()
        check = {
            "batch": {k: v.cpu() for k, v in batch.items()},
            "logits": res.logits.float().cpu(),
            "loss": float(res.loss),
        }
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(engine)
        out.mkdir(parents=True, exist_ok=True)
        model.config.use_cache = True
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if check is not None:
            torch.save(check, out / "export_check.pt")
    accelerator.wait_for_everyone()
    return out
