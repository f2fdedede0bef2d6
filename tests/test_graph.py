"""The circuit graph model: building, pruning, strongest paths and node-link JSON files,
on small hand-built graphs whose answers are known."""

from __future__ import annotations

import itertools
import json
import random

import networkx as nx
import numpy as np
import pytest

from circuits.graph import (CircuitPath, GraphFormatError, add_edge, add_error_node, add_feature_node,
                            add_output_node, add_token_node, describe_node, error_node_id, feature_node_id,
                            format_paths, graph_from_node_link, graph_to_node_link, load_graph_json,
                            node_influence, prune_by_cumulative_influence, prune_by_threshold,
                            prune_top_k_per_node, remove_dangling, save_graph_json, set_target,
                            sorted_nodes, strongest_paths)

HOOK = "blocks.{}.hook_resid_post"


def assert_same_graph(first: nx.DiGraph, second: nx.DiGraph) -> None:
    """Same node ids, node/edge attribute dicts and graph attributes (isomorphic with matching data)."""
    assert nx.is_isomorphic(first, second, node_match=lambda a, b: a == b, edge_match=lambda a, b: a == b)
    assert dict(first.nodes(data=True)) == dict(second.nodes(data=True))
    assert {(u, v): d for u, v, d in first.edges(data=True)} == {(u, v): d for u, v, d in second.edges(data=True)}
    assert first.graph == second.graph


def rich_graph() -> nx.DiGraph:
    """Every kind of node and attribute, with awkward text and numpy numbers."""
    graph = nx.DiGraph(model="tiny-llama", method="ablation", notes={"prompts": 3, "seed": None})
    add_token_node(graph, 0, "When")
    add_token_node(graph, 1, " Mary\n")
    add_feature_node(graph, HOOK.format(12), 12, 1234, activation=np.float32(2.5), label="names",
                     top_tokens=["Mary", " John", "\\x"], promoted_tokens=[" Mary"], suppressed_tokens=[],
                     contexts=[{"tokens": ["When", " Mary", " went"], "position": 1, "activation": 3.0}])
    add_error_node(graph, HOOK.format(12), 12, activation=0.25)
    add_output_node(graph, 30, "logit: Mary", label='logit " Mary"')
    add_edge(graph, "token:1", feature_node_id(HOOK.format(12), 1234), 0.75, "attribution")
    add_edge(graph, "token:0", error_node_id(HOOK.format(12)), -0.125, "attribution")
    add_edge(graph, feature_node_id(HOOK.format(12), 1234), "logit: Mary", np.float64(1.5), "ablation")
    add_edge(graph, error_node_id(HOOK.format(12)), "logit: Mary", -0.5, "ablation")
    return graph


def known_graph() -> nx.DiGraph:
    """tokens t0, t1 -> features a, b -> output; c hangs off a with no path to the output.

    Normalised weights: a->out 3/4, b->out 1/4, t0->a 1/2, t1->a 1/2, t1->b 1, so the influences
    are a .75, t1 .625 (.375 via a + .25 via b), t0 .375, b .25, c 0; total 2.
    """
    graph = nx.DiGraph()
    add_token_node(graph, 0, "t0")
    add_token_node(graph, 1, "t1")
    a = add_feature_node(graph, HOOK.format(0), 0, 1)
    b = add_feature_node(graph, HOOK.format(0), 0, 2)
    c = add_feature_node(graph, HOOK.format(1), 1, 3)
    add_output_node(graph, 2)
    for source, target, effect in (("token:0", a, 1.0), ("token:1", a, 1.0), ("token:1", b, 1.0),
                                   (a, "output", 3.0), (b, "output", -1.0), (a, c, 0.5)):
        add_edge(graph, source, target, effect, "attribution")
    return graph


A, B, C = (feature_node_id(HOOK.format(layer), index) for layer, index in ((0, 1), (0, 2), (1, 3)))


# --- building -------------------------------------------------------------------------------


