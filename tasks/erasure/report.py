"""The erasure table: one row per (position setting, hook, method, k or strength), the comparison at equal
removal, the plot and the files a run writes.

Metrics, on the test split: removal = 1 - mean edited signed logit difference / mean clean one
(signed: correct token minus the other side's; 0 = untouched, 1 = no preference left, above 1 =
reversed): the *behaviour*; the same on the transfer split (pronouns for gender); the accuracy of a
fresh logistic-regression probe fitted on the edited train activations and scored on the edited test
activations, at the final position (`probe_accuracy`) and at the subject's name (`probe_accuracy_name`):
the *concept* (0.5 = gone from that position at this hook); the mean norm of the change over the applied
test-prompt positions, and the collateral damage on held-out corpus text: mean KL(clean || edited) per
token and the change in next-token cross-entropy.

`equal_removal_table` compares methods where they remove the same amount of behaviour: along each
method's curve (k for feature removal, strength for LEACE and the projection, from the clean model at
removal 0), the first segment that crosses a removal level is interpolated linearly; a method that never
reaches the level has no row there.
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

COLUMNS = ["positions", "hook", "method", "k", "strength", "removal", "logit_diff", "concept_accuracy",
           "transfer_removal", "probe_accuracy", "probe_accuracy_name", "probe_train_accuracy", "edit_norm",
           "relative_edit_norm", "kl", "ce_delta", "ce_loss"]
DEFAULT_REMOVAL_LEVELS = (0.25, 0.5, 0.75, 0.9)
INTERPOLATED = ("kl", "ce_delta", "transfer_removal", "probe_accuracy", "probe_accuracy_name", "relative_edit_norm")
EDITED_AT = {"none": (), "name": ("name",), "final": ("final",), "all": ("name", "final")}  # where x is edited


@dataclass
class PromptResults:
    """Per edit, over one split's prompts."""

    signed_diffs: torch.Tensor  # [n] edited signed logit differences
    final_activations: torch.Tensor | None  # [n, d] edited activations at the final position
    edit_norm: float  # mean |x' - x| over edited positions
    activation_norm: float  # mean |x| over the same positions
    name_activations: torch.Tensor | None = None  # [n, d] edited activations at the subject's name


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


def _probe_train_inputs(edit: Erasure, stats: HookStatistics, where: str, device) -> torch.Tensor | None:
    """The train split's activations at the final or name position as `edit` leaves them at its hook: edited
    out of context where its setting applies it there (the hook's own position), clean elsewhere."""
    x = stats.final_activations if where == "final" else stats.name_activations
    passthrough = stats.final_passthrough if where == "final" else stats.name_passthrough
    if x is None or where not in EDITED_AT[edit.setting]:
        return x
    with torch.no_grad():
        return edit(x.to(device), None if passthrough is None else passthrough.to(device)).cpu()


def result_rows(edits: list[Erasure], statistics: dict[str, dict[str, HookStatistics]], test: list[PromptResults],
                transfer: list[PromptResults] | None, text: tuple[float, list], *, test_labels: torch.Tensor,
                seed: int, device: torch.device | str = "cpu") -> list[dict]:
    """One table row per edit (see the module docstring for the metrics); `statistics` is {setting: {hook:
    HookStatistics}}; `text` is evaluate_on_text's result; the clean rows have positions "none"."""
    clean_ce, per_edit = text
    clean_index = {edit.hook: index for index, edit in enumerate(edits) if edit.is_identity}
    any_setting = next(iter(statistics.values()))
    rows = []
    for index, edit in enumerate(edits):
        clean = clean_index[edit.hook]
        stats = statistics.get(edit.setting, any_setting)[edit.hook]
        probes = {}
        for where, edited_test in (("final", test[index].final_activations), ("name", test[index].name_activations)):
            train_x = _probe_train_inputs(edit, stats, where, device)
            probes[where] = ((float("nan"), float("nan")) if train_x is None or edited_test is None else
                             probe_accuracies(train_x, stats.labels, edited_test, test_labels, seed))
        ce, kl = per_edit[index]
        rows.append({
            "positions": edit.setting, "hook": edit.hook, "method": edit.method, "k": edit.k,
            "strength": edit.strength,
            "removal": removal(test[index].signed_diffs, test[clean].signed_diffs),
            "logit_diff": test[index].signed_diffs.mean().item(),
            "concept_accuracy": (test[index].signed_diffs > 0).float().mean().item(),
            "transfer_removal": (removal(transfer[index].signed_diffs, transfer[clean].signed_diffs)
                                 if transfer is not None else float("nan")),
            "probe_accuracy": probes["final"][1], "probe_accuracy_name": probes["name"][1],
            "probe_train_accuracy": probes["final"][0],
            "edit_norm": test[index].edit_norm,
            "relative_edit_norm": test[index].edit_norm / max(test[index].activation_norm, 1e-30),
            "kl": kl, "ce_delta": ce - clean_ce, "ce_loss": ce,
        })
    return rows


