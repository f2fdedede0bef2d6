"""The sparse autoencoder of Cunningham et al. (2024): a ReLU encoder and a linear decoder.

codes = relu((x - b_dec) @ W_enc + b_enc)    (without `- b_dec` when cfg.apply_b_dec_to_input is off)
reconstruction = codes @ W_dec + b_dec
Weights follow the SAELens layout: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
Tied: W_enc is W_dec.T, one parameter in memory. Decoder rows are unit vectors in a trained SAE.
"""

from __future__ import annotations

import torch
from torch import nn

from sae.config import DictionaryConfig
from sae.dictionary import Dictionary


def random_unit_rows(n_rows: int, width: int, seed: int) -> torch.Tensor:
    """[n_rows, width] Gaussian directions normalised to unit length, a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, width, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias for x [..., n], in one fused matmul (no separate pass to add the bias)."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight)
    flat = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return flat.reshape(*x.shape[:-1], weight.shape[1])


class ReluSAE(Dictionary):
    """ReLU sparse autoencoder, tied or untied; baselines (PCA, ICA, ...) reuse it with fixed weights."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        decoder = random_unit_rows(cfg.d_sae, cfg.d_in, cfg.seed)
        self.W_dec = nn.Parameter(decoder)  # [d_sae, d_in]
        if not cfg.tied:
            self.W_enc = nn.Parameter(decoder.T.clone())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def __getattr__(self, name: str):
        # Tied: W_enc is a view of the decoder, so gradients from both uses reach one parameter.
        if name == "W_enc" and self.cfg.tied:
            return self.W_dec.T
        return super().__getattr__(name)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] encoder outputs before the nonlinearity."""
        bias = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            # Equal to (x - b_dec) @ W_enc + b_enc. b_dec's gradient enters through a term whose value is
            # exactly zero, so training skips a [batch, d_in] matmul that autograd would only sum over.
            bias = bias + (self.b_dec.detach() - self.b_dec) @ self.W_enc.detach()
            x = x - self.b_dec.detach()
        return affine(x, self.W_enc, bias)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return affine(codes, self.W_dec, self.b_dec)

    @property
    def feature_directions(self) -> torch.Tensor:
        return self.W_dec

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on x / scale work on raw x.

        ReLU and TopK are positively homogeneous, so scaling both biases by `scale` gives
        reconstructions of x exactly and codes multiplied by `scale`; W_enc, W_dec (and tying) stay.
        """
        self.b_enc.mul_(scale)
        self.b_dec.mul_(scale)
        self.cfg.activation_scale = self.cfg.activation_scale * scale
