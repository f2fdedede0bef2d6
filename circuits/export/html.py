"""One self-contained HTML page: the built-in SVG diagram and, on clicking a node, its details and
top-activating contexts; no network access.

The page's template, style and scripts are files in `assets/` (shipped as package data). Model
text is escaped in the markup, embedded as JSON with `<`, `>`, `&` as \\u escapes, and put into
the page by script only through textContent and setAttribute, never as markup. A
Content-Security-Policy allows exactly the two inline scripts, by hash. A feature node with a `dashboard`
attribute (a relative path or file:// URI set by circuits.dashboard.link_feature_pages) gets a link to its
dashboard page in the details panel.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import re
from importlib import resources
from typing import Any

import networkx as nx

from circuits.export.style import diagram_title
from circuits.export.svg import layered_svg
from circuits.graph import describe_node, graph_to_node_link, node_title, target_node, validate_graph


def html_page(graph: nx.DiGraph) -> str:
    """One self-contained page: the diagram, and a panel with the details of the clicked node.

    Open `page.html#node=<node id>` to start with that node selected (default: the target).
    """
    validate_graph(graph)
    title = diagram_title(graph)
    summary = f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges. Click a node for its details."
    style, error_script, page_script = (_inline_asset(name) for name in ("page.css", "error.js", "page.js"))
    policy = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
              f"script-src {_csp_hash(error_script)} {_csp_hash(page_script)}")
    values = {"POLICY": html.escape(policy, quote=False), "TITLE": html.escape(title), "SUMMARY": html.escape(summary),
              "STYLE": style, "ERROR_SCRIPT": error_script, "SVG": layered_svg(graph),
              "DATA": _script_json(_page_data(graph)), "PAGE_SCRIPT": page_script}
    # One pass over the template, so text inside a value is never taken for a placeholder.
    return re.sub(r"@@([A-Z_]+)@@", lambda match: values[match.group(1)], _asset("page.html"))


@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    """The text of a file in assets/, package data beside this module."""
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")


def _inline_asset(name: str) -> str:
    """A style sheet or script as it goes inside its <style> or <script> element: on lines of its own."""
    return "\n" + _asset(name)


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
