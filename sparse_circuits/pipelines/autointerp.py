"""Autointerp of a dictionary and baseline bases (neurons, PCA, ICA) at one hook, with one client: per basis the
dashboard's one-pass collection over held-out text, random windows of the same text, `interpret_features`, and
the files (explanations.jsonl, scores.csv, summary.csv, autointerp.json), written into a temporary folder next
to --out and renamed into place at the end (a failed run leaves no half-written output)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RECORD = "autointerp.json"
SCORE_COLUMNS = ["simulation", "simulation_top", "control", "detection_accuracy", "detection_auc"]
BEFORE, AFTER = 12, 3  # tokens before and after the activating token in an excerpt (16 tokens in all)


@dataclass
class AutointerpSettings:
    n_features: int = 20
    indices: list[int] | None = None  # explicit dictionary features (the first basis only)
    tokens: int = 20_000  # held-out tokens scanned per basis
    context_size: int = 64
    n_windows: int = 64  # random 16-token windows encoded per basis
    batch_size: int = 8
    seed: int = 0
    method: str = "auto"
    control: bool = True
    excerpts: object = None  # tasks.autointerp.ExcerptSettings (default when None)


@dataclass
class AutointerpResult:
    out: Path
    rows: list[dict]
    summary: list[dict]
    timings: dict = field(default_factory=dict)


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """--out: absent, empty, or an earlier autointerp output (replaced whole at the end of the run)."""
    path = Path(path).expanduser()
    if path.is_dir() and any(path.iterdir()) and not (path / RECORD).is_file():
        raise ValueError(f"{flag} {path} is a non-empty folder without {RECORD}; autointerp replaces its output "
                         "folder whole, so give a new or empty folder (or an earlier autointerp output)")


def choose_features(eligible: list[int], features, n: int, seed: int, indices: list[int] | None) -> list[int]:
    """Rows to interpret: the rows of `indices` when given, else `n` eligible rows drawn at random (seeded)."""
    if indices is not None:
        where = {int(feature): row for row, feature in enumerate(features.tolist())}
        return [where[index] for index in indices]
    return sorted(random.Random(seed).sample(eligible, min(n, len(eligible))))


def interpret_basis(model, name: str, dictionary, contexts, windows, client, settings: AutointerpSettings,
                    indices: list[int] | None, progress: bool = True) -> list[dict]:
    """Rows (one per feature) of one basis."""
    import torch

    from circuits.dashboard import CollectionSettings, collect_feature_statistics
    from circuits.hooks import check_width
    from sae.progress import status
    from tasks.autointerp import (ExcerptSettings, TokenTexts, eligible_rows, feature_excerpts, interpret_features,
                                  random_window_codes)

    check_width(model, dictionary.cfg.hook_name, dictionary.cfg.d_in)
    excerpt_settings = settings.excerpts or ExcerptSettings()
    top_k = 2 * max(excerpt_settings.n_explain, excerpt_settings.n_score_top)
    collection = CollectionSettings(top_k=top_k, reservoir=2 * (excerpt_settings.n_quantile + excerpt_settings.n_detect),
                                    before=BEFORE, after=AFTER, seed=settings.seed)
    statistics = collect_feature_statistics(model, dictionary, contexts, settings=collection,
                                            batch_size=settings.batch_size, progress=progress)
    eligible = eligible_rows(statistics, excerpt_settings)
    rows = choose_features(eligible, statistics.features, settings.n_features, settings.seed, indices)
    status(f"autointerp: {name}: {len(eligible):,} of {dictionary.n_features:,} features fire in enough contexts; "
           f"interpreting {len(rows)}", enabled=progress)
    chosen = statistics.features[torch.tensor(rows, dtype=torch.long)] if rows else torch.zeros(0, dtype=torch.long)
    codes = random_window_codes(model, dictionary, windows, chosen, settings.batch_size)
    texts = TokenTexts(model.tokenizer)
    excerpts = [feature_excerpts(statistics, row, windows, codes, column, texts, excerpt_settings)
                for column, row in enumerate(rows)]
    for row, each in zip(rows, excerpts):
        if row not in eligible:
            each.notes.append("fires in too few held-out contexts for the full excerpt sets")
    results = interpret_features(client, excerpts, method=settings.method, seed=settings.seed,
                                 control=settings.control, progress=progress)
    density = statistics.density.tolist()
    return [{"basis": name, **result.row(), "density": density[row],
             "shown": [excerpt.marked() for excerpt in each.explain_top + each.explain_quantiles]}
            for row, each, result in zip(rows, excerpts, results)]


def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    """Per basis: features, explained, and each score's mean with a 95% bootstrap interval over features."""
    from tasks.autointerp import mean_with_interval

    summary = []
    for basis in dict.fromkeys(row["basis"] for row in rows):
        members = [row for row in rows if row["basis"] == basis]
        entry = {"basis": basis, "features": len(members),
                 "explained": sum(bool(row["explanation"]) for row in members),
                 "failures": sum(bool(row["failures"]) for row in members)}
        for column in SCORE_COLUMNS:
            mean, low, high = mean_with_interval([row[column] for row in members], seed=seed)
            entry.update({column: mean, f"{column}_low": low, f"{column}_high": high})
        summary.append(entry)
    return summary


