"""Merge two `sparse-circuits ioi` runs on the same dictionaries and prompts (one per --search) into
comparison.csv, comparison.md (the table with 95% intervals) and comparison.png (KL against features, both
searches, every basis). Usage: python results/ioi_greedy/compare.py RUN_ATTRIBUTION RUN_GREEDY OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from tasks.ioi.curves import lower_envelope


def interval(row, name: str, is_kl: bool) -> str:
    def form(value):
        if isinstance(value, float) and math.isnan(value):
            return "n.r."
        if isinstance(value, float) and math.isinf(value):
            return "n.r."
        return f"{value:.3g}" if is_kl else f"{int(value)}"

    return f"{form(row[name])} [{form(row[name + '_lo'])}, {form(row[name + '_hi'])}]"


def main(attribution: Path, greedy: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = pd.concat([pd.read_csv(attribution / "report.csv"), pd.read_csv(greedy / "report.csv")])
    report["stopped"] = report["stopped"].astype(object).where(report["stopped"].notna(), "")
    report["kl_floor"] = report["kl_floor"].where(report["kl_floor"] < -1e-6, report["kl_floor"].clip(lower=0))
    report.to_csv(out / "comparison.csv", index=False)
    details = {name: json.loads((folder / "details.json").read_text()) for name, folder in
               (("attribution", attribution), ("greedy", greedy))}
    header = details["greedy"]
    lines = [f"IOI, {header['model']} {header['hook']}, {header['n_prompts']} prompts (dropped "
             f"{header['dropped_prompts']['count']} of {header['dropped_prompts']['of']}), unpatched KL "
             f"{header['kl_unpatched']:.3f}, target {header['kl_target']:.3f}; 95% bootstrap intervals over prompts "
             f"({header['settings']['bootstrap']} resamples); n.r. = not reached", "",
             "| basis | search | floor | features to 25% target | features to 75% own reduction | KL@8 | KL@32 | "
             "KL@128 | KL@512 | exact evals | seconds |", "|" + "---|" * 11]
    for _, row in report.sort_values(["dictionary", "search"]).iterrows():
        lines.append(f"| {row['dictionary']} | {row['search']} | {row['kl_floor']:.3f} | "
                     f"{interval(row, 'features_to_target', False)} | {interval(row, 'features_to_75pct_own', False)} | "
                     + " | ".join(interval(row, f"kl_at_{n}", True) for n in (8, 32, 128, 512))
                     + f" | {int(row['exact_evaluations'])} | {row['search_seconds']:.0f} |")
    stopped = report[report["stopped"] != ""]
    lines += [f"\nstopped early: {row['dictionary']} ({row['search']}): {row['stopped']}" for _, row in
              stopped.iterrows()]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(attribution, greedy, header, out / "comparison.png")


def plot(attribution: Path, greedy: Path, header: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(pd.read_csv(greedy / "curves.csv")["dictionary"]))
    for search, folder, style in (("attribution", attribution, "--"), ("greedy", greedy, "-")):
        curves = pd.read_csv(folder / "curves.csv")
        for index, name in enumerate(names):
            points = curves[(curves["dictionary"] == name) & (curves["n_features"] > 0)].to_dict("records")
            envelope = lower_envelope(points)
            if envelope:
                xs, ys = zip(*envelope)
                axis.step(xs, ys, where="post", linestyle=style, color=f"C{index}", label=f"{name} ({search})")
    axis.axhline(header["kl_target"], color="grey", linestyle=":", label=f"target {header['kl_target']:.3g}")
    axis.axhline(header["kl_unpatched"], color="black", linestyle=":", label="unpatched")
    axis.set_xscale("log")
    axis.set_xlabel("features patched")
    axis.set_ylabel("KL(patched || counterfactual), mean over prompts")
    axis.set_title(f"IOI at {header['hook']} ({header['model']}, {header['n_prompts']} prompts): greedy (solid) vs "
                   "attribution (dashed)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
