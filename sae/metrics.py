"""Activation-level metrics of a dictionary, in one place: sparsity (L0), reconstruction (FVU, MSE), dead
and dense features, the typical-token rule for massive activations, and `ReconstructionTotals`, the running
totals that training logs, `activation_metrics` and circuits' evaluation all report. Totals are accumulated
over every token given, never averaged batch by batch."""

from __future__ import annotations

from typing import Iterable

import torch

from sae.dictionary import Dictionary
from sae.finite import NonFiniteError


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of nonzero codes per token; codes [..., n_features]."""
    return (codes != 0).sum(dim=-1).float().mean()


OUTLIER_NORM_FACTOR = 10.0


def typical_token_mask(x: torch.Tensor, factor: float = OUTLIER_NORM_FACTOR,
                       reference_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[tokens] bool: tokens whose norm is at most `factor` x the median norm of x [tokens, d] (or the median
    of `reference_norms`, e.g. the norms of a whole batch of which x is one process's share).

    The others are massive activations (attention sinks: norm ~25,000 against ~150 in SmolLM2), a few
    in ten thousand tokens that would otherwise dominate every variance-based metric. A row holding NaN or
    infinity is a NonFiniteError, not an outlier: a NaN median would drop every row."""
    norms = x.norm(dim=-1)
    if not torch.isfinite(norms).all():  # a NaN median would silently mark every token atypical
        bad = int((~torch.isfinite(norms)).sum().item())
        raise NonFiniteError(f"{bad} of {norms.numel()} activation rows hold NaN or infinite values (or overflow "
                             "when squared); check where these activations came from")
    median = (reference_norms if reference_norms is not None else norms).median()
    return norms <= factor * median


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


def fraction_unexplained(residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FVU from the residual x - x_hat: sum |residual|^2 / sum |x - mean(x)|^2 over tokens [..., d]."""
    x = x.reshape(-1, x.shape[-1])
    return residual.reshape(-1, x.shape[-1]).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2 over tokens [..., d]."""
    x = x.reshape(-1, x.shape[-1])
    return fraction_unexplained(x - x_hat.reshape(-1, x.shape[-1]), x)


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


class _Moments:
    """Running float64 sums for the FVU of one token set: squared error, sum of x, sum of |x|^2."""

    def __init__(self) -> None:
        self.tokens, self.squared_error, self.activation_squared = 0, 0.0, 0.0
        self.activation_sum: torch.Tensor | None = None

    def add(self, x64: torch.Tensor, error: torch.Tensor) -> None:
        """x64 [tokens, d] float64; error [tokens] squared reconstruction errors."""
        self.tokens += x64.shape[0]
        self.squared_error += error.sum().item()
        total = x64.sum(dim=0).cpu()
        self.activation_sum = total if self.activation_sum is None else self.activation_sum + total
        self.activation_squared += x64.pow(2).sum().item()

    def unexplained_fraction(self) -> float:
        """Squared error over the summed squared deviation from the mean."""
        if self.tokens == 0:
            return float("nan")
        mean = self.activation_sum / self.tokens
        return self.squared_error / (self.activation_squared - self.tokens * mean.pow(2).sum().item())


class ReconstructionTotals:
    """Exact running totals of a dictionary's reconstruction and sparsity over many batches.

    Massive activations (norm > OUTLIER_NORM_FACTOR x the median of their batch, `typical_token_mask`) would
    dominate every variance-based number, so `fvu`, `mse` and `l0` are over the typical tokens, and
    `fvu_all_tokens` and `outlier_fraction` are reported beside them; dead and dense fractions count
    every token. `update(x, x_hat, codes)` per batch, `summary()` at the end.
    """

    def __init__(self, d_in: int, n_features: int | None = None, dense_threshold: float = 0.1):
        self.d_in = d_in
        self.typical, self.all = _Moments(), _Moments()
        self.active = 0
        self.frequency = FeatureFrequency(n_features, dense_threshold) if n_features else None

    @property
    def n_tokens(self) -> int:
        return self.all.tokens

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        """x, x_hat [..., d_in]; codes [..., n_features], for the same tokens."""
        x64 = x.detach().reshape(-1, x.shape[-1]).double()
        codes = codes.detach().reshape(-1, codes.shape[-1])
        error = (x_hat.detach().reshape(x64.shape).double() - x64).pow(2).sum(dim=-1)  # [tokens]
        typical = typical_token_mask(x64)
        self.all.add(x64, error)
        self.typical.add(x64[typical], error[typical])
        self.active += int((codes[typical] != 0).sum().item())
        if self.frequency is None:
            self.frequency = FeatureFrequency(codes.shape[-1])
        self.frequency.update(codes)

    def summary(self) -> dict[str, float]:
        """l0, fvu, fvu_all_tokens, outlier_fraction, mse, dead_fraction, dense_fraction."""
        if self.all.tokens == 0:
            raise ValueError("no tokens were added to these reconstruction totals; update() them first")
        typical = max(self.typical.tokens, 1)
        return {"l0": self.active / typical, "fvu": self.typical.unexplained_fraction(), "fvu_all_tokens": self.all.unexplained_fraction(),
                "outlier_fraction": 1 - self.typical.tokens / self.all.tokens,
                "mse": self.typical.squared_error / (typical * self.d_in),
                "dead_fraction": self.frequency.dead_fraction, "dense_fraction": self.frequency.dense_fraction}


@torch.no_grad()
def activation_metrics(dictionary: Dictionary, batches: Iterable[torch.Tensor | dict[str, torch.Tensor]],
                       dense_threshold: float = 0.1) -> dict[str, float]:
    """`ReconstructionTotals.summary()` of the dictionary over all tokens of `batches`.

    Each batch is [..., d_in] activations, or a {hook: tensor} dict from which the dictionary's hook is taken.
    """
    totals = ReconstructionTotals(dictionary.d_in, dictionary.n_features, dense_threshold)
    parameter = next(dictionary.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    for batch in batches:
        x = batch[dictionary.cfg.hook_name] if isinstance(batch, dict) else batch
        dictionary.check_input_width(x.shape[-1])
        x = x.reshape(-1, x.shape[-1]).to(device, torch.float32)
        x_hat, codes = dictionary(x)
        totals.update(x, x_hat, codes)
    if totals.n_tokens == 0:
        raise ValueError("activation_metrics got no batches; pass at least one batch of activations")
    return totals.summary()
