"""The IOI feature-patching benchmark of Cunningham et al. (2024, Sec. 4), for any set of dictionaries.

Question: how few features of a decomposition, patched from the counterfactual run (IO name replaced
by a third name) into the clean run at one hook point, move the model's output to the counterfactual
one? The metric is KL(patched || counterfactual) of the next-token distribution at the final position,
mean over prompts (the IO - S logit difference is reported beside it). One feature set is shared by
all prompts, and a feature is patched at every position but BOS (position 0, never edited); positions
before the IO name are the same in both runs, so in effect every position from the IO name on.
The error term stays at its clean value: an edit is a sum of feature directions only (the complete
baselines have no error; an SAE's error caps how low its KL can go). With `patch_error` the error term
is patched in every set too, and only features are counted.

With `feature_sets="per_prompt"` each prompt gets its own set instead (its own top k features by its
own attribution; n_features is then k, the count per prompt), which asks how many features a single
input needs rather than how many cover every name in the dataset; ACDC pruning is skipped there.

Search, per dictionary (every exact evaluation runs the model from the hook on, in batches of sets):
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

Outputs: curves.csv (every evaluated set), summary.csv (per dictionary: features to reach the KL
target, area under the curve, ...), curves.png (KL against features patched and against edit size),
details.json (settings, clean performance, timings by phase, attribution checks).

edit_norm = mean over prompts of the L2 norm of the whole change to the activation (all positions).
area_under_curve = mean of the normalised KL (KL / KL of the unpatched run) over x = log2(1 + n) for
n from 0 to `n_max` (the smallest dictionary width), the curve being the lowest KL reached with at
most n features (a step function through the evaluated sets): 1 = no progress, 0 = reached at once.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from circuits.patching import CachedRun, FeaturePatcher, KLTo, LogitDifference, check_attribution
from circuits.splicing import check_dictionary_fits
from sae.assets import atomic_write_bytes, atomic_write_text
from sae.dictionary import Dictionary
from tasks.ioi_data import generate_ioi_prompts, tokenize_ioi

BASELINE_NAMES = ("pca", "ica", "neurons", "random", "dense")
DEFAULT_KL_TARGET_FRACTION = 0.25  # of the unpatched KL(clean || counterfactual)
CURVE_COLUMNS = ["dictionary", "method", "n_features", "edit_norm", "kl", "logit_diff", "threshold"]
SUMMARY_COLUMNS = ["dictionary", "features_to_reach_kl_target", "kl_target", "area_under_curve",
                   "edit_norm_at_target", "best_kl", "kl_all_features", "kl_unpatched", "n_features",
                   "n_candidates", "spearman_kl", "spearman_logit_diff", "n_confirmed", "exact_evaluations"]


def prefix_sizes(n: int) -> list[int]:
    """1, 2, 4, 8, ... (powers of two below n), and n itself."""
    sizes, size = [], 1
    while size < n:
        sizes.append(size)
        size *= 2
    return sizes + [n] if n > 0 else []


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


@dataclass
class IOIBenchmarkResult:
    """The tables and the paths of what the benchmark wrote."""

    curves: pd.DataFrame
    summary: pd.DataFrame
    curves_csv: Path
    summary_csv: Path
    curves_png: Path
    details_json: Path
    kl_target: float
    clean_performance: dict
    timings: dict[str, float]  # seconds per phase, summed over dictionaries
    per_dictionary: dict[str, dict] = field(default_factory=dict)  # timings and exact evaluations of each

    def paths(self) -> dict[str, str]:
        return {"curves": str(self.curves_csv), "summary": str(self.summary_csv), "plot": str(self.curves_png),
                "details": str(self.details_json)}


class _Phases:
    """Wall time per named phase, summed over repeats."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                phases.seconds[name] = phases.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()


# ---------------------------------------------------------------------------------------------
# the search for one dictionary


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
        if not sets:
            return []
        result = self.patcher.evaluate(sets, self.metrics, include_error=self.settings.patch_error,
                                       max_batch_tokens=self.settings.max_batch_tokens)
        self.curve.evaluations += len(sets)
        points = []
        for index, features in enumerate(sets):
            point = {"dictionary": self.curve.name, "method": method, "n_features": int(sizes[index]),
                     "edit_norm": result.edit_norm[index].item(), "kl": result.values["kl"][index].item(),
                     "logit_diff": result.values["logit_diff"][index].item(),
                     "threshold": float(thresholds[index]), "members": _members(features)}
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


