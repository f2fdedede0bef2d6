"""Exporters: GraphML round trip, deterministic bytes for every format, DOT and HTML escaping of
hostile token text, pictures with and without Graphviz, and the HTML page in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from urllib.parse import quote

import networkx as nx
import pytest

from circuits import export
from circuits.export import (FORMATS, GraphvizMissingWarning, available_formats, export_graph,
                             read_graphml_graph, to_dot)
from circuits.graph import (add_edge, add_error_node, add_feature_node, add_output_node, add_token_node,
                            quote_token, sorted_nodes)

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT_TOKEN = "<script>window.__pwned=1</script>"
CLOSING_TOKEN = "</script><b>x</b>"
DOT_TOKEN = 'say "hi"\\N\n<b>&{|}'
NASTY = "blocks.1.hook_resid_post:3"
IGNORE_MISSING_DOT = "ignore::circuits.export.GraphvizMissingWarning"


def circuit() -> nx.DiGraph:
    """Tokens -> two layers of features and an error node -> a logit, with hostile token text."""
    graph = nx.DiGraph(model="tiny-llama", method="attribution", notes={"seed": 0, "skipped": None})
    for position, token in enumerate(["When", " Mary", " and", " John"]):
        add_token_node(graph, position, token)
    hook0, hook1, hook3 = (f"blocks.{layer}.hook_resid_post" for layer in (0, 1, 3))
    names = add_feature_node(graph, hook0, 0, 5, activation=1.5, label="female names",
                             top_tokens=[" Mary", " Anna", " Kate"])
    johns = add_feature_node(graph, hook0, 0, 9, activation=0.7, top_tokens=[" John", DOT_TOKEN])
    nasty = add_feature_node(graph, hook1, 1, 3, activation=2.0, label="tricky\r\x00text",
                             top_tokens=[SCRIPT_TOKEN, "\n", '"&"'], promoted_tokens=[" Mary"],
                             contexts=[{"tokens": ["a", CLOSING_TOKEN, " c"], "position": 1, "activation": 3.25},
                                       {"tokens": ["When", " Mary", " went"], "position": 1, "activation": 2.5}])
    error = add_error_node(graph, hook1, 1, activation=0.3)
    mover = add_feature_node(graph, hook3, 3, 1234, activation=4.0, top_tokens=[" Mary", " John"])
    output = add_output_node(graph, 4, "logit: Mary", label='logit " Mary"')
    for source, target, effect in (("token:1", names, 0.9), ("token:3", johns, 0.6), ("token:0", johns, 0.1),
                                   (names, nasty, 0.8), (johns, nasty, -0.4), (johns, error, 0.2),
                                   (nasty, mover, 1.2), (error, mover, -0.3), (mover, output, 2.0),
                                   (names, output, -0.5)):
        add_edge(graph, source, target, effect, "ablation" if effect > 1 else "attribution")
    return graph


def shuffled(graph: nx.DiGraph) -> nx.DiGraph:
    """The same graph with nodes and edges inserted in reverse order."""
    copy = nx.DiGraph(**graph.graph)
    copy.add_nodes_from(reversed(list(graph.nodes(data=True))))
    copy.add_edges_from(reversed(list(graph.edges(data=True))))
    return copy


@pytest.fixture
def without_dot(monkeypatch):
    """Pretend Graphviz is not installed."""
    monkeypatch.setattr(export.shutil, "which", lambda name, *args, **kwargs: None)


def assert_picture(path: Path) -> None:
    """A PNG that opens, has a sensible size and is not blank."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = image.convert("RGB")
        width, height = pixels.size
        assert width > 200 and height > 200
        small = pixels.resize((width // 2, height // 2))
        colours = small.getcolors(maxcolors=1 << 20)
        non_white = sum(count for count, colour in colours if sum(colour) < 720)
        assert len(colours) > 50, "too few colours: the picture looks blank"
        assert non_white > 0.01 * small.size[0] * small.size[1]


# --- formats ----------------------------------------------------------------------------------


def test_available_formats_and_format_from_suffix(tmp_path):
    assert set(available_formats()) == set(FORMATS)
    assert export_graph(circuit(), tmp_path / "graph.gv").fmt == "dot"
    with pytest.raises(ValueError, match="fmt="):
        export_graph(circuit(), tmp_path / "graph.pdf")
    with pytest.raises(ValueError, match="unknown export format"):
        export_graph(circuit(), tmp_path / "graph.out", fmt="pdf")


def test_graphml_round_trip_restores_every_attribute(tmp_path):
    graph = circuit()
    graph.graph["mixed"] = 1
    graph.nodes["token:0"]["extra"], graph.nodes["token:1"]["extra"] = 1, "one"  # mixed types
    path = export_graph(graph, tmp_path / "graph.graphml").path
    loaded = read_graphml_graph(path)
    assert nx.is_isomorphic(graph, loaded, node_match=lambda a, b: a == b, edge_match=lambda a, b: a == b)
    assert dict(loaded.nodes(data=True)) == dict(graph.nodes(data=True))
    assert {(u, v): d for u, v, d in loaded.edges(data=True)} == {(u, v): d for u, v, d in graph.edges(data=True)}
    assert loaded.graph == graph.graph
    assert loaded.nodes[NASTY]["label"] == "tricky\r\x00text"
    ElementTree.parse(path)  # well-formed XML despite the control characters


@pytest.mark.filterwarnings(IGNORE_MISSING_DOT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dot_installed", [True, False])
def test_exports_are_deterministic(tmp_path, monkeypatch, fmt, dot_installed):
    if dot_installed and shutil.which("dot") is None and fmt in ("svg", "png"):
        pytest.skip("Graphviz 'dot' is not installed (apt-get install -y graphviz)")
    if not dot_installed:
        monkeypatch.setattr(export.shutil, "which", lambda name, *args, **kwargs: None)
    first = export_graph(circuit(), tmp_path / f"first.{fmt}").path.read_bytes()
    second = export_graph(circuit(), tmp_path / f"second.{fmt}").path.read_bytes()
    reordered = export_graph(shuffled(circuit()), tmp_path / f"third.{fmt}").path.read_bytes()
    assert len(first) > 500
    assert first == second == reordered
    assert not [entry for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]


# --- DOT --------------------------------------------------------------------------------------


def test_dot_layers_colours_and_escaping():
    source = to_dot(circuit())
    assert source.count("rank=same;") == 5  # tokens, L0, L1, L3, output
    assert "layer0 -> layer1 -> layer2 -> layer3 -> layer4 [style=invis]" in source
    assert 'color="#b2182b", penwidth=1.70' in source  # names -> output, -0.5 of the strongest 2.0
    assert 'color="#2166ac", penwidth=5.00' in source  # the strongest edge
    error_line = next(line for line in source.splitlines() if '"L1 error"' in line)
    assert 'style="filled,dashed"' in error_line and "#e0e0e0" in error_line
    # The token shows as quote_token prints it: every backslash doubled once more for DOT, so that
    # \N or \n in the text stays literal, and its quotes escaped.
    shown = quote_token(DOT_TOKEN, 14)
    assert shown == r'"say \"hi\"\\N\n…"'
    assert r'\"say \\\"hi\\\"\\\\N\\n…\"' in source
    assert "\n" not in "".join(line for line in source.splitlines())  # no raw line breaks inside strings
    for line in source.splitlines():  # every quote inside a string is escaped
        assert line.replace('\\\\', '').replace('\\"', '').count('"') % 2 == 0


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed (apt-get install -y graphviz)")
def test_graphviz_renders_the_nasty_text_literally(tmp_path):
    result = export_graph(circuit(), tmp_path / "graph.svg")
    assert result.renderer == "graphviz" and result.note == ""
    svg = result.path.read_text()
    ElementTree.fromstring(svg.encode())
    texts = [node.text for node in ElementTree.fromstring(svg.encode()).iter("{http://www.w3.org/2000/svg}text")]
    assert quote_token(DOT_TOKEN, 14) in texts  # literal: \N is not replaced by the node name
    assert '"<script>windo…"' in texts and "L1 error" in texts
    png = export_graph(circuit(), tmp_path / "graph.png")
    assert png.renderer == "graphviz"
    assert_picture(png.path)


# --- without Graphviz -------------------------------------------------------------------------


def test_missing_graphviz_still_gives_pictures_and_says_what_to_install(tmp_path, without_dot):
    assert "apt-get install -y graphviz" in available_formats()["svg"]
    with pytest.warns(GraphvizMissingWarning, match="apt-get install -y graphviz") as caught:
        svg = export_graph(circuit(), tmp_path / "graph.svg")
    assert "brew install graphviz" in str(caught[0].message)
    assert svg.renderer == "built-in layout" and "apt-get install -y graphviz" in svg.note
    assert svg.extra_paths == (tmp_path / "graph.dot",) and (tmp_path / "graph.dot").read_text() == to_dot(circuit())
    root = ElementTree.parse(svg.path).getroot()
    groups = [group for group in root.iter("{http://www.w3.org/2000/svg}g") if "node" in group.get("class", "")]
    assert len(groups) == circuit().number_of_nodes()
    texts = [node.text for node in root.iter("{http://www.w3.org/2000/svg}text")]
    assert '"<script>windo…"' in texts and "L3 #1234" in texts
    with pytest.warns(GraphvizMissingWarning):
        png = export_graph(circuit(), tmp_path / "graph.png")
    assert png.renderer == "matplotlib"
    assert_picture(png.path)


# --- HTML -------------------------------------------------------------------------------------


def test_html_page_is_self_contained_and_escapes_model_text(tmp_path):
    page = export_graph(circuit(), tmp_path / "graph.html").path.read_text()
    assert SCRIPT_TOKEN not in page and CLOSING_TOKEN not in page
    assert "window.__pwned=1</script>" not in page and "<b>x</b>" not in page
    assert "\\u003cscript\\u003ewindow.__pwned=1\\u003c/script\\u003e" in page  # in the JSON data
    assert "\\u003c/script\\u003e\\u003cb\\u003ex\\u003c/b\\u003e" in page
    assert html.escape(quote_token(SCRIPT_TOKEN, 14)) in page  # in the SVG label
    assert len(re.findall(r"<script\b", page)) == 3 and page.count("</script>") == 3
    assert not re.search(r"\b(src|href)\s*=", page) and "<link" not in page and "@import" not in page
    assert re.findall(r"https?://[^\s\"]*", page) == ["http://www.w3.org/2000/svg"]  # the SVG namespace only
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


# --- in the browser ---------------------------------------------------------------------------

browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                            "(apt-get install -y chromium)")


def run_chromium(tmp_path: Path, *arguments: str) -> str:
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_url(path: Path, node: str | None = None) -> str:
    return path.as_uri() + (f"#node={quote(node, safe='')}" if node else "")


@pytest.mark.browser
@browser
def test_browser_builds_the_details_panel_with_literal_text(tmp_path):
    graph = circuit()
    path = export_graph(graph, tmp_path / "graph.html").path
    dom = run_chromium(tmp_path, "--dump-dom", page_url(path, NASTY))
    assert 'data-render="ok"' in dom, dom[-3000:]  # the page script ran under its own CSP
    assert len(re.findall(r'<g class="node kind-', dom)) == graph.number_of_nodes()
    panel = dom[dom.index('<aside id="details"'):dom.index("</aside>")]
    assert f'data-node="{NASTY}"' in panel
    assert f"<span class=\"chip\">{html.escape(json.dumps(SCRIPT_TOKEN), quote=False)}</span>" in panel
    assert f"<mark>{html.escape(CLOSING_TOKEN, quote=False)}</mark>" in panel
    assert "<h3>Top-activating contexts</h3>" in panel and panel.count('class="context"') == 2
    assert "Inputs (2)" in panel and "Outputs (1)" in panel
    assert "<b>x</b>" not in dom and "<script>window" not in dom
    target = run_chromium(tmp_path, "--dump-dom", page_url(path))
    assert 'data-node="logit: Mary"' in target  # with no #node=, the target is shown


@pytest.mark.browser
@browser
def test_browser_runs_no_injected_script_even_without_the_csp_and_clicks_work(tmp_path):
    page = export_graph(circuit(), tmp_path / "graph.html").path.read_text()
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    mover = sorted_nodes(circuit()).index("blocks.3.hook_resid_post:1234")
    probe = ("<script>document.body.setAttribute('data-pwned', typeof window.__pwned);"
             f"document.querySelector('g.node[data-index=\"{mover}\"]')"
             ".dispatchEvent(new MouseEvent('click', {bubbles: true}));</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    dom = run_chromium(tmp_path, "--dump-dom", page_url(probed, NASTY))
    assert 'data-render="ok"' in dom and 'data-pwned="undefined"' in dom
    assert "<b>x</b>" not in dom
    assert 'data-node="blocks.3.hook_resid_post:1234"' in dom  # clicking a node shows it
    assert f'class="node kind-feature selected" data-index="{mover}"' in dom
    # A broken page says so, so the "ok" above means the script really finished.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'(id="circuit-data">)\{', r"\1{oops", page))
    dom = run_chromium(tmp_path, "--dump-dom", page_url(broken))
    assert 'data-render="error"' in dom and "JSON" in dom


@pytest.mark.browser
@browser
@pytest.mark.filterwarnings(IGNORE_MISSING_DOT)
@pytest.mark.parametrize("renderer", ["built-in", "graphviz"])
def test_browser_screenshots_of_the_svg_are_not_blank(tmp_path, monkeypatch, renderer):
    if renderer == "graphviz" and shutil.which("dot") is None:
        pytest.skip("Graphviz 'dot' is not installed (apt-get install -y graphviz)")
    if renderer == "built-in":
        monkeypatch.setattr(export.shutil, "which", lambda name, *args, **kwargs: None)
    svg = export_graph(circuit(), tmp_path / "graph.svg").path
    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, "--window-size=1000,900", f"--screenshot={shot}", svg.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000
    assert_picture(shot)


@pytest.mark.browser
@browser
def test_browser_screenshot_of_the_page(tmp_path):
    path = export_graph(circuit(), tmp_path / "graph.html").path
    shot = tmp_path / "page.png"
    run_chromium(tmp_path, "--window-size=1300,850", f"--screenshot={shot}", page_url(path, NASTY))
    assert_picture(shot)


def test_node_order_in_svg_matches_page_data(tmp_path):
    page = export_graph(circuit(), tmp_path / "graph.html").path.read_text()
    indices = [int(match) for match in re.findall(r'<g class="node kind-\w+" data-index="(\d+)"', page)]
    assert indices == list(range(len(sorted_nodes(circuit()))))
