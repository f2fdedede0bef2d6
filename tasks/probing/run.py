"""Sparse probing of every basis at every hook: harvest once, fit baselines on the train tokens, probe.

For each hook, each basis (the SAEs given, and baselines fitted on the same train tokens), each label
and each k: the k best directions by the train split's class separation (fit.separation_scores), a
logistic regression on them, F1 and AUC on held-out tokens, with bootstrap intervals over held-out
sentences (scores.resample_weights; the same resamples everywhere, so means over labels and the
differences between bases are paired).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from circuits.hooks import check_width, sorted_hooks, validate_hooks
from circuits.models import model_name_of
from sae.dictionary import Dictionary
from sae.progress import progress_bar, status
from sae.tagged_corpus import TaggedTokens
from tasks.probing.codes import basis_codes, labelled_activations, n_directions
from tasks.probing.fit import fit_probe, separation_scores, top_directions
from tasks.probing.labels import ProbeLabel, check_label_counts
from tasks.probing.scores import f1_scores, interval, plain_weights, precision_recall, resample_weights, roc_auc

PROBE_BASELINES = ("neurons", "pca", "ica", "random")
DEFAULT_KS = (1, 2, 4, 8, 16)


class ProbeInputError(ValueError):
    """Dictionaries or settings that cannot be probed on this model; the message says what to do."""


@dataclass(frozen=True)
class ProbeSettings:
    ks: tuple[int, ...] = DEFAULT_KS
    resamples: int = 500  # bootstrap resamples of held-out sentences
    selection: str = "normalised"  # fit.SELECTIONS
    seed: int = 0
    batch_size: int = 16


@dataclass
class ProbeResults:
    rows: list[dict]  # one per (hook, basis, label, k)
    f1_samples: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # -> [L, B]
    auc_samples: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # -> [L, B]
    kinds: dict[str, str] = field(default_factory=dict)  # basis -> "sae" or "baseline"
    counts: dict[str, int] = field(default_factory=dict)  # train / held-out tokens and sentences
    labels: list[ProbeLabel] = field(default_factory=list)


def validate_dictionaries(model, saes: dict[str, dict[str, Dictionary]], ks: tuple[int, ...]) -> list[str]:
    """The hooks to probe (every SAE's), after checking each SAE was trained on this model, at a hook it has,
    with the width there, and that every k fits every basis."""
    if not saes:
        raise ProbeInputError("no dictionaries given: pass at least one SAE folder")
    name = model_name_of(model)
    for basis, by_hook in saes.items():
        for hook, dictionary in by_hook.items():
            trained_on = dictionary.cfg.model_name
            if trained_on and trained_on != name:
                raise ProbeInputError(f"dictionary {basis} at '{hook}' was trained on model {trained_on!r}, not "
                                      f"{name!r}: its features mean nothing here; give --model {trained_on} or "
                                      "dictionaries trained on this model")
    hooks = sorted_hooks({hook for by_hook in saes.values() for hook in by_hook})
    validate_hooks(model, hooks)
    for basis, by_hook in saes.items():
        for hook, dictionary in by_hook.items():
            check_width(model, hook, dictionary.d_in)
            if max(ks) > n_directions(dictionary):
                raise ProbeInputError(f"k={max(ks)} is more than the {n_directions(dictionary)} features of "
                                      f"{basis} at '{hook}'; give smaller --ks")
    if max(ks) > model.cfg.d_model:
        raise ProbeInputError(f"k={max(ks)} is more than the model's {model.cfg.d_model} dimensions (the baselines' "
                              "directions); give smaller --ks")
    return hooks


def probe_basis(train_codes: torch.Tensor, train_y: torch.Tensor, test_codes: torch.Tensor, test_y: torch.Tensor,
                weights: torch.Tensor, settings: ProbeSettings) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Rows (label index, k, scores) and F1 / AUC bootstrap samples [len(ks), L, B] of one basis at one hook."""
    ks = sorted(settings.ks)
    chosen = top_directions(separation_scores(train_codes, train_y, settings.selection), ks[-1])  # [L, k_max]
    rows = []
    f1_samples = torch.zeros(len(ks), train_y.shape[1], weights.shape[1])
    auc_samples = torch.zeros_like(f1_samples)
    ones = plain_weights(test_codes.shape[0])
    for label in range(train_y.shape[1]):
        for index, k in enumerate(ks):
            probe = fit_probe(train_codes, train_y[:, label], chosen[label, :k], seed=settings.seed)
            scores, predicted, actual = probe.scores(test_codes), probe.predict(test_codes), test_y[:, label]
            f1_samples[index, label] = f1_scores(weights, predicted, actual).float()
            auc_samples[index, label] = roc_auc(weights, scores, actual).float()
            precision, recall = precision_recall(predicted, actual)
            rows.append({"label_index": label, "k": k, "f1": float(f1_scores(ones, predicted, actual)[0]),
                         "auc": float(roc_auc(ones, scores, actual)[0]), "precision": precision, "recall": recall,
                         "directions": " ".join(str(int(i)) for i in chosen[label, :k])})
    return rows, f1_samples, auc_samples


def fit_probe_baselines(model, hook: str, names: list[str], train_activations: torch.Tensor, seed: int,
                        progress: bool) -> dict[str, Dictionary]:
    """The baselines `names` at `hook`, fitted on the train tokens' activations (tasks.ioi.baselines settings)."""
    from tasks.ioi.baselines import build_baselines

    unknown = [name for name in names if name not in PROBE_BASELINES]
    if unknown:
        raise ProbeInputError(f"unknown baseline(s) {', '.join(unknown)}; choose among {', '.join(PROBE_BASELINES)}")
    return build_baselines(model, hook, names, train_activations.shape[0], None, seed=seed,
                           activations=train_activations, progress=progress)


def run_probing(model, saes: dict[str, dict[str, Dictionary]], tagged: TaggedTokens, labels: list[ProbeLabel], *,
                baselines: tuple[str, ...] | list[str] = PROBE_BASELINES, settings: ProbeSettings = ProbeSettings(),
                progress: bool = True) -> ProbeResults:
    """Probe every SAE (`saes`: {basis name: {hook: dictionary}}) and baseline at every SAE hook (see module)."""
    hooks = validate_dictionaries(model, saes, tuple(settings.ks))
    if not labels:
        raise ProbeInputError("the label set is empty: give at least one tag or concept")
    activations, kept = labelled_activations(model, tagged, hooks, batch_size=settings.batch_size, progress=progress)
    tagged = tagged.subset(kept)
    held = tagged.held_out
    train_tags = [tag for tag, test in zip(tagged.tags, held.tolist()) if not test]
    test_tags = [tag for tag, test in zip(tagged.tags, held.tolist()) if test]
    check_label_counts(labels, train_tags, test_tags)
    train_y = torch.stack([label.of(train_tags) for label in labels], dim=1)  # [n_train, L]
    test_y = torch.stack([label.of(test_tags) for label in labels], dim=1)
    weights = resample_weights(tagged.sentences[held], settings.resamples, settings.seed)
    results = ProbeResults([], labels=labels, counts={
        "train_tokens": int((~held).sum()), "held_out_tokens": int(held.sum()),
        "train_sentences": len(set(tagged.sentences[~held].tolist())),
        "held_out_sentences": len(set(tagged.sentences[held].tolist())), "passed_through": int((~kept).sum())})
    for hook in hooks:
        train_x, test_x = activations[hook][~held], activations[hook][held]
        bases = {name: by_hook[hook] for name, by_hook in saes.items() if hook in by_hook}
        results.kinds.update({name: "sae" for name in bases})
        fitted = fit_probe_baselines(model, hook, list(baselines), train_x, settings.seed, progress)
        results.kinds.update({name: "baseline" for name in fitted})
        for name, dictionary in progress_bar({**bases, **fitted}.items(), desc=f"probes at {hook}", unit="basis",
                                             enabled=progress):
            started = time.perf_counter()
            rows, f1s, aucs = probe_basis(basis_codes(dictionary, train_x), train_y, basis_codes(dictionary, test_x),
                                          test_y, weights, settings)
            for row in rows:
                label = labels[row.pop("label_index")]
                row.update({"hook": hook, "basis": name, "kind": results.kinds[name], "label": label.name,
                            "n_directions": n_directions(dictionary),
                            "train_positives": int(label.of(train_tags).sum()),
                            "held_out_positives": int(label.of(test_tags).sum())})
                samples = f1s[sorted(settings.ks).index(row["k"]), labels.index(label)]
                row["f1_lo"], row["f1_hi"] = interval(samples)
                row["auc_lo"], row["auc_hi"] = interval(aucs[sorted(settings.ks).index(row["k"]), labels.index(label)])
                results.rows.append(row)
            for index, k in enumerate(sorted(settings.ks)):
                results.f1_samples[(hook, name, k)] = f1s[index]
                results.auc_samples[(hook, name, k)] = aucs[index]
            status(f"probing: {name} at {hook}: {len(labels)} labels x {len(settings.ks)} k in "
                   f"{time.perf_counter() - started:.1f} s", progress)
    return results
