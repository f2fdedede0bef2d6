"""Checking a trace: removing the features it found, against random ones, and the two methods' agreement."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from circuits.engine import FeatureAblation, run_with_edits
from circuits.metrics import spearman
from circuits.tracing.contexts import TraceContexts
from circuits.tracing.scoring import LayerScores, clean_run
from circuits.tracing.targets import Target, target_from_graph, target_hooks, target_stop_layer, target_values
from circuits.tracing.upstream import TraceResult, check_inputs, run_upstream_trace, top_features
from sae.dictionary import Dictionary


class AblationEffect(NamedTuple):
    """The target's value clean and with a set of features removed together."""

    clean: float
    ablated: float

    @property
    def drop(self) -> float:
        return self.clean - self.ablated

    @property
    def fraction(self) -> float:
        """The share of the target's value removed (0 when the clean value is 0)."""
        return self.drop / self.clean if self.clean else 0.0


@torch.no_grad()
def ablate_features_effect(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts,
                           features: list[tuple[str, int]], *, errors: Iterable[str] = ()) -> AblationEffect:
    """Remove all `features` [(hook, index)] (and the errors at the hooks in `errors`) together at the
    contexts' editable positions and measure the target (mean over contexts of its value at the
    measured positions). Contexts from a TraceResult already have their pass-through positions
    protected; others get those of the clean run at the edited hooks protected here."""
    check_inputs(model, dictionaries, target, "ablation")
    errors = list(errors)
    for hook in [hook for hook, _ in features] + errors:
        if hook not in dictionaries:
            raise ValueError(f"no dictionary at {hook!r} to ablate a feature in; have: {', '.join(dictionaries)}")
    if contexts.protected is None:
        contexts = clean_run(model, dictionaries, target, contexts, [hook for hook, _ in features] + errors).contexts
    rows = len(contexts)
    positions = torch.cat([contexts.valid, contexts.valid])
    edits: dict[str, FeatureAblation] = {}
    for hook, index in list(features) + [(hook, -1) for hook in errors]:
        if hook not in edits:
            edits[hook] = FeatureAblation.nothing(dictionaries[hook], positions)
        if index < 0:
            edits[hook].error[rows:] = True
        else:
            edits[hook].features[rows:, index] = 1.0
    tokens = torch.cat([contexts.tokens, contexts.tokens])  # clean rows, then ablated rows: one batch
    run = run_with_edits(model, tokens, edits, record=target_hooks(target),
                         stop_at_layer=target_stop_layer(model, target))
    values = target_values(target, dictionaries, run.output, run.recorded, torch.cat([contexts.measure,
                                                                                      contexts.measure]))
    return AblationEffect(float(values[:rows].mean()), float(values[rows:].mean()))


class TopVersusRandom(NamedTuple):
    hook: str
    k: int
    top: AblationEffect  # the k features with the largest positive effect, removed together
    random: list[AblationEffect]  # k random active features, removed together, per draw

    @property
    def random_fraction(self) -> float:
        return sum(effect.fraction for effect in self.random) / len(self.random) if self.random else 0.0


def top_versus_random(model, dictionaries: dict[str, Dictionary], result: TraceResult, *, k: int = 10,
                      n_random: int = 5, seed: int = 0) -> list[TopVersusRandom]:
    """Per traced layer: the target's drop when its k most helpful features are removed together,
    against k features drawn at random from those active on the traced contexts."""
    target = target_from_graph(result.graph)
    generator = torch.Generator().manual_seed(seed)
    report = []
    for hook, scores in result.scores.items():
        helpful = torch.argsort(-scores.effects * scores.evaluated, stable=True)[:k].tolist()
        helpful = [index for index in helpful if scores.effects[index] > 0]
        top = ablate_features_effect(model, dictionaries, target, result.contexts, [(hook, i) for i in helpful])
        active = torch.nonzero(scores.evaluated).flatten()
        draws = []
        for _ in range(n_random):
            chosen = active[torch.randperm(len(active), generator=generator)[: len(helpful)]].tolist()
            draws.append(ablate_features_effect(model, dictionaries, target, result.contexts,
                                                [(hook, i) for i in chosen]))
        report.append(TopVersusRandom(hook, len(helpful), top, draws))
    return report


class LayerAgreement(NamedTuple):
    hook: str
    n: int  # features compared
    spearman: float
    top_overlap: float  # share of ablation's top n found in attribution's top n


def method_agreement(attribution: dict[str, LayerScores], ablation: dict[str, LayerScores],
                     top_n: int = 30) -> list[LayerAgreement]:
    """Per layer: Spearman correlation of attribution with ablation on ablation's top_n features
    (by |effect|), and the overlap of the two top_n sets."""
    report = []
    for hook, exact in ablation.items():
        if hook not in attribution:
            continue
        estimate = attribution[hook]
        top = top_features(exact, top_n)
        rho = spearman(exact.effects[top], estimate.effects[top]) if len(top) >= 3 else float("nan")
        estimated_top = set(top_features(estimate, top_n))
        overlap = len(estimated_top & set(top)) / len(top) if top else float("nan")
        report.append(LayerAgreement(hook, len(top), rho, overlap))
    return report


def ablation_agreement(model, dictionaries: dict[str, Dictionary], target: Target, contexts: TraceContexts, *,
                       depth: int | None = 2, top_n: int = 30, top_k_per_layer: int = 10,
                       **options) -> tuple[list[LayerAgreement], dict[str, float]]:
    """Trace the same target on the same contexts both ways; returns the per-layer agreement (see
    `method_agreement`) and each trace's seconds. Options go to `run_upstream_trace`."""
    settings = {"depth": depth, "top_k_per_layer": top_k_per_layer, **options}
    attribution = run_upstream_trace(model, dictionaries, target, contexts, method="attribution", **settings)
    ablation = run_upstream_trace(model, dictionaries, target, contexts, method="ablation", **settings)
    seconds = {"attribution": attribution.timings["total"], "ablation": ablation.timings["total"]}
    return method_agreement(attribution.scores, ablation.scores, top_n), seconds
