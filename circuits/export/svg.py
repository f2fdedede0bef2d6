"""The diagram as SVG from the built-in layout (no Graphviz needed); the HTML page embeds it."""

from __future__ import annotations

import html

import networkx as nx

from circuits.export.layout import (CHAR_WIDTH, FONT_FAMILY, FONT_SIZE, LINE_HEIGHT, MARGIN, PAD_Y, Box,
                                    edge_segments, edges_weakest_first, layered_layout)
from circuits.export.legend import (ROW_HEIGHT, SWATCH_WIDTH, LegendRow, legend_height, legend_rows,
                                    legend_width)
from circuits.export.style import (NEGATIVE_COLOUR, NODE_COLOURS, POSITIVE_COLOUR, TARGET_BORDER, diagram_title,
                                   edge_colour, edge_scale, edge_tooltip, node_tooltip)
from circuits.graph import sorted_nodes, validate_graph


def layered_svg(graph: nx.DiGraph) -> str:
    """The diagram as an <svg> element from the built-in layout (no Graphviz needed).

    Node groups carry `data-index` (the node's place in `sorted_nodes`), edges `data-source` and
    `data-target`, so a page can make them interactive.
    """
    validate_graph(graph)
    layout = layered_layout(graph)
    index = {node: number for number, node in enumerate(sorted_nodes(graph))}
    full_width = max(layout.width, 2 * MARGIN + legend_width(graph, CHAR_WIDTH))
    width, height = f"{full_width:.0f}", f"{layout.height + legend_height(graph):.0f}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="circuit" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="{FONT_FAMILY}" font-size="{FONT_SIZE:g}">',
             "<defs>" + _svg_marker("arrow-positive", POSITIVE_COLOUR) + _svg_marker("arrow-negative", NEGATIVE_COLOUR)
             + "</defs>",
             f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    parts += _svg_header(graph)
    parts += [f'<text class="row-label" x="{MARGIN:g}" y="{y + 4:.1f}" fill="#777777">{html.escape(label)}</text>'
              for label, y in layout.row_labels]
    scale = edge_scale(graph)
    segments = edge_segments(layout)
    for source, target in edges_weakest_first(graph):
        effect = graph.edges[source, target]["effect"]
        marker = "arrow-negative" if effect < 0 else "arrow-positive"
        parts.append(f'<path class="edge" data-source="{index[source]}" data-target="{index[target]}" '
                     f'd="{_svg_path_data(*segments[source, target])}" fill="none" '
                     f'stroke="{edge_colour(effect)}" stroke-width="{0.8 + 4.2 * scale(effect):.2f}" '
                     f'stroke-opacity="0.75" marker-end="url(#{marker})">'
                     f"<title>{html.escape(edge_tooltip(graph, source, target))}</title></path>")
    parts += [_svg_node(graph, node, index[node], layout.boxes[node]) for node in sorted_nodes(graph)]
    parts += _svg_legend(graph, layout.height)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_path_data(start: tuple[float, float], pieces: list[tuple]) -> str:
    commands = [f"M{start[0]:.1f},{start[1]:.1f}"]
    for kind, *points in pieces:
        commands.append(kind + " ".join(f"{x:.1f},{y:.1f}" for x, y in points))
    return " ".join(commands)


def _svg_marker(name: str, colour: str) -> str:
    return (f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" '
            f'markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>')


def _svg_header(graph: nx.DiGraph) -> list[str]:
    return [f'<text class="title" x="{MARGIN:g}" y="20" font-size="13" font-weight="bold" fill="#222222">'
            f"{html.escape(diagram_title(graph))}</text>",
            f'<text x="{MARGIN:g}" y="38" fill="#777777">blue: raises, red: lowers the receiving node; '
            "the legend is below the diagram</text>"]


def _svg_legend(graph: nx.DiGraph, top: float) -> list[str]:
    """The legend block under the diagram (circuits.export.legend): a heading, then a swatch and text per row."""
    parts = [f'<g class="legend"><text x="{MARGIN:g}" y="{top + ROW_HEIGHT:.1f}" font-weight="bold" '
             'fill="#222222">Legend</text>']
    for number, row in enumerate(legend_rows(graph), start=2):
        middle = top + ROW_HEIGHT * number - 4
        parts.append(_svg_swatch(row, middle))
        parts.append(f'<text x="{MARGIN + SWATCH_WIDTH + 10:g}" y="{middle + 4:.1f}" fill="#333333">'
                     f"{html.escape(row.text)}</text>")
    return parts + ["</g>"]


def _svg_swatch(row: LegendRow, middle: float) -> str:
    if row.swatch == "node":
        dash = ' stroke-dasharray="4 2"' if row.dashed else ""
        return (f'<rect x="{MARGIN:g}" y="{middle - 6:.1f}" width="{SWATCH_WIDTH:g}" height="12" rx="3" '
                f'fill="{row.fill}" stroke="{row.border}" stroke-width="1.5"{dash}/>')
    if row.swatch == "edge":
        return (f'<line x1="{MARGIN:g}" y1="{middle:.1f}" x2="{MARGIN + SWATCH_WIDTH:g}" y2="{middle:.1f}" '
                f'stroke="{row.colour}" stroke-width="{row.width:g}"/>')
    return ""


def _svg_node(graph: nx.DiGraph, node: str, number: int, box: Box) -> str:
    data = graph.nodes[node]
    fill, border = NODE_COLOURS[data["kind"]]
    is_target = data.get("is_target") or node == graph.graph.get("target")
    stroke_width = "2.5" if is_target else "1.2"
    dash = ' stroke-dasharray="4 2"' if data["kind"] == "error" else ""
    corner = "0" if data["kind"] == "error" else "6"
    centre = box.x + box.width / 2
    bold = ' font-weight="bold"'
    texts = [f'<text x="{centre:.1f}" y="{box.y + PAD_Y + LINE_HEIGHT * (line + 1) - 3:.1f}" text-anchor="middle" '
             f'fill="#1a1a1a"{bold if line == 0 else ""}>{html.escape(text)}</text>'
             for line, text in enumerate(box.lines)]
    return (f'<g class="node kind-{data["kind"]}" data-index="{number}" tabindex="0">'
            f"<title>{html.escape(node_tooltip(graph, node))}</title>"
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="{corner}" '
            f'fill="{fill}" stroke="{TARGET_BORDER if is_target else border}" stroke-width="{stroke_width}"{dash}/>'
            + "".join(texts) + "</g>")
