"""Concept erasure at feature granularity, compared with LEACE and a mean-difference projection.

An erasure method is an `Edit`: a function x [..., d_model] -> x' applied at one hook point during
the forward pass, to every position of the prompt except BOS (position 0, whose residual is a huge
outlier no dictionary is trained on; padding after the prompt is edited too but cannot affect it).
Statistics are fitted on the train split at each prompt's final position, where the concept
token is predicted (the `*_all_positions` variants excepted):

- `sae_attribution`: remove the k dictionary features whose removal most lowers the correct-vs-
  incorrect concept-token logit difference, by gradient attribution summed over the edited positions
  (drop_i = mean over prompts of sum_p code_i,p * (direction_i . d metric / d x_p));
- `sae_activation`: remove the k features with the largest |mean code on positive prompts - mean
  code on negative prompts| at the final position;
- `sae_random` (control): k features drawn at random (seeded, nested across k) among those active
  somewhere in the edited positions of the train prompts;
- `random_dictionary` (control): a random orthonormal basis (signed, centred on the train mean),
  its k features chosen by activation difference;
- `leace`: the LEACE eraser of the `concept-erasure` package (affine, rank 1 for a binary concept);
- `mean_projection`: remove the component along the class-mean difference, around the train mean;
- `leace_all_positions`, `mean_projection_all_positions`: the same two fitted on every edited
  position of the train prompts (each labelled with its prompt's side) instead of the final one:
  the concept also lives at earlier positions (the subject's name), which later layers read from.

Removing feature i subtracts code_i(x) * direction_i and leaves the dictionary's error term and
every other feature in place. Metrics, on the test split: removal = 1 - mean edited signed logit
difference / mean clean one (signed: correct token minus the other side's; 0 = untouched, 1 = no
preference left, above 1 = reversed), the same on the transfer split, the accuracy of a fresh
logistic-regression probe (fitted on the edited train activations at the final position, scored on
the edited test activations), the mean norm of the change over edited test-prompt positions, and
the collateral damage on held-out corpus text: mean KL(clean || edited) per token and the change in
next-token cross-entropy.
"""

from __future__ import annotations

import io
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from circuits.evaluation import _cross_entropy, _kl_clean_to, replacement_hook
from circuits.splicing import hook_width
from sae.activation_store import validate_hooks
from sae.assets import atomic_write_bytes, atomic_write_text
from sae.baselines import random_basis
from sae.config import layer_of_hook
from sae.dictionary import Dictionary
from tasks.concepts import Concept, ConceptError, ConceptSplits, gender_concept, tokenize_prompts, validate_concept

K_METHODS = ("sae_attribution", "sae_activation", "sae_random", "random_dictionary")
FIXED_METHODS = ("leace", "mean_projection", "leace_all_positions", "mean_projection_all_positions")
METHODS = K_METHODS + FIXED_METHODS
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
COLUMNS = ["hook", "method", "k", "removal", "logit_diff", "concept_accuracy", "transfer_removal",
           "probe_accuracy", "probe_train_accuracy", "edit_norm", "relative_edit_norm", "kl", "ce_delta", "ce_loss"]


# ----------------------------------------------------------------------------------------------
# Edits


class Edit:
    """One erasure method at one hook point; the base class is the identity (the clean model)."""

    def __init__(self, hook: str, method: str = "clean", k: int | None = None):
        self.hook, self.method, self.k = hook, method, k

    @property
    def is_identity(self) -> bool:
        return type(self) is Edit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hook!r}, {self.method!r}, k={self.k})"


