"""Upstream tracing: which features of earlier dictionary layers make the target fire, as a graph.

Every feature of the nearest dictionary before the target gets an effect on it; the strongest are
kept, and the search recurses layer by layer (to `depth` dictionary layers), with edges between the
kept features of neighbouring dictionary layers (Cunningham et al., 2024, Section 5.3).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
import torch

from circuits import graph as circuit_graph
from circuits.engine import MASSIVE_FACTOR
from circuits.features import FeatureScan, annotate_feature_nodes
from circuits.hooks import check_width, hook_order, layer_of_hook, validate_hooks
from circuits.models import model_name_of
from circuits.tracing.contexts import TraceContexts
from circuits.tracing.scoring import AblationScorer, BucketedScorer, CleanRun, LayerScores, Node, clean_run
from circuits.tracing.targets import FeatureTarget, LogitTarget, Target
from sae.dictionary import Dictionary
from sae.progress import status

METHODS = ("attribution", "ablation")


@dataclass
class TraceResult:
    """A trace: the graph, every feature's effect on the target per layer, and phase timings."""

    graph: nx.DiGraph
    scores: dict[str, LayerScores]  # hook -> effects of all its features on the target (or the source)
    contexts: TraceContexts
    timings: dict[str, float]


def top_features(scores: LayerScores, k: int) -> list[int]:
    """The k evaluated features with the largest |effect| (ties: lower index), skipping zero effects."""
    magnitude = scores.effects.abs() * scores.evaluated
    order = torch.argsort(-magnitude, stable=True)[:k]
    return [int(index) for index in order if magnitude[index] > 0]


