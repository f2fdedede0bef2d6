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

import math
from typing import Any

import torch

from sae.config import DictionaryConfig
from sae.dictionary import DictionaryOutput, SparseAutoencoder, TrainingLoss, TrainingState
from sae.distributed import Distributed
from sae.topk import check_k, with_aux_k


def batch_topk(pre: torch.Tensor, k: float, distributed: Distributed | None = None) -> torch.Tensor:
    """[batch, d_sae] -> the same shape keeping the int(k * batch) largest ReLU'd entries of the batch."""
    rows, columns, values = batch_topk_entries(pre, k, distributed)
    return torch.zeros_like(pre).index_put_((rows, columns), values)


def batch_topk_entries(pre: torch.Tensor, k: float, distributed: Distributed | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int(k * batch) largest ReLU'd entries of pre [batch, d_sae] as (rows, columns, values), each [n],
    in row-major order (each token's entries are one run, as embedding_bag's offsets need).

    In a data-parallel run `pre` is one rank's share and the batch is every rank's: each rank offers its own
    largest entries, and all keep what reaches the whole batch's int(k * batch)-th largest value."""
    flat = torch.relu(pre).flatten()
    if distributed is None or not distributed.active:
        top = flat.topk(int(k * pre.shape[0]), sorted=False)
        flat_index, order = top.indices.sort()
        values = top.values[order]
    else:
        keep = int(k * distributed.total(pre.shape[0]))
        offered = distributed.gather_rows(flat.detach().topk(min(keep, flat.numel()), sorted=False).values)
        threshold = offered.topk(keep, sorted=False).values.min()
        flat_index = torch.nonzero(flat >= threshold).flatten()  # ascending: row-major
        values = flat[flat_index]
    return flat_index // pre.shape[1], flat_index % pre.shape[1], values


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

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """encode, then decode from the active decoder rows alone (decode_active), not a dense matmul."""
        codes = self.encode(x)
        return DictionaryOutput(self.decode_active(codes), codes)

    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        encoder = self.selectable_pre_activations(x)  # gradients at the selected entries only
        pre = encoder.pre
        rows, columns, _ = batch_topk_entries(pre, self.cfg.k, state.distributed)
        values = torch.relu(encoder.at(rows, columns))
        offsets = torch.searchsorted(rows, torch.arange(x.shape[0], device=x.device))
        residual, mse = self.sparse_reconstruction_terms(x, columns, values, offsets)  # k rows per token on average
        codes = torch.zeros_like(pre).index_put_((rows, columns), values.detach())
        self._update_threshold(codes, state.distributed)
        return TrainingLoss(with_aux_k(self, pre, encoder.at_tokens, mse, residual, state), mse, codes, residual)

    @torch.no_grad()
    def _update_threshold(self, codes: torch.Tensor, distributed: Distributed | None = None) -> None:
        positive = codes[codes > 0]
        smallest = positive.min().double() if positive.numel() else torch.tensor(math.inf, dtype=torch.float64)
        if distributed is not None:  # the smallest over the whole batch
            smallest = distributed.min_(smallest.reshape(1))[0]
        if math.isfinite(float(smallest)):
            rate = float(self.cfg.extra.get("topk_threshold_lr", 0.01))
            self.threshold.copy_((1 - rate) * self.threshold + rate * smallest)

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
