"""Which features to remove, and every (hook, method, k) edit of a sweep.

The k-swept methods rank a dictionary's features and remove the first k:

- `sae_attribution`: by the predicted drop of the signed concept logit difference when a feature is
  removed, activation x gradient (`circuits.attribution.attribution_scores` with delta = the codes),
  summed over the edited positions and averaged over the train prompts;
- `sae_activation`: by |mean code on positive prompts - mean code on negative prompts| over the fitted
  positions;
- `sae_random` (control): active features in a random order (seeded, nested across k);
- `random_dictionary` (control): a random orthonormal basis (signed, centred on the train mean),
  ranked by activation difference.

LEACE and the mean projection are fitted on the same fitted positions, and run at several strengths
(`edits.scaled`). Which positions those are is the position setting (tasks.erasure.positions): every
method of a setting is fitted and applied at the same positions.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from circuits.attribution import attribution_scores
from circuits.engine import encode_codes
from sae.baselines import random_basis
from sae.dictionary import Dictionary
from tasks.erasure.edits import Erasure, class_means, feature_removal, fit_leace, fit_mean_projection, scaled

K_METHODS = ("sae_attribution", "sae_activation", "sae_random", "random_dictionary")
FIXED_METHODS = ("leace", "mean_projection")
METHODS = K_METHODS + FIXED_METHODS
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
DEFAULT_STRENGTHS = (0.25, 0.5, 1.0)


@dataclass
class HookStatistics:
    """What the methods are fitted on at one hook under one position setting, from the train split."""

    final_activations: torch.Tensor  # [n, d] at each prompt's final position
    labels: torch.Tensor  # [n]
    attribution: torch.Tensor  # [n_features]: mean predicted drop of the signed logit diff per removed feature
    position_activations: torch.Tensor  # [m, d] at every fitted position of every prompt
    position_labels: torch.Tensor  # [m]: the label of the prompt each position belongs to
    active_features: torch.Tensor  # [n_features] bool: fired at some edited position of some prompt
    final_passthrough: torch.Tensor | None = None  # [n] bool: final positions the engine passes through
    name_activations: torch.Tensor | None = None  # [n, d] at each prompt's subject name (None: no subjects)
    name_passthrough: torch.Tensor | None = None  # [n] bool
    setting: str = "final"  # the position setting (tasks.erasure.positions)



def signed_logit_diffs(final_logits: torch.Tensor, labels: torch.Tensor, token_ids: tuple[int, int]) -> torch.Tensor:
    """[n]: logit of the prompt's own concept token minus the other side's (positive = correct)."""
    positive_id, negative_id = token_ids
    sign = labels.to(final_logits.device, final_logits.dtype) * 2 - 1
    return (final_logits[:, positive_id] - final_logits[:, negative_id]) * sign


def feature_attribution(dictionary: Dictionary, activation: torch.Tensor, grad: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed predicted drop per removed feature [n_features] (float64), active features [n_features] bool)
    for activation and its metric gradient [b, pos, d], over the edited positions `mask` [b, pos]."""
    codes = encode_codes(dictionary, activation, ~mask)  # [b, pos, n_features], zero outside the mask
    drop = attribution_scores(grad, codes, dictionary.feature_directions, mask=mask).features
    return drop, (codes[mask] > 0).any(0).cpu()


def activation_difference(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n_features]: |mean code over positive prompts - mean over negative prompts|, codes [n, n_features]."""
    positive, negative = class_means(codes, labels)
    return (positive - negative).abs()


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Feature indices, highest score first (ties by index, so the order is reproducible)."""
    return torch.sort(scores.double().cpu(), descending=True, stable=True).indices


def random_features(active: torch.Tensor, seed: int, hook: str) -> torch.Tensor:
    """The active feature indices in a random order fixed by (seed, hook); take the first k for k features.

    The order is one seeded permutation of *all* features, filtered to the active ones: a feature
    that is borderline active (a code just above or below zero, which can flip with the thread
    count or the BLAS build) then only enters or leaves the list, instead of reshuffling every draw.
    """
    active = active.cpu().bool()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hook.encode()))
    order = torch.randperm(len(active), generator=generator)
    return order[active[order]]


