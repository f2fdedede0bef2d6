"""Harvesting cost vs depth: our one-pass, early-stopping harvest against a plain transformers forward.

For each layer L it times `collect_activations` at `blocks.L.hook_resid_post` (which stops after block L)
and a plain `AutoModelForCausalLM` forward of the whole model on the same tokens, in one run, and prints
tokens/s and the cost ratio next to the ideal (L+1)/n_layers. Example:

    python benchmarks/harvest_speed.py --layers 5 12 20 29 --contexts 32 --json harvest_speed.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from circuits.models import load_model
from circuits.harvest import collect_activations
from sae.corpus import load_corpus, tokenize_contexts


def _time(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 12, 20, 29])
    parser.add_argument("--contexts", type=int, default=32)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the table to this file")
    args = parser.parse_args()

    model = load_model(args.model)
    tokens = tokenize_contexts(load_corpus("registry"), model.tokenizer, args.context_size, args.contexts, seed=1)
    batches = tokens.split(args.batch_size)
    n_tokens = tokens.numel()
    hf_model = model.original_model

    def plain_forward():
        for batch in batches:
            hf_model(batch)

    rows = []
    with torch.inference_mode():
        plain = _time(plain_forward, args.repeats)
        for layer in args.layers:
            hook = f"blocks.{layer}.hook_resid_post"
            ours = _time(lambda: [collect_activations(model, batch, [hook]) for batch in batches], args.repeats)
            rows.append({"layer": layer, "ours_tokens_per_s": n_tokens / ours,
                         "plain_full_forward_tokens_per_s": n_tokens / plain, "cost_ratio": ours / plain,
                         "ideal_ratio": (layer + 1) / model.cfg.n_layers})
    print(f"{'layer':>5} {'ours tok/s':>11} {'full fwd tok/s':>15} {'cost ratio':>11} {'(L+1)/n':>8}")
    for row in rows:
        print(f"{row['layer']:>5} {row['ours_tokens_per_s']:>11.0f} {row['plain_full_forward_tokens_per_s']:>15.0f} "
              f"{row['cost_ratio']:>11.3f} {row['ideal_ratio']:>8.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "tokens": n_tokens, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
