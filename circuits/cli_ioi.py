"""`sparse-circuits ioi`: the IOI feature-patching benchmark, SAE features against the paper's baselines.

With no flags it runs on the default model at blocks.{0.6 n_layers}.hook_resid_post (blocks.18 of
SmolLM2's 30), with an SAE found in the cache (`<cache>/ioi/saes/<hook>` or the demo's) or trained
there first (100k tokens, 16 epochs: 10-20 minutes on a 2-core CPU, once), against pca, ica, neurons, random and dense.
Baselines are fitted once per output folder and reused (OUT/baselines/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuits.cli import positive_int

DEFAULT_BASELINES = "pca,ica,neurons,random,dense"
TRAIN_TOKENS = 100_000  # the command's own SAE: tied ReLU, ratio 4; on SmolLM2 blocks.18 these settings
TRAIN_L1 = 1e-3  # gave L0 188, FVU 0.22 (2e-3: L0 80, FVU 0.35, too lossy to reach the KL target; lr 1e-3: FVU ~0.5)
TRAIN_LR = 3e-3
TRAIN_EPOCHS = 16


def add_parser(commands) -> argparse.ArgumentParser:
    from circuits.models import DEFAULT_MODEL

    parser = commands.add_parser(
        "ioi", help="IOI feature-patching benchmark: how few features move the output to the counterfactual",
        description="Patch features from counterfactual IOI prompts (IO name replaced) into clean ones at one hook "
                    "point and find the smallest feature sets that reach a KL target, for an SAE and the "
                    "baselines (PCA, ICA, neurons, random directions, a non-sparse autoencoder). Writes "
                    "OUT/curves.csv, OUT/summary.csv, OUT/curves.png and OUT/details.json, and prints the summary.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--corpus", default="registry", help="text for fitting baselines / training an SAE")
    parser.add_argument("--sae", type=Path, help="SAE folder, or a parent of several (default: cached or trained)")
    parser.add_argument("--hook", help="hook point (default: the SAE's, else blocks.{0.6 n_layers}.hook_resid_post)")
    parser.add_argument("--prompts", type=positive_int, default=50, help="IOI prompts (default 50)")
    parser.add_argument("--baselines", default=DEFAULT_BASELINES,
                        help=f"comma-separated baselines, or 'none' (default {DEFAULT_BASELINES})")
    parser.add_argument("--baseline-tokens", type=positive_int, default=20_000,
                        help="activations the baselines are fitted on (default 20k)")
    parser.add_argument("--kl-target", type=float, help="absolute KL target (default: a fraction of the unpatched KL)")
    parser.add_argument("--kl-target-fraction", type=float, default=None,
                        help="KL target as a fraction of KL(clean || counterfactual) (default 0.25)")
    parser.add_argument("--confirm-top", type=int, default=50,
                        help="features whose attribution is checked by exact patching (default 50; 0: skip)")
    parser.add_argument("--prune-evals", type=int, default=16, help="exact evaluations for ACDC pruning (default 16)")
    parser.add_argument("--per-prompt", action="store_true",
                        help="give each prompt its own feature set (default: one set shared by all prompts)")
    parser.add_argument("--patch-error", action="store_true",
                        help="also patch the SAE error term from the counterfactual in every set (only features are "
                             "counted); default: the error stays at its clean value")
    parser.add_argument("--names", help="comma-separated IO/S names to use (each must be one token)")
    parser.add_argument("--train-tokens", type=positive_int, default=TRAIN_TOKENS,
                        help=f"tokens to train an SAE on when none is found (default {TRAIN_TOKENS:,})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output folder (default <cache>/ioi/<hook>)")
    return parser


def default_hook(model) -> str:
    """A middle-to-late residual stream hook: blocks.{round(0.6 n_layers)}.hook_resid_post."""
    return f"blocks.{min(model.cfg.n_layers - 1, round(0.6 * model.cfg.n_layers))}.hook_resid_post"


def cached_sae_folder(hook: str) -> Path | None:
    """An SAE for `hook` trained earlier by this command or by the demo, if any."""
    from sae.assets import cache_dir

    for parent in (cache_dir() / "ioi" / "saes", cache_dir() / "demo" / "saes"):
        if (parent / hook / "sae_weights.safetensors").exists():
            return parent / hook
    return None


def sae_folders_for(path: Path, hook: str | None) -> tuple[list[Path], str]:
    """The dictionary folders under `path` at `hook` (or at the only hook there), and that hook."""
    from sae.io import find_dictionary_folders, read_dictionary_config

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


def train_default_sae(model, corpus, hook: str, tokens: int, seed: int) -> Path:
    """Train the command's default SAE (tied ReLU, ratio 4, alpha TRAIN_L1) into the cache."""
    from circuits.workflows import TrainRequest, train_on_model
    from sae.assets import cache_dir

    print(f"no SAE for {hook} in the cache: training one on {tokens:,} tokens (once) ...", flush=True)
    request = TrainRequest(hooks=[hook], tokens=tokens, epochs=TRAIN_EPOCHS, l1_coefficients=[TRAIN_L1],
                           batch_size=1024, lr=TRAIN_LR, checkpoint_every=100, seed=seed)
    return train_on_model(model, corpus, request, cache_dir() / "ioi" / "saes")[0].folder