class FeatureRemoval(Edit):
    """Subtract code_i(x) * direction_i for the chosen features; the error term and other features stay."""

    def __init__(self, hook: str, method: str, dictionary: Dictionary, features: Sequence[int]):
        super().__init__(hook, method, len(features))
        self.dictionary = dictionary
        self.features = torch.as_tensor(list(features), dtype=torch.long)

    def removed(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model]: sum over the chosen features of code_i(x) * direction_i."""
        features = self.features.to(x.device)
        codes = self.dictionary.encode(x)[..., features]  # [..., k]
        return codes @ self.dictionary.feature_directions[features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.removed(x).to(x.dtype)


class LeaceEdit(Edit):
    """The LEACE eraser of the concept-erasure package, applied in float64."""

    def __init__(self, hook: str, eraser, method: str = "leace"):
        super().__init__(hook, method, None)
        self.eraser = eraser
        self._on_device = {eraser.proj_left.device: eraser}

    def _eraser_on(self, device: torch.device):
        if device not in self._on_device:
            from concept_erasure import LeaceEraser

            bias = None if self.eraser.bias is None else self.eraser.bias.to(device)
            self._on_device[device] = LeaceEraser(self.eraser.proj_left.to(device),
                                                  self.eraser.proj_right.to(device), bias)
        return self._on_device[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._eraser_on(x.device)(x.to(torch.float64)).to(x.dtype)


class MeanDifferenceProjection(Edit):
    """x - ((x - centre) . v) v with v the unit class-mean difference: the classes' means become equal."""

    def __init__(self, hook: str, direction: torch.Tensor, centre: torch.Tensor, method: str = "mean_projection"):
        super().__init__(hook, method, None)
        self.direction, self.centre = direction.double(), centre.double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        direction, centre = self.direction.to(x.device), self.centre.to(x.device)
        along = (x64 - centre) @ direction  # [...]
        return (x64 - along[..., None] * direction).to(x.dtype)


def fit_leace(hook: str, activations: torch.Tensor, labels: torch.Tensor, method: str = "leace") -> LeaceEdit:
    """LEACE fitted on activations [n, d] with binary labels [n] (package defaults: affine, shrinkage)."""
    from concept_erasure import LeaceEraser

    eraser = LeaceEraser.fit(activations.detach().cpu().double(), labels.cpu().double()[:, None])
    return LeaceEdit(hook, eraser, method)


def class_means(activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over label 1, mean over label 0), each [d], in float64."""
    x = activations.detach().cpu().double()
    return x[labels == 1].mean(0), x[labels == 0].mean(0)


def fit_mean_projection(hook: str, activations: torch.Tensor, labels: torch.Tensor,
                        method: str = "mean_projection") -> MeanDifferenceProjection:
    """The projection removing the class-mean difference of activations [n, d], centred on their mean."""
    positive, negative = class_means(activations, labels)
    difference = positive - negative
    if difference.norm() == 0:
        raise ValueError(f"at {hook} the two classes have identical mean activations; nothing to project out")
    return MeanDifferenceProjection(hook, difference / difference.norm(), activations.detach().cpu().double().mean(0),
                                    method)


# ----------------------------------------------------------------------------------------------
# Feature selection


def activation_difference(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n_features]: |mean code over positive prompts - mean over negative prompts|, codes [n, n_features]."""
    positive, negative = class_means(codes, labels)
    return (positive - negative).abs()


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Feature indices, highest score first (ties by index, so the order is reproducible)."""
    return torch.sort(scores.double().cpu(), descending=True, stable=True).indices


def random_features(active: torch.Tensor, seed: int, hook: str) -> torch.Tensor:
    """The active feature indices in a random order fixed by (seed, hook); take the first k for k features."""
    pool = torch.nonzero(active.cpu()).flatten()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hook.encode()))
    return pool[torch.randperm(len(pool), generator=generator)]


# ----------------------------------------------------------------------------------------------
# Train-split statistics


@dataclass
class HookStatistics:
    """What the methods are fitted on at one hook, from the train split."""

    final_activations: torch.Tensor  # [n, d] at each prompt's final position
    labels: torch.Tensor  # [n]
    attribution: torch.Tensor  # [n_features]: mean predicted drop of the signed logit diff per removed feature
    position_activations: torch.Tensor  # [m, d] at every edited position of every prompt
    position_labels: torch.Tensor  # [m]: the label of the prompt each position belongs to
    active_features: torch.Tensor  # [n_features] bool: fired at some edited position of some prompt


def signed_logit_diffs(final_logits: torch.Tensor, labels: torch.Tensor, token_ids: tuple[int, int]) -> torch.Tensor:
    """[n]: logit of the prompt's own concept token minus the other side's (positive = correct)."""
    positive_id, negative_id = token_ids
    sign = labels.to(final_logits.device, final_logits.dtype) * 2 - 1
    return (final_logits[:, positive_id] - final_logits[:, negative_id]) * sign


def edited_positions(final_positions: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """[n, pos] mask of the edited prompt positions: start..final (BOS and padding excluded)."""
    positions = torch.arange(length)[None, :]
    return (positions >= start) & (positions <= final_positions[:, None])


def _gradient_hook(store: dict, name: str):
    """Adds a zero leaf to the activation so its gradient is d metric / d activation; keeps both."""

    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        delta = torch.zeros_like(activation, requires_grad=True)
        store[name] = (activation.detach(), delta)
        return activation + delta

    return hook


def collect_train_statistics(model, dictionaries: dict[str, Dictionary], concept: Concept, start: int,
                             batch_size: int = 16, progress: bool = True) -> dict[str, HookStatistics]:
    """One forward and backward pass over the train prompts: activations and feature attributions."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    device = next(model.parameters()).device
    finals_by_hook = {hook: [] for hook in dictionaries}
    positions_by_hook = {hook: [] for hook in dictionaries}
    position_labels = []
    attribution = {hook: torch.zeros(d.n_features, dtype=torch.float64, device=device)
                   for hook, d in dictionaries.items()}
    active = {hook: torch.zeros(d.n_features, dtype=torch.bool, device=device) for hook, d in dictionaries.items()}
    for begin in tqdm(range(0, len(prompts), batch_size), desc="fit (train split)", disable=not progress):
        batch_tokens, batch_finals = tokens[begin:begin + batch_size].to(device), finals[begin:begin + batch_size]
        rows, final_index = torch.arange(len(batch_finals), device=device), batch_finals.to(device)
        store: dict = {}
        with torch.enable_grad():
            logits = model.run_with_hooks(batch_tokens, fwd_hooks=[(h, _gradient_hook(store, h)) for h in dictionaries])
            metric = signed_logit_diffs(logits[rows, final_index], labels[begin:begin + batch_size], token_ids)
            metric.sum().backward()
        mask = edited_positions(batch_finals, batch_tokens.shape[1], start).to(device)
        position_labels.append(labels[begin:begin + batch_size, None].expand(mask.shape)[mask.cpu()])
        for hook, dictionary in dictionaries.items():
            activation, delta = store[hook]
            dictionary.check_input_width(activation.shape[-1], hook)
            finals_by_hook[hook].append(activation[rows, final_index].cpu())
            positions_by_hook[hook].append(activation[mask].cpu())
            with torch.no_grad():
                codes = dictionary.encode(activation)  # [b, pos, n_features]
                along = delta.grad @ dictionary.feature_directions.T  # [b, pos, n_features]
                attribution[hook] += (codes * along * mask[..., None]).sum((0, 1)).double()
                active[hook] |= (codes[mask] > 0).any(0)
    return {hook: HookStatistics(torch.cat(finals_by_hook[hook]), labels, (attribution[hook] / len(prompts)).cpu(),
                                 torch.cat(positions_by_hook[hook]), torch.cat(position_labels), active[hook].cpu())
            for hook in dictionaries}


