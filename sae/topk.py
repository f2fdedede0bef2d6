"""TopK sparse autoencoder (Gao et al., 2024): the ReLU SAE's weights, but only the k largest
pre-activations of each token survive, so L0 is exactly k (fewer if some of them are negative).

Training loss (normalised space): mean_batch ||x_hat - x||^2 / d_in + aux_k_coefficient * AuxK, where
AuxK (only while some latents are dead) = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2, e = x - x_hat
(detached) and e_hat is e reconstructed from the d_in/2 largest dead latents alone. With free decoder
rows (training), pre-activations are multiplied by the row norms before the selection and the codes
divided by them before decoding, so the saved SAE (norms folded in) is a plain TopK SAE.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from sae.config import DictionaryConfig
from sae.dictionary import DictionaryOutput, SparseAutoencoder, TrainingLoss, TrainingState
from sae.distributed import Distributed
from sae.relu import ReluSAE

# per-token feature indices [batch, n] -> the pre-activations there, with a gradient
# (SelectablePreActivations.at_tokens)
Selector = Callable[[torch.Tensor], torch.Tensor]


def check_k(cfg: DictionaryConfig, architecture: str = "TopK") -> None:
    if cfg.k is None or not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"a {architecture} SAE needs 0 < k <= d_sae={cfg.d_sae}, got k={cfg.k}; set cfg.k")


def aux_k_loss(sae: SparseAutoencoder, scores: torch.Tensor, select: Selector, residual: torch.Tensor,
               dead: torch.Tensor, decoder_norms: torch.Tensor | None = None,
               distributed: Distributed | None = None) -> torch.Tensor:
    """AuxK (Gao et al. 2024): how well the top dead latents reconstruct the residual, normalised.

    scores [batch, d_sae] pre-activations without a gradient (times the decoder row norms when those are free);
    select(indices [batch, n]) the pre-activations (not times the norms) there with a gradient
    (SelectablePreActivations.at_tokens); residual [batch, d_in] = x - x_hat (detached); dead [d_sae] bool;
    decoder_norms [d_sae] or None (unit rows).
    """
    k_aux = min(max(sae.d_in // 2, 1), sae.n_features)
    with torch.no_grad():
        top = (torch.relu(scores) * dead).topk(k_aux, dim=-1, sorted=False)
    _, weights = _selected_codes(select, top.indices, decoder_norms)
    weights = weights * dead[top.indices]  # fewer dead latents than k_aux: the others add nothing
    residual_hat = sae.gathered_rows(top.indices, weights)
    return (residual_hat - residual).pow(2).sum() / _residual_spread(residual, distributed).clamp_min(1e-12)


def _selected_codes(select: Selector, indices: torch.Tensor, decoder_norms: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoding weights) [batch, n] at per-token feature indices [batch, n]: the ReLU'd pre-activations
    (times the row norms when free: the codes of unit-norm rows) and those codes over the row norms."""
    pre = select(indices)
    if decoder_norms is None:
        values = torch.relu(pre)
        return values, values
    norms = decoder_norms[indices]
    values = torch.relu(pre * norms)
    return values, values / norms


@torch.no_grad()
def _residual_spread(residual: torch.Tensor, distributed: Distributed | None) -> torch.Tensor:
    """sum ||e - mean(e)||^2 over the batch; in a data-parallel run over the whole batch (every rank's share)."""
    if distributed is None or not distributed.active:
        return (residual - residual.mean(dim=0)).pow(2).sum()
    count = distributed.total(residual.shape[0])
    total = distributed.sum_(residual.sum(dim=0).double())
    squares = distributed.sum_(residual.double().pow(2).sum())
    return (squares - total.pow(2).sum() / count).to(residual.dtype)


def with_aux_k(sae: SparseAutoencoder, scores: torch.Tensor, select: Selector, mse: torch.Tensor,
               residual: torch.Tensor, state: TrainingState) -> torch.Tensor:
    """mse, plus aux_k_coefficient * AuxK while some latents are dead (scores, select: as aux_k_loss takes them)."""
    loss = mse
    if state.aux_k_coefficient > 0 and bool(state.dead.any()):
        # AuxK is already this rank's part of the whole batch's ratio: undo the loop's weighting by batch_share
        aux = aux_k_loss(sae, scores, select, residual.detach(), state.dead, state.decoder_norms,
                         state.distributed)
        loss = loss + state.aux_k_coefficient * aux / max(state.batch_share, 1e-12)
    return loss


class TopKSAE(ReluSAE):
    sparsity_setting = "k"

    def __init__(self, cfg: DictionaryConfig):
        check_k(cfg)
        super().__init__(cfg)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> the same shape with all but the k largest (ReLU'd) entries zeroed."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """encode, then decode from the k active decoder rows per token (decode_sparse), not a dense matmul."""
        top = self.pre_activations(x).topk(self.cfg.k, dim=-1, sorted=False)
        values = torch.relu(top.values)
        codes = torch.zeros(*x.shape[:-1], self.n_features, dtype=values.dtype, device=values.device)
        return DictionaryOutput(self.decode_sparse(top.indices, values), codes.scatter_(-1, top.indices, values))

    def column_activation(self, pre: torch.Tensor, index: torch.Tensor) -> None:
        return None  # a code depends on every other pre-activation (is it among the k largest?)

    supports_free_decoder = True

    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        encoder = self.selectable_pre_activations(x)  # gradients at the selected entries only
        scores = encoder.pre
        if state.decoder_norms is not None:  # free decoder rows: select on the codes of unit-norm rows
            scores = scores * state.decoder_norms.detach()  # (SAELens' rescale_acts_by_decoder_norm)
        top = scores.topk(self.cfg.k, dim=-1, sorted=False)
        values, weights = _selected_codes(encoder.at_tokens, top.indices, state.decoder_norms)
        residual, mse = self.sparse_reconstruction_terms(x, top.indices, weights)  # k of d_sae rows per token
        codes = torch.zeros_like(scores).scatter_(-1, top.indices, values.detach())
        return TrainingLoss(with_aux_k(self, scores, encoder.at_tokens, mse, residual, state), mse, codes, residual)

    @classmethod
    def describe(cls, cfg: DictionaryConfig) -> str:
        return f"k_{cfg.k}"

    def saelens_cfg(self) -> dict[str, Any]:
        return {**super().saelens_cfg(), "activation_fn_str": "topk", "activation_fn_kwargs": {"k": self.cfg.k},
                "rescale_acts_by_decoder_norm": False}
