"""Circuit tracing on tiny models: ablation effects equal the change made by hand, attribution equals
the exact effect where the model is linear (and the finite difference elsewhere), graphs follow the
schema, and the CLI writes and exports them."""

import json
import math
import warnings

import pytest
import torch

from circuits import tracing
from circuits.features import scan_features
from circuits.graph import load_graph_json, save_graph_json, target_node, validate_graph
from circuits.hooks import layer_of_hook
from sae.config import DictionaryConfig
from sae.io import save_dictionary
from sae.registry import build_dictionary
from tests.conftest import WORDS

TARGET_HOOK = "blocks.3.hook_resid_post"
UPSTREAM = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
TEXTS = ["When Mary and John went to the store , John gave a drink to",
         "the boy saw the girl in the park and he gave her a ball",
         "Anna had a book"]


def make_dictionaries(model, hooks, n_features=40, biases=None):
    dictionaries = {}
    for number, hook in enumerate(hooks):
        cfg = DictionaryConfig("standard", d_in=model.cfg.d_model, d_sae=n_features, hook_name=hook, seed=10 + number)
        dictionary = build_dictionary(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_((biases or {}).get(hook, 0.0))
        dictionaries[hook] = dictionary.eval()
    return dictionaries


def most_active_feature(model, dictionary, hook, texts=TEXTS):
    rows, lengths = tracing.pad_rows([model.to_tokens(text)[0] for text in texts], 2)
    _, cache = model.run_with_cache(rows, names_filter=[hook])
    codes = dictionary.encode(cache[hook])[:, 1:]
    return int(codes.sum(dim=(0, 1)).argmax())


@pytest.fixture(scope="module")
def setup(tiny_llama):
    dictionaries = make_dictionaries(tiny_llama, UPSTREAM + [TARGET_HOOK])
    target = tracing.FeatureTarget(TARGET_HOOK, most_active_feature(tiny_llama, dictionaries[TARGET_HOOK], TARGET_HOOK))
    contexts = tracing.contexts_from_texts(tiny_llama, TEXTS, target)
    return dictionaries, target, contexts


def by_hand_value(model, dictionaries, target, contexts, hook, edit):
    """The target's value (mean over contexts of its sum over measured positions) with `edit(x)`
    applied at `hook` to positions 1.."""

    def apply(x, hook=None):
        return torch.cat([x[:, :1], edit(x[:, 1:])], dim=1)

    seen = {}

    def record(x, hook=None):
        seen["x"] = x
        return x

    hooks = ([(hook, apply)] if hook else []) + [(target.hook, record)]
    with torch.no_grad():
        model.run_with_hooks(contexts.tokens, fwd_hooks=hooks)
        codes = dictionaries[target.hook].encode(seen["x"])[..., target.index]
    return float((codes * contexts.measure).sum(dim=1).mean())


def without_feature(dictionary, index, scale=1.0):
    def edit(body):
        return body - scale * dictionary.encode(body)[..., index, None] * dictionary.feature_directions[index]

    return edit


# --- targets and contexts ---------------------------------------------------------------------


def test_parse_feature_and_its_errors():
    assert tracing.parse_feature("blocks.7.hook_resid_post:123") == tracing.FeatureTarget("blocks.7.hook_resid_post", 123)
    for bad in ["blocks.7.hook_resid_post", "blocks.7.hook_resid_post:x", ":3"]:
        with pytest.raises(ValueError, match="HOOK:INDEX"):
            tracing.parse_feature(bad)


def test_contexts_from_texts_measure_every_token_but_bos_and_padding(tiny_llama, setup):
    _, target, contexts = setup
    lengths = [len(tiny_llama.to_tokens(text)[0]) for text in TEXTS]
    assert contexts.lengths.tolist() == lengths
    assert contexts.measure.sum(dim=1).tolist() == [length - 1 for length in lengths]
    assert not contexts.measure[:, 0].any() and torch.equal(contexts.measure, contexts.valid)
    logit = tracing.logit_target(tiny_llama, "Mary", "John")
    last = tracing.contexts_from_texts(tiny_llama, TEXTS, logit)
    assert [int(row.nonzero()) for row in last.measure] == [length - 1 for length in lengths]


def test_logit_target_needs_single_tokens(tiny_llama):
    with pytest.raises(ValueError, match="single token"):
        tracing.logit_target(tiny_llama, "Mary John")


def test_found_contexts_end_at_the_activating_token(tiny_llama, setup):
    dictionaries, target, _ = setup
    tokens = torch.randint(3, 60, (12, 10), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 1
    scan = scan_features(tiny_llama, {TARGET_HOOK: dictionaries[TARGET_HOOK]}, tokens, progress=False)
    contexts = tracing.find_target_contexts(scan, target, tiny_llama.tokenizer, n_contexts=4, band=None)
    assert len(contexts) == 4
    for row in range(4):
        tokens_row, measure, _ = contexts.row(row)
        assert int(measure.nonzero()) == len(tokens_row) - 1  # measured at the last real token
    clean = tracing.clean_run(tiny_llama, dictionaries, target, contexts, [])
    top = scan.max_activation[TARGET_HOOK][:, target.index].sort(descending=True).values[:4]
    torch.testing.assert_close(clean.target, top, rtol=1e-4, atol=1e-5)
    assert [entry["activation"] for entry in contexts.entries] == pytest.approx(top.tolist())


# --- ablation ---------------------------------------------------------------------------------


def test_ablation_effects_equal_the_change_made_by_hand(tiny_llama, setup):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", depth=2,
                                        top_k_per_layer=3, progress=False)
    clean = by_hand_value(tiny_llama, dictionaries, target, contexts, None, None)
    assert result.graph.nodes[target.node_id]["activation"] == pytest.approx(clean, rel=1e-5)
    hook = UPSTREAM[1]
    scores = result.scores[hook]
    for index in torch.nonzero(scores.evaluated).flatten()[:4].tolist():
        ablated = by_hand_value(tiny_llama, dictionaries, target, contexts, hook,
                                without_feature(dictionaries[hook], index))
        assert float(scores.effects[index]) == pytest.approx(clean - ablated, abs=2e-5)
    dictionary = dictionaries[hook]
    no_error = by_hand_value(tiny_llama, dictionaries, target, contexts, hook,
                             lambda body: dictionary.decode(dictionary.encode(body)))
    assert scores.error_effect == pytest.approx(clean - no_error, abs=2e-5)
    edge = result.graph.edges[f"{hook}:error", target.node_id]
    assert edge["effect"] == pytest.approx(clean - no_error, abs=2e-5) and edge["method"] == "ablation"


def test_ablating_features_together_matches_by_hand(tiny_llama, setup):
    dictionaries, target, contexts = setup
    hook = UPSTREAM[0]
    chosen = [2, 5, 7]
    dictionary = dictionaries[hook]

    def edit(body):
        codes = dictionary.encode(body)[..., chosen]
        return body - codes @ dictionary.feature_directions[chosen]

    effect = tracing.ablate_features_effect(tiny_llama, dictionaries, target, contexts, [(hook, i) for i in chosen])
    clean = by_hand_value(tiny_llama, dictionaries, target, contexts, None, None)
    assert effect.clean == pytest.approx(clean, rel=1e-5)
    assert effect.ablated == pytest.approx(by_hand_value(tiny_llama, dictionaries, target, contexts, hook, edit),
                                           abs=2e-5)
    assert effect.fraction == pytest.approx((effect.clean - effect.ablated) / effect.clean)


def test_logit_difference_target_by_ablation(tiny_llama):
    dictionaries = make_dictionaries(tiny_llama, UPSTREAM)
    target = tracing.logit_target(tiny_llama, "Mary", "John")
    contexts = tracing.contexts_from_texts(tiny_llama, TEXTS[:2], target)
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", depth=1,
                                        top_k_per_layer=2, progress=False)
    hook, index = UPSTREAM[1], int(torch.nonzero(result.scores[UPSTREAM[1]].evaluated)[0])

    def logit_difference(edit=None):
        hooks = [(hook, lambda x, hook=None: torch.cat([x[:, :1], edit(x[:, 1:])], dim=1))] if edit else []
        with torch.no_grad():
            logits = tiny_llama.run_with_hooks(contexts.tokens, fwd_hooks=hooks)
        last = contexts.lengths - 1
        rows = torch.arange(len(contexts))
        return float((logits[rows, last, target.token] - logits[rows, last, target.other]).mean())

    expected = logit_difference() - logit_difference(without_feature(dictionaries[hook], index))
    assert float(result.scores[hook].effects[index]) == pytest.approx(expected, abs=2e-5)
    assert target_node(result.graph) == "logit: Mary - John"
    assert result.graph.nodes["logit: Mary - John"]["kind"] == "output"


