"""The single-process reference for the parity tests: a plain Hugging Face model, torch AdamW.

It shares no product logic with accel_tp: everything here is written from the definitions in docs/parallelism.md
(and the TrainSection comments in accel_tp/config.py), so a bug in accel-tp's data, model, loss,
schedule or optimizer code shows up as a parity failure instead of being reproduced here. The only
accel_tp imports are the Config type and accel_tp.corpus for *inputs*: the embedded corpus's raw
document strings and the locally trained tokenizer object.

* Documents: the embedded corpus, local .txt (one line per document, as datasets' text builder
  reads them) / .jsonl files, or a hub dataset; the first `percentage` percent of them.
* Held out: `eval_fraction` of the documents through datasets' train_test_split(seed=1234) (the
  documented rule), or the hub's `eval_split`.
* Tokens: tokenizer(text, add_special_tokens=False) + [eos], truncated to seq_length; documents
  with fewer than min_tokens tokens dropped.
* Order: epoch e permutes the n sequences with torch.randperm seeded by seed * 1_000_003 + e and
  trims the tail that cannot fill a whole global batch (G = micro x accum x dp). However the
  product deals those to DP ranks and micro-batches, global step s covers positions [s*G, (s+1)*G)
  of the epochs' trimmed permutations laid end to end, so one batch of G sequences per step here.
* Step: right-padded batch, loss = cross-entropy over every label (shifted, -100 on padding) of
  the global batch divided by their count, computed from the logits; for a mixture of experts whose
  config asks for the router's load-balancing loss (output_router_logits), plus
  router_aux_loss_coef x the mean over the step's micro-batches of each micro-batch's load-balancing
  loss (the model's own, over that micro-batch's real tokens): micro-batches as the product's loader
  deals them (docs/parallelism.md: sample j of a global batch to DP rank j % dp, each rank's samples
  in order, micro_batch_size at a time); clip_grad_norm_'s clipping
  (its pre-clip norm, taken in float64, recorded), AdamW with decay on ndim >= 2 parameters only,
  lr = learning_rate x schedule(step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accel_tp.config import Config

SPLIT_SEED = 1234  # the documented held-out split seed
EPOCH_SEED_MULT = 1_000_003  # the documented epoch generator: seed * 1_000_003 + epoch
# model.architecture "tiny": the documented shape (copied from accel_tp/model.py _SHAPES["tiny"]).
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
EVAL_ROWS = 16  # rows per held-out forward (the token-mean loss does not depend on it)


# ------------------------------------------------------------------------------------------ data


def _first_percent(docs: list[str], percentage: float) -> list[str]:
    return docs if percentage >= 100 else docs[: math.ceil(len(docs) * percentage / 100)]


def _read_files(paths: list[str], text_field: str) -> list[str]:
    docs: list[str] = []
    kinds = {Path(p).suffix.lower() for p in paths}
    assert kinds <= {".txt", ".text"} or kinds == {".jsonl"}, (
        f"reference: data.files must all be .txt or all .jsonl, got {sorted(kinds)}"
    )
    for p in paths:
        path = Path(p).expanduser()
        if path.suffix.lower() == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    docs.append(json.loads(line)[text_field])
        else:
            # One document per line; universal newlines, line breaks dropped, no empty last line.
            with open(path, encoding="utf-8") as f:
                docs.extend(line.rstrip("\n") for line in f.readlines())
    return docs


def _documents(cfg: Config, split: str | None = None) -> list[str]:
    d = cfg.data
    if d.source == "embedded":
        from accel_tp.corpus import load_default_corpus  # input data: the raw document strings

        docs = load_default_corpus()
    elif d.source == "files":
        docs = _read_files(d.files, d.text_field)
    else:
        import datasets

        docs = list(datasets.load_dataset(d.name, d.config_name, split=split or d.split)[d.text_field])
    return _first_percent(docs, d.percentage)


def _split_documents(cfg: Config) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents)."""
    d = cfg.data
    if d.eval_split:
        return _documents(cfg), _documents(cfg, d.eval_split)
    docs = _documents(cfg)
    if not d.eval_fraction:
        return docs, []
    import datasets

    parts = datasets.Dataset.from_dict({"text": docs}).train_test_split(
        test_size=d.eval_fraction, seed=SPLIT_SEED, shuffle=True
    )
    return list(parts["train"]["text"]), list(parts["test"]["text"])


