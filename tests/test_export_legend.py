"""Every diagram carries its legend; error nodes read as error terms; middle-layer logit effects are marked."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ElementTree

import pytest

from circuits.export import export_graph, layered_png, layered_svg, to_dot
from circuits.export.legend import EFFECT_TEXT, KIND_TEXT, SHARE_TEXT, legend_rows, legend_text
from circuits.tracing import relative_graph
from test_export import NASTY, assert_picture, browser, circuit, page_url, run_chromium

SVG = "{http://www.w3.org/2000/svg}"
ERROR_NODE = "blocks.1.hook_resid_post:error"


def svg_texts(svg: str) -> list[str]:
    return [node.text for node in ElementTree.fromstring(svg.encode()).iter(f"{SVG}text")]


def test_legend_names_each_kind_present_the_edge_signs_and_what_width_means():
    text = legend_text(circuit())
    for kind in ("feature", "error", "token", "output"):
        assert KIND_TEXT[kind] in text
    assert "blue edge: positive effect" in text and "red edge: negative effect" in text
    assert EFFECT_TEXT in text and SHARE_TEXT not in text
    shares = legend_text(relative_graph(circuit()))
    assert SHARE_TEXT in shares and "fraction of the receiving node's activation" in shares
    assert "positive share" in shares


def test_built_in_svg_and_png_carry_the_legend():
    graph = circuit()
    texts = svg_texts(layered_svg(graph))
    assert "Legend" in texts
    assert all(row.text in texts for row in legend_rows(graph))
    assert layered_svg(graph) == layered_svg(graph)  # still deterministic
    png = layered_png(graph)
    assert png == layered_png(graph) and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_dot_source_carries_the_legend_as_an_escaped_table():
    source = to_dot(circuit())
    label = next(line for line in source.splitlines() if "labelloc=t" in line)
    assert "<TABLE" in label and "error term: the part of the activation" in label
    assert "L&lt;layer&gt; #&lt;index&gt;" in label  # legend text is escaped in the HTML-like label
    assert "edge width: |effect|" in label


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed (apt-get install -y graphviz)")
def test_graphviz_picture_shows_the_legend(tmp_path):
    svg = export_graph(circuit(), tmp_path / "graph.svg").path.read_text()
    texts = " ".join(text or "" for text in svg_texts(svg))
    assert "error term: the part of the activation" in texts and "edge width: |effect|" in texts
    assert_picture(export_graph(circuit(), tmp_path / "graph.png").path)


def test_error_nodes_read_as_error_terms_not_index_minus_one():
    svg = layered_svg(circuit())
    error_group = re.search(r'<g class="node kind-error".*?</g>', svg, re.S).group(0)
    assert "error term" in error_group and not re.search(r"activation [-\d]", error_group)


@pytest.mark.browser
@browser
def test_page_panel_explains_error_terms_and_marks_middle_layer_logit_effects(tmp_path):
    graph = circuit()
    graph.graph["n_layers"] = 8  # the feature at layer 1 is far from the output
    path = export_graph(graph, tmp_path / "graph.html").path
    dom = run_chromium(tmp_path, "--dump-dom", page_url(path, ERROR_NODE))
    panel = dom[dom.index('<aside id="details"'):dom.index("</aside>")]
    assert "<dd>error term</dd>" in panel and "the activation at this hook that the dictionary does not" in panel
    assert "<dt>index</dt>" not in panel and "<dt>activation</dt>" not in panel
    assert 'class="legend"' in dom and "Legend" in dom
    dom = run_chromium(tmp_path, "--dump-dom", page_url(path, NASTY))
    panel = dom[dom.index('<aside id="details"'):dom.index("</aside>")]
    assert "Promotes (direct logit effect)" in panel
    assert "layer 1 of 8, far from the output" in panel
