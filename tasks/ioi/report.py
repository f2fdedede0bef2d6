"""report.csv: the numbers that compare searches and bases, with bootstrap confidence intervals over prompts.

Per dictionary, from its evaluated sets (any search):
- kl_at_N (N = 8, 32, 128, 512): the lowest KL among evaluated sets with at most N features (the curve's lower
  envelope, a step function: no interpolation). The greedy search holds a set of every size between its start
  and its end, so there it is the KL of its N-feature state; for the attribution search it is the prefix of N
  when N was evaluated (N are powers of two: the threshold sweep evaluates them unless it stopped early).
- features_to_target: the fewest features of a set with KL <= the KL target (25% of the unpatched KL by default).
- features_to_75pct_own: the fewest features of a set with KL <= unpatched - 0.75 (unpatched - floor), the floor
  being the KL with every candidate feature patched (`kl_floor`): 75% of the basis's OWN achievable reduction,
  so a basis whose error term caps how low KL can go is not judged by its cap.
Confidence intervals (95%, percentile): the prompts are resampled with replacement `resamples` times (seeded);
each resample recomputes the mean KL of every evaluated set (the sets stay those found on all prompts: the search
is not rerun), the unpatched KL, the floor and both targets, and every statistic. A statistic that is not reached
in more than 2.5% of the resamples has an upper bound of inf.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from tasks.ioi.search import DictionaryCurve

FIXED_COUNTS = (8, 32, 128, 512)
OWN_REDUCTION = 0.75
STATISTICS = ("features_to_target", "features_to_75pct_own", *(f"kl_at_{n}" for n in FIXED_COUNTS))
REPORT_COLUMNS = ["dictionary", "search", "n_features", "n_candidates", "kl_unpatched", "kl_floor", "kl_target",
                  "kl_target_75pct_own", *(f"{name}{suffix}" for name in STATISTICS for suffix in ("", "_lo", "_hi")),
                  "exact_evaluations", "search_seconds", "stopped"]
PRINTED = ["dictionary", "search", "kl_floor", "features_to_target", "features_to_75pct_own", "kl_at_8", "kl_at_32",
           "kl_at_128", "kl_at_512", "exact_evaluations", "search_seconds"]


def floor_point(curve: DictionaryCurve) -> dict | None:
    """The set with every candidate patched: greedy's "all_features", or the attribution sweep's last prefix."""
    for method in ("all_features", "threshold_sweep"):
        chosen = [point for point in curve.points if point["method"] == method]
        if chosen:
            return max(chosen, key=lambda point: point["n_features"])
    return None


def statistics(kl: torch.Tensor, counts: torch.Tensor, unpatched: torch.Tensor, floor: torch.Tensor,
               target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic for B samples at once. kl [P, B] mean KL of P sets, counts [P]; the rest [B]."""
    inf = torch.tensor(math.inf, dtype=kl.dtype)
    sizes = counts.to(kl.dtype)[:, None].expand_as(kl)

    def fewest(limit: torch.Tensor) -> torch.Tensor:
        return torch.where(kl <= limit[None, :], sizes, inf).min(0).values

    result = {"features_to_target": fewest(target),
              "features_to_75pct_own": fewest(unpatched - OWN_REDUCTION * (unpatched - floor))}
    for n in FIXED_COUNTS:
        result[f"kl_at_{n}"] = torch.where(sizes <= n, kl, inf).min(0).values
    return result


