"""What leaving massive activations out of SAE training is worth, on one harvested store.

Trains the same tied ReLU SAEs (same batches, same seed) twice on a store's hook, with and without
`TrainingConfig.exclude_outliers`, and prints L0 and FVU on held-out typical tokens (norm <= 10x median)
for each alpha. Held-out activations are harvested from the corpus's eval split.

    python benchmarks/outlier_training.py --store runs/L12/activations --hook blocks.12.hook_resid_post \
        [--tokens 800000] [--l1 1.5e-3 3e-3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="activation store (from `sparse-circuits train`)")
    parser.add_argument("--hook", required=True)
    parser.add_argument("--tokens", type=int, default=800_000, help="training tokens per SAE")
    parser.add_argument("--l1", type=float, nargs="+", default=[1.5e-3, 3e-3])
    parser.add_argument("--eval-contexts", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from circuits.models import load_model
    from circuits.harvest import collect_activations
    from sae.activation_store import ActivationStore
    from sae.config import DictionaryConfig
    from sae.corpus import load_corpus, tokenize_contexts
    from sae.metrics import fvu, l0, typical_token_mask
    from sae.training import TrainingConfig, train_dictionaries

    store = ActivationStore(args.store)
    d_in = store.d_in(args.hook)
    model = load_model(store.manifest.get("model") or "smollm2-135m")
    contexts = tokenize_contexts(load_corpus("registry"), model.tokenizer, store.manifest["context_size"],
                                 args.eval_contexts, split="eval", seed=0)
    held_out = torch.cat([collect_activations(model, contexts[i : i + 16], [args.hook])[args.hook][:, 1:]
                          .reshape(-1, d_in) for i in range(0, contexts.shape[0], 16)])
    typical = held_out[typical_token_mask(held_out)]
    configs = [DictionaryConfig("standard", d_in=d_in, d_sae=4 * d_in, hook_name=args.hook, tied=True,
                                l1_coefficient=alpha) for alpha in args.l1]
    rows = []
    for exclude in (False, True):
        training = TrainingConfig(total_tokens=args.tokens, batch_size=2048, lr=3e-3, lr_warmup_steps=50,
                                  checkpoint_every=None, dead_window_tokens=500_000, exclude_outliers=exclude)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            results = train_dictionaries(store, configs, training, folder, progress=True)
        seconds = time.perf_counter() - started
        for config, result in zip(configs, results):
            with torch.no_grad():
                reconstruction, codes = result.dictionary(typical)
            rows.append({"exclude_outliers": exclude, "l1": config.l1_coefficient, "l0": l0(codes).item(),
                         "fvu": fvu(typical, reconstruction).item(), "seconds": seconds})
    print(f"\n{args.hook}, {args.tokens:,} training tokens, held-out typical tokens: {typical.shape[0]:,}")
    print(f"{'outliers':<10} {'alpha':>8} {'L0':>7} {'FVU':>7}")
    for row in rows:
        print(f"{'left out' if row['exclude_outliers'] else 'trained':<10} {row['l1']:>8.2g} {row['l0']:>7.1f} "
              f"{row['fvu']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
