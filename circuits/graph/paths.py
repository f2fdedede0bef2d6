"""The strongest paths into a graph's target, and a readable summary of them."""

from __future__ import annotations

from typing import NamedTuple

import networkx as nx

from circuits.graph.schema import describe_node, node_order_key, target_node


class CircuitPath(NamedTuple):
    """One path into the target: its nodes (source first) and the signed effect of each edge."""

    nodes: tuple[str, ...]
    effects: tuple[float, ...]  # len(nodes) - 1
    strength: float  # product of |effects|

    @property
    def sign(self) -> int:
        """The net sign along the path: the product of the edge signs."""
        return -1 if sum(effect < 0 for effect in self.effects) % 2 else 1


def strongest_paths(graph: nx.DiGraph, n: int = 5) -> list[CircuitPath]:
    """The n paths into the target with the largest product of |effect|, strongest first.

    Paths start at nodes with no incoming edges (inputs) and end at the target.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    target = target_node(graph)
    relevant = graph.subgraph(nx.ancestors(graph, target) | {target})
    if not nx.is_directed_acyclic_graph(relevant):
        raise ValueError("strongest_paths needs an acyclic graph, but the target's ancestors contain a cycle")

    def order(path: CircuitPath) -> tuple:
        return (-path.strength, [node_order_key(graph, node) for node in path.nodes])

    # best[node]: the n strongest paths from node to the target. Each one's tail from the next
    # node is among that node's n strongest, so keeping n per node is exact.
    best: dict[str, list[CircuitPath]] = {target: [CircuitPath((target,), (), 1.0)]}
    for node in reversed(list(nx.topological_sort(relevant))):
        if node == target:
            continue
        extended = [CircuitPath((node, *tail.nodes), (effect, *tail.effects), abs(effect) * tail.strength)
                    for _, child, effect in relevant.out_edges(node, data="effect") for tail in best[child]]
        best[node] = sorted(extended, key=order)[:n]
    sources = [node for node in relevant if node != target and relevant.in_degree(node) == 0]
    return sorted((path for source in sources for path in best[source]), key=order)[:n]


def format_paths(graph: nx.DiGraph, paths: list[CircuitPath]) -> str:
    """A readable summary of paths, one hop per line."""
    if not paths:
        return "no paths into the target"
    blocks = []
    for rank, path in enumerate(paths, start=1):
        lines = [f"{rank}. strength {path.strength:.4g}, net sign {'+' if path.sign > 0 else '-'}",
                 f"     {describe_node(graph, path.nodes[0])}"]
        for effect, node in zip(path.effects, path.nodes[1:]):
            lines.append(f"       --({effect:+.3g})--> {describe_node(graph, node)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
