"""The paper's IOI search (`search="greedy"`, tasks/ioi/greedy.py): the batched search against a plain
one-at-a-time reference written here, the threshold sweep's behaviour, the budget stop, the report, the CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from circuits.engine import CachedRun, FeaturePatcher
from circuits.metrics import KLTo, LogitDifference
from sae.io import save_dictionary
from tasks.ioi import SearchSettings, generate_ioi_prompts, greedy_search, run_ioi_benchmark, tokenize_ioi
from tasks.ioi.greedy import has_error_term, paper_thresholds
from tasks.ioi.report import report_row, statistics

HOOK = "blocks.2.hook_resid_post"
THRESHOLDS = (3e-7, 1e-6, 3e-6, 1e-5)  # the tiny model's unpatched KL is 2e-4


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """A patcher for a random 64-feature SAE on 6 prompts (41 candidates), and the metrics."""
    from tests.conftest import make_random_sae

    batch = tokenize_ioi(tiny_llama, generate_ioi_prompts(tiny_llama.tokenizer, 6, seed=0))
    run = CachedRun(tiny_llama, HOOK, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens)
    metrics = {"kl": KLTo(run.counterfactual_logits), "logit_diff": LogitDifference(batch.io_tokens, batch.s_tokens)}
    return FeaturePatcher(run, make_random_sae(d_sae=64, hook=HOOK, seed=0)), metrics


def kl_of(patcher, metrics, members, error=False) -> float:
    return patcher.evaluate([list(members)], metrics, include_error=error).values["kl"][0].item()


def sequential_reference(patcher, metrics, start, order, thresholds, max_trials=None):
    """The paper's loop, literally: one exact evaluation per trial, the state carried across thresholds."""
    members, trials = list(start), 0
    kl = kl_of(patcher, metrics, members)
    states = []
    for threshold in sorted(thresholds):
        for feature in [f for f in order if f in members]:
            if max_trials is not None and trials >= max_trials:
                return members, states, trials
            trials += 1
            without = [f for f in members if f != feature]
            value = kl_of(patcher, metrics, without)
            if value - kl < threshold:
                members, kl = without, value
        states.append((threshold, sorted(members), kl))
    return members, states, trials


def visiting_order(patcher, metrics, curve) -> list[int]:
    """The order the greedy search visits in (least helpful first), rebuilt from its attribution."""
    from tasks.ioi.search import order_scores

    candidates = patcher.candidates().nonzero().squeeze(1).tolist()
    scores = order_scores(patcher, metrics, curve.attribution_kl, (0.0, 0.5))
    return sorted(candidates, key=lambda f: (scores[f], f))[::-1]


@pytest.mark.parametrize("speculation", [1, 3, 8])
def test_batched_greedy_equals_the_sequential_procedure(setup, speculation):
    patcher, metrics = setup
    settings = SearchSettings(search="greedy", thresholds=THRESHOLDS, speculation=speculation)
    curve = greedy_search("sae", patcher, metrics, settings)
    start = patcher.candidates().nonzero().squeeze(1).tolist()
    assert len(start) >= 10  # enough candidates for the test to mean something
    members, states, trials = sequential_reference(patcher, metrics, start, visiting_order(patcher, metrics, curve),
                                                   THRESHOLDS)
    assert 0 < len(members) < len(start)  # the sweep removed some features and kept some
    assert sorted(curve.details["final_members"]) == sorted(members)
    passes = curve.details["passes"]
    assert [(p["threshold"], p["n_members"]) for p in passes] == [(t, len(m)) for t, m, _ in states]
    for point, (_, _, kl) in zip(passes, states):
        assert point["kl"] == pytest.approx(kl, abs=1e-6)
    assert curve.details["trials"] == trials
    if speculation == 1:
        assert curve.details["wasted_speculative_evaluations"] == 0
    # every exact evaluation is counted, wasted ones included
    assert curve.evaluations == 1 + curve.details["trials"] + curve.details["wasted_speculative_evaluations"]


