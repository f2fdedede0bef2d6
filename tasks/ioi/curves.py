"""Curves of the IOI benchmark: KL against features patched, their summary per dictionary, and the plot.

edit_norm = mean over prompts of the L2 norm of the whole change to the activation (all positions).
area_under_curve = mean of the normalised KL (KL / KL of the unpatched run) over x = log2(1 + n) for
n from 0 to `n_max` (the smallest dictionary width), the curve being the lowest KL reached with at
most n features (a step function through the evaluated sets): 1 = no progress, 0 = reached at once.
"""

from __future__ import annotations

import io
import math

import pandas as pd

from tasks.ioi.search import DictionaryCurve

CURVE_COLUMNS = ["dictionary", "method", "n_features", "edit_norm", "kl", "logit_diff", "threshold"]
SUMMARY_COLUMNS = ["dictionary", "features_to_reach_kl_target", "kl_target", "area_under_curve",
                   "edit_norm_at_target", "best_kl", "kl_all_features", "kl_unpatched", "n_features",
                   "n_candidates", "spearman_kl", "spearman_logit_diff", "n_confirmed", "exact_evaluations"]
PRINTED_COLUMNS = ["dictionary", "features_to_reach_kl_target", "kl_target", "area_under_curve",
                   "edit_norm_at_target", "best_kl", "kl_all_features", "spearman_kl", "spearman_logit_diff"]
KL_ROUNDING = 1e-6  # a KL this far below 0 is float rounding (KL is never negative): shown as 0
SPEARMAN_NOTE = ("note: spearman_* (rank agreement of attribution with exact single-feature patching) is NaN for "
                 "dictionaries whose attribution was not confirmed: by default only the SAEs are checked, not the "
                 "baselines")
CLIPPED_KL_NOTE = (f"note: KL values less than {KL_ROUNDING:g} below 0 are float rounding (KL is never negative) and "
                   "are shown as 0")


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


def smallest_reaching(curve: DictionaryCurve, target: float) -> dict | None:
    """The evaluated set with KL <= target and the fewest features (then the smallest edit), or None."""
    reached = [point for point in curve.points if point["kl"] <= target]
    return min(reached, key=lambda point: (point["n_features"], point["edit_norm"])) if reached else None


def summarise(curve: DictionaryCurve, target: float, kl_unpatched: float, n_max: int) -> dict:
    """One summary.csv row (SUMMARY_COLUMNS) for a dictionary's curve."""
    from tasks.ioi.report import floor_point

    smallest = smallest_reaching(curve, target)
    full = floor_point(curve)
    return {
        "dictionary": curve.name,
        "features_to_reach_kl_target": smallest["n_features"] if smallest else float("nan"),
        "kl_target": target,
        "area_under_curve": area_under_curve(curve.points, kl_unpatched, n_max),
        "edit_norm_at_target": smallest["edit_norm"] if smallest else float("nan"),
        "best_kl": clip_kl(min((point["kl"] for point in curve.points), default=float("nan"))),
        "kl_all_features": clip_kl(full["kl"]) if full else float("nan"),
        "kl_unpatched": kl_unpatched,
        "n_features": curve.n_features,
        "n_candidates": curve.n_candidates,
        "spearman_kl": curve.confirmation.get("spearman_kl", float("nan")),
        "spearman_logit_diff": curve.confirmation.get("spearman_logit_diff", float("nan")),
        "n_confirmed": curve.confirmation.get("n_confirmed", 0),
        "exact_evaluations": curve.evaluations,
    }


def clip_kl(value: float) -> float:
    """A KL value with float rounding below 0 (down to -KL_ROUNDING) shown as 0; other values unchanged."""
    return 0.0 if -KL_ROUNDING <= value < 0 else value


def curve_rows(curves: list[DictionaryCurve]) -> pd.DataFrame:
    """Every evaluated set of every dictionary as a curves.csv table (CURVE_COLUMNS)."""
    rows = [{key: point[key] for key in CURVE_COLUMNS} for curve in curves for point in curve.points]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def summary_table(curves: list[DictionaryCurve], target: float, kl_unpatched: float) -> pd.DataFrame:
    """summary.csv: one row per dictionary, the area under the curve taken up to the smallest width."""
    n_max = min(curve.n_features for curve in curves)
    return pd.DataFrame([summarise(curve, target, kl_unpatched, n_max) for curve in curves],
                        columns=SUMMARY_COLUMNS)


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
            axis.scatter(shown[key], shown["kl"], s=8, color=color, alpha=0.35, label="_nolegend_")
    labels = ("number of features patched", "edit magnitude (mean L2 norm of the change)")
    for axis, label in zip(axes, labels):
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"KL target {target:.3g}")
        axis.axhline(kl_unpatched, color="black", linestyle=":", linewidth=1, label="unpatched")
        axis.set_xlabel(label)
        axis.set_ylabel("KL(patched || counterfactual)")
        axis.grid(alpha=0.3)
    axes[0].scatter([], [], s=8, color="grey", alpha=0.35, label="each evaluated set (pale dots)")
    axes[0].legend(fontsize=8, loc="lower left")
    figure.suptitle(title, fontsize=10)
    figure.text(0.5, 0.01, "Lines: the lowest KL reached with at most that many features (or that edit size). "
                "Pale dots: every feature set evaluated exactly (threshold sweep, bisection, pruning), in the "
                "dictionary's colour.", ha="center", fontsize=7.5, color="#444444", wrap=True)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def format_summary(summary: pd.DataFrame) -> str:
    """The summary table as printed after a run."""
    lines = [summary[PRINTED_COLUMNS].to_string(index=False, float_format=lambda value: f"{value:.4g}")]
    return "\n".join(lines + summary_notes(summary))


def summary_notes(summary: pd.DataFrame) -> list[str]:
    """The notes printed under the summary: why a Spearman is NaN, that tiny negative KLs were clipped."""
    notes = []
    if summary["spearman_kl"].isna().any():
        notes.append(SPEARMAN_NOTE)
    if "best_kl" in summary and (summary["best_kl"] == 0).any():
        notes.append(CLIPPED_KL_NOTE)
    return notes
