"""Feature dashboards (circuits.dashboard, `sparse-circuits dashboard`): the one-pass collection against a
brute-force scan of the same codes, the site's files and escaping, the pages in headless Chromium, the
command's bad input, and (integration) the real default model."""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from circuits.dashboard import (PAGE_SIZE, CollectionSettings, SiteInfo, collect_feature_statistics, logit_effects,
                                nearest_features, quantile_bands, write_site)
from circuits.engine import encode_codes, passthrough_positions
from circuits.features import direct_logit_effect
from sae.corpus import load_corpus, tokenize_contexts

HOOK = "blocks.1.hook_resid_post"
CHROMIUM = Path("/usr/bin/chromium")
browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                            "(apt-get install -y chromium)")
SCRIPT_TOKEN = "<script>window.__pwned=1</script>"
CLOSING_TOKEN = "</span><b>x</b>"


@pytest.fixture(scope="module")
def contexts(tiny_llama, text_corpus):
    return tokenize_contexts(load_corpus(str(text_corpus)), tiny_llama.tokenizer, 16, 30, split="all", seed=0)


def brute_force_codes(model, dictionary, contexts):
    """[n, pos, F] codes of every context at once, and [n, pos] which positions are scanned."""
    _, cache = model.run_with_cache(contexts, names_filter=[HOOK])
    activation = cache[HOOK].float()
    passthrough = passthrough_positions(activation)
    return encode_codes(dictionary, activation, passthrough).detach(), ~passthrough


def collect(model, dictionary, contexts, **settings):
    return collect_feature_statistics(model, dictionary, contexts, settings=CollectionSettings(**settings),
                                      batch_size=4, progress=False)


def test_top_k_is_exactly_the_brute_force_top_k_with_its_windows(tiny_llama, random_sae, contexts):
    dictionary = random_sae(d_sae=48)
    stats = collect(tiny_llama, dictionary, contexts, top_k=5, before=3, after=2)
    codes, _ = brute_force_codes(tiny_llama, dictionary, contexts)
    per_context = codes.max(dim=1).values  # [n, F]
    assert stats.n_contexts == len(contexts) and torch.equal(stats.features, torch.arange(48))
    for feature in range(48):
        kept = stats.top.filled(feature)
        expected = per_context[:, feature][per_context[:, feature] > 0].sort(descending=True).values[:5]
        assert torch.allclose(stats.top.activation[feature, kept], expected, atol=1e-5), feature
        for slot in kept.tolist():
            context, position = int(stats.top.context[feature, slot]), int(stats.top.position[feature, slot])
            assert codes[context, position, feature] == pytest.approx(float(stats.top.activation[feature, slot]),
                                                                      abs=1e-5)
            for offset, at in enumerate(range(position - 3, position + 3)):
                token = int(stats.top.tokens[feature, slot, offset])
                if 1 <= at < contexts.shape[1]:
                    assert token == int(contexts[context, at])
                    assert float(stats.top.window[feature, slot, offset]) == pytest.approx(
                        float(codes[context, at, feature]), abs=1e-5)
                else:
                    assert token == -1  # BOS and positions outside the context are never shown
    assert len(set(stats.top.context[0, stats.top.filled(0)].tolist())) == len(stats.top.filled(0))  # one per context


def test_counts_and_histogram_match_the_brute_force_scan(tiny_llama, random_sae, contexts):
    dictionary = random_sae(d_sae=48, seed=1)
    stats = collect(tiny_llama, dictionary, contexts, histogram_low=-2.0, histogram_high=1.0, histogram_bins=12)
    codes, scanned = brute_force_codes(tiny_llama, dictionary, contexts)
    flat = codes[scanned]  # [tokens, F]
    assert stats.n_tokens == int(scanned.sum()) and stats.n_tokens < contexts.numel()  # BOS left out
    assert torch.equal(stats.histogram.sum(dim=1), torch.full((48,), stats.n_tokens))
    assert torch.equal(stats.fired, (flat > 0).sum(dim=0))
    assert torch.equal(stats.histogram[:, 0], (flat <= 0).sum(dim=0))
    assert torch.allclose(stats.maximum, flat.max(dim=0).values) and stats.maximum.max() > 0
    edges = CollectionSettings(histogram_low=-2.0, histogram_high=1.0, histogram_bins=12).histogram_edges()
    for feature in (0, 7, 31):
        values = flat[:, feature][flat[:, feature] > 0].double()
        inside = torch.histogram(values.clamp(edges[0], edges[-1] * 0.999999), bins=edges).hist.long()
        inside[0] -= int((values < edges[0]).sum())
        inside[-1] -= int((values >= edges[-1] * 0.999999).sum())
        assert torch.equal(stats.histogram[feature, 2:-1], inside)
        assert int(stats.histogram[feature, 1]) == int((values < edges[0]).sum())


