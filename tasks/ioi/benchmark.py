"""The IOI feature-patching benchmark of Cunningham et al. (2024, Sec. 4), for any set of dictionaries.

Question: how few features of a decomposition, patched from the counterfactual run (IO name replaced
by a third name) into the clean run at one hook point, move the model's output to the counterfactual
one? The metric is KL(patched || counterfactual) of the next-token distribution at the final position,
mean over prompts (the IO - S logit difference is reported beside it). One feature set is shared by
all prompts, and a feature is patched at every position the engine does not pass through
(circuits.engine.passthrough_positions: BOS, and massive activations, which IOI prompts do not have in
practice); positions before the IO name are the same in both runs, so in effect every position from the
IO name on. The error term stays at its clean value: an edit is a sum of feature directions only (the
complete baselines have no error; an SAE's error caps how low its KL can go). With `patch_error` the
error term is patched in every set too, and only features are counted. `feature_sets="per_prompt"`
gives each prompt its own set instead. The search per dictionary is tasks/ioi/search.py (`search=
"attribution"`, the default) or the paper's greedy removal, tasks/ioi/greedy.py (`search="greedy"`).
With `drop_failed`, prompts the model gets wrong (clean logit difference IO - S <= 0) are dropped before
anything is measured, and counted in details.json ("dropped_prompts").

Outputs: curves.csv (every evaluated set), summary.csv (per dictionary: features to reach the KL
target, area under the curve, ...; tasks/ioi/curves.py), report.csv (KL at 8/32/128/512 features, features
to the target and to 75% of the basis's own reduction, with bootstrap intervals; tasks/ioi/report.py), curves.png (KL against features patched and
against edit size), details.json (settings, clean performance, timings by phase, attribution checks, and the
provenance: templates, names, places, objects, seed, model and dictionary sha256s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from circuits.engine import CachedRun, FeaturePatcher, check_dictionary_fits
from circuits.metrics import KLTo, LogitDifference
from sae.assets import atomic_write_bytes, atomic_write_text
from sae.dictionary import Dictionary
from sae.progress import status
from tasks.ioi.baselines import BASELINE_NAMES
from tasks.ioi.curves import curve_rows, format_summary, plot_curves, summary_table
from tasks.ioi.data import TEMPLATES, IOIDataError, generate_ioi_prompts, ioi_words, tokenize_ioi
from tasks.ioi.greedy import greedy_search
from tasks.ioi.report import format_report, report_table
from tasks.ioi.search import (FEATURE_SETS, SEARCHES, DictionaryCurve, PhaseTimes, SearchSettings,
                              search_dictionary)

OUTPUT_FILES = ("curves.csv", "summary.csv", "report.csv", "curves.png", "details.json")


@dataclass
class IOIBenchmarkResult:
    """The tables and the paths of what the benchmark wrote."""

    curves: pd.DataFrame
    summary: pd.DataFrame
    curves_csv: Path
    summary_csv: Path
    curves_png: Path
    details_json: Path
    report: pd.DataFrame
    report_csv: Path
    kl_target: float
    clean_performance: dict
    timings: dict[str, float]  # seconds per phase, summed over dictionaries
    per_dictionary: dict[str, dict] = field(default_factory=dict)  # timings and exact evaluations of each

    def paths(self) -> dict[str, str]:
        return {"curves": str(self.curves_csv), "summary": str(self.summary_csv), "report": str(self.report_csv),
                "plot": str(self.curves_png), "details": str(self.details_json)}


def check_dictionaries(model, hook: str, dictionaries: dict[str, Dictionary]) -> None:
    """Every dictionary must fit the hook (its width); checked before any prompt is run."""
    if not dictionaries:
        raise ValueError("no dictionaries to benchmark; pass at least one (an SAE, or baselines)")
    for name, dictionary in dictionaries.items():
        try:
            check_dictionary_fits(model, hook, dictionary)
        except ValueError as error:
            raise ValueError(f"dictionary '{name}': {error}") from error


def run_ioi_benchmark(model, dictionaries: dict[str, Dictionary], hook: str, n_prompts: int, out_dir: str | Path,
                      *, seed: int = 0, progress: bool = True, settings: SearchSettings | None = None,
                      confirm: Iterable[str] | None = None, names: Sequence[str] | None = None,
                      templates: Sequence[str] | None = None, drop_failed: bool = False) -> IOIBenchmarkResult:
    """Run the benchmark for `dictionaries` ({name: dictionary}) at `hook`; write and return the results.

    `confirm`: the dictionaries whose attribution is checked against exact patching (default: those not
    named like a baseline, or the first). `names` / `templates`: custom IOI word lists and templates.
    `drop_failed`: leave out the prompts the model gets wrong (module docstring).
    """
    settings = settings or SearchSettings()
    if settings.feature_sets not in FEATURE_SETS:
        raise ValueError(f"feature_sets must be 'shared' or 'per_prompt', got {settings.feature_sets!r}")
    if settings.search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {settings.search!r}")
    if settings.search == "greedy" and settings.feature_sets != "shared":
        raise ValueError("the greedy search finds one set shared by all prompts; per_prompt sets need "
                         "search='attribution'")
    phases = PhaseTimes()
    check_dictionaries(model, hook, dictionaries)
    with phases("prompts"):
        prompts = generate_ioi_prompts(model.tokenizer, n_prompts, seed=seed, templates=templates, names=names)
        words = ioi_words(model.tokenizer, names)
        batch = tokenize_ioi(model, prompts)
        dropped = failed_prompts(model, batch) if drop_failed else []
        if dropped:
            status(f"ioi: the model gets {len(dropped)} of {len(prompts)} prompts wrong (clean logit difference "
                   "IO - S <= 0): dropped", progress)
            if len(dropped) == len(prompts):
                raise IOIDataError(f"the model gets all {len(prompts)} IOI prompts wrong (clean logit difference "
                                   "IO - S <= 0 on each): nothing to patch; check the model, names and templates")
            prompts = [prompt for index, prompt in enumerate(prompts) if index not in set(dropped)]
            batch = tokenize_ioi(model, prompts)
    with phases("clean_counterfactual_runs"):
        run = CachedRun(model, hook, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens,
                        progress=progress)
        performance = _performance(run, batch)
    metrics = {"kl": KLTo(run.counterfactual_logits), "logit_diff": LogitDifference(batch.io_tokens, batch.s_tokens)}
    unpatched_per_prompt = metrics["kl"](run.clean_logits, torch.arange(len(batch))).float()
    kl_unpatched = unpatched_per_prompt.mean().item()
    target = settings.kl_target if settings.kl_target is not None else settings.kl_target_fraction * kl_unpatched
    confirm = set(confirm) if confirm is not None else _default_confirm(dictionaries)
    curves: list[DictionaryCurve] = []
    for number, (name, dictionary) in enumerate(dictionaries.items(), start=1):
        label = f"ioi [{number}/{len(dictionaries)}] {name}"
        status(f"{label}: encoding and attribution ({dictionary.n_features} features) ...", progress)
        with phases("encode"):
            patcher = FeaturePatcher(run, dictionary)
        if settings.search == "greedy":
            curve = greedy_search(name, patcher, metrics, settings, progress=progress, label=label)
        else:
            curve = search_dictionary(name, patcher, metrics, target, settings, confirm=name in confirm,
                                      progress=progress, label=label)
        curve.points.insert(0, _unpatched_point(name, kl_unpatched, performance["mean_logit_diff"]))
        for phase, seconds in curve.timings.items():
            phases.add(phase, seconds)
        curves.append(curve)
    from circuits.models import model_name_of, provenance

    header = {"model": model_name_of(model), "hook": hook, "n_prompts": len(batch), "seed": seed,
              "kl_target": target, "kl_unpatched": kl_unpatched, "clean_performance": performance,
              "search": settings.search, "settings": settings.__dict__,
              "dropped_prompts": {"count": len(dropped), "of": n_prompts, "rule": "clean logit difference IO - S <= 0",
                                  "enabled": drop_failed, "indices": dropped},
              "provenance": provenance(model, dictionaries, seed, templates=list(TEMPLATES if templates is None
                                                                                 else templates), **words)}
    with phases("outputs"):
        report = report_table(curves, unpatched_per_prompt, target_fraction=settings.kl_target_fraction,
                              kl_target=settings.kl_target, resamples=settings.bootstrap, seed=settings.seed)
        result = write_outputs(Path(out_dir), curves, header, phases, report)
    if progress:
        print(format_summary(result.summary))
        print(format_report(result.report))
    return result


def failed_prompts(model, batch) -> list[int]:
    """Indices of the prompts whose clean logit difference IO - S is <= 0 (the model gets IOI wrong)."""
    from tasks.ioi.data import final_position_logits, io_logit_diff

    logits = final_position_logits(model, batch.clean_tokens, batch.final_positions)
    return (io_logit_diff(logits, batch) <= 0).nonzero().squeeze(1).tolist()


def _default_confirm(dictionaries: dict[str, Dictionary]) -> set[str]:
    chosen = {name for name in dictionaries if name not in BASELINE_NAMES}
    return chosen or {next(iter(dictionaries))}


def _unpatched_point(name: str, kl: float, logit_diff: float) -> dict:
    return {"dictionary": name, "method": "unpatched", "n_features": 0, "edit_norm": 0.0, "kl": kl,
            "logit_diff": logit_diff, "threshold": float("nan"), "members": []}


def _performance(run: CachedRun, batch) -> dict:
    """IOI performance of the clean and counterfactual runs (from the logits already computed)."""
    rows = torch.arange(len(batch))
    clean = LogitDifference(batch.io_tokens, batch.s_tokens)(run.clean_logits, rows)
    counterfactual = LogitDifference(batch.io_tokens, batch.s_tokens)(run.counterfactual_logits, rows)
    return {"n_prompts": len(batch), "accuracy": (clean > 0).float().mean().item(),
            "mean_logit_diff": clean.mean().item(), "counterfactual_mean_logit_diff": counterfactual.mean().item(),
            "run_mode": run.mode}


def write_outputs(out_dir: Path, curves: list[DictionaryCurve], header: dict, phases: PhaseTimes,
                  report: pd.DataFrame) -> IOIBenchmarkResult:
    """curves.csv, summary.csv, report.csv, curves.png and details.json under `out_dir`.

    header: model, hook, n_prompts, seed, kl_target, kl_unpatched, clean_performance, settings
    (details.json starts with it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target, kl_unpatched = header["kl_target"], header["kl_unpatched"]
    curves_frame = curve_rows(curves)
    summary = summary_table(curves, target, kl_unpatched)
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    atomic_write_text(paths["curves.csv"], curves_frame.to_csv(index=False))
    atomic_write_text(paths["summary.csv"], summary.to_csv(index=False))
    atomic_write_text(paths["report.csv"], report.to_csv(index=False))
    title = (f"IOI feature patching ({header.get('search', 'attribution')} search): {header['model']}, "
             f"{header['hook']}, {header['n_prompts']} prompts")
    atomic_write_bytes(paths["curves.png"], plot_curves(curves_frame, target, kl_unpatched, title))
    details = {
        **header, "timings_seconds": phases.seconds,
        "dictionaries": {curve.name: {"timings_seconds": curve.timings, "exact_evaluations": curve.evaluations,
                                      "error_attribution_kl": curve.error_attribution_kl,
                                      "confirmation": curve.confirmation,
                                      "smallest_set_reaching_target": _smallest_members(curve, target),
                                      "top_features": (curve.order or [])[:20], "search": curve.search,
                                      "stopped": curve.stopped, "search_details": curve.details}
                         for curve in curves},
        "report": report.to_dict("records"),
    }
    atomic_write_text(paths["details.json"], json.dumps(details, indent=2, default=float) + "\n")
    per_dictionary = {curve.name: {"timings_seconds": curve.timings, "exact_evaluations": curve.evaluations}
                      for curve in curves}
    return IOIBenchmarkResult(curves_frame, summary, paths["curves.csv"], paths["summary.csv"], paths["curves.png"],
                              paths["details.json"], report, paths["report.csv"], target, header["clean_performance"],
                              dict(phases.seconds), per_dictionary)


def _smallest_members(curve: DictionaryCurve, target: float) -> list[int]:
    """Members of the first evaluated set with the fewest features reaching the target (details.json)."""
    reached = [point for point in curve.points if point["kl"] <= target]
    return list(map(int, min(reached, key=lambda point: point["n_features"])["members"])) if reached else []
