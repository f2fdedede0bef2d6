"""The paper's comparison decompositions for the IOI benchmark, fitted on activations at the hook.

pca, ica, neurons and random are complete signed bases (sae/baselines.py); dense is a ReLU autoencoder
trained with alpha = 0 (no sparsity), briefly. Activations come from an activation store when one
holds enough tokens (`activations_from_store`), else from a forward pass over corpus text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from sae.dictionary import Dictionary
from sae.progress import status

BASELINE_NAMES = ("pca", "ica", "neurons", "random", "dense")


@dataclass(frozen=True)
class BaselineSettings:
    """How the baselines are fitted (seed aside).

    ratio / tied / dense_epochs: the dense autoencoder's width (x d_model), weight tying and passes over
    the activations. ICA is fitted on at most `ica_tokens` rows with at most `ica_max_iter` iterations
    (complete on 576 dimensions it otherwise takes half an hour on a CPU); unconverged, it is still an
    exact basis (sae/baselines.py warns).
    """

    ratio: int = 4
    tied: bool = True
    dense_epochs: float = 4.0
    ica_tokens: int = 4000
    ica_max_iter: int = 100


def activations_for_baselines(model, hook: str, n_tokens: int, corpus, *, seed: int = 0, context_size: int = 128,
                              batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """[n_tokens, d] activations at `hook` from the corpus train split (BOS positions left out)."""
    from circuits.harvest import collect_activations
    from sae.corpus import tokenize_contexts
    from sae.progress import progress_bar

    n_contexts = math.ceil(n_tokens / (context_size - 1))
    contexts = tokenize_contexts(corpus, model.tokenizer, context_size, n_contexts, split="train", seed=seed)
    device = next(model.parameters()).device
    pieces = []
    with torch.inference_mode():
        for start in progress_bar(range(0, contexts.shape[0], batch_size), desc="activations for baselines",
                                  enabled=progress):
            values = collect_activations(model, contexts[start : start + batch_size].to(device), [hook])[hook]
            pieces.append(values[:, 1:].reshape(-1, values.shape[-1]).float().cpu())
    return torch.cat(pieces)[:n_tokens]


def activations_from_store(store_dir: str | Path, hook: str, n_tokens: int) -> torch.Tensor | None:
    """The first `n_tokens` activations at `hook` of an activation store, or None if it lacks them."""
    from sae.activation_store import ActivationStore, StoreError

    try:
        store = ActivationStore(store_dir)
        store.d_in(hook)
    except (StoreError, FileNotFoundError):
        return None
    if store.n_tokens < n_tokens:
        return None
    pieces, total = [], 0
    for index in range(len(store.shards)):
        pieces.append(store.read_shard(index, [hook])[hook].float())
        total += pieces[-1].shape[0]
        if total >= n_tokens:
            break
    return torch.cat(pieces)[:n_tokens]


def check_baseline_names(names: Iterable[str]) -> list[str]:
    """The distinct names, stripped, in order; unknown ones are rejected with the valid choices."""
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINE_NAMES)}")
    return names


def build_baselines(model, hook: str, names: Iterable[str], n_tokens: int, corpus, *, seed: int = 0,
                    settings: BaselineSettings | None = None, activations: torch.Tensor | None = None,
                    out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Dictionary]:
    """The baselines `names` (of BASELINE_NAMES) at `hook`, fitted on `n_tokens` corpus activations.

    `activations` [n, d] skips harvesting (then `n_tokens` and `corpus` are unused); `out_dir` keeps the
    dense autoencoder's training folder.
    """
    import tempfile

    from circuits.models import model_name_of
    from sae.baselines import BASELINES, fit_baseline, fit_ica

    settings = settings or BaselineSettings()
    names = check_baseline_names(names)
    if not names:
        return {}
    if activations is None:
        activations = activations_for_baselines(model, hook, n_tokens, corpus, seed=seed, progress=progress)
    model_name = model_name_of(model)
    built: dict[str, Dictionary] = {}
    for name in names:
        started = time.perf_counter()
        if name == "ica":  # FastICA costs ~d^2 per row per iteration: a subsample and an iteration cap keep it short
            rows = activations[torch.randperm(activations.shape[0], generator=torch.Generator().manual_seed(seed))
                               [: settings.ica_tokens]]
            built[name] = fit_ica(rows, seed=seed, hook_name=hook, model_name=model_name,
                                  max_iter=settings.ica_max_iter)
        elif name in BASELINES:
            built[name] = fit_baseline(name, activations, seed=seed, hook_name=hook, model_name=model_name)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                folder = Path(out_dir) if out_dir is not None else Path(scratch)
                built[name] = train_dense_autoencoder(activations, hook, folder, model_name=model_name,
                                                      settings=settings, seed=seed, progress=progress)
        status(f"baselines: {name} fitted on {activations.shape[0]:,} activations in "
               f"{time.perf_counter() - started:.1f} s", progress)
    return built


def train_dense_autoencoder(activations: torch.Tensor, hook: str, out_dir: Path, *, model_name: str = "",
                            settings: BaselineSettings | None = None, seed: int = 0,
                            progress: bool = True) -> Dictionary:
    """The non-sparse baseline: the paper's autoencoder with alpha = 0 (no L1), trained briefly."""
    from sae.batches import TensorBatchSource
    from sae.config import DictionaryConfig
    from sae.training import TrainingConfig, train_dictionaries

    settings = settings or BaselineSettings()
    d_in = activations.shape[1]
    batch_size = min(1024, activations.shape[0])
    config = DictionaryConfig("standard", d_in=d_in, d_sae=settings.ratio * d_in, hook_name=hook,
                              model_name=model_name, l1_coefficient=0.0, tied=settings.tied, seed=seed,
                              extra={"method": "dense"})
    training = TrainingConfig(total_tokens=int(settings.dense_epochs * activations.shape[0]), batch_size=batch_size,
                              lr=1e-3, seed=seed, checkpoint_every=None, log_every=25,
                              dead_window_tokens=activations.shape[0])
    result = train_dictionaries(TensorBatchSource({hook: activations}), [config], training, out_dir,
                                names=["dense"], progress=progress)[0]
    return result.dictionary.eval()
