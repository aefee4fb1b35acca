"""The single-process reference for the parity test: a plain Hugging Face model, torch AdamW.

It trains on the same global batches as the distributed runs: with the dp-sharded sampler, global
step s covers positions [s*G, (s+1)*G) of the epoch's permutation (G = micro x accum x dp), however
the block is split over DP ranks and micro-batches. So one batch of G sequences per step, the
mean loss over its real tokens, gradient clipping and AdamW with the same schedule.
"""

from __future__ import annotations

import torch

from accel_tp.config import Config
from accel_tp.data import DPShardedSampler, load_or_build_tokenized, make_collate
from accel_tp.model import build_model, load_tokenizer, model_config
from accel_tp.trainer import lr_lambda, param_groups


def reference_losses(cfg: Config, global_batch: int) -> tuple[list[float], float, float]:
    """Training losses per step, then the held-out token-mean loss and token count at the end."""
    tokenizer = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    mconf = model_config(cfg.model, len(tokenizer))
    ds = load_or_build_tokenized(cfg.data, tokenizer, True, lambda: None)
    sampler = DPShardedSampler(len(ds), 0, 1, global_batch, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    order = sampler.epoch_indices(0)
    steps = cfg.train.max_steps
    assert steps is not None and len(order) >= steps * global_batch, "reference stays inside epoch 0"
    collate = make_collate(tokenizer.pad_token_id, cfg.data.padding, cfg.data.seq_length)
    model = build_model(cfg.model, mconf, cfg.run.seed)
    tr = cfg.train
    opt = torch.optim.AdamW(
        param_groups(model, tr.weight_decay),
        lr=tr.learning_rate,
        betas=(tr.adam_beta1, tr.adam_beta2),
        eps=tr.adam_eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    model.train()
    losses = []
    for s in range(steps):
        batch = collate([ds[i] for i in order[s * global_batch : (s + 1) * global_batch]])
        batch = {k: v for k, v in batch.items() if not k.startswith("_")}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    eval_ds = load_or_build_tokenized(cfg.data, tokenizer, True, lambda: None, "eval")
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(eval_ds), 16):
            batch = collate([eval_ds[j] for j in range(i, min(i + 16, len(eval_ds)))])
            batch = {k: v for k, v in batch.items() if not k.startswith("_")}
            n = float((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch, use_cache=False).loss.item() * n
            count += n
    return losses, total / count, count
