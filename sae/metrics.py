"""Activation-level metrics of a dictionary: sparsity (L0), reconstruction (FVU, MSE), dead and
dense features. Totals are accumulated over every token given, never averaged batch by batch."""

from __future__ import annotations

from typing import Iterable

import torch

from sae.dictionary import Dictionary


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of nonzero codes per token; codes [..., n_features]."""
    return (codes != 0).sum(dim=-1).float().mean()


OUTLIER_NORM_FACTOR = 10.0


def typical_token_mask(x: torch.Tensor, factor: float = OUTLIER_NORM_FACTOR) -> torch.Tensor:
    """[tokens] bool: tokens whose norm is at most `factor` x the median norm of x [tokens, d].

    The others are massive activations (attention sinks: norm ~25,000 against ~150 in SmolLM2), a few
    in ten thousand tokens that would otherwise dominate every variance-based metric."""
    norms = x.norm(dim=-1)
    return norms <= factor * norms.median()


def outlier_positions(activation: torch.Tensor, factor: float | None = OUTLIER_NORM_FACTOR,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[n, pos] bool: positions 1.. (within `lengths`, when given) whose norm in `activation`
    [n, pos, d] exceeds `factor` times the median norm of that row's positions 1.. (none if factor is None).

    With the default factor these are the massive activations that `typical_token_mask` leaves out
    (position 0, BOS, is never one: it is handled apart everywhere)."""
    norms = activation.detach().float().norm(dim=-1)  # [n, pos]
    positions = torch.arange(norms.shape[1], device=norms.device)
    real = positions[None, :] >= 1
    if lengths is not None:
        real = real & (positions[None, :] < lengths.to(norms.device)[:, None])
    if factor is None or norms.shape[1] < 2:
        return torch.zeros_like(real)
    masked = norms.masked_fill(~real, float("nan"))
    median = masked.nanmedian(dim=1, keepdim=True).values
    return real & (norms > factor * median)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2 over tokens [..., d]."""
    x = x.reshape(-1, x.shape[-1])
    x_hat = x_hat.reshape(-1, x.shape[-1])
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


class FeatureFrequency:
    """How often each feature fires, accumulated over batches of codes."""

    def __init__(self, n_features: int, dense_threshold: float = 0.1):
        self.counts = torch.zeros(n_features, dtype=torch.int64)
        self.n_tokens = 0
        self.dense_threshold = dense_threshold

    def update(self, codes: torch.Tensor) -> None:
        """codes [..., n_features]."""
        flat = codes.detach().reshape(-1, codes.shape[-1])
        self.counts += (flat != 0).sum(dim=0).cpu()
        self.n_tokens += flat.shape[0]

    @property
    def frequencies(self) -> torch.Tensor:
        """[n_features] fraction of tokens on which each feature fired."""
        return self.counts.double() / max(self.n_tokens, 1)

    @property
    def dead_fraction(self) -> float:
        """Fraction of features that never fired."""
        return (self.counts == 0).double().mean().item()

    @property
    def dense_fraction(self) -> float:
        """Fraction of features firing on more than `dense_threshold` of tokens."""
        return (self.frequencies > self.dense_threshold).double().mean().item()


class _ReconstructionTotals:
    """Exact sums for MSE and FVU over many batches (float64, per-dimension moments)."""

    def __init__(self, d_in: int):
        self.squared_error = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x_squared = torch.zeros(d_in, dtype=torch.float64)
        self.nonzero_codes = 0
        self.n_tokens = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x64 = x.double()
        self.squared_error += (x64 - x_hat.double()).pow(2).sum().item()
        self.sum_x += x64.sum(dim=0).cpu()
        self.sum_x_squared += x64.pow(2).sum(dim=0).cpu()
        self.nonzero_codes += int((codes != 0).sum().item())
        self.n_tokens += x.shape[0]

    def summary(self) -> dict[str, float]:
        n, d_in = self.n_tokens, self.sum_x.shape[0]
        total_variance = (self.sum_x_squared - self.sum_x.pow(2) / n).sum().item()
        return {"l0": self.nonzero_codes / n, "fvu": self.squared_error / total_variance,
                "mse": self.squared_error / (n * d_in)}


@torch.no_grad()
def activation_metrics(dictionary: Dictionary, batches: Iterable[torch.Tensor | dict[str, torch.Tensor]],
                       dense_threshold: float = 0.1) -> dict[str, float]:
    """l0, fvu, mse (per element), dead_fraction and dense_fraction over all tokens of `batches`.

    Each batch is [..., d_in] activations, or a {hook: tensor} dict from which the dictionary's hook is taken.
    """
    totals = _ReconstructionTotals(dictionary.d_in)
    frequency = FeatureFrequency(dictionary.n_features, dense_threshold)
    parameter = next(dictionary.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    for batch in batches:
        x = batch[dictionary.cfg.hook_name] if isinstance(batch, dict) else batch
        dictionary.check_input_width(x.shape[-1])
        x = x.reshape(-1, x.shape[-1]).to(device, torch.float32)
        x_hat, codes = dictionary(x)
        totals.update(x, x_hat, codes)
        frequency.update(codes)
    if totals.n_tokens == 0:
        raise ValueError("activation_metrics got no batches; pass at least one batch of activations")
    return {**totals.summary(), "dead_fraction": frequency.dead_fraction,
            "dense_fraction": frequency.dense_fraction}
