"""Files and diagrams from a circuit graph: JSON, GraphML, DOT, SVG, PNG and a self-contained HTML page.

Every format is deterministic (the same graph gives the same bytes) and written atomically.
`export_graph` picks the writer; each format has its own module.

- json: node-link JSON (see circuits.graph).
- graphml (graphml.py): networkx's GraphML. GraphML holds only scalars, so each attribute that has
  a list or dict value (or mixed types, or text XML cannot carry) is stored as a JSON string; the
  graph attribute `sparse_circuits_json_attributes` lists which, and `read_graphml_graph` decodes them.
- dot (dot.py): Graphviz source. Layers are ranks (inputs at the bottom, the target on top), edges are
  blue for positive and red for negative effects, thicker for larger |effect|.
- Every picture (svg, png, and the page's diagram) carries a legend (legend.py): node kinds, edge
  sign, and what edge width means (|effect|, or the share of the receiver's activation).
- svg, png: rendered by Graphviz `dot` when it is installed. Without it the picture comes from a
  built-in layered layout (layout.py; SVG written by svg.py, PNG drawn with matplotlib by png.py),
  the DOT source is written beside it, and a GraphvizMissingWarning says what to install.
- html (html.py, page assets in assets/): one file with no network access: the built-in SVG diagram
  and, on clicking a node, its details and top-activating contexts. Model text is escaped in the
  markup, embedded as JSON with `<`, `>`, `&` as \\u escapes, and put into the page by script only
  through textContent.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import NamedTuple

import networkx as nx

from circuits.export.dot import to_dot
from circuits.export.graphml import JSON_ATTRIBUTES_KEY, graphml_bytes, read_graphml_graph
from circuits.export.html import html_page
from circuits.export.png import layered_png
from circuits.export.style import NEGATIVE_COLOUR, POSITIVE_COLOUR
from circuits.export.svg import layered_svg
from circuits.graph import graph_to_json_text, validate_graph
from sae.assets import atomic_write_bytes, atomic_write_text
from sae.options import OptionError

__all__ = ["FORMATS", "INSTALL_GRAPHVIZ", "POSITIVE_COLOUR", "NEGATIVE_COLOUR", "JSON_ATTRIBUTES_KEY",
           "GraphvizMissingWarning", "ExportResult", "available_formats", "export_graph", "graphml_bytes",
           "read_graphml_graph", "to_dot", "layered_svg", "layered_png", "html_page"]

FORMATS = ("json", "graphml", "dot", "svg", "png", "html")
INSTALL_GRAPHVIZ = "apt-get install -y graphviz on Debian/Ubuntu, brew install graphviz on macOS"
_SUFFIX_FORMATS = {"gv": "dot", "htm": "html", **{fmt: fmt for fmt in FORMATS}}


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


def export_graph(graph: nx.DiGraph, path: str | Path, fmt: str | None = None, *, warn: bool = True) -> ExportResult:
    """Write the graph to `path` as `fmt` (default: from the file suffix); see the module docstring.

    Without Graphviz, a picture comes with `ExportResult.note`, also issued as a GraphvizMissingWarning
    unless `warn=False` (for callers that print the note themselves)."""
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    validate_graph(graph)
    if fmt in _FILE_WRITERS:
        render, renderer = _FILE_WRITERS[fmt]
        content = render(graph)
        (atomic_write_bytes if isinstance(content, bytes) else atomic_write_text)(path, content)
        return ExportResult(path, fmt, renderer)
    return _export_picture(graph, path, fmt, warn)


# format -> (graph -> file contents (text or bytes), what produced them); pictures go through Graphviz or the layout
_FILE_WRITERS = {"json": (graph_to_json_text, "sparse-circuits"), "graphml": (graphml_bytes, "networkx"),
                 "dot": (to_dot, "sparse-circuits"), "html": (html_page, "sparse-circuits")}


def _resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in _SUFFIX_FORMATS:
            raise OptionError("fmt", "cannot tell the export format from the file name {name!r}; pass {option} "
                              "one of {formats} (or name the file with one of those suffixes)",
                              name=path.name, formats=", ".join(FORMATS))
        return _SUFFIX_FORMATS[suffix]
    if fmt.lower() not in FORMATS:
        raise OptionError("fmt", "unknown export format {fmt!r} for {option}; expected one of {formats}", fmt=fmt,
                          formats=", ".join(FORMATS))
    return fmt.lower()


def _export_picture(graph: nx.DiGraph, path: Path, fmt: str, warn: bool = True) -> ExportResult:
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
    if warn:
        warnings.warn(note, GraphvizMissingWarning, stacklevel=3)
    return ExportResult(path, fmt, renderer, (dot_path,), note)


def _run_dot(dot: str, source: str, fmt: str) -> bytes:
    command = [dot, f"-T{fmt}"] + (["-Gdpi=144"] if fmt == "png" else [])
    result = subprocess.run(command, input=source.encode("utf-8"), capture_output=True, timeout=600)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()[-500:]
        raise RuntimeError(f"Graphviz dot failed to render the circuit diagram (exit {result.returncode}): {detail}")
    return result.stdout
