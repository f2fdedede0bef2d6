"""Trimming a circuit graph: by edge strength, by each node's strongest inputs, by cumulative
influence on the target, and dropping nodes left with no path to the target. Every function
returns an independent copy and leaves its input intact."""

from __future__ import annotations

import copy
from typing import Iterable

import networkx as nx

from circuits.graph.schema import node_order_key, target_node
from sae.options import OptionError


def remove_dangling(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy without the nodes that have no path to the target (the target is always kept)."""
    target = target_node(graph)
    keep = nx.ancestors(graph, target) | {target}
    return _copy_subgraph(graph, keep)


def prune_by_threshold(graph: nx.DiGraph, min_abs_effect: float, drop_dangling: bool = True) -> nx.DiGraph:
    """A copy keeping the edges with |effect| >= min_abs_effect (then, by default, remove_dangling)."""
    if min_abs_effect < 0:
        raise ValueError(f"min_abs_effect must be >= 0, got {min_abs_effect}")
    weak = [(u, v) for u, v, effect in graph.edges(data="effect") if abs(effect) < min_abs_effect]
    return _without_edges(graph, weak, drop_dangling)


def prune_top_k_per_node(graph: nx.DiGraph, k: int, drop_dangling: bool = True) -> nx.DiGraph:
    """A copy keeping each node's k strongest incoming edges (ties: upstream node order)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    dropped = []
    for node in graph:
        incoming = sorted(graph.in_edges(node, data="effect"),
                          key=lambda edge: (-abs(edge[2]), node_order_key(graph, edge[0])))
        dropped.extend((u, v) for u, v, _ in incoming[k:])
    return _without_edges(graph, dropped, drop_dangling)


def node_influence(graph: nx.DiGraph) -> dict[str, float]:
    """Each node's influence on the target, in [0, 1] per path layer; the target has 1.

    Each node's incoming |effects| are normalised to sum to 1, giving w(u -> v); then
    influence(u) = sum over edges u -> v of w(u -> v) * influence(v). Equivalently, the sum over
    all paths from u to the target of the product of the normalised weights. Nodes with no path
    to the target have 0. The graph (the target's ancestors) must be acyclic.
    """
    target = target_node(graph)
    relevant = graph.subgraph(nx.ancestors(graph, target) | {target})
    if not nx.is_directed_acyclic_graph(relevant):
        raise ValueError("influence needs an acyclic graph, but the target's ancestors contain a cycle "
                         f"(e.g. {nx.find_cycle(relevant)})")
    incoming_total = {node: sum(abs(effect) for _, _, effect in relevant.in_edges(node, data="effect"))
                      for node in relevant}
    influence = {node: 0.0 for node in graph}
    influence[target] = 1.0
    for node in reversed(list(nx.topological_sort(relevant))):
        if node == target:
            continue
        influence[node] = sum(abs(effect) / incoming_total[child] * influence[child]
                              for _, child, effect in relevant.out_edges(node, data="effect")
                              if incoming_total[child] > 0)
    return influence


def prune_by_cumulative_influence(graph: nx.DiGraph, fraction: float, drop_dangling: bool = True) -> nx.DiGraph:
    """A copy keeping the fewest nodes whose influence (see `node_influence`) covers `fraction`
    of the total influence of all non-target nodes; the target is always kept.

    Nodes are taken by decreasing influence (ties: node order). A kept node whose only route to
    the target ran through a dropped node becomes dangling and is then removed.
    """
    if not 0 < fraction <= 1:
        raise OptionError("fraction", "{option} (the share of influence to keep) must be in (0, 1], got {value}",
                          value=fraction)
    target = target_node(graph)
    influence = node_influence(graph)
    candidates = sorted((node for node in graph if node != target and influence[node] > 0),
                        key=lambda node: (-influence[node], node_order_key(graph, node)))
    needed = fraction * sum(influence[node] for node in candidates)
    keep, covered = {target}, 0.0
    for node in candidates:
        if covered >= needed * (1 - 1e-12):
            break
        keep.add(node)
        covered += influence[node]
    pruned = _copy_subgraph(graph, keep)
    return remove_dangling(pruned) if drop_dangling else pruned


def _without_edges(graph: nx.DiGraph, edges: Iterable[tuple[str, str]], drop_dangling: bool) -> nx.DiGraph:
    pruned = copy.deepcopy(graph)
    pruned.remove_edges_from(list(edges))
    return remove_dangling(pruned) if drop_dangling else pruned


def _copy_subgraph(graph: nx.DiGraph, nodes: set[str]) -> nx.DiGraph:
    """An independent copy (attributes deep-copied) of the subgraph on `nodes`, in graph order."""
    return copy.deepcopy(graph.subgraph(node for node in graph if node in nodes).copy())