def check_inputs(model, dictionaries: dict[str, Dictionary], target: Target, method: str) -> None:
    """Fail before any compute on an unknown method, hook, width, target hook or feature index."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if not dictionaries:
        raise ValueError("no dictionaries given; load them with sae.io.load_dictionaries(folder)")
    validate_hooks(model, list(dictionaries))
    for hook, dictionary in dictionaries.items():
        check_width(model, hook, dictionary.d_in)
    if isinstance(target, FeatureTarget):
        if target.hook not in dictionaries:
            raise ValueError(f"target hook {target.hook!r} has no dictionary; have: {', '.join(dictionaries)}")
        n_features = dictionaries[target.hook].n_features
        if not 0 <= target.index < n_features:
            raise ValueError(f"target feature {target.index} is out of range for {target.hook} (0..{n_features - 1})")


def upstream_hooks(dictionaries: dict[str, Dictionary], target: Target, depth: int | None) -> list[str]:
    """Dictionary hooks before the target, nearest first, at most `depth` of them."""
    if isinstance(target, LogitTarget):
        below = list(dictionaries)
    else:
        below = [hook for hook in dictionaries if hook_order(hook) < hook_order(target.hook)]
    below.sort(key=hook_order, reverse=True)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        below = below[:depth]
    if not below:
        raise ValueError(f"no dictionary sits before the target {getattr(target, 'hook', target)}; give dictionaries "
                         f"at earlier layers (have: {', '.join(sorted(dictionaries, key=hook_order))})")
    return below


def run_upstream_trace(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts, *,
                       method: str = "attribution", depth: int | None = 2, top_k_per_layer: int = 10,
                       include_error: bool = True, direct_effects: bool = False, ig_steps: int = 1,
                       max_candidates: int | None = None, batch_size: int = 32, scan: FeatureScan | None = None,
                       progress: bool = True) -> TraceResult:
    """Trace the target's upstream features (see circuits.tracing); the full result.

    depth: dictionary layers to go back (None: all); top_k_per_layer: features kept per layer (by
    |effect on the target|); include_error: add each layer's error node; direct_effects: attribution
    only, detach attention patterns and norm scales; ig_steps: attribution only, integrated gradients
    over this many points of the ablation path (1: plain attribution; circuits.tracing.scoring); max_candidates: ablation only, try at most this
    many features per layer (those with the most activation); batch_size: ablation rows per forward;
    scan: a FeatureScan to describe the nodes with (top tokens, contexts). Positions the engine passes
    through at any traced hook (BOS, massive activations) are never edited nor measured.
    """
    check_inputs(model, dictionaries, target, method)
    if top_k_per_layer < 1:
        raise ValueError(f"top_k_per_layer must be at least 1, got {top_k_per_layer}")
    if direct_effects and method == "ablation":
        raise ValueError("direct_effects applies to the attribution method only; drop it or use method='attribution'")
    if ig_steps != 1 and method == "ablation":
        raise ValueError(f"ig_steps={ig_steps} applies to the attribution method only; ablation is exact already")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    hooks = upstream_hooks(dictionaries, target, depth)
    if method == "ablation":
        clean = clean_run(model, dictionaries, target, contexts, hooks)
        timings["clean run"] = time.perf_counter() - started
        scorer = AblationScorer(model, dictionaries, target, clean, batch_size=batch_size,
                                max_candidates=max_candidates, progress=progress)
    else:
        scorer = BucketedScorer(model, dictionaries, target, contexts, hooks, direct_effects=direct_effects,
                                ig_steps=ig_steps)
        clean = scorer.clean
        timings["forward with leaves"] = time.perf_counter() - started
    contexts = clean.contexts
    graph = _new_graph(model, target, clean, method=method, hooks=hooks, top_k=top_k_per_layer,
                       direct_effects=direct_effects)
    graph.graph["ig_steps"] = ig_steps
    above: list[Node] = []
    scores: dict[str, LayerScores] = {}
    for hook in hooks:
        phase = time.perf_counter()
        target_scores, node_scores = scorer.layer(hook, above)
        timings[f"scores at {hook}"] = time.perf_counter() - phase
        status(f"trace: {method} scores at {hook} done in {timings[f'scores at {hook}']:.1f} s", progress)
        scores[hook] = target_scores
        kept = [Node(hook, index) for index in top_features(target_scores, top_k_per_layer)]
        _add_layer(graph, hook, LayerResult(kept, target_scores, node_scores), above=above, clean=clean, method=method,
                   include_error=include_error)
        above = kept
    if getattr(scorer, "detached", None):
        graph.graph["detached_hooks"] = list(scorer.detached)
    phase = time.perf_counter()
    annotate_feature_nodes(graph, model, dictionaries, scan)
    graph.nodes[graph.graph["target"]]["contexts"] = list(contexts.entries)
    timings["node annotation"] = time.perf_counter() - phase
    timings["total"] = time.perf_counter() - started
    graph.graph["timings_s"] = {name: round(seconds, 4) for name, seconds in timings.items()}
    return TraceResult(graph, scores, contexts, timings)


def trace_upstream(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                   **options) -> nx.DiGraph:
    """The target's upstream circuit as a graph in the circuits.graph schema (options: see
    `run_upstream_trace`)."""
    return run_upstream_trace(model, dictionaries, target, contexts, **options).graph


def _new_graph(model, target: Target, clean: CleanRun, *, method: str, hooks: list[str], top_k: int,
               direct_effects: bool) -> nx.DiGraph:
    contexts = clean.contexts
    graph = nx.DiGraph()
    graph.graph.update({"method": method, "model": model_name_of(model), "direction": "upstream",
                        "hooks": list(hooks), "top_k_per_layer": top_k, "n_contexts": len(contexts),
                        "direct_effects": direct_effects,
                        "measure": "mean over contexts of the activation summed over measured positions"})
    value = float(clean.target.mean())
    if isinstance(target, LogitTarget):
        graph.graph["target_spec"] = {"kind": "logit", "token": target.token, "other": target.other,
                                      "label": target.node_id}
        circuit_graph.add_output_node(graph, model.cfg.n_layers, node_id=target.node_id, label=target.node_id,
                                      activation=value)
    else:
        circuit_graph.add_feature_node(graph, target.hook, layer_of_hook(target.hook), target.index,
                                       activation=value, is_target=True)
    # The pass-through rule's factor (circuits.engine.passthrough_positions) and how many positions it protected.
    graph.graph["outlier_factor"] = float(MASSIVE_FACTOR)
    graph.graph["protected_positions"] = int(contexts.protected.sum()) if contexts.protected is not None else 0
    return graph


class LayerResult(NamedTuple):
    """One traced layer: the features kept, every feature's effect on the target and on the nodes above."""

    kept: list[Node]
    target_scores: LayerScores
    node_scores: dict[Node, LayerScores]


def _add_layer(graph: nx.DiGraph, hook: str, layer_result: LayerResult, *, above: list[Node], clean: CleanRun,
               method: str, include_error: bool) -> None:
    """Add the kept features (and error) of one layer, with edges to the nodes kept one layer up
    (the target itself for the first layer)."""
    kept, target_scores, node_scores = layer_result
    layer = layer_of_hook(hook)
    values = clean.node_values[hook]
    sources = {}
    for node in kept:
        sources[node.index] = circuit_graph.add_feature_node(
            graph, hook, layer, node.index, activation=float(values[node.index]),
            effect_on_target=float(target_scores.effects[node.index]))
    if include_error:
        sources[-1] = circuit_graph.add_error_node(graph, hook, layer, effect_on_target=target_scores.error_effect)
    if not above:
        receivers = {graph.graph["target"]: target_scores}
    else:
        receivers = {circuit_graph.feature_node_id(node.hook, node.index): node_scores[node] for node in above}
    for receiver, scores in receivers.items():
        for index, source in sources.items():
            effect = scores.error_effect if index < 0 else float(scores.effects[index])
            if effect != 0 and math.isfinite(effect):
                circuit_graph.add_edge(graph, source, receiver, effect, method)
