"""The paper's IOI search: ACDC-style greedy removal over a sweep of thresholds (Cunningham et al. 2024, Sec. 4).

The procedure, as the paper's code runs it (HoagyC/sparse_coding, ioi_feature_ident.py), one set for all prompts:

    S = the start set, every member patched from the counterfactual run; kl = KL(S)
    for t in the thresholds, ascending (the paper: 50 log-spaced from 1e-5 to 1):
        for each member i of S, in the visiting order:
            if KL(S without i) - kl < t:   S = S without i;  kl = KL(S without i)
        record (|S|, kl) for t                  # the state carries into the next threshold

KL is the mean over prompts of KL(patched || counterfactual) at the final position: the paper computes
F.kl_div(log_softmax(counterfactual), log_softmax(patched), log_target=True), the same direction as ours.
A removal is judged by how much it RAISES the current KL (ACDC's rule), not by an absolute KL.

- Start set: every candidate feature (its code differs between the runs at a patched position). A feature
  that is not a candidate changes nothing when patched: its removal raises KL by 0 (< t), so leaving it out
  of the start set only skips trials whose outcome is known. `greedy_start=k` starts from the top k
  candidates by attribution instead (the paper's code has the same `start_feats` argument); cheaper, but a
  feature left out can never help.
- Error node (`error_node`): the SAE's error term is patched too, as one more member that can be removed
  (counted as one node); a complete basis (PCA, neurons) has no error term and no such node.
- Visiting order: "attribution" (default) visits the least helpful candidates first by the attribution
  scores the attribution search ranks with (tasks/ioi/search.py, `order_scores`), the same order in every
  pass: the features that matter least leave first, so the ones that matter are judged in the context of
  the set that remains, and the run is deterministic. "random" is the paper's order (a fresh shuffle per
  threshold, seeded).
- Speculation: the trials are evaluated up to `speculation` at a time in one batch: each trial's set
  assumes the predicted outcome (accept when the feature's last measured KL rise, or its attribution, is
  under t) of the trials before it in the block; outcomes are taken in order up to and including the first
  misprediction, the rest are discarded. The sets accepted are those of the one-at-a-time procedure, and
  `max_evals` counts its trials, so a budget stops both at the same place; wasted evaluations are reported.
- Points: every state the search holds is an exactly evaluated set: "all_features" (the floor), "greedy_step"
  (after each accepted removal) and "greedy" (the state at the end of each threshold, the paper's points).
"""

from __future__ import annotations

import math
import random
import time

import torch

from circuits.engine import FeaturePatcher
from sae.progress import status
from tasks.ioi.search import (PAPER_THRESHOLDS, BudgetExhausted, DictionaryCurve, SearchSettings, has_error_term,
                              order_scores)



def paper_thresholds() -> tuple[float, ...]:
    """The paper's sweep: 50 thresholds log-spaced from 1e-5 to 1."""
    low, high, count = PAPER_THRESHOLDS
    return tuple(10 ** (math.log10(low) + (math.log10(high) - math.log10(low)) * i / (count - 1))
                 for i in range(count))


class SetEvaluator:
    """Exact evaluations of member sets ([features..., and ERROR = n_features for the error node])."""

    def __init__(self, patcher: FeaturePatcher, metrics: dict, settings: SearchSettings):
        self.patcher, self.metrics, self.settings = patcher, metrics, settings
        self.error = patcher.n_features  # the error node's index
        self.evaluations = 0

    def __call__(self, sets: list[list[int]]) -> list[dict]:
        """{kl, logit_diff, edit_norm, kl_per_prompt} per set, the sets with and without the error node
        evaluated in (at most) two batches."""
        results: list[dict | None] = [None] * len(sets)
        for with_error in (False, True):
            chosen = [index for index, members in enumerate(sets) if (self.error in members) == with_error]
            if not chosen:
                continue
            features = [[m for m in sets[index] if m != self.error] for index in chosen]
            result = self.patcher.evaluate(features, self.metrics, include_error=with_error,
                                           max_batch_tokens=self.settings.max_batch_tokens)
            for row, index in enumerate(chosen):
                results[index] = {"kl": result.values["kl"][row].item(),
                                  "logit_diff": result.values["logit_diff"][row].item(),
                                  "edit_norm": result.edit_norm[row].item(),
                                  "kl_per_prompt": result.per_prompt["kl"][row]}
        self.evaluations += len(sets)
        return results


