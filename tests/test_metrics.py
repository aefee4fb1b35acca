"""Metrics helpers: FLOP formula, tracker config flattening, the loss plot."""

from __future__ import annotations

import json

from accel_tp.config import config_from_dict
from accel_tp.metrics import flat_config as _flat_config
from accel_tp.metrics import flops_per_token, plot_losses
from accel_tp.model import architecture_config
from accel_tp.run_folder import METRICS_FILE, PLOT_FILE


def test_flops_per_token_formula():
    conf = architecture_config("qwen2.5-0.5b", 151936)
    n = 494_032_768  # Qwen2.5-0.5B parameter count (tied embeddings)
    got = flops_per_token(conf, n, 2048)
    assert got == 6 * n + 12 * 24 * 896 * 2048


def test_flat_config_is_scalar_and_complete():
    cfg = config_from_dict({"model": {"architecture": "tiny", "tokenizer": "default"}, "data": {"files": []}})
    flat = _flat_config(cfg)
    assert flat["model.architecture"] == "tiny" and flat["train.learning_rate"] == cfg.train.learning_rate
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert len(flat) == sum(len(v) for v in cfg.to_dict().values())


def test_plot_losses_writes_png(tmp_path):
    path = tmp_path / METRICS_FILE
    rows = [{"step": s, "loss": 9 - s / 10, "tokens_seen": 100 * s} for s in range(1, 21)]
    rows[-1]["eval_loss"] = 7.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_losses(path, tmp_path / PLOT_FILE)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
