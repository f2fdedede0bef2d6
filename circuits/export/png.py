"""The built-in layout drawn with matplotlib as PNG (used when Graphviz is missing)."""

from __future__ import annotations

import io

import networkx as nx

from circuits.export.layout import (CHAR_WIDTH, FONT_SIZE, LINE_HEIGHT, MARGIN, PAD_Y, edge_segments,
                                    edges_weakest_first, layered_layout)
from circuits.export.legend import ROW_HEIGHT, SWATCH_WIDTH, legend_height, legend_rows, legend_width
from circuits.export.style import NODE_COLOURS, TARGET_BORDER, diagram_title, edge_colour, edge_scale
from circuits.graph import sorted_nodes, validate_graph


def layered_png(graph: nx.DiGraph) -> bytes:
    """The built-in layout drawn with matplotlib as PNG bytes (used when Graphviz is missing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as CurvePath

    validate_graph(graph)
    layout = layered_layout(graph)
    width = max(layout.width, 2 * MARGIN + legend_width(graph, CHAR_WIDTH))
    height = layout.height + legend_height(graph)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.axis("off")
    px_to_pt = 72 / 100  # px at 100 dpi -> points
    text_style = {"family": "DejaVu Sans Mono", "parse_math": False}
    axes.text(MARGIN, 20, diagram_title(graph), fontsize=13 * px_to_pt, weight="bold", va="baseline", **text_style)
    for label, y in layout.row_labels:
        axes.text(MARGIN, y, label, fontsize=FONT_SIZE * px_to_pt, color="#777777", va="center", **text_style)
    scale = edge_scale(graph)
    segments = edge_segments(layout)
    for source, target in edges_weakest_first(graph):
        effect = graph.edges[source, target]["effect"]
        start, pieces = segments[source, target]
        vertices, codes = [start], [CurvePath.MOVETO]
        for kind, *corners in pieces:
            vertices += corners
            codes += [CurvePath.LINETO] if kind == "L" else [CurvePath.CURVE4] * 3
        curve = CurvePath(vertices, codes)
        axes.add_patch(FancyArrowPatch(path=curve, arrowstyle="-|>", mutation_scale=9, alpha=0.75,
                                       color=edge_colour(effect), linewidth=(0.8 + 4.2 * scale(effect)) * px_to_pt))
    for node in sorted_nodes(graph):
        box, data = layout.boxes[node], graph.nodes[node]
        fill, border = NODE_COLOURS[data["kind"]]
        is_target = data.get("is_target") or node == graph.graph.get("target")
        corner = "square,pad=0" if data["kind"] == "error" else "round,pad=0,rounding_size=6"
        axes.add_patch(FancyBboxPatch((box.x, box.y), box.width, box.height, boxstyle=corner, facecolor=fill,
                                      edgecolor=TARGET_BORDER if is_target else border,
                                      linewidth=(2.5 if is_target else 1.2) * px_to_pt,
                                      linestyle="--" if data["kind"] == "error" else "-"))
        for line, text in enumerate(box.lines):
            axes.text(box.x + box.width / 2, box.y + PAD_Y + LINE_HEIGHT * (line + 0.5), text, ha="center",
                      va="center", fontsize=FONT_SIZE * px_to_pt, weight="bold" if line == 0 else "normal",
                      **text_style)
    _draw_legend(axes, graph, layout.height, text_style, px_to_pt)
    buffer = io.BytesIO()
    dpi = 100 * min(1.5, 20000 / max(width, height))  # Agg caps images at 2**16 px a side
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def _draw_legend(axes, graph: nx.DiGraph, top: float, text_style: dict, px_to_pt: float) -> None:
    """The legend under the diagram (circuits.export.legend), as in the built-in SVG."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch

    axes.text(MARGIN, top + ROW_HEIGHT, "Legend", fontsize=FONT_SIZE * px_to_pt, weight="bold", va="baseline",
              **text_style)
    for number, row in enumerate(legend_rows(graph), start=2):
        middle = top + ROW_HEIGHT * number - 4
        if row.swatch == "node":
            axes.add_patch(FancyBboxPatch((MARGIN, middle - 6), SWATCH_WIDTH, 12, boxstyle="round,pad=0,rounding_size=3",
                                          facecolor=row.fill, edgecolor=row.border, linewidth=1.5 * px_to_pt,
                                          linestyle="--" if row.dashed else "-"))
        elif row.swatch == "edge":
            axes.add_line(Line2D([MARGIN, MARGIN + SWATCH_WIDTH], [middle, middle], color=row.colour,
                                 linewidth=row.width * px_to_pt))
        axes.text(MARGIN + SWATCH_WIDTH + 10, middle, row.text, fontsize=FONT_SIZE * px_to_pt, color="#333333",
                  va="center", **text_style)