def test_thresholds_give_nested_sets_with_falling_counts_and_rising_kl(setup):
    patcher, metrics = setup
    curve = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=THRESHOLDS))
    threshold_points = [p for p in curve.points if p["method"] == "greedy"]
    assert [p["threshold"] for p in threshold_points] == sorted(THRESHOLDS)
    counts = [p["n_features"] for p in threshold_points]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    sets = [set(p["members"].tolist()) for p in threshold_points]
    assert all(later <= earlier for earlier, later in zip(sets, sets[1:]))
    # every accepted removal raised KL by less than its threshold; each state's KL is the KL of its set
    steps = [p for p in curve.points if p["method"] in ("all_features", "greedy_step")]
    for before, after in zip(steps, steps[1:]):
        assert after["kl"] - before["kl"] < after["threshold"]
        assert after["n_features"] == before["n_features"] - 1
    last = steps[-1]
    assert kl_of(patcher, metrics, last["members"].tolist()) == pytest.approx(last["kl"], abs=1e-6)
    # the floor is every candidate patched
    floor = next(p for p in curve.points if p["method"] == "all_features")
    assert floor["n_features"] == curve.n_candidates == int(patcher.candidates().sum())


def test_a_huge_threshold_removes_everything_and_a_tiny_one_almost_nothing(setup):
    patcher, metrics = setup
    everything = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=(100.0,)))
    assert everything.details["final_members"] == []
    nothing = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=(-1.0,)))
    assert len(nothing.details["final_members"]) == nothing.n_candidates  # a removal never lowers KL by > 1 here


def test_the_budget_stops_the_search_where_the_sequential_one_stops(setup):
    patcher, metrics = setup
    settings = SearchSettings(search="greedy", thresholds=THRESHOLDS, max_evals=7, greedy_order="random", seed=5)
    curve = greedy_search("sae", patcher, metrics, settings)
    assert curve.stopped.startswith("budget") and "--max-evals 7" in curve.stopped
    assert curve.details["trials"] == 7 and curve.details["passes"][-1]["partial"]
    unbounded = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=THRESHOLDS,
                                                                      greedy_order="random", seed=5))
    assert unbounded.stopped == "" and unbounded.details["trials"] > 7
    ordered = SearchSettings(search="greedy", thresholds=THRESHOLDS, max_evals=9)
    curve = greedy_search("sae", patcher, metrics, ordered)
    start = patcher.candidates().nonzero().squeeze(1).tolist()
    members, _, trials = sequential_reference(patcher, metrics, start, visiting_order(patcher, metrics, curve),
                                              THRESHOLDS, max_trials=9)
    assert trials == 9 and sorted(curve.details["final_members"]) == sorted(members)


def test_random_order_is_seeded(setup):
    patcher, metrics = setup
    runs = [greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=THRESHOLDS,
                                                                  greedy_order="random", seed=seed))
            for seed in (1, 1)]
    assert runs[0].details["final_members"] == runs[1].details["final_members"]


def test_the_error_node_is_one_removable_member(setup, tiny_llama):
    patcher, metrics = setup
    assert has_error_term(patcher)
    curve = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=THRESHOLDS,
                                                                  error_node=True))
    floor = next(p for p in curve.points if p["method"] == "all_features")
    assert floor["n_features"] == curve.n_candidates + 1 and patcher.n_features in floor["members"].tolist()
    assert abs(floor["kl"]) < 1e-4  # every feature and the error patched: the counterfactual itself
    assert curve.details["error_node"]


def test_complete_bases_have_no_error_node(tiny_llama):
    from sae.baselines import fit_pca

    batch = tokenize_ioi(tiny_llama, generate_ioi_prompts(tiny_llama.tokenizer, 4, seed=0))
    run = CachedRun(tiny_llama, HOOK, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens)
    rows = torch.cat([bucket.clean[:, 1:].reshape(-1, 32) for bucket in run.buckets])
    assert not has_error_term(FeaturePatcher(run, fit_pca(rows, hook_name=HOOK)))


