"""The legend every diagram carries: what a node's colour and an edge's colour and width mean, and
what a "share" is when edges hold shares. The DOT source (a table in the graph label), the built-in
SVG and the matplotlib PNG draw these same rows; the HTML page embeds the SVG, legend included."""

from __future__ import annotations

from typing import NamedTuple

import networkx as nx

from circuits.export.style import NEGATIVE_COLOUR, NODE_COLOURS, POSITIVE_COLOUR, TARGET_BORDER
from circuits.graph import target_node

ROW_HEIGHT = 18.0  # px per legend row in the built-in SVG and PNG
SWATCH_WIDTH = 34.0  # px of the node box or edge stroke drawn before each row's text
WIDTH_SWATCH_COLOUR = "#666666"
KIND_ORDER = ("feature", "error", "token", "output")
KIND_TEXT = {
    "feature": "dictionary feature: L<layer> #<index>, then its label and the tokens it fires most on",
    "error": "error term: the part of the activation at that layer the dictionary does not reconstruct",
    "token": "input token: tok <position>",
    "output": "output: the logit (or logit difference) that was traced",
}
SHARE_TEXT = ("edge width: |share|, the fraction of the receiving node's activation that the source supplies "
              "(comparable across the diagram)")
EFFECT_TEXT = "edge width: |effect| on the receiving node, in that node's units, relative to the strongest edge"
ROWS_TEXT = "rows: one per layer (L<n>), inputs at the bottom, the target on top"


class LegendRow(NamedTuple):
    swatch: str  # "node", "edge" or "" (text only)
    text: str
    fill: str = ""
    border: str = ""
    dashed: bool = False
    colour: str = ""
    width: float = 0.0  # px of an edge swatch's stroke


def edges_are_shares(graph: nx.DiGraph) -> bool:
    """Whether the edges hold shares of the receiver's activation (circuits.tracing.relative_graph)."""
    return str(graph.graph.get("edge_units", "")).startswith("share")


def legend_rows(graph: nx.DiGraph) -> list[LegendRow]:
    """The legend of this graph's diagram: node kinds present, the target, edge signs and widths."""
    kinds = {kind for _, kind in graph.nodes(data="kind")}
    rows = [LegendRow("node", KIND_TEXT[kind], *NODE_COLOURS[kind], dashed=kind == "error")
            for kind in KIND_ORDER if kind in kinds]
    target = graph.nodes[target_node(graph)]
    if target["kind"] != "output":
        rows.append(LegendRow("node", "thick red border: the traced target", NODE_COLOURS[target["kind"]][0],
                              TARGET_BORDER))
    shown = "share" if edges_are_shares(graph) else "effect"
    rows += [LegendRow("edge", f"blue edge: positive {shown}, the source raises the receiving node",
                       colour=POSITIVE_COLOUR, width=3.0),
             LegendRow("edge", f"red edge: negative {shown}, the source lowers the receiving node",
                       colour=NEGATIVE_COLOUR, width=3.0),
             LegendRow("edge", SHARE_TEXT if edges_are_shares(graph) else EFFECT_TEXT, colour=WIDTH_SWATCH_COLOUR,
                       width=5.0),
             LegendRow("", ROWS_TEXT)]
    return rows


def legend_text(graph: nx.DiGraph) -> str:
    """The legend as plain lines (for captions and tests)."""
    return "\n".join(row.text for row in legend_rows(graph))


def legend_height(graph: nx.DiGraph) -> float:
    """px the legend takes below the built-in layout (a gap, a heading, the rows)."""
    return ROW_HEIGHT * (len(legend_rows(graph)) + 1) + 12.0


def legend_width(graph: nx.DiGraph, char_width: float) -> float:
    """px the widest legend row takes, swatch included."""
    return SWATCH_WIDTH + 10.0 + char_width * max(len(row.text) for row in legend_rows(graph))
