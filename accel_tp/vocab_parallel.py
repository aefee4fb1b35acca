"""Vocabulary-parallel cross-entropy: the causal-LM loss from the final hidden states and this TP
rank's vocabulary slice of the head, so no rank holds the whole vocabulary's logits.

Megatron's `vocab_parallel_cross_entropy` fused with the head's matmul. Each TP rank holds rows
[start, start + V/tp) of the head weight (DeepSpeed's `VocabParallelLinear`, which AutoTP builds for
`tensor_parallel.vocab_parallel_lm_head: true`, tied or not). For each chunk of tokens a rank
computes its [chunk, V/tp] logits; the softmax's max and sum-exp are reduced over the TP group
(all_reduce MAX, then one all_reduce SUM of [sum-exp, target logit]: the target's logit comes from
the rank whose slice holds it, zeros elsewhere), and the chunk's gradients are computed there from
the same logits: the chunk's rows of the input gradient, and the head gradient summed over chunks.
The input gradient is all-reduced over the group once (each rank saw its slice only), as a
column-parallel layer does. A tied, vocab-split embedding shares the head's Parameter, so its
gradient adds to the head's through autograd.

Peak per rank, N tokens, H hidden, Vl = V/tp, C tokens per chunk: one C x Vl fp32 logits buffer
(reused for their gradient, plus its compute-dtype product and copy), the N x H input gradient
and the Vl x H head gradient in fp32, held from the loss's forward to its backward. No [N, Vl]
tensor is ever made (tests/test_vocab_parallel.py counts). Two collectives per chunk, one at the
end; no host syncs.

DeepSpeed 0.19.8 ships a fused loss of the same kind (`deepspeed.sequence.linear_cross_entropy`),
but its public function re-validates the shard layout with an all-gather and checks the targets
with `.item()` on every call, and its backward recomputes the logits with other GEMM shapes than
its forward, so the probabilities it differentiates are rounded differently from the statistics.

Imports nothing of accel-tp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_CHUNK_TOKENS",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_head",
    "vocab_parallel_loss_forward",
]

IGNORE_INDEX = -100  # Hugging Face's label for tokens without a loss
# Tokens per forward chunk: for the Qwen vocabulary at tp 2, 4,096 x 75,968 fp32 logits are 1.2 GB,
# the size of a chunk of Liger's fused loss at tp 1 (parallelize.FUSED_LOSS_CHUNK_MEM).
DEFAULT_CHUNK_TOKENS = 4096


def _stats_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # In the inputs' dtype, as the head's own F.linear computes them, then fp32 for the softmax.
    return torch.nn.functional.linear(hidden, weight, bias).to(_stats_dtype(hidden))


def _fp32_gemm(a: torch.Tensor) -> bool:
    # CUDA has GEMMs that take bf16 / fp16 and write fp32 (torch's mm.dtype); the CPU has none.
    return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`, straight from the GEMM where the device can."""
    if a.dtype == dtype:
        return a @ b
    if _fp32_gemm(a) and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, `acc` fp32 and no temporary of its size (it is the head's size)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_gemm(a) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _parallel(group: Any) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of -log softmax(hidden @ W.T + b)[target], W this rank's vocabulary rows.

    The gradients are computed in the forward, chunk by chunk, from the same logits the softmax
    statistics come from (as Liger's fused loss does): a backward that recomputed them with other
    GEMM shapes would round them differently from the statistics, an error of an ulp of the logits
    in every probability (measured: 6x the plain loss's in fp32). It also saves the recompute's
    GEMM. The backward only scales them by the upstream gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        vocab_start: int,
        group: Any,
        chunk: int,
    ) -> torch.Tensor:
        n, local_vocab = hidden.shape[0], weight.shape[0]
        parallel = _parallel(group)
        stats_dtype = _stats_dtype(hidden)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid = target != IGNORE_INDEX
        local = target - vocab_start
        mine = valid & (local >= 0) & (local < local_vocab)
        local = local.clamp(0, local_vocab - 1)  # a target of another rank reads a column that is zeroed
        # Summed over the TP ranks (hidden) and over the chunks (weight, bias), so in fp32.
        grad_hidden = (
            torch.empty(hidden.shape, dtype=stats_dtype, device=hidden.device) if need_hidden else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=stats_dtype, device=weight.device) if need_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=stats_dtype, device=bias.device) if need_bias else None
        loss = torch.zeros((), dtype=stats_dtype, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = _logits(h, weight, bias)
            m = logits.amax(dim=-1)
            if parallel:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(m.unsqueeze(-1))
            col = local[s:e].unsqueeze(-1)
            t = torch.where(mine[s:e], logits.gather(-1, col).squeeze(-1), 0.0)
            stats = torch.stack([logits.exp_().sum(dim=-1), t])
            if parallel:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            sum_exp, t = stats[0], stats[1]
            # The max and the sum-exp are kept apart: one log-sum-exp would round the normaliser
            # away when the logits share a large offset.
            ok = valid[s:e]
            loss += torch.where(ok, sum_exp.log() - t, 0.0).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = softmax - one-hot, zero for unlabelled tokens (in place: one buffer).
            grad_logits = logits.mul_(torch.where(ok, 1.0 / sum_exp, 0.0).unsqueeze(-1))
            grad_logits.scatter_add_(-1, col, -mine[s:e].to(stats_dtype).unsqueeze(-1))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            g = grad_logits.to(hidden.dtype)
            del logits, grad_logits
            if grad_hidden is not None:
                grad_hidden[s:e] = _mm(g, weight, stats_dtype)
            if grad_weight is not None:
                _addmm_(grad_weight, g.t(), h)
        if grad_hidden is not None and parallel:  # each rank saw its vocabulary slice only
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("the vocabulary-parallel loss supports one backward per forward")
        # Scaled in place (no second fp32 buffer of the head's size), so only once.
        grads = [None if g is None else g.mul_(grad_loss).to(d) for g, d in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None, None)


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int = 0,
    group: Any = None,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    shift: bool = True,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss over a vocabulary-split head, identical on every rank of `group`.

    `hidden` [..., H] the final hidden states (the same on every TP rank), `weight` [V/tp, H] (and
    `bias`) this rank's rows of the head, starting at global row `vocab_start`; `labels` [...] global
    token ids, IGNORE_INDEX for none. With `shift` the labels are shifted by one (position i predicts
    labels[i + 1]). The sum of token losses divided by `num_items_in_batch` when given, else the mean
    over the labelled tokens. `chunk_tokens` None: all tokens in one chunk.
    """
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if shift:
        labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    target = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.shape[0] != target.shape[0]:
        raise ValueError(f"{flat.shape[0]} hidden rows but {target.shape[0]} labels")
    chunk = max(1, flat.shape[0] if chunk_tokens is None else chunk_tokens)
    loss = _VocabParallelLinearCrossEntropy.apply(flat, weight, bias, target, vocab_start, group, chunk)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss / (target != IGNORE_INDEX).sum().clamp_min(1)


def vocab_parallel_head(model: Any) -> Any | None:
    """The model's output head if AutoTP split it by vocabulary (DeepSpeed's VocabParallelLinear
    without a gather), else None (a whole or gathered head: the model's own loss is right)."""
    from deepspeed.module_inject.layers import VocabParallelLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, VocabParallelLinear) and getattr(head, "is_tp_parallel", True) else None


def vocab_parallel_loss_forward(
    model: Any, head: Any, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS
) -> Any:
    """A forward for `model` (its head `head` a VocabParallelLinear) that, in training with labels,
    returns only the loss, by `vocab_parallel_cross_entropy` from the final hidden states (Hugging
    Face's semantics, as parallelize's fused-loss forward). In eval mode or without labels the
    model's own forward runs (its logits are this rank's vocabulary slice; DeepSpeed's installed
    loss_function reduces them across the group). Under ZeRO-3 reading `head.weight` inside the
    model's forward registers it as the model's external parameter, so DeepSpeed gathers it
    (parameter_offload.ZeROOrderedDict; tests/test_vocab_parallel.py trains that way)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    full_forward = model.forward
    base = getattr(model, model.base_model_prefix)
    start = int(head.vocab_start_index)

    def forward(
        input_ids: Any = None, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any
    ) -> Any:
        if labels is None or not model.training:
            return full_forward(
                input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs.pop("logits_to_keep", None)  # the loss needs every position
        shift_labels = kwargs.pop("shift_labels", None)  # already shifted (sequence parallelism)
        hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
        loss = vocab_parallel_cross_entropy(
            hidden,
            head.weight,
            labels if shift_labels is None else shift_labels,
            shift=shift_labels is None,
            vocab_start=start,
            group=head.mp_group,
            bias=head.bias,
            num_items_in_batch=num_items_in_batch,
            chunk_tokens=chunk_tokens,
        )
        return CausalLMOutputWithPast(loss=loss)

    return forward