def test_paper_thresholds():
    values = paper_thresholds()
    assert len(values) == 50 and values[0] == pytest.approx(1e-5) and values[-1] == pytest.approx(1.0)


def test_statistics_on_a_known_curve():
    # sets of 0 (unpatched), 4, 8, 40, 600 features with KL 2, 1.5, 0.6, 0.45, 0.4
    kl = torch.tensor([[2.0], [1.5], [0.6], [0.45], [0.4]], dtype=torch.float64)
    counts = torch.tensor([0, 4, 8, 40, 600])
    unpatched, floor, target = torch.tensor([2.0]), torch.tensor([0.4]), torch.tensor([0.5])
    values = statistics(kl, counts, unpatched, floor, target)
    assert values["features_to_target"].item() == 40  # 0.45 <= 0.5
    assert values["features_to_75pct_own"].item() == 8  # 2 - 0.75 * 1.6 = 0.8
    assert values["kl_at_8"].item() == 0.6 and values["kl_at_32"].item() == 0.6
    assert values["kl_at_512"].item() == 0.45


def test_report_intervals_cover_the_estimate_and_widen_with_noise(setup):
    patcher, metrics = setup
    curve = greedy_search("sae", patcher, metrics, SearchSettings(search="greedy", thresholds=THRESHOLDS))
    rows = torch.arange(patcher.run.n_prompts)
    unpatched = metrics["kl"](patcher.run.clean_logits, rows)
    row = report_row(curve, unpatched, target_fraction=0.25, kl_target=None, resamples=200, seed=0)
    assert row["kl_floor"] == pytest.approx(next(p["kl"] for p in curve.points if p["method"] == "all_features"))
    assert row["kl_at_8_lo"] <= row["kl_at_8"] <= row["kl_at_8_hi"]
    assert row["kl_at_8_hi"] > row["kl_at_8_lo"]  # 6 prompts: the interval has width
    none = report_row(curve, unpatched, target_fraction=0.25, kl_target=None, resamples=0, seed=0)
    assert math.isnan(none["kl_at_8_lo"]) and none["kl_at_8"] == row["kl_at_8"]


def test_benchmark_with_the_greedy_search_writes_the_report(random_sae, tiny_llama, tmp_path):
    settings = SearchSettings(search="greedy", thresholds=THRESHOLDS, bootstrap=100)
    result = run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 6, tmp_path, settings=settings,
                               progress=False, drop_failed=True)
    report = pd.read_csv(tmp_path / "report.csv")
    assert list(report["search"]) == ["greedy"]
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["search"] == "greedy" and details["settings"]["thresholds"] == list(THRESHOLDS)
    dropped = details["dropped_prompts"]
    assert dropped["enabled"] and details["n_prompts"] == 6 - dropped["count"]
    assert details["clean_performance"]["accuracy"] == 1.0  # only prompts the model gets right are kept
    assert {"greedy", "greedy_step", "all_features"} <= set(result.curves["method"])
    assert details["dictionaries"]["sae"]["search_details"]["trials"] > 0


def test_attribution_search_budget_stops_and_says_so(random_sae, tiny_llama, tmp_path):
    settings = SearchSettings(max_evals=3, confirm_top=0)
    result = run_ioi_benchmark(tiny_llama, {"sae": random_sae(hook=HOOK)}, HOOK, 6, tmp_path, settings=settings,
                               progress=False)
    assert result.per_dictionary["sae"]["exact_evaluations"] == 3
    assert result.report.iloc[0]["stopped"].startswith("budget")
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["dictionaries"]["sae"]["stopped"].startswith("budget")


