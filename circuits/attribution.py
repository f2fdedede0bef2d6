"""The one attribution function: activation x gradient, optionally integrated over several points.

Every experiment estimates a feature's effect the same way. With x = decode(codes) + error at a hook
and g = d metric / d x, moving the codes by delta changes the metric by about

    effect_i = sum over positions of delta_i * (direction_i . g)        (direction_i: decoder row i)

and moving the error term by delta_error changes it by sum over positions of delta_error . g. IOI
patching passes delta = counterfactual codes - clean codes; tracing and erasure pass the codes
themselves (the drop when a feature is removed). With several gradients (integrated gradients: g
taken with the edit already made a fraction t of the way, for each t in `points`), the estimate
uses their mean, which approximates each feature's share of the whole edit rather than its effect
alone. The gradients come from the engine (`circuits.engine.run_with_edits(..., leaves=...)` or a
replay from the hook); this function only combines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SPARSE_FRACTION = 1 / 8  # below this share of nonzero deltas, a dot product per nonzero entry is cheaper


@dataclass
class Attribution:
    """Estimated metric change per feature ([n_features], or [rows, n_features] per row) and for the error."""

    features: torch.Tensor
    error: float
    metric_value: float = float("nan")  # the metric on the run the gradient was taken at, when known


def attribution_scores(grads: torch.Tensor | Sequence[torch.Tensor], delta_codes: torch.Tensor,
                       directions: torch.Tensor, delta_error: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, per_row: bool = False) -> Attribution:
    """effect_i = sum_pos delta_codes[..., pos, i] * (directions[i] . mean_t grads_t[..., pos, :]).

    grads: [rows, pos, d] (or a list of them, one per integration point: averaged); delta_codes:
    [rows, pos, n_features]; directions: [n_features, d]; delta_error: [rows, pos, d] or None;
    mask: [rows, pos] bool, the positions that count (None: all). Returns per-feature effects summed
    over rows (float64 sums), or [rows, n_features] with `per_row`.
    """
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    if not grads:
        raise ValueError("attribution_scores needs at least one gradient")
    if delta_codes.ndim != 3 or grads[0].shape[:2] != delta_codes.shape[:2]:
        raise ValueError(f"delta_codes [rows, pos, F] {tuple(delta_codes.shape)} must match the gradients' "
                         f"[rows, pos] {tuple(grads[0].shape[:2])}")
    if mask is not None:
        delta_codes = delta_codes * mask[..., None].to(delta_codes)
    features = torch.zeros(delta_codes.shape[0], delta_codes.shape[-1], dtype=torch.float64,
                           device=delta_codes.device)
    error = 0.0
    for grad in grads:
        grad = grad.to(delta_codes.dtype)
        if mask is not None:
            grad = grad * mask[..., None].to(grad)
        features += _feature_effects(grad, delta_codes, directions.to(grad)).double() / len(grads)
        if delta_error is not None:
            error += (delta_error.to(grad) * grad).sum().item() / len(grads)
    return Attribution(features.cpu() if per_row else features.sum(0).cpu(), error)


def _feature_effects(grad: torch.Tensor, delta: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[rows, n_features]: sum over positions of delta * (grad @ directions.T)."""
    nonzero = torch.nonzero(delta)  # [active, 3]: row, position, feature
    if len(nonzero) < SPARSE_FRACTION * delta.numel():
        effects = torch.zeros(delta.shape[0], delta.shape[-1], dtype=delta.dtype, device=delta.device)
        for chunk in nonzero.split(16384):
            row, position, feature = chunk.unbind(dim=1)
            dots = (grad[row, position] * directions[feature]).sum(dim=-1)
            effects.index_put_((row, feature), delta[row, position, feature] * dots, accumulate=True)
        return effects
    return (delta * (grad @ directions.T)).sum(dim=1)
