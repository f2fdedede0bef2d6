"""`sparse-circuits trace` and `sparse-circuits export`, and the trace pipeline they (and the demo) run.

trace:  load the model and the dictionaries (one folder per hook point), find contexts where the
        target fires (or read them from a file), trace its upstream features, write the graph as
        node-link JSON and print the strongest paths.
export: a saved graph as svg, png, dot, graphml, html or json, optionally pruned first.

`trace_and_export` is the demo's step: trace one feature (picked automatically when not given) and
write graph.json, diagram.svg and diagram.html.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from circuits.models import DEFAULT_MODEL

TRACE_DESCRIPTION = """Trace which upstream features make a target fire, layer by layer, into a graph.
The target is a dictionary feature HOOK:INDEX (HOOK:auto or auto picks an active, interpretable-looking
one) or a logit (--logit). Contexts come from --contexts (one text per line, or JSONL with a "text"
field) or, for a feature, from the corpus: a seeded sample of contexts where it fires between half and
all of its maximum, each cut just after the activating token. Writes node-link JSON (--out) and
prints the strongest paths."""

EXPORT_DESCRIPTION = """Write a saved circuit graph as svg, png, dot, graphml, html or json (default: from the
suffix of -o). SVG and PNG use Graphviz `dot` when installed, else a built-in layout. Optionally prune
first: --threshold (min |effect|), --top-k-per-node, --influence (cumulative influence fraction)."""


def add_parsers(commands) -> None:
    """Add the `trace` and `export` subcommands to the CLI's subparsers object."""
    trace = commands.add_parser("trace", help="trace a feature's upstream circuit into a graph",
                                description=TRACE_DESCRIPTION)
    trace.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default '{DEFAULT_MODEL}'), a local HF folder, "
                                                              "or a hub name")
    trace.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    trace.add_argument("--corpus", default="registry", help="text to find contexts in and describe features with "
                                                            "(default: registry)")
    trace.add_argument("--saes", required=True, type=Path, help="folder holding one dictionary folder per hook point")
    target = trace.add_mutually_exclusive_group(required=True)
    target.add_argument("--feature", metavar="HOOK:INDEX", help="target feature, e.g. blocks.7.hook_resid_post:123; "
                                                                "HOOK:auto or auto picks one")
    target.add_argument("--logit", metavar="TOKEN", help="target: the logit of this single token at the last position "
                                                         "of each --contexts text")
    trace.add_argument("--logit-other", metavar="TOKEN", help="with --logit: trace the logit difference TOKEN - this")
    trace.add_argument("--method", choices=["attribution", "ablation"], default="attribution",
                       help="attribution: activation x gradient, fast (default); ablation: exact, slow")
    trace.add_argument("--depth", type=int, default=2, help="dictionary layers to go back (default 2)")
    trace.add_argument("--top-k", type=int, default=10, help="features kept per layer (default 10)")
    trace.add_argument("--contexts", type=Path, help="texts to trace on: one per line (.txt) or JSONL with 'text'")
    trace.add_argument("--n-contexts", type=int, default=20, help="contexts found in the corpus (default 20)")
    trace.add_argument("--scan-contexts", type=int, default=200,
                       help="corpus contexts scanned to find contexts and describe features (default 200; 0: none)")
    trace.add_argument("--context-size", type=int, default=64, help="tokens per scanned context (default 64)")
    trace.add_argument("--direct", action="store_true",
                       help="attribution only: stop gradients at attention patterns and norm scales (direct effects)")
    trace.add_argument("--max-candidates", type=int, default=None,
                       help="ablation only: ablate at most this many features per layer (most activation first)")
    trace.add_argument("--compare", action="store_true",
                       help="also trace with the other method and print how well the two agree per layer "
                            "(Spearman on ablation's top 30 features); ablation is slow")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--paths", type=int, default=5, help="strongest paths to print (default 5)")
    trace.add_argument("--out", required=True, type=Path, help="graph file to write (node-link JSON)")

    export = commands.add_parser("export", help="export a circuit graph as a diagram or file",
                                 description=EXPORT_DESCRIPTION)
    export.add_argument("graph", type=Path, help="graph JSON written by `sparse-circuits trace`")
    export.add_argument("--format", dest="fmt", choices=["svg", "png", "dot", "graphml", "html", "json"],
                        help="output format (default: from the suffix of -o)")
    export.add_argument("-o", "--output", required=True, type=Path, help="file to write")
    export.add_argument("--threshold", type=float, help="keep edges with |effect| at least this")
    export.add_argument("--top-k-per-node", type=int, help="keep each node's k strongest incoming edges")
    export.add_argument("--influence", type=float, help="keep the nodes covering this fraction of influence, in (0, 1]")
    export.add_argument("--shares", action="store_true",
                        help="show each edge as the share of the receiving node's activation its source supplies "
                             "(comparable across the diagram) instead of the effect in the receiver's units")


def add_parser(commands) -> None:
    """Same as `add_parsers` (both subcommands live here)."""
    add_parsers(commands)


