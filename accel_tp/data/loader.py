"""The dp-rank-sharded loader: sampler, collate (micro-batches and their token counts) and the
endless stream the training loop reads.

Under tensor parallelism every rank of a TP group must see the same batch, so the loader shards
by dp_rank / dp_size (not by world rank): TP peers get identical batches, DP groups get disjoint
slices, and the shuffle is a deterministic function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import ConfigError, DataSection
from ..parallel import Topology
from .packing import LABELS

__all__ = ["Batch", "DPShardedSampler", "ShardedLoader", "make_collate", "prepare_dataloader", "eval_batches"]


@dataclass
class Batch:
    """One micro-batch: what goes to the model, and the counts the step needs without a pass over it.

    `label_tokens`: tokens with a label (the loss's denominator); `real_tokens`: non-padding
    tokens; `attn_context`: the sum over real tokens of the length each one attends over, for the
    FLOP count (its own document's length under `document` packing, seq_length otherwise). The
    counts are 0-d CPU tensors and stay there (read with float(), no device sync).
    """

    inputs: dict[str, torch.Tensor]
    label_tokens: torch.Tensor
    real_tokens: torch.Tensor
    attn_context: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        """A model input by name (`batch["input_ids"]`)."""
        return self.inputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    def __iter__(self) -> Iterator[str]:
        """The model inputs' names."""
        return iter(self.inputs)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The model inputs on `device` (the counts stay on the host)."""
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()}
        return Batch(moved, self.label_tokens, self.real_tokens, self.attn_context)

    def first(self, n: int) -> dict[str, torch.Tensor]:
        """The model inputs of the first `n` rows (e.g. the export's probe)."""
        return {k: v[:n] for k, v in self.inputs.items()}

    def pin_memory(self) -> Batch:
        """Page-locked inputs (DataLoader's pin_memory calls this on a custom batch type)."""
        pinned = {k: v.pin_memory() for k, v in self.inputs.items()}
        return Batch(pinned, self.label_tokens, self.real_tokens, self.attn_context)


class DPShardedSampler(Sampler[int]):
    """Indices for one DP rank; resumable at any micro-batch.

    Each epoch permutes all samples with a generator seeded by (seed, epoch), trims the tail that
    cannot fill a whole global batch (micro_batch_size x grad_accum x dp_size samples), and deals
    sample j of the permutation to DP rank j % dp_size. TP peers share dp_rank, hence identical
    indices. Global step s of an epoch then covers positions [s*G, (s+1)*G) of the permutation
    however G is split into micro-batches, accumulation and DP ranks, so the data position is
    a number of samples and a resume may split the same global batch differently.
    """

    def __init__(
        self,
        num_samples: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        grad_accum_steps: int = 1,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside dp_size {dp_size}")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * grad_accum_steps * dp_size
        self.steps_per_epoch = num_samples // self.global_batch
        self.batches_per_epoch = self.steps_per_epoch * grad_accum_steps
        self.epoch = 0
        self.start_batch = 0
        self.endless = False

    def set_epoch(self, epoch: int, start_batch: int = 0, endless: bool = False) -> None:
        """Start at micro-batch `start_batch` of `epoch`; `endless` runs on into the next epochs."""
        self.epoch = epoch
        self.start_batch = start_batch
        self.endless = endless

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        used = self.steps_per_epoch * self.global_batch
        return order[:used][self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self.start_batch * self.micro_batch_size
        while True:
            yield from self.epoch_indices(epoch)[skip:]
            if not self.endless:
                return
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless DPShardedSampler has no length")
        return (self.batches_per_epoch - self.start_batch) * self.micro_batch_size


def make_collate(
    pad_id: int, padding: str, seq_length: int, packing: str = "none"
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Right-pad a micro-batch; labels are -100 on padding so it carries no loss.

    Rows with their own `labels` (chat) keep them: -100 outside what carries the loss.

    Packed rows are padded to seq_length. In `document` mode the rows carry position_ids that
    restart at every document (Transformers then masks attention per document) instead of an
    attention mask, and the first token of each document gets no label: in a row it would be
    predicted from the previous document, which one-document-at-a-time training never does.
    The counts a `Batch` carries beside the model inputs are counted here, so the training step
    needs no pass over the batch.
    """

    def collate(rows: list[dict]) -> Batch:
        longest = max(len(r["input_ids"]) for r in rows)
        fixed = padding == "max_length" or packing != "none"
        width = seq_length if fixed else min(seq_length, -(-longest // 8) * 8)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        own = LABELS in rows[0]
        labels = torch.full((len(rows), width), -100, dtype=torch.long) if own else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            if labels is not None:
                labels[i, :n] = torch.tensor(r[LABELS], dtype=torch.long)
        if labels is None:
            labels = ids.masked_fill(mask == 0, -100)
        out = {"input_ids": ids, "labels": labels}
        real = mask.sum()
        context = torch.tensor(float(real) * seq_length, dtype=torch.float64)
        if packing == "document":
            # Padding forms one more "document" (positions from 0), so it never joins a real one.
            pos = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["position_ids"])
                pos[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
                pos[i, n:] = torch.arange(width - n)
            out["labels"] = labels.masked_fill(pos == 0, -100)
            out["position_ids"] = pos
            # A document of n tokens costs n x n in attention: sum n^2 over the real documents
            # (a document is a run of positions from 0; count each run's real tokens).
            doc = torch.cumsum(pos == 0, dim=1) + torch.arange(len(rows))[:, None] * (width + 1)
            ctx = float((torch.bincount(doc[mask.bool()]).double() ** 2).sum())
            context = torch.tensor(float(ctx), dtype=torch.float64)
        else:
            out["attention_mask"] = mask
        # Each position predicts the next token: the first label of a row is never a target.
        return Batch(
            out, label_tokens=(out["labels"][:, 1:] != -100).sum(), real_tokens=real, attn_context=context
        )

    return collate


class ShardedLoader:
    """A DataLoader over one DP shard, read as an endless stream of micro-batches across epochs."""

    def __init__(self, loader: DataLoader, sampler: DPShardedSampler) -> None:
        self.loader = loader
        self.sampler = sampler

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batch_at(self, samples: int) -> int:
        """This rank's micro-batch index after `samples` samples (all DP ranks) of the run."""
        per_micro_batch = self.sampler.micro_batch_size * self.sampler.dp_size
        if samples % per_micro_batch:
            raise ValueError(
                f"the data position ({samples} samples) is not a whole number of micro-batches of "
                f"{self.sampler.micro_batch_size} x {self.sampler.dp_size} DP ranks"
            )
        return samples // per_micro_batch

    def stream(self, start_micro_batch: int = 0) -> Iterator[tuple[int, Batch]]:
        """(epoch, batch) pairs from micro-batch number `start_micro_batch` of the whole run on."""
        epoch, offset = divmod(start_micro_batch, self.batches_per_epoch)
        # One endless pass, so DataLoader workers keep building batches ahead across epoch
        # boundaries (a new pass per epoch would start them cold). Every epoch is whole
        # micro-batches, so a batch never straddles two epochs.
        self.sampler.set_epoch(epoch, offset, endless=True)
        for i, batch in enumerate(self.loader, start=start_micro_batch):
            yield i // self.batches_per_epoch, batch


def prepare_dataloader(
    dataset: Any,
    topo: Topology,
    micro_batch_size: int,
    pad_id: int,
    section: DataSection,
    seed: int,
    pin_memory: bool = False,
    grad_accum_steps: int = 1,
) -> ShardedLoader:
    """The dataloader preparer: shards by dp_rank / dp_size instead of process index.

    `pin_memory` (for a CUDA run) page-locks the batches so the trainer's non_blocking
    host-to-device copies are asynchronous."""
    sampler = DPShardedSampler(
        len(dataset),
        topo.dp_rank,
        topo.dp_size,
        micro_batch_size,
        seed=seed,
        shuffle=section.shuffle,
        grad_accum_steps=grad_accum_steps,
    )
    if sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"data: {len(dataset)} sequences cannot fill one global batch of {sampler.global_batch} "
            f"(train.micro_batch_size {micro_batch_size} x grad_accum_steps {grad_accum_steps} x "
            f"{topo.dp_size} DP ranks); add data or lower train.micro_batch_size / grad_accum_steps."
        )
    loader = DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=make_collate(pad_id, section.padding, section.seq_length, section.packing),
        drop_last=True,
        num_workers=section.num_workers,
        # Workers live across epochs (the sampler is still iterated here, so set_epoch holds).
        persistent_workers=section.num_workers > 0,
        pin_memory=pin_memory,
    )
    return ShardedLoader(loader, sampler)


def eval_batches(
    dataset: Any, topo: Topology, micro_batch_size: int, pad_id: int, section: DataSection
) -> list[Batch]:
    """This DP rank's share of the held-out rows (every row once across DP ranks; TP peers alike)."""
    collate = make_collate(pad_id, section.padding, section.seq_length, section.packing)
    mine = list(range(topo.dp_rank, len(dataset), topo.dp_size))
    return [
        collate([dataset[i] for i in mine[j : j + micro_batch_size]])
        for j in range(0, len(mine), micro_batch_size)
    ]
