"""Checking a graph against the schema, node-link data, and JSON files (deterministic bytes)."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable

import networkx as nx

from circuits.graph.schema import (LIST_ATTRIBUTES, METHODS, NODE_KINDS, SCHEMA_NAME, SCHEMA_VERSION,
                                   GraphFormatError, sorted_edges, sorted_nodes)
from sae.assets import atomic_write_text

_SCHEMA_HINT = "build graphs with the helpers in circuits.graph; the schema is in its docstring"


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
    except RecursionError:
        raise GraphFormatError(f"{path} is not a sparse-circuits graph: it is nested too deeply to read") from None
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
    for name in LIST_ATTRIBUTES:
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
