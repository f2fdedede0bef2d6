"""The one rule for which positions a dictionary leaves alone, and encoding under it.

Passed-through positions are never encoded (their codes are zero, the error term carries them
unchanged), never edited and never measured, in every experiment:

- position 0, the BOS token (with `exclude_bos`, the default): in Llama-family models its residual is
  a huge outlier (norm ~25,000 against ~150 in SmolLM2) that no dictionary is trained on;
- massive activations: positions 1.. whose norm at that hook exceeds `MASSIVE_FACTOR` (10) times the
  median norm of that row's positions 1.. (attention sinks: in SmolLM2 the first token of a context
  that starts mid-document, from layer ~11 on). Training leaves the same tokens out (norm above 10x
  the batch median; sae.metrics.typical_token_mask), so a dictionary never saw them.

The factor is `sae.metrics.OUTLIER_NORM_FACTOR`, the one number training and the engine share.
"""

from __future__ import annotations

import torch

from sae.dictionary import Dictionary
from sae.metrics import OUTLIER_NORM_FACTOR, outlier_positions

MASSIVE_FACTOR = OUTLIER_NORM_FACTOR


def passthrough_positions(activation: torch.Tensor, lengths: torch.Tensor | None = None,
                          exclude_bos: bool = True, pass_massive: bool = True) -> torch.Tensor:
    """[batch, pos] bool: the positions a dictionary leaves alone at this activation [batch, pos, d]."""
    if activation.ndim != 3:
        raise ValueError(f"expected activations [batch, pos, d], got shape {tuple(activation.shape)}")
    mask = outlier_positions(activation, MASSIVE_FACTOR if pass_massive else None, lengths)
    if exclude_bos:
        mask[:, 0] = True
    return mask


def encode_codes(dictionary: Dictionary, activation: torch.Tensor, passthrough: torch.Tensor | None) -> torch.Tensor:
    """Codes [batch, pos, n_features] of activation [batch, pos, d], zero at the passed-through positions."""
    dictionary.check_input_width(activation.shape[-1], dictionary.cfg.hook_name)
    dtype = next(dictionary.parameters()).dtype
    codes = dictionary.encode(activation.to(dtype))
    if passthrough is not None:
        codes = codes.masked_fill(passthrough.to(codes.device)[..., None], 0.0)
    return codes
