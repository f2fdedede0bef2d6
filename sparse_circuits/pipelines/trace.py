"""Trace a feature or a logit into a graph and export it: the steps `trace`, `export` and the demo run.

`trace_and_export` is the demo's step: trace one feature (picked automatically when not given) and
write graph.json, diagram.svg, diagram.html and summary.txt.
"""

from __future__ import annotations

import json
from pathlib import Path


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
    result = run_upstream_trace(model, dictionaries, target, contexts, method=method, depth=depth,
                                top_k_per_layer=top_k_per_layer, scan=scan, progress=progress, **options)
    return with_provenance(result, model, dictionaries, seed)


def with_provenance(result, model, dictionaries, seed: int | None):
    """The trace result with graph.graph["provenance"]: model and dictionary sha256s and the seed."""
    from circuits.models import provenance

    result.graph.graph["provenance"] = provenance(model, dictionaries, seed)
    return result


def feature_request(feature, dictionaries) -> tuple[str, int | None]:
    """(hook, index, or None to pick one) from a FeatureTarget, "HOOK:INDEX", "HOOK:auto", "auto" or None
    (None and "auto": the deepest dictionary)."""
    from circuits.hooks import hook_order
    from circuits.tracing import FeatureTarget, parse_feature

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
    from sae.assets import atomic_write_text
    from sae.locking import folder_lock

    summary = summarize(graph)
    with folder_lock(out_dir):  # another run writing the same folder is refused: never a mix of two traces
        paths = {"graph.json": save_graph_json(graph, out_dir / "graph.json")}
        diagram = export_graph(shown, out_dir / "diagram.svg", "svg", warn=False)  # its note is printed once, below
        paths["diagram.svg"] = diagram.path
        paths["diagram.html"] = export_graph(shown, out_dir / "diagram.html", "html").path
        atomic_write_text(out_dir / "summary.txt", summary + "\n")
    paths["summary.txt"] = out_dir / "summary.txt"
    if progress:
        print(summary)
        if diagram.note:
            print(f"note: {diagram.note}")
    return paths


def compare_methods(model, dictionaries, result, *, method: str, depth: int, top_k_per_layer: int,
                    max_candidates: int | None = None, top_n: int = 30) -> str:
    """Trace the same target on the same contexts with the method other than `method` (the one `result`
    used); the agreement per layer as text."""
    from circuits.tracing import method_agreement, run_upstream_trace, target_from_graph

    other = "ablation" if method == "attribution" else "attribution"
    again = run_upstream_trace(model, dictionaries, target_from_graph(result.graph), result.contexts, method=other,
                               depth=depth, top_k_per_layer=top_k_per_layer, max_candidates=max_candidates)
    runs = {method: result, other: again}
    lines = [f"\nattribution against ablation (Spearman on ablation's top {top_n} features per layer); "
             f"seconds: attribution {runs['attribution'].timings['total']:.1f}, "
             f"ablation {runs['ablation'].timings['total']:.1f}"]
    for row in method_agreement(runs["attribution"].scores, runs["ablation"].scores, top_n):
        lines.append(f"  {row.hook}: spearman {row.spearman:.3f} over {row.n} features, "
                     f"top-{top_n} overlap {row.top_overlap:.2f}")
    return "\n".join(lines)


def trace_logit(model, dictionaries, token: str, other: str | None, texts: list[str], *, method: str = "attribution",
                depth: int | None = 2, top_k_per_layer: int = 10, progress: bool = True, **options):
    """Trace the logit of `token` (minus `other`'s when given) at the last position of each text."""
    from circuits.tracing import contexts_from_texts, logit_target, run_upstream_trace

    target = logit_target(model, token, other)
    result = run_upstream_trace(model, dictionaries, target, contexts_from_texts(model, texts, target), method=method,
                                depth=depth, top_k_per_layer=top_k_per_layer, progress=progress, **options)
    return with_provenance(result, model, dictionaries, None)


def export_saved_graph(graph_path: Path, output: Path, fmt: str | None = None, *, threshold: float | None = None,
                       top_k_per_node: int | None = None, influence: float | None = None, shares: bool = False,
                       dashboard: Path | None = None):
    """Load a graph written by `trace`, prune it (threshold, then top-k per node, then influence), optionally
    turn edges into shares of the receiver's activation, link feature nodes to their pages in the `dashboard`
    site (relative to the output's folder), and export it; returns (ExportResult, graph)."""
    from circuits.export import export_graph
    from circuits.graph import (load_graph_json, prune_by_cumulative_influence, prune_by_threshold,
                                prune_top_k_per_node)

    if not Path(graph_path).is_file():
        raise FileNotFoundError(f"graph file {graph_path} does not exist; write one with `sparse-circuits trace`")
    graph = load_graph_json(graph_path)
    if threshold is not None:
        graph = prune_by_threshold(graph, threshold)
    if top_k_per_node is not None:
        graph = prune_top_k_per_node(graph, top_k_per_node)
    if influence is not None:
        graph = prune_by_cumulative_influence(graph, influence)
    if shares:
        from circuits.tracing import relative_graph

        graph = relative_graph(graph)
    if dashboard is not None:
        from circuits.dashboard import link_feature_pages

        link_feature_pages(graph, dashboard, relative_to=Path(output).parent)
    return export_graph(graph, output, fmt, warn=False), graph  # the caller prints ExportResult.note