# --- attribution ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_model(tiny_llama_folder):
    """The tiny Llama with block 3 writing nothing (o_proj and down_proj zero), so blocks.3 resid_post
    equals blocks.2 resid_post, and a target dictionary whose features are always on: the target is
    then linear in the blocks.2 residual and attribution is exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuits.models import bridge_from_hf

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
    with torch.no_grad():
        hf_model.model.layers[3].self_attn.o_proj.weight.zero_()
        hf_model.model.layers[3].mlp.down_proj.weight.zero_()
    model = bridge_from_hf(hf_model, AutoTokenizer.from_pretrained(tiny_llama_folder), name=str(tiny_llama_folder))
    dictionaries = make_dictionaries(model, UPSTREAM + [TARGET_HOOK], biases={TARGET_HOOK: 10.0})
    target = tracing.FeatureTarget(TARGET_HOOK, 4)
    return model, dictionaries, target, tracing.contexts_from_texts(model, TEXTS, target)


def test_attribution_equals_ablation_where_the_model_is_linear(linear_model):
    model, dictionaries, target, contexts = linear_model
    hook = UPSTREAM[1]
    runs = {method: tracing.run_upstream_trace(model, dictionaries, target, contexts, method=method, depth=1,
                                               top_k_per_layer=5, progress=False) for method in tracing.METHODS}
    exact, estimate = runs["ablation"].scores[hook], runs["attribution"].scores[hook]
    assert torch.equal(exact.evaluated, estimate.evaluated) and int(exact.evaluated.sum()) > 5
    torch.testing.assert_close(estimate.effects, exact.effects, rtol=1e-3, atol=1e-4)
    assert estimate.error_effect == pytest.approx(exact.error_effect, rel=1e-3, abs=1e-4)
    [agreement] = tracing.method_agreement(runs["attribution"].scores, runs["ablation"].scores, top_n=10)
    assert agreement.spearman == pytest.approx(1.0) and agreement.top_overlap == 1.0


def test_direct_effects_change_nothing_without_attention_or_norm_paths(linear_model):
    model, dictionaries, target, contexts = linear_model
    total = tracing.run_upstream_trace(model, dictionaries, target, contexts, depth=1, progress=False)
    direct = tracing.run_upstream_trace(model, dictionaries, target, contexts, depth=1, direct_effects=True,
                                        progress=False)
    assert direct.graph.graph["detached_hooks"] == ["blocks.3.attn.hook_pattern", "blocks.3.ln1.hook_scale",
                                                    "blocks.3.ln2.hook_scale"]
    torch.testing.assert_close(direct.scores[UPSTREAM[1]].effects, total.scores[UPSTREAM[1]].effects)


def test_direct_effects_detach_every_attention_pattern_and_norm_scale_of_the_traced_blocks(tiny_model):
    dictionaries = make_dictionaries(tiny_model, UPSTREAM + [TARGET_HOOK])
    target = tracing.FeatureTarget(TARGET_HOOK, most_active_feature(tiny_model, dictionaries[TARGET_HOOK], TARGET_HOOK))
    contexts = tracing.contexts_from_texts(tiny_model, TEXTS[:2], target)
    direct = tracing.run_upstream_trace(tiny_model, dictionaries, target, contexts, depth=2, direct_effects=True,
                                        progress=False)

    def patterns_and_scales(blocks, final=False):
        return {name for name in tiny_model.hook_dict if name.endswith(("hook_pattern", "hook_scale"))
                and (layer_of_hook(name) in blocks or (final and layer_of_hook(name) is None))}

    expected = patterns_and_scales({2, 3})  # blocks after the lowest traced hook (1), up to the target's (3)
    assert set(direct.graph.graph["detached_hooks"]) == expected
    assert {name.rsplit(".", 2)[-2] for name in expected} >= {"attn", "ln1", "ln2"}
    with_final = tracing.direct_effect_hooks(tiny_model, 0, 3, include_final=True)
    assert set(with_final) == patterns_and_scales({0, 1, 2, 3}, final=True) and "ln_final.hook_scale" in with_final


def test_direct_effects_differ_from_total_effects_through_attention(tiny_llama, setup):
    dictionaries, target, contexts = setup
    total = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, progress=False)
    direct = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, direct_effects=True,
                                        progress=False)
    hook = UPSTREAM[0]
    assert not torch.allclose(direct.scores[hook].effects, total.scores[hook].effects, atol=1e-4)


def test_attribution_equals_the_finite_difference(tiny_llama, setup):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, progress=False)
    clean = by_hand_value(tiny_llama, dictionaries, target, contexts, None, None)
    step = 0.02
    for hook in UPSTREAM:
        scores = result.scores[hook]
        for index in tracing.top_features(scores, 3):
            shifted = by_hand_value(tiny_llama, dictionaries, target, contexts, hook,
                                    without_feature(dictionaries[hook], index, scale=step))
            linearised = (clean - shifted) / step  # the derivative along the feature's removal
            assert float(scores.effects[index]) == pytest.approx(linearised, rel=0.02, abs=2e-4)


# --- the graph --------------------------------------------------------------------------------


def test_the_graph_follows_the_schema_layer_by_layer(tiny_llama, setup, tmp_path):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, top_k_per_layer=3,
                                        progress=False)
    graph = result.graph
    validate_graph(graph)
    assert target_node(graph) == target.node_id and graph.nodes[target.node_id]["is_target"]
    assert graph.graph["method"] == "attribution" and graph.graph["hooks"] == UPSTREAM[::-1]
    for hook, layer in zip(UPSTREAM, (1, 2)):
        members = [n for n, d in graph.nodes(data=True) if d["hook"] == hook]
        kinds = sorted(graph.nodes[n]["kind"] for n in members)
        assert kinds == ["error", "feature", "feature", "feature"]
        assert all(graph.nodes[n]["layer"] == layer for n in members)
        top = tracing.top_features(result.scores[hook], 3)
        assert sorted(graph.nodes[n]["index"] for n in members if graph.nodes[n]["kind"] == "feature") == sorted(top)
        for node in members:
            data = graph.nodes[node]
            assert data["effect_on_target"] == pytest.approx(
                result.scores[hook].error_effect if data["kind"] == "error" else float(result.scores[hook].effects[data["index"]]))
            assert data["promoted_tokens"] or data["kind"] == "error"
    for source, receiver, data in graph.edges(data=True):
        assert data["method"] == "attribution" and data["weight"] == abs(data["effect"])
        assert graph.nodes[source]["layer"] + 1 == graph.nodes[receiver]["layer"]  # neighbouring layers only
        assert graph.nodes[receiver]["kind"] == "feature"
    layer_2_features = [n for n, d in graph.nodes(data=True) if d["layer"] == 2 and d["kind"] == "feature"]
    assert any(graph.in_degree(n) > 0 for n in layer_2_features)  # edges between intermediate features
    assert graph.nodes[target.node_id]["contexts"] == contexts.entries
    path = save_graph_json(graph, tmp_path / "graph.json")
    again = load_graph_json(path)
    assert sorted(again.edges(data="effect")) == sorted(graph.edges(data="effect"))
    assert "strongest paths" in tracing.summarize(graph)


def test_intermediate_edges_by_ablation_equal_the_change_by_hand(tiny_llama, setup):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", depth=2,
                                        top_k_per_layer=2, progress=False)
    graph = result.graph
    source, receiver = next((u, v) for u, v in graph.edges if graph.nodes[v]["kind"] == "feature"
                            and graph.nodes[u]["kind"] == "feature")
    low, high = graph.nodes[source], graph.nodes[receiver]

    def receiver_value(edit=None):
        seen = {}
        hooks = [(low["hook"], lambda x, hook=None: torch.cat([x[:, :1], edit(x[:, 1:])], dim=1))] if edit else []
        hooks.append((high["hook"], lambda x, hook=None: seen.setdefault("x", x)))
        with torch.no_grad():
            tiny_llama.run_with_hooks(contexts.tokens, fwd_hooks=hooks)
            codes = dictionaries[high["hook"]].encode(seen["x"])[..., high["index"]]
        return float((codes * contexts.valid).sum(dim=1).mean())

    expected = receiver_value() - receiver_value(without_feature(dictionaries[low["hook"]], low["index"]))
    assert graph.edges[source, receiver]["effect"] == pytest.approx(expected, abs=2e-5)
    assert high["activation"] == pytest.approx(receiver_value(), rel=1e-5)


def test_downstream_tracing_by_ablation_and_by_forward_mode(linear_model):
    model, dictionaries, _, contexts = linear_model
    source = tracing.FeatureTarget(UPSTREAM[1], most_active_feature(model, dictionaries[UPSTREAM[1]], UPSTREAM[1]))
    runs = {method: tracing.run_downstream_trace(model, dictionaries, source, contexts, method=method, depth=1,
                                                 top_k_per_layer=4, progress=False) for method in tracing.METHODS}
    exact, estimate = runs["ablation"].scores[TARGET_HOOK], runs["attribution"].scores[TARGET_HOOK]
    torch.testing.assert_close(estimate.effects, exact.effects, rtol=1e-3, atol=1e-4)  # linear model: exact
    graph = runs["ablation"].graph
    validate_graph(graph)
    assert graph.graph["direction"] == "downstream" and target_node(graph) == source.node_id
    assert graph.out_degree(source.node_id) == 4
    for _, receiver, effect in graph.out_edges(source.node_id, data="effect"):
        assert effect == pytest.approx(float(exact.effects[graph.nodes[receiver]["index"]]))


def test_downstream_attribution_is_the_finite_difference(tiny_llama, setup):
    dictionaries, _, contexts = setup
    hook = UPSTREAM[0]
    source = tracing.FeatureTarget(hook, most_active_feature(tiny_llama, dictionaries[hook], hook))
    estimate = tracing.run_downstream_trace(tiny_llama, dictionaries, source, contexts, method="attribution",
                                            depth=1, progress=False).scores[UPSTREAM[1]]
    step = 0.02
    index = tracing.top_features(estimate, 1)[0]
    target = tracing.FeatureTarget(UPSTREAM[1], index)
    measured = tracing.TraceContexts(contexts.tokens, contexts.lengths, contexts.valid)
    clean = by_hand_value(tiny_llama, dictionaries, target, measured, None, None)
    shifted = by_hand_value(tiny_llama, dictionaries, target, measured, hook,
                            without_feature(dictionaries[hook], source.index, scale=step))
    assert float(estimate.effects[index]) == pytest.approx((clean - shifted) / step, rel=0.02, abs=2e-4)


def test_top_versus_random_draws_active_features(tiny_llama, setup):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", depth=1,
                                        progress=False)
    [report] = tracing.top_versus_random(tiny_llama, dictionaries, result, k=3, n_random=2)
    scores = result.scores[UPSTREAM[1]]
    helpful = sorted(range(len(scores.effects)), key=lambda i: -float(scores.effects[i]))[:3]
    expected = tracing.ablate_features_effect(tiny_llama, dictionaries, target, contexts,
                                              [(UPSTREAM[1], i) for i in helpful])
    assert report.k == 3 and report.top.ablated == pytest.approx(expected.ablated, abs=1e-6)
    assert len(report.random) == 2 and math.isfinite(report.random_fraction)


def test_method_agreement_is_spearman_on_ablations_top_features():
    effects = torch.linspace(-1, 2, 40)
    exact = tracing.LayerScores("h", "ablation", effects, torch.ones(40, dtype=torch.bool), 0.0)
    same = tracing.LayerScores("h", "attribution", effects * 3, torch.ones(40, dtype=torch.bool), 0.0)
    flipped = tracing.LayerScores("h", "attribution", -effects, torch.ones(40, dtype=torch.bool), 0.0)
    [agree] = tracing.method_agreement({"h": same}, {"h": exact}, top_n=30)
    [disagree] = tracing.method_agreement({"h": flipped}, {"h": exact}, top_n=30)
    assert agree.n == 30 and agree.spearman == pytest.approx(1.0) and agree.top_overlap == 1.0
    assert disagree.spearman == pytest.approx(-1.0)


def test_user_mistakes_are_named(tiny_llama, setup):
    dictionaries, target, contexts = setup
    with pytest.raises(ValueError, match="method"):
        tracing.trace_upstream(tiny_llama, dictionaries, target, contexts, method="magic")
    with pytest.raises(ValueError, match="has no dictionary"):
        tracing.trace_upstream(tiny_llama, dictionaries, tracing.FeatureTarget("blocks.0.hook_resid_post", 1), contexts)
    with pytest.raises(ValueError, match="out of range"):
        tracing.trace_upstream(tiny_llama, dictionaries, tracing.FeatureTarget(TARGET_HOOK, 999), contexts)
    with pytest.raises(ValueError, match="no dictionary sits before"):
        tracing.trace_upstream(tiny_llama, {TARGET_HOOK: dictionaries[TARGET_HOOK]}, target, contexts)
    with pytest.raises(ValueError, match="depth"):
        tracing.trace_upstream(tiny_llama, dictionaries, target, contexts, depth=0)
    with pytest.raises(ValueError, match="direct_effects"):
        tracing.trace_upstream(tiny_llama, dictionaries, target, contexts, method="ablation", direct_effects=True)


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saes")
    dictionaries = make_dictionaries(tiny_llama, UPSTREAM + [TARGET_HOOK])
    for hook, dictionary in dictionaries.items():
        save_dictionary(dictionary, folder / hook)
    corpus = folder.parent / "corpus.jsonl"
    generator = torch.Generator().manual_seed(0)
    vocabulary = [w for w in WORDS if w.isalpha()]
    with open(corpus, "w") as handle:
        for number in range(60):
            picks = torch.randint(len(vocabulary), (40,), generator=generator).tolist()
            handle.write(json.dumps({"id": f"d{number}", "text": " ".join(vocabulary[p] for p in picks)}) + "\n")
    return folder, corpus, most_active_feature(tiny_llama, dictionaries[TARGET_HOOK], TARGET_HOOK)


def _cli(argv):
    from sparse_circuits.cli.main import build_parser, run_command

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_command(args)


def test_cli_trace_writes_a_graph_and_prints_paths(tiny_llama_folder, saved, tmp_path, capsys):
    folder, corpus, index = saved
    out = tmp_path / "graph.json"
    _cli(["trace", "--model", str(tiny_llama_folder), "--device", "cpu", "--corpus", str(corpus), "--saes", str(folder),
          "--feature", f"{TARGET_HOOK}:{index}", "--depth", "2", "--top-k", "3", "--n-contexts", "4",
          "--scan-contexts", "12", "--context-size", "12", "--out", str(out)])
    graph = load_graph_json(out)
    assert target_node(graph) == f"{TARGET_HOOK}:{index}" and len(graph.nodes[target_node(graph)]["contexts"]) == 4
    feature_nodes = [d for n, d in graph.nodes(data=True) if d["kind"] == "feature" and n != target_node(graph)]
    assert feature_nodes and all(d["top_tokens"] and d["contexts"] for d in feature_nodes)
    printed = capsys.readouterr().out
    assert "strongest paths" in printed and f"wrote {out}" in printed


def test_cli_trace_on_given_texts_and_a_logit(tiny_llama, tiny_llama_folder, saved, tmp_path, capsys):
    folder, _, _ = saved
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "logit.json"
    _cli(["trace", "--model", str(tiny_llama_folder), "--device", "cpu", "--saes", str(folder), "--logit", "Mary",
          "--logit-other", "John", "--contexts", str(texts), "--method", "ablation", "--depth", "1", "--top-k", "2",
          "--compare", "--out", str(out)])
    graph = load_graph_json(out)
    assert target_node(graph) == "logit: Mary - John" and graph.graph["method"] == "ablation"
    assert tracing.target_from_graph(graph) == tracing.logit_target(tiny_llama, "Mary", "John")
    assert "spearman" in capsys.readouterr().out
    for feature, message in [("blocks.0.hook_resid_post:1", "no dictionary at"), (f"{TARGET_HOOK}:5000", "out of range")]:
        with pytest.raises(ValueError, match=message):
            _cli(["trace", "--model", str(tiny_llama_folder), "--saes", str(folder), "--feature", feature,
                  "--out", str(out)])
    with pytest.raises(ValueError, match="needs texts"):
        _cli(["trace", "--model", str(tiny_llama_folder), "--saes", str(folder), "--logit", "Mary", "--out", str(out)])


def test_cli_export_prunes_and_writes_each_format(tiny_llama, setup, tmp_path, capsys):
    dictionaries, target, contexts = setup
    graph = tracing.trace_upstream(tiny_llama, dictionaries, target, contexts, depth=2, top_k_per_layer=3,
                                   progress=False)
    source = save_graph_json(graph, tmp_path / "graph.json")
    for fmt in ("html", "dot", "json"):
        _cli(["export", str(source), "--format", fmt, "--top-k-per-node", "2", "-o", str(tmp_path / f"g.{fmt}")])
        assert (tmp_path / f"g.{fmt}").stat().st_size > 0
    pruned = load_graph_json(tmp_path / "g.json")
    assert all(pruned.in_degree(node) <= 2 for node in pruned)
    _cli(["export", str(source), "--shares", "-o", str(tmp_path / "shares.json")])
    shares = load_graph_json(tmp_path / "shares.json")
    assert shares.graph["edge_units"] and sorted(shares.edges) == sorted(graph.edges)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _cli(["export", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.svg")])


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.integration
def test_real_model_trace_agrees_across_methods(real_model):
    """SmolLM2 with random signed bases at two consecutive layers: both methods give a valid graph, and
    attribution ranks the features as ablation does (the speed is measured by benchmarks/trace_speed.py)."""
    from sae.baselines import random_basis

    hooks = ["blocks.4.hook_resid_post", "blocks.5.hook_resid_post"]
    d_model = real_model.cfg.d_model
    dictionaries = {hook: random_basis(d_model, seed=number, n_components=24, hook_name=hook)
                    for number, hook in enumerate(hooks)}
    texts = ["The capital of France is Paris, and the capital of Italy is", "She opened the door and said hello"]
    hook = hooks[1]
    target = tracing.FeatureTarget(hook, most_active_feature(real_model, dictionaries[hook], hook, texts))
    contexts = tracing.contexts_from_texts(real_model, texts, target)
    runs = {method: tracing.run_upstream_trace(real_model, dictionaries, target, contexts, method=method, depth=1,
                                               top_k_per_layer=10, progress=False) for method in tracing.METHODS}
    for run in runs.values():
        validate_graph(run.graph)
        assert run.graph.number_of_edges() >= 5
    [agreement] = tracing.method_agreement(runs["attribution"].scores, runs["ablation"].scores, top_n=20)
    assert agreement.n == 20 and agreement.spearman >= 0.6


def test_protected_positions_are_left_alone(tiny_llama, setup):
    dictionaries, target, contexts = setup
    protected = torch.zeros_like(contexts.tokens, dtype=torch.bool)
    protected[:, 2] = True
    guarded = tracing.TraceContexts(contexts.tokens, contexts.lengths, contexts.measure, protected=protected)
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, guarded, method="ablation", depth=1,
                                        progress=False)
    hook = UPSTREAM[1]
    _, cache = tiny_llama.run_with_cache(contexts.tokens, names_filter=[hook])
    codes = dictionaries[hook].encode(cache[hook])  # [n, pos, f]
    elsewhere = (codes * guarded.valid[..., None]).sum(dim=(0, 1)) > 0
    index = int((codes[:, 2] * elsewhere).sum(dim=0).argmax())  # active at position 2 and elsewhere
    remove = without_feature(dictionaries[hook], index)

    def edit_but_position_2(body):
        edited = remove(body)
        edited[:, 1] = body[:, 1]  # body starts at position 1
        return edited

    clean = by_hand_value(tiny_llama, dictionaries, target, guarded, None, None)
    expected = clean - by_hand_value(tiny_llama, dictionaries, target, guarded, hook, edit_but_position_2)
    assert float(result.scores[hook].effects[index]) == pytest.approx(expected, abs=2e-5)
    everywhere = clean - by_hand_value(tiny_llama, dictionaries, target, guarded, hook, remove)
    assert abs(everywhere - expected) > 1e-4  # position 2 mattered


def test_outlier_positions_are_protected_in_a_trace(tiny_llama, setup):
    dictionaries, target, contexts = setup

    def amplify(x, hook):
        x = x.clone()
        x[:, 4] *= 20
        return x

    with tiny_llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", amplify)]):
        result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=1, progress=False)
    assert result.contexts.protected[:, 4].all() and int(result.contexts.protected.sum()) == len(TEXTS)
    assert result.graph.graph["protected_positions"] == len(TEXTS)
    assert not result.contexts.measure[:, 4].any() and not result.contexts.valid[:, 4].any()


def test_relative_graph_divides_by_the_receivers_activation(tiny_llama, setup):
    dictionaries, target, contexts = setup
    graph = tracing.trace_upstream(tiny_llama, dictionaries, target, contexts, depth=2, top_k_per_layer=2,
                                   progress=False)
    relative = tracing.relative_graph(graph)
    for source, receiver, effect in graph.edges(data="effect"):
        expected = effect / graph.nodes[receiver]["activation"]
        assert relative.edges[source, receiver]["effect"] == pytest.approx(expected)
        assert relative.edges[source, receiver]["weight"] == pytest.approx(abs(expected))
    assert graph.edges(data="effect") != relative.edges(data="effect")  # the original is untouched
    assert "edge_units" in relative.graph and "edge_units" not in graph.graph


def test_trace_and_export_picks_a_feature_and_writes_the_files(tiny_llama, saved, tmp_path):
    from sparse_circuits.pipelines.trace import trace_and_export
    from sae.corpus import load_corpus
    from sae.io import load_dictionaries

    folder, corpus, _ = saved
    dictionaries = load_dictionaries(folder)
    with torch.no_grad():  # sparse enough to look like trained features: fire on about 3% of tokens
        tokens = torch.randint(3, 60, (8, 16), generator=torch.Generator().manual_seed(5))
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=list(dictionaries))
        for hook, dictionary in dictionaries.items():
            dictionary.b_enc.sub_(torch.quantile(dictionary.pre_activations(cache[hook][:, 1:]).flatten(0, 1),
                                                 0.97, dim=0))
    paths = trace_and_export(tiny_llama, dictionaries, feature=None, corpus=load_corpus(str(corpus)),
                             out_dir=tmp_path, depth=2, top_k_per_layer=3, n_contexts=4, scan_contexts=40,
                             context_size=16, progress=False)
    assert sorted(paths) == ["diagram.html", "diagram.svg", "graph.json", "summary.txt"]
    graph = load_graph_json(paths["graph.json"])
    assert graph.nodes[target_node(graph)]["hook"] == TARGET_HOOK  # the deepest dictionary
    assert "<svg" in paths["diagram.svg"].read_text() and "circuit-data" in paths["diagram.html"].read_text()
    assert "strongest paths" in paths["summary.txt"].read_text()
    from sae.io import dictionary_sha256

    provenance = graph.graph["provenance"]  # what the graph was traced from
    assert provenance["dictionaries"] == {hook: dictionary_sha256(dictionary) for hook, dictionary in dictionaries.items()}
    assert provenance["seed"] == 0 and set(provenance["model"]) == {"name", "sha256"}


def test_length_buckets_pad_least():
    lengths = torch.tensor([5, 50, 6, 48, 7, 49])
    buckets = tracing.length_buckets(lengths, max_buckets=3)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(6))
    assert sorted(buckets) == [[0, 2, 4], [1, 3, 5]]  # a third group would save only 2 of 171 tokens
    assert tracing.length_buckets(torch.tensor([9, 9, 9]), max_buckets=3) == [[0, 1, 2]]
    assert tracing.length_buckets(lengths, max_buckets=1) == [list(range(6))]


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_encode_features_matches_the_full_encode(architecture):
    cfg = DictionaryConfig(architecture, d_in=16, d_sae=40, k=6 if architecture == "topk" else None, seed=3)
    dictionary = build_dictionary(cfg)
    with torch.no_grad():
        dictionary.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        dictionary.b_enc.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    indices = [0, 7, 39, 7]
    torch.testing.assert_close(tracing.encode_features(dictionary, x, indices), dictionary.encode(x)[..., indices])


def test_ablation_agreement_runs_both_methods(tiny_llama, setup):
    dictionaries, target, contexts = setup
    agreement, seconds = tracing.ablation_agreement(tiny_llama, dictionaries, target, contexts, depth=2, top_n=10,
                                                    progress=False)
    assert [row.hook for row in agreement] == UPSTREAM[::-1] and all(row.n == 10 for row in agreement)
    assert all(row.spearman > 0.5 for row in agreement) and set(seconds) == {"attribution", "ablation"}