def _candidates(patcher: FeaturePatcher, per_prompt: bool = False) -> torch.Tensor:
    """Features whose code differs between the runs at some patched position: [F] bool, or [n_prompts, F]."""
    active = torch.zeros(patcher.run.n_prompts, patcher.n_features, dtype=torch.bool)
    for index, bucket in enumerate(patcher.run.buckets):
        active[bucket.rows] = (patcher._delta(index, "patch", None) != 0).any(1).cpu()
    return active if per_prompt else active.any(0)


def search_dictionary(name: str, patcher: FeaturePatcher, metrics: dict, target: float,
                      settings: SearchSettings, confirm: bool) -> DictionaryCurve:
    """Attribution, threshold sweep, bisection to the KL target, ACDC pruning, and (if asked) confirmation."""
    curve = DictionaryCurve(name, n_features=patcher.n_features)
    search = _Search(patcher, metrics, curve, settings)
    phases = _Phases()
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
    order = CandidateOrder(scores, _candidates(patcher, per_prompt))
    curve.order, curve.n_candidates = order.top(order.size), order.size
    with phases("threshold_sweep"):
        if settings.patch_error:
            search.evaluate([[]], [0], "error_only", [float("nan")])
        sweep = search.sweep(order, target)
    with phases("prune"):
        crossing = search.bisect(order, sweep, target)
        if crossing is not None and not per_prompt:
            search.prune(order.prefix(crossing), target)
    if confirm and settings.confirm_top > 0:
        with phases("confirm"):
            curve.confirmation = confirm_attribution(patcher, metrics, attributions, settings.confirm_top)
            curve.evaluations += curve.confirmation["n_confirmed"]
    curve.timings = phases.seconds
    return curve


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


# ---------------------------------------------------------------------------------------------
# curves and summary


def lower_envelope(points: list[dict], key: str = "n_features") -> list[tuple[float, float]]:
    """[(x, lowest KL reached with at most x)] over the evaluated points, x ascending."""
    best, envelope = math.inf, []
    for point in sorted(points, key=lambda item: (item[key], item["kl"])):
        if point["kl"] < best:
            best = point["kl"]
            envelope.append((point[key], best))
    return envelope


def area_under_curve(points: list[dict], kl_unpatched: float, n_max: int) -> float:
    """Mean normalised KL over x = log2(1 + n), n in [0, n_max], of the step-function envelope."""
    envelope = [(n, kl) for n, kl in lower_envelope(points) if n <= n_max]
    if not envelope or n_max <= 0 or kl_unpatched <= 0:
        return float("nan")
    end = math.log2(1 + n_max)
    area, previous_x, previous_kl = 0.0, 0.0, kl_unpatched
    for n, kl in envelope:
        x = math.log2(1 + n)
        area += (x - previous_x) * previous_kl
        previous_x, previous_kl = x, min(previous_kl, kl)
    area += (end - previous_x) * previous_kl
    return area / (end * kl_unpatched)


def summarise(curve: DictionaryCurve, target: float, kl_unpatched: float, n_max: int) -> dict:
    reached = [point for point in curve.points if point["kl"] <= target]
    smallest = min(reached, key=lambda point: (point["n_features"], point["edit_norm"])) if reached else None
    full = [point for point in curve.points if point["method"] == "threshold_sweep"]
    n_candidates = curve.n_candidates
    return {
        "dictionary": curve.name,
        "features_to_reach_kl_target": smallest["n_features"] if smallest else float("nan"),
        "kl_target": target,
        "area_under_curve": area_under_curve(curve.points, kl_unpatched, n_max),
        "edit_norm_at_target": smallest["edit_norm"] if smallest else float("nan"),
        "best_kl": min((point["kl"] for point in curve.points), default=float("nan")),
        "kl_all_features": full[-1]["kl"] if full else float("nan"),
        "kl_unpatched": kl_unpatched,
        "n_features": curve.n_features,
        "n_candidates": n_candidates,
        "spearman_kl": curve.confirmation.get("spearman_kl", float("nan")),
        "spearman_logit_diff": curve.confirmation.get("spearman_logit_diff", float("nan")),
        "n_confirmed": curve.confirmation.get("n_confirmed", 0),
        "exact_evaluations": curve.evaluations,
    }


