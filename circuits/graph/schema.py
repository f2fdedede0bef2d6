"""Node and edge ids, the helpers that build a graph following the schema (see `circuits.graph`),
and reading helpers: the target, the node order, and readable names for nodes and tokens."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx

NODE_KINDS = ("token", "feature", "error", "output")  # also the order of kinds within a layer
METHODS = ("attribution", "ablation")
SCHEMA_NAME = "sparse-circuits/graph"
SCHEMA_VERSION = 1
OUTPUT_NODE = "output"
LIST_ATTRIBUTES = ("top_tokens", "promoted_tokens", "suppressed_tokens")


class GraphFormatError(ValueError):
    """Data that is not a sparse-circuits graph; the message says what is wrong."""


# --- building -------------------------------------------------------------------------------


def feature_node_id(hook: str, index: int) -> str:
    return f"{hook}:{int(index)}"


def error_node_id(hook: str) -> str:
    return f"{hook}:error"


def token_node_id(position: int) -> str:
    return f"token:{int(position)}"


def add_node(graph: nx.DiGraph, node_id: str, kind: str, layer: int, hook: str = "", *, index: int = -1,
             **attrs: Any) -> str:
    """Add a node with every schema attribute (defaults for those not given); returns its id.

    Adding an existing id again only updates the attributes given.
    """
    if kind not in NODE_KINDS:
        raise ValueError(f"node kind {kind!r} is not one of {NODE_KINDS}")
    given = {"kind": kind, "layer": int(layer), "hook": hook, "index": int(index), **attrs}
    if "activation" in given:
        given["activation"] = float(given["activation"])
    if node_id in graph:
        graph.nodes[node_id].update(given)
    else:
        defaults: dict[str, Any] = {"activation": 0.0, "label": "", "contexts": [], "is_target": False}
        defaults.update({name: [] for name in LIST_ATTRIBUTES})
        graph.add_node(node_id, **{**defaults, **given})
    if given.get("is_target"):
        set_target(graph, node_id)
    return node_id


def add_feature_node(graph: nx.DiGraph, hook: str, layer: int, index: int, **attrs: Any) -> str:
    return add_node(graph, feature_node_id(hook, index), "feature", layer, hook, index=index, **attrs)


def add_error_node(graph: nx.DiGraph, hook: str, layer: int, **attrs: Any) -> str:
    return add_node(graph, error_node_id(hook), "error", layer, hook, index=-1, **attrs)


def add_token_node(graph: nx.DiGraph, position: int, token: str, **attrs: Any) -> str:
    """An input token; its text is the label and its position the index."""
    return add_node(graph, token_node_id(position), "token", -1, "", index=position, label=token, **attrs)


def add_output_node(graph: nx.DiGraph, n_layers: int, node_id: str = OUTPUT_NODE, label: str = "",
                    is_target: bool = True, **attrs: Any) -> str:
    """The output (or a logit target like "logit: Mary"); by default it becomes the graph's target."""
    return add_node(graph, node_id, "output", n_layers, "", index=-1, label=label, is_target=is_target, **attrs)


def set_target(graph: nx.DiGraph, node_id: str) -> None:
    """Make `node_id` the graph's target (and the only node with is_target set)."""
    if node_id not in graph:
        raise ValueError(f"target {node_id!r} is not a node of the graph; add it first")
    for node, data in graph.nodes(data=True):
        if data.get("is_target"):
            data["is_target"] = node == node_id
    graph.nodes[node_id]["is_target"] = True
    graph.graph["target"] = node_id


def add_edge(graph: nx.DiGraph, source: str, target: str, effect: float, method: str) -> None:
    """Add (or replace) the edge source -> target with its signed effect."""
    for node in (source, target):
        if node not in graph:
            raise ValueError(f"edge {source!r} -> {target!r}: node {node!r} is not in the graph; "
                             "add it first (add_feature_node, add_error_node, ...)")
    if source == target:
        raise ValueError(f"edge {source!r} -> itself: a circuit graph has no self-loops")
    if method not in METHODS:
        raise ValueError(f"edge method {method!r} is not one of {METHODS}")
    effect = float(effect)
    if not math.isfinite(effect):
        raise ValueError(f"edge {source!r} -> {target!r} has effect {effect}; expected a finite number")
    graph.add_edge(source, target, effect=effect, weight=abs(effect), sign=-1 if effect < 0 else 1,
                   method=method)


# --- reading ----------------------------------------------------------------------------------


def target_node(graph: nx.DiGraph) -> str:
    """The graph's target node id (graph attribute `target`)."""
    target = graph.graph.get("target")
    if target is None:
        raise ValueError("the graph has no 'target' attribute; set it with set_target(graph, node_id)")
    if target not in graph:
        raise ValueError(f"the graph's target {target!r} is not one of its nodes")
    return target


def node_order_key(graph: nx.DiGraph, node: str) -> tuple:
    data = graph.nodes[node]
    kind = data.get("kind")
    kind_rank = NODE_KINDS.index(kind) if kind in NODE_KINDS else len(NODE_KINDS)
    return (data.get("layer", 0), kind_rank, data.get("index", -1), node)


def sorted_nodes(graph: nx.DiGraph) -> list[str]:
    """Nodes by layer, kind (token, feature, error, output), index, id."""
    return sorted(graph.nodes, key=lambda node: node_order_key(graph, node))


def sorted_edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return sorted(graph.edges, key=lambda edge: (node_order_key(graph, edge[0]), node_order_key(graph, edge[1])))


def quote_token(token: str, max_chars: int = 24) -> str:
    """A token as a double-quoted, printable string (`" John"`, `"\\n"`), shortened with an ellipsis."""
    text = printable(token)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return '"' + text.replace('"', '\\"') + '"'


def printable(text: str) -> str:
    r"""`text` with backslashes doubled and unprintable characters escaped (`\n`, `\t`, `\x00`)."""
    pieces = []
    for char in str(text):
        if char == "\\":
            pieces.append("\\\\")
        elif char.isprintable():
            pieces.append(char)
        elif char in "\n\t\r":
            pieces.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif ord(char) < 0x100:
            pieces.append(f"\\x{ord(char):02x}")
        else:
            pieces.append(f"\\u{ord(char):04x}")
    return "".join(pieces)


def node_title(graph: nx.DiGraph, node: str) -> str:
    """A short name: `L12 #1234`, `L12 error`, `tok 3`, or the output's label."""
    data = graph.nodes[node]
    kind = data.get("kind")
    if kind == "feature":
        return f"L{data.get('layer')} #{data.get('index')}"
    if kind == "error":
        return f"L{data.get('layer')} error"
    if kind == "token":
        return f"tok {data.get('index')}"
    return printable(data.get("label") or node)


def describe_node(graph: nx.DiGraph, node: str, max_tokens: int = 3) -> str:
    """The title plus what identifies the node: `L12 #1234 ("Mary", " John")`, `tok 3 " Mary"`."""
    data = graph.nodes[node]
    title = node_title(graph, node)
    if data.get("kind") == "token":
        return f"{title} {quote_token(data.get('label', ''))}"
    if data.get("kind") == "feature":
        label = f" [{printable(data['label'])}]" if data.get("label") else ""
        tokens = data.get("top_tokens", [])[:max_tokens]
        shown = f" ({', '.join(quote_token(token) for token in tokens)})" if tokens else ""
        return f"{title}{label}{shown}"
    return title