class GreedySearch:
    """The state of one dictionary's greedy search: the members still patched, their KL, the points."""

    def __init__(self, evaluate: SetEvaluator, curve: DictionaryCurve, settings: SearchSettings,
                 estimates: dict[int, float]):
        self.evaluate, self.curve, self.settings = evaluate, curve, settings
        self.last_rise = dict(estimates)  # member -> last measured KL rise on removal (attribution at first)
        self.members: list[int] = []
        self.kl = math.nan
        self.trials = 0  # trials of the one-at-a-time procedure (what max_evals counts)
        self.wasted = 0  # speculative evaluations discarded after a misprediction
        self.rng = random.Random(settings.seed)

    def point(self, method: str, result: dict, threshold: float) -> dict:
        members = torch.tensor(self.members, dtype=torch.int32)
        point = {"dictionary": self.curve.name, "method": method, "n_features": len(self.members),
                 "edit_norm": result["edit_norm"], "kl": result["kl"], "logit_diff": result["logit_diff"],
                 "threshold": threshold, "members": members, "kl_per_prompt": result["kl_per_prompt"]}
        self.curve.points.append(point)
        return point

    def start(self, members: list[int], method: str) -> dict:
        self.members = list(members)
        result = self.evaluate([self.members])[0]
        self.kl = result["kl"]
        return self.point(method, result, math.nan)

    def visiting_order(self, order: list[int]) -> list[int]:
        present = set(self.members)
        visit = [member for member in order if member in present]
        if self.settings.greedy_order == "random":
            self.rng.shuffle(visit)
        return visit

    def run_pass(self, order: list[int], threshold: float) -> None:
        """One threshold: every member visited once; BudgetExhausted when `max_evals` trials are spent."""
        queue, position, block = self.visiting_order(order), 0, 1
        budget = self.settings.max_evals
        while position < len(queue):
            if budget is not None and self.trials >= budget:
                raise BudgetExhausted
            size = min(block, len(queue) - position, (budget - self.trials) if budget is not None else len(queue))
            trial = queue[position : position + size]
            predicted = [self.last_rise.get(member, 0.0) < threshold for member in trial]
            assumed, sets = set(self.members), []
            for member, accept in zip(trial, predicted):
                sets.append([m for m in self.members if m in assumed and m != member])
                if accept:
                    assumed.discard(member)
            results = self.evaluate(sets)
            used = self.take(trial, predicted, results, threshold)
            self.wasted += len(trial) - used
            position += used
            block = min(block * 2, max(1, self.settings.speculation)) if used == len(trial) else max(1, used)

    def take(self, trial: list[int], predicted: list[bool], results: list[dict], threshold: float) -> int:
        """Apply outcomes in order up to the first misprediction; returns how many were taken."""
        for used, (member, accept_predicted, result) in enumerate(zip(trial, predicted, results), start=1):
            self.trials += 1
            rise = result["kl"] - self.kl
            self.last_rise[member] = rise
            accept = rise < threshold
            if accept:
                self.members.remove(member)
                self.kl = result["kl"]
                self.point("greedy_step", result, threshold)
            if accept != accept_predicted:
                return used
        return len(trial)


