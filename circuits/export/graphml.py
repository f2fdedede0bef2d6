"""GraphML through networkx. GraphML holds only scalars, so each attribute that has a list or dict
value (or mixed types, or text XML cannot carry) is stored as a JSON string; the graph attribute
`sparse_circuits_json_attributes` lists which, and `read_graphml_graph` decodes them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import networkx as nx

from circuits.graph import GraphFormatError, graph_to_node_link, validate_graph

JSON_ATTRIBUTES_KEY = "sparse_circuits_json_attributes"


def graphml_bytes(graph: nx.DiGraph) -> bytes:
    """The graph as GraphML, with non-scalar attributes as JSON strings (listed in the file)."""
    data = graph_to_node_link(graph)  # sorted, plain values, validated
    node_attrs = [{key: value for key, value in entry.items() if key != "id"} for entry in data["nodes"]]
    edge_attrs = [{key: value for key, value in entry.items() if key not in ("source", "target")}
                  for entry in data["edges"]]
    encoded = {"graph": _names_needing_json([data["graph"]]), "node": _names_needing_json(node_attrs),
               "edge": _names_needing_json(edge_attrs)}
    ready = nx.DiGraph()
    ready.graph.update(_encode(data["graph"], encoded["graph"]))
    ready.graph[JSON_ATTRIBUTES_KEY] = json.dumps(encoded, sort_keys=True)
    for entry, attrs in zip(data["nodes"], node_attrs):
        _check_xml_text(entry["id"])
        ready.add_node(entry["id"], **_encode(attrs, encoded["node"]))
    for entry, attrs in zip(data["edges"], edge_attrs):
        ready.add_edge(entry["source"], entry["target"], **_encode(attrs, encoded["edge"]))
    buffer = io.BytesIO()
    nx.write_graphml(ready, buffer, infer_numeric_types=True)
    return buffer.getvalue()


def read_graphml_graph(path: str | Path) -> nx.DiGraph:
    """A graph written by export_graph(..., "graphml"), with its JSON-string attributes decoded."""
    loaded = nx.read_graphml(Path(path))
    attributes = dict(loaded.graph)
    for key in ("node_default", "edge_default"):  # added by networkx's reader
        attributes.pop(key, None)
    encoded = json.loads(attributes.pop(JSON_ATTRIBUTES_KEY, "{}"))
    graph = nx.DiGraph()
    graph.graph.update(_decode(attributes, encoded.get("graph", [])))
    for node, attrs in loaded.nodes(data=True):
        graph.add_node(node, **_decode(attrs, encoded.get("node", [])))
    for source, target, attrs in loaded.edges(data=True):
        graph.add_edge(source, target, **_decode(attrs, encoded.get("edge", [])))
    try:
        validate_graph(graph)
    except GraphFormatError as error:
        raise GraphFormatError(f"{path}: {error}") from error
    return graph


def _names_needing_json(attribute_dicts: list[dict[str, Any]]) -> list[str]:
    """Attribute names GraphML cannot hold as one scalar type: lists, dicts, None, mixed types,
    or text with characters XML cannot carry faithfully (control characters, carriage returns)."""
    values: dict[str, list[Any]] = {}
    for attrs in attribute_dicts:
        for name, value in attrs.items():
            values.setdefault(name, []).append(value)
    needing = []
    for name, seen in values.items():
        types = {type(value) for value in seen}
        kind = types.pop() if len(types) == 1 else None
        if kind not in (str, int, float, bool) or (kind is str and not all(map(_xml_safe, seen))):
            needing.append(name)
    return sorted(needing)


_XML_UNSAFE = re.compile("[^\t\n\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(text: str) -> bool:
    return _XML_UNSAFE.search(text) is None


def _check_xml_text(node: str) -> None:
    if not _xml_safe(node.replace("\r", "")):
        raise ValueError(f"node id {node!r} contains characters XML cannot hold, so it cannot go in GraphML; "
                         "export as json instead")


def _encode(attrs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {key: json.dumps(value, sort_keys=True) if key in names else value for key, value in attrs.items()}


def _decode(attrs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {key: json.loads(value) if key in names else value for key, value in attrs.items()}
