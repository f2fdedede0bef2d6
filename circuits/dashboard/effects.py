"""What a feature's decoder direction does, for many features at once: its direct logit effect (the
direction through the final norm's linear part and the unembedding, as circuits.features does for
one feature, Gemma's 1 + weight offset included) and its nearest features by decoder cosine."""

from __future__ import annotations

from typing import NamedTuple

import torch

from circuits.features import final_norm_linear


class TokenEffects(NamedTuple):
    """Per feature [F, k]: the token ids whose logits the direction raises / lowers most, and by how much."""

    promoted: torch.Tensor
    promoted_values: torch.Tensor
    suppressed: torch.Tensor
    suppressed_values: torch.Tensor


class Neighbours(NamedTuple):
    """Per feature [F, k]: the dictionary indices of the most similar decoder directions, and the cosines."""

    indices: torch.Tensor
    cosines: torch.Tensor


@torch.no_grad()
def logit_effects(model, directions: torch.Tensor, k: int = 10, chunk: int = 256) -> TokenEffects:
    """Direct logit effects of directions [F, d_model], `chunk` rows at a time (the logits of all features at
    once would be F x vocabulary)."""
    unembed = model.W_U.detach().float()  # [d_model, vocab]
    k = min(k, unembed.shape[1])
    parts = []
    for start in range(0, directions.shape[0], chunk):
        block = directions[start : start + chunk].detach().to(unembed)
        logits = final_norm_linear(model, block) @ unembed  # [chunk, vocab]
        up, down = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
        parts.append((up.indices, up.values, down.indices, -down.values))
    if not parts:
        empty = torch.zeros(0, k)
        return TokenEffects(empty.long(), empty, empty.long(), empty)
    return TokenEffects(*(torch.cat([part[i] for part in parts]).cpu() for i in range(4)))


@torch.no_grad()
def nearest_features(all_directions: torch.Tensor, features: torch.Tensor, k: int = 8, chunk: int = 1024
                     ) -> Neighbours:
    """For each of `features` (indices into all_directions [n_features, d]), the k other features whose
    directions have the largest cosine with it."""
    unit = all_directions.detach().float().cpu()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, unit.shape[0] - 1)
    indices, cosines = [], []
    for start in range(0, len(features), chunk):
        rows = features[start : start + chunk]
        similarity = unit[rows] @ unit.T  # [chunk, n_features]
        similarity[torch.arange(len(rows)), rows] = -torch.inf  # not itself
        best = similarity.topk(max(k, 0), dim=1)
        indices.append(best.indices)
        cosines.append(best.values)
    if not indices:
        return Neighbours(torch.zeros(0, max(k, 0), dtype=torch.long), torch.zeros(0, max(k, 0)))
    return Neighbours(torch.cat(indices), torch.cat(cosines))
