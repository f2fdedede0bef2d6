"""Graphviz DOT source: layers are ranks (inputs at the bottom, the target on top), edges blue for
positive and red for negative effects, thicker for larger |effect|; all text shown literally."""

from __future__ import annotations

import html

import networkx as nx

from circuits.export.legend import legend_rows
from circuits.export.style import (NODE_COLOURS, TARGET_BORDER, diagram_title, edge_colour, edge_scale, edge_tooltip,
                                   layer_rows, node_lines, node_tooltip)
from circuits.graph import sorted_edges, sorted_nodes, validate_graph


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT source: one rank per layer (inputs at the bottom), edges coloured by sign."""
    validate_graph(graph)
    names = {node: f"n{number}" for number, node in enumerate(sorted_nodes(graph))}
    lines = ["digraph circuit {",
             f'  graph [rankdir=BT, ranksep=0.5, nodesep=0.25, charset="UTF-8", fontname="Helvetica", '
             f'fontsize=12, labelloc=t, labeljust=l, label={_dot_title_and_legend(graph)}];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.10,0.04"];',
             "  edge [arrowsize=0.6];"]
    rows = layer_rows(graph)
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
    scale = edge_scale(graph)
    for source, target in sorted_edges(graph):
        effect = graph.edges[source, target]["effect"]
        tooltip = edge_tooltip(graph, source, target)
        lines.append(f"  {names[source]} -> {names[target]} [color=\"{edge_colour(effect)}\", "
                     f"penwidth={0.6 + 4.4 * scale(effect):.2f}, tooltip={_dot_string(tooltip)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_title_and_legend(graph: nx.DiGraph) -> str:
    """An HTML-like graph label: the title, then the legend (circuits.export.legend) as a table of swatches
    and text. Every piece of text is escaped for HTML-like labels."""
    cells = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{_html_text(diagram_title(graph))}</B></TD></TR>']
    for row in legend_rows(graph):
        if row.swatch == "node":
            swatch = (f'<TD BGCOLOR="{row.fill}" COLOR="{row.border}" BORDER="1" STYLE="{"dashed" if row.dashed else "rounded"}"'
                      ' WIDTH="30"> </TD>')
        elif row.swatch == "edge":
            weight = "B" if row.width > 3 else "I"
            swatch = f'<TD><FONT COLOR="{row.colour}"><{weight}>━━━</{weight}></FONT></TD>'
        else:
            swatch = "<TD></TD>"
        cells.append(f'<TR>{swatch}<TD ALIGN="LEFT"><FONT POINT-SIZE="10">{_html_text(row.text)}</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="1">' + "".join(cells) + "</TABLE>>"


def _html_text(text: str) -> str:
    """Text for a Graphviz HTML-like label: markup characters escaped, line breaks shown as spaces."""
    return html.escape(" ".join(text.split()), quote=True)


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
    fill, border = NODE_COLOURS[data["kind"]]
    attributes = {"label": _dot_label(node_lines(graph, node)), "fillcolor": f'"{fill}"', "color": f'"{border}"',
                  "tooltip": _dot_string(node_tooltip(graph, node))}
    if data["kind"] == "error":  # a plain grey box with a dashed border
        attributes["style"] = '"filled,dashed"'
    if data.get("is_target") or node == graph.graph.get("target"):
        attributes.update(penwidth="2", color=f'"{TARGET_BORDER}"')
    return ", ".join(f"{key}={value}" for key, value in attributes.items())
