"""How an SAE starts training: its decoder bias from the first batch, and the norm of its initial rows.

The options are TrainingConfig.b_dec_init and decoder_init_norm; results/saelens/ablation.md measures them.
"""

from __future__ import annotations

import torch

from sae.dictionary import SparseAutoencoder


@torch.no_grad()
def geometric_median(rows: torch.Tensor, iterations: int = 30, tolerance: float = 1e-6) -> torch.Tensor:
    """[d] the point minimising the sum of Euclidean distances to rows [n, d] (Weiszfeld's iterations).

    Less pulled by a few far-out rows than the mean; starts at the mean and stops when it moves less
    than `tolerance` times its norm."""
    rows = rows.double()
    point = rows.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (rows - point).norm(dim=1).clamp_min(1e-12)
        moved = (weights[:, None] * rows).sum(dim=0) / weights.sum()
        done = (moved - point).norm() <= tolerance * point.norm().clamp_min(1e-12)
        point = moved
        if done:
            break
    return point.float()


def initial_decoder_bias(rows: torch.Tensor, how: str) -> torch.Tensor:
    """[d_in] b_dec at step 0 from the (normalised, typical) rows [n, d_in] of batch 0."""
    if how == "mean":
        return rows.mean(dim=0)
    if how == "geometric_median":
        return geometric_median(rows)
    if how == "zero":
        return torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    raise ValueError(f"unknown b_dec_init {how!r}; expected mean, geometric_median or zero")


@torch.no_grad()
def scale_initial_rows_(sae: SparseAutoencoder, norm: float) -> None:
    """Decoder rows (and the encoder, which starts as their transpose) to norm `norm` (Anthropic's April 2024
    update; SAELens' decoder_init_norm 0.1). A tied SAE's encoder is the decoder, so one multiplication does both."""
    sae.W_dec.mul_(norm / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
    if not sae.cfg.tied:
        sae.W_enc.copy_(sae.W_dec.T)
