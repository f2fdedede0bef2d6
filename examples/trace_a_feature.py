"""Trace one feature's upstream circuit across the demo's three SAE layers and export its diagram.

Picks an active feature at the deepest layer (or --feature HOOK:INDEX), finds 12 corpus contexts
where it fires strongly, scores every upstream feature by attribution (one backward pass per node),
and writes graph.json (networkx node-link), diagram.svg and diagram.html into --out.

    python examples/trace_a_feature.py [--saes FOLDER] [--feature HOOK:INDEX] [--out runs/example_trace]
"""

import argparse
import sys
from pathlib import Path

import networkx as nx

from circuits.graph import load_graph_json
from circuits.models import load_model
from sae.assets import cache_dir
from sae.corpus import load_corpus
from sae.io import load_dictionaries
from sparse_circuits.pipelines.trace import trace_and_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saes", type=Path, default=cache_dir() / "demo" / "saes")
    parser.add_argument("--feature", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/example_trace"))
    args = parser.parse_args()
    if not args.saes.exists():
        sys.exit(f"error: no SAEs at {args.saes}; run `sparse-circuits demo` first or pass --saes FOLDER")
    model = load_model("smollm2-135m")
    dictionaries = load_dictionaries(args.saes)  # {hook: dictionary}, one folder per hook point
    paths = trace_and_export(model, dictionaries, feature=args.feature, corpus=load_corpus("registry"),
                             out_dir=args.out)
    graph = load_graph_json(paths["graph.json"])  # a plain networkx.DiGraph
    print(f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges; "
          f"longest path: {len(nx.dag_longest_path(graph))} nodes")
    for name, path in paths.items():
        print(f"  {name:<13} {path}")


if __name__ == "__main__":
    main()
