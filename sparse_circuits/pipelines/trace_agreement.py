"""The `trace-agreement` step: attribution against ablation over many targets, written as files.

Writes into the output folder `agreement.csv` (a row per target, arm, layer, method and receiver),
`failures.csv` (a row per failure, with the switched-on share of its ablation effect),
`summary.json` (the settings, the distribution tables, the targets, seconds) and `agreement.png`
(the Spearman distributions; `agreement.svg`, drawn by hand, where matplotlib is missing).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

TABLE_COLUMNS = ("arm", "depth", "blocks_apart", "method", "receivers", "spearman_q1", "spearman_median",
                 "spearman_q3", "spearman_min", "overlap_median", "failures", "switched_on_failures")


def run_trace_agreement(model, dictionaries, corpus, *, target_hook: str, out: Path, n_targets: int = 20,
                        depth: int = 3, skip_layer: bool = False, ig_steps: tuple[int, ...] = (1,),
                        n_contexts: int = 8, scan_contexts: int = 300, context_size: int = 48, top_n: int = 30,
                        top_k_edges: int = 5, max_candidates: int | None = None, max_firing_fraction: float = 0.2,
                        seed: int = 0, progress: bool = True, command: str = "") -> dict:
    """Scan the corpus at the target's dictionary, run `circuits.tracing.agreement_study` and write its files;
    returns the summary (also written as summary.json)."""
    from circuits.features import scan_corpus
    from circuits.tracing import agreement_study, agreement_table, pad_token_id

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if target_hook not in dictionaries:
        raise ValueError(f"no dictionary at --target-hook {target_hook!r}; have: {', '.join(dictionaries)}")
    scan = scan_corpus(model, {target_hook: dictionaries[target_hook]}, corpus, n_contexts=scan_contexts,
                       context_size=context_size, seed=seed, progress=progress)
    study = agreement_study(model, dictionaries, scan, target_hook, n_targets=n_targets, depth=depth,
                            skip_layer=skip_layer, ig_steps=tuple(ig_steps), n_contexts=n_contexts, top_n=top_n,
                            top_k_edges=top_k_edges, max_candidates=max_candidates,
                            max_firing_fraction=max_firing_fraction, seed=seed, pad_id=pad_token_id(model),
                            progress=progress)
    causes: dict[str, int] = {}
    for failure in study.failures:
        key = f"{failure['receiver_kind']}, {failure['method']}, {failure['kind']}, {failure['cause']}"
        causes[key] = causes.get(key, 0) + 1
    summary = {"config": {"command": command, "target_hook": target_hook, "targets": n_targets, "depth": depth,
                          "skip_layer": skip_layer, "ig_steps": list(ig_steps), "n_contexts": n_contexts,
                          "scan_contexts": scan_contexts, "context_size": context_size, "top_n": top_n,
                          "top_k_edges": top_k_edges, "max_candidates": max_candidates,
                          "max_firing_fraction": max_firing_fraction, "seed": seed, "arms": study.arms},
               "table": agreement_table(study.rows, "target"), "edge_table": agreement_table(study.rows, "edge"),
               "failure_causes": dict(sorted(causes.items())), "targets": study.targets,
               "seconds": round(time.perf_counter() - started, 1)}
    write_rows(out / "agreement.csv", study.rows)
    write_rows(out / "failures.csv", study.failures)
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n", encoding="utf-8")
    summary["plot"] = str(plot_agreement(study.rows, out))
    return summary


def write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV of plain dict rows (the header from the first row; an empty file with no rows)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _finite(value):
    """JSON without NaN: nan -> None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def format_table(table: list[dict], title: str) -> str:
    """The distribution table as aligned text."""
    lines = [title, f"{'arm':<12}{'depth':>6}{'blocks':>7}  {'method':<12}{'n':>4}{'q1':>8}{'median':>8}{'q3':>8}"
                    f"{'min':>8}{'overlap':>9}{'failures':>10}{'switched on':>13}"]
    for row in table:
        lines.append(f"{row['arm']:<12}{row['depth']:>6}{row['blocks_apart']:>7}  {row['method']:<12}"
                     f"{row['receivers']:>4}{row['spearman_q1']:>8.3f}{row['spearman_median']:>8.3f}"
                     f"{row['spearman_q3']:>8.3f}{row['spearman_min']:>8.3f}{row['overlap_median']:>9.2f}"
                     f"{row['failures']:>10}{row['switched_on_failures']:>13}")
    return "\n".join(lines)


