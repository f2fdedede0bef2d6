"""Shuffled training batches of activations, deterministic given a seed.

Batch number `i` is the same tensor whether training started at 0 or resumed at `i`: that is what
makes resume after a kill exact. A `BatchSource` is anything with `hooks`, `d_in(hook)`,
`n_tokens` and `batches(...)`; the on-disk `ActivationStore` and the in-memory
`TensorBatchSource` below both are.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from sae.distributed import share_rows


class BatchSource(Protocol):
    hooks: list[str]

    @property
    def n_tokens(self) -> int: ...

    def d_in(self, hook: str) -> int: ...

    def batches(
        self, hooks: list[str], batch_size: int, seed: int, start_batch: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Endless fp32 batches {hook: [batch_size, d_in]}, epoch after epoch, reshuffled per epoch.

        part=(rank, world_size): this process's share of each batch, rows [rank B/W, (rank+1) B/W) of it
        (sae.distributed.share_rows), for data-parallel training."""
        ...


def epoch_permutation(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of one epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_items, generator=generator)


class TensorBatchSource:
    """Activations held in memory, {hook: [n_tokens, d_in]}: for tests and small experiments."""

    def __init__(self, activations: dict[str, torch.Tensor]):
        sizes = {tensor.shape[0] for tensor in activations.values()}
        if len(sizes) != 1:
            raise ValueError(f"all hooks need the same number of tokens, got {sizes}")
        self.activations = activations
        self.hooks = list(activations)

    @property
    def n_tokens(self) -> int:
        return next(iter(self.activations.values())).shape[0]

    def d_in(self, hook: str) -> int:
        return self.activations[hook].shape[1]

    def batches(
        self, hooks: list[str], batch_size: int, seed: int, start_batch: int = 0, part: tuple[int, int] = (0, 1)
    ) -> Iterator[dict[str, torch.Tensor]]:
        share = share_rows(batch_size, part)
        per_epoch = self.n_tokens // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch size {batch_size} is larger than the {self.n_tokens} tokens available")
        batch = start_batch
        while True:
            epoch, within = divmod(batch, per_epoch)
            order = epoch_permutation(self.n_tokens, seed, epoch)
            for position in range(within, per_epoch):
                rows = order[position * batch_size : (position + 1) * batch_size][share]
                yield {hook: self.activations[hook][rows].float() for hook in hooks}
                batch += 1
