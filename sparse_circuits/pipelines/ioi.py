"""The IOI feature-patching benchmark as the command runs it: an SAE given, found in the cache or trained
there first, and baselines fitted once per output folder and reused (OUT/baselines/).

With no SAE given it runs at blocks.{0.6 n_layers}.hook_resid_post (blocks.18 of SmolLM2's 30), with an
SAE found in the cache (`<cache>/ioi/saes/<hook>` or the demo's) or trained there first (100k tokens,
16 epochs: 10-20 minutes on a 2-core CPU, once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from circuits.hooks import hook_width, validate_hooks
from circuits.models import model_name_of
from sae.assets import atomic_write_text, cache_dir
from sae.corpus import load_corpus
from sae.io import find_dictionary_folders, load_dictionary, read_dictionary_config, save_dictionary
from sae.locking import folder_lock
from sparse_circuits.defaults import (IOI_BASELINES, IOI_TRAIN_EPOCHS, IOI_TRAIN_L1, IOI_TRAIN_LR,
                                      IOI_TRAIN_TOKENS)
from sparse_circuits.pipelines.train import TrainRequest, dictionary_folder_problem, reuse_mismatch, train_on_model
from tasks.ioi import (BASELINE_NAMES, BaselineSettings, SearchSettings, activations_from_store, build_baselines,
                       generate_ioi_prompts, run_ioi_benchmark)


@dataclass
class IOIRequest:
    """What `sparse-circuits ioi` asks for (the search settings are the benchmark's own)."""

    sae: Path | None = None  # a dictionary folder or a parent of several; None: cached, else trained
    hook: str | None = None  # None: the SAE's, else default_hook(model)
    prompts: int = 50
    baselines: list[str] = field(default_factory=lambda: list(IOI_BASELINES))
    baseline_tokens: int = 20_000
    corpus: str = "registry"  # text for fitting baselines / training an SAE (when no activation store)
    names: list[str] | None = None  # IO/S names, each one token
    templates: list[str] | None = None  # IOI templates ({A} {B} {S} {PLACE} {OBJECT}); None: the built-in ones
    train_tokens: int = IOI_TRAIN_TOKENS
    seed: int = 0
    out: Path | None = None  # None: <cache>/ioi/<hook>
    settings: SearchSettings = field(default_factory=SearchSettings)
    drop_failed: bool = True  # prompts the model gets wrong are dropped (and counted in details.json)


def check_baseline_names(names: list[str]) -> None:
    """Fail before loading anything when a baseline name is unknown."""
    unknown = [name for name in names if name not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINE_NAMES)} or 'none'")


def default_hook(model) -> str:
    """A middle-to-late residual stream hook: blocks.{round(0.6 n_layers)}.hook_resid_post."""
    return f"blocks.{min(model.cfg.n_layers - 1, round(0.6 * model.cfg.n_layers))}.hook_resid_post"


def cached_sae_folder(hook: str, model_name: str, request: TrainRequest | None = None) -> Path | None:
    """An SAE for `hook` of this model trained earlier by this command (as `request` asks, when given) or by
    the demo, if one is complete there; a folder that does not qualify is named in a note and skipped."""
    for parent, wanted in ((cache_dir() / "ioi" / "saes", request), (cache_dir() / "demo" / "saes", None)):
        folder = parent / hook
        if not folder.exists():
            continue
        problem = (reuse_mismatch(folder, wanted, hook=hook, model_name=model_name) if wanted is not None
                   else dictionary_folder_problem(folder, hook=hook, model_name=model_name))
        if problem is None:
            return folder
        print(f"note: not reusing the cached SAE: {problem}")
    return None


def sae_folders_for(path: Path, hook: str | None) -> tuple[list[Path], str]:
    """The dictionary folders under `path` at `hook` (or at the only hook there), and that hook."""
    folders = find_dictionary_folders(path)
    if not folders:
        raise FileNotFoundError(f"no dictionary (sae_weights.safetensors + cfg.json) in or under {path}")
    hooks = {folder: read_dictionary_config(folder).hook_name for folder in folders}
    if hook is None:
        distinct = sorted(set(hooks.values()))
        if len(distinct) != 1:
            raise ValueError(f"{path} holds dictionaries for several hooks {distinct}; choose one with --hook")
        hook = distinct[0]
    chosen = [folder for folder in folders if hooks[folder] == hook]
    if not chosen:
        raise ValueError(f"no dictionary for hook '{hook}' under {path}; it has {sorted(set(hooks.values()))}")
    return chosen, hook


