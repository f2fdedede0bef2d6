"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

codes = relu(pre) * (pre > threshold),  pre = (x - b_dec) @ W_enc + b_enc,  one threshold per feature.
Training (as SAELens' "step" sparsity mode, with its defaults): loss = mse + lambda * mean_batch L0, where
L0 = sum_i H(pre_i - threshold_i). H has no useful gradient, so the threshold learns through straight-
through pseudo-derivatives with a rectangle kernel of width `jumprelu_bandwidth` (epsilon):
    d JumpReLU / d threshold = -(threshold / eps) * rect((pre - threshold) / eps)
    d H / d threshold        = -(1 / eps) * rect((pre - threshold) / eps)
and the pre-activations get the plain JumpReLU gradient (none from the L0 term). lambda is
cfg.l1_coefficient (with the same warm-up ramp as the L1 penalty). As in SAELens (>= 6.x) the threshold
is a parameter in its own right (not exp(log_threshold)), clamped at 0 before each step.
Options in cfg.extra: `jumprelu_init_threshold` (0.01) and `jumprelu_bandwidth` (0.05), in the
normalised space training works in. Decoder rows stay unit-norm, as for every SAE here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae.config import DictionaryConfig
from sae.dictionary import SparseAutoencoder, TrainingLoss, TrainingState

INIT_THRESHOLD, BANDWIDTH = 0.01, 0.05


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = (threshold / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return (pre > threshold).to(grad) * grad, -kernel.sum(dim=0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = (1.0 / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return None, -kernel.sum(dim=0), None


class JumpReLUSAE(SparseAutoencoder):
    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        initial = float(cfg.extra.get("jumprelu_init_threshold", INIT_THRESHOLD))
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), initial))  # [d_sae]

    @property
    def bandwidth(self) -> float:
        return float(self.cfg.extra.get("jumprelu_bandwidth", BANDWIDTH))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre)

    def column_activation(self, pre: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold[index]).to(pre)

    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        pre = self.pre_activations(x)
        codes = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        residual, mse = self.reconstruction_terms(x, codes)
        l0 = _Step.apply(pre, self.threshold, self.bandwidth).sum(dim=-1).mean()
        loss = mse + (self.cfg.l1_coefficient * state.sparsity_ramp) * l0
        return TrainingLoss(loss, mse, codes, residual)

    @classmethod
    def describe(cls, cfg: DictionaryConfig) -> str:
        return f"l0_{cfg.l1_coefficient:g}"

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        super().fold_input_scale_(scale)
        self.threshold.mul_(scale)

    @torch.no_grad()
    def scale_features_(self, factors: torch.Tensor) -> None:
        super().scale_features_(factors)
        self.threshold.mul_(factors)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold}

    @classmethod
    def saelens_shapes(cls, cfg: DictionaryConfig) -> dict[str, list[int]]:
        return {**super().saelens_shapes(cfg), "threshold": [cfg.d_sae]}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saelens_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].to(torch.float32))

    def saelens_cfg(self) -> dict[str, Any]:
        return {**super().saelens_cfg(), "activation_fn_str": "relu", "activation_fn_kwargs": {}}
