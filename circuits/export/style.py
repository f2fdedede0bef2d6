"""What every diagram shares: colours, the title, the text and tooltips of nodes and edges, and
the rows (one per layer) that the DOT source and the built-in layout both use."""

from __future__ import annotations

import networkx as nx

from circuits.graph import describe_node, node_title, printable, quote_token, sorted_nodes, target_node

POSITIVE_COLOUR = "#2166ac"  # blue
NEGATIVE_COLOUR = "#b2182b"  # red
# fill, border for each kind of node
NODE_COLOURS = {"feature": ("#e8f0fb", "#4a6fa5"), "error": ("#e0e0e0", "#7f7f7f"),
                "token": ("#fff4d6", "#b08d2e"), "output": ("#fde2cf", "#c0504d")}
TARGET_BORDER = "#c0504d"
ERROR_TERM = "error term: the part of the activation the dictionary does not reconstruct"


def diagram_title(graph: nx.DiGraph) -> str:
    parts = [f"Circuit into {node_title(graph, target_node(graph))}"]
    parts += [printable(str(graph.graph[key])) for key in ("model", "method") if graph.graph.get(key)]
    return " · ".join(parts)


def node_lines(graph: nx.DiGraph, node: str) -> list[str]:
    """The text in a node's box: its title, then its label and up to 3 top tokens (or the token)."""
    data = graph.nodes[node]
    lines = [node_title(graph, node)]
    if data["kind"] == "token":
        return lines + [quote_token(data.get("label", ""), 16)]
    if data["kind"] == "feature":
        label = printable(data.get("label", ""))
        if label:
            lines.append(label if len(label) <= 22 else label[:21] + "…")
        lines += [quote_token(token, 14) for token in data.get("top_tokens", [])[:3]]
    return lines


def node_tooltip(graph: nx.DiGraph, node: str) -> str:
    data = graph.nodes[node]
    if data["kind"] == "error":
        return f"{printable(node)}\n{ERROR_TERM}"
    return f"{printable(node)}\nactivation {float(data.get('activation', 0.0)):.4g}"


def edge_tooltip(graph: nx.DiGraph, source: str, target: str) -> str:
    edge = graph.edges[source, target]
    return (f"{describe_node(graph, source)} -> {describe_node(graph, target)}: "
            f"effect {edge['effect']:+.4g} ({edge.get('method', '')})")


def edge_colour(effect: float) -> str:
    return NEGATIVE_COLOUR if effect < 0 else POSITIVE_COLOUR


def edge_scale(graph: nx.DiGraph):
    """|effect| -> [0, 1], relative to the strongest edge."""
    strongest = max((abs(effect) for _, _, effect in graph.edges(data="effect")), default=0.0)
    return lambda effect: abs(effect) / strongest if strongest > 0 else 1.0


def layer_rows(graph: nx.DiGraph) -> list[tuple[str, list[str]]]:
    """(row label, nodes) for each layer present, lowest layer first, nodes in node order."""
    layers: dict[int, list[str]] = {}
    for node in sorted_nodes(graph):
        layers.setdefault(graph.nodes[node]["layer"], []).append(node)
    rows = []
    for layer, members in sorted(layers.items()):
        kinds = {graph.nodes[node]["kind"] for node in members}
        label = "tokens" if kinds == {"token"} else "output" if "output" in kinds else f"L{layer}"
        rows.append((label, members))
    return rows
