"""Integrated gradients in tracing and the attribution-against-ablation study, on tiny random models:
one IG step is plain attribution, N steps are the left Riemann sum of the path integral (checked by
hand) and approach a lone feature's ablation effect; the study's agreement, failures and the
switched-on diagnosis; the `trace-agreement` command's files."""

import csv
import json

import pytest
import torch

from circuits import tracing
from circuits.features import scan_features
from tests.test_tracing import (TARGET_HOOK, TEXTS, UPSTREAM, _cli, linear_model, make_dictionaries,  # noqa: F401
                                most_active_feature, saved, setup)

HOOK = UPSTREAM[1]  # blocks.2, one block below the target's


def test_one_ig_step_is_plain_attribution_and_more_steps_differ(tiny_llama, setup):
    dictionaries, target, contexts = setup
    runs = {steps: tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, ig_steps=steps,
                                              progress=False) for steps in (1, 3)}
    runs[None] = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=2, progress=False)
    for hook in UPSTREAM:
        assert torch.equal(runs[1].scores[hook].effects, runs[None].scores[hook].effects)
        assert not torch.allclose(runs[3].scores[hook].effects, runs[1].scores[hook].effects, atol=1e-5)
        assert runs[3].scores[hook].error_effect == runs[1].scores[hook].error_effect  # the error keeps the clean point
    assert runs[3].graph.graph["ig_steps"] == 3 and tracing.ig_points(4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="attribution method only"):
        tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", ig_steps=2)
    with pytest.raises(ValueError, match="at least 1"):
        tracing.ig_points(0)


def riemann_sum_by_hand(model, dictionary, target_dictionary, target, contexts, steps):
    """sum_pos code_i * (decoder_i . mean_t grad_t), grad_t taken with every code at HOOK scaled by 1 - t,
    t = 0, 1/N, ..., written with plain hooks and autograd."""
    valid = contexts.valid
    totals = torch.zeros(dictionary.n_features, dtype=torch.float64)
    for step in range(steps):
        point = step / steps
        seen = {}

        def scale(x, hook=None):
            codes = dictionary.encode(x).detach() * valid[..., None]
            seen["codes"] = codes
            seen["leaf"] = torch.zeros_like(x, requires_grad=True)
            return x - point * codes @ dictionary.W_dec + seen["leaf"]

        def read(x, hook=None):
            seen["target"] = x
            return x

        model.run_with_hooks(contexts.tokens, fwd_hooks=[(HOOK, scale), (TARGET_HOOK, read)])
        value = (target_dictionary.encode(seen["target"])[..., target.index] * contexts.measure).sum(1).mean()
        (grad,) = torch.autograd.grad(value, [seen["leaf"]])
        totals += (seen["codes"] * (grad @ dictionary.W_dec.T)).sum(dim=(0, 1)).double() / steps
    return totals


def test_ig_is_the_left_riemann_sum_of_the_path_integral(tiny_llama, setup):
    dictionaries, target, contexts = setup
    result = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=1, ig_steps=3,
                                        progress=False)
    assert int(result.contexts.protected.sum()) == 0  # so the hand computation's positions are the trace's
    by_hand = riemann_sum_by_hand(tiny_llama, dictionaries[HOOK], dictionaries[TARGET_HOOK], target,
                                  result.contexts, 3)
    scores = result.scores[HOOK]
    assert int(scores.evaluated.sum()) > 5
    torch.testing.assert_close(scores.effects, (by_hand * scores.evaluated).float(), rtol=1e-4, atol=1e-6)


def test_ig_approaches_the_ablation_of_a_lone_feature(tiny_llama):
    """With one feature active at the hook, the path scales that feature alone, so the path integral is
    its ablation effect exactly; the left Riemann sum gets there as the steps grow, plain attribution
    (one step) does not."""
    dictionaries = make_dictionaries(tiny_llama, [HOOK, TARGET_HOOK])
    lone = 7
    with torch.no_grad():
        dictionaries[HOOK].b_enc.fill_(-1e4)
        dictionaries[HOOK].b_enc[lone] = 4.0
    target = tracing.FeatureTarget(TARGET_HOOK, most_active_feature(tiny_llama, dictionaries[TARGET_HOOK], TARGET_HOOK))
    contexts = tracing.contexts_from_texts(tiny_llama, TEXTS, target)
    exact = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, method="ablation", depth=1,
                                       progress=False).scores[HOOK]
    assert exact.evaluated.nonzero().flatten().tolist() == [lone]
    effect = float(exact.effects[lone])
    errors = {}
    for steps in (1, 4, 32):
        estimate = tracing.run_upstream_trace(tiny_llama, dictionaries, target, contexts, depth=1, ig_steps=steps,
                                              progress=False).scores[HOOK]
        errors[steps] = abs(float(estimate.effects[lone]) - effect)
    assert abs(effect) > 1e-3
    assert errors[1] > abs(effect)  # the removal is far from linear: plain attribution is far off
    assert errors[32] < errors[4] < errors[1] and errors[32] < 0.05 * errors[1]  # left Riemann sums: error ~ 1/N


def test_exact_agreement_where_the_model_is_linear(linear_model):
    model, dictionaries, target, contexts = linear_model
    compared = tracing.compare_target(model, dictionaries, target, contexts, [HOOK], ig_steps=(1, 4), top_n=10)
    assert {row["method"] for row in compared.rows} == {"attribution", "ig4"}
    for row in compared.rows:
        assert row["receiver_kind"] == "target" and row["compared"] == 10
        assert row["spearman"] == pytest.approx(1.0) and row["top_overlap"] == 1.0 and row["failures"] == 0
    assert compared.failures == []