def greedy_search(name: str, patcher: FeaturePatcher, metrics: dict, settings: SearchSettings, *,
                  progress: bool = False, label: str | None = None) -> DictionaryCurve:
    """The paper's greedy search for one dictionary (module docstring); points as the attribution search's.

    metrics: {"kl": KLTo(counterfactual logits), "logit_diff": LogitDifference(IO, S)} (circuits.metrics).
    """
    label = label or name
    curve = DictionaryCurve(name, n_features=patcher.n_features, search="greedy")
    thresholds = sorted(settings.thresholds or paper_thresholds())
    started = time.perf_counter()
    evaluate = SetEvaluator(patcher, metrics, settings)
    candidates = patcher.candidates().nonzero().squeeze(1).tolist()
    error_node = settings.error_node and has_error_term(patcher)
    scores = _attribution_scores(patcher, metrics, settings, curve)
    by_help = sorted(candidates, key=lambda feature: (scores[feature], feature)) if scores is not None else candidates
    # visiting order: least helpful first (highest score = patching it raises KL the most, or lowers it least)
    order = list(reversed(by_help)) if settings.greedy_order == "attribution" else list(candidates)
    start = by_help[: settings.greedy_start] if settings.greedy_start is not None else list(candidates)
    if error_node:
        order, start = [evaluate.error, *order], [*start, evaluate.error]  # the error node: visited first
    curve.n_candidates = len(candidates)
    estimates = {feature: -float(scores[feature]) for feature in candidates} if scores is not None else {}
    search = GreedySearch(evaluate, curve, settings, estimates)
    curve.timings["attribution"] = time.perf_counter() - started
    started = time.perf_counter()
    everything = [*candidates, *([evaluate.error] if error_node else [])]
    search.start(everything, "all_features")
    if sorted(start) != sorted(everything):
        search.start(start, "greedy_start")
    status(f"{label}: greedy removal from {len(search.members)} members over {len(thresholds)} thresholds "
           f"({thresholds[0]:.3g} .. {thresholds[-1]:.3g})", progress)
    passes = []
    try:
        for threshold in thresholds:
            if not search.members:
                break
            search.run_pass(order, threshold)
            passes.append(_threshold_point(search, threshold))
            status(f"{label}: threshold {threshold:.3g}: {len(search.members)} left, KL {search.kl:.4g} "
                   f"({search.trials} trials, {evaluate.evaluations} evaluations)", progress and len(passes) % 5 == 0)
    except BudgetExhausted:
        passes.append(_threshold_point(search, threshold, partial=True))
        curve.stopped = (f"budget: stopped after {search.trials} removal trials (--max-evals {settings.max_evals}) "
                         f"during threshold {threshold:.3g}, with {len(search.members)} members left at KL "
                         f"{search.kl:.4g}; the curve holds the states reached until then")
        status(f"{label}: {curve.stopped}", progress)
    curve.timings["greedy"] = time.perf_counter() - started
    curve.evaluations = evaluate.evaluations
    curve.order = order[:20]
    curve.details.update({"thresholds": thresholds, "visiting_order": settings.greedy_order,
                          "start_size": len(start), "error_node": error_node, "trials": search.trials,
                          "wasted_speculative_evaluations": search.wasted, "passes": passes,
                          "final_members": list(search.members)})
    status(f"{label}: greedy done in {curve.timings['greedy']:.1f} s: {len(search.members)} members left at KL "
           f"{search.kl:.4g}; {search.trials} trials, {evaluate.evaluations} exact evaluations "
           f"({search.wasted} speculative ones discarded)", progress)
    return curve


def _threshold_point(search: GreedySearch, threshold: float, partial: bool = False) -> dict:
    """The paper's point for a threshold: the state after its pass (a copy of the last evaluated state)."""
    last = next((p for p in reversed(search.curve.points) if p["n_features"] == len(search.members)), None)
    if last is not None:
        search.curve.points.append({**last, "method": "greedy", "threshold": threshold})
    return {"threshold": threshold, "n_members": len(search.members), "kl": search.kl, "trials": search.trials,
            "partial": partial}


def _attribution_scores(patcher: FeaturePatcher, metrics: dict, settings: SearchSettings,
                        curve: DictionaryCurve) -> torch.Tensor | None:
    """The attribution search's order scores [F] (lower = patching it lowers KL more), when the order or the
    start set needs them."""
    if settings.greedy_order != "attribution" and settings.greedy_start is None:
        return None
    attributions = patcher.attribution(metrics)
    curve.attribution_kl = attributions["kl"].features
    curve.attribution_logit_diff = attributions["logit_diff"].features
    curve.error_attribution_kl = attributions["kl"].error
    return order_scores(patcher, metrics, attributions["kl"].features, settings.order_points)