def test_node_ids_and_default_attributes():
    graph = nx.DiGraph()
    node = add_feature_node(graph, "blocks.12.hook_resid_post", 12, 1234, activation=1)
    assert node == "blocks.12.hook_resid_post:1234"
    assert error_node_id("blocks.3.hook_resid_post") == "blocks.3.hook_resid_post:error"
    assert graph.nodes[node] == {"kind": "feature", "hook": "blocks.12.hook_resid_post", "layer": 12, "index": 1234,
                                 "activation": 1.0, "label": "", "top_tokens": [], "promoted_tokens": [],
                                 "suppressed_tokens": [], "contexts": [], "is_target": False}
    assert isinstance(graph.nodes[node]["activation"], float)
    output = add_output_node(graph, 30)
    assert graph.graph["target"] == output and graph.nodes[output]["is_target"]
    set_target(graph, node)
    assert graph.graph["target"] == node and not graph.nodes[output]["is_target"]


def test_add_edge_records_effect_weight_sign_and_method():
    graph = rich_graph()
    edge = graph.edges["token:0", error_node_id(HOOK.format(12))]
    assert edge == {"effect": -0.125, "weight": 0.125, "sign": -1, "method": "attribution"}
    assert graph.edges["token:1", feature_node_id(HOOK.format(12), 1234)]["sign"] == 1


@pytest.mark.parametrize("source, target, effect, method, message", [
    ("token:0", "nowhere", 1.0, "attribution", "not in the graph"),
    ("token:0", "token:0", 1.0, "attribution", "self-loops"),
    ("token:0", "logit: Mary", 1.0, "guess", "method"),
    ("token:0", "logit: Mary", float("nan"), "attribution", "finite"),
])
def test_add_edge_rejects_bad_input(source, target, effect, method, message):
    with pytest.raises(ValueError, match=message):
        add_edge(rich_graph(), source, target, effect, method)


# --- node-link JSON -------------------------------------------------------------------------


def test_json_round_trip_keeps_every_attribute(tmp_path):
    graph = rich_graph()
    path = save_graph_json(graph, tmp_path / "graph.json")
    loaded = load_graph_json(path)
    assert_same_graph(graph, loaded)
    feature = feature_node_id(HOOK.format(12), 1234)
    assert type(loaded.nodes[feature]["activation"]) is float and loaded.nodes[feature]["activation"] == 2.5
    assert type(loaded.edges[feature, "logit: Mary"]["effect"]) is float
    assert [entry.name for entry in tmp_path.iterdir()] == ["graph.json"]  # no temporary file left behind


def test_json_is_networkx_node_link_data(tmp_path):
    graph = rich_graph()
    data = json.loads(save_graph_json(graph, tmp_path / "graph.json").read_text())
    assert_same_graph(graph, nx.node_link_graph(data, edges="edges"))
    assert [node["id"] for node in data["nodes"]] == sorted_nodes(graph)
    assert graph_from_node_link(graph_to_node_link(graph)).graph == graph.graph


def test_json_bytes_do_not_depend_on_insertion_order(tmp_path):
    graph = rich_graph()
    shuffled = nx.DiGraph(**graph.graph)
    shuffled.add_nodes_from(reversed(list(graph.nodes(data=True))))
    shuffled.add_edges_from(reversed(list(graph.edges(data=True))))
    first = save_graph_json(graph, tmp_path / "first.json").read_bytes()
    assert save_graph_json(shuffled, tmp_path / "second.json").read_bytes() == first
    assert save_graph_json(graph, tmp_path / "third.json").read_bytes() == first


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not JSON"),
    ("[1, 2]", "node-link object"),
    ('{"schema": "something-else", "nodes": [], "edges": []}', "schema"),
    ('{"schema_version": 99, "nodes": [], "edges": []}', "upgrade"),
    ('{"nodes": [{"id": "x", "layer": 0}], "edges": [], "graph": {"target": "x"}}', "kind"),
    ('{"nodes": [{"id": "x", "kind": "output", "layer": 0}], "edges": [], "graph": {}}', "target"),
    ('{"nodes": [{"id": "x", "kind": "output", "layer": 0}], "edges": [{"source": "x", "target": "y"}],'
     ' "graph": {"target": "x"}}', "edge entry"),
])
def test_loading_something_else_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GraphFormatError, match=message) as caught:
        load_graph_json(path)
    assert str(path) in str(caught.value)