def equal_removal_table(frame, levels=DEFAULT_REMOVAL_LEVELS):
    """Each (setting, hook, method) curve, from the clean row (removal 0) through k or strength in increasing
    order, interpolated at each removal level where it first crosses it: one row per method and level reached,
    with the interpolated `INTERPOLATED` columns and the k or strength bracket it fell between."""
    import pandas as pd

    out = []
    cleans = frame[frame["method"] == "clean"].set_index("hook")
    edited = frame[frame["method"] != "clean"]
    for (setting, hook, method), group in edited.groupby(["positions", "hook", "method"], sort=False):
        group = group.assign(size=group["k"].astype("float64").fillna(group["strength"])).sort_values("size")
        clean = cleans.loc[hook]
        points = [(0.0, 0.0, {name: clean[name] for name in INTERPOLATED})]
        points += [(row["size"], row["removal"], {name: row[name] for name in INTERPOLATED})
                   for _, row in group.iterrows()]
        for level in levels:
            for (size0, r0, v0), (size1, r1, v1) in zip(points, points[1:]):
                if min(r0, r1) <= level <= max(r0, r1) and r0 != r1:
                    t = (level - r0) / (r1 - r0)
                    values = {name: v0[name] + t * (v1[name] - v0[name]) for name in INTERPOLATED}
                    out.append({"positions": setting, "hook": hook, "method": method, "removal": level,
                                "between": f"{size0:g}-{size1:g}", **values})
                    break
    return pd.DataFrame(out, columns=["positions", "hook", "method", "removal", "between", *INTERPOLATED])


def erasure_table(rows: list[dict]):
    """The rows as a pandas DataFrame with the documented columns (k empty for LEACE, projection, clean)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def format_erasure_table(frame) -> str:
    return frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")


def plot_erasure(frame, path: Path, concept: str | None = None) -> Path:
    """Removal (left) and fresh-probe accuracy (right: at the name where the setting edits it, else at the final
    position) against KL on held-out text, one row of panels per (position setting, hook); every method is a
    curve (k for the feature methods, strength for LEACE and the projection); k labels that would overlap are
    left out (the CSV has every k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edited = frame[frame["method"] != "clean"]
    panels = list(dict.fromkeys(zip(edited["positions"], edited["hook"])))
    figure, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels) + 0.5), squeeze=False)
    labels: list[tuple] = []  # (axis, x, y, k) of every swept point
    markers = dict(zip(METHODS, "osv^DP"))
    for row, (setting, hook) in zip(axes, panels):
        part = edited[(edited["hook"] == hook) & (edited["positions"] == setting)]
        probe = "probe_accuracy_name" if setting in ("name", "all") and part["probe_accuracy_name"].notna().any() \
            else "probe_accuracy"
        for axis, metric in zip(row, ("removal", probe)):
            for method, group in part.groupby("method", sort=False):
                swept = method in K_METHODS
                group = group.sort_values("k" if swept else "strength")
                kl = group["kl"].clip(lower=1e-6)
                axis.plot(kl, group[metric], marker=markers.get(method, "o"), label=method, linestyle="-")
                if swept:
                    labels += [(axis, x, y, k) for x, y, k in zip(kl, group[metric], group["k"])]
            axis.set_xscale("log")
            axis.set_xlabel("KL(clean || edited) per token on held-out text")
            axis.set_ylabel({"removal": "removal (1 = logit difference gone)",
                             "probe_accuracy": "fresh probe accuracy, final position",
                             "probe_accuracy_name": "fresh probe accuracy, name position"}[metric])
            axis.set_title(f"{setting} positions, {hook}: {'behaviour' if metric == 'removal' else 'concept'}")
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


def write_results(frame, out_dir: Path, settings: dict, progress: bool = True,
                  removal_levels=DEFAULT_REMOVAL_LEVELS) -> dict[str, str]:
    """OUT/erasure.csv, OUT/erasure_equal_removal.csv, OUT/erasure.png and OUT/erasure.json, each written
    atomically; prints both tables."""
    paths = {"csv": out_dir / "erasure.csv", "equal_removal": out_dir / "erasure_equal_removal.csv",
             "plot": out_dir / "erasure.png", "json": out_dir / "erasure.json"}
    equal = equal_removal_table(frame, removal_levels)
    with folder_lock(out_dir):  # another run writing the same OUT is refused: never a table of one, json of another
        atomic_write_text(paths["csv"], frame.to_csv(index=False))
        atomic_write_text(paths["equal_removal"], equal.to_csv(index=False))
        plot_erasure(frame, paths["plot"], settings.get("concept"))
        atomic_write_text(paths["json"], json.dumps(settings, indent=2) + "\n")
    if progress:
        print(format_erasure_table(frame))
        print("\nat equal removal of the behaviour (interpolated along each method's curve):")
        print(format_erasure_table(equal) if len(equal) else "  no method reached any removal level")
        for path in paths.values():
            print(f"wrote {path}")
    return {name: str(path) for name, path in paths.items()}