def test_quantile_examples_lie_in_their_quantile_bands(tiny_llama, random_sae, contexts):
    dictionary = random_sae(d_sae=48, seed=2)
    codes, scanned = brute_force_codes(tiny_llama, dictionary, contexts)
    flat = codes[scanned]
    # A reservoir holding every firing token: the bands are exactly the quartiles of all firing activations.
    stats = collect(tiny_llama, dictionary, contexts, reservoir=int(scanned.sum()), bands=4)
    for feature in range(48):
        values = flat[:, feature][flat[:, feature] > 0].sort().values
        bands = quantile_bands(stats, feature, per_band=3)
        assert len(stats.sampled.filled(feature)) == len(values)
        for number, band in enumerate(bands):
            group = values[number * len(values) // 4 : (number + 1) * len(values) // 4]
            assert band["low"] == pytest.approx(float(group.min())) and band["high"] == pytest.approx(float(group.max()))
            shown = stats.sampled.activation[feature, band["slots"]]
            assert ((shown >= band["low"]) & (shown <= band["high"])).all() and len(shown) == min(3, len(group))
    # A small reservoir: a sample of real firing tokens, each once, bands ordered and examples inside them.
    small = collect(tiny_llama, dictionary, contexts, reservoir=8, bands=4, seed=3)
    for feature in range(48):
        slots = small.sampled.filled(feature)
        assert len(slots) == min(8, int((flat[:, feature] > 0).sum()))
        places = {(int(small.sampled.context[feature, s]), int(small.sampled.position[feature, s])) for s in slots}
        assert len(places) == len(slots)
        for context, position in places:
            assert codes[context, position, feature] > 0 and scanned[context, position]
        bands = quantile_bands(small, feature, per_band=2)
        for lower, upper in zip(bands, bands[1:]):
            assert lower["high"] <= upper["low"]
        for band in bands:
            shown = small.sampled.activation[feature, band["slots"]]
            assert ((shown >= band["low"]) & (shown <= band["high"])).all()


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_logit_effects_and_neighbours_match_the_one_feature_versions(family, tiny_llama, tiny_gemma, random_sae):
    model = tiny_llama if family == "llama" else tiny_gemma
    dictionary = random_sae(d_sae=20, seed=4)
    directions = dictionary.feature_directions.detach()
    effects = logit_effects(model, directions, k=4, chunk=7)  # several chunks
    for feature in (0, 9, 19):
        one = direct_logit_effect(model, directions[feature], k=4)  # Gemma's 1 + weight norm handled there
        assert [model.tokenizer.decode([int(t)]) for t in effects.promoted[feature]] == [t for t, _ in one.promoted]
        assert effects.suppressed_values[feature].tolist() == pytest.approx([v for _, v in one.suppressed], rel=1e-4)
    neighbours = nearest_features(directions, torch.tensor([3, 11]), k=3)
    unit = directions / directions.norm(dim=1, keepdim=True)
    for row, feature in enumerate((3, 11)):
        cosines = unit @ unit[feature]
        cosines[feature] = -2
        assert neighbours.indices[row].tolist() == cosines.topk(3).indices.tolist()


# --- the site ----------------------------------------------------------------------------------


class NastyTokenizer:
    """The tiny model's tokenizer, except that two token ids decode to markup (model text is arbitrary)."""

    def __init__(self, tokenizer, nasty: dict[int, str]):
        self.tokenizer, self.nasty = tokenizer, nasty

    def decode(self, ids):
        return self.nasty.get(int(ids[0])) or self.tokenizer.decode(ids)


def build_site(model, dictionary, contexts, out: Path, title: str = "tiny <b>site</b>", pages=None):
    stats = collect(model, dictionary, contexts)
    directions = dictionary.feature_directions.detach()
    common = {token: count for token, count in zip(*contexts[:, 1:].flatten().unique(return_counts=True))}
    frequent = sorted(common, key=lambda token: -int(common[token]))[:2]
    tokenizer = NastyTokenizer(model.tokenizer, {int(frequent[0]): SCRIPT_TOKEN, int(frequent[1]): CLOSING_TOKEN})
    info = SiteInfo(title=title, hook=HOOK, model="tiny-llama", source="random dictionary", n_features_total=len(directions))
    write_site(out, stats, info=info, tokenizer=tokenizer, effects=logit_effects(model, directions[stats.features]),
               neighbours=nearest_features(directions, stats.features), pages=pages, progress=False)
    return stats


def test_site_files_escape_model_text_and_replace_only_sites(tiny_llama, random_sae, contexts, tmp_path):
    from circuits.dashboard import SiteError, read_site

    out = tmp_path / "site"
    build_site(tiny_llama, random_sae(d_sae=40), contexts, out, pages=list(range(0, 40, 2)))
    record = read_site(out)
    assert record["hook"] == HOOK and record["features"] == list(range(0, 40, 2))
    assert sorted(path.name for path in (out / "features").iterdir()) == sorted(f"{i}.html" for i in range(0, 40, 2))
    assert {path.name for path in (out / "assets").iterdir()} == {"dashboard.js", "dashboard.css", "errors.js"}
    index = (out / "index.html").read_text()
    assert "tiny &lt;b&gt;site&lt;/b&gt;" in index and "<b>site</b>" not in index
    data = "".join(path.read_text() for path in (out / "data").glob("features-*.js"))
    assert json.dumps(SCRIPT_TOKEN) in data  # model text only as JSON string values
    assert not list(tmp_path.glob(".site.*"))  # no temporary folder left
    build_site(tiny_llama, random_sae(d_sae=40), contexts, out, pages=[1])  # an earlier site is replaced whole
    assert [path.name for path in (out / "features").iterdir()] == ["1.html"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SiteError, match="holds other files"):
        build_site(tiny_llama, random_sae(d_sae=40), contexts, other)
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def chromium_dom(tmp_path: Path, url: str) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, and the console messages Chromium logged."""
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
@browser
def test_browser_index_and_feature_pages_load_without_errors_and_show_text_literally(tiny_llama, random_sae,
                                                                                      contexts, tmp_path):
    out = tmp_path / "site"
    stats = build_site(tiny_llama, random_sae(d_sae=40), contexts, out)
    dom, console = chromium_dom(tmp_path, (out / "index.html").as_uri())
    assert 'data-render="ok"' in dom and not console, (console, dom[-2000:])
    assert dom.count('class="feature-row"') == 40 and "page 1 of 1" in dom
    assert "<b>site</b>" not in dom
    feature = int(stats.fired.argmax())  # a feature that fires
    dom, console = chromium_dom(tmp_path, (out / "features" / f"{feature}.html").as_uri())
    assert 'data-render="ok"' in dom and not console, (console, dom[-2000:])
    top = dom[dom.index('class="top-contexts"'):]
    assert top.count('class="context"') >= len(stats.top.filled(feature)) > 0
    assert dom.count('class="token active centre"') + dom.count('class="token centre"') >= len(stats.top.filled(feature))
    assert "<svg" in dom and 'class="bar"' in dom  # the density histogram
    assert dom.count('href="') >= 3  # back to the index, prev/next or neighbours
    assert "<b>x</b>" not in dom and "<script>window" not in dom
    # A page whose data file is missing says so (the "ok" above means the script really finished).
    (out / "data" / "features-0000.js").unlink()
    dom, console = chromium_dom(tmp_path, (out / "features" / "0.html").as_uri())
    assert 'data-render="error"' in dom and "could not load" in dom


@pytest.mark.browser
@browser
def test_browser_escapes_markup_tokens_in_contexts(tiny_llama, random_sae, contexts, tmp_path):
    out = tmp_path / "site"
    stats = build_site(tiny_llama, random_sae(d_sae=40, seed=5), contexts, out)
    pages = [json.loads(re.sub(r"^window\.DASHBOARD_FEATURES = |;\n$", "", path.read_text()))
             for path in (out / "data").glob("features-*.js")]
    shown = next(int(key) for page in pages for key, entry in page.items()
                 if any(SCRIPT_TOKEN in example["t"] for example in entry["top"]))
    dom, console = chromium_dom(tmp_path, (out / "features" / f"{shown}.html").as_uri())
    assert 'data-render="ok"' in dom and not console
    assert html.escape(SCRIPT_TOKEN, quote=False) in dom  # shown as text
    assert "<script>window.__pwned" not in dom and stats.n_tokens > 0


@pytest.mark.browser
@browser
def test_browser_index_pages_sorts_and_searches_more_features_than_a_page(tiny_llama, random_sae, contexts, tmp_path):
    out = tmp_path / "site"
    n_features = 2 * PAGE_SIZE + 37
    stats = build_site(tiny_llama, random_sae(d_sae=n_features, seed=6), contexts, out)
    index = (out / "index.html").as_uri()
    dom, console = chromium_dom(tmp_path, index)
    assert not console and dom.count('class="feature-row"') == PAGE_SIZE and "page 1 of 3" in dom
    dom, _ = chromium_dom(tmp_path, index + "#sort=index&page=3")
    assert dom.count('class="feature-row"') == 37 and "page 3 of 3" in dom
    assert f'href="features/{n_features - 1}.html"' in dom
    dom, _ = chromium_dom(tmp_path, index + "#sort=-density&page=1")
    shown = [int(index) for index in re.findall(r'<tr class="feature-row"><td><a href="features/(\d+)\.html"', dom)]
    assert [int(stats.fired[index]) for index in shown] == stats.fired.sort(descending=True).values[:PAGE_SIZE].tolist()
    dom, _ = chromium_dom(tmp_path, index + "#sort=index&page=1&q=" + "%3Cscript%3E")
    rows = dom.count('class="feature-row"')
    assert 0 < rows < n_features and "<script>window" not in dom.split("</head>")[1]


# --- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory, random_sae) -> Path:
    from sae.io import save_dictionary

    return save_dictionary(random_sae(d_sae=64), tmp_path_factory.mktemp("sae") / HOOK)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from sparse_circuits.cli.main import main

    try:
        code = main([str(part) for part in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize("mistake", ["other_model", "index_out_of_range", "out_is_a_file", "out_holds_other_files",
                                     "baseline_without_hook", "bad_range"])
def test_cli_bad_input_is_one_error_line_and_leaves_nothing(mistake, tmp_path, tiny_llama_folder, text_corpus,
                                                           sae_folder, random_sae, capsys):
    from sae.io import save_dictionary

    out = tmp_path / "site"
    common = ["--model", tiny_llama_folder, "--corpus", text_corpus, "--tokens", 200, "--context-size", 16]
    argv = ["dashboard", "--sae", sae_folder, *common, "--out", out]
    expected = {"other_model": "d_in=48", "index_out_of_range": "index 64 is out of range",
                "out_is_a_file": "is an existing file", "out_holds_other_files": "holds other files",
                "baseline_without_hook": "needs --hook", "bad_range": "is not an index or a range"}[mistake]
    if mistake == "other_model":  # a dictionary trained on a model with another width
        argv[2] = save_dictionary(random_sae(d_in=48, d_sae=64), tmp_path / "wide" / HOOK)
    elif mistake == "index_out_of_range":
        argv += ["--features", "60-64"]
    elif mistake == "out_is_a_file":
        out.write_text("not a folder")
    elif mistake == "out_holds_other_files":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif mistake == "baseline_without_hook":
        argv = ["dashboard", "--baseline", "pca", *common, "--out", out]
    elif mistake == "bad_range":
        argv += ["--features", "5-x"]
    before = files_under(tmp_path)
    code, err = run_cli(argv, capsys)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert files_under(tmp_path) == before  # no half-written site, nothing else touched


def test_cli_builds_sites_for_a_dictionary_and_for_baselines(tmp_path, tiny_llama_folder, text_corpus, sae_folder,
                                                             capsys):
    from circuits.dashboard import read_site

    common = ["--model", tiny_llama_folder, "--corpus", text_corpus, "--tokens", 300, "--context-size", 16]
    code, err = run_cli(["dashboard", "--sae", sae_folder.parent, *common, "--features", "0-9,20",
                         "--out", tmp_path / "sae_site"], capsys)
    assert code == 0, err
    assert read_site(tmp_path / "sae_site")["features"] == [*range(10), 20]
    code, err = run_cli(["dashboard", "--sae", sae_folder, *common, "--features", "auto", "--out", tmp_path / "auto"],
                        capsys)
    assert code == 0, err
    live = read_site(tmp_path / "auto")["features"]
    assert 0 < len(live) <= 64  # only the features that fired get pages
    for baseline in ("neurons", "pca", "ica"):
        code, err = run_cli(["dashboard", "--baseline", baseline, "--hook", HOOK, *common, "--fit-tokens", 200,
                             "--out", tmp_path / baseline], capsys)
        assert code == 0, err
        record = read_site(tmp_path / baseline)
        assert record["features"] == list(range(64)) and record["source"] == f"baseline {baseline}"  # 2 x d_model
    code, err = run_cli(["dashboard", "--baseline", "pca", "--hook", HOOK, *common, "--features", "0-64",
                         "--out", tmp_path / "too_wide"], capsys)
    assert code == 2 and "index 64 is out of range" in err and not (tmp_path / "too_wide").exists()


@pytest.mark.integration
def test_real_model_dashboard_with_a_small_budget(real_model, tmp_path):
    """The default model, a PCA basis at a middle layer fitted on the same held-out text, 2,000 tokens."""
    from sae.corpus import load_corpus
    from sparse_circuits.pipelines.dashboard import build_dashboard, fit_baseline_dictionary, held_out_tokens

    hook = "blocks.6.hook_resid_post"
    corpus = load_corpus("registry")
    tokens = held_out_tokens(real_model, corpus, 2000, 64, 0)
    dictionary = fit_baseline_dictionary(real_model, "pca", hook, tokens, fit_tokens=2000, progress=False)
    result = build_dashboard(real_model, dictionary, corpus, tmp_path / "site", source="baseline pca",
                             features="0-49", contexts=tokens, progress=False)
    assert result.n_features == 50 and result.n_tokens > 1500
    entries = {}
    for path in (tmp_path / "site" / "data").glob("features-*.js"):
        entries.update(json.loads(re.sub(r"^window\.DASHBOARD_FEATURES = |;\n$", "", path.read_text())))
    first = entries["0"]  # the top principal direction fires on about half the tokens (signed basis)
    assert 0.05 < first["density"] < 0.95 and len(first["top"]) == 20 and first["promoted"]
    assert all(example["t"][example["k"]] for example in first["top"])


def small_circuit():
    """A feature at HOOK (index 3), one at another hook, and the output."""
    import networkx as nx

    from circuits.graph import add_edge, add_feature_node, add_output_node

    graph = nx.DiGraph(model="tiny-llama", method="attribution")
    linked = add_feature_node(graph, HOOK, 1, 3, activation=1.0)
    other = add_feature_node(graph, "blocks.0.hook_resid_post", 0, 3, activation=0.5)
    output = add_output_node(graph, 4, "logit: Mary")
    add_edge(graph, other, linked, 0.4, "attribution")
    add_edge(graph, linked, output, 0.9, "attribution")
    return graph


@pytest.mark.browser
@browser
def test_circuit_pages_link_feature_nodes_to_their_dashboard_pages(tiny_llama, random_sae, contexts, tmp_path,
                                                                    capsys):
    from urllib.parse import quote

    from circuits.graph import save_graph_json

    site = tmp_path / "site"
    build_site(tiny_llama, random_sae(d_sae=40), contexts, site)
    graph_file = save_graph_json(small_circuit(), tmp_path / "graph.json")
    page = tmp_path / "pages" / "circuit.html"
    code, err = run_cli(["export", graph_file, "-o", page, "--dashboard", site], capsys)
    assert code == 0, err
    dom, console = chromium_dom(tmp_path, page.as_uri() + "#node=" + quote(f"{HOOK}:3", safe=""))
    assert 'data-render="ok"' in dom and not console
    link = re.search(r'<a class="dashboard-link" href="([^"]+)">', dom)
    assert link and link.group(1) == "../site/features/3.html" and (page.parent / link.group(1)).is_file()
    dom, _ = chromium_dom(tmp_path, page.as_uri() + "#node=" + quote("blocks.0.hook_resid_post:3", safe=""))
    assert "<a class=\"dashboard-link\"" not in dom  # another hook: the site has no page for it
    dom, _ = chromium_dom(tmp_path, (site / link.group(1).removeprefix("../site/")).as_uri())
    assert 'data-render="ok"' in dom and "Feature 3" in dom
    code, err = run_cli(["export", graph_file, "-o", tmp_path / "x.html", "--dashboard", tmp_path / "pages"], capsys)
    assert code == 2 and "is not a dashboard site" in err and not (tmp_path / "x.html").exists()


MISTAKES_WITHOUT_TORCH = """
import sys
from sparse_circuits.cli.main import main
sae, tmp = sys.argv[1], sys.argv[2]
codes = [main(["dashboard", "--sae", sae, "--features", "0-64", "--out", tmp + "/site"]),
         main(["dashboard", "--sae", tmp + "/none", "--out", tmp + "/site"]),
         main(["dashboard", "--sae", sae, "--out", sys.argv[3]]),
         main(["export", sys.argv[3], "-o", tmp + "/c.html", "--dashboard", tmp])]
heavy = sorted(name for name in ("torch", "transformers", "transformer_lens") if name in sys.modules)
assert codes == [2, 2, 2, 2] and not heavy, (codes, heavy)
"""


def test_dashboard_mistakes_are_reported_before_torch_is_imported(sae_folder, tmp_path):
    import sys

    a_file = tmp_path / "graph.json"
    a_file.write_text(json.dumps({"directed": True, "multigraph": False, "graph": {}, "nodes": [], "links": []}))
    result = subprocess.run([sys.executable, "-c", MISTAKES_WITHOUT_TORCH, str(sae_folder), str(tmp_path), str(a_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("error:") == 4 and "Traceback" not in result.stderr
