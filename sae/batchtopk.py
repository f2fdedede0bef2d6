"""BatchTopK sparse autoencoder (Bussmann et al. 2024): TopK over the whole batch, not per token.

Training: the k x batch_size largest ReLU'd pre-activations of the batch survive (so L0 is k on average,
more on dense tokens, fewer on simple ones); loss = mse + aux_k_coefficient * AuxK, as for TopK.
Inference cannot see a batch, so, as in SAELens, a global threshold is estimated while training: an
exponential moving average (rate cfg.extra["topk_threshold_lr"], default 0.01) of the smallest
activation that survived each batch; then codes = relu(pre) * (pre > threshold). That is a JumpReLU with
one threshold for every feature, and that is how it is saved (SAELens' layout: architecture "jumprelu",
a `threshold` tensor), so a saved BatchTopK SAE loads back, here or in SAELens, as a JumpReLU SAE that
encodes identically.
"""

from __future__ import annotations

from typing import Any

import torch

from sae.config import DictionaryConfig
from sae.dictionary import SparseAutoencoder, TrainingLoss, TrainingState
from sae.topk import check_k, with_aux_k


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    """[batch, d_sae] -> the same shape keeping the int(k * batch) largest ReLU'd entries of the batch."""
    flat = torch.relu(pre).flatten()
    top = flat.topk(int(k * pre.shape[0]), sorted=False)
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(pre.shape)


class BatchTopKSAE(SparseAutoencoder):
    sparsity_setting = "k"

    def __init__(self, cfg: DictionaryConfig):
        check_k(cfg, "BatchTopK")
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))  # inference threshold

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold.to(pre.dtype))

    def column_activation(self, pre: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.activation(pre)  # at inference one global threshold: each code depends on its column alone

    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        pre = self.pre_activations(x)
        codes = batch_topk(pre, self.cfg.k)
        residual, mse = self.reconstruction_terms(x, codes)
        self._update_threshold(codes.detach())
        return TrainingLoss(with_aux_k(self, pre, mse, residual, state), mse, codes, residual)

    @torch.no_grad()
    def _update_threshold(self, codes: torch.Tensor) -> None:
        positive = codes[codes > 0]
        if positive.numel():
            rate = float(self.cfg.extra.get("topk_threshold_lr", 0.01))
            self.threshold.copy_((1 - rate) * self.threshold + rate * positive.min().double())

    @classmethod
    def describe(cls, cfg: DictionaryConfig) -> str:
        return f"batchtopk_{cfg.k}"

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        super().fold_input_scale_(scale)
        self.threshold.mul_(scale)

    def scale_features_(self, factors: torch.Tensor) -> None:
        raise ValueError("a BatchTopK SAE has one threshold for all features; save it (as JumpReLU) and load that")

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.float().expand(self.cfg.d_sae)}

    def saelens_cfg(self) -> dict[str, Any]:
        data = {**super().saelens_cfg(), "architecture": "jumprelu", "activation_fn_str": "relu"}
        data["metadata"] = {**data["metadata"], "training_architecture": "batchtopk"}
        return data
