"""The sparse autoencoder of Cunningham et al. (2024): a ReLU encoder and a linear decoder.

codes = relu((x - b_dec) @ W_enc + b_enc)    (without `- b_dec` when cfg.apply_b_dec_to_input is off)
reconstruction = codes @ W_dec + b_dec
Training loss (normalised space): mean_batch ||x_hat - x||^2 / d_in + alpha * mean_batch ||codes||_1,
alpha = cfg.l1_coefficient ramped up over the L1 warm-up. SAELens calls this architecture "standard".
"""

from __future__ import annotations

from typing import Any

import torch

from sae.dictionary import SparseAutoencoder, TrainingLoss, TrainingState, affine, random_unit_rows

__all__ = ["ReluSAE", "affine", "random_unit_rows"]


class ReluSAE(SparseAutoencoder):
    """ReLU sparse autoencoder, tied or untied; baselines (PCA, ICA, ...) reuse it with fixed weights."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def column_activation(self, pre: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        codes = self.activation(self.pre_activations(x))
        residual, mse = self.reconstruction_terms(x, codes)
        l1 = codes.sum(dim=-1).mean()  # codes are nonnegative
        loss = mse + (self.cfg.l1_coefficient * state.sparsity_ramp) * l1
        return TrainingLoss(loss, mse, codes, residual, l1)

    def saelens_cfg(self) -> dict[str, Any]:
        return {**super().saelens_cfg(), "activation_fn_str": "relu", "activation_fn_kwargs": {}}
