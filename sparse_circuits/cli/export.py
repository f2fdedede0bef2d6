"""`sparse-circuits export`: a saved circuit graph as a diagram or file, optionally pruned first."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.cli.common import add_subcommand, positive_int
from sparse_circuits.validation import fraction, nonnegative_float

DESCRIPTION = """Write a saved circuit graph as svg, png, dot, graphml, html or json (default: from the
suffix of -o). SVG and PNG use Graphviz `dot` when installed, else a built-in layout. Optionally prune
first: --threshold (min |effect|), --top-k-per-node, --influence (cumulative influence fraction)."""

FORMATS = ["svg", "png", "dot", "graphml", "html", "json"]


def add_parser(commands) -> argparse.ArgumentParser:
    parser = add_subcommand(commands, "export", help="export a circuit graph as a diagram or file",
                            description=DESCRIPTION)
    parser.add_argument("graph", type=Path, help="graph JSON written by `sparse-circuits trace`")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="output format (default: from the suffix of -o)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="file to write")
    parser.add_argument("--threshold", type=nonnegative_float, help="keep edges with |effect| at least this (default: all)")
    parser.add_argument("--top-k-per-node", type=positive_int,
                        help="keep each node's k strongest incoming edges (default: all)")
    parser.add_argument("--influence", type=fraction,
                        help="keep the nodes covering this fraction of influence, in (0, 1] (default: all)")
    parser.add_argument("--shares", action="store_true",
                        help="show each edge as the share of the receiving node's activation its source supplies "
                             "(comparable across the diagram) instead of the effect in the receiver's units")
    parser.add_argument("--dashboard", type=Path, metavar="SITE",
                        help="a site written by `sparse-circuits dashboard`: feature nodes at its hook link to their "
                             "pages (html; default: no links)")
    return parser


def check_arguments(args) -> None:
    """The graph file and the output path, before torch is imported."""
    from sparse_circuits import validation

    validation.input_file(args.graph, "graph file")
    if not isinstance(validation.read_json_file(args.graph, "graph file"), dict):  # UTF-8, JSON, not absurdly deep
        raise validation.InputError(f"graph file {args.graph} is not a sparse-circuits graph (not a JSON object); "
                                    "write one with `sparse-circuits trace`")
    validation.output_file(args.output, "-o")
    if args.dashboard is not None:
        validation.dashboard_site(args.dashboard)


def run(args) -> None:
    from sparse_circuits.pipelines.trace import export_saved_graph

    result, graph = export_saved_graph(args.graph, args.output, args.fmt, threshold=args.threshold,
                                       top_k_per_node=args.top_k_per_node, influence=args.influence,
                                       shares=args.shares, dashboard=args.dashboard)
    print(f"wrote {result.path} ({result.fmt}, {result.renderer}; {graph.number_of_nodes()} nodes, "
          f"{graph.number_of_edges()} edges)")
    for extra in result.extra_paths:
        print(f"wrote {extra}")
    if result.note:
        print(f"note: {result.note}")