# --- the pipeline -----------------------------------------------------------------------------


def read_context_file(path: Path) -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a .jsonl file (a "text" field per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contexts file {path} does not exist; give a .txt (one text per line) or .jsonl file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error})") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number} has no string 'text' field; each JSONL line needs one")
            texts.append(record["text"])
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"contexts file {path} holds no texts")
    return texts


def trace_feature(model, dictionaries, feature=None, corpus=None, texts: list[str] | None = None,
                  method: str = "attribution", depth: int | None = 2, top_k_per_layer: int = 10,
                  n_contexts: int = 20, scan_contexts: int = 200, context_size: int = 64, seed: int = 0,
                  progress: bool = True, **options):
    """Scan the corpus, pick the feature if not given, find its contexts (or use `texts`) and trace it.

    `feature`: a FeatureTarget, "HOOK:INDEX", "HOOK:auto", "auto" or None (auto at the deepest
    dictionary). Returns the TraceResult.
    """
    from circuits.features import choose_feature, scan_corpus
    from circuits.tracing import (FeatureTarget, contexts_from_texts, find_target_contexts, pad_token_id,
                                  run_upstream_trace)

    if not dictionaries:
        raise ValueError("no dictionaries given; pass a folder holding one dictionary folder per hook point")
    hook, index = feature_request(feature, dictionaries)
    scan = None
    if scan_contexts > 0 and corpus is not None:
        scan = scan_corpus(model, dictionaries, corpus, n_contexts=scan_contexts, context_size=context_size,
                           seed=seed, progress=progress)
    if index is None:
        if scan is None:
            raise ValueError("picking a feature automatically needs corpus contexts to scan; give --feature HOOK:INDEX")
        index = choose_feature(scan, hook, model.tokenizer)
    target = FeatureTarget(hook, index)
    if texts:
        contexts = contexts_from_texts(model, texts, target)
    elif scan is not None:
        contexts = find_target_contexts(scan, target, model.tokenizer, n_contexts=n_contexts, seed=seed,
                                        pad_id=pad_token_id(model))
    else:
        raise ValueError("no contexts: give texts (--contexts FILE) or a corpus to find contexts in")
    return run_upstream_trace(model, dictionaries, target, contexts, method=method, depth=depth,
                              top_k_per_layer=top_k_per_layer, scan=scan, progress=progress, **options)


def feature_request(feature, dictionaries) -> tuple[str, int | None]:
    """(hook, index, or None to pick one) from a FeatureTarget, "HOOK:INDEX", "HOOK:auto", "auto" or None
    (None and "auto": the deepest dictionary)."""
    from circuits.tracing import FeatureTarget, hook_order, parse_feature

    deepest = max(dictionaries, key=hook_order)
    if feature is None or feature == "auto":
        return deepest, None
    if isinstance(feature, FeatureTarget):
        return feature.hook, feature.index
    if isinstance(feature, str) and feature.endswith(":auto"):
        hook = feature[: -len(":auto")]
        if hook not in dictionaries:
            raise ValueError(f"no dictionary at {hook!r}; have: {', '.join(dictionaries)}")
        return hook, None
    parsed = parse_feature(feature)
    if parsed.hook not in dictionaries:
        raise ValueError(f"no dictionary at {parsed.hook!r} for feature {feature!r}; have: {', '.join(dictionaries)}")
    n_features = dictionaries[parsed.hook].n_features
    if not 0 <= parsed.index < n_features:
        raise ValueError(f"feature index {parsed.index} is out of range for {parsed.hook} (0..{n_features - 1})")
    return parsed.hook, parsed.index


def trace_and_export(model, dictionaries, feature=None, corpus=None, out_dir: str | Path = "trace",
                     method: str = "attribution", depth: int | None = 2, top_k_per_layer: int = 8,
                     n_contexts: int = 12, scan_contexts: int = 160, context_size: int = 64, seed: int = 0,
                     diagram_top_k_per_node: int | None = 4, progress: bool = True) -> dict[str, Path]:
    """Trace one feature (picked automatically when None) and write into out_dir `graph.json` (the
    whole trace, effects in each receiver's units), `diagram.svg` and `diagram.html` (each node's
    `diagram_top_k_per_node` strongest inputs, edges as shares of the receiver's activation so that
    widths compare) and `summary.txt`; returns {name: path}. About a minute on 2 CPU cores."""
    from circuits.export import export_graph
    from circuits.graph import prune_top_k_per_node, save_graph_json
    from circuits.tracing import relative_graph, summarize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = trace_feature(model, dictionaries, feature, corpus=corpus, method=method, depth=depth,
                           top_k_per_layer=top_k_per_layer, n_contexts=n_contexts, scan_contexts=scan_contexts,
                           context_size=context_size, seed=seed, progress=progress)
    graph = result.graph
    shown = relative_graph(prune_top_k_per_node(graph, diagram_top_k_per_node) if diagram_top_k_per_node else graph)
    paths = {"graph.json": save_graph_json(graph, out_dir / "graph.json")}
    paths["diagram.svg"] = export_graph(shown, out_dir / "diagram.svg", "svg").path
    paths["diagram.html"] = export_graph(shown, out_dir / "diagram.html", "html").path
    summary = summarize(graph)
    from sae.assets import atomic_write_text

    atomic_write_text(out_dir / "summary.txt", summary + "\n")
    paths["summary.txt"] = out_dir / "summary.txt"
    if progress:
        print(summary)
    return paths


