"""The per-dictionary search of the IOI benchmark: which feature sets reach the KL target, and how few.

Every exact evaluation runs the model from the hook on (circuits.engine.FeaturePatcher), in batches of sets.

1. attribution: one forward + backward on the clean run gives each feature's estimated KL change
   when patched alone; averaged with the gradient halfway along the edit (integrated gradients with
   points 0 and 0.5, one more backward) it orders the candidates (features whose code differs).
2. threshold sweep: for a sweep of thresholds on the attribution score, the set of features above
   the threshold (a prefix of the order; sizes 1, 2, 4, 8, ... up to all) is patched exactly; sizes
   past the point where KL is far under the target are skipped (all candidates are always evaluated).
3. the KL target: the smallest prefix reaching it is found by bisection, then pruned greedily as
   ACDC does: members are tried least important first (in chunks when there are more members than
   `prune_evals`) and removed when the KL stays at or under the target without them.
4. confirmation: the top features by |attribution| are patched one at a time, exactly, and the
   Spearman rank correlation between predicted and measured effects is reported.

With `feature_sets="per_prompt"` each prompt gets its own set (its own top k features by its own
attribution; n_features is then k, the count per prompt); ACDC pruning is skipped there.

`max_evals` caps the exact evaluations of phases 2-3 (confirmation is a check, not counted): a search
that runs out stops with the sets found so far and says so (`DictionaryCurve.stopped`). `error_node`
patches the error term in every set like `patch_error` but counts it as one more node (n_features + 1
for a dictionary with an error term). The paper's own search (ACDC-style greedy removal over a
threshold sweep) is tasks/ioi/greedy.py (`search="greedy"`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from circuits.engine import FeaturePatcher, check_attribution
from sae.progress import status

DEFAULT_KL_TARGET_FRACTION = 0.25  # of the unpatched KL(clean || counterfactual)
FEATURE_SETS = ("shared", "per_prompt")
SEARCHES = ("attribution", "greedy")
GREEDY_ORDERS = ("attribution", "random")
PAPER_THRESHOLDS = (1e-5, 1.0, 50)  # the paper's sweep: 50 thresholds log-spaced from 1e-5 to 1


@dataclass
class SearchSettings:
    """Knobs of the per-dictionary search (see the module docstring)."""

    kl_target: float | None = None  # absolute; None: kl_target_fraction x the unpatched KL
    kl_target_fraction: float = DEFAULT_KL_TARGET_FRACTION
    bisect_evals: int = 4
    prune_evals: int = 8
    sweep_stop: float = 0.1  # the sweep skips larger prefixes once KL <= sweep_stop x target
    order_points: tuple[float, ...] = (0.0, 0.5)  # gradients averaged to order candidates (0: the clean run)
    patch_error: bool = False  # also patch the error term in every set (then only the features are counted)
    feature_sets: str = "shared"  # "shared": one set for all prompts; "per_prompt": each prompt its own top k
    confirm_top: int = 50
    max_batch_tokens: int = 16384
    search: str = "attribution"  # or "greedy": the paper's ACDC-style removal (tasks/ioi/greedy.py)
    max_evals: int | None = None  # exact evaluations the search may spend (None: no cap)
    error_node: bool = False  # the error term is one more node (greedy: removable; attribution: patched, counted)
    thresholds: tuple[float, ...] | None = None  # greedy: the sweep; None: PAPER_THRESHOLDS
    greedy_order: str = "attribution"  # greedy visiting order: least helpful first by attribution, or "random"
    greedy_start: int | None = None  # greedy: start from the top k candidates by attribution (None: all)
    speculation: int = 8  # greedy: most removals evaluated together in one batch (1: strictly one at a time)
    bootstrap: int = 1000  # resamples of the prompts for the report's confidence intervals (0: none)
    seed: int = 0  # the random visiting order and the bootstrap


@dataclass
class DictionaryCurve:
    """Everything measured for one dictionary."""

    name: str
    points: list[dict] = field(default_factory=list)
    order: list | None = None  # candidates, most helpful first (shared sets)
    n_candidates: int = 0
    attribution_kl: torch.Tensor | None = None  # [n_features]
    attribution_logit_diff: torch.Tensor | None = None
    error_attribution_kl: float = float("nan")
    confirmation: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    n_features: int = 0
    search: str = "attribution"
    stopped: str = ""  # why the search ended before its end (the evaluation budget), "" when it did not
    details: dict = field(default_factory=dict)  # search-specific settings and counts (details.json)


class BudgetExhausted(Exception):
    """The search spent its `max_evals` exact evaluations."""


class PhaseTimes:
    """Wall time per named phase, summed over repeats: `with phases("sweep"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __call__(self, name: str):
        return _PhaseTimer(self, name)


class _PhaseTimer:
    def __init__(self, phases: PhaseTimes, name: str):
        self.phases, self.name = phases, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.phases.add(self.name, time.perf_counter() - self.start)


def prefix_sizes(n: int) -> list[int]:
    """1, 2, 4, 8, ... (powers of two below n), and n itself."""
    sizes, size = [], 1
    while size < n:
        sizes.append(size)
        size *= 2
    return sizes + [n] if n > 0 else []


class CandidateOrder:
    """Candidate features, most helpful first: one order for all prompts, or one per prompt.

    scores [F] or [n_prompts, F] (lower = reduces KL more), candidates: bool of the same shape.
    `prefix(k)` is the set of the first k (per prompt: a [n_prompts, k] tensor, -1 past a prompt's candidates).
    """

    def __init__(self, scores: torch.Tensor, candidates: torch.Tensor):
        self.scores = scores
        if scores.ndim == 1:
            chosen = candidates.nonzero().squeeze(1)
            self.order = chosen[torch.argsort(scores[chosen], stable=True)]
            self.size = int(self.order.numel())
        else:
            self.order = torch.argsort(scores.masked_fill(~candidates, math.inf), dim=1, stable=True)
            self.counts = candidates.sum(1)
            self.size = int(self.counts.max()) if self.counts.numel() else 0

    @property
    def per_prompt(self) -> bool:
        return self.scores.ndim == 2

    def prefix(self, k: int):
        if not self.per_prompt:
            return self.order[:k].tolist()
        chosen = self.order[:, :k].clone()
        chosen[torch.arange(chosen.shape[1])[None, :] >= self.counts[:, None]] = -1
        return chosen

    def threshold(self, k: int) -> float:
        """The attribution score of the k-th candidate (the sweep's threshold); nan per prompt."""
        return float(self.scores[self.order[k - 1]]) if not self.per_prompt and k > 0 else float("nan")

    def top(self, k: int) -> list:
        return self.order[:k].tolist() if not self.per_prompt else []


def _members(features) -> list:
    if isinstance(features, torch.Tensor):
        return [[int(f) for f in row if f >= 0] for row in features.tolist()]
    return list(map(int, features))


class _Search:
    """Exact evaluations of feature sets for one dictionary, recorded as curve points."""

    def __init__(self, patcher: FeaturePatcher, metrics: dict, curve: DictionaryCurve, settings: SearchSettings):
        self.patcher, self.metrics, self.curve, self.settings = patcher, metrics, curve, settings

    def evaluate(self, sets: list, sizes: Sequence[int], method: str, thresholds: Sequence[float]) -> list[dict]:
        budget = self.settings.max_evals
        if budget is not None:
            if self.curve.evaluations >= budget:
                raise BudgetExhausted
            sets = sets[: budget - self.curve.evaluations]
        if not sets:
            return []
        patch_error = self.settings.patch_error or self.settings.error_node
        result = self.patcher.evaluate(sets, self.metrics, include_error=patch_error,
                                       max_batch_tokens=self.settings.max_batch_tokens)
        self.curve.evaluations += len(sets)
        counted = int(self.settings.error_node and self.curve.details.get("has_error_term", True))
        points = []
        for index, features in enumerate(sets):
            point = {"dictionary": self.curve.name, "method": method, "n_features": int(sizes[index]) + counted,
                     "edit_norm": result.edit_norm[index].item(), "kl": result.values["kl"][index].item(),
                     "logit_diff": result.values["logit_diff"][index].item(),
                     "threshold": float(thresholds[index]), "members": _members(features),
                     "kl_per_prompt": result.per_prompt["kl"][index]}
            points.append(point)
        self.curve.points.extend(points)
        return points

    def sweep(self, order: CandidateOrder, target: float) -> list[dict]:
        """Prefixes of the order, 4 sizes per batch, stopping once KL is far under the target (the full
        candidate set is always evaluated: it is the floor of the curve)."""
        sizes = prefix_sizes(order.size)
        points: list[dict] = []
        for start in range(0, len(sizes), 4):
            group = sizes[start : start + 4]
            if points and min(point["kl"] for point in points) <= self.settings.sweep_stop * target:
                group = [sizes[-1]]
            points += self.evaluate([order.prefix(size) for size in group], group, "threshold_sweep",
                                    [order.threshold(size) for size in group])
            if group[-1] == sizes[-1]:
                break
        return points

    def bisect(self, order: CandidateOrder, sweep: list[dict], target: float) -> int | None:
        """The smallest prefix size with KL <= target, narrowed between sweep sizes by bisection."""
        reached = [point for point in sweep if point["kl"] <= target]
        if not reached:
            return None
        high = min(point["n_features"] for point in reached)
        low = max((point["n_features"] for point in sweep if point["n_features"] < high), default=0)
        for _ in range(self.settings.bisect_evals):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            point = self.evaluate([order.prefix(middle)], [middle], "bisect", [target])[0]
            if point["kl"] <= target:
                high = middle
            else:
                low = middle
        return high

    def prune(self, members: list[int], target: float) -> list[int]:
        """ACDC's rule: drop members (least important first) whose removal keeps KL <= target."""
        budget = self.settings.prune_evals
        if budget <= 0 or len(members) <= 1:
            return members
        chunk = max(1, math.ceil(len(members) / budget))
        kept = list(members)
        for end in range(len(members), 0, -chunk):
            removal = set(members[max(0, end - chunk) : end])
            trial = [feature for feature in kept if feature not in removal]
            if not trial:
                continue
            point = self.evaluate([trial], [len(trial)], "acdc_prune", [target])[0]
            if point["kl"] <= target:
                kept = trial
        return kept


def search_dictionary(name: str, patcher: FeaturePatcher, metrics: dict, target: float, settings: SearchSettings,
                      *, confirm: bool, progress: bool = False, label: str | None = None) -> DictionaryCurve:
    """Attribution, threshold sweep, bisection to the KL target, ACDC pruning, and (if asked) confirmation.

    metrics: {"kl": KLTo(counterfactual logits), "logit_diff": LogitDifference(IO, S)} (circuits.metrics).
    With `progress`, one line per phase as it ends, prefixed by `label` (default: the name).
    """
    curve = DictionaryCurve(name, n_features=patcher.n_features)
    if settings.error_node:
        curve.details["has_error_term"] = has_error_term(patcher)
    search = _Search(patcher, metrics, curve, settings)
    phases = PhaseTimes()
    say = _PhaseReport(phases, curve, label or name, progress)
    per_prompt = settings.feature_sets == "per_prompt"
    with phases("attribution"):
        attributions = patcher.attribution(metrics, per_prompt=per_prompt)  # clean run: each feature alone
        scores = order_scores(patcher, metrics, attributions["kl"].features, settings.order_points, per_prompt)
    clean_kl, clean_logit_diff = attributions["kl"].features, attributions["logit_diff"].features
    if per_prompt:  # the mean over prompts of a shared edit is the sum of the rows
        clean_kl, clean_logit_diff = clean_kl.sum(0), clean_logit_diff.sum(0)
        attributions = {name: replace(value, features=value.features.sum(0)) for name, value in attributions.items()}
    curve.attribution_kl, curve.attribution_logit_diff = clean_kl, clean_logit_diff
    curve.error_attribution_kl = attributions["kl"].error
    order = CandidateOrder(scores, patcher.candidates(per_prompt))
    curve.order, curve.n_candidates = order.top(order.size), order.size
    say("attribution", f"{order.size} candidate features ranked")
    try:
        with phases("threshold_sweep"):
            if settings.patch_error or settings.error_node:
                search.evaluate([[]], [0], "error_only", [float("nan")])
            sweep = search.sweep(order, target)
        best = min((point["kl"] for point in sweep), default=float("nan"))
        say("threshold_sweep", f"best KL {0.0 if -1e-6 <= best < 0 else best:.3g} (target {target:.3g})")
        with phases("prune"):
            crossing = search.bisect(order, sweep, target)
            if crossing is not None and not per_prompt:
                search.prune(order.prefix(crossing), target)
        say("prune", "target not reached: nothing to bisect or prune" if crossing is None
            else f"target reached with {crossing} features before pruning")
    except BudgetExhausted:
        curve.stopped = (f"budget: stopped after {curve.evaluations} exact evaluations (--max-evals "
                         f"{settings.max_evals}); the curve holds the sets evaluated until then")
        status(f"{label or name}: {curve.stopped}", progress)
    if confirm and settings.confirm_top > 0:
        with phases("confirm"):
            curve.confirmation = confirm_attribution(patcher, metrics, attributions, settings.confirm_top)
            curve.evaluations += curve.confirmation["n_confirmed"]
        say("confirm", f"spearman {curve.confirmation.get('spearman_kl', float('nan')):.3f} over the top "
                       f"{curve.confirmation['n_confirmed']} features")
    curve.timings = phases.seconds
    return curve


class _PhaseReport:
    """One progress line per search phase: `sae: threshold sweep done in 0.8 s, 9 sets evaluated (best KL ...)`."""

    NAMES = {"attribution": "attribution", "threshold_sweep": "threshold sweep", "prune": "bisection and pruning",
             "confirm": "confirmation"}

    def __init__(self, phases: PhaseTimes, curve: DictionaryCurve, label: str, enabled: bool):
        self.phases, self.curve, self.label, self.enabled = phases, curve, label, enabled
        self.evaluations = 0

    def __call__(self, phase: str, detail: str) -> None:
        evaluated, self.evaluations = self.curve.evaluations - self.evaluations, self.curve.evaluations
        sets = f", {evaluated} sets evaluated" if evaluated else ""
        status(f"{self.label}: {self.NAMES[phase]} done in {self.phases.seconds.get(phase, 0.0):.1f} s{sets}; "
               f"{detail}", self.enabled)


def order_scores(patcher: FeaturePatcher, metrics: dict, clean_kl: torch.Tensor, points: Sequence[float],
                 per_prompt: bool = False) -> torch.Tensor:
    """KL attribution averaged over interpolation points (integrated gradients), reusing the clean one.

    The clean-run gradient alone misjudges features whose effect only shows once others are patched;
    adding the gradient halfway along the edit orders sets of features better (measured on SmolLM2).
    """
    others = [point for point in points if point != 0.0]
    if not others:
        return clean_kl
    extra = patcher.attribution({"kl": metrics["kl"]}, points=others, per_prompt=per_prompt)["kl"].features
    weight = len(others) / len(points)
    return clean_kl * (1 - weight) + extra * weight if 0.0 in points else extra


def confirm_attribution(patcher: FeaturePatcher, metrics: dict, attributions: dict, top: int) -> dict:
    """Exact single-feature patches for the top features by |KL attribution|, and rank agreement."""
    check = check_attribution(patcher, metrics, attributions, top=top, rank_by="kl")
    return {"n_confirmed": len(check["features"]), "features": check["features"],
            **{f"predicted_{name}": values for name, values in check["predicted"].items()},
            **{f"exact_{name}": values for name, values in check["exact"].items()},
            **{f"spearman_{name}": value for name, value in check["spearman"].items()}}


ERROR_NODE_TOLERANCE = 1e-4  # error-term change / total change below this: the basis is complete, no error node


def has_error_term(patcher: FeaturePatcher) -> bool:
    """Whether patching the error term changes the activation (False for complete bases: PCA, neurons)."""
    error = total = 0.0
    for index, bucket in enumerate(patcher.run.buckets):
        mask = patcher.masks[index][..., None].to(bucket.clean.dtype)
        error += float(patcher.error_delta(index).pow(2).sum())
        total += float(((bucket.counterfactual - bucket.clean) * mask).pow(2).sum())
    return total > 0 and math.sqrt(error / total) > ERROR_NODE_TOLERANCE
