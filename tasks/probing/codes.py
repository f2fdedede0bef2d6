"""The probes' inputs: activations at labelled tokens, and each basis's coordinates of them.

Activations are recorded at every hook in one forward pass per batch (stopping after the deepest).
A labelled token is dropped when the engine passes its position through at any of the hooks (BOS,
massive activations: no dictionary encodes them), so every basis and hook sees the same tokens.

A basis's "directions" are the features of an SAE, and the directions themselves for the signed
baselines of sae/baselines.py (PCA, ICA, neurons, random): their codes relu(z) and relu(-z) are
put back together as the coordinate z, so one baseline direction is one probe input, read with
both signs, as a neuron or a principal component is read.
"""

from __future__ import annotations

import torch

from circuits.engine import passthrough_positions
from circuits.harvest import collect_activations
from sae.dictionary import Dictionary
from sae.progress import progress_bar
from sae.tagged_corpus import TaggedTokens

CODE_CHUNK_ROWS = 4096


@torch.inference_mode()
def labelled_activations(model, tagged: TaggedTokens, hooks: list[str], *, batch_size: int = 16,
                         progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({hook: [n, d] float32 activations at the labelled tokens}, [n] bool: kept, not passed through anywhere)."""
    device = next(model.parameters()).device
    n = tagged.rows.shape[0]
    out: dict[str, torch.Tensor] = {}
    kept = torch.ones(n, dtype=torch.bool)
    starts = range(0, tagged.tokens.shape[0], batch_size)
    for start in progress_bar(starts, desc="activations at labelled tokens", unit="batch", enabled=progress):
        end = min(start + batch_size, tagged.tokens.shape[0])
        length = int(tagged.lengths[start:end].max())
        values = collect_activations(model, tagged.tokens[start:end, :length].to(device), hooks)
        chosen = ((tagged.rows >= start) & (tagged.rows < end)).nonzero().flatten()
        rows, positions = tagged.rows[chosen] - start, tagged.positions[chosen]
        lengths = tagged.lengths[start:end].to(device)
        for hook in hooks:
            value = values[hook]
            if hook not in out:
                out[hook] = torch.zeros(n, value.shape[-1])
            out[hook][chosen] = value[rows.to(device), positions.to(device)].float().cpu()
            kept[chosen] &= ~passthrough_positions(value, lengths).cpu()[rows, positions]
    return out, kept


def is_signed_basis(dictionary: Dictionary) -> bool:
    """A baseline basis of sae/baselines.py: features i and m + i are relu(z_i) and relu(-z_i)."""
    return bool(dictionary.cfg.extra.get("signed")) and dictionary.n_features % 2 == 0


def n_directions(dictionary: Dictionary) -> int:
    return dictionary.n_features // 2 if is_signed_basis(dictionary) else dictionary.n_features


@torch.no_grad()
def basis_codes(dictionary: Dictionary, activations: torch.Tensor) -> torch.Tensor:
    """[n, n_directions] float32: an SAE's feature activations, or a signed basis's coordinates z."""
    dictionary.check_input_width(activations.shape[-1], dictionary.cfg.hook_name)
    parameter = next(dictionary.parameters())
    out = torch.empty(activations.shape[0], n_directions(dictionary))
    for start in range(0, activations.shape[0], CODE_CHUNK_ROWS):
        codes = dictionary.encode(activations[start:start + CODE_CHUNK_ROWS].to(parameter.device, parameter.dtype))
        if is_signed_basis(dictionary):
            half = codes.shape[-1] // 2
            codes = codes[:, :half] - codes[:, half:]
        out[start:start + codes.shape[0]] = codes.float().cpu()
    return out
