"""The interface every decomposition shares: sparse autoencoders and the baselines alike.

A dictionary maps activations to codes (`encode`) and codes back to activations (`decode`).
Its feature directions are the decoder rows: `decode(c) = c @ feature_directions + bias`.
Experiments (patching, erasure, tracing) only use this interface, so every decomposition
is compared by the same code.

`SparseAutoencoder` is the SAELens weight layout every SAE architecture shares (W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]); an architecture (one file each: relu.py, topk.py,
batchtopk.py, jumprelu.py) adds its nonlinearity, its training loss and its SAELens cfg keys, and is
registered by name in sae/registry.py. The training loop, io and tracing only call the methods here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from sae.config import DictionaryConfig
from sae.distributed import Distributed
from sae.sparse_backward import SelectablePreActivations, sparse_decode


class DictionaryOutput(NamedTuple):
    reconstruction: torch.Tensor  # [..., d_in]
    codes: torch.Tensor  # [..., n_features]


@dataclass(frozen=True)
class TrainingState:
    """What an architecture's training loss may depend on besides the batch."""

    step: int  # 0-based index of this optimizer step
    sparsity_ramp: float  # 0..1: the warm-up factor of the sparsity coefficient (cfg.l1_coefficient)
    dead: torch.Tensor  # [d_sae] bool: features that did not fire within the dead window
    aux_k_coefficient: float  # weight of the AuxK dead-feature loss for the architectures that use one
    # [d_sae] decoder row norms (with gradient) when the rows are free (TrainingConfig.unit_norm_decoder False):
    # the loss then measures each code times its row's norm (SAELens' recipe); None: rows are held at norm 1.
    decoder_norms: torch.Tensor | None = None
    # Data-parallel training (sae/distributed.py): this process's share of the batch's rows, and the process
    # group. The loop weights the loss by batch_share before summing gradients over ranks, so a loss that is a
    # mean over rows needs nothing; a batch-level statistic (BatchTopK's selection, AuxK's normaliser) is taken
    # over the whole batch through `distributed`.
    batch_share: float = 1.0
    distributed: Distributed = field(default_factory=Distributed)


@dataclass
class TrainingLoss:
    """One step's loss and what the loop logs and resamples from (all on the batch [batch, ...])."""

    loss: torch.Tensor  # scalar that is minimised
    mse: torch.Tensor  # mean_batch ||x_hat - x||^2 / d_in
    codes: torch.Tensor  # [batch, d_sae]
    residual: torch.Tensor  # [batch, d_in] x - x_hat
    l1: torch.Tensor | None = None  # mean_batch ||codes||_1 when the loss computed it; else computed when logged

    def detached(self) -> "TrainingLoss":
        return TrainingLoss(self.loss.detach(), self.mse.detach(), self.codes.detach(), self.residual.detach(),
                            None if self.l1 is None else self.l1.detach())


class Dictionary(nn.Module, abc.ABC):
    """Abstract base: subclasses implement `encode`, `decode` and `feature_directions`."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_features(self) -> int:
        return self.cfg.d_sae

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> codes [..., n_features]."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_features] -> reconstruction [..., d_in]."""

    @property
    @abc.abstractmethod
    def feature_directions(self) -> torch.Tensor:
        """[n_features, d_in]: what adding one unit of feature i adds to the reconstruction."""

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        codes = self.encode(x)
        return DictionaryOutput(self.decode(codes), codes)

    def encode_features(self, x: torch.Tensor, indices) -> torch.Tensor:
        """[..., len(indices)]: the codes of the listed features only. Architectures whose features are
        computed independently (ReLU, JumpReLU) override it to compute just those encoder columns."""
        return self.encode(x)[..., list(indices)]

    def check_input_width(self, width: int, where: str = "") -> None:
        """Fail before any compute when activations do not match this dictionary's d_in."""
        if width != self.d_in:
            place = f" at {where}" if where else ""
            raise ValueError(
                f"dictionary for '{self.cfg.hook_name}' expects d_in={self.d_in}, but the activations{place} "
                f"have width {width}; train or load a dictionary for this hook point and model"
            )