def load_saes(model, folders: list[Path], hook: str) -> dict:
    """{name: dictionary}, widths checked against the model before anything runs."""
    from circuits.splicing import hook_width
    from sae.io import load_dictionary

    width = hook_width(model, hook)
    loaded = {folder: load_dictionary(folder, expected_d_in=width) for folder in folders}
    if len(loaded) == 1:
        return {"sae": next(iter(loaded.values()))}
    return {f"sae:{folder.name}": dictionary for folder, dictionary in loaded.items()}


def cached_baselines(model, hook: str, names: list[str], args, sae, store: Path | None, out: Path) -> dict:
    """Baselines from OUT/baselines when fitted with the same settings, else fitted now and saved there."""
    from circuits.models import model_name_of
    from sae.assets import atomic_write_text
    from sae.corpus import load_corpus
    from sae.io import load_dictionary, save_dictionary
    from tasks.ioi_benchmark import activations_from_store, build_baselines

    folder = out / "baselines"
    settings = {"model": model_name_of(model), "hook": hook, "tokens": args.baseline_tokens, "seed": args.seed,
                "ratio": sae.n_features // sae.d_in, "tied": bool(sae.cfg.tied)}
    manifest = folder / "settings.json"
    previous = json.loads(manifest.read_text()) if manifest.exists() else None
    built = {}
    if previous == settings:
        built = {name: load_dictionary(folder / name) for name in names if (folder / name / "cfg.json").exists()}
    missing = [name for name in names if name not in built]
    if missing:
        activations = activations_from_store(store, hook, args.baseline_tokens) if store is not None else None
        corpus = load_corpus(args.corpus) if activations is None else None
        fresh = build_baselines(model, hook, missing, args.baseline_tokens, corpus, seed=args.seed,
                                ratio=settings["ratio"], tied=settings["tied"], activations=activations,
                                out_dir=folder / "dense_training")
        for name, dictionary in fresh.items():
            save_dictionary(dictionary, folder / name)
        atomic_write_text(manifest, json.dumps(settings, indent=2) + "\n")
        built.update(fresh)
    return {name: built[name] for name in names}


def run(args) -> None:
    from circuits.models import load_model
    from sae.assets import cache_dir
    from sae.corpus import load_corpus
    from tasks.ioi_benchmark import BASELINE_NAMES, SearchSettings, run_ioi_benchmark
    from tasks.ioi_data import generate_ioi_prompts

    baselines = [] if args.baselines.strip().lower() in ("", "none") else [
        name.strip() for name in args.baselines.split(",") if name.strip()]
    unknown = [name for name in baselines if name not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINE_NAMES)} or 'none'")
    model = load_model(args.model, device=args.device)
    names = [name.strip() for name in args.names.split(",")] if args.names else None
    generate_ioi_prompts(model.tokenizer, args.prompts, seed=args.seed, names=names)  # bad names fail here, early
    if args.sae is not None:
        folders, hook = sae_folders_for(args.sae, args.hook)
    else:
        hook = args.hook or default_hook(model)
        from sae.activation_store import validate_hooks

        validate_hooks(model, [hook])
        found = cached_sae_folder(hook)
        if found is None:
            found = train_default_sae(model, load_corpus(args.corpus), hook, args.train_tokens, args.seed)
        folders = [found]
    saes = load_saes(model, folders, hook)
    out = args.out or cache_dir() / "ioi" / hook
    first = next(iter(saes.values()))
    store = folders[0].parent / "activations"
    dictionaries = {**saes, **cached_baselines(model, hook, baselines, args, first,
                                              store if store.exists() else None, out)}
    settings = SearchSettings(kl_target=args.kl_target, confirm_top=args.confirm_top, prune_evals=args.prune_evals,
                              feature_sets="per_prompt" if args.per_prompt else "shared", patch_error=args.patch_error)
    if args.kl_target_fraction is not None:
        settings.kl_target_fraction = args.kl_target_fraction
    result = run_ioi_benchmark(model, dictionaries, hook, args.prompts, out, seed=args.seed, settings=settings,
                               names=names)
    print(f"\nKL target {result.kl_target:.4g} (unpatched KL {result.summary['kl_unpatched'].iloc[0]:.4g}); "
          f"clean IOI accuracy {result.clean_performance['accuracy']:.2f}")
    for name, path in result.paths().items():
        print(f"  {name:<8} {path}")
