"""The interface every decomposition shares: sparse autoencoders and the baselines alike.

A dictionary maps activations to codes (`encode`) and codes back to activations (`decode`).
Its feature directions are the decoder rows: `decode(c) = c @ feature_directions + bias`.
Experiments (patching, erasure, tracing) only use this interface, so every decomposition
is compared by the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sae.config import DictionaryConfig


class DictionaryOutput(NamedTuple):
    reconstruction: torch.Tensor  # [..., d_in]
    codes: torch.Tensor  # [..., n_features]


class Dictionary(nn.Module):
    """Base class: subclasses implement `encode`, `decode` and `feature_directions`."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_features(self) -> int:
        return self.cfg.d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> codes [..., n_features]."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_features] -> reconstruction [..., d_in]."""
        raise NotImplementedError

    @property
    def feature_directions(self) -> torch.Tensor:
        """[n_features, d_in]: what adding one unit of feature i adds to the reconstruction."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        codes = self.encode(x)
        return DictionaryOutput(self.decode(codes), codes)

    def check_input_width(self, width: int, where: str = "") -> None:
        """Fail before any compute when activations do not match this dictionary's d_in."""
        if width != self.d_in:
            place = f" at {where}" if where else ""
            raise ValueError(
                f"dictionary for '{self.cfg.hook_name}' expects d_in={self.d_in}, but the activations{place} "
                f"have width {width}; train or load a dictionary for this hook point and model"
            )