@pytest.mark.parametrize("extra, message", [
    (["--search", "greedy", "--per-prompt"], "--per-prompt"),
    (["--search", "greedy", "--thresholds", "0.1,abc"], "--thresholds"),
    (["--search", "greedy", "--thresholds", "0.1,-2"], "--thresholds"),
    (["--error-node", "--patch-error"], "--error-node"),
    (["--search", "exhaustive"], "--search"),
    (["--max-evals", "0"], "--max-evals"),
    (["--search", "greedy", "--greedy-start", "0"], "--greedy-start"),
])
def test_cli_rejects_bad_search_options_before_loading_the_model(tmp_path, capsys, extra, message):
    from sparse_circuits.cli.main import main

    argv = ["ioi", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *extra]
    try:  # our checks return 2 with one `error:` line; argparse's types exit 2 after its usage line
        code = main(argv)
    except SystemExit as raised:
        code = raised.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(("error:", "usage:")) or "error:" in err[-1]
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert len([line for line in err if "error:" in line]) == 1
    assert not (tmp_path / "out").exists()


def test_cli_greedy_run(random_sae, tiny_llama_folder, tmp_path):
    from sparse_circuits.cli.main import main

    saes = tmp_path / "saes"
    save_dictionary(random_sae(hook=HOOK), saes / HOOK)
    argv = ["ioi", "--model", str(tiny_llama_folder), "--sae", str(saes / HOOK), "--prompts", "6", "--baselines",
            "none", "--search", "greedy", "--thresholds", "1e-6,1e-5", "--max-evals", "20", "--bootstrap", "50",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["settings"]["search"] == "greedy" and details["settings"]["max_evals"] == 20
    assert details["dictionaries"]["sae"]["search_details"]["trials"] <= 20


@pytest.mark.integration
def test_real_model_greedy_sets_have_the_kl_they_report(real_model, tmp_path):
    """On SmolLM2 with PCA at blocks.10 and 8 prompts, a short greedy sweep: each threshold's set, re-evaluated
    in a fresh run, has the KL the search recorded, and each accepted removal raised KL by less than its threshold."""
    from sae.baselines import fit_pca

    hook = "blocks.10.hook_resid_post"
    batch = tokenize_ioi(real_model, generate_ioi_prompts(real_model.tokenizer, 8, seed=2))
    with torch.no_grad():
        _, cache = real_model.run_with_cache(batch.clean_tokens, names_filter=[hook])
    pca = fit_pca(cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1]), hook_name=hook)
    settings = SearchSettings(search="greedy", thresholds=(0.01, 0.1), greedy_start=24, bootstrap=0)
    result = run_ioi_benchmark(real_model, {"pca": pca}, hook, 8, tmp_path, settings=settings, progress=False,
                               drop_failed=True, seed=2)  # the same prompts as `batch`
    curves = result.curves[result.curves["method"] == "greedy"]
    assert len(curves) == 2 and curves["n_features"].iloc[0] >= curves["n_features"].iloc[1]
    details = json.loads((tmp_path / "details.json").read_text())
    final = details["dictionaries"]["pca"]["search_details"]["final_members"]
    fresh = CachedRun(real_model, hook, batch.clean_tokens, batch.final_positions, batch.counterfactual_tokens)
    dropped = details["dropped_prompts"]["indices"]
    assert dropped == []  # SmolLM2 gets these 8 prompts right
    metrics = {"kl": KLTo(fresh.counterfactual_logits), "logit_diff": LogitDifference(batch.io_tokens, batch.s_tokens)}
    value = FeaturePatcher(fresh, pca).evaluate([final], metrics).values["kl"][0].item()
    assert value == pytest.approx(curves["kl"].iloc[-1], rel=1e-3, abs=1e-4)
    steps = result.curves[result.curves["method"].isin(["greedy_start", "greedy_step"])]
    assert (steps["kl"].diff().dropna() < steps["threshold"].iloc[1:]).all()
    assert value < result.summary.iloc[0]["kl_unpatched"]


def test_cli_constants_match_the_library():
    from sparse_circuits import validation
    from tasks.ioi import GREEDY_ORDERS, SEARCHES

    assert validation.IOI_SEARCHES == SEARCHES and validation.IOI_GREEDY_ORDERS == GREEDY_ORDERS