def test_non_finite_values_are_refused_when_saving(tmp_path):
    graph = rich_graph()
    graph.graph["score"] = float("inf")
    with pytest.raises(ValueError, match="score"):
        save_graph_json(graph, tmp_path / "graph.json")


# --- pruning ----------------------------------------------------------------------------------


def test_remove_dangling_drops_nodes_without_a_path_to_the_target():
    graph = known_graph()
    add_token_node(graph, 5, "alone")
    pruned = remove_dangling(graph)
    assert set(pruned) == {"token:0", "token:1", A, B, "output"}
    assert set(graph) == {"token:0", "token:1", A, B, C, "output", "token:5"}  # the original is untouched
    only_target = nx.DiGraph()
    add_output_node(only_target, 1)
    assert list(remove_dangling(only_target)) == ["output"]


def test_prune_by_threshold_keeps_edges_at_or_above_it():
    pruned = prune_by_threshold(known_graph(), 1.0)
    assert set(pruned.edges) == {("token:0", A), ("token:1", A), ("token:1", B), (A, "output"), (B, "output")}
    assert C not in pruned
    strict = prune_by_threshold(known_graph(), 1.5)
    assert set(strict) == {A, "output"} and set(strict.edges) == {(A, "output")}
    kept_nodes = prune_by_threshold(known_graph(), 1.5, drop_dangling=False)
    assert set(kept_nodes) == set(known_graph()) and set(kept_nodes.edges) == {(A, "output")}


def test_prune_top_k_keeps_strongest_incoming_edges():
    pruned = prune_top_k_per_node(known_graph(), 1)
    # a's two inputs tie at 1.0: the earlier node (token 0) wins; b loses its only output edge,
    # so b and then token 1 dangle.
    assert set(pruned.edges) == {("token:0", A), (A, "output")}
    assert set(pruned) == {"token:0", A, "output"}
    assert set(prune_top_k_per_node(known_graph(), 2).edges) == set(known_graph().edges) - {(A, C)}


def test_node_influence_matches_the_hand_computed_values():
    influence = node_influence(known_graph())
    expected = {"output": 1.0, A: 0.75, B: 0.25, "token:0": 0.375, "token:1": 0.625, C: 0.0}
    assert influence == pytest.approx(expected)


@pytest.mark.parametrize("fraction, kept", [
    (0.3, {A, "output"}),  # needs 0.6 of 2.0: a alone (0.75)
    (0.5, {A, "token:1", "output"}),  # needs 1.0: a + t1 (1.375)
    (0.8, {A, "token:1", "token:0", "output"}),  # needs 1.6: a + t1 + t0 (1.75)
    (1.0, {A, B, "token:0", "token:1", "output"}),  # everything with a path to the output
])
def test_prune_by_cumulative_influence(fraction, kept):
    pruned = prune_by_cumulative_influence(known_graph(), fraction)
    assert set(pruned) == kept
    assert set(pruned.edges) == {edge for edge in known_graph().edges if set(edge) <= kept}


def test_pruning_copies_attributes_and_keeps_the_original_intact():
    graph = rich_graph()
    pruned = prune_by_threshold(graph, 0.2)
    feature = feature_node_id(HOOK.format(12), 1234)
    assert pruned.graph == graph.graph
    assert pruned.nodes[feature] == graph.nodes[feature]
    pruned.nodes[feature]["top_tokens"].append("changed")
    pruned.graph["notes"]["prompts"] = 99
    assert "changed" not in graph.nodes[feature]["top_tokens"] and graph.graph["notes"]["prompts"] == 3
    assert "token:0" not in pruned and "token:0" in graph  # its only edge (-0.125) fell below 0.2


