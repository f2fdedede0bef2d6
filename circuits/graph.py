"""The circuit graph: a plain `networkx.DiGraph` of features, with pruning, paths and JSON files.

Tracing fills the graph; this module only defines what it holds, trims it and saves it. Any
networkx algorithm works on it directly.

Schema
------
Edges point upstream -> downstream (cause -> effect).

Node ids are strings:
    feature  "{hook}:{index}"    e.g. "blocks.12.hook_resid_post:1234"
    error    "{hook}:error"      the dictionary's reconstruction error at that hook
    token    "token:{position}"  an input token
    output   "output", or a logit target such as "logit: Mary"

Node attributes (every node has all of them when built with the helpers below):
    kind               "feature" | "error" | "token" | "output"
    hook               TransformerLens hook name ("" for tokens and the output)
    layer              int: the block; tokens -1, the output n_layers
    index              int: the feature index; the position for tokens; -1 if none
    activation         float: mean activation over the traced contexts
    label              str: a human description, may be ""; for tokens the token text
    top_tokens         list[str]: tokens the feature fires on most
    promoted_tokens    list[str]: tokens whose logits the feature raises directly (may be empty)
    suppressed_tokens  list[str]: tokens whose logits it lowers directly (may be empty)
    contexts           list of {"tokens": [str, ...], "position": int, "activation": float}:
                       top-activating contexts, the activating token at `position`
    is_target          bool: this node is the graph's target

Edge attributes:
    effect  float, signed: how much the source changes the target
    weight  float: abs(effect)
    sign    +1 or -1 (+1 for a zero effect)
    method  "attribution" (gradient estimate) | "ablation" (exact patching)

Graph attributes: `target` (the target node id), `method`, `model`, plus free-form metadata.

Node order, wherever one is needed (files, layouts): by layer, then kind (token, feature, error,
output), then index, then id. See `sorted_nodes`.

Files are networkx node-link JSON (edges under the key "edges") with two extra top-level keys,
`schema` and `schema_version`, that networkx ignores.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import networkx as nx

from sae.assets import atomic_write_text

NODE_KINDS = ("token", "feature", "error", "output")  # also the order of kinds within a layer
METHODS = ("attribution", "ablation")
SCHEMA_NAME = "sparse-circuits/graph"
SCHEMA_VERSION = 1
OUTPUT_NODE = "output"

_LIST_ATTRIBUTES = ("top_tokens", "promoted_tokens", "suppressed_tokens")
_SCHEMA_HINT = "build graphs with the helpers in circuits.graph; the schema is in its docstring"


class GraphFormatError(ValueError):
    """Data that is not a sparse-circuits graph; the message says what is wrong."""


class CircuitPath(NamedTuple):
    """One path into the target: its nodes (source first) and the signed effect of each edge."""

    nodes: tuple[str, ...]
    effects: tuple[float, ...]  # len(nodes) - 1
    strength: float  # product of |effects|

    @property
    def sign(self) -> int:
        """The net sign along the path: the product of the edge signs."""
        return -1 if sum(effect < 0 for effect in self.effects) % 2 else 1


# --- building -------------------------------------------------------------------------------


def feature_node_id(hook: str, index: int) -> str:
    return f"{hook}:{int(index)}"


def error_node_id(hook: str) -> str:
    return f"{hook}:error"


def token_node_id(position: int) -> str:
    return f"token:{int(position)}"


def add_node(graph: nx.DiGraph, node_id: str, kind: str, layer: int, hook: str = "", index: int = -1,
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
        defaults.update({name: [] for name in _LIST_ATTRIBUTES})
        graph.add_node(node_id, **{**defaults, **given})
    if given.get("is_target"):
        set_target(graph, node_id)
    return node_id


def add_feature_node(graph: nx.DiGraph, hook: str, layer: int, index: int, **attrs: Any) -> str:
    return add_node(graph, feature_node_id(hook, index), "feature", layer, hook, index, **attrs)


def add_error_node(graph: nx.DiGraph, hook: str, layer: int, **attrs: Any) -> str:
    return add_node(graph, error_node_id(hook), "error", layer, hook, -1, **attrs)


def add_token_node(graph: nx.DiGraph, position: int, token: str, **attrs: Any) -> str:
    """An input token; its text is the label and its position the index."""
    return add_node(graph, token_node_id(position), "token", -1, "", position, label=token, **attrs)


def add_output_node(graph: nx.DiGraph, n_layers: int, node_id: str = OUTPUT_NODE, label: str = "",
                    is_target: bool = True, **attrs: Any) -> str:
    """The output (or a logit target like "logit: Mary"); by default it becomes the graph's target."""
    return add_node(graph, node_id, "output", n_layers, "", -1, label=label, is_target=is_target, **attrs)


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