def _groups(rows: list[dict], receiver_kind: str) -> dict[str, dict[str, list[float]]]:
    """{group label: {method: Spearman values}} in table order."""
    groups: dict[str, dict[str, list[float]]] = {}
    ordered = sorted((row for row in rows if row["receiver_kind"] == receiver_kind),
                     key=lambda row: (row["arm"] != "consecutive", row["depth"]))
    for row in ordered:
        label = (f"depth {row['depth']}" if row["arm"] == "consecutive" else f"{row['arm']}: {row['blocks_apart']} "
                 f"blocks,\n1 dictionary")
        if not math.isnan(row["spearman"]):
            groups.setdefault(label, {}).setdefault(row["method"], []).append(row["spearman"])
    return groups


def plot_agreement(rows: list[dict], out: Path) -> Path:
    """agreement.png: per group (depth, skip arm) and method, the Spearman of every target (dots) over a box
    of quartiles; effects on the target left, edges right. agreement.svg by hand without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return _plot_svg(_groups(rows, "target"), out / "agreement.svg")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, kind, title in zip(axes, ("target", "edge"), ("effects on the target",
                                                             "edges (effects on the kept features one layer up)")):
        groups = _groups(rows, kind)
        methods = sorted({method for by_method in groups.values() for method in by_method},
                         key=lambda name: (name != "attribution", name))
        width = 0.8 / max(len(methods), 1)
        for number, method in enumerate(methods):
            positions, values = [], []
            for slot, by_method in enumerate(groups.values()):
                if method in by_method:
                    positions.append(slot + (number - (len(methods) - 1) / 2) * width)
                    values.append(by_method[method])
            if not values:
                continue
            color = f"C{number}"
            axis.boxplot(values, positions=positions, widths=width * 0.8, showfliers=False, patch_artist=True,
                         boxprops={"facecolor": color, "alpha": 0.25}, medianprops={"color": color})
            for position, group in zip(positions, values):
                offsets = [((index * 0.618) % 1 - 0.5) * width * 0.6 for index in range(len(group))]
                axis.scatter([position + offset for offset in offsets], group, s=10, color=color,
                             label=method if position == positions[0] else None)
        axis.set_xticks(range(len(groups)), list(groups))
        axis.set_title(title, fontsize=10)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("Spearman, attribution vs ablation\n(ablation's top n features)")
    figure.tight_layout()
    path = out / "agreement.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_svg(groups: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """A minimal strip chart of Spearman values (-1..1) per group and method, by hand."""
    width, height, top, bottom = 160 * max(len(groups), 1) + 80, 320, 20, 280
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<line x1="60" y1="{(top + bottom) / 2}" x2="{width}" y2="{(top + bottom) / 2}" stroke="grey"/>',
             '<text x="4" y="24">+1</text>', f'<text x="4" y="{bottom}">-1</text>']
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for slot, (label, by_method) in enumerate(groups.items()):
        left = 80 + 160 * slot
        parts.append(f'<text x="{left}" y="{height - 4}">{label.splitlines()[0]}</text>')
        for number, (method, values) in enumerate(sorted(by_method.items())):
            x = left + 30 * number
            for value in values:
                y = top + (1 - value) / 2 * (bottom - top)
                parts.append(f'<circle cx="{x}" cy="{y:.1f}" r="3" fill="{colors[number % 4]}"><title>{method} '
                             f'{value:.3f}</title></circle>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