# ----------------------------------------------------------------------------------------------
# Building the edits


def _check_ks(ks: Sequence[int], dictionaries: dict[str, Dictionary]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {ks}")
    for hook, dictionary in dictionaries.items():
        if ks[-1] > dictionary.n_features:
            raise ValueError(f"k={ks[-1]} exceeds the {dictionary.n_features} features of the dictionary at {hook}; "
                             "use smaller k values")
    return ks


def _check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown erasure method(s) {unknown}; choose among {', '.join(METHODS)}")
    return [method for method in METHODS if method in methods]


def feature_rankings(dictionary: Dictionary, statistics: HookStatistics, hook: str, seed: int,
                     methods: Sequence[str]) -> dict[str, tuple[Dictionary, torch.Tensor]]:
    """{method: (dictionary, feature indices in removal order)} for the k-swept methods."""
    final = statistics.final_activations.to(next(dictionary.parameters()).device)
    with torch.no_grad():
        codes = dictionary.encode(final).cpu()  # [n, n_features]
    rankings = {}
    if "sae_attribution" in methods:
        rankings["sae_attribution"] = (dictionary, ranked(statistics.attribution))
    if "sae_activation" in methods:
        rankings["sae_activation"] = (dictionary, ranked(activation_difference(codes, statistics.labels)))
    if "sae_random" in methods:
        rankings["sae_random"] = (dictionary, random_features(statistics.active_features, seed, hook))
    if "random_dictionary" in methods:
        basis = random_basis(dictionary.d_in, seed=seed, mean=statistics.final_activations.double().mean(0),
                             hook_name=hook).to(final.device)
        with torch.no_grad():
            basis_codes = basis.encode(final).cpu()
        rankings["random_dictionary"] = (basis, ranked(activation_difference(basis_codes, statistics.labels)))
    return rankings


def build_edits(dictionaries: dict[str, Dictionary], statistics: dict[str, HookStatistics], ks: Sequence[int],
                methods: Sequence[str] = METHODS, seed: int = 0) -> tuple[list[Edit], dict]:
    """Every (hook, method, k) edit, a clean identity per hook first; and the chosen features per method."""
    edits: list[Edit] = []
    chosen: dict = {}
    for hook, dictionary in dictionaries.items():
        stats = statistics[hook]
        edits.append(Edit(hook))
        rankings = feature_rankings(dictionary, stats, hook, seed, methods)
        chosen[hook] = {method: order[: max(ks)].tolist() for method, (_, order) in rankings.items()}
        for method, (source, order) in rankings.items():
            for k in ks:
                if k <= len(order):
                    edits.append(FeatureRemoval(hook, method, source, order[:k].tolist()))
                else:
                    warnings.warn(f"{hook}: {method} has only {len(order)} candidate features, skipping k={k}",
                                  stacklevel=2)
        fits = {"": (stats.final_activations, stats.labels),
                "_all_positions": (stats.position_activations, stats.position_labels)}
        for suffix, (activations, labels) in fits.items():
            if "leace" + suffix in methods:
                edits.append(fit_leace(hook, activations, labels, "leace" + suffix))
            if "mean_projection" + suffix in methods:
                edits.append(fit_mean_projection(hook, activations, labels, "mean_projection" + suffix))
    return edits, chosen


# ----------------------------------------------------------------------------------------------
# Evaluation


def _edit_hook(edit: Edit, start: int):
    return [] if edit.is_identity else [(edit.hook, replacement_hook(edit, start))]


@dataclass
class PromptResults:
    """Per edit, over one split's prompts."""

    signed_diffs: torch.Tensor  # [n] edited signed logit differences
    final_activations: torch.Tensor | None  # [n, d] edited activations at the final position
    edit_norm: float  # mean |x' - x| over edited positions
    activation_norm: float  # mean |x| over the same positions


@torch.no_grad()
def evaluate_on_prompts(model, edits: list[Edit], concept: Concept, start: int, batch_size: int = 16,
                        progress: bool = True) -> list[PromptResults]:
    """Run the clean and every edited model on a split's prompts (one clean pass per batch)."""
    token_ids = validate_concept(concept, model.tokenizer)
    prompts, labels = concept.prompts_and_labels()
    tokens, finals = tokenize_prompts(model.tokenizer, prompts)
    device = next(model.parameters()).device
    hooks = sorted({edit.hook for edit in edits})
    diffs, activations = [[] for _ in edits], [[] for _ in edits]
    norms = torch.zeros(len(edits), 2, dtype=torch.float64)  # summed |x' - x| and |x| over edited positions
    positions = 0
    starts = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(starts) * len(edits), desc=f"evaluate ({concept.split} split)", disable=not progress)
    for begin in starts:
        batch_tokens = tokens[begin:begin + batch_size].to(device)
        batch_finals = finals[begin:begin + batch_size].to(device)
        rows, batch_labels = torch.arange(len(batch_finals), device=device), labels[begin:begin + batch_size]
        clean_logits, cache = model.run_with_cache(batch_tokens, names_filter=hooks)
        mask = edited_positions(batch_finals.cpu(), batch_tokens.shape[1], start).to(device)
        positions += int(mask.sum())
        for index, edit in enumerate(edits):
            x = cache[edit.hook]
            edited = edit(x)  # what the hook writes (it leaves BOS alone, which the mask skips)
            norms[index, 0] += ((edited - x).norm(dim=-1) * mask).sum().item()
            norms[index, 1] += (x.norm(dim=-1) * mask).sum().item()
            activations[index].append(edited[rows, batch_finals].cpu())
            logits = (clean_logits if edit.is_identity
                      else model.run_with_hooks(batch_tokens, fwd_hooks=_edit_hook(edit, start)))
            diffs[index].append(signed_logit_diffs(logits[rows, batch_finals].float(), batch_labels, token_ids).cpu())
            bar.update(1)
    bar.close()
    return [PromptResults(torch.cat(diffs[i]), torch.cat(activations[i]), norms[i, 0].item() / positions,
                          norms[i, 1].item() / positions) for i in range(len(edits))]


