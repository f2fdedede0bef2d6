"""The erasure table: one row per (hook, method, k), its plot and the files a run writes.

Metrics, on the test split: removal = 1 - mean edited signed logit difference / mean clean one
(signed: correct token minus the other side's; 0 = untouched, 1 = no preference left, above 1 =
reversed), the same on the transfer split, the accuracy of a fresh logistic-regression probe
(fitted on the edited train activations at the final position, scored on the edited test
activations), the mean norm of the change over edited test-prompt positions, and the collateral
damage on held-out corpus text: mean KL(clean || edited) per token and the change in next-token
cross-entropy.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.assets import atomic_write_bytes, atomic_write_text
from sae.locking import folder_lock
from tasks.erasure.edits import Erasure
from tasks.erasure.selection import K_METHODS, METHODS, HookStatistics

COLUMNS = ["hook", "method", "k", "removal", "logit_diff", "concept_accuracy", "transfer_removal",
           "probe_accuracy", "probe_train_accuracy", "edit_norm", "relative_edit_norm", "kl", "ce_delta", "ce_loss"]


@dataclass
class PromptResults:
    """Per edit, over one split's prompts."""

    signed_diffs: torch.Tensor  # [n] edited signed logit differences
    final_activations: torch.Tensor | None  # [n, d] edited activations at the final position
    edit_norm: float  # mean |x' - x| over edited positions
    activation_norm: float  # mean |x| over the same positions


def probe_accuracies(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     seed: int = 0) -> tuple[float, float]:
    """(train, test) accuracy of a fresh standardised logistic-regression probe fitted on the train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    probe.fit(train_x.double().numpy(), train_y.numpy())
    return (float(probe.score(train_x.double().numpy(), train_y.numpy())),
            float(probe.score(test_x.double().numpy(), test_y.numpy())))


def removal(edited: torch.Tensor, clean: torch.Tensor) -> float:
    """1 - mean edited signed logit diff / mean clean one: 0 untouched, 1 no preference left, >1 reversed."""
    clean_mean = clean.mean().item()
    return 1.0 - edited.mean().item() / clean_mean if clean_mean != 0 else float("nan")


def result_rows(edits: list[Erasure], statistics: dict[str, HookStatistics], test: list[PromptResults],
                transfer: list[PromptResults] | None, text: tuple[float, list], *, test_labels: torch.Tensor,
                seed: int, device: torch.device | str = "cpu") -> list[dict]:
    """One table row per edit (see the module docstring for the metrics); `text` is evaluate_on_text's result."""
    clean_ce, per_edit = text
    clean_index = {edit.hook: index for index, edit in enumerate(edits) if edit.is_identity}
    rows = []
    for index, edit in enumerate(edits):
        clean = clean_index[edit.hook]
        stats = statistics[edit.hook]
        passthrough = None if stats.final_passthrough is None else stats.final_passthrough.to(device)
        with torch.no_grad():
            train_x = edit(stats.final_activations.to(device), passthrough).cpu()
        probe_train, probe_test = probe_accuracies(train_x, stats.labels, test[index].final_activations, test_labels,
                                                   seed)
        ce, kl = per_edit[index]
        rows.append({
            "hook": edit.hook, "method": edit.method, "k": edit.k,
            "removal": removal(test[index].signed_diffs, test[clean].signed_diffs),
            "logit_diff": test[index].signed_diffs.mean().item(),
            "concept_accuracy": (test[index].signed_diffs > 0).float().mean().item(),
            "transfer_removal": (removal(transfer[index].signed_diffs, transfer[clean].signed_diffs)
                                 if transfer is not None else float("nan")),
            "probe_accuracy": probe_test, "probe_train_accuracy": probe_train,
            "edit_norm": test[index].edit_norm,
            "relative_edit_norm": test[index].edit_norm / max(test[index].activation_norm, 1e-30),
            "kl": kl, "ce_delta": ce - clean_ce, "ce_loss": ce,
        })
    return rows


