"""Held-out evaluation, and when it runs (every `train.eval_every` steps and after the last)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Validator", "all_reduce_floats"]


def all_reduce_floats(values: list[float], device: torch.device) -> list[float]:
    """Sum each value over every rank (float64; unchanged without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Validator:
    """Mean loss over every held-out token, each DP shard once (TP peers count once), and perplexity."""

    def __init__(
        self,
        accelerator: Any,
        model: Any,
        batches: list[Any] | None,
        tp_size: int,
        every: int,
        on_device: Callable[[Any], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.batches = batches
        self.tp_size = tp_size
        self.every = every
        # How a batch reaches the model (trainer.batch_on_device: on the device, a sequence-parallel
        # rank's slice); default: the whole batch moved to the device.
        # The held-out loss is the language-model loss: a mixture of experts' router load-balancing
        # term (output_router_logits) is left out, so eval_ppl is a perplexity.
        config = getattr(getattr(model, "module", model), "config", None)
        self._lm_only = (
            {"output_router_logits": False} if getattr(config, "output_router_logits", False) else {}
        )
        self.on_device = on_device or (lambda mb: contextlib.nullcontext(mb.to(accelerator.device)))

    def should_run(self, step: int, last: bool) -> bool:
        return self.batches is not None and (last or bool(self.every and step % self.every == 0))

    def maybe_run(self, step: int, last: bool) -> dict[str, float]:
        return self.run() if self.should_run(step, last) else {}

    def run(self) -> dict[str, float]:
        acc, model = self.accelerator, self.model
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for mb in self.batches or []:
                if float(mb.label_tokens) == 0:  # the whole batch's count: every SP peer skips it alike
                    continue
                with self.on_device(mb) as part:
                    n = float(part.label_tokens)  # a sequence-parallel slice may hold none
                    items = torch.tensor(max(n, 1.0), device=acc.device)
                    out = model(**part.inputs, num_items_in_batch=items, use_cache=False, **self._lm_only)
                total += float(out.loss) * max(n, 1.0)  # the sum of the token losses
                count += n
        model.train()
        # Both sums count every TP peer: their ratio is unchanged, the token count is divided once.
        total, count = all_reduce_floats([total, count], acc.device)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count / self.tp_size}
