"""What the training loop does differently when a batch is shared among ranks (sae/distributed.py).

Each function is the single-process computation in a world of one, and in a data-parallel run the same
quantity of the whole (global) batch: the typical-token rule's median, the count of rows, which features
fired, the logged statistics and the residuals resampling draws from. Rank r's rows are the r-th
contiguous share of the global batch, so gathering in rank order gives back the batch itself.
"""

from __future__ import annotations

import dataclasses

import torch

from sae.dictionary import TrainingLoss
from sae.distributed import Distributed
from sae.metrics import typical_token_mask


def typical_rows(x: torch.Tensor, distributed: Distributed) -> torch.Tensor:
    """[rows] bool: the typical tokens of this share, judged against the median norm of the whole batch."""
    if not distributed.active:
        return typical_token_mask(x)
    return typical_token_mask(x, reference_norms=distributed.gather_rows(x.norm(dim=-1)))


def whole_batch(raw: dict[str, torch.Tensor], distributed: Distributed) -> dict[str, torch.Tensor]:
    """{hook: the global batch}, gathered from every rank's share (batch 0 sets the scale and b_dec from it)."""
    return {hook: distributed.gather_rows(tensor) for hook, tensor in raw.items()}


@torch.no_grad()
def fired_features(codes: torch.Tensor, distributed: Distributed) -> torch.Tensor:
    """[d_sae] bool: features that fired on some token of the whole batch."""
    fired = (codes != 0).any(dim=0)
    if not distributed.active:
        return fired
    return distributed.max_(fired.to(torch.int32)).bool()


@torch.no_grad()
def mean_over_batch(per_token_mean: torch.Tensor, share: float, distributed: Distributed) -> torch.Tensor:
    """A mean over this share's rows turned into the mean over the whole batch (weighted by the shares)."""
    if not distributed.active:
        return per_token_mean
    return distributed.sum_(per_token_mean.detach().double().reshape(1) * share)[0].to(per_token_mean.dtype)


@torch.no_grad()
def global_output(x: torch.Tensor, out: TrainingLoss, share: float, distributed: Distributed
                  ) -> tuple[torch.Tensor, TrainingLoss]:
    """(the whole batch's training rows, the step's output over the whole batch) for a log row.

    Only on log steps: codes [batch, d_sae] are gathered. The local loss holds AuxK divided by the share
    (sae/topk.py), so the share-weighted sum is the whole batch's loss."""
    if not distributed.active:
        return x, out
    l1 = out.l1 if out.l1 is not None else out.codes.sum(dim=-1).mean()
    return distributed.gather_rows(x), dataclasses.replace(
        out, loss=mean_over_batch(out.loss, share, distributed), mse=mean_over_batch(out.mse, share, distributed),
        l1=mean_over_batch(l1, share, distributed), codes=distributed.gather_rows(out.codes),
        residual=distributed.gather_rows(out.residual))