def test_features_switched_on_by_an_ablation_are_failures_of_attribution(tiny_llama, setup):
    """A target that is off at every measured position on the clean run (its bias just below the
    threshold): every gradient is zero, so attribution says 0, while ablations switch it on."""
    dictionaries = dict(setup[0])
    contexts = setup[2]
    index = 3
    target_dictionary = make_dictionaries(tiny_llama, [TARGET_HOOK])[TARGET_HOOK]
    _, cache = tiny_llama.run_with_cache(contexts.tokens, names_filter=[TARGET_HOOK])
    with torch.no_grad():
        pre = target_dictionary.pre_activations(cache[TARGET_HOOK])[..., index]
        highest = float(pre[contexts.measure].max())
        target_dictionary.b_enc[index] -= highest + 0.05 * float(pre[contexts.measure].std())
    dictionaries[TARGET_HOOK] = target_dictionary
    target = tracing.FeatureTarget(TARGET_HOOK, index)
    compared = tracing.compare_target(tiny_llama, dictionaries, target, contexts, [HOOK], top_n=10)
    [row] = compared.rows
    assert row["receiver_activation"] == 0.0 and row["failures"] > 0
    assert row["switched_on_failures"] == row["failures"] == len(compared.failures)
    for failure in compared.failures:
        assert failure["kind"] == "near zero" and failure["attribution"] == 0.0 and failure["ablation"] < 0
        assert failure["cause"] == "switched on" and failure["switched_on_share"] == pytest.approx(1.0)
        # the re-run's split adds up to the ablation scorer's effect
        assert failure["switched_on"] == pytest.approx(failure["ablation"], rel=1e-4, abs=1e-7)


def test_find_failures_kinds_and_thresholds():
    effects = torch.tensor([10.0, -5.0, 3.0, 0.5, 2.0])
    exact = tracing.LayerScores("h", "ablation", effects, torch.ones(5, dtype=torch.bool), 0.0)
    guesses = torch.tensor([9.0, 0.2, -1.0, -0.5, 0.1])
    estimate = tracing.LayerScores("h", "attribution", guesses, torch.ones(5, dtype=torch.bool), 0.0)
    failures = tracing.find_failures(exact, estimate, top_n=5)
    # 0.5 is under 10% of the largest effect, so its opposite sign does not count
    assert [(f.feature, f.kind) for f in failures] == [(1, "near zero"), (2, "opposite sign"), (4, "near zero")]


def test_pick_targets_is_seeded_and_spread_over_firing_rates(tiny_llama, setup):
    dictionaries = setup[0]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, len(tiny_llama.tokenizer), (40, 16), generator=generator)
    tokens[:, 0] = tiny_llama.tokenizer.bos_token_id
    scan = scan_features(tiny_llama, dictionaries, tokens)
    picks = tracing.pick_targets(scan, TARGET_HOOK, 4, seed=0, min_contexts=3, max_firing_fraction=1.0)
    assert picks == tracing.pick_targets(scan, TARGET_HOOK, 4, seed=0, min_contexts=3, max_firing_fraction=1.0)
    assert len(set(picks)) == 4
    fired = (scan.max_activation[TARGET_HOOK] > 0).sum(dim=0)
    assert all(fired[index] >= 3 for index in picks)
    density = scan.firing_fraction[TARGET_HOOK]
    eligible = sorted(density[fired >= 3].tolist())
    assert min(density[picks]) <= eligible[len(eligible) // 4] and max(density[picks]) >= eligible[-len(eligible) // 4]
    with pytest.raises(ValueError, match="fewer than the 1000 targets"):
        tracing.pick_targets(scan, TARGET_HOOK, 1000, min_contexts=3)


def test_cli_trace_agreement_writes_the_study(tiny_llama_folder, saved, tmp_path, capsys):
    folder, corpus, _ = saved
    out = tmp_path / "study"
    _cli(["trace-agreement", "--model", str(tiny_llama_folder), "--device", "cpu", "--corpus", str(corpus),
          "--saes", str(folder), "--target-hook", TARGET_HOOK, "--targets", "3", "--depth", "2", "--skip-layer",
          "--ig-steps", "1", "3", "--n-contexts", "3", "--scan-contexts", "30", "--context-size", "12",
          "--top-n", "10", "--top-k-edges", "2", "--max-firing-fraction", "1", "--out", str(out)])
    rows = list(csv.DictReader(open(out / "agreement.csv")))
    targets = {row["target"] for row in rows}
    assert len(targets) == 3
    on_target = [row for row in rows if row["receiver_kind"] == "target"]
    # per target: consecutive depths 1 and 2 plus the skip arm, each by both methods
    assert len(on_target) == 3 * 3 * 2
    assert {(row["arm"], row["depth"], row["blocks_apart"]) for row in on_target} == {
        ("consecutive", "1", "1"), ("consecutive", "2", "2"), ("skip", "1", "2")}
    assert any(row["receiver_kind"] == "edge" for row in rows)
    # splicing is exact, so leaving out the middle dictionary changes no effect on the target
    by_key = {(row["target"], row["arm"], row["depth"], row["method"]): row for row in on_target}
    for target in targets:
        for method in ("attribution", "ig3"):
            skip, chain = by_key[target, "skip", "1", method], by_key[target, "consecutive", "2", method]
            assert float(skip["spearman"]) == pytest.approx(float(chain["spearman"]), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["targets"] == 3 and summary["config"]["ig_steps"] == [1, 3]
    assert {(row["arm"], row["method"]) for row in summary["table"]} == {
        (arm, method) for arm in ("consecutive", "skip") for method in ("attribution", "ig3")}
    assert (out / "failures.csv").is_file() and (out / "agreement.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "median" in printed and "skip" in printed and f"wrote {out}" in printed