def report_row(curve: DictionaryCurve, unpatched: torch.Tensor, *, target_fraction: float,
               kl_target: float | None, resamples: int, seed: int) -> dict:
    """One report.csv row. unpatched: [n_prompts] KL of the clean run; kl_target: absolute, or None (fraction)."""
    points = [point for point in curve.points if point.get("kl_per_prompt") is not None]
    floor = floor_point(curve)
    per_prompt = torch.stack([unpatched.double(), *(point["kl_per_prompt"].double() for point in points)])  # [P, n]
    counts = torch.tensor([0, *(point["n_features"] for point in points)])
    floor_index = next((index + 1 for index, point in enumerate(points) if point is floor), None)

    def evaluate(weights: torch.Tensor) -> dict[str, torch.Tensor]:  # weights [n, B], columns sum to 1
        kl = per_prompt @ weights
        floor_kl = kl[floor_index] if floor_index is not None else torch.full_like(kl[0], math.nan)
        target = torch.full_like(kl[0], kl_target) if kl_target is not None else target_fraction * kl[0]
        return {**statistics(kl, counts, kl[0], floor_kl, target), "floor": floor_kl, "target": target,
                "target_75": kl[0] - OWN_REDUCTION * (kl[0] - floor_kl)}

    n = per_prompt.shape[1]
    full = evaluate(torch.full((n, 1), 1.0 / n, dtype=torch.float64))
    row = {"dictionary": curve.name, "search": curve.search, "n_features": curve.n_features,
           "n_candidates": curve.n_candidates, "kl_unpatched": float(unpatched.double().mean()),
           "kl_floor": _clip(float(full["floor"][0])), "kl_target": float(full["target"][0]),
           "kl_target_75pct_own": float(full["target_75"][0])}
    bounds = _bootstrap(evaluate, n, resamples, seed)
    for name in STATISTICS:
        row[name] = _finite_or_nan(_clip(float(full[name][0])))
        row[f"{name}_lo"], row[f"{name}_hi"] = bounds.get(name, (math.nan, math.nan))
    row.update({"exact_evaluations": curve.evaluations, "search_seconds": sum(curve.timings.values()),
                "stopped": curve.stopped})
    return row


def _bootstrap(evaluate, n: int, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    if resamples <= 0 or n < 2:
        return {}
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    weights = torch.zeros(n, resamples, dtype=torch.float64)
    weights.scatter_add_(0, draws.T, torch.full((n, resamples), 1.0 / n, dtype=torch.float64))
    values = evaluate(weights)
    bounds = {}
    for name in STATISTICS:
        samples = values[name].sort().values  # inf (not reached) sorts last
        low = samples[int(math.floor(0.025 * (resamples - 1)))].item()
        high = samples[int(math.ceil(0.975 * (resamples - 1)))].item()
        bounds[name] = (_finite_or_nan(low) if not math.isinf(low) else math.inf, high)
    return bounds


def _clip(value: float) -> float:
    """Float rounding below 0 (down to -1e-6; KL is never negative) shown as 0, as curves.clip_kl does."""
    return 0.0 if -1e-6 <= value < 0 else value


def _finite_or_nan(value: float) -> float:
    """A statistic never reached on the full sample is NaN (not reached), not inf."""
    return math.nan if math.isinf(value) else value


def report_table(curves: list[DictionaryCurve], unpatched: torch.Tensor, *, target_fraction: float,
                 kl_target: float | None, resamples: int, seed: int) -> pd.DataFrame:
    """report.csv: one row per dictionary (REPORT_COLUMNS)."""
    rows = [report_row(curve, unpatched, target_fraction=target_fraction, kl_target=kl_target, resamples=resamples,
                       seed=seed) for curve in curves]
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def format_report(report: pd.DataFrame) -> str:
    """The report as printed: each statistic with its 95% interval in brackets."""
    shown = report[["dictionary", "search", "kl_floor"]].copy()
    for name in STATISTICS:
        shown[name] = [_with_interval(row[name], row[f"{name}_lo"], row[f"{name}_hi"], name.startswith("kl"))
                       for _, row in report.iterrows()]
    shown["evals"] = report["exact_evaluations"]
    shown["seconds"] = report["search_seconds"].round(1)
    lines = [shown.to_string(index=False, float_format=lambda value: f"{value:.4g}")]
    lines.append("  (features_to_*: fewest features reaching the KL target / 75% of the basis's own reduction, "
                 "unpatched -> kl_floor; kl_at_N: lowest KL with at most N features; [95% bootstrap interval over "
                 "prompts]; nan: not reached)")
    for _, row in report.iterrows():
        if row["stopped"]:
            lines.append(f"  note: {row['dictionary']} ({row['search']}) stopped early: {row['stopped']}")
    return "\n".join(lines)


def _with_interval(value: float, low: float, high: float, is_kl: bool) -> str:
    form = (lambda x: f"{x:.3g}") if is_kl else (lambda x: "nan" if math.isnan(x) else
                                                 ("inf" if math.isinf(x) else f"{int(x)}"))
    if math.isnan(low) and math.isnan(high):
        return form(value)
    return f"{form(value)} [{form(low)}, {form(high)}]"