def default_sae_request(hook: str, tokens: int, seed: int) -> TrainRequest:
    """The command's default SAE: tied ReLU, ratio 4, alpha IOI_TRAIN_L1."""
    return TrainRequest(hooks=[hook], tokens=tokens, epochs=IOI_TRAIN_EPOCHS, l1_coefficients=[IOI_TRAIN_L1],
                        batch_size=1024, lr=IOI_TRAIN_LR, checkpoint_every=100, seed=seed)


def train_default_sae(model, corpus, hook: str, tokens: int, seed: int) -> Path:
    """Train the command's default SAE into the cache (resuming an interrupted training there)."""
    print(f"no SAE for {hook} in the cache: training one on {tokens:,} tokens (once) ...", flush=True)
    request = default_sae_request(hook, tokens, seed)
    return train_on_model(model, corpus, request, cache_dir() / "ioi" / "saes")[0].folder


def load_saes(model, folders: list[Path], hook: str) -> dict:
    """{name: dictionary}, widths checked against the model before anything runs."""
    width = hook_width(model, hook)
    loaded = {folder: load_dictionary(folder, expected_d_in=width) for folder in folders}
    if len(loaded) == 1:
        return {"sae": next(iter(loaded.values()))}
    return {f"sae:{folder.name}": dictionary for folder, dictionary in loaded.items()}


def cached_baselines(model, hook: str, names: list[str], *, sae, tokens: int, seed: int, corpus: str,
                     store: Path | None, out: Path) -> dict:
    """Baselines from OUT/baselines when fitted with the same settings, else fitted now and saved there.

    They are fitted on `tokens` activations from the activation store `store` when given, else from `corpus`.
    """
    folder = out / "baselines"
    settings = {"model": model_name_of(model), "hook": hook, "tokens": tokens, "seed": seed,
                "ratio": sae.n_features // sae.d_in, "tied": bool(sae.cfg.tied)}
    manifest = folder / "settings.json"
    previous = json.loads(manifest.read_text()) if manifest.exists() else None
    built = {}
    if previous == settings:
        built = {name: load_dictionary(folder / name) for name in names if (folder / name / "cfg.json").exists()}
    missing = [name for name in names if name not in built]
    if missing:
        if previous != settings:  # the folder's baselines are replaced: none of them stands for `previous` now
            manifest.unlink(missing_ok=True)
        activations = activations_from_store(store, hook, tokens) if store is not None else None
        text = load_corpus(corpus) if activations is None else None
        fresh = build_baselines(model, hook, missing, tokens, text, seed=seed,
                                settings=BaselineSettings(ratio=settings["ratio"], tied=settings["tied"]),
                                activations=activations, out_dir=folder / "dense_training")
        for name, dictionary in fresh.items():
            save_dictionary(dictionary, folder / name)
        atomic_write_text(manifest, json.dumps(settings, indent=2) + "\n")
        built.update(fresh)
    return {name: built[name] for name in names}


def run_ioi(model, request: IOIRequest):
    """Find (or train) the SAE, fit or reuse the baselines, run the benchmark; returns its result."""
    check_baseline_names(request.baselines)
    generate_ioi_prompts(model.tokenizer, request.prompts, seed=request.seed, names=request.names,
                         templates=request.templates)  # bad names or templates: early
    if request.sae is not None:
        folders, hook = sae_folders_for(request.sae, request.hook)
    else:
        hook = request.hook or default_hook(model)
        validate_hooks(model, [hook])
        found = cached_sae_folder(hook, model_name_of(model), default_sae_request(hook, request.train_tokens,
                                                                                 request.seed))
        if found is None:
            found = train_default_sae(model, load_corpus(request.corpus), hook, request.train_tokens, request.seed)
        folders = [found]
    saes = load_saes(model, folders, hook)
    out = request.out or cache_dir() / "ioi" / hook
    store = folders[0].parent / "activations"
    with folder_lock(out):  # one writer of OUT (its baselines and tables) at a time
        dictionaries = {**saes, **cached_baselines(model, hook, request.baselines, sae=next(iter(saes.values())),
                                                   tokens=request.baseline_tokens, seed=request.seed,
                                                   corpus=request.corpus, store=store if store.exists() else None,
                                                   out=out)}
        return run_ioi_benchmark(model, dictionaries, hook, request.prompts, out, seed=request.seed,
                                 settings=request.settings, names=request.names, templates=request.templates,
                                 drop_failed=request.drop_failed)