def plot_curves(curves: pd.DataFrame, target: float, kl_unpatched: float, title: str) -> bytes:
    """PNG bytes: KL against features patched (log scale) and against edit size, one line per dictionary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, group) in enumerate(curves.groupby("dictionary", sort=False)):
        points = group.to_dict("records")
        color = f"C{index % 10}"
        for axis, key in zip(axes, ("n_features", "edit_norm")):
            envelope = lower_envelope([p for p in points if p[key] > 0], key)
            if envelope:
                xs, ys = zip(*envelope)
                axis.step(xs, ys, where="post", color=color, label=name, linewidth=1.8)
            shown = group[group[key] > 0]  # the unpatched run is the dotted line
            axis.scatter(shown[key], shown["kl"], s=8, color=color, alpha=0.35)
    labels = ("number of features patched", "edit magnitude (mean L2 norm of the change)")
    for axis, label in zip(axes, labels):
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"KL target {target:.3g}")
        axis.axhline(kl_unpatched, color="black", linestyle=":", linewidth=1, label="unpatched")
        axis.set_xlabel(label)
        axis.set_ylabel("KL(patched || counterfactual)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def format_summary(summary: pd.DataFrame) -> str:
    columns = ["dictionary", "features_to_reach_kl_target", "kl_target", "area_under_curve", "edit_norm_at_target",
               "best_kl", "kl_all_features", "spearman_kl", "spearman_logit_diff"]
    return summary[columns].to_string(index=False, float_format=lambda value: f"{value:.4g}")


# ---------------------------------------------------------------------------------------------
# the benchmark


def check_dictionaries(model, hook: str, dictionaries: dict[str, Dictionary]) -> None:
    """Every dictionary must fit the hook (its width); checked before any prompt is run."""
    if not dictionaries:
        raise ValueError("no dictionaries to benchmark; pass at least one (an SAE, or baselines)")
    for name, dictionary in dictionaries.items():
        try:
            check_dictionary_fits(model, hook, dictionary)
        except ValueError as error:
            raise ValueError(f"dictionary '{name}': {error}") from error


def run_ioi_benchmark(model, dictionaries: dict[str, Dictionary], hook: str, n_prompts: int, out_dir: str | Path,
                      seed: int = 0, progress: bool = True, settings: SearchSettings | None = None,
                      confirm: Iterable[str] | None = None, names: Sequence[str] | None = None,
                      templates: Sequence[str] | None = None) -> IOIBenchmarkResult:
    """Run the benchmark for `dictionaries` ({name: dictionary}) at `hook`; write and return the results.

    `confirm`: the dictionaries whose attribution is checked against exact patching (default: those not
    named like a baseline, or the first). `names` / `templates`: custom IOI word lists and templates.
    """
    settings = settings or SearchSettings()
    if settings.feature_sets not in ("shared", "per_prompt"):
        raise ValueError(f"feature_sets must be 'shared' or 'per_prompt', got {settings.feature_sets!r}")
    out_dir = Path(out_dir)
    phases = _Phases()
    check_dictionaries(model, hook, dictionaries)
    with phases("prompts"):
        prompts = generate_ioi_prompts(model.tokenizer, n_prompts, seed=seed, templates=templates, names=names)
        batch = tokenize_ioi(model, prompts)
    with phases("clean_counterfactual_runs"):
        run = CachedRun(model, hook, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens,
                        progress=progress)
        performance = _performance(run, batch)
    metrics = {"kl": KLTo(run.counterfactual_logits), "logit_diff": LogitDifference(batch.io_tokens, batch.s_tokens)}
    kl_unpatched = metrics["kl"](run.clean_logits, torch.arange(len(batch))).mean().item()
    target = settings.kl_target if settings.kl_target is not None else settings.kl_target_fraction * kl_unpatched
    confirm = set(confirm) if confirm is not None else _default_confirm(dictionaries)
    curves: list[DictionaryCurve] = []
    for name, dictionary in _progress(dictionaries.items(), progress):
        with phases("encode"):
            patcher = FeaturePatcher(run, dictionary)
        curve = search_dictionary(name, patcher, metrics, target, settings, name in confirm)
        curve.points.insert(0, _unpatched_point(name, kl_unpatched, performance["mean_logit_diff"]))
        for phase, seconds in curve.timings.items():
            phases.seconds[phase] = phases.seconds.get(phase, 0.0) + seconds
        curves.append(curve)
    with phases("outputs"):
        result = _write_outputs(out_dir, curves, target, kl_unpatched, performance, settings, model, hook, run,
                                n_prompts, seed, phases)
    if progress:
        print(format_summary(result.summary))
    return result


def _default_confirm(dictionaries: dict[str, Dictionary]) -> set[str]:
    chosen = {name for name in dictionaries if name not in BASELINE_NAMES}
    return chosen or {next(iter(dictionaries))}


def _progress(items, progress: bool):
    from tqdm.auto import tqdm

    items = list(items)
    return tqdm(items, desc="dictionaries", disable=not progress) if len(items) > 1 else items


def _unpatched_point(name: str, kl: float, logit_diff: float) -> dict:
    return {"dictionary": name, "method": "unpatched", "n_features": 0, "edit_norm": 0.0, "kl": kl,
            "logit_diff": logit_diff, "threshold": float("nan"), "members": []}


def _performance(run: CachedRun, batch) -> dict:
    """IOI performance of the clean and counterfactual runs (from the logits already computed)."""
    rows = torch.arange(len(batch))
    clean = LogitDifference(batch.io_tokens, batch.s_tokens)(run.clean_logits, rows)
    counterfactual = LogitDifference(batch.io_tokens, batch.s_tokens)(run.counterfactual_logits, rows)
    return {"n_prompts": len(batch), "accuracy": (clean > 0).float().mean().item(),
            "mean_logit_diff": clean.mean().item(), "counterfactual_mean_logit_diff": counterfactual.mean().item(),
            "run_mode": run.mode}


def _write_outputs(out_dir: Path, curves: list[DictionaryCurve], target: float, kl_unpatched: float,
                   performance: dict, settings: SearchSettings, model, hook: str, run: CachedRun, n_prompts: int,
                   seed: int, phases: _Phases) -> IOIBenchmarkResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    n_max = min(curve.n_features for curve in curves)
    rows = [{key: point[key] for key in CURVE_COLUMNS} for curve in curves for point in curve.points]
    curves_frame = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    summary = pd.DataFrame([summarise(curve, target, kl_unpatched, n_max) for curve in curves],
                           columns=SUMMARY_COLUMNS)
    paths = {name: out_dir / name for name in ("curves.csv", "summary.csv", "curves.png", "details.json")}
    atomic_write_text(paths["curves.csv"], curves_frame.to_csv(index=False))
    atomic_write_text(paths["summary.csv"], summary.to_csv(index=False))
    from circuits.models import model_name_of

    title = f"IOI feature patching: {model_name_of(model)}, {hook}, {n_prompts} prompts"
    atomic_write_bytes(paths["curves.png"], plot_curves(curves_frame, target, kl_unpatched, title))
    details = {
        "model": model_name_of(model), "hook": hook, "n_prompts": n_prompts, "seed": seed,
        "kl_target": target, "kl_unpatched": kl_unpatched, "clean_performance": performance,
        "settings": settings.__dict__, "timings_seconds": phases.seconds,
        "dictionaries": {curve.name: {"timings_seconds": curve.timings, "exact_evaluations": curve.evaluations,
                                      "error_attribution_kl": curve.error_attribution_kl,
                                      "confirmation": curve.confirmation,
                                      "smallest_set_reaching_target": _smallest_members(curve, target),
                                      "top_features": (curve.order or [])[:20]}
                         for curve in curves},
    }
    atomic_write_text(paths["details.json"], json.dumps(details, indent=2, default=float) + "\n")
    per_dictionary = {curve.name: {"timings_seconds": curve.timings, "exact_evaluations": curve.evaluations}
                      for curve in curves}
    return IOIBenchmarkResult(curves_frame, summary, paths["curves.csv"], paths["summary.csv"], paths["curves.png"],
                              paths["details.json"], target, performance, dict(phases.seconds), per_dictionary)


def _smallest_members(curve: DictionaryCurve, target: float) -> list[int]:
    reached = [point for point in curve.points if point["kl"] <= target]
    return min(reached, key=lambda point: point["n_features"])["members"] if reached else []


# ---------------------------------------------------------------------------------------------
# baselines


def activations_for_baselines(model, hook: str, n_tokens: int, corpus, seed: int = 0, context_size: int = 128,
                              batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """[n_tokens, d] activations at `hook` from the corpus train split (BOS positions left out)."""
    from sae.activation_store import collect_activations
    from sae.corpus import tokenize_contexts
    from tqdm.auto import tqdm

    n_contexts = math.ceil(n_tokens / (context_size - 1))
    contexts = tokenize_contexts(corpus, model.tokenizer, context_size, n_contexts, split="train", seed=seed)
    device = next(model.parameters()).device
    pieces = []
    with torch.inference_mode():
        for start in tqdm(range(0, contexts.shape[0], batch_size), desc="activations for baselines",
                          disable=not progress):
            values = collect_activations(model, contexts[start : start + batch_size].to(device), [hook])[hook]
            pieces.append(values[:, 1:].reshape(-1, values.shape[-1]).float().cpu())
    return torch.cat(pieces)[:n_tokens]


def activations_from_store(store_dir: str | Path, hook: str, n_tokens: int) -> torch.Tensor | None:
    """The first `n_tokens` activations at `hook` of an activation store, or None if it lacks them."""
    from sae.activation_store import ActivationStore, StoreError

    try:
        store = ActivationStore(store_dir)
        store.d_in(hook)
    except (StoreError, FileNotFoundError):
        return None
    if store.n_tokens < n_tokens:
        return None
    pieces, total = [], 0
    for index in range(len(store.shards)):
        pieces.append(store.read_shard(index, [hook])[hook].float())
        total += pieces[-1].shape[0]
        if total >= n_tokens:
            break
    return torch.cat(pieces)[:n_tokens]


def build_baselines(model, hook: str, names: Iterable[str], n_tokens: int, corpus, seed: int = 0,
                    ratio: int = 4, tied: bool = True, dense_epochs: float = 4.0,
                    activations: torch.Tensor | None = None, out_dir: str | Path | None = None,
                    ica_tokens: int = 4000, ica_max_iter: int = 100, progress: bool = True) -> dict[str, Dictionary]:
    """The paper's comparison decompositions at `hook`, fitted on `n_tokens` corpus activations.

    names: any of pca, ica, neurons, random (sae/baselines.py, complete signed bases) and dense (a ReLU
    autoencoder trained with alpha = 0, ratio x d_model features, `dense_epochs` passes, briefly).
    `activations` [n, d] skips harvesting; `out_dir` keeps the dense autoencoder's folder. ICA is fitted on
    at most `ica_tokens` of the rows with at most `ica_max_iter` iterations (complete on 576 dimensions it
    otherwise takes half an hour on a CPU); unconverged, it is still an exact basis (sae/baselines.py warns).
    """
    import tempfile

    from circuits.models import model_name_of
    from sae.baselines import BASELINES, fit_baseline, fit_ica

    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINE_NAMES)}")
    if not names:
        return {}
    if activations is None:
        activations = activations_for_baselines(model, hook, n_tokens, corpus, seed=seed, progress=progress)
    model_name = model_name_of(model)
    built: dict[str, Dictionary] = {}
    for name in names:
        if name == "ica":  # FastICA costs ~d^2 per row per iteration: a subsample and an iteration cap keep it short
            rows = activations[torch.randperm(activations.shape[0], generator=torch.Generator().manual_seed(seed))
                               [:ica_tokens]]
            built[name] = fit_ica(rows, seed=seed, hook_name=hook, model_name=model_name, max_iter=ica_max_iter)
        elif name in BASELINES:
            built[name] = fit_baseline(name, activations, seed=seed, hook_name=hook, model_name=model_name)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                folder = Path(out_dir) if out_dir is not None else Path(scratch)
                built[name] = train_dense_autoencoder(activations, hook, model_name, ratio, tied, dense_epochs,
                                                      seed, folder, progress)
    return built


def train_dense_autoencoder(activations: torch.Tensor, hook: str, model_name: str, ratio: int, tied: bool,
                            epochs: float, seed: int, out_dir: Path, progress: bool = True) -> Dictionary:
    """The non-sparse baseline: the paper's autoencoder with alpha = 0 (no L1), trained briefly."""
    from sae.batches import TensorBatchSource
    from sae.config import DictionaryConfig
    from sae.training import TrainingConfig, train_dictionaries

    d_in = activations.shape[1]
    batch_size = min(1024, activations.shape[0])
    config = DictionaryConfig("standard", d_in=d_in, d_sae=ratio * d_in, hook_name=hook, model_name=model_name,
                              l1_coefficient=0.0, tied=tied, seed=seed, extra={"method": "dense"})
    training = TrainingConfig(total_tokens=int(epochs * activations.shape[0]), batch_size=batch_size, lr=1e-3,
                              seed=seed, checkpoint_every=None, log_every=25,
                              dead_window_tokens=activations.shape[0])
    result = train_dictionaries(TensorBatchSource({hook: activations}), [config], training, out_dir,
                                names=["dense"], progress=progress)[0]
    return result.dictionary.eval()
