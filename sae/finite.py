"""Watching for NaN and infinity: a non-finite activation, loss or weight stops a run with an error naming
where it appeared (the step, the hook, the shard), instead of being trained on or saved."""

from __future__ import annotations

import math

import torch


class NonFiniteError(ValueError):
    """A NaN or infinite value where a finite one is needed; the message names where it appeared."""


def nonfinite_rows(x: torch.Tensor) -> int:
    """How many rows of x [..., d] hold a NaN or an infinity."""
    if x.numel() == 0:
        return 0
    return int((~torch.isfinite(x)).reshape(-1, x.shape[-1]).any(dim=-1).sum().item())


def check_finite_rows(x: torch.Tensor, where: str, rows_are: str = "activation rows") -> None:
    """Raise NonFiniteError if any row of x [..., d] holds a NaN or an infinity; `where` names it."""
    bad = nonfinite_rows(x)
    if bad:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        raise NonFiniteError(f"{where}: {bad} of {rows} {rows_are} hold NaN or infinite values")


def check_finite_number(name: str, value, *, minimum: float | None = None) -> None:
    """Raise ValueError unless `value` is a finite number (and at least `minimum`, when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
