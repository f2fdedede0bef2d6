"""The probing tables (per label, and the mean over labels with the SAE-minus-baseline difference), the
plot of F1 against k per basis, and the files a run writes (each atomically: never a half-written one)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from sae.assets import atomic_write_bytes
from sae.locking import folder_lock
from tasks.probing.run import ProbeResults
from tasks.probing.scores import interval

COLUMNS = ["hook", "basis", "kind", "n_directions", "label", "k", "f1", "f1_lo", "f1_hi", "auc", "auc_lo", "auc_hi",
           "precision", "recall", "train_positives", "held_out_positives", "directions"]
SUMMARY_COLUMNS = ["hook", "basis", "kind", "k", "mean_f1", "mean_f1_lo", "mean_f1_hi", "mean_auc", "mean_auc_lo",
                   "mean_auc_hi", "best_baseline", "f1_minus_best_baseline", "f1_minus_best_baseline_lo",
                   "f1_minus_best_baseline_hi"]


def probing_table(results: ProbeResults):
    import pandas as pd

    return pd.DataFrame(results.rows, columns=COLUMNS)


def summary_table(results: ProbeResults):
    """One row per (hook, basis, k): F1 and AUC averaged over labels, 95% intervals from the shared resamples;
    for an SAE, its mean F1 minus that of the best baseline at the same hook and k (paired interval)."""
    import pandas as pd

    frame = probing_table(results)
    means = frame.groupby(["hook", "basis", "k"], sort=False)[["f1", "auc"]].mean()
    rows = []
    for (hook, basis, k), mean in means.iterrows():
        f1s, aucs = results.f1_samples[(hook, basis, k)], results.auc_samples[(hook, basis, k)]
        row = {"hook": hook, "basis": basis, "kind": results.kinds[basis], "k": k, "mean_f1": mean["f1"],
               "mean_auc": mean["auc"]}
        row["mean_f1_lo"], row["mean_f1_hi"] = interval(f1s.mean(dim=0))
        row["mean_auc_lo"], row["mean_auc_hi"] = interval(aucs.mean(dim=0))
        rows.append(row)
    for row in rows:
        rivals = [other for other in rows if other["kind"] == "baseline" and (other["hook"], other["k"]) ==
                  (row["hook"], row["k"])]
        if row["kind"] != "sae" or not rivals:
            continue
        best = max(rivals, key=lambda other: other["mean_f1"])
        difference = (results.f1_samples[(row["hook"], row["basis"], row["k"])]
                      - results.f1_samples[(best["hook"], best["basis"], best["k"])]).mean(dim=0)
        row.update({"best_baseline": best["basis"], "f1_minus_best_baseline": row["mean_f1"] - best["mean_f1"]})
        row["f1_minus_best_baseline_lo"], row["f1_minus_best_baseline_hi"] = interval(difference)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _with_interval(value: float, low: float, high: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def format_summary(summary, ks: tuple[int, int]) -> str:
    """Mean F1 over labels at the smallest and largest k, per hook and basis, with the SAE-minus-best-baseline
    difference at the largest k (a difference whose interval is above 0 is a win)."""
    low_k, high_k = ks
    lines = [f"{'hook':<26} {'basis':<14} {f'mean F1, k={low_k}':<26} {f'mean F1, k={high_k}':<26} "
             f"{f'SAE - best baseline, k={low_k}':<34} SAE - best baseline, k={high_k}"]
    for (hook, basis), group in summary.groupby(["hook", "basis"], sort=False):
        cells = []
        for k in (low_k, high_k):
            row = group[group["k"] == k].iloc[0]
            cells.append(_with_interval(row["mean_f1"], row["mean_f1_lo"], row["mean_f1_hi"]))
        differences = []
        for k in (low_k, high_k):
            row = group[group["k"] == k].iloc[0]
            difference = _with_interval(row["f1_minus_best_baseline"], row["f1_minus_best_baseline_lo"],
                                        row["f1_minus_best_baseline_hi"])
            differences.append("" if row["kind"] != "sae" else f"{difference} ({row['best_baseline']})")
        lines.append(f"{hook:<26} {basis:<14} {cells[0]:<26} {cells[1]:<26} {differences[0]:<34} {differences[1]}")
    return "\n".join(lines)


def format_per_label(frame, ks: tuple[int, int]) -> str:
    """F1 per label, 'F1 at k=low / F1 at k=high', one line per hook and basis."""
    low_k, high_k = ks
    labels = list(dict.fromkeys(frame["label"]))
    width = max(11, *(len(label) + 1 for label in labels))
    lines = [f"F1 per label (k={low_k} / k={high_k}) on held-out sentences",
             f"{'hook':<26} {'basis':<14} " + " ".join(f"{label:>{width}}" for label in labels)]
    for (hook, basis), group in frame.groupby(["hook", "basis"], sort=False):
        cells = []
        for label in labels:
            part = group[group["label"] == label].set_index("k")["f1"]
            cells.append(f"{part[low_k]:.2f}/{part[high_k]:.2f}")
        lines.append(f"{hook:<26} {basis:<14} " + " ".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def plot_probing(summary, metric: str = "f1") -> bytes:
    """Mean F1 (or AUC) over labels against k, one line per basis (SAEs solid, baselines dashed) with its
    95% band, one panel per hook: the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(dict.fromkeys(summary["hook"]))
    figure, axes = plt.subplots(1, len(hooks), figsize=(4.6 * len(hooks) + 0.6, 4.2), squeeze=False, sharey=True)
    for axis, hook in zip(axes[0], hooks):
        for basis, group in summary[summary["hook"] == hook].groupby("basis", sort=False):
            group = group.sort_values("k")
            sae = group["kind"].iloc[0] == "sae"
            line, = axis.plot(group["k"], group[f"mean_{metric}"], marker="o", linestyle="-" if sae else "--",
                              linewidth=2.2 if sae else 1.4, label=basis)
            axis.fill_between(group["k"], group[f"mean_{metric}_lo"], group[f"mean_{metric}_hi"], alpha=0.15,
                              color=line.get_color())
        axis.set_xscale("log", base=2)
        ks = sorted(set(summary["k"]))
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("k (directions the probe reads)")
        axis.set_title(hook, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean {metric.upper()} over labels (held out)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    figure.suptitle("Sparse probing of Brown part-of-speech labels: the best k directions of each basis "
                    "(bands: 95% bootstrap over held-out sentences)", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_probing(results: ProbeResults, out_dir: Path, settings: dict, progress: bool = True) -> dict[str, str]:
    """OUT/probing.csv (per label), OUT/summary.csv (means and differences), OUT/probing.png and
    OUT/probing.json (settings, counts, labels, provenance), each written atomically; prints the tables."""
    out_dir = Path(out_dir)
    frame, summary = probing_table(results), summary_table(results)
    ks = sorted(set(frame["k"]))
    shown = (ks[0], ks[-1])
    paths = {"csv": out_dir / "probing.csv", "summary": out_dir / "summary.csv", "plot": out_dir / "probing.png",
             "json": out_dir / "probing.json"}
    record = {**settings, "counts": results.counts,
              "labels": {label.name: sorted(label.tags) for label in results.labels}}
    contents = {"csv": frame.to_csv(index=False).encode(), "summary": summary.to_csv(index=False).encode(),
                "plot": plot_probing(summary), "json": (json.dumps(record, indent=2, default=str) + "\n").encode()}
    with folder_lock(out_dir):  # another run writing the same OUT is refused; every file is ready before any is written
        for name, path in paths.items():
            atomic_write_bytes(path, contents[name])
    if progress:
        print(format_per_label(frame, shown))
        print()
        print(f"mean over {len(results.labels)} labels, 95% intervals over {settings.get('resamples', '?')} "
              "resamples of held-out sentences")
        print(format_summary(summary, shown))
        for path in paths.values():
            print(f"wrote {path}")
    return {name: str(path) for name, path in paths.items()}

