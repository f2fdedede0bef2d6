"""Feature inspection on tiny models: scans match a by-hand forward, examples mark the activating token,
the direct logit effect is the decoder row through the final norm's weight and the unembedding."""

import warnings

import networkx as nx
import pytest
import torch

from circuits import features
from circuits.engine import passthrough_positions
from circuits.graph import add_feature_node, set_target, validate_graph
from sae.config import DictionaryConfig
from sae.metrics import outlier_positions
from sae.registry import build_dictionary

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def random_dictionaries(model, hooks=HOOKS, n_features=48, bias=0.0):
    dictionaries = {}
    for number, hook in enumerate(hooks):
        cfg = DictionaryConfig("standard", d_in=model.cfg.d_model, d_sae=n_features, hook_name=hook, seed=number)
        dictionary = build_dictionary(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_(bias)
        dictionaries[hook] = dictionary.eval()
    return dictionaries


def random_tokens(n=10, length=12, seed=0):
    tokens = torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 1  # BOS
    return tokens


@pytest.fixture(scope="module")
def scanned(tiny_llama):
    dictionaries = random_dictionaries(tiny_llama)
    tokens = random_tokens()
    return dictionaries, tokens, features.scan_features(tiny_llama, dictionaries, tokens, batch_size=4, progress=False)


def test_scan_matches_a_by_hand_forward_without_bos(tiny_llama, scanned):
    dictionaries, tokens, scan = scanned
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        codes = dictionaries[hook].encode(cache[hook])  # [n, pos, f]
        body = codes[:, 1:]
        torch.testing.assert_close(scan.max_activation[hook], body.max(dim=1).values, rtol=1e-5, atol=1e-6)
        assert int(scan.max_position[hook].min()) >= 1  # BOS is never the activating token
        rows = torch.arange(tokens.shape[0])[:, None]
        picked = codes[rows, scan.max_position[hook], torch.arange(codes.shape[-1])[None, :]]
        torch.testing.assert_close(picked, scan.max_activation[hook], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scan.firing_fraction[hook], (body > 0).float().mean(dim=(0, 1)))
        torch.testing.assert_close(scan.mean_activation[hook], body.mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)


def test_max_activating_examples_are_sorted_and_mark_the_token(tiny_llama, scanned):
    _, tokens, scan = scanned
    hook = HOOKS[1]
    index = int(scan.max_activation[hook].max(dim=0).values.argmax())
    examples = features.max_activating_examples(scan, hook, index, n=4)
    assert len(examples) == 4
    assert [e.activation for e in examples] == sorted((e.activation for e in examples), reverse=True)
    assert examples[0].activation == pytest.approx(float(scan.max_activation[hook][:, index].max()))
    entry = features.context_entry(tiny_llama.tokenizer, tokens[examples[0].context], examples[0].position,
                                   examples[0].activation, before=3, after=2)
    marked = tiny_llama.tokenizer.decode([int(tokens[examples[0].context, examples[0].position])])
    assert entry["tokens"][entry["position"]] == marked
    assert len(entry["tokens"]) <= 6 and entry["activation"] == pytest.approx(examples[0].activation)


def test_band_sampling_stays_in_band_and_is_seeded(scanned):
    _, _, scan = scanned
    hook = HOOKS[0]
    index = int((scan.max_activation[hook] > 0).sum(dim=0).argmax())
    top = float(scan.max_activation[hook][:, index].max())
    sample = features.max_activating_examples(scan, hook, index, n=3, band=(0.5, 1.0), seed=1)
    assert sample and all(0.5 * top <= e.activation <= top for e in sample)
    assert sample == features.max_activating_examples(scan, hook, index, n=3, band=(0.5, 1.0), seed=1)
    with pytest.raises(ValueError, match="band"):
        features.max_activating_examples(scan, hook, index, band=(0.9, 0.1))


def test_a_feature_that_never_fires_has_no_examples(tiny_llama):
    dictionaries = random_dictionaries(tiny_llama, bias=-1e6)
    scan = features.scan_features(tiny_llama, dictionaries, random_tokens(4), progress=False)
    assert features.max_activating_examples(scan, HOOKS[0], 3) == []
    with pytest.raises(ValueError, match="no feature"):
        features.choose_feature(scan, HOOKS[0], tiny_llama.tokenizer, min_contexts=1)
    with pytest.raises(ValueError, match="out of range"):
        features.max_activating_examples(scan, HOOKS[0], 10_000)


def test_top_tokens_and_choose_feature(tiny_llama, scanned):
    _, tokens, scan = scanned
    hook = HOOKS[1]
    chosen = features.choose_feature(scan, hook, tiny_llama.tokenizer, min_contexts=3, max_firing_fraction=1.0)
    assert int((scan.max_activation[hook][:, chosen] > 0).sum()) >= 3
    tops = features.top_tokens(scan, hook, chosen, tiny_llama.tokenizer, n=3)
    best = features.max_activating_examples(scan, hook, chosen, n=50)
    texts = {tiny_llama.tokenizer.decode([int(tokens[e.context, e.position])]) for e in best}
    assert tops and set(tops) <= texts


def test_direct_logit_effect_is_the_decoder_row_through_norm_weight_and_unembedding(tiny_model):
    dictionary = random_dictionaries(tiny_model, hooks=["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"]
    direction = dictionary.feature_directions[5].detach()
    normalised = direction
    if tiny_model.cfg.normalization_type.startswith("LN"):
        normalised = direction - direction.mean()
    expected = (normalised * tiny_model.ln_final.weight.detach()) @ tiny_model.W_U.detach()
    effect = features.feature_logit_effect(tiny_model, dictionary, 5, k=4)
    best = torch.topk(expected, 4)
    worst = torch.topk(-expected, 4)
    assert [t for t, _ in effect.promoted] == [tiny_model.tokenizer.decode([int(i)]) for i in best.indices]
    assert [t for t, _ in effect.suppressed] == [tiny_model.tokenizer.decode([int(i)]) for i in worst.indices]
    assert effect.promoted[0][1] == pytest.approx(float(best.values[0]), rel=1e-5)
    assert effect.suppressed[0][1] == pytest.approx(-float(worst.values[0]), rel=1e-5)


def test_direct_logit_effect_matches_the_logit_change_at_fixed_norm_scale(tiny_llama):
    """Adding a direction to the final residual with the norm's scale (the rms) held fixed moves the
    logits by (direct logit effect) / rms: the linear part is what the feature writes."""
    direction = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(3))
    tokens = random_tokens(1, 6)
    last = f"blocks.{tiny_llama.cfg.n_layers - 1}.hook_resid_post"
    scales = {}

    def keep_scale(value, hook):
        if "scale" in scales:
            return scales["scale"]
        scales["scale"] = value.detach()
        return value

    clean = tiny_llama.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", keep_scale)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge notes that a norm scale was hooked
        moved = tiny_llama.run_with_hooks(tokens, fwd_hooks=[(last, lambda x, hook: x + direction),
                                                             ("ln_final.hook_scale", keep_scale)])
    scale = scales["scale"][0, -1]
    expected = features.final_norm_linear(tiny_llama, direction) @ tiny_llama.W_U.detach()
    change = (moved - clean)[0, -1]
    torch.testing.assert_close(change, expected / scale.squeeze(), rtol=1e-3, atol=1e-3)


def test_annotate_fills_feature_nodes(tiny_llama, scanned):
    dictionaries, _, scan = scanned
    hook = HOOKS[1]
    index = int(scan.max_activation[hook].max(dim=0).values.argmax())
    graph = nx.DiGraph()
    node = add_feature_node(graph, hook, 2, index)
    set_target(graph, node)
    features.annotate_feature_nodes(graph, tiny_llama, dictionaries, scan, n_contexts=3)
    data = graph.nodes[node]
    assert data["top_tokens"] and len(data["contexts"]) == 3
    assert len(data["promoted_tokens"]) == 8 and len(data["suppressed_tokens"]) == 8
    validate_graph(graph)


def test_outlier_positions_are_large_norms_against_the_rows_median():
    norms = torch.tensor([[100.0, 1.0, 1.0, 10.0, 1.2, 0.9, 50.0]])  # BOS, then one outlier, then padding
    activation = torch.zeros(1, 7, 4)
    activation[..., 0] = norms
    assert outlier_positions(activation, 3.0, lengths=torch.tensor([6])).tolist() == [
        [False, False, False, True, False, False, False]]
    assert not outlier_positions(activation, None).any()


def test_the_scan_skips_outlier_positions(tiny_llama):
    dictionaries = random_dictionaries(tiny_llama, hooks=[HOOKS[0]])
    tokens = random_tokens(6)

    def amplify(x, hook):
        x = x.clone()
        x[:, 3] *= 20  # a massive activation, like SmolLM2's on some " the" tokens
        return x

    with tiny_llama.hooks(fwd_hooks=[(HOOKS[0], amplify)]):
        skipping = features.scan_features(tiny_llama, dictionaries, tokens, progress=False)
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=[HOOKS[0]])
    assert passthrough_positions(cache[HOOKS[0]])[:, 3].all()  # above the engine's 10x rule
    assert not (skipping.max_position[HOOKS[0]] == 3).any()
    codes = dictionaries[HOOKS[0]].encode(cache[HOOKS[0]])[:, 1:]  # [n, pos - 1, f], BOS left out
    keeping = codes.argmax(dim=1) + 1  # [n, f]: the position of each feature's maximum, as a scan would keep it
    assert (keeping == 3).float().mean() > 0.3  # 20x the norm wins wherever it fires: skipping it mattered