def random_unit_rows(n_rows: int, width: int, seed: int) -> torch.Tensor:
    """[n_rows, width] Gaussian directions normalised to unit length, a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, width, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast runs matmuls in on this device's type, or None outside an autocast region."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias for x [..., n], in one fused matmul (no separate pass to add the bias)."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight)
    flat = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return flat.reshape(*x.shape[:-1], weight.shape[1])


class SparseAutoencoder(Dictionary):
    """codes = activation((x - b_dec) @ W_enc + b_enc); reconstruction = codes @ W_dec + b_dec.

    (`- b_dec` only when cfg.apply_b_dec_to_input.) Tied: W_enc is W_dec.T, one parameter in memory.
    Subclasses implement `activation` and `training_loss`; those with extra tensors (a threshold)
    extend `fold_input_scale_`, `scale_features_`, `saelens_tensors` and `load_saelens_tensors`.
    """

    # The cfg field that sets this architecture's sparsity ("l1_coefficient" or "k"): what a sweep varies.
    sparsity_setting = "l1_coefficient"
    # Whether training_loss honours TrainingState.decoder_norms (training with free decoder rows).
    supports_free_decoder = False

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

    # --- encode / decode --------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] encoder outputs before the nonlinearity."""
        x, bias = self._encoder_input(x)
        return affine(x, self.W_enc, bias)

    def selectable_pre_activations(self, x: torch.Tensor) -> SelectablePreActivations:
        """`pre_activations` of a batch [tokens, d_in] computed once without a graph; a training loss then takes the
        entries it uses with a gradient computed at those entries alone (sae/sparse_backward.py)."""
        x, bias = self._encoder_input(x)
        return SelectablePreActivations(x, self.W_enc, bias)

    def _encoder_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, bias) with input @ W_enc + bias = the pre-activations: (x - b_dec, b_enc) when
        cfg.apply_b_dec_to_input, else (x, b_enc)."""
        bias = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            # Equal to (x - b_dec) @ W_enc + b_enc. b_dec's gradient enters through a term whose value is
            # exactly zero, so training skips a [batch, d_in] matmul that autograd would only sum over.
            bias = bias + (self.b_dec.detach() - self.b_dec) @ self.W_enc.detach()
            x = x - self.b_dec.detach()
        return x, bias

    @abc.abstractmethod
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] pre-activations -> codes (the inference-time nonlinearity)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x))

    def column_activation(self, pre: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The nonlinearity on the pre-activations of features `index` alone, or None when a feature's
        code depends on the others (TopK): then `encode_features` encodes everything and slices."""
        return None

    def encode_features(self, x: torch.Tensor, indices) -> torch.Tensor:
        index = torch.as_tensor(list(indices), dtype=torch.long, device=x.device)
        centred = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        codes = self.column_activation(centred @ self.W_enc[:, index] + self.b_enc[index], index)
        return self.encode(x)[..., index] if codes is None else codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return affine(codes, self.W_dec, self.b_dec)

    @property
    def feature_directions(self) -> torch.Tensor:
        return self.W_dec

    # --- training -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def training_loss(self, x: torch.Tensor, state: TrainingState) -> TrainingLoss:
        """The loss of one training step on x [batch, d_in] (in the normalised space, see sae/training)."""

    def reconstruction_terms(self, x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual x - decode(codes) [batch, d_in], mse = mean_batch ||residual||^2 / d_in)."""
        residual = x - self.decode(codes)
        return residual, residual.pow(2).mean()

    def sparse_reconstruction_terms(self, x: torch.Tensor, columns: torch.Tensor, values: torch.Tensor,
                                    offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`reconstruction_terms` from the nonzero codes alone: `values` of features `columns`, either
        [batch, n] each (n per token: TopK) or flat [nnz] with `offsets` [batch] where each token's run starts.

        The decoder rows are gathered and summed (embedding_bag) instead of multiplying the mostly-zero code
        matrix: with a few percent of codes active this skips most of the decode and its two backward
        matmuls (the gradient to the codes is computed at the active entries only)."""
        residual = x - (self.gathered_rows(columns, values, offsets) + self.b_dec)
        return residual, residual.pow(2).mean()

    def gathered_rows(self, columns: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """[bags, d_in]: per token, the sum of `values` x decoder rows `columns` (layouts as in
        sparse_reconstruction_terms); under autocast in its dtype, as the dense decode's matmul would be."""
        weight, low = self.W_dec, autocast_dtype(values.device)
        if low is not None:
            weight, values = weight.to(low), values.to(low)
        else:
            values = values.to(weight.dtype)
        return sparse_decode(columns, weight, values, offsets)

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[..., k] feature indices and their codes -> reconstruction [..., d_in]: `decode` of codes that are zero
        elsewhere (TopK's), from the k decoder rows alone instead of a [..., d_sae] x [d_sae, d_in] matmul."""
        flat = self.gathered_rows(indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1]))
        return (flat + self.b_dec).reshape(*indices.shape[:-1], self.d_in)

    def decode_active(self, codes: torch.Tensor) -> torch.Tensor:
        """`decode(codes)` [..., d_sae] -> [..., d_in] from the nonzero codes alone, any number per token: for codes
        that are mostly zero (BatchTopK's, whose count varies per token)."""
        flat = codes.reshape(-1, codes.shape[-1])
        rows, columns = flat.nonzero(as_tuple=True)  # row-major: each token's entries are one run
        offsets = torch.searchsorted(rows, torch.arange(flat.shape[0], device=flat.device))
        decoded = self.gathered_rows(columns, flat[rows, columns], offsets) + self.b_dec
        return decoded.reshape(*codes.shape[:-1], self.d_in)

    @classmethod
    def describe(cls, cfg: DictionaryConfig) -> str:
        """What tells this SAE apart from others on the same hook, for default folder names (`l1_0.001`)."""
        return f"l1_{cfg.l1_coefficient:g}"

    # --- transformations that keep what the SAE computes -------------------------------------------

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on x / scale work on raw x: reconstructions of x exactly, codes x scale.

        Every architecture here is positively homogeneous in (x, biases, thresholds), so the biases
        (and thresholds, in subclasses) are multiplied by `scale`; W_enc, W_dec (and tying) stay.
        """
        self.b_enc.mul_(scale)
        self.b_dec.mul_(scale)
        self.cfg.activation_scale = self.cfg.activation_scale * scale

    @torch.no_grad()
    def scale_features_(self, factors: torch.Tensor) -> None:
        """Codes x factors [d_sae] (> 0), decoder rows / factors: the same reconstructions.

        Used to load SAELens' `rescale_acts_by_decoder_norm` (factors = decoder row norms)."""
        if self.cfg.tied:
            raise ValueError("cannot rescale the features of a tied SAE; untie it first")
        self.W_enc.mul_(factors)
        self.b_enc.mul_(factors)
        self.W_dec.div_(factors[:, None])

    # --- SAELens files -----------------------------------------------------------------------------

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of `sae_weights.safetensors` in SAELens' names."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    @classmethod
    def saelens_shapes(cls, cfg: DictionaryConfig) -> dict[str, list[int]]:
        """The shape of every tensor `load_saelens_tensors` needs (W_enc may be absent when tied)."""
        return {"W_enc": [cfg.d_in, cfg.d_sae], "b_enc": [cfg.d_sae], "W_dec": [cfg.d_sae, cfg.d_in],
                "b_dec": [cfg.d_in]}

    def saelens_cfg(self) -> dict[str, Any]:
        """cfg.json contents: our fields plus the SAELens keys of this architecture."""
        return self.cfg.to_dict()

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the tensors of a weights file (checked against `saelens_shapes`) into this SAE."""
        state = {name: tensors[name].to(torch.float32) for name in ("W_enc", "b_enc", "W_dec", "b_dec")
                 if name in tensors}
        if self.cfg.tied:
            encoder = state.pop("W_enc", None)
            if encoder is not None and not torch.equal(encoder, state["W_dec"].T):
                raise ValueError("cfg.json says tied but W_enc is not W_dec.T; set \"tied\": false in cfg.json")
        for name, value in state.items():
            getattr(self, name).copy_(value)
