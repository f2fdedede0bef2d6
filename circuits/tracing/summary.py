"""A traced graph for reading: edges as shares of the receiver's activation, and a text summary."""

from __future__ import annotations

import networkx as nx

from circuits import graph as circuit_graph


def relative_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose edges hold the share of the receiver's activation the source supplies (effect /
    the receiver's activation; 0 where that activation is not positive). Shares are comparable across
    the graph, and a path's strength (the product of |shares|) estimates the share of the target that
    flows along it. Graph attribute `edge_units` says so."""
    relative = graph.copy()
    for source, receiver, data in relative.edges(data=True):
        activation = float(graph.nodes[receiver].get("activation", 0.0))
        effect = data["effect"] / activation if activation > 0 else 0.0
        data.update(effect=effect, weight=abs(effect), sign=-1 if effect < 0 else 1)
    relative.graph["edge_units"] = "share of the receiving node's activation"
    return relative


def summarize(graph: nx.DiGraph, n_paths: int = 5) -> str:
    """A readable summary: the target, each layer's strongest features, and the strongest paths."""
    target = circuit_graph.target_node(graph)
    data = graph.nodes[target]
    lines = [f"target {circuit_graph.describe_node(graph, target)}: activation {data['activation']:.4g} "
             f"({graph.graph.get('method', '')}, {graph.graph.get('n_contexts', '?')} contexts)"]
    upstream = graph.graph.get("direction", "upstream") == "upstream"
    key = "effect_on_target" if upstream else "effect_of_source"
    layers = sorted({d["layer"] for n, d in graph.nodes(data=True) if n != target}, reverse=upstream)
    lines.append(f"strongest nodes per layer ({'effect on the target' if upstream else 'effect of the source'}):")
    for layer in layers:
        members = [n for n, d in graph.nodes(data=True) if d["layer"] == layer and n != target and key in d]
        members.sort(key=lambda n: -abs(graph.nodes[n][key]))
        shown = ", ".join(f"{circuit_graph.describe_node(graph, n)} {graph.nodes[n][key]:+.3g}" for n in members[:5])
        lines.append(f"  layer {layer}: {shown}")
    if upstream:
        lines.append("strongest paths (each hop: the share of the receiver's activation the source supplies; "
                     "strength: the share of the target along the path):")
        relative = relative_graph(graph)
        lines.append(circuit_graph.format_paths(relative, circuit_graph.strongest_paths(relative, n_paths)))
    return "\n".join(lines)