# --- pruning ----------------------------------------------------------------------------------


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
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
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


# --- paths ------------------------------------------------------------------------------------


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


# --- validation and files ---------------------------------------------------------------------


def validate_graph(graph: Any) -> None:
    """Raise GraphFormatError listing what does not follow the schema (nothing if all is well)."""
    problems = list(_schema_problems(graph))
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise GraphFormatError(f"not a sparse-circuits graph: {shown}{more}. Hint: {_SCHEMA_HINT}")


def graph_to_node_link(graph: nx.DiGraph) -> dict[str, Any]:
    """The graph as node-link data (networkx layout, edges under "edges"), nodes and edges sorted,
    values plain JSON types (numpy/torch scalars become Python floats and ints)."""
    validate_graph(graph)
    nodes = []
    for node in sorted_nodes(graph):
        attrs = _plain_mapping(graph.nodes[node], f"node {node!r}")
        if "id" in attrs:
            raise ValueError(f"node {node!r} has an attribute named 'id', which node-link files reserve")
        nodes.append({"id": node, **attrs})
    edges = []
    for source, target in sorted_edges(graph):
        attrs = _plain_mapping(graph.edges[source, target], f"edge {source!r} -> {target!r}")
        if "source" in attrs or "target" in attrs:
            raise ValueError(f"edge {source!r} -> {target!r} has an attribute named 'source' or 'target', "
                             "which node-link files reserve")
        edges.append({"source": source, "target": target, **attrs})
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "directed": True, "multigraph": False,
            "graph": _plain_mapping(graph.graph, "graph"), "nodes": nodes, "edges": edges}


def graph_from_node_link(data: Any) -> nx.DiGraph:
    """The graph stored in node-link data; GraphFormatError if it is not a sparse-circuits graph."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise GraphFormatError(f"not a sparse-circuits graph: expected a node-link object with a 'nodes' list, "
                               f"got {type(data).__name__}. Hint: {_SCHEMA_HINT}")
    schema, version = data.get("schema", SCHEMA_NAME), data.get("schema_version", SCHEMA_VERSION)
    if schema != SCHEMA_NAME:
        raise GraphFormatError(f"not a sparse-circuits graph: its schema is {schema!r}, expected {SCHEMA_NAME!r}")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise GraphFormatError(f"graph schema_version {version!r} is newer than this sparse-circuits "
                               f"understands ({SCHEMA_VERSION}); upgrade sparse-circuits")
    if not data.get("directed", True) or data.get("multigraph", False):
        raise GraphFormatError("not a sparse-circuits graph: expected a directed, non-multi graph")
    edges = data.get("edges", data.get("links"))  # "links" is what networkx < 3.4 wrote by default
    if not isinstance(edges, list):
        raise GraphFormatError("not a sparse-circuits graph: expected an 'edges' list")
    graph = nx.DiGraph()
    graph.graph.update(data.get("graph") or {})
    for entry in data["nodes"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise GraphFormatError(f"not a sparse-circuits graph: node entry {entry!r} has no 'id'")
        graph.add_node(entry["id"], **{key: value for key, value in entry.items() if key != "id"})
    for entry in edges:
        if not isinstance(entry, dict) or entry.get("source") not in graph or entry.get("target") not in graph:
            raise GraphFormatError(f"not a sparse-circuits graph: edge entry {entry!r} does not join two listed nodes")
        attrs = {key: value for key, value in entry.items() if key not in ("source", "target")}
        graph.add_edge(entry["source"], entry["target"], **attrs)
    validate_graph(graph)
    return graph


def save_graph_json(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write the graph as node-link JSON (deterministic bytes, atomic); returns the path."""
    path = Path(path)
    atomic_write_text(path, graph_to_json_text(graph))
    return path


