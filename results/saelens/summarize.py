"""compare.json (benchmarks/compare_saelens.py) -> compare.md: the side-by-side table of both budgets.

    python results/saelens/summarize.py results/saelens/compare.json results/saelens/compare.md
"""

from __future__ import annotations

import sys
from pathlib import Path
import json


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def name(spec: dict) -> str:
    return f"TopK k={spec['k']}" if spec["architecture"] == "topk" else f"ReLU+L1 {spec['l1_coefficient']:g}"


def table(report: dict) -> str:
    lines = [f"Command: `{report['command']}`", "",
             "| steps (tokens) | dictionary | library | L0 | FVU | dead | CE increase | KL/token | tokens per CPU-s |",
             "|---|---|---|---|---|---|---|---|---|"]
    speed = []
    for budget in report["budgets"]:
        for row in budget["rows"]:
            for library in ("ours", "saelens"):
                record = row.get(library)
                if record is None:
                    continue
                lines.append(f"| {budget['steps']} ({budget['tokens']:,}) | {name(row['spec'])} | {library} | "
                             f"{record['l0']:.1f} | {record['fvu']:.4f} | {record['dead_fraction']:.3f} | "
                             f"{fmt(record.get('ce_increase'), '.4f')} | {fmt(record.get('kl'), '.4f')} | "
                             f"{record['tokens_per_cpu_s']:,.0f} |")
            if "ours" in row and "saelens" in row:
                speed.append((budget["steps"], name(row["spec"]), row["ours"]["tokens_per_cpu_s"],
                              row["saelens"]["tokens_per_cpu_s"]))
        relu = {library: [row[library]["tokens_per_cpu_s"] for row in budget["rows"]
                          if row["spec"]["architecture"] == "standard" and library in row]
                for library in ("ours", "saelens")}
        if relu["ours"] and relu["saelens"]:
            speed.append((budget["steps"], "ReLU+L1 (means over the sweeps)", sum(relu["ours"]) / len(relu["ours"]),
                          sum(relu["saelens"]) / len(relu["saelens"])))
    lines += ["", "FVU and spliced CE increase at matched L0 (ReLU+L1: SAELens' sweep interpolated in log L0 at our "
              "L0; CE where every sweep point has one):", "",
              "| steps | our L0 | our FVU | SAELens FVU at that L0 | ratio | our CE increase | SAELens CE at that L0 | "
              "ratio |", "|---|---|---|---|---|---|---|---|"]
    for budget in report["budgets"]:
        for row in budget["matched_l0"]:
            lines.append(f"| {budget['steps']} | {row['l0']:.1f} | {row['ours_fvu']:.4f} | "
                         f"{fmt(row['saelens_fvu_at_l0'], '.4f')} | {fmt(row['ratio'], '.3f')} | "
                         f"{fmt(row.get('ours_ce'), '.4f')} | {fmt(row.get('saelens_ce_at_l0'), '.4f')} | "
                         f"{fmt(row.get('ce_ratio'), '.3f')} |")
    lines += ["", "Training speed, tokens per CPU-second (one torch thread each):", "",
              "| steps | dictionary | ours | SAELens | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {steps} | {label} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |"
              for steps, label, ours, theirs in speed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    source, target = sys.argv[1], sys.argv[2]
    Path(target).write_text(table(json.loads(Path(source).read_text())))