@torch.no_grad()
def evaluate_on_text(model, edits: list[Edit], contexts: torch.Tensor, start: int, batch_size: int = 8,
                     progress: bool = True) -> tuple[float, list[tuple[float, float]]]:
    """Clean CE per token, and (CE, KL(clean || edited)) per token for each edit, on contexts [n, ctx]."""
    device = next(model.parameters()).device
    sums = torch.zeros(len(edits), 2, dtype=torch.float64)
    clean_ce, predicted = 0.0, 0
    starts = range(0, contexts.shape[0], batch_size)
    bar = tqdm(total=len(starts) * len(edits), desc="evaluate (held-out text)", disable=not progress)
    for begin in starts:
        tokens = contexts[begin:begin + batch_size].to(device)
        clean_logits = model(tokens)
        clean = _cross_entropy(clean_logits, tokens, start).item()
        clean_ce += clean
        predicted += tokens.shape[0] * (tokens.shape[1] - 1 - start)
        for index, edit in enumerate(edits):
            if edit.is_identity:
                sums[index, 0] += clean
            else:
                logits = model.run_with_hooks(tokens, fwd_hooks=_edit_hook(edit, start))
                sums[index, 0] += _cross_entropy(logits, tokens, start).item()
                sums[index, 1] += _kl_clean_to(clean_logits, logits, start).item()
            bar.update(1)
    bar.close()
    per_token = sums / max(predicted, 1)
    return clean_ce / max(predicted, 1), [(row[0].item(), row[1].item()) for row in per_token]