def check_ks(ks: Sequence[int], dictionaries: dict[str, Dictionary]) -> list[int]:
    """The k values, sorted and unique; each must be positive and at most every dictionary's size."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {ks}")
    for hook, dictionary in dictionaries.items():
        if ks[-1] > dictionary.n_features:
            raise ValueError(f"k={ks[-1]} exceeds the {dictionary.n_features} features of the dictionary at {hook}; "
                             "use smaller k values")
    return ks


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods in the documented order; unknown names are an error."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown erasure method(s) {unknown}; choose among {', '.join(METHODS)}")
    return [method for method in METHODS if method in methods]


def feature_rankings(dictionary: Dictionary, statistics: HookStatistics, hook: str, seed: int,
                     methods: Sequence[str]) -> dict[str, tuple[Dictionary, torch.Tensor]]:
    """{method: (dictionary, feature indices in removal order)} for the k-swept methods."""
    fit_rows, labels = statistics.position_activations, statistics.position_labels
    fitted = fit_rows.to(next(dictionary.parameters()).device)
    with torch.no_grad():
        codes = dictionary.encode(fitted).cpu()  # [m, n_features]
    rankings = {}
    if "sae_attribution" in methods:
        rankings["sae_attribution"] = (dictionary, ranked(statistics.attribution))
    if "sae_activation" in methods:
        rankings["sae_activation"] = (dictionary, ranked(activation_difference(codes, labels)))
    if "sae_random" in methods:
        rankings["sae_random"] = (dictionary, random_features(statistics.active_features, seed, hook))
    if "random_dictionary" in methods:
        basis = random_basis(dictionary.d_in, seed=seed, mean=fit_rows.double().mean(0),
                             hook_name=hook).to(fitted.device)
        with torch.no_grad():
            basis_codes = basis.encode(fitted).cpu()
        rankings["random_dictionary"] = (basis, ranked(activation_difference(basis_codes, labels)))
    return rankings


def check_strengths(strengths: Sequence[float]) -> list[float]:
    """The strengths, sorted and unique, each in (0, 1]."""
    strengths = sorted(set(float(strength) for strength in strengths))
    if not strengths or strengths[0] <= 0 or strengths[-1] > 1:
        raise ValueError(f"strengths must be in (0, 1], got {strengths}")
    return strengths


def build_edits(dictionaries: dict[str, Dictionary], statistics: dict[str, HookStatistics], ks: Sequence[int],
                methods: Sequence[str] = METHODS, seed: int = 0,
                strengths: Sequence[float] = (1.0,)) -> tuple[list[Erasure], dict]:
    """Every (hook, method, k or strength) edit of one position setting (the statistics'); and the chosen
    features per method. The clean identity is not among them."""
    edits: list[Erasure] = []
    chosen: dict = {}
    for hook, dictionary in dictionaries.items():
        stats = statistics[hook]
        rankings = feature_rankings(dictionary, stats, hook, seed, methods)
        chosen[hook] = {method: order[: max(ks)].tolist() for method, (_, order) in rankings.items()}
        for method, (source, order) in rankings.items():
            for k in ks:
                if k <= len(order):
                    edits.append(replace(feature_removal(hook, method, source, order[:k].tolist()),
                                         setting=stats.setting))
                else:
                    warnings.warn(f"{hook}: {method} has only {len(order)} candidate features, skipping k={k}",
                                  stacklevel=2)
        fits = {"leace": fit_leace, "mean_projection": fit_mean_projection}
        for method, fit in fits.items():
            if method in methods:
                fitted = replace(fit(hook, stats.position_activations, stats.position_labels, method),
                                 setting=stats.setting)
                edits += [scaled(fitted, strength) for strength in strengths]
    return edits, chosen
