"""`sparse-circuits trace`: trace which upstream features make a target fire, into a graph."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sparse_circuits.cli.common import add_model_arguments, add_subcommand, positive_int
from sparse_circuits.validation import nonnegative_int, seed

DESCRIPTION = """Trace which upstream features make a target fire, layer by layer, into a graph.
The target is a dictionary feature HOOK:INDEX (HOOK:auto or auto picks an active, interpretable-looking
one) or a logit (--logit). Contexts come from --contexts (one text per line, or JSONL with a "text"
field) or, for a feature, from the corpus: a seeded sample of contexts where it fires between half and
all of its maximum, each cut just after the activating token. Writes node-link JSON (--out) and
prints the strongest paths."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "trace", help="trace a feature's upstream circuit into a graph",
                            description=DESCRIPTION)
    add_model_arguments(parser, corpus_help="text to find contexts in and describe features with: 'registry', a "
                                            ".txt/.jsonl file or folder, or hf:NAME[:SPLIT[:FIELD]]")
    parser.add_argument("--saes", required=True, type=Path, help="folder holding one dictionary folder per hook point")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--feature", metavar="HOOK:INDEX", help="target feature, e.g. blocks.7.hook_resid_post:123; "
                                                                "HOOK:auto or auto picks one")
    target.add_argument("--logit", metavar="TOKEN", help="target: the logit of this single token at the last position "
                                                         "of each --contexts text")
    parser.add_argument("--logit-other", metavar="TOKEN", help="with --logit: trace the logit difference TOKEN - this "
                                                              "(default: the logit alone)")
    parser.add_argument("--method", choices=["attribution", "ablation"], default="attribution",
                        help="attribution: activation x gradient, fast; ablation: exact, slow")
    parser.add_argument("--depth", type=positive_int, default=2, help="dictionary layers to go back")
    parser.add_argument("--top-k", type=positive_int, default=10, help="features kept per layer")
    parser.add_argument("--contexts", type=Path,
                        help="texts to trace on: one per line (.txt) or JSONL with 'text' (default: found in the corpus)")
    parser.add_argument("--n-contexts", type=positive_int, default=20, help="contexts found in the corpus")
    parser.add_argument("--scan-contexts", type=nonnegative_int, default=200,
                        help="corpus contexts scanned to find contexts and describe features (0: none)")
    parser.add_argument("--context-size", type=positive_int, default=64, help="tokens per scanned context")
    parser.add_argument("--direct", action="store_true",
                        help="attribution only: stop gradients at attention patterns and norm scales (direct effects)")
    parser.add_argument("--ig-steps", type=positive_int, default=1,
                        help="attribution only: integrated gradients over N points of the ablation path (every code "
                             "at the scored hook scaled by 1, 1-1/N, ..., 1/N); 1 is plain activation x gradient")
    parser.add_argument("--max-candidates", type=positive_int,
                        help="ablation only: ablate at most this many features per layer, most active first "
                             "(default: all)")
    parser.add_argument("--compare", action="store_true",
                        help="also trace with the other method and print how well the two agree per layer "
                             "(Spearman on ablation's top 30 features); ablation is slow")
    parser.add_argument("--seed", type=seed, default=0, help="seed for picking contexts")
    parser.add_argument("--paths", type=nonnegative_int, default=5, help="strongest paths to print")
    parser.add_argument("--dashboard", type=Path, metavar="SITE",
                        help="a site written by `sparse-circuits dashboard`: feature nodes at its hook get a link to "
                             "their page (shown by the HTML export; default: no links)")
    parser.add_argument("--out", required=True, type=Path, help="graph file to write (node-link JSON)")
    return parser


def check_arguments(args) -> None:
    """Targets, paths, dictionary files, contexts and corpus, before torch is imported or the model loads."""
    from sparse_circuits import validation

    if args.ig_steps != 1 and args.method == "ablation":
        raise validation.InputError("--ig-steps applies to --method attribution only (ablation is exact)")
    if args.logit_other and not args.logit:
        raise validation.InputError("--logit-other needs --logit")
    if args.logit and not args.contexts:
        raise validation.InputError("a logit target needs texts to measure it on: give --contexts FILE")
    validation.output_file(args.out, "--out")
    if args.dashboard is not None:
        validation.dashboard_site(args.dashboard)
    configs = validation.dictionary_folders(args.saes, "--saes")
    if args.feature:
        validation.feature_target(args.feature, configs)
    if args.contexts:
        validation.input_file(args.contexts, "contexts file")
        if args.contexts.suffix == ".jsonl":
            validation.jsonl_text_lines(args.contexts, "contexts file")
        else:
            validation.utf8_lines(args.contexts, "contexts file")
    if args.feature and args.scan_contexts > 0:
        validation.corpus_spec(args.corpus)


def run(args) -> None:
    from circuits.graph import save_graph_json
    from circuits.models import load_model, resolve_device
    from circuits.tracing import summarize
    from sae.corpus import load_corpus
    from sae.io import load_dictionaries
    from sparse_circuits.pipelines.trace import compare_methods, read_context_file, trace_feature, trace_logit

    texts = read_context_file(args.contexts) if args.contexts else None
    corpus = load_corpus(args.corpus) if args.feature and args.scan_contexts > 0 else None
    started = time.time()
    device = resolve_device(args.device)
    dictionaries = load_dictionaries(args.saes, device=device)  # before the model: fail fast on bad files
    model = load_model(args.model, device=device)
    options = {"direct_effects": args.direct, "max_candidates": args.max_candidates}
    if args.method == "attribution":
        options["ig_steps"] = args.ig_steps
    if args.logit:
        result = trace_logit(model, dictionaries, args.logit, args.logit_other, texts, method=args.method,
                             depth=args.depth, top_k_per_layer=args.top_k, **options)
    else:
        result = trace_feature(model, dictionaries, args.feature, corpus=corpus, texts=texts, method=args.method,
                               depth=args.depth, top_k_per_layer=args.top_k, n_contexts=args.n_contexts,
                               scan_contexts=args.scan_contexts, context_size=args.context_size, seed=args.seed,
                               **options)
    if args.dashboard is not None:
        from circuits.dashboard import link_feature_pages

        link_feature_pages(result.graph, args.dashboard)  # absolute file:// links: the graph file may move
    path = save_graph_json(result.graph, args.out)
    print(summarize(result.graph, n_paths=args.paths))
    if args.compare:
        print(compare_methods(model, dictionaries, result, method=args.method, depth=args.depth,
                              top_k_per_layer=args.top_k, max_candidates=args.max_candidates))
    graph = result.graph
    print(f"\nwrote {path} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges) "
          f"in {time.time() - started:.0f} s")
