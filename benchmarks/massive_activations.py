"""Does the massive-activation rule (norm > 10x the row median, passed through) fit each model?

For every layer's residual stream (hook_resid_post) over held-out contexts, each non-BOS position's norm
is divided by the median norm of its row's non-BOS positions. Printed per layer: the largest ratio, the
99.9th percentile, how many positions exceed 10x (today's cut) and 5x, the widest gap in the top ratios
(a natural cut: the ratio below which ordinary tokens sit), and the share of the batch's summed squared
norm (what an MSE loss weighs) taken by the positions above the cut. The largest ratios' tokens are listed
so one can see whether they are attention sinks (first token of a mid-document context, delimiters) or
ordinary text.

    python benchmarks/massive_activations.py --model smollm2-135m gemma3-270m --contexts 64 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circuits.engine import run_with_edits
from circuits.models import load_model
from sae.corpus import load_corpus, tokenize_contexts
from sae.metrics import OUTLIER_NORM_FACTOR


def layer_statistics(ratios: torch.Tensor, squares: torch.Tensor) -> dict:
    """Summary of the ratios (norm / row median) of one layer's non-BOS positions."""
    flat = ratios.flatten()
    top = flat.sort(descending=True).values[:200]
    gaps = top[:-1] / top[1:]
    widest = int(gaps.argmax()) if len(gaps) else 0
    total = float(squares.sum())
    above = flat > OUTLIER_NORM_FACTOR
    return {
        "max_ratio": float(top[0]), "p99_9_ratio": float(torch.quantile(flat, 0.999)),
        "second_ratio": float(top[1]) if len(top) > 1 else float("nan"),
        "above_10x": int(above.sum()), "above_5x": int((flat > 5).sum()), "positions": int(flat.numel()),
        "widest_gap": {"above": float(top[widest]), "below": float(top[widest + 1]), "factor": float(gaps[widest]),
                       "positions_above": widest + 1},
        "loss_share_above_10x": float(squares.flatten()[above].sum()) / total,
    }


def measure(model_name: str, n_contexts: int, context_size: int, batch: int) -> dict:
    model = load_model(model_name, device="cpu")
    contexts = tokenize_contexts(load_corpus("registry"), model.tokenizer, context_size, n_contexts, split="eval", seed=0)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    norms = {hook: [] for hook in hooks}
    with torch.no_grad():
        for start in range(0, contexts.shape[0], batch):
            run = run_with_edits(model, contexts[start:start + batch], record=hooks, stop_at_layer=model.cfg.n_layers)
            for hook in hooks:
                norms[hook].append(run.recorded[hook][:, 1:].float().norm(dim=-1))
    layers, tops = [], []
    for layer, hook in enumerate(hooks):
        norm = torch.cat(norms[hook])  # [contexts, pos-1]
        ratios = norm / norm.median(dim=1, keepdim=True).values
        stats = layer_statistics(ratios, norm ** 2)
        row, col = divmod(int(ratios.argmax()), ratios.shape[1])
        token = model.tokenizer.decode([int(contexts[row, col + 1])])
        stats.update(layer=layer, max_position=col + 1, max_token=token)
        layers.append(stats)
        if layer == model.cfg.n_layers // 2:
            order = ratios.flatten().argsort(descending=True)[:12]
            for index in order.tolist():
                r, c = divmod(index, ratios.shape[1])
                tops.append({"ratio": float(ratios[r, c]), "position": c + 1,
                             "token": model.tokenizer.decode([int(contexts[r, c + 1])]),
                             "previous": model.tokenizer.decode([int(contexts[r, c])])})
    return {"model": model_name, "contexts": int(contexts.shape[0]), "context_size": context_size,
            "factor": OUTLIER_NORM_FACTOR, "layers": layers, "top_positions_middle_layer": tops}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: {result['contexts']} held-out contexts of {result['context_size']} tokens, "
          f"ratio = non-BOS norm / row median")
    print(f"{'layer':>5} {'max':>8} {'2nd':>8} {'p99.9':>7} {'>10x':>6} {'>5x':>6} {'gap above/below (x)':>26} "
          f"{'loss share >10x':>15}  max token")
    for s in result["layers"]:
        gap = s["widest_gap"]
        print(f"{s['layer']:>5} {s['max_ratio']:>8.1f} {s['second_ratio']:>8.1f} {s['p99_9_ratio']:>7.2f} "
              f"{s['above_10x']:>6} {s['above_5x']:>6} {gap['above']:>8.1f}/{gap['below']:<6.1f}({gap['factor']:.1f}x, "
              f"{gap['positions_above']:>3}) {s['loss_share_above_10x']:>15.3f}  {s['max_token']!r}@{s['max_position']}")
    print("largest ratios at the middle layer:", ", ".join(
        f"{t['ratio']:.1f}x {t['token']!r}@{t['position']} (after {t['previous']!r})"
        for t in result["top_positions_middle_layer"][:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for name in args.model:
        results.append(measure(name, args.contexts, args.context_size, args.batch))
        print_table(results[-1])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python benchmarks/massive_activations.py " + " ".join(
            f"--model {' '.join(args.model)} --contexts {args.contexts} --context-size {args.context_size}".split()),
            "results": results}, indent=1))


if __name__ == "__main__":
    main()