def _tokenize(docs: list[str], tokenizer: Any, seq_length: int, min_tokens: int) -> list[list[int]]:
    out = []
    for text in docs:
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:seq_length]
        if len(ids) >= min_tokens:
            out.append(ids)
    return out


def _order(n: int, cfg: Config, steps: int, global_batch: int) -> list[int]:
    """The sequence indices of the first `steps` global batches: each epoch's permutation trimmed
    to a multiple of the global batch, epochs end to end."""
    per_epoch = n // global_batch * global_batch
    assert per_epoch > 0, f"reference: {n} sequences cannot fill one global batch ({global_batch})"
    order: list[int] = []
    epoch = 0
    while len(order) < steps * global_batch:
        if cfg.data.shuffle:
            g = torch.Generator().manual_seed(cfg.run.seed * EPOCH_SEED_MULT + epoch)
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        order += perm[:per_epoch]
        epoch += 1
    return order


def _batch(rows: list[list[int]], pad_id: int, width: int | None) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask, labels (-100 on padding)."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ----------------------------------------------------------------------------------------- model


def _tokenizer(cfg: Config) -> Any:
    name = cfg.model.tokenizer or cfg.model.name_or_path
    if name == "default":
        # The tokenizer is an input (like a hub tokenizer); its cache folder name carries a corpus
        # hash, so obtain the object from accel_tp.corpus.
        from accel_tp.corpus import build_default_tokenizer

        tok = build_default_tokenizer(cfg.data.resolved_cache_dir() / "tokenizers")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    assert tok.eos_token_id is not None, f"reference: tokenizer {name!r} has no eos token"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _model(cfg: Config, vocab: int) -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    m = cfg.model
    if m.architecture is None:
        # The run's attention kernel (None: transformers' choice for the class, e.g. eager for Gemma-2).
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path,
            dtype=torch.float32,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    else:
        assert m.architecture == "tiny", (
            f"reference: model.architecture {m.architecture!r} not supported (only 'tiny')"
        )
        config = Qwen2Config(**TINY_SHAPE, vocab_size=-(-vocab // 64) * 64, use_cache=False)
        torch.manual_seed(cfg.run.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if cfg.lora.enabled:
        model = _with_adapters(cfg, model)
    return model


def _with_adapters(cfg: Config, model: Any) -> Any:
    """PEFT's get_peft_model with the run's lora section (docs/lora.md): adapters initialised by
    PEFT from torch's generator seeded with run.seed just before; only they (and bias / modules_to_save
    as asked) train. target_modules must be given: the reference does not know the product's defaults."""
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    assert lo.target_modules, "reference: give lora.target_modules explicitly"
    torch.manual_seed(cfg.run.seed)
    config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        modules_to_save=list(lo.modules_to_save) or None,
        bias=lo.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trained_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters under the names PEFT saves them with (adapter_model.safetensors)."""
    return {
        n.replace(".default.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and their count."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((target != -100).sum())


def _moe_step_loss(
    model: Any, step_rows: list[list[int]], dp: int, mb: int, pad_id: int, width: int | None
) -> torch.Tensor:
    """Cross-entropy over every label of the step / their count + coef x the mean over the step's
    micro-batches of the model's load-balancing loss on each (see the module docstring)."""
    per_rank = [step_rows[d::dp] for d in range(dp)]
    micro = [rows[i : i + mb] for rows in per_rank for i in range(0, len(rows), mb)]
    ce, count, balance = 0.0, 0, []
    for rows in micro:
        batch = _batch(rows, pad_id, width)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        target = batch["labels"][:, 1:]
        ce = ce + F.cross_entropy(
            out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        count += int((target != -100).sum())
        balance.append(out.aux_loss)
    return ce / count + model.config.router_aux_loss_coef * torch.stack(balance).mean()


# ------------------------------------------------------------------------------------- schedule


def _lr_factor(cfg: Config, step: int, total: int) -> float:
    tr = cfg.train
    if step < tr.warmup_steps:
        return (step + 1) / tr.warmup_steps
    if tr.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tr.warmup_steps) / max(1, total - tr.warmup_steps))
    if tr.lr_schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        assert tr.lr_schedule == "linear", f"reference: unknown lr_schedule {tr.lr_schedule!r}"
        shape = 1 - progress
    return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * shape


# ------------------------------------------------------------------------------------------- run


def reference_run(cfg: Config, global_batch: int) -> dict[str, Any]:
    """Train in one process on the same global batches as the distributed run, then evaluate.

    Returns "losses" and "grad_norms" (pre-clip global norm) per step, "eval_loss" (mean over every
    held-out label token) and "eval_tokens" (their count; nan / 0 without held-out data)."""
    d, tr = cfg.data, cfg.train
    assert d.packing == "none", f"reference: only data.packing 'none' is implemented, got {d.packing!r}"
    mb, accum = tr.micro_batch_size, tr.grad_accum_steps
    dp = cfg.parallelism.dp_size or global_batch // (mb * accum)
    assert mb * accum * dp == global_batch, (
        f"reference: global batch {global_batch} != micro {mb} x accum {accum} x dp {dp}"
    )
    width = d.seq_length if d.padding == "max_length" else None

    tokenizer = _tokenizer(cfg)
    train_docs, eval_docs = _split_documents(cfg)
    rows = _tokenize(train_docs, tokenizer, d.seq_length, d.min_tokens)
    eval_rows = _tokenize(eval_docs, tokenizer, d.seq_length, d.min_tokens)
    steps = tr.max_steps
    if steps is None:
        steps = max(1, len(rows) // global_batch * tr.epochs)
    order = _order(len(rows), cfg, steps, global_batch)

    model = _model(cfg, len(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": tr.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=tr.learning_rate,
        betas=(tr.adam_beta1, tr.adam_beta2),
        eps=tr.adam_eps,
    )
    clip = cfg.deepspeed.gradient_clipping
    model.train()
    losses: list[float] = []
    grad_norms: list[float] = []
    aux = getattr(model.config, "output_router_logits", False)
    for s in range(steps):
        step_rows = [rows[i] for i in order[s * global_batch : (s + 1) * global_batch]]
        if aux:
            loss = _moe_step_loss(model, step_rows, dp, mb, tokenizer.pad_token_id, width)
        else:
            loss_sum, count = _loss_sum(model, _batch(step_rows, tokenizer.pad_token_id, width))
            loss = loss_sum / count
        loss.backward()
        # torch's clip_grad_norm_ in its two halves, the global norm taken in float64: torch's CPU
        # float32 vector_norm is off by up to ~6e-5 relative on this model's 524k-element lm_head
        # gradient (torch 2.13), DeepSpeed's by ~1e-8. 0 turns clipping off, as in DeepSpeed.
        norm = torch.nn.utils.get_total_norm([p.grad.double() for p in params if p.grad is not None])
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        for group in opt.param_groups:
            group["lr"] = tr.learning_rate * _lr_factor(cfg, s, steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        grad_norms.append(float(norm))

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_rows), EVAL_ROWS):
            part, n = _loss_sum(model, _batch(eval_rows[i : i + EVAL_ROWS], tokenizer.pad_token_id, width))
            total += float(part)
            count += n
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "eval_loss": total / count if count else math.nan,
        "eval_tokens": float(count),
        "trained": trained_tensors(model) if cfg.lora.enabled else {},
    }


def reference_losses(cfg: Config, global_batch: int) -> tuple[list[float], float, float]:
    """Training losses per step, then the held-out token-mean loss and label-token count."""
    r = reference_run(cfg, global_batch)
    return r["losses"], r["eval_loss"], r["eval_tokens"]