def probe_accuracies(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     seed: int = 0) -> tuple[float, float]:
    """(train, test) accuracy of a fresh standardised logistic-regression probe fitted on the train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    probe.fit(train_x.double().numpy(), train_y.numpy())
    return (float(probe.score(train_x.double().numpy(), train_y.numpy())),
            float(probe.score(test_x.double().numpy(), test_y.numpy())))


def removal(edited: torch.Tensor, clean: torch.Tensor) -> float:
    """1 - mean edited signed logit diff / mean clean one: 0 untouched, 1 no preference left, >1 reversed."""
    clean_mean = clean.mean().item()
    return 1.0 - edited.mean().item() / clean_mean if clean_mean != 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# Running the experiment


def subsample_concept(concept: Concept, per_side: int | None, seed: int = 0) -> Concept:
    """At most `per_side` prompts per side, drawn at random (seeded); None keeps every prompt."""
    if per_side is None:
        return concept
    if per_side < 1:
        raise ValueError(f"prompts per side must be at least 1, got {per_side}")
    generator = torch.Generator().manual_seed(seed)

    def pick(prompts: list[str]) -> list[str]:
        order = torch.randperm(len(prompts), generator=generator)[:per_side].sort().values
        return [prompts[i] for i in order]

    return Concept(concept.name, pick(concept.positive_prompts), pick(concept.negative_prompts),
                   concept.positive_token, concept.negative_token, concept.split,
                   list(concept.positive_subjects), list(concept.negative_subjects))


def validate_inputs(model, dictionaries: dict[str, Dictionary], concept_splits: ConceptSplits) -> None:
    """Every check that needs no compute: the concept splits, the hooks and the dictionary widths."""
    if len(concept_splits) != 3 or concept_splits[0] is None or concept_splits[1] is None:
        raise ConceptError("concept_splits must be (train, test, transfer) with train and test given "
                           "(transfer may be None)")
    for concept in concept_splits:
        if concept is not None:
            validate_concept(concept, model.tokenizer)
    if not dictionaries:
        raise ValueError("no dictionaries given; pass at least one {hook: dictionary}")
    validate_hooks(model, list(dictionaries))
    for hook, dictionary in dictionaries.items():
        width = hook_width(model, hook)
        if width is not None and width != dictionary.d_in:
            raise ValueError(f"the dictionary for {hook} has d_in={dictionary.d_in} but this model's {hook} has "
                             f"width {width}; use dictionaries trained on this model")


def held_out_contexts(model, ce_tokens: int | torch.Tensor, corpus: str, context_size: int, seed: int) -> torch.Tensor:
    """Held-out corpus text (split "eval") as contexts [n, context_size], or the given token tensor."""
    if isinstance(ce_tokens, torch.Tensor):
        return ce_tokens
    from sae.corpus import CorpusError, load_corpus, tokenize_contexts

    n_contexts = max(1, -(-int(ce_tokens) // context_size))
    text = load_corpus(corpus)
    try:
        return tokenize_contexts(text, model.tokenizer, context_size, n_contexts, split="eval", seed=seed)
    except CorpusError:  # a small local corpus may have no held-out documents: the dictionaries never saw it
        warnings.warn(f"corpus {corpus!r} has no held-out ('eval') documents; measuring damage on all of it",
                      stacklevel=2)
        return tokenize_contexts(text, model.tokenizer, context_size, n_contexts, split="all", seed=seed)


def result_rows(edits: list[Edit], statistics: dict[str, HookStatistics], test: list[PromptResults],
                transfer: list[PromptResults] | None, text: tuple[float, list], test_labels: torch.Tensor,
                seed: int, device: torch.device | str = "cpu") -> list[dict]:
    """One table row per edit (see the module docstring for the metrics)."""
    clean_ce, per_edit = text
    clean_index = {edit.hook: index for index, edit in enumerate(edits) if edit.is_identity}
    rows = []
    for index, edit in enumerate(edits):
        clean = clean_index[edit.hook]
        stats = statistics[edit.hook]
        with torch.no_grad():
            train_x = edit(stats.final_activations.to(device)).cpu()
        probe_train, probe_test = probe_accuracies(train_x, stats.labels, test[index].final_activations, test_labels,
                                                   seed)
        ce, kl = per_edit[index]
        rows.append({
            "hook": edit.hook, "method": edit.method, "k": edit.k,
            "removal": removal(test[index].signed_diffs, test[clean].signed_diffs),
            "logit_diff": test[index].signed_diffs.mean().item(),
            "concept_accuracy": (test[index].signed_diffs > 0).float().mean().item(),
            "transfer_removal": (removal(transfer[index].signed_diffs, transfer[clean].signed_diffs)
                                 if transfer is not None else float("nan")),
            "probe_accuracy": probe_test, "probe_train_accuracy": probe_train,
            "edit_norm": test[index].edit_norm,
            "relative_edit_norm": test[index].edit_norm / max(test[index].activation_norm, 1e-30),
            "kl": kl, "ce_delta": ce - clean_ce, "ce_loss": ce,
        })
    return rows


def erasure_table(rows: list[dict]):
    """The rows as a pandas DataFrame with the documented columns (k empty for LEACE, projection, clean)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def format_erasure_table(frame) -> str:
    return frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")


