"""Resampling dead features (Bricken et al. 2023): point them at poorly reconstructed inputs."""

from __future__ import annotations

import torch

from sae.dictionary import SparseAutoencoder

RESAMPLED_ENCODER_NORM = 0.2  # a resampled encoder column's norm, relative to the mean alive one


@torch.no_grad()
def resample_dead_features(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead: torch.Tensor,
                           residual: torch.Tensor, generator: torch.Generator) -> int:
    """Point dead features at poorly reconstructed inputs; returns how many were resampled.

    New decoder row = a residual (x - x_hat) drawn with probability proportional to its squared norm,
    normalised; encoder column = that direction at 0.2 x the mean alive encoder norm (tied: the row
    itself); b_enc = 0; their Adam moments are reset. dead [d_sae] bool, residual [batch, d_in].
    """
    indices = dead.nonzero().squeeze(1)
    weights = residual.pow(2).sum(dim=-1).double().cpu()
    if indices.numel() == 0 or weights.sum() <= 0:
        return 0
    rows = torch.multinomial(weights, indices.numel(), replacement=True, generator=generator)
    directions = residual[rows.to(residual.device)]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sae.W_dec[indices] = directions
    if not sae.cfg.tied:
        alive = ~dead
        alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        sae.W_enc[:, indices] = directions.T * (RESAMPLED_ENCODER_NORM * alive_norm)
    sae.b_enc[indices] = 0.0
    reset_adam_moments(sae, optimizer, indices)
    return indices.numel()


def reset_adam_moments(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, indices: torch.Tensor) -> None:
    selectors = {"W_dec": (indices,), "W_enc": (slice(None), indices), "b_enc": (indices,), "threshold": (indices,)}
    for name, parameter in sae.named_parameters():
        state = optimizer.state.get(parameter, {})
        if name in selectors:
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment][selectors[name]] = 0.0


def resampling_generator(seed: int, step: int, sae_index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, step, SAE): resume needs no RNG state."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + sae_index) % (2**63))
