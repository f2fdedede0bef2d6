"""Attribution against ablation on the same trace: time, agreement, and what the top features do.

For one target feature (given, or picked automatically at the deepest dictionary) and its contexts
from the corpus, trace upstream with each method (attribution, ablation) with the same settings and print:
- each method's seconds (whole trace, and all but describing the nodes; attribution: the median of
  three runs) and the speed ratio;
- per layer, Spearman's rank correlation of attribution with ablation on ablation's top N features
  (by |effect| on the target; every active feature is scored, whatever the graph keeps), and how
  many of ablation's top N attribution also ranks in its top N;
- per layer, the share of the target's activation removed when its k most helpful features (by
  ablation) are ablated together, against k random features active on the same contexts.

    python benchmarks/trace_speed.py --saes DIR [--feature HOOK:INDEX] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--corpus", default="registry")
    parser.add_argument("--saes", required=True, type=Path, help="folder with one dictionary folder per hook point")
    parser.add_argument("--feature", default="auto", help="HOOK:INDEX, HOOK:auto or auto (default)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10, help="features kept per layer in both graphs (default 10)")
    parser.add_argument("--top-n", type=int, default=30, help="features per layer compared (default 30)")
    parser.add_argument("--ablate-k", type=int, default=10, help="features ablated together, top vs random (default 10)")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--n-contexts", type=int, default=20)
    parser.add_argument("--scan-contexts", type=int, default=200)
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--max-candidates", type=int, default=None, help="ablation: cap on features tried per layer")
    parser.add_argument("--batch-size", type=int, default=32, help="ablation rows per forward")
    parser.add_argument("--attribution-repeats", type=int, default=3, help="attribution timings (median; default 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def scoring_seconds(timings: dict[str, float]) -> float:
    """Seconds spent computing effects: the whole trace but describing its nodes."""
    return timings["total"] - timings.get("node annotation", 0.0)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*TransformerBridge.*")
    from sparse_circuits.pipelines.trace import feature_request
    from circuits.features import choose_feature, scan_corpus
    from circuits.models import load_model, resolve_device
    from circuits.tracing import (FeatureTarget, find_target_contexts, method_agreement, pad_token_id,
                                  run_upstream_trace, top_versus_random)
    from sae.corpus import load_corpus
    from sae.io import load_dictionaries

    device = resolve_device(args.device)
    dictionaries = load_dictionaries(args.saes, device=device)
    model = load_model(args.model, device=device)
    hook, index = feature_request(args.feature, dictionaries)
    scan = scan_corpus(model, dictionaries, load_corpus(args.corpus), n_contexts=args.scan_contexts,
                       context_size=args.context_size, seed=args.seed)
    if index is None:
        index = choose_feature(scan, hook, model.tokenizer)
    target = FeatureTarget(hook, index)
    contexts = find_target_contexts(scan, target, model.tokenizer, n_contexts=args.n_contexts, seed=args.seed,
                                    pad_id=pad_token_id(model))
    settings = {"depth": args.depth, "top_k_per_layer": args.top_k, "scan": scan}
    attribution_runs = []  # a few seconds each, so the median of three shrugs off other load on the machine
    for _ in range(args.attribution_repeats):
        started = time.perf_counter()
        attribution = run_upstream_trace(model, dictionaries, target, contexts, method="attribution", **settings)
        attribution_runs.append((time.perf_counter() - started, attribution))
    attribution_seconds, attribution = sorted(attribution_runs, key=lambda run: run[0])[len(attribution_runs) // 2]
    started = time.perf_counter()
    ablation = run_upstream_trace(model, dictionaries, target, contexts, method="ablation", batch_size=args.batch_size,
                                  max_candidates=args.max_candidates, **settings)
    ablation_seconds = time.perf_counter() - started
    agreement = method_agreement(attribution.scores, ablation.scores, args.top_n)
    versus = top_versus_random(model, dictionaries, ablation, k=args.ablate_k, n_random=args.random_draws,
                               seed=args.seed)
    results = {
        "model": args.model, "target": target.node_id, "target_activation": float(ablation.graph.nodes[target.node_id]["activation"]),
        "n_contexts": len(contexts), "mean_context_tokens": float(contexts.lengths.float().mean()),
        "depth": args.depth, "top_k_per_layer": args.top_k, "threads": torch.get_num_threads(), "device": device,
        "attribution_seconds_each": [seconds for seconds, _ in attribution_runs],
        "seconds": {"attribution": attribution_seconds, "ablation": ablation_seconds,
                    "attribution_scoring": scoring_seconds(attribution.timings),
                    "ablation_scoring": scoring_seconds(ablation.timings)},
        "speedup": ablation_seconds / attribution_seconds,
        "scoring_speedup": scoring_seconds(ablation.timings) / max(scoring_seconds(attribution.timings), 1e-9),
        "ablated_features": {h: int(s.evaluated.sum()) for h, s in ablation.scores.items()},
        "layers": [{"hook": a.hook, "compared": a.n, "spearman": a.spearman, "top_overlap": a.top_overlap,
                    "top_k": v.k, "top_fraction_removed": v.top.fraction,
                    "random_fraction_removed": v.random_fraction,
                    "random_fractions": [effect.fraction for effect in v.random]}
                   for a, v in zip(agreement, versus)],
    }
    print(format_table(results))
    if args.json:
        from sae.assets import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


def format_table(results: dict) -> str:
    seconds = results["seconds"]
    lines = [f"target {results['target']} (activation {results['target_activation']:.3g}) on {results['n_contexts']} "
             f"contexts of {results['mean_context_tokens']:.0f} tokens on average, depth {results['depth']}, "
             f"{results['top_k_per_layer']} features kept per layer, "
             f"{results['threads']} thread(s) on {results['device']}",
             f"{'method':<12} {'trace s':>9} {'scoring s':>10}   (attribution: median of "
             f"{len(results['attribution_seconds_each'])} runs; scoring: all but describing the nodes)",
             f"{'attribution':<12} {seconds['attribution']:>9.2f} {seconds['attribution_scoring']:>10.2f}",
             f"{'ablation':<12} {seconds['ablation']:>9.2f} {seconds['ablation_scoring']:>10.2f}",
             f"attribution is {results['speedup']:.1f}x faster on the whole trace, "
             f"{results['scoring_speedup']:.1f}x on scoring",
             "",
             f"{'layer':<28} {'ablated':>7} {'n':>3} {'spearman':>8} {'top-n overlap':>13} "
             f"{'top-k removed':>13} {'random-k removed':>16}"]
    for layer in results["layers"]:
        lines.append(f"{layer['hook']:<28} {results['ablated_features'][layer['hook']]:>7} {layer['compared']:>3} "
                     f"{layer['spearman']:>8.3f} {layer['top_overlap']:>13.2f} "
                     f"{layer['top_fraction_removed']:>12.1%} {layer['random_fraction_removed']:>15.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