def plot_erasure(frame, path: Path) -> Path:
    """Removal (left) and probe accuracy (right) against KL on held-out text, one row of panels per hook."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(dict.fromkeys(frame["hook"]))
    figure, axes = plt.subplots(len(hooks), 2, figsize=(11, 4 * len(hooks)), squeeze=False)
    markers = dict(zip(METHODS, "osv^DPXh"))
    for row, hook in zip(axes, hooks):
        part = frame[(frame["hook"] == hook) & (frame["method"] != "clean")]
        for axis, metric in zip(row, ("removal", "probe_accuracy")):
            for method, group in part.groupby("method", sort=False):
                group = group.sort_values("k")
                kl = group["kl"].clip(lower=1e-6)
                swept = method in K_METHODS
                axis.plot(kl, group[metric], marker=markers.get(method, "o"), label=method,
                          linestyle="-" if swept else "none", markersize=6 if swept else 9)
                if method in K_METHODS:
                    for x, y, k in zip(kl, group[metric], group["k"]):
                        axis.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            axis.set_xscale("log")
            axis.set_xlabel("KL(clean || edited) per token on held-out text")
            axis.set_ylabel({"removal": "removal (1 = logit difference gone)",
                             "probe_accuracy": "fresh probe accuracy (test split)"}[metric])
            axis.set_title(f"{hook}: {metric.replace('_', ' ')}")
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def run_erasure(model, dictionaries: dict[str, Dictionary], concept_splits: ConceptSplits, out_dir: str | Path,
                ks: Sequence[int] = (1, 4, 16), ce_tokens: int | torch.Tensor = 512, seed: int = 0,
                progress: bool = True, methods: Sequence[str] = METHODS, prompts_per_side: int | None = 16,
                corpus: str = "registry", context_size: int = 64, batch_size: int = 16,
                transfer: bool = True) -> dict[str, str]:
    """Fit every method on the train split, measure on test (and transfer) and held-out text; write the table.

    Writes OUT/erasure.csv, OUT/erasure.png and OUT/erasure.json (settings, clean numbers, chosen
    features); returns {"csv", "plot", "json"} paths. `prompts_per_side` subsamples the test and
    transfer splits (the train split is fitted whole, in one forward and backward pass). Cost: one
    forward per edit over the test (and transfer) prompts and the `ce_tokens` of held-out text, with
    hooks x (4 x len(ks) + 4) edits.
    """
    validate_inputs(model, dictionaries, concept_splits)  # before any compute
    ks, methods = _check_ks(ks, dictionaries), _check_methods(methods)
    train, test, transfer_split = concept_splits
    test = subsample_concept(test, prompts_per_side, seed)
    transfer_split = subsample_concept(transfer_split, prompts_per_side, seed) if transfer and transfer_split else None
    device = next(model.parameters()).device
    in_order = sorted(dictionaries, key=lambda hook: (layer_of_hook(hook) is None, layer_of_hook(hook) or 0, hook))
    dictionaries = {hook: dictionaries[hook].to(device).eval() for hook in in_order}
    start = 1 if model.tokenizer.bos_token_id is not None else 0
    contexts = held_out_contexts(model, ce_tokens, corpus, context_size, seed)

    statistics = collect_train_statistics(model, dictionaries, train, start, batch_size, progress)
    edits, chosen = build_edits(dictionaries, statistics, ks, methods, seed)
    test_results = evaluate_on_prompts(model, edits, test, start, batch_size, progress)
    transfer_results = (evaluate_on_prompts(model, edits, transfer_split, start, batch_size, progress)
                        if transfer_split is not None else None)
    text = evaluate_on_text(model, edits, contexts, start, max(1, batch_size // 2), progress)
    frame = erasure_table(result_rows(edits, statistics, test_results, transfer_results, text,
                                      test.prompts_and_labels()[1], seed, device))
    settings = {"concept": train.name, "seed": seed, "ks": ks, "methods": methods, "hooks": list(dictionaries),
                "prompts": {split.split: len(split.prompts_and_labels()[1])
                            for split in (train, test, transfer_split) if split is not None},
                "held_out_tokens": int(contexts.numel()), "clean_ce_loss": text[0],
                "edited_positions": "every position but BOS" if start else "every position",
                "fitted_at": "train split, final prompt position (every edited position for *_all_positions)",
                "chosen_features": chosen}
    return write_results(frame, Path(out_dir), settings, progress)


def write_results(frame, out_dir: Path, settings: dict, progress: bool = True) -> dict[str, str]:
    """OUT/erasure.csv, OUT/erasure.png and OUT/erasure.json, each written atomically; prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "erasure.csv", "plot": out_dir / "erasure.png", "json": out_dir / "erasure.json"}
    atomic_write_text(paths["csv"], frame.to_csv(index=False))
    plot_erasure(frame, paths["plot"])
    atomic_write_text(paths["json"], json.dumps(settings, indent=2) + "\n")
    if progress:
        print(format_erasure_table(frame))
        for name, path in paths.items():
            print(f"wrote {path}")
    return {name: str(path) for name, path in paths.items()}


