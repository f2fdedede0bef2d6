"""Build a feature dashboard site for a dictionary, or for a baseline basis (neurons, PCA, ICA) fitted on
the same held-out text: one pass over the text, then the site (circuits.dashboard)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

BASELINES = ("neurons", "pca", "ica")


@dataclass
class DashboardResult:
    out: Path
    n_features: int  # features with a page
    n_tokens: int
    n_contexts: int
    timings: dict  # phase -> seconds


def select_dictionary(folder: Path, hook: str | None):
    """The one dictionary in `folder` (or the one at `hook` when it holds several), width-checked later."""
    from sae.io import find_dictionary_folders, load_dictionary, read_dictionary_config

    folders = find_dictionary_folders(folder)
    configs = {read_dictionary_config(each).hook_name: each for each in folders}
    if hook is None:
        if len(configs) != 1:
            raise ValueError(f"--sae {folder} holds dictionaries at {len(configs)} hooks ({', '.join(sorted(configs))}); "
                             "choose one with --hook")
        hook = next(iter(configs))
    if hook not in configs:
        raise ValueError(f"--hook {hook}: --sae {folder} has no dictionary there; it holds {', '.join(sorted(configs))}")
    return configs[hook], load_dictionary(configs[hook])


def held_out_tokens(model, corpus, tokens: int, context_size: int, seed: int):
    """[n, context_size] held-out contexts (the corpus's eval split) covering about `tokens` tokens."""
    from sae.corpus import tokenize_contexts

    n_contexts = max(1, -(-tokens // (context_size - 1)))
    return tokenize_contexts(corpus, model.tokenizer, context_size, n_contexts, split="eval", seed=seed)


def fit_baseline_dictionary(model, name: str, hook: str, contexts, *, fit_tokens: int, batch_size: int = 8,
                            seed: int = 0, progress: bool = True):
    """The baseline `name` fitted on the activations at `hook` of (the first `fit_tokens` tokens of) the contexts,
    passed-through positions left out, as every consumer of the engine does."""
    import torch

    from circuits.engine import passthrough_positions
    from circuits.harvest import collect_activations
    from circuits.hooks import validate_hooks
    from circuits.models import model_name_of
    from sae.baselines import fit_baseline
    from sae.progress import progress_bar, status

    validate_hooks(model, [hook])
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    device = next(model.parameters()).device
    rows = []
    n_contexts = min(len(contexts), max(1, -(-fit_tokens // (contexts.shape[1] - 1))))
    with torch.no_grad():
        for start in progress_bar(range(0, n_contexts, batch_size), desc=f"dashboard: activations for {name}",
                                  unit="batch", enabled=progress):
            batch = contexts[start : min(start + batch_size, n_contexts)].to(device)
            activation = collect_activations(model, batch, [hook])[hook].float()
            rows.append(activation[~passthrough_positions(activation)].cpu())
    activations = torch.cat(rows)[:fit_tokens]
    status(f"dashboard: fitting {name} on {len(activations):,} activations of width {activations.shape[1]}"
           + (" (FastICA: minutes at d_model 576)" if name == "ica" else ""), enabled=progress)
    return fit_baseline(name, activations, seed, hook_name=hook, model_name=model_name_of(model))


def parse_features(spec: str, n_features: int) -> list[int] | str | None:
    """--features: None for all, "auto" (the features that fired), or the list of indices (checked)."""
    from sparse_circuits.validation import feature_selection

    return feature_selection(spec, n_features)


def build_dashboard(model, dictionary, corpus, out: Path, *, source: str, features: str = "all", tokens: int = 100_000,
                    context_size: int = 64, batch_size: int = 8, top_k: int = 20, seed: int = 0,
                    title: str | None = None, contexts=None, progress: bool = True) -> DashboardResult:
    """Collect statistics for the selected features over held-out text and write the site into `out`."""
    import torch

    from circuits.dashboard import (CollectionSettings, SiteInfo, check_site_folder, collect_feature_statistics,
                                    logit_effects, nearest_features, write_site)
    from circuits.hooks import check_width
    from circuits.models import model_name_of, provenance

    hook = dictionary.cfg.hook_name
    check_width(model, hook, dictionary.cfg.d_in)  # a dictionary of another model: refused before the long run
    selection = parse_features(features, dictionary.n_features)
    check_site_folder(out)
    timings, started = {}, time.perf_counter()
    if contexts is None:
        contexts = held_out_tokens(model, corpus, tokens, context_size, seed)
    timings["tokenize"] = time.perf_counter() - started
    chosen = None if selection in (None, "auto") else torch.tensor(selection, dtype=torch.long)
    settings = CollectionSettings(top_k=top_k, seed=seed)
    started = time.perf_counter()
    statistics = collect_feature_statistics(model, dictionary, contexts, chosen, settings=settings,
                                            batch_size=batch_size, progress=progress)
    timings["collect"] = time.perf_counter() - started
    started = time.perf_counter()
    directions = dictionary.feature_directions.detach().float().cpu()
    effects = logit_effects(model, directions[statistics.features])
    neighbours = nearest_features(directions, statistics.features)
    timings["effects"] = time.perf_counter() - started
    pages = statistics.features.tolist()
    if selection == "auto":
        pages = [feature for feature, fired in zip(pages, statistics.fired.tolist()) if fired > 0]
    info = SiteInfo(title=f"Feature dashboard: {title or source} at {hook}", hook=hook, model=model_name_of(model),
                    source=source, n_features_total=dictionary.n_features,
                    provenance=provenance(model, {hook: dictionary}, seed))
    started = time.perf_counter()
    write_site(out, statistics, info=info, tokenizer=model.tokenizer, effects=effects, neighbours=neighbours,
               pages=pages, progress=progress)
    timings["write"] = time.perf_counter() - started
    return DashboardResult(Path(out), len(pages), statistics.n_tokens, statistics.n_contexts, timings)
