"""Autointerp of a set of features with one client: explain each, then score each explanation by simulation
(correlation with the true activations) and detection (delphi), with a shuffled-explanation control.

The control simulates each feature's scored excerpts from another feature's explanation (a seeded derangement
within the same basis): what the simulator scores when the explanation carries no information about the feature
(position, token frequency and the prompt's own biases). A score is only evidence of an explanation when it
beats its control.

A malformed response is recorded in the feature's row (`failures`) and the run goes on; an endpoint that cannot
be reached (EndpointError) stops the run, before any output is written.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from sae.progress import progress_bar
from tasks.autointerp.client import MalformedResponse
from tasks.autointerp.detection import detection_score
from tasks.autointerp.examples import FeatureExcerpts
from tasks.autointerp.excerpts import Excerpt
from tasks.autointerp.explain import explain
from tasks.autointerp.scoring import accuracy, auc, simulation_score
from tasks.autointerp.simulate import resolve_method, simulate


@dataclass
class FeatureResult:
    feature: int
    explanation: str | None
    simulation: float = math.nan  # correlation over held-out top + random excerpts
    simulation_top: float = math.nan  # over the held-out top excerpts only
    control: float = math.nan  # the same excerpts simulated from another feature's explanation
    detection_accuracy: float = math.nan  # balanced accuracy at P(yes) >= 0.5
    detection_auc: float = math.nan
    n_scored_excerpts: int = 0
    failures: list[str] = field(default_factory=list)
    response: str = ""  # the explainer's raw reply
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        values = asdict(self)
        values["failures"], values["notes"] = "; ".join(self.failures), "; ".join(self.notes)
        return values


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (identity for n < 2)."""
    if n < 2:
        return list(range(n))
    generator = random.Random(seed)
    while True:
        order = list(range(n))
        generator.shuffle(order)
        if all(index != value for index, value in enumerate(order)):
            return order


def simulate_excerpts(client, explanation: str, excerpts: list[Excerpt], method: str, failures: list[str],
                      what: str) -> dict[int, list[float]]:
    """{excerpt number: simulated activations} for the excerpts that simulate; malformed ones are recorded."""
    simulated = {}
    for number, excerpt in enumerate(excerpts):
        try:
            simulated[number] = simulate(client, explanation, excerpt, method)
        except MalformedResponse as error:
            failures.append(f"{what} excerpt {number}: {error}")
    return simulated


def correlation(excerpts: list[Excerpt], simulated: dict[int, list[float]], numbers) -> float:
    """Simulation score over the excerpts `numbers` that were simulated (NaN when none was)."""
    kept = [number for number in numbers if number in simulated]
    if not kept:
        return math.nan
    return simulation_score([list(excerpts[number].activations) for number in kept], [simulated[n] for n in kept])


def detection_scores(client, explanation: str, excerpts: list[Excerpt], method: str, failures: list[str],
                     what: str) -> list[float]:
    scores = []
    for number, excerpt in enumerate(excerpts):
        try:
            scores.append(detection_score(client, explanation, excerpt, method))
        except MalformedResponse as error:
            failures.append(f"detection {what} excerpt {number}: {error}")
    return scores


def interpret_features(client, features: list[FeatureExcerpts], *, method: str = "auto", seed: int = 0,
                       control: bool = True, progress: bool = True) -> list[FeatureResult]:
    """Explain every feature, then score every explanation (simulation, its control, detection)."""
    method = resolve_method(client, method)
    results = []
    for excerpts in progress_bar(features, desc="autointerp: explain", unit="feature", enabled=progress):
        result = FeatureResult(excerpts.feature, None, notes=list(excerpts.notes))
        try:
            result.explanation, result.response = explain(client, excerpts.explain_top, excerpts.explain_quantiles)
        except MalformedResponse as error:
            result.failures.append(f"explanation: {error}")
            result.response = getattr(error, "response", "")
        results.append(result)
    explained = [index for index, result in enumerate(results) if result.explanation]
    others = dict(zip(explained, [explained[index] for index in derangement(len(explained), seed)]))
    for index, (excerpts, result) in enumerate(progress_bar(list(zip(features, results)), desc="autointerp: score",
                                                            unit="feature", enabled=progress)):
        if not result.explanation:
            continue
        failures = result.failures
        scored = excerpts.scored
        simulated = simulate_excerpts(client, result.explanation, scored, method, failures, "simulation")
        result.n_scored_excerpts = len(simulated)
        result.simulation = correlation(scored, simulated, range(len(scored)))
        result.simulation_top = correlation(scored, simulated, range(len(excerpts.score_top)))
        if control and others.get(index, index) != index:
            shuffled = simulate_excerpts(client, results[others[index]].explanation, scored, method, failures,
                                         "control")
            result.control = correlation(scored, shuffled, range(len(scored)))
        active = detection_scores(client, result.explanation, excerpts.detect_active, method, failures, "active")
        inactive = detection_scores(client, result.explanation, excerpts.detect_inactive, method, failures, "inactive")
        result.detection_accuracy, result.detection_auc = accuracy(active, inactive), auc(active, inactive)
    return results
