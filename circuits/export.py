"""Files and diagrams from a circuit graph: JSON, GraphML, DOT, SVG, PNG and a self-contained HTML page.

Every format is deterministic (the same graph gives the same bytes) and written atomically.

- json: node-link JSON (see circuits.graph).
- graphml: networkx's GraphML. GraphML holds only scalars, so each attribute that has a list or
  dict value (or mixed types, or text XML cannot carry) is stored as a JSON string; the graph
  attribute `sparse_circuits_json_attributes` lists which, and `read_graphml_graph` decodes them.
- dot: Graphviz source. Layers are ranks (inputs at the bottom, the target on top), edges are
  blue for positive and red for negative effects, thicker for larger |effect|.
- svg, png: rendered by Graphviz `dot` when it is installed. Without it the picture comes from a
  built-in layered layout (SVG written here, PNG drawn with matplotlib), the DOT source is written
  beside it, and a GraphvizMissingWarning says what to install.
- html: one file with no network access: the built-in SVG diagram and, on clicking a node, its
  details and top-activating contexts. Model text is escaped in the markup, embedded as JSON with
  `<`, `>`, `&` as \\u escapes, and put into the page by script only through textContent.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import shutil
import subprocess
import unicodedata
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import networkx as nx

from circuits.graph import (GraphFormatError, describe_node, graph_to_json_text, graph_to_node_link, node_title,
                            printable, quote_token, sorted_edges, sorted_nodes, target_node, validate_graph)
from sae.assets import atomic_write_bytes, atomic_write_text

FORMATS = ("json", "graphml", "dot", "svg", "png", "html")
INSTALL_GRAPHVIZ = "apt-get install -y graphviz on Debian/Ubuntu, brew install graphviz on macOS"
POSITIVE_COLOUR = "#2166ac"  # blue
NEGATIVE_COLOUR = "#b2182b"  # red
JSON_ATTRIBUTES_KEY = "sparse_circuits_json_attributes"

_SUFFIX_FORMATS = {"gv": "dot", "htm": "html", **{fmt: fmt for fmt in FORMATS}}
# fill, border for each kind of node
_NODE_COLOURS = {"feature": ("#e8f0fb", "#4a6fa5"), "error": ("#e0e0e0", "#7f7f7f"),
                 "token": ("#fff4d6", "#b08d2e"), "output": ("#fde2cf", "#c0504d")}
_TARGET_BORDER = "#c0504d"


class GraphvizMissingWarning(UserWarning):
    """Graphviz `dot` is not installed, so a picture used the built-in layout instead."""


class ExportResult(NamedTuple):
    path: Path
    fmt: str
    renderer: str  # "graphviz", "built-in layout", "matplotlib", "networkx" or "sparse-circuits"
    extra_paths: tuple[Path, ...] = ()  # e.g. the DOT source written beside a fallback picture
    note: str = ""  # what to install for better output, when something was missing


def available_formats() -> dict[str, str]:
    """Each export format and how it is produced on this machine."""
    if shutil.which("dot"):
        svg, png = "Graphviz dot", "Graphviz dot"
    else:
        missing = f"Graphviz 'dot' not found; install it for better output: {INSTALL_GRAPHVIZ}"
        svg, png = f"built-in layered layout ({missing})", f"built-in layout drawn by matplotlib ({missing})"
    return {"json": "networkx node-link JSON", "graphml": "GraphML (list/dict attributes as JSON strings)",
            "dot": "Graphviz DOT source", "svg": svg, "png": png,
            "html": "self-contained interactive page (built-in layout, no network)"}


def export_graph(graph: nx.DiGraph, path: str | Path, fmt: str | None = None) -> ExportResult:
    """Write the graph to `path` as `fmt` (default: from the file suffix); see the module docstring."""
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    validate_graph(graph)
    if fmt == "json":
        atomic_write_text(path, graph_to_json_text(graph))
        return ExportResult(path, fmt, "sparse-circuits")
    if fmt == "graphml":
        atomic_write_bytes(path, graphml_bytes(graph))
        return ExportResult(path, fmt, "networkx")
    if fmt == "dot":
        atomic_write_text(path, to_dot(graph))
        return ExportResult(path, fmt, "sparse-circuits")
    if fmt == "html":
        atomic_write_text(path, html_page(graph))
        return ExportResult(path, fmt, "sparse-circuits")
    return _export_picture(graph, path, fmt)


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in _SUFFIX_FORMATS:
            raise ValueError(f"cannot tell the export format from the file name {path.name!r}; "
                             f"pass fmt= one of {FORMATS}")
        return _SUFFIX_FORMATS[suffix]
    if fmt.lower() not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    return fmt.lower()


def _export_picture(graph: nx.DiGraph, path: Path, fmt: str) -> ExportResult:
    """SVG or PNG through Graphviz, or through the built-in layout when `dot` is missing."""
    dot = shutil.which("dot")
    source = to_dot(graph)
    if dot:
        atomic_write_bytes(path, _run_dot(dot, source, fmt))
        return ExportResult(path, fmt, "graphviz")
    dot_path = path.with_suffix(".dot") if path.suffix.lower() != ".dot" else path.with_name(path.name + ".dot")
    atomic_write_text(dot_path, source)
    if fmt == "svg":
        atomic_write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + layered_svg(graph))
        renderer = "built-in layout"
    else:
        atomic_write_bytes(path, layered_png(graph))
        renderer = "matplotlib"
    note = (f"Graphviz 'dot' was not found, so {path.name} was drawn with the built-in layout; the DOT "
            f"source is in {dot_path}. For Graphviz-quality diagrams install Graphviz "
            f"({INSTALL_GRAPHVIZ}) and export again, or run: dot -T{fmt} {dot_path} -o {path}")
    warnings.warn(note, GraphvizMissingWarning, stacklevel=3)
    return ExportResult(path, fmt, renderer, (dot_path,), note)


def _run_dot(dot: str, source: str, fmt: str) -> bytes:
    command = [dot, f"-T{fmt}"] + (["-Gdpi=144"] if fmt == "png" else [])
    result = subprocess.run(command, input=source.encode("utf-8"), capture_output=True, timeout=600)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()[-500:]
        raise RuntimeError(f"Graphviz dot failed to render the circuit diagram (exit {result.returncode}): {detail}")
    return result.stdout


# --- GraphML ----------------------------------------------------------------------------------


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


# --- DOT --------------------------------------------------------------------------------------


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT source: one rank per layer (inputs at the bottom), edges coloured by sign."""
    validate_graph(graph)
    names = {node: f"n{number}" for number, node in enumerate(sorted_nodes(graph))}
    lines = ["digraph circuit {",
             f'  graph [rankdir=BT, ranksep=0.5, nodesep=0.25, charset="UTF-8", fontname="Helvetica", '
             f'fontsize=12, labelloc=t, label={_dot_string(_diagram_title(graph))}];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.10,0.04"];',
             "  edge [arrowsize=0.6];"]
    rows = _rows(graph)
    for number, (label, members) in enumerate(rows):
        lines.append(f"  subgraph layer_{number} {{")
        lines.append("    rank=same;")
        lines.append(f'    layer{number} [shape=plaintext, style="", fontcolor="#777777", label={_dot_string(label)}];')
        lines.extend(f"    {names[node]} [{_dot_node_attributes(graph, node)}];" for node in members)
        if label == "tokens" and len(members) > 1:  # keeps tokens in sentence order
            lines.append("    " + " -> ".join(names[node] for node in members) + " [style=invis];")
        lines.append("  }")
    if len(rows) > 1:  # keeps layers in order even where no edge joins neighbouring ones
        lines.append("  " + " -> ".join(f"layer{number}" for number in range(len(rows))) + " [style=invis];")
    scale = _edge_scale(graph)
    for source, target in sorted_edges(graph):
        effect = graph.edges[source, target]["effect"]
        tooltip = _edge_tooltip(graph, source, target)
        lines.append(f"  {names[source]} -> {names[target]} [color=\"{_edge_colour(effect)}\", "
                     f"penwidth={0.6 + 4.4 * scale(effect):.2f}, tooltip={_dot_string(tooltip)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    """A quoted DOT string showing `text` literally; backslashes are doubled so no escape sequence
    (like \\N or \\G) takes effect, and only a real line break becomes DOT's \\n."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'


def _dot_label(lines: list[str]) -> str:
    """A quoted multi-line DOT label; each line is shown literally."""
    return '"' + "\\n".join(_dot_string(line)[1:-1] for line in lines) + '"'


def _dot_node_attributes(graph: nx.DiGraph, node: str) -> str:
    data = graph.nodes[node]
    fill, border = _NODE_COLOURS[data["kind"]]
    attributes = {"label": _dot_label(_node_lines(graph, node)), "fillcolor": f'"{fill}"', "color": f'"{border}"',
                  "tooltip": _dot_string(_node_tooltip(graph, node))}
    if data["kind"] == "error":  # a plain grey box with a dashed border
        attributes["style"] = '"filled,dashed"'
    if data.get("is_target") or node == graph.graph.get("target"):
        attributes.update(penwidth="2", color=f'"{_TARGET_BORDER}"')
    return ", ".join(f"{key}={value}" for key, value in attributes.items())


# --- what the diagrams say --------------------------------------------------------------------


def _diagram_title(graph: nx.DiGraph) -> str:
    parts = [f"Circuit into {node_title(graph, target_node(graph))}"]
    parts += [printable(str(graph.graph[key])) for key in ("model", "method") if graph.graph.get(key)]
    return " · ".join(parts)


def _node_lines(graph: nx.DiGraph, node: str) -> list[str]:
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


def _node_tooltip(graph: nx.DiGraph, node: str) -> str:
    data = graph.nodes[node]
    return f"{printable(node)}\nactivation {float(data.get('activation', 0.0)):.4g}"


def _edge_tooltip(graph: nx.DiGraph, source: str, target: str) -> str:
    edge = graph.edges[source, target]
    return (f"{describe_node(graph, source)} -> {describe_node(graph, target)}: "
            f"effect {edge['effect']:+.4g} ({edge.get('method', '')})")


def _edge_colour(effect: float) -> str:
    return NEGATIVE_COLOUR if effect < 0 else POSITIVE_COLOUR


def _edge_scale(graph: nx.DiGraph):
    """|effect| -> [0, 1], relative to the strongest edge."""
    strongest = max((abs(effect) for _, _, effect in graph.edges(data="effect")), default=0.0)
    return lambda effect: abs(effect) / strongest if strongest > 0 else 1.0


def _rows(graph: nx.DiGraph) -> list[tuple[str, list[str]]]:
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


# --- built-in layered layout ------------------------------------------------------------------

_FONT_SIZE = 11.0
_CHAR_WIDTH = 6.7  # of the monospace font at _FONT_SIZE, in px
_LINE_HEIGHT = 14.0
_PAD_X, _PAD_Y = 8.0, 5.0
_GAP_X, _ROW_GAP = 16.0, 56.0
_MARGIN, _LABEL_WIDTH, _HEADER = 16.0, 56.0, 52.0
_FONT_FAMILY = "DejaVu Sans Mono, Menlo, Consolas, monospace"


class _Box(NamedTuple):
    x: float  # left
    y: float  # top
    width: float
    height: float
    lines: list[str]


class _Layout(NamedTuple):
    boxes: dict[Any, _Box]  # graph nodes, and waypoints ("route", source, target, row) of long edges
    routes: dict[tuple[str, str], list[Any]]  # edge -> [source, waypoints..., target]
    row_labels: list[tuple[str, float]]  # label, vertical centre
    width: float
    height: float


_WAYPOINT_WIDTH = 10.0  # the room a layer-skipping edge takes in each row it crosses


def _text_width(text: str) -> float:
    return _CHAR_WIDTH * sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _layered_layout(graph: nx.DiGraph) -> _Layout:
    """Rows by layer (highest on top), each row ordered to reduce crossings, boxes sized to fit.

    An edge that skips rows gets a waypoint in each row it crosses (as in Sugiyama layouts), so it
    runs between boxes instead of behind them.
    """
    rows = _rows(graph)
    members = [list(nodes) for _, nodes in rows]
    row_of = {node: number for number, nodes in enumerate(members) for node in nodes}
    routing = nx.DiGraph()
    routing.add_nodes_from(graph)
    routes = {}
    for source, target in sorted_edges(graph):
        waypoints = [("route", source, target, row) for row in range(row_of[source] + 1, row_of[target])]
        for waypoint in waypoints:
            members[waypoint[3]].append(waypoint)
        routes[source, target] = [source, *waypoints, target]
        nx.add_path(routing, routes[source, target])
    token_rows = {number for number, (label, _) in enumerate(rows) if label == "tokens"}
    orders = _order_rows(routing, members, fixed=token_rows)  # tokens stay in sentence order
    lines = {node: _node_lines(graph, node) for node in graph}
    sizes = {node: (max(_text_width(line) for line in lines[node]) + 2 * _PAD_X,
                    len(lines[node]) * _LINE_HEIGHT + 2 * _PAD_Y) for node in graph}
    width_of = {item: sizes[item][0] if item in sizes else _WAYPOINT_WIDTH for order in orders for item in order}
    row_widths = [sum(width_of[item] for item in order) + _GAP_X * (len(order) - 1) for order in orders]
    content_width = max(row_widths, default=0.0)
    boxes, row_labels = {}, []
    top = _HEADER
    for (label, nodes), order, row_width in reversed(list(zip(rows, orders, row_widths))):
        row_height = max(sizes[node][1] for node in nodes)
        left = _MARGIN + _LABEL_WIDTH + (content_width - row_width) / 2
        for item in order:
            height = sizes[item][1] if item in sizes else row_height
            boxes[item] = _Box(left, top + (row_height - height) / 2, width_of[item], height, lines.get(item, []))
            left += width_of[item] + _GAP_X
        row_labels.append((label, top + row_height / 2))
        top += row_height + _ROW_GAP
    width = max(_MARGIN * 2 + _LABEL_WIDTH + content_width, _text_width(_diagram_title(graph)) + 2 * _MARGIN, 320.0)
    return _Layout(boxes, routes, row_labels, width, top - _ROW_GAP + _MARGIN)


def _order_rows(routing: nx.DiGraph, rows: list[list[Any]], fixed: set[int], sweeps: int = 2) -> list[list[Any]]:
    """Reorder each row (except the `fixed` ones) by the mean position of its neighbours in the
    rows below, then above."""
    orders = [list(row) for row in rows]
    row_of = {item: number for number, row in enumerate(orders) for item in row}

    def reorder(number: int, neighbours) -> None:
        if number in fixed:
            return
        position = {item: (rank + 0.5) / len(row) for row in orders for rank, item in enumerate(row)}

        def barycentre(item: Any) -> tuple[float, float]:
            placed = [position[other] for other in neighbours(item)]
            return (sum(placed) / len(placed) if placed else position[item], position[item])

        orders[number] = sorted(orders[number], key=barycentre)

    for _ in range(sweeps):
        for number in range(1, len(orders)):
            reorder(number, lambda item: [p for p in routing.predecessors(item) if row_of[p] < number])
        for number in range(len(orders) - 2, -1, -1):
            reorder(number, lambda item: [s for s in routing.successors(item) if row_of[s] > number])
    return orders


def _edge_segments(layout: _Layout) -> dict[tuple[str, str], tuple[tuple[float, float], list[tuple]]]:
    """For each edge, its start point and path segments: ("C", control1, control2, end) curves from
    the top of one box to the bottom of the next, and ("L", end) straight runs up through waypoints.
    Edges leave and enter real boxes at ports spread over the box's width, so they stay apart."""
    boxes = layout.boxes
    successors: dict[Any, list[Any]] = {}
    predecessors: dict[Any, list[Any]] = {}
    for route in layout.routes.values():
        for lower, upper in zip(route, route[1:]):
            successors.setdefault(lower, []).append(upper)
            predecessors.setdefault(upper, []).append(lower)

    def centre(item: Any) -> float:
        return boxes[item].x + boxes[item].width / 2

    def ports(item: Any, others: list[Any]) -> dict[Any, float]:
        ordered = sorted(others, key=lambda other: (centre(other), str(other)))
        return {other: boxes[item].x + boxes[item].width * (rank + 1) / (len(ordered) + 1)
                for rank, other in enumerate(ordered)}

    out_ports = {item: ports(item, others) for item, others in successors.items()}
    in_ports = {item: ports(item, others) for item, others in predecessors.items()}
    segments = {}
    for edge, route in layout.routes.items():
        start = (out_ports[route[0]][route[1]], boxes[route[0]].y)
        pieces: list[tuple] = []
        for lower, upper in zip(route, route[1:]):
            x0, y0 = out_ports[lower][upper], boxes[lower].y
            x1, y1 = in_ports[upper][lower], boxes[upper].y + boxes[upper].height
            if lower != route[0]:
                pieces.append(("L", (x0, y0)))
            bend = max(abs(y0 - y1) / 2, 24.0)
            pieces.append(("C", (x0, y0 - bend), (x1, y1 + bend), (x1, y1)))
        segments[edge] = (start, pieces)
    return segments


def _svg_path_data(start: tuple[float, float], pieces: list[tuple]) -> str:
    commands = [f"M{start[0]:.1f},{start[1]:.1f}"]
    for kind, *points in pieces:
        commands.append(kind + " ".join(f"{x:.1f},{y:.1f}" for x, y in points))
    return " ".join(commands)


def _edges_weakest_first(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return sorted(sorted_edges(graph), key=lambda edge: abs(graph.edges[edge]["effect"]))


# --- SVG ----------------------------------------------------------------------------------------


def layered_svg(graph: nx.DiGraph) -> str:
    """The diagram as an <svg> element from the built-in layout (no Graphviz needed).

    Node groups carry `data-index` (the node's place in `sorted_nodes`), edges `data-source` and
    `data-target`, so a page can make them interactive.
    """
    validate_graph(graph)
    layout = _layered_layout(graph)
    index = {node: number for number, node in enumerate(sorted_nodes(graph))}
    width, height = f"{layout.width:.0f}", f"{layout.height:.0f}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="circuit" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="{_FONT_FAMILY}" font-size="{_FONT_SIZE:g}">',
             "<defs>" + _svg_marker("arrow-positive", POSITIVE_COLOUR) + _svg_marker("arrow-negative", NEGATIVE_COLOUR)
             + "</defs>",
             f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    parts += _svg_header(graph)
    parts += [f'<text class="row-label" x="{_MARGIN:g}" y="{y + 4:.1f}" fill="#777777">{html.escape(label)}</text>'
              for label, y in layout.row_labels]
    scale = _edge_scale(graph)
    segments = _edge_segments(layout)
    for source, target in _edges_weakest_first(graph):
        effect = graph.edges[source, target]["effect"]
        marker = "arrow-negative" if effect < 0 else "arrow-positive"
        parts.append(f'<path class="edge" data-source="{index[source]}" data-target="{index[target]}" '
                     f'd="{_svg_path_data(*segments[source, target])}" fill="none" '
                     f'stroke="{_edge_colour(effect)}" stroke-width="{0.8 + 4.2 * scale(effect):.2f}" '
                     f'stroke-opacity="0.75" marker-end="url(#{marker})">'
                     f"<title>{html.escape(_edge_tooltip(graph, source, target))}</title></path>")
    parts += [_svg_node(graph, node, index[node], layout.boxes[node]) for node in sorted_nodes(graph)]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_marker(name: str, colour: str) -> str:
    return (f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" '
            f'markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>')


def _svg_header(graph: nx.DiGraph) -> list[str]:
    legend_y = 38.0
    return [f'<text class="title" x="{_MARGIN:g}" y="20" font-size="13" font-weight="bold" fill="#222222">'
            f"{html.escape(_diagram_title(graph))}</text>",
            f'<line x1="{_MARGIN:g}" y1="{legend_y - 4:g}" x2="{_MARGIN + 24:g}" y2="{legend_y - 4:g}" '
            f'stroke="{POSITIVE_COLOUR}" stroke-width="3"/>',
            f'<text x="{_MARGIN + 30:g}" y="{legend_y:g}" fill="#444444">positive effect</text>',
            f'<line x1="{_MARGIN + 160:g}" y1="{legend_y - 4:g}" x2="{_MARGIN + 184:g}" y2="{legend_y - 4:g}" '
            f'stroke="{NEGATIVE_COLOUR}" stroke-width="3"/>',
            f'<text x="{_MARGIN + 190:g}" y="{legend_y:g}" fill="#444444">negative effect</text>']


def _svg_node(graph: nx.DiGraph, node: str, number: int, box: _Box) -> str:
    data = graph.nodes[node]
    fill, border = _NODE_COLOURS[data["kind"]]
    is_target = data.get("is_target") or node == graph.graph.get("target")
    stroke_width = "2.5" if is_target else "1.2"
    dash = ' stroke-dasharray="4 2"' if data["kind"] == "error" else ""
    corner = "0" if data["kind"] == "error" else "6"
    centre = box.x + box.width / 2
    bold = ' font-weight="bold"'
    texts = [f'<text x="{centre:.1f}" y="{box.y + _PAD_Y + _LINE_HEIGHT * (line + 1) - 3:.1f}" text-anchor="middle" '
             f'fill="#1a1a1a"{bold if line == 0 else ""}>{html.escape(text)}</text>'
             for line, text in enumerate(box.lines)]
    return (f'<g class="node kind-{data["kind"]}" data-index="{number}" tabindex="0">'
            f"<title>{html.escape(_node_tooltip(graph, node))}</title>"
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="{corner}" '
            f'fill="{fill}" stroke="{_TARGET_BORDER if is_target else border}" stroke-width="{stroke_width}"{dash}/>'
            + "".join(texts) + "</g>")


# --- PNG (matplotlib) -------------------------------------------------------------------------


def layered_png(graph: nx.DiGraph) -> bytes:
    """The built-in layout drawn with matplotlib as PNG bytes (used when Graphviz is missing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as CurvePath

    validate_graph(graph)
    layout = _layered_layout(graph)
    figure = Figure(figsize=(layout.width / 100, layout.height / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, layout.width)
    axes.set_ylim(layout.height, 0)
    axes.axis("off")
    px_to_pt = 72 / 100  # px at 100 dpi -> points
    text_style = {"family": "DejaVu Sans Mono", "parse_math": False}
    axes.text(_MARGIN, 20, _diagram_title(graph), fontsize=13 * px_to_pt, weight="bold", va="baseline", **text_style)
    for label, y in layout.row_labels:
        axes.text(_MARGIN, y, label, fontsize=_FONT_SIZE * px_to_pt, color="#777777", va="center", **text_style)
    scale = _edge_scale(graph)
    segments = _edge_segments(layout)
    for source, target in _edges_weakest_first(graph):
        effect = graph.edges[source, target]["effect"]
        start, pieces = segments[source, target]
        vertices, codes = [start], [CurvePath.MOVETO]
        for kind, *corners in pieces:
            vertices += corners
            codes += [CurvePath.LINETO] if kind == "L" else [CurvePath.CURVE4] * 3
        curve = CurvePath(vertices, codes)
        axes.add_patch(FancyArrowPatch(path=curve, arrowstyle="-|>", mutation_scale=9, alpha=0.75,
                                       color=_edge_colour(effect), linewidth=(0.8 + 4.2 * scale(effect)) * px_to_pt))
    for node in sorted_nodes(graph):
        box, data = layout.boxes[node], graph.nodes[node]
        fill, border = _NODE_COLOURS[data["kind"]]
        is_target = data.get("is_target") or node == graph.graph.get("target")
        corner = "square,pad=0" if data["kind"] == "error" else "round,pad=0,rounding_size=6"
        axes.add_patch(FancyBboxPatch((box.x, box.y), box.width, box.height, boxstyle=corner, facecolor=fill,
                                      edgecolor=_TARGET_BORDER if is_target else border,
                                      linewidth=(2.5 if is_target else 1.2) * px_to_pt,
                                      linestyle="--" if data["kind"] == "error" else "-"))
        for line, text in enumerate(box.lines):
            axes.text(box.x + box.width / 2, box.y + _PAD_Y + _LINE_HEIGHT * (line + 0.5), text, ha="center",
                      va="center", fontsize=_FONT_SIZE * px_to_pt, weight="bold" if line == 0 else "normal",
                      **text_style)
    buffer = io.BytesIO()
    dpi = 100 * min(1.5, 20000 / max(layout.width, layout.height))  # Agg caps images at 2**16 px a side
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


# --- HTML -------------------------------------------------------------------------------------


def html_page(graph: nx.DiGraph) -> str:
    """One self-contained page: the diagram, and a panel with the details of the clicked node.

    Open `page.html#node=<node id>` to start with that node selected (default: the target).
    """
    validate_graph(graph)
    title = _diagram_title(graph)
    summary = f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges. Click a node for its details."
    policy = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
              f"script-src {_csp_hash(_ERROR_SCRIPT)} {_csp_hash(_PAGE_SCRIPT)}")
    values = {"POLICY": html.escape(policy, quote=False), "TITLE": html.escape(title), "SUMMARY": html.escape(summary),
              "STYLE": _PAGE_STYLE, "ERROR_SCRIPT": _ERROR_SCRIPT, "SVG": layered_svg(graph),
              "DATA": _script_json(_page_data(graph)), "PAGE_SCRIPT": _PAGE_SCRIPT}
    # One pass over the template, so text inside a value is never taken for a placeholder.
    return re.sub(r"@@([A-Z_]+)@@", lambda match: values[match.group(1)], _PAGE_TEMPLATE)


def _page_data(graph: nx.DiGraph) -> dict[str, Any]:
    data = graph_to_node_link(graph)  # plain values, nodes in sorted_nodes order
    index = {entry["id"]: number for number, entry in enumerate(data["nodes"])}
    nodes = [{**entry, "title": node_title(graph, entry["id"]), "description": describe_node(graph, entry["id"])}
             for entry in data["nodes"]]
    edges = [{"source": index[entry["source"]], "target": index[entry["target"]], "effect": entry["effect"],
              "method": entry.get("method", "")} for entry in data["edges"]]
    return {"target": index[target_node(graph)], "graph": data["graph"], "nodes": nodes, "edges": edges}


def _script_json(value: Any) -> str:
    """JSON safe inside <script type="application/json">: `<`, `>`, `&` become \\u escapes."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _csp_hash(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@@POLICY@@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@STYLE@@</style>
<script>@@ERROR_SCRIPT@@</script>
</head>
<body data-render="pending">
<header><h1>@@TITLE@@</h1><p class="summary">@@SUMMARY@@</p></header>
<main>
<div id="diagram">
@@SVG@@</div>
<aside id="details"><p class="hint">Click a node to see its details.</p></aside>
</main>
<pre id="js-errors" hidden></pre>
<script type="application/json" id="circuit-data">@@DATA@@</script>
<script>@@PAGE_SCRIPT@@</script>
</body>
</html>
"""

_PAGE_STYLE = """
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a; }
header { padding: 8px 16px; border-bottom: 1px solid #dddddd; }
header h1 { font-size: 17px; margin: 0; }
header .summary { margin: 2px 0 0; color: #555555; font-size: 13px; }
main { display: flex; align-items: flex-start; }
#diagram { flex: 1; overflow: auto; max-height: calc(100vh - 60px); }
#details { width: 400px; flex: none; box-sizing: border-box; padding: 8px 16px; border-left: 1px solid #dddddd;
  max-height: calc(100vh - 60px); overflow: auto; font-size: 13px; }
#details h2 { font-size: 15px; margin: 6px 0; word-break: break-word; }
#details h3 { font-size: 13px; margin: 14px 0 4px; color: #444444; }
#details dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 0; }
#details dt { color: #666666; }
#details dd { margin: 0; word-break: break-all; font-family: monospace; }
.chip { display: inline-block; font-family: monospace; background: #eef2f7; border-radius: 4px; padding: 1px 5px;
  margin: 2px 4px 2px 0; white-space: pre; }
.edge-row { display: flex; gap: 8px; align-items: baseline; }
.edge-row button { border: none; background: none; padding: 0; color: #1f4e8c; cursor: pointer; text-align: left;
  font: inherit; text-decoration: underline; }
.effect { font-family: monospace; min-width: 64px; }
.positive { color: #2166ac; }
.negative { color: #b2182b; }
.context { display: flex; gap: 8px; padding: 3px 0; border-bottom: 1px solid #f0f0f0; }
.context-activation { font-family: monospace; color: #666666; min-width: 48px; }
.context-text { font-family: monospace; white-space: pre-wrap; word-break: break-all; }
.context-text mark { background: #ffd54f; border-radius: 2px; }
svg.circuit g.node { cursor: pointer; }
svg.circuit g.node:hover rect, svg.circuit g.node:focus rect { stroke-width: 2.5; }
svg.circuit g.node.selected rect { stroke: #111111; stroke-width: 3; }
svg.circuit path.edge.faded { opacity: 0.15; }
#diagram svg.circuit .title { display: none; }
#js-errors { color: #b2182b; padding: 8px 16px; }
"""

_ERROR_SCRIPT = """
window.addEventListener("error", function (event) {
  document.body.setAttribute("data-render", "error");
  var box = document.getElementById("js-errors");
  if (box) { box.hidden = false; box.textContent += String(event.message) + "\\n"; }
});
"""

# Data reaches the page only through textContent and setAttribute, never as markup.
_PAGE_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("circuit-data").textContent);
  var details = document.getElementById("details");
  var nodeElements = Array.prototype.slice.call(document.querySelectorAll("#diagram g.node"));
  var edgeElements = Array.prototype.slice.call(document.querySelectorAll("#diagram path.edge"));
  var incoming = data.nodes.map(function () { return []; });
  var outgoing = data.nodes.map(function () { return []; });
  data.edges.forEach(function (edge) { incoming[edge.target].push(edge); outgoing[edge.source].push(edge); });

  function element(tag, className, text) {
    var made = document.createElement(tag);
    if (className) { made.className = className; }
    if (text !== undefined) { made.textContent = text; }
    return made;
  }
  function signed(value) { return (value >= 0 ? "+" : "") + Number(value).toPrecision(3); }
  function shownToken(token) { return String(token).replace(/\\n/g, "\\u21b5\\n"); }

  function facts(node) {
    var list = element("dl", "facts");
    [["id", node.id], ["kind", node.kind], ["hook", node.hook], ["layer", node.layer], ["index", node.index],
     ["activation", node.activation === undefined ? "" : Number(node.activation).toPrecision(4)],
     ["label", node.label]].forEach(function (pair) {
      if (pair[1] === undefined || pair[1] === "") { return; }
      list.appendChild(element("dt", null, pair[0]));
      list.appendChild(element("dd", null, String(pair[1])));
    });
    return list;
  }
  function tokenChips(title, tokens) {
    var section = element("section", "tokens");
    section.appendChild(element("h3", null, title));
    (tokens || []).forEach(function (token) { section.appendChild(element("span", "chip", JSON.stringify(token))); });
    return section;
  }
  function edgeList(title, edges, otherEnd) {
    var section = element("section", "edges");
    section.appendChild(element("h3", null, title + " (" + edges.length + ")"));
    edges.slice().sort(function (a, b) { return Math.abs(b.effect) - Math.abs(a.effect); }).slice(0, 12)
      .forEach(function (edge) {
        var row = element("div", "edge-row");
        row.appendChild(element("span", "effect " + (edge.effect < 0 ? "negative" : "positive"), signed(edge.effect)));
        var link = element("button", null, data.nodes[edge[otherEnd]].description);
        link.type = "button";
        link.addEventListener("click", function () { select(edge[otherEnd]); });
        row.appendChild(link);
        section.appendChild(row);
      });
    return section;
  }
  function contextRow(context) {
    var row = element("div", "context");
    row.appendChild(element("span", "context-activation", Number(context.activation).toPrecision(3)));
    var text = element("span", "context-text");
    context.tokens.forEach(function (token, position) {
      text.appendChild(element(position === context.position ? "mark" : "span", null, shownToken(token)));
    });
    row.appendChild(text);
    return row;
  }
  function show(index) {
    var node = data.nodes[index];
    while (details.firstChild) { details.removeChild(details.firstChild); }
    details.setAttribute("data-node", node.id);
    details.appendChild(element("h2", null, node.description));
    details.appendChild(facts(node));
    [["Fires most on", node.top_tokens], ["Promotes", node.promoted_tokens], ["Suppresses", node.suppressed_tokens]]
      .forEach(function (pair) { if (pair[1] && pair[1].length) { details.appendChild(tokenChips(pair[0], pair[1])); } });
    details.appendChild(edgeList("Inputs", incoming[index], "source"));
    details.appendChild(edgeList("Outputs", outgoing[index], "target"));
    if (node.contexts && node.contexts.length) {
      var section = element("section", "contexts");
      section.appendChild(element("h3", null, "Top-activating contexts"));
      node.contexts.forEach(function (context) { section.appendChild(contextRow(context)); });
      details.appendChild(section);
    }
    nodeElements.forEach(function (shape) {
      shape.classList.toggle("selected", Number(shape.getAttribute("data-index")) === index);
    });
    edgeElements.forEach(function (path) {
      var touches = Number(path.getAttribute("data-source")) === index ||
        Number(path.getAttribute("data-target")) === index;
      path.classList.toggle("faded", !touches);
    });
  }
  function select(index) {
    show(index);
    try {
      history.replaceState(null, "", "#node=" + encodeURIComponent(data.nodes[index].id));
    } catch (error) { /* some browsers refuse this for file: URLs */ }
  }
  function initialNode() {
    var match = /^#node=(.*)$/.exec(window.location.hash);
    if (match) {
      var wanted;
      try { wanted = decodeURIComponent(match[1]); } catch (error) { wanted = null; }
      for (var number = 0; number < data.nodes.length; number += 1) {
        if (data.nodes[number].id === wanted) { return number; }
      }
    }
    return data.target;
  }
  nodeElements.forEach(function (shape) {
    var index = Number(shape.getAttribute("data-index"));
    shape.addEventListener("click", function () { select(index); });
    shape.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(index); }
    });
  });
  show(initialNode());
  document.body.setAttribute("data-render", "ok");
})();
"""
