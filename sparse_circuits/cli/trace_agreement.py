"""`sparse-circuits trace-agreement`: attribution against ablation over many targets and depths."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.validation import seed

DESCRIPTION = """Trace many target features both ways, by ablation (the ground truth) and by attribution
(activation x gradient; --ig-steps N: integrated gradients), and report how well they agree: per target,
dictionary layer and method, the Spearman of attribution against ablation on ablation's top n features,
the top-n overlap, and the failures (large ablation effects that attribution puts near zero or gives
the other sign), each split into the part made at positions where the receiving feature was off on the
clean run (switched on by the ablation: invisible to a gradient there). Targets: --targets active
features of --target-hook's dictionary, spread over firing rates (seeded); their contexts: --n-contexts
corpus contexts where each fires between half and all of its maximum, cut after the activating token.
Arms: 'consecutive', the --depth dictionaries nearest below the target (depth 1, 2, 3 ...); with
--skip-layer also 'skip', the second nearest alone (traced through two blocks at once). Writes
agreement.csv, failures.csv, summary.json and agreement.png into --out and prints the distribution."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "trace-agreement", help="attribution against ablation over many traced targets",
                            description=DESCRIPTION)
    add_model_arguments(parser, corpus_help="text to find the targets and their contexts in: 'registry', a "
                                            ".txt/.jsonl file or folder, or hf:NAME[:SPLIT[:FIELD]]")
    parser.add_argument("--saes", required=True, type=Path, help="folder holding one dictionary folder per hook point")
    parser.add_argument("--target-hook", help="the dictionary whose features are the targets (default: the deepest)")
    parser.add_argument("--targets", type=positive_int, default=20, help="target features to trace")
    parser.add_argument("--depth", type=positive_int, default=3, help="dictionary layers below the target to trace")
    parser.add_argument("--skip-layer", action="store_true",
                        help="also trace to the second dictionary below with the nearest left out (non-adjacent)")
    parser.add_argument("--ig-steps", type=positive_int, nargs="+", default=[1],
                        help="attribution variants: 1 is plain activation x gradient, N > 1 integrated gradients "
                             "over N points of the ablation path (e.g. --ig-steps 1 8)")
    parser.add_argument("--n-contexts", type=positive_int, default=8, help="contexts per target")
    parser.add_argument("--scan-contexts", type=positive_int, default=300, help="corpus contexts scanned for targets")
    parser.add_argument("--context-size", type=positive_int, default=48, help="tokens per scanned context")
    parser.add_argument("--top-n", type=positive_int, default=30,
                        help="compare on ablation's top n features per layer and receiver")
    parser.add_argument("--top-k-edges", type=positive_int, default=5,
                        help="ablation's strongest features of a layer whose inputs from the layer below are compared")
    parser.add_argument("--max-candidates", type=positive_int,
                        help="ablate at most this many features per layer, most active first (default: all active)")
    parser.add_argument("--max-firing-fraction", type=float, default=0.2,
                        help="targets fire on at most this share of scanned tokens")
    parser.add_argument("--seed", type=seed, default=0, help="seed for picking targets and contexts")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the study into")
    return parser


def check_arguments(args) -> None:
    """Paths, dictionaries, hooks and numbers, before torch is imported or the model loads."""
    from sparse_circuits import validation

    validation.output_folder(args.out, "--out")
    configs = validation.dictionary_folders(args.saes, "--saes")
    hooks = {config.get("hook_name") or (config.get("metadata") or {}).get("hook_name") for config in configs.values()}
    if args.target_hook is not None and args.target_hook not in hooks:
        raise validation.InputError(f"--target-hook {args.target_hook!r} has no dictionary under {args.saes}; "
                                    f"have: {', '.join(sorted(h for h in hooks if h))}")
    if not 0 < args.max_firing_fraction <= 1:
        raise validation.InputError(f"--max-firing-fraction must be in (0, 1], got {args.max_firing_fraction}")
    validation.corpus_spec(args.corpus)


def run(args) -> None:
    from circuits.hooks import hook_order
    from circuits.models import load_model, resolve_device
    from sae.corpus import load_corpus
    from sae.io import load_dictionaries
    from sparse_circuits.pipelines.trace_agreement import format_table, run_trace_agreement

    started = time.time()
    device = resolve_device(args.device)
    dictionaries = load_dictionaries(args.saes, device=device)
    target_hook = args.target_hook or max(dictionaries, key=hook_order)
    corpus = load_corpus(args.corpus)
    model = load_model(args.model, device=device)
    summary = run_trace_agreement(
        model, dictionaries, corpus, target_hook=target_hook, out=args.out, n_targets=args.targets, depth=args.depth,
        skip_layer=args.skip_layer, ig_steps=tuple(dict.fromkeys(args.ig_steps)), n_contexts=args.n_contexts,
        scan_contexts=args.scan_contexts, context_size=args.context_size, top_n=args.top_n,
        top_k_edges=args.top_k_edges, max_candidates=args.max_candidates,
        max_firing_fraction=args.max_firing_fraction, seed=args.seed,
        command="sparse-circuits " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    print(format_table(summary["table"], f"Spearman of attribution against ablation on the target, over "
                                         f"{args.targets} targets at {target_hook} (ablation's top {args.top_n}):"))
    if summary["edge_table"]:
        print(format_table(summary["edge_table"], "\nthe same on edges (effects on ablation's top features one "
                                                  "layer up, measured over every position):"))
    if summary["failure_causes"]:
        print("\nfailures (receiver, method, kind, cause): " + "; ".join(
            f"{key}: {count}" for key, count in summary["failure_causes"].items()))
    print(f"\nwrote {args.out} (agreement.csv, failures.csv, summary.json, {Path(summary['plot']).name}) "
          f"in {time.time() - started:.0f} s")