@pytest.mark.parametrize("prune, argument", [(prune_by_threshold, -1.0), (prune_top_k_per_node, 0),
                                             (prune_by_cumulative_influence, 0.0),
                                             (prune_by_cumulative_influence, 1.5)])
def test_pruning_rejects_bad_arguments(prune, argument):
    with pytest.raises(ValueError):
        prune(known_graph(), argument)


def test_cycles_are_reported():
    graph = known_graph()
    add_edge(graph, A, "token:0", 0.1, "attribution")
    with pytest.raises(ValueError, match="cycle"):
        node_influence(graph)
    with pytest.raises(ValueError, match="cycle"):
        strongest_paths(graph)


# --- paths ------------------------------------------------------------------------------------


def paths_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    x = add_feature_node(graph, HOOK.format(0), 0, 1)
    z = add_feature_node(graph, HOOK.format(0), 0, 7)
    y = add_feature_node(graph, "blocks.12.hook_resid_post", 12, 1234, top_tokens=["Mary", " John"])
    add_output_node(graph, 30)
    for source, target, effect in ((x, y, 0.5), (z, y, -0.9), (y, "output", 0.8), (x, "output", 0.3)):
        add_edge(graph, source, target, effect, "ablation")
    return graph


def test_strongest_paths_are_ordered_by_product_of_effects():
    x, z, y = HOOK.format(0) + ":1", HOOK.format(0) + ":7", "blocks.12.hook_resid_post:1234"
    paths = strongest_paths(paths_graph(), n=5)
    assert [path.nodes for path in paths] == [(z, y, "output"), (x, y, "output"), (x, "output")]
    assert [path.strength for path in paths] == pytest.approx([0.72, 0.4, 0.3])
    assert paths[0].effects == (-0.9, 0.8) and paths[0].sign == -1 and paths[1].sign == 1
    assert [path.nodes for path in strongest_paths(paths_graph(), n=2)] == [(z, y, "output"), (x, y, "output")]


def test_strongest_paths_match_brute_force_on_a_random_layered_graph():
    generator = random.Random(0)
    graph = nx.DiGraph()
    layers = [[add_feature_node(graph, HOOK.format(layer), layer, index) for index in range(4)] for layer in range(4)]
    add_output_node(graph, 4)
    for lower, upper in itertools.pairwise(layers + [["output"]]):
        for source, target in itertools.product(lower, upper):
            if generator.random() < 0.7:
                add_edge(graph, source, target, generator.uniform(-2, 2), "attribution")
    sources = [node for node in graph if graph.in_degree(node) == 0 and node != "output"]
    every = sorted(np.prod([abs(graph.edges[u, v]["effect"]) for u, v in itertools.pairwise(path)])
                   for source in sources for path in nx.all_simple_paths(graph, source, "output"))[::-1]
    found = strongest_paths(graph, n=7)
    assert [path.strength for path in found] == pytest.approx(every[:7])
    assert all(isinstance(path, CircuitPath) and path.nodes[-1] == "output" for path in found)


def test_format_paths_names_nodes_readably():
    graph = paths_graph()
    assert describe_node(graph, "blocks.12.hook_resid_post:1234") == 'L12 #1234 ("Mary", " John")'
    text = format_paths(graph, strongest_paths(graph, n=2))
    assert text.splitlines()[0] == "1. strength 0.72, net sign -"
    assert '--(-0.9)--> L12 #1234 ("Mary", " John")' in text and "--(+0.8)--> output" in text
    assert text.count("strength") == 2
    assert format_paths(graph, []) == "no paths into the target"
    assert describe_node(rich_graph(), "token:1") == 'tok 1 " Mary\\n"'
