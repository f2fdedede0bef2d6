"""Markdown tables for README.md from probing.csv and summary.csv (run from this folder: python tables.py)."""

import pandas as pd

table = pd.read_csv("probing.csv")
summary = pd.read_csv("summary.csv")
ks = (1, 16)


def cell(value, low, high):
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


print("| hook | basis | mean F1, k=1 | mean F1, k=16 | mean AUC, k=1 | mean AUC, k=16 | SAE - best baseline, k=1 | SAE - best baseline, k=16 |")
print("|---|---|---|---|---|---|---|---|")
for (hook, basis), group in summary.groupby(["hook", "basis"], sort=False):
    rows = {k: group[group["k"] == k].iloc[0] for k in ks}
    f1 = [cell(rows[k]["mean_f1"], rows[k]["mean_f1_lo"], rows[k]["mean_f1_hi"]) for k in ks]
    auc = [f"{rows[k]['mean_auc']:.3f}" for k in ks]
    diff = ["" if rows[k]["kind"] != "sae" else
            f"{cell(rows[k]['f1_minus_best_baseline'], rows[k]['f1_minus_best_baseline_lo'], rows[k]['f1_minus_best_baseline_hi'])} ({rows[k]['best_baseline']})"
            for k in ks]
    print(f"| {hook.split('.hook')[0]} | {basis} | {f1[0]} | {f1[1]} | {auc[0]} | {auc[1]} | {diff[0]} | {diff[1]} |")

labels = list(dict.fromkeys(table["label"]))
for hook in dict.fromkeys(table["hook"]):
    print(f"\n{hook}: F1 at k=1 / k=16 per label (held out)\n")
    print("| basis | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    part = table[table["hook"] == hook]
    for basis, group in part.groupby("basis", sort=False):
        cells = []
        for label in labels:
            values = group[group["label"] == label].set_index("k")["f1"]
            cells.append(f"{values[1]:.2f} / {values[16]:.2f}")
        print(f"| {basis} | " + " | ".join(cells) + " |")

half = (table["f1_hi"] - table["f1_lo"]) / 2
print(f"\nper-label 95% interval half-width: median {half.median():.3f}, 90th percentile {half.quantile(0.9):.3f}")
