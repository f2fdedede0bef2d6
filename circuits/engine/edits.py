"""Edits at one hook point: what the engine does to an activation [rows, pos, d] during a forward.

Every edit acts only on its editable positions: those its `positions` mask allows (default: all)
minus the engine's passed-through positions at that hook (BOS and massive activations; see
circuits.engine.positions), so no experiment can edit what a spliced dictionary leaves alone.

- `FeatureAblation`: remove features (code_i x decoder row_i) and/or the error term
  (x - reconstruction), per row: the tracing ablations, feature removal in erasure.
- `ActivationMap`: replace x by f(x): a reconstruction (evaluation's spliced run), zeros (zero
  ablation), LEACE or a projection (erasure).
- `ActivationDelta`: add a precomputed change (feature patches from another run, made in code space).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from circuits.engine.positions import encode_codes, passthrough_positions
from sae.dictionary import Dictionary


class HookEdit(ABC):
    """An edit at one hook. `rows`: how many rows it makes (a batch of one shared prefix is expanded)."""

    positions: torch.Tensor | None = None  # [rows, pos] bool: where the edit may act (None: everywhere)
    exclude_bos: bool = True
    pass_massive: bool = True

    @property
    def rows(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    def editable(self, activation: torch.Tensor) -> torch.Tensor:
        """[rows, pos] bool: the positions this edit changes at `activation`."""
        keep = passthrough_positions(activation, exclude_bos=self.exclude_bos, pass_massive=self.pass_massive)
        allowed = ~keep
        if self.positions is not None:
            allowed &= self.positions[:, : activation.shape[1]].to(allowed.device)
        return allowed

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is not None and activation.shape[0] == 1 < rows:  # one shared prefix, one row per edit
            activation = activation.expand(rows, -1, -1)
        editable = self.editable(activation)
        return torch.where(editable[..., None], self.edited(activation, editable), activation)

    @abstractmethod
    def edited(self, activation: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        """The activation as this edit makes it (used at the editable positions only)."""


class FeatureAblation(HookEdit):
    """Remove features (weights: [n_features] for every row or [rows, n_features]; 1 = remove entirely)
    and, for rows where `error` is set, the dictionary's error term."""

    def __init__(self, dictionary: Dictionary, features: torch.Tensor, error: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None):
        self.dictionary, self.features, self.error, self.positions = dictionary, features, error, positions

    @classmethod
    def nothing(cls, dictionary: Dictionary, positions: torch.Tensor) -> "FeatureAblation":
        """Removes nothing yet, for rows whose editable positions are `positions` [rows, pos]; fill in
        `features[row, index] = 1` or `error[row] = True`."""
        rows = positions.shape[0]
        return cls(dictionary, torch.zeros(rows, dictionary.n_features), torch.zeros(rows, dtype=torch.bool),
                   positions)

    def edited(self, activation: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        codes = encode_codes(self.dictionary, activation, ~editable)
        weights = self.features.to(codes)
        removed = (codes * (weights[:, None, :] if weights.ndim == 2 else weights)) @ self.dictionary.feature_directions
        if self.error is not None and bool(self.error.any()):
            error = activation - self.dictionary.decode(codes).to(activation.dtype)
            removed = removed + self.error.to(activation.device)[:, None, None].to(error) * error
        return activation - removed.to(activation.dtype)


class ActivationMap(HookEdit):
    """x -> f(x) at the editable positions; f maps [..., d] to [..., d]."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor | None = None,
                 exclude_bos: bool = True, pass_massive: bool = True):
        self.fn, self.positions, self.exclude_bos, self.pass_massive = fn, positions, exclude_bos, pass_massive

    def edited(self, activation: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        return self.fn(activation).to(activation.dtype)


class ActivationDelta(HookEdit):
    """x -> x + delta, delta [rows, pos, d] computed beforehand (e.g. feature patches in code space)."""

    def __init__(self, delta: torch.Tensor, positions: torch.Tensor | None = None):
        self.delta, self.positions = delta, positions

    @property
    def rows(self) -> int | None:
        return self.delta.shape[0]

    def edited(self, activation: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        return activation + self.delta[:, : activation.shape[1]].to(activation)