# ----------------------------------------------------------------------------------------------
# Concepts by name or from a file


def load_concept_splits(spec: str, tokenizer, seed: int = 0, n_shots_per_side: int = 2) -> ConceptSplits:
    """`gender` (built in) or a JSON file: {"name", "positive_token", "negative_token", "train": {"positive":
    [...], "negative": [...]}, "test": {...}, optional "transfer": {... and optional tokens}}."""
    if spec == "gender":
        return gender_concept(tokenizer, seed=seed, n_shots_per_side=n_shots_per_side)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConceptError(f"unknown concept {spec!r}: use 'gender' or a JSON file of prompts (see "
                           "tasks.erasure.load_concept_splits)")
    try:
        data = json.loads(path.read_text())
        name = data.get("name", path.stem)
        positive_token, negative_token = data["positive_token"], data["negative_token"]
        splits = {}
        for split in ("train", "test", "transfer"):
            if split not in data:
                continue
            part = data[split]
            splits[split] = Concept(name, list(part["positive"]), list(part["negative"]),
                                    part.get("positive_token", positive_token),
                                    part.get("negative_token", negative_token), split)
        return ConceptSplits(splits["train"], splits["test"], splits.get("transfer"))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConceptError(f"{path} is not a concept file ({type(error).__name__}: {error}); it needs "
                           "positive_token, negative_token, and train/test objects with positive and negative "
                           "prompt lists") from error
