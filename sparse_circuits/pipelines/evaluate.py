"""Evaluate saved dictionary folders on held-out text, and the table `evaluate`, `train` and the demo print."""

from __future__ import annotations

import json
from pathlib import Path

from circuits.evaluation import evaluate_dictionaries
from circuits.hooks import hook_width, validate_hooks
from sae.assets import atomic_write_text
from sae.corpus import Corpus, tokenize_contexts
from sae.io import find_dictionary_folders, load_dictionary, read_dictionary_config
from sparse_circuits.pipelines.train import contexts_for_tokens

EVAL_COLUMNS = ["l0", "fvu", "dead_fraction", "dense_fraction", "ce_loss_clean", "ce_loss_spliced",
                "ce_loss_zero_ablated", "ce_loss_recovered", "kl"]


def dictionary_folders(path: Path) -> list[Path]:
    """The dictionary folders at or under `path`; a clear error when there are none."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by `sparse-circuits train`")
    folders = find_dictionary_folders(path)
    if not folders:
        raise FileNotFoundError(f"no dictionary (sae_weights.safetensors + cfg.json) found in or under {path}")
    return folders


def check_dictionary_widths(model, folders: list[Path]) -> None:
    """Fail before any compute when a folder's hook is unknown or its width does not match the model."""
    for folder in folders:
        cfg = read_dictionary_config(folder)
        validate_hooks(model, [cfg.hook_name])
        width = hook_width(model, cfg.hook_name)
        if width is not None and width != cfg.d_in:
            raise ValueError(f"{folder}: the dictionary has d_in={cfg.d_in} but {cfg.hook_name} of this model has "
                             f"width {width}; evaluate it with the model it was trained on (--model)")


def evaluate_folders(model, folders: list[Path], corpus: Corpus, tokens: int, context_size: int = 128,
                     batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[dict]:
    """Evaluate saved dictionaries on held-out text; writes `eval.json` into each folder."""
    dictionaries = []
    for folder in folders:
        dictionary = load_dictionary(folder, expected_d_in=hook_width(model, read_dictionary_config(folder).hook_name))
        validate_hooks(model, [dictionary.cfg.hook_name])
        dictionaries.append(dictionary)
    contexts = tokenize_contexts(corpus, model.tokenizer, context_size,
                                 contexts_for_tokens(tokens, context_size), split="eval", seed=seed)
    results = evaluate_dictionaries(model, dictionaries, contexts, batch_size=batch_size, progress=progress)
    for folder, result in zip(folders, results):
        result["folder"] = str(folder)
        atomic_write_text(Path(folder) / "eval.json", json.dumps(result, indent=2) + "\n")
    return results


def format_eval_table(results: list[dict]) -> str:
    """One row per dictionary (its folder name), the headline metrics as columns."""
    import pandas as pd

    frame = pd.DataFrame(results)
    frame["dictionary"] = [Path(result.get("folder", result["hook"])).name for result in results]
    return frame.set_index("dictionary")[EVAL_COLUMNS].to_string(float_format=lambda v: f"{v:.4g}")
