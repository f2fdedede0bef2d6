"""The built-in layered layout, used when Graphviz is missing and by the HTML page: one row per
layer (highest on top), rows ordered to reduce crossings, boxes sized to fit their text, and
waypoints for edges that skip rows."""

from __future__ import annotations

import unicodedata
from typing import Any, NamedTuple

import networkx as nx

from circuits.export.style import diagram_title, layer_rows, node_lines
from circuits.graph import sorted_edges

FONT_SIZE = 11.0
CHAR_WIDTH = 6.7  # of the monospace font at FONT_SIZE, in px
LINE_HEIGHT = 14.0
_PAD_X, PAD_Y = 8.0, 5.0
_GAP_X, _ROW_GAP = 16.0, 56.0
MARGIN, _LABEL_WIDTH, _HEADER = 16.0, 56.0, 52.0
FONT_FAMILY = "DejaVu Sans Mono, Menlo, Consolas, monospace"


class Box(NamedTuple):
    x: float  # left
    y: float  # top
    width: float
    height: float
    lines: list[str]


class Layout(NamedTuple):
    boxes: dict[Any, Box]  # graph nodes, and waypoints ("route", source, target, row) of long edges
    routes: dict[tuple[str, str], list[Any]]  # edge -> [source, waypoints..., target]
    row_labels: list[tuple[str, float]]  # label, vertical centre
    width: float
    height: float


_WAYPOINT_WIDTH = 10.0  # the room a layer-skipping edge takes in each row it crosses


def _text_width(text: str) -> float:
    return CHAR_WIDTH * sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def layered_layout(graph: nx.DiGraph) -> Layout:
    """Rows by layer (highest on top), each row ordered to reduce crossings, boxes sized to fit.

    An edge that skips rows gets a waypoint in each row it crosses (as in Sugiyama layouts), so it
    runs between boxes instead of behind them.
    """
    rows = layer_rows(graph)
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
    lines = {node: node_lines(graph, node) for node in graph}
    sizes = {node: (max(_text_width(line) for line in lines[node]) + 2 * _PAD_X,
                    len(lines[node]) * LINE_HEIGHT + 2 * PAD_Y) for node in graph}
    width_of = {item: sizes[item][0] if item in sizes else _WAYPOINT_WIDTH for order in orders for item in order}
    row_widths = [sum(width_of[item] for item in order) + _GAP_X * (len(order) - 1) for order in orders]
    content_width = max(row_widths, default=0.0)
    boxes, row_labels = {}, []
    top = _HEADER
    for (label, nodes), order, row_width in reversed(list(zip(rows, orders, row_widths))):
        row_height = max(sizes[node][1] for node in nodes)
        left = MARGIN + _LABEL_WIDTH + (content_width - row_width) / 2
        for item in order:
            height = sizes[item][1] if item in sizes else row_height
            boxes[item] = Box(left, top + (row_height - height) / 2, width_of[item], height, lines.get(item, []))
            left += width_of[item] + _GAP_X
        row_labels.append((label, top + row_height / 2))
        top += row_height + _ROW_GAP
    width = max(MARGIN * 2 + _LABEL_WIDTH + content_width, _text_width(diagram_title(graph)) + 2 * MARGIN, 320.0)
    return Layout(boxes, routes, row_labels, width, top - _ROW_GAP + MARGIN)


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


def edge_segments(layout: Layout) -> dict[tuple[str, str], tuple[tuple[float, float], list[tuple]]]:
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


def edges_weakest_first(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return sorted(sorted_edges(graph), key=lambda edge: abs(graph.edges[edge]["effect"]))
