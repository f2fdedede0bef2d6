"""The erasure methods as engine edits at one hook point, and the fits that make them.

Every method is an `Erasure`: a labelled engine edit (circuits.engine) run by `run_with_edits`, so it
acts on every position except the engine's passed-through ones (BOS and massive activations), the
same positions a spliced dictionary leaves alone:

- feature removal (`feature_removal`): a `FeatureAblation` subtracting code_i(x) * direction_i for the
  chosen features; the dictionary's error term and every other feature stay;
- LEACE (`fit_leace`): an `ActivationMap` applying the eraser of the `concept-erasure` package
  (affine, rank 1 for a binary concept) in float64;
- the mean projection (`fit_mean_projection`): an `ActivationMap` removing the component along the
  unit class-mean difference, around the train mean, in float64.

`Erasure.at(positions)` restricts an edit to a batch's positions (tasks.erasure.positions), and `scaled`
applies a fraction of a LEACE or projection edit, x + t (f(x) - x), so those methods have a curve of
removal against damage to compare at equal removal, as the feature methods have over k.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from circuits.engine import ActivationMap, FeatureAblation, HookEdit
from sae.dictionary import Dictionary


@dataclass
class Erasure:
    """One erasure method at one hook point; `edit` None is the clean (unedited) model."""

    hook: str
    method: str = "clean"
    k: int | None = None
    edit: HookEdit | None = None
    features: tuple[int, ...] = ()  # the removed features, for the feature methods
    setting: str = "none"  # the position setting it was fitted and is applied at (tasks.erasure.positions)
    strength: float = 1.0  # the fraction of the edit applied (scaled LEACE / projection); 1 for feature removal

    @property
    def is_identity(self) -> bool:
        return self.edit is None

    @property
    def edits(self) -> dict[str, HookEdit]:
        """The `edits` argument of `circuits.engine.run_with_edits` for this method."""
        return {} if self.edit is None else {self.hook: self.edit}

    def at(self, positions: torch.Tensor | None) -> dict[str, HookEdit]:
        """The engine edits of this method acting only at `positions` [rows, pos] bool (None: everywhere)."""
        if self.edit is None:
            return {}
        edit = copy.copy(self.edit)
        edit.positions = positions
        return {self.hook: edit}

    def __call__(self, x: torch.Tensor, passthrough: torch.Tensor | None = None) -> torch.Tensor:
        """The edit applied to activations x [..., d] taken out of their context (e.g. the final prompt
        positions [n, d]); `passthrough` [...] bool marks the rows the engine leaves alone (None: none)."""
        if self.edit is None:
            return x
        rows = x.reshape(-1, 1, x.shape[-1])  # every row its own position
        editable = torch.ones(rows.shape[:2], dtype=torch.bool, device=x.device)
        if passthrough is not None:
            editable &= ~passthrough.reshape(-1, 1).to(x.device)
        edited = torch.where(editable[..., None], self.edit.edited(rows, editable), rows)
        return edited.reshape(x.shape)

    def __repr__(self) -> str:
        return f"Erasure({self.hook!r}, {self.method!r}, k={self.k}, setting={self.setting!r}, strength={self.strength})"


def feature_removal(hook: str, method: str, dictionary: Dictionary, features: Sequence[int]) -> Erasure:
    """Remove the given features of `dictionary` (indices) entirely: x - sum_i code_i(x) * direction_i."""
    features = [int(index) for index in features]
    weights = torch.zeros(dictionary.n_features)
    weights[features] = 1.0
    return Erasure(hook, method, len(features), FeatureAblation(dictionary, weights), tuple(features))


class LeaceMap:
    """x [..., d] -> the LEACE eraser applied to x in float64 (one copy of the eraser per device)."""

    def __init__(self, eraser):
        self.eraser = eraser
        self.on_device = {eraser.proj_left.device: eraser}

    def eraser_on(self, device: torch.device):
        if device not in self.on_device:
            LeaceEraser = leace_eraser_class()
            bias = None if self.eraser.bias is None else self.eraser.bias.to(device)
            self.on_device[device] = LeaceEraser(self.eraser.proj_left.to(device), self.eraser.proj_right.to(device),
                                                 bias)
        return self.on_device[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.eraser_on(x.device)(x.to(torch.float64)).to(x.dtype)


class MeanDifferenceProjection:
    """x [..., d] -> x - ((x - centre) . v) v with v the unit class-mean difference: the classes' means become equal."""

    def __init__(self, direction: torch.Tensor, centre: torch.Tensor):
        self.direction, self.centre = direction.double(), centre.double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        direction, centre = self.direction.to(x.device), self.centre.to(x.device)
        along = (x64 - centre) @ direction  # [...]
        return (x64 - along[..., None] * direction).to(x.dtype)


def leace_eraser_class():
    """concept_erasure.LeaceEraser, imported without the FutureWarning its package's `torch.jit.script` use raises on
    torch 2.13 (a notice about torch's API, not about our inputs or results)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from concept_erasure import LeaceEraser
    return LeaceEraser


def fit_leace(hook: str, activations: torch.Tensor, labels: torch.Tensor, method: str = "leace") -> Erasure:
    """LEACE fitted on activations [n, d] with binary labels [n] (package defaults: affine, shrinkage)."""
    eraser = leace_eraser_class().fit(activations.detach().cpu().double(), labels.cpu().double()[:, None])
    return Erasure(hook, method, None, ActivationMap(LeaceMap(eraser)))


def class_means(activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over label 1, mean over label 0), each [d], in float64."""
    x = activations.detach().cpu().double()
    return x[labels == 1].mean(0), x[labels == 0].mean(0)


def fit_mean_projection(hook: str, activations: torch.Tensor, labels: torch.Tensor,
                        method: str = "mean_projection") -> Erasure:
    """The projection removing the class-mean difference of activations [n, d], centred on their mean."""
    positive, negative = class_means(activations, labels)
    difference = positive - negative
    if difference.norm() == 0:
        raise ValueError(f"at {hook} the two classes have identical mean activations; nothing to project out")
    projection = MeanDifferenceProjection(difference / difference.norm(), activations.detach().cpu().double().mean(0))
    return Erasure(hook, method, None, ActivationMap(projection))


class Interpolated:
    """x -> x + strength * (f(x) - x): a fraction of the map f (the difference taken in float64)."""

    def __init__(self, fn, strength: float):
        self.fn, self.strength = fn, float(strength)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        return (x64 + self.strength * (self.fn(x).to(torch.float64) - x64)).to(x.dtype)


def scaled(erasure: Erasure, strength: float) -> Erasure:
    """`erasure` (a LEACE or projection edit, an ActivationMap) applied at `strength` in (0, 1]."""
    if not 0 < strength <= 1:
        raise ValueError(f"an edit's strength must be in (0, 1], got {strength}")
    if strength == 1 or erasure.edit is None:
        return erasure
    if not isinstance(erasure.edit, ActivationMap):
        raise ValueError(f"{erasure.method} is not a map of the activation; only LEACE and projections are scaled")
    return replace(erasure, edit=ActivationMap(Interpolated(erasure.edit.fn, strength)), strength=float(strength))