def format_summary(summary: list[dict]) -> str:
    """The comparison table: one row per basis, mean [95% CI] of each score."""
    def shown(entry, column):
        if math.isnan(entry[column]):
            return "n/a"
        return f"{entry[column]:.3f} [{entry[column + '_low']:.3f}, {entry[column + '_high']:.3f}]"

    header = ["basis", "features", "explained"] + SCORE_COLUMNS
    lines = [header] + [[entry["basis"], str(entry["features"]), str(entry["explained"])]
                        + [shown(entry, column) for column in SCORE_COLUMNS] for entry in summary]
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def write_outputs(out: Path, rows: list[dict], summary: list[dict], record: dict) -> None:
    """Every file into a temporary sibling folder, then renamed onto `out` (an earlier output replaced whole)."""
    import pandas as pd

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with open(staging / "explanations.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps({key: row[key] for key in ("basis", "feature", "explanation", "response",
                                                                    "failures", "notes", "shown")}) + "\n")
        columns = ["basis", "feature", "density", "explanation"] + SCORE_COLUMNS + ["n_scored_excerpts", "failures"]
        pd.DataFrame([{key: row[key] for key in columns} for row in rows], columns=columns).to_csv(
            staging / "scores.csv", index=False)
        pd.DataFrame(summary).to_csv(staging / "summary.csv", index=False)
        (staging / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, trash / "old")
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_autointerp(model, corpus, bases: dict, client, out: Path, settings: AutointerpSettings, *,
                   record: dict | None = None, progress: bool = True) -> AutointerpResult:
    """Interpret every basis {name: dictionary or a callable (contexts) -> dictionary} and write the outputs."""
    from sae.corpus import tokenize_contexts
    from sparse_circuits.pipelines.dashboard import held_out_tokens

    check_output_folder(out)
    timings, started = {}, time.perf_counter()
    contexts = held_out_tokens(model, corpus, settings.tokens, settings.context_size, settings.seed)
    windows = tokenize_contexts(corpus, model.tokenizer, BEFORE + AFTER + 2, settings.n_windows, split="eval",
                                seed=settings.seed + 1)
    rows = []
    for number, (name, dictionary) in enumerate(bases.items()):
        begun = time.perf_counter()
        if callable(dictionary) and not hasattr(dictionary, "cfg"):
            dictionary = dictionary(contexts)
        indices = settings.indices if number == 0 else None
        rows += interpret_basis(model, name, dictionary, contexts, windows, client, settings, indices, progress)
        timings[name] = time.perf_counter() - begun
    timings["total"] = time.perf_counter() - started
    summary = summarize(rows, settings.seed)
    record = {**(record or {}), "client": client.name, "settings": {key: value for key, value in vars(settings).items()
                                                                     if key != "excerpts"},
              "excerpts": vars(settings.excerpts) if settings.excerpts else None, "timings": timings,
              "cache": {"hits": getattr(client, "hits", None), "misses": getattr(client, "misses", None)}}
    write_outputs(out, rows, summary, record)
    return AutointerpResult(Path(out), rows, summary, timings)