# --- the subcommands --------------------------------------------------------------------------


def run_trace(args) -> None:
    from circuits.graph import save_graph_json
    from circuits.models import load_model, resolve_device
    from circuits.tracing import contexts_from_texts, logit_target, run_upstream_trace, summarize
    from sae.io import load_dictionaries

    if args.depth < 1 or args.top_k < 1 or args.n_contexts < 1:
        raise ValueError("--depth, --top-k and --n-contexts must each be at least 1")
    if args.logit_other and not args.logit:
        raise ValueError("--logit-other needs --logit")
    if args.logit and not args.contexts:
        raise ValueError("a logit target needs texts to measure it on: give --contexts FILE")
    texts = read_context_file(args.contexts) if args.contexts else None
    started = time.time()
    device = resolve_device(args.device)
    dictionaries = load_dictionaries(args.saes, device=device)  # before the model: fail fast on bad files
    model = load_model(args.model, device=device)
    options = {"direct_effects": args.direct, "max_candidates": args.max_candidates}
    if args.logit:
        target = logit_target(model, args.logit, args.logit_other)
        result = run_upstream_trace(model, dictionaries, target, contexts_from_texts(model, texts, target),
                                    method=args.method, depth=args.depth, top_k_per_layer=args.top_k, **options)
    else:
        corpus = None
        if args.scan_contexts > 0:
            from sae.corpus import load_corpus

            corpus = load_corpus(args.corpus)
        result = trace_feature(model, dictionaries, args.feature, corpus=corpus, texts=texts, method=args.method,
                               depth=args.depth, top_k_per_layer=args.top_k, n_contexts=args.n_contexts,
                               scan_contexts=args.scan_contexts, context_size=args.context_size, seed=args.seed,
                               **options)
    path = save_graph_json(result.graph, args.out)
    print(summarize(result.graph, n_paths=args.paths))
    if args.compare:
        print(compare_methods(model, dictionaries, result, args))
    graph = result.graph
    print(f"\nwrote {path} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges) "
          f"in {time.time() - started:.0f} s")


def compare_methods(model, dictionaries, result, args, top_n: int = 30) -> str:
    """Trace the same target on the same contexts with the other method; the agreement as text."""
    from circuits.tracing import method_agreement, run_upstream_trace, target_from_graph

    other = "ablation" if args.method == "attribution" else "attribution"
    again = run_upstream_trace(model, dictionaries, target_from_graph(result.graph), result.contexts, method=other,
                               depth=args.depth, top_k_per_layer=args.top_k, outlier_factor=None,
                               max_candidates=args.max_candidates)
    runs = {args.method: result, other: again}
    lines = [f"\nattribution against ablation (Spearman on ablation's top {top_n} features per layer); "
             f"seconds: attribution {runs['attribution'].timings['total']:.1f}, "
             f"ablation {runs['ablation'].timings['total']:.1f}"]
    for row in method_agreement(runs["attribution"].scores, runs["ablation"].scores, top_n):
        lines.append(f"  {row.hook}: spearman {row.spearman:.3f} over {row.n} features, "
                     f"top-{top_n} overlap {row.top_overlap:.2f}")
    return "\n".join(lines)


def run_export(args) -> None:
    from circuits.export import export_graph
    from circuits.graph import load_graph_json, prune_by_cumulative_influence, prune_by_threshold, prune_top_k_per_node

    if not Path(args.graph).is_file():
        raise FileNotFoundError(f"graph file {args.graph} does not exist; write one with `sparse-circuits trace`")
    graph = load_graph_json(args.graph)
    if args.threshold is not None:
        graph = prune_by_threshold(graph, args.threshold)
    if args.top_k_per_node is not None:
        graph = prune_top_k_per_node(graph, args.top_k_per_node)
    if args.influence is not None:
        graph = prune_by_cumulative_influence(graph, args.influence)
    if args.shares:
        from circuits.tracing import relative_graph

        graph = relative_graph(graph)
    result = export_graph(graph, args.output, args.fmt)
    print(f"wrote {result.path} ({result.fmt}, {result.renderer}; {graph.number_of_nodes()} nodes, "
          f"{graph.number_of_edges()} edges)")
    for extra in result.extra_paths:
        print(f"wrote {extra}")
    if result.note:
        print(f"note: {result.note}")


def run(args) -> None:
    """Dispatch on args.command ("trace" or "export")."""
    {"trace": run_trace, "export": run_export}[args.command](args)


def _standalone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-circuits")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser
