"""Downstream tracing: what a feature causes in later dictionary layers, as a graph.

The effect of removing the source on every feature of the later layers is measured exactly
(ablation: one clean and one ablated row per context) or linearised in one forward-mode pass
(attribution: the source's removal is the tangent at its hook, carried forward by
torch.autograd.forward_ad). Both go through the engine; the tangent enters as an ActivationMap
that returns a dual tensor, so it acts only at the positions the engine lets it edit.
"""

from __future__ import annotations

import time

import networkx as nx
import torch
import torch.autograd.forward_ad as forward_ad
from sae.progress import progress_bar

from circuits import graph as circuit_graph
from circuits.engine import ActivationMap, FeatureAblation, run_with_edits
from circuits.features import FeatureScan, annotate_feature_nodes
from circuits.hooks import hook_order, layer_of_hook, stop_layer
from circuits.models import model_name_of
from circuits.tracing.contexts import TraceContexts
from circuits.tracing.scoring import LayerScores, Node, clean_run
from circuits.tracing.targets import FeatureTarget, encode_features
from circuits.tracing.upstream import TraceResult, check_inputs, top_features
from sae.dictionary import Dictionary


def downstream_hooks(dictionaries: dict[str, Dictionary], source: FeatureTarget, depth: int | None) -> list[str]:
    """Dictionary hooks after the source, nearest first, at most `depth` of them."""
    above = sorted((hook for hook in dictionaries if hook_order(hook) > hook_order(source.hook)), key=hook_order)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        above = above[:depth]
    if not above:
        raise ValueError(f"no dictionary sits after {source.hook}; give dictionaries at later layers to trace downstream")
    return above


def downstream_effects(model, dictionaries: dict[str, Dictionary], node: Node, contexts: TraceContexts,
                       hooks: list[str], *, method: str) -> dict[str, torch.Tensor]:
    """{hook: [n_features]} the effect of removing `node` on every feature at `hooks` (value summed
    over the valid positions, mean over contexts): exact by ablation, or linearised (forward mode)."""
    stop = stop_layer(hooks, model.cfg.n_layers)
    if method == "ablation":
        return _ablated_effects(model, dictionaries, node, contexts, hooks, stop=stop)
    return _linearised_effects(model, dictionaries, node, contexts, hooks, stop=stop)


@torch.no_grad()
def _ablated_effects(model, dictionaries, node: Node, contexts: TraceContexts, hooks: list[str], *,
                     stop: int | None) -> dict[str, torch.Tensor]:
    rows, valid = len(contexts), contexts.valid
    both = torch.cat([valid, valid])  # clean rows, then ablated rows: one batch
    edit = FeatureAblation.nothing(dictionaries[node.hook], both)
    edit.features[rows:, node.index] = 1.0
    run = run_with_edits(model, torch.cat([contexts.tokens, contexts.tokens]), {node.hook: edit}, record=hooks,
                         stop_at_layer=stop)
    result = {}
    for hook in hooks:
        sums = (dictionaries[hook].encode(run.recorded[hook]).cpu() * both[..., None]).sum(dim=1)
        result[hook] = (sums[:rows] - sums[rows:]).mean(dim=0)
    return result


@torch.no_grad()
def _linearised_effects(model, dictionaries, node: Node, contexts: TraceContexts, hooks: list[str], *,
                        stop: int | None) -> dict[str, torch.Tensor]:
    dictionary, valid = dictionaries[node.hook], contexts.valid

    def with_tangent(activation: torch.Tensor) -> torch.Tensor:
        codes = encode_features(dictionary, activation, [node.index])[..., 0]  # [n, pos]
        tangent = (codes * valid.to(codes))[..., None] * dictionary.feature_directions[node.index]
        return forward_ad.make_dual(activation, tangent.detach())  # removing it lowers x by this much

    with forward_ad.dual_level():
        run = run_with_edits(model, contexts.tokens, {node.hook: ActivationMap(with_tangent, positions=valid)},
                             record=hooks, stop_at_layer=stop)
        result = {}
        for hook in hooks:
            codes = forward_ad.unpack_dual(dictionaries[hook].encode(run.recorded[hook]))
            change = codes.tangent if codes.tangent is not None else torch.zeros_like(codes.primal)
            result[hook] = (change.cpu() * valid[..., None]).sum(dim=1).mean(dim=0)
    return result


def run_downstream_trace(model, dictionaries: dict[str, Dictionary], source: FeatureTarget, contexts: TraceContexts,
                         *, method: str = "ablation", depth: int | None = 2, top_k_per_layer: int = 10,
                         scan: FeatureScan | None = None, progress: bool = True) -> TraceResult:
    """What `source` causes: its effect on every feature of the later dictionary layers; the strongest
    per layer are kept, with edges between neighbouring layers (each kept node removed in turn).

    The graph's `target` attribute names the source (the schema needs one) and `direction` is
    "downstream"; edges still point cause -> effect. Nodes carry `effect_of_source`.
    """
    check_inputs(model, dictionaries, source, method)
    started = time.perf_counter()
    hooks = downstream_hooks(dictionaries, source, depth)
    clean = clean_run(model, dictionaries, source, contexts, hooks)
    contexts = clean.contexts
    graph = nx.DiGraph()
    graph.graph.update({"method": method, "model": model_name_of(model), "direction": "downstream",
                        "hooks": list(hooks), "top_k_per_layer": top_k_per_layer, "n_contexts": len(contexts),
                        "measure": "mean over contexts of the activation summed over positions 1.."})
    circuit_graph.add_feature_node(graph, source.hook, layer_of_hook(source.hook), source.index,
                                   activation=float(clean.target.mean()), is_target=True)
    total = downstream_effects(model, dictionaries, Node(source.hook, source.index), contexts, hooks, method=method)
    scores = {hook: LayerScores(hook, method, total[hook].float(), total[hook] != 0, 0.0) for hook in hooks}
    previous = [Node(source.hook, source.index)]
    for number, hook in enumerate(progress_bar(hooks, desc="trace downstream", unit="hook", enabled=progress)):
        kept = [Node(hook, index) for index in top_features(scores[hook], top_k_per_layer)]
        for node in kept:
            circuit_graph.add_feature_node(graph, hook, layer_of_hook(hook), node.index,
                                           activation=float(clean.node_values[hook][node.index]),
                                           effect_of_source=float(total[hook][node.index]))
        for upstream in previous:
            effects = total if number == 0 else downstream_effects(model, dictionaries, upstream, contexts, [hook],
                                                                   method=method)
            for node in kept:
                effect = float(effects[hook][node.index])
                if effect != 0:
                    circuit_graph.add_edge(graph, circuit_graph.feature_node_id(upstream.hook, upstream.index),
                                           circuit_graph.feature_node_id(hook, node.index), effect, method)
        previous = kept
    annotate_feature_nodes(graph, model, dictionaries, scan)
    graph.nodes[graph.graph["target"]]["contexts"] = list(contexts.entries)
    timings = {"total": time.perf_counter() - started}
    graph.graph["timings_s"] = {name: round(seconds, 4) for name, seconds in timings.items()}
    return TraceResult(graph, scores, contexts, timings)


def trace_downstream(model, dictionaries: dict[str, Dictionary], source: FeatureTarget, contexts: TraceContexts,
                     **options) -> nx.DiGraph:
    """The features `source` drives in later layers, as a graph (see `run_downstream_trace`)."""
    return run_downstream_trace(model, dictionaries, source, contexts, **options).graph