def graph_to_json_text(graph: nx.DiGraph) -> str:
    return json.dumps(graph_to_node_link(graph), sort_keys=True, indent=1, ensure_ascii=False,
                      allow_nan=False) + "\n"


def load_graph_json(path: str | Path) -> nx.DiGraph:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GraphFormatError(f"{path} is not a sparse-circuits graph: it is not JSON ({error})") from error
    try:
        return graph_from_node_link(data)
    except GraphFormatError as error:
        raise GraphFormatError(f"{path}: {error}") from error


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _schema_problems(graph: Any) -> Iterable[str]:
    if not isinstance(graph, nx.DiGraph) or graph.is_multigraph():
        yield f"expected a networkx.DiGraph, got {type(graph).__name__}"
        return
    target = graph.graph.get("target")
    if target is None:
        yield "graph attribute 'target' is missing"
    elif target not in graph:
        yield f"graph attribute 'target' names {target!r}, which is not a node"
    for node, data in graph.nodes(data=True):
        yield from _node_problems(node, data)
    for source, target_, data in graph.edges(data=True):
        where = f"edge {source!r} -> {target_!r}"
        if not _is_number(data.get("effect")):
            yield f"{where} has effect {data.get('effect')!r}, expected a finite number"
        if data.get("method") not in METHODS:
            yield f"{where} has method {data.get('method')!r}, expected one of {METHODS}"


def _node_problems(node: Any, data: dict) -> Iterable[str]:
    if not isinstance(node, str):
        yield f"node id {node!r} is not a string"
    where = f"node {node!r}"
    if data.get("kind") not in NODE_KINDS:
        yield f"{where} has kind {data.get('kind')!r}, expected one of {NODE_KINDS}"
    if not _is_int(data.get("layer")):
        yield f"{where} has layer {data.get('layer')!r}, expected an int"
    for name, check, expected in (("hook", lambda v: isinstance(v, str), "a string"),
                                  ("label", lambda v: isinstance(v, str), "a string"),
                                  ("index", _is_int, "an int"),
                                  ("activation", _is_number, "a finite number"),
                                  ("is_target", lambda v: isinstance(v, bool), "a bool")):
        if name in data and not check(data[name]):
            yield f"{where} has {name} {data[name]!r}, expected {expected}"
    for name in _LIST_ATTRIBUTES:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(token, str) for token in value):
            yield f"{where} has {name} {value!r}, expected a list of strings"
    contexts = data.get("contexts", [])
    if not isinstance(contexts, list) or not all(_is_context(context) for context in contexts):
        yield (f"{where} has malformed contexts; expected a list of "
               '{"tokens": [str, ...], "position": int, "activation": float}')


def _is_context(context: Any) -> bool:
    return (isinstance(context, dict) and isinstance(context.get("tokens"), list)
            and all(isinstance(token, str) for token in context["tokens"])
            and _is_int(context.get("position")) and _is_number(context.get("activation")))


def _plain_mapping(mapping: dict, where: str) -> dict[str, Any]:
    return {str(key): _plain(mapping[key], f"{where} attribute {key!r}") for key in sorted(mapping, key=str)}


def _plain(value: Any, where: str) -> Any:
    """`value` as plain JSON types; numpy and torch values become Python ones."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON holds only finite numbers, replace it before saving")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ValueError(f"{where} is a dict with non-string keys; JSON keys must be strings")
        return {key: _plain(value[key], where) for key in sorted(value)}
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _plain(value.tolist(), where)
    raise ValueError(f"{where} has type {type(value).__name__}, which JSON cannot hold; "
                     "convert it to a str, number, list or dict")