def erasure_table(rows: list[dict]):
    """The rows as a pandas DataFrame with the documented columns (k empty for LEACE, projection, clean)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def format_erasure_table(frame) -> str:
    return frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")


def plot_erasure(frame, path: Path, concept: str | None = None) -> Path:
    """Removal (left) and probe accuracy (right) against KL on held-out text, one row of panels per hook;
    the title names the concept, and k labels that would overlap are left out (the CSV has every k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(dict.fromkeys(frame["hook"]))
    figure, axes = plt.subplots(len(hooks), 2, figsize=(11, 4 * len(hooks) + 0.5), squeeze=False)
    labels: list[tuple] = []  # (axis, x, y, k) of every swept point
    markers = dict(zip(METHODS, "osv^DPXh"))
    for row, hook in zip(axes, hooks):
        part = frame[(frame["hook"] == hook) & (frame["method"] != "clean")]
        for axis, metric in zip(row, ("removal", "probe_accuracy")):
            for method, group in part.groupby("method", sort=False):
                group = group.sort_values("k")
                kl = group["kl"].clip(lower=1e-6)
                swept = method in K_METHODS
                axis.plot(kl, group[metric], marker=markers.get(method, "o"), label=method,
                          linestyle="-" if swept else "none", markersize=6 if swept else 9)
                if swept:
                    labels += [(axis, x, y, k) for x, y, k in zip(kl, group[metric], group["k"])]
            axis.set_xscale("log")
            axis.set_xlabel("KL(clean || edited) per token on held-out text")
            axis.set_ylabel({"removal": "removal (1 = logit difference gone)",
                             "probe_accuracy": "fresh probe accuracy (test split)"}[metric])
            axis.set_title(f"{hook}: {metric.replace('_', ' ')}")
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    named = f"'{concept}'" if concept else "the concept"
    figure.suptitle(f"Concept erasure of {named}: removal and fresh-probe accuracy against damage (KL on held-out "
                    "text); numbers by the points are k, the features edited", fontsize=10)
    figure.tight_layout()
    label_k_values(figure, labels)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def label_k_values(figure, labels: list[tuple]) -> list[tuple]:
    """Write k beside its point (alternately above and below it) unless the label would overlap one already
    written (lowest k first); the CSV has every k. Returns the (axis, text, box in pixels) written."""
    figure.canvas.draw()
    scale = figure.dpi / 72  # points -> pixels
    placed: dict = {}
    written = []
    for number, (axis, x, y, k) in enumerate(sorted(labels, key=lambda label: label[3])):
        text = str(int(k))
        px, py = axis.transData.transform((x, y))
        offset = (4, 4) if number % 2 == 0 else (4, -11)
        left, bottom = px + offset[0] * scale, py + offset[1] * scale
        box = (left - 2, bottom - 2, left + 5.5 * scale * len(text) + 2, bottom + 9 * scale)
        shown = placed.setdefault(axis, [])
        if not any(box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]
                   for other in shown):
            shown.append(box)
            written.append((axis, text, box))
            axis.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7, color="#333333")
    return written


def write_results(frame, out_dir: Path, settings: dict, progress: bool = True) -> dict[str, str]:
    """OUT/erasure.csv, OUT/erasure.png and OUT/erasure.json, each written atomically; prints the table."""
    paths = {"csv": out_dir / "erasure.csv", "plot": out_dir / "erasure.png", "json": out_dir / "erasure.json"}
    with folder_lock(out_dir):  # another run writing the same OUT is refused: never a table of one, json of another
        atomic_write_text(paths["csv"], frame.to_csv(index=False))
        plot_erasure(frame, paths["plot"], settings.get("concept"))
        atomic_write_text(paths["json"], json.dumps(settings, indent=2) + "\n")
    if progress:
        print(format_erasure_table(frame))
        for path in paths.values():
            print(f"wrote {path}")
    return {name: str(path) for name, path in paths.items()}
