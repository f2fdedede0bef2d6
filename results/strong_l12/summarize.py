"""Collect the strong-dictionary runs' eval.json files into a table (CSV + markdown) and a tokens-seen curve.

    python results/strong_l12/summarize.py RUNS_DIR results/strong_l12

RUNS_DIR holds one entry per dictionary, named <label>_<tokens seen> (topk_10M, relu-l1-0.0025_10M, ...): a
dictionary folder (or a link to one) with cfg.json and eval.json from `sparse-circuits evaluate`, or a run's
--out folder holding it under blocks.12.hook_resid_post/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARCH_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "relu": "ReLU+L1", "topkbf16": "TopK (bf16 training)"}
COLUMNS = ["dictionary", "tokens_seen", "l0", "fvu_all_tokens", "fvu", "ce_increase", "kl", "ce_loss_recovered",
           "dead_fraction", "sparsity"]


def tokens_seen(name: str) -> float:
    return float(name.rsplit("_", 1)[1].rstrip("M")) * 1e6


def row(run: Path) -> dict | None:
    folder = run if (run / "cfg.json").exists() else run / "blocks.12.hook_resid_post"
    if not (folder / "eval.json").exists():
        return None
    evaluation = json.loads((folder / "eval.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())
    arch = run.name.rsplit("_", 1)[0]
    sparsity = f"k={cfg['k']}" if cfg.get("k") else f"alpha={cfg.get('l1_coefficient'):.3g}"
    name = ARCH_NAMES.get(arch, "ReLU+L1 " + arch.split("-")[-1] if arch.startswith("relu-l1") else arch)
    return {"dictionary": name, "tokens_seen": tokens_seen(run.name),
            "l0": evaluation["l0"], "fvu_all_tokens": evaluation["fvu_all_tokens"], "fvu": evaluation["fvu"],
            "ce_increase": evaluation["ce_loss_spliced"] - evaluation["ce_loss_clean"], "kl": evaluation["kl"],
            "ce_loss_recovered": evaluation["ce_loss_recovered"], "dead_fraction": evaluation["dead_fraction"],
            "sparsity": sparsity, "eval_tokens": evaluation["tokens"]}


def markdown(frame) -> str:
    """A GitHub table of `frame`, numbers to 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in values] for values in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def main(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = [r for r in (row(run) for run in sorted(runs.iterdir()) if run.is_dir() and "_" in run.name) if r]
    frame = pd.DataFrame(rows).sort_values(["dictionary", "tokens_seen"])
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "strong_l12.csv", index=False)
    table = frame[COLUMNS].copy()
    table["tokens_seen"] = [f"{t / 1e6:g}M" for t in table["tokens_seen"]]
    (out / "strong_l12.md").write_text(markdown(table))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    figure, axes = plt.subplots(1, 4, figsize=(17, 4))
    for name, group in frame.groupby("dictionary"):
        for axis, metric, label in zip(axes, ("ce_increase", "kl", "fvu", "l0"),
                                       ("CE increase (nats/token)", "KL per token (nats)", "FVU, typical tokens (massive ones excluded)", "L0")):
            axis.plot(group["tokens_seen"], group[metric], marker="o", label=name)
            axis.set_xscale("log")
            axis.set_xlabel("training tokens seen")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("SmolLM2-135M blocks.12.hook_resid_post, 2,304 features, spliced on held-out text: returns "
                    "against tokens seen", fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "strong_l12_curve.png", dpi=110)
    print(f"wrote {out / 'strong_l12.csv'}, {out / 'strong_l12.md'}, {out / 'strong_l12_curve.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
