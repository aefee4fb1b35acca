"""What the loop reports: FLOPs per token, peak FLOPs, MFU, the metrics file, the plot, the summary.

Used by the trainer and by the benchmark (accel_tp/tools/bench.py) alike, so both count the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "flops_per_token",
    "peak_bf16_flops",
    "mfu",
    "flat_config",
    "plot_losses",
    "summary_line",
    "FLOPS_FORMULA",
]

FLOPS_FORMULA = (
    "6 * params + 12 * layers * hidden * context, context = the token-weighted mean length a token "
    "attends over: its document's length with packing 'document', seq_length with 'none' / 'concat'"
)


def flops_per_token(mconf: Any, n_params: int, context: float, n_trained: int | None = None) -> float:
    """Training FLOPs per token: 6 x parameters (forward + backward matmuls, embeddings included,
    the usual convention) + 12 x layers x hidden x context for attention scores and values, where
    `context` is the mean number of positions a token attends over.

    With document packing a token attends only within its document (flex / varlen attention skip
    the blocks between documents), so context is the token-weighted mean document length
    (sum of n^2 over documents / tokens); with 'none' and 'concat' the full row, seq_length.
    Counting seq_length for packed short documents overstated MFU by ~15 % (0.5B shape).

    `n_trained` (LoRA: the adapters) of the parameters train; the frozen rest cost 4 FLOPs per
    token each (forward and the input gradient, no weight gradient), the trained ones 6."""
    trained = n_params if n_trained is None else n_trained
    dense = 4.0 * (n_params - trained) + 6.0 * trained
    return dense + 12.0 * mconf.num_hidden_layers * mconf.hidden_size * context


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name substring.
_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_bf16_flops(device_name: str | None = None) -> float | None:
    """The dense bf16 peak of this process's CUDA device (or of `device_name`); None if unknown."""
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAKS if key in device_name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int) -> float:
    """Model FLOPs utilisation: useful FLOP/s over the devices' combined peak."""
    return tokens_per_s * flops_per_token / (peak_flops * devices)


def flat_config(cfg: Any) -> dict[str, Any]:
    """Scalar `section.key` values, as trackers' hyper-parameter tables want them."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: train and eval loss against tokens seen (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens_seen"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["tokens_seen"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("tokens seen (real, all DP ranks)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary_line(
    metrics: dict[str, Any],
    seconds: float,
    tokens: int,
    checkpoint: str | None,
    plot: Path | str | None,
    export: Path | str | None,
) -> str:
    """The one line rank 0 prints at the end of a run."""
    ppl = f"{metrics['eval_ppl']:.2f}" if "eval_ppl" in metrics else "n/a (no eval data)"
    return (
        f"[accel-tp] done: {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s incl. "
        f"eval and saving), final eval ppl {ppl}; checkpoint: {checkpoint or 'none saved'}; "
        f"plot: {plot or 'n/a'}; export: {export or 'none (checkpoint.export_hf: false)'}"
    )
