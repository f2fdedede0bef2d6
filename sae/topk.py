"""TopK sparse autoencoder (Gao et al., 2024): the ReLU SAE's weights, but only the k largest
pre-activations of each token survive, so L0 is exactly k (fewer if some of them are negative)."""

from __future__ import annotations

import torch

from sae.config import DictionaryConfig
from sae.relu import ReluSAE


class TopKSAE(ReluSAE):
    def __init__(self, cfg: DictionaryConfig):
        if cfg.k is None or not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"a TopK SAE needs 0 < k <= d_sae={cfg.d_sae}, got k={cfg.k}; set cfg.k")
        super().__init__(cfg)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> the same shape with all but the k largest (ReLU'd) entries zeroed."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
