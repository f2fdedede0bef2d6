"""The patching engine on tiny models: running from the hook on, exact edits, modes, attribution."""

from __future__ import annotations

import pytest
import torch

from circuits.engine import CachedRun, FeaturePatcher, length_buckets, splice_dictionaries
from circuits.hooks import resume_block
from circuits.metrics import KLTo, LogitDifference, TokenProbability, spearman

HOOK = "blocks.1.hook_resid_post"


def paired_tokens(model, lengths=(12, 12, 9, 7), seed: int = 0):
    """Right-padded clean tokens, counterfactuals differing at position 2, and final positions."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    clean = torch.randint(3, len(model.tokenizer), (len(lengths), width), generator=generator)
    clean[:, 0] = model.tokenizer.bos_token_id
    counterfactual = clean.clone()
    counterfactual[:, 2] = (clean[:, 2] + 7) % (len(model.tokenizer) - 3) + 3
    final = torch.tensor(lengths) - 1
    for row, length in enumerate(lengths):
        clean[row, length:] = counterfactual[row, length:] = 2
    return clean, counterfactual, final


@pytest.fixture(scope="module")
def llama_run(tiny_llama):
    clean, counterfactual, final = paired_tokens(tiny_llama)
    return CachedRun(tiny_llama, HOOK, clean, final, counterfactual)


def metrics_for(run: CachedRun) -> dict:
    n = run.n_prompts
    return {"kl": KLTo(run.counterfactual_logits),
            "logit_diff": LogitDifference(torch.arange(3, 3 + n), torch.arange(10, 10 + n))}


def test_resume_block_names():
    assert resume_block("blocks.3.hook_resid_post") == 4
    assert resume_block("blocks.3.hook_resid_pre") == 3
    assert resume_block("blocks.3.hook_mlp_out") is None


def test_length_buckets_cover_every_row_once():
    final = torch.tensor([10, 3, 10, 4, 20, 9])
    buckets = length_buckets(final, max_padding=0.15)
    assert sorted(torch.cat(buckets).tolist()) == list(range(6))
    for rows in buckets:
        lengths = final[rows] + 1
        assert int(lengths.max()) * len(rows) <= 1.15 * int(lengths.sum()) + 1e-9


@torch.no_grad()
def test_running_from_the_hook_reproduces_the_full_forward(tiny_model):
    clean, counterfactual, final = paired_tokens(tiny_model)
    run = CachedRun(tiny_model, HOOK, clean, final, counterfactual)
    assert run.mode == "resume"
    full = tiny_model(clean)
    expected = full[torch.arange(len(final)), final]
    torch.testing.assert_close(run.clean_logits, expected, atol=1e-5, rtol=1e-5)
    for bucket in run.buckets:
        resumed = run.run(bucket, bucket.clean.repeat(2, 1, 1))  # two copies in one batch
        torch.testing.assert_close(resumed, expected[bucket.rows].repeat(2, 1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_patched_sets_match_the_spliced_model(random_sae, tiny_llama, llama_run):
    sae = random_sae()
    patcher = FeaturePatcher(llama_run, sae)
    metrics = metrics_for(llama_run)
    features = [1, 5, 9, 30, 41]
    engine = patcher.evaluate([features], metrics)
    clean, counterfactual, final = paired_tokens(tiny_llama)
    name = f"{HOOK}.hook_sae_acts_post"
    with splice_dictionaries(tiny_llama, {HOOK: sae}):
        _, cache = tiny_llama.run_with_cache(counterfactual, names_filter=[name])
        target = cache[name]

        def patch(codes, hook):
            edited = codes.clone()
            edited[:, 1:, features] = target[:, 1:, features]
            return edited

        logits = tiny_llama.run_with_hooks(clean, fwd_hooks=[(name, patch)])
    final_logits = logits[torch.arange(len(final)), final]
    rows = torch.arange(len(final))
    for metric_name, metric in metrics.items():
        expected = metric(final_logits, rows).mean()
        assert engine.values[metric_name][0].item() == pytest.approx(expected.item(), abs=1e-5)
    llama_run.mode = "hooks"  # the fallback path gives the same numbers
    try:
        fallback = patcher.evaluate([features], metrics)
    finally:
        llama_run.mode = "resume"
    torch.testing.assert_close(fallback.values["kl"], engine.values["kl"], atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_all_features_plus_error_reproduce_the_counterfactual(random_sae, llama_run):
    patcher = FeaturePatcher(llama_run, random_sae())
    metrics = metrics_for(llama_run)
    result = patcher.evaluate([[], None], metrics, include_error=True)
    base = patcher.baseline(metrics)
    assert result.values["kl"][0].item() > 1e-4  # only the error term: still far from the counterfactual?
    assert abs(result.values["kl"][1].item()) < 1e-5
    nothing = patcher.evaluate([[]], metrics)
    assert nothing.values["kl"][0].item() == pytest.approx(base["kl"], abs=1e-6)
    assert nothing.edit_norm[0].item() == 0.0


@torch.no_grad()
def test_modes_and_edit_norm(random_sae, llama_run):
    sae = random_sae()
    patcher = FeaturePatcher(llama_run, sae)
    metrics = metrics_for(llama_run)
    base = patcher.baseline(metrics)
    unchanged = patcher.evaluate([None], metrics, mode="scale", value=1.0)
    assert unchanged.values["kl"][0].item() == pytest.approx(base["kl"], abs=1e-6)
    zero = patcher.evaluate([[3]], metrics, mode="zero")
    set_zero = patcher.evaluate([[3]], metrics, mode="set", value=0.0)
    assert zero.values["kl"][0].item() == pytest.approx(set_zero.values["kl"][0].item(), abs=1e-7)
    # edit norm: mean over prompts of the norm of (0 - c_3) * W_dec[3] over positions 1..final
    per_prompt = []
    for bucket, codes in zip(llama_run.buckets, patcher.codes):
        for row, final in enumerate(bucket.final.tolist()):
            per_prompt.append(codes[row, 1 : final + 1, 3].pow(2).sum().sqrt() * sae.W_dec[3].norm())
    per_prompt = torch.stack(per_prompt)
    assert zero.edit_norm[0].item() == pytest.approx(per_prompt.mean().item(), rel=1e-4)
    mean = patcher.evaluate([None], metrics, mode="mean")
    assert torch.isfinite(mean.values["kl"]).all()
    with pytest.raises(ValueError, match="unknown patching mode"):
        patcher.evaluate([[1]], metrics, mode="swap")
    with pytest.raises(ValueError, match="feature indices"):
        patcher.evaluate([[64]], metrics)


@torch.no_grad()
def test_per_prompt_sets(random_sae, llama_run):
    patcher = FeaturePatcher(llama_run, random_sae())
    metrics = metrics_for(llama_run)
    n = llama_run.n_prompts
    shared = patcher.evaluate([[2, 7, 11]], metrics)
    same_rows = patcher.evaluate([torch.tensor([[2, 7, 11]] * n)], metrics)
    torch.testing.assert_close(same_rows.per_prompt["kl"], shared.per_prompt["kl"], atol=1e-6, rtol=1e-5)
    rows = torch.tensor([[2, 7, 11]] + [[5, -1, -1]] * (n - 1))  # -1: no feature
    mixed = patcher.evaluate([rows, [5]], metrics)
    torch.testing.assert_close(mixed.per_prompt["kl"][0, 1:], mixed.per_prompt["kl"][1, 1:], atol=1e-6, rtol=1e-5)
    assert mixed.per_prompt["kl"][0, 0].item() == pytest.approx(shared.per_prompt["kl"][0, 0].item(), abs=1e-6)
    per_prompt = patcher.attribution(metrics, per_prompt=True)["kl"].features
    assert per_prompt.shape == (n, 64)
    torch.testing.assert_close(per_prompt.sum(0), patcher.attribution(metrics)["kl"].features, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="one row per prompt"):
        patcher.evaluate([torch.zeros(n + 1, 2, dtype=torch.long)], metrics)


@torch.no_grad()
def test_positions_restrict_the_edit(random_sae, llama_run):
    patcher = FeaturePatcher(llama_run, random_sae(), positions=torch.tensor([1]))
    metrics = metrics_for(llama_run)
    # the runs differ from position 2 on, so patching position 1 only changes nothing
    result = patcher.evaluate([None], metrics)
    assert result.edit_norm[0].item() == 0.0
    assert result.values["kl"][0].item() == pytest.approx(patcher.baseline(metrics)["kl"], abs=1e-6)


def test_attribution_is_the_first_order_effect(random_sae, llama_run):
    patcher = FeaturePatcher(llama_run, random_sae())
    metrics = metrics_for(llama_run)
    attributions = patcher.attribution(metrics, mode="scale", value=1.01)
    up = patcher.evaluate([None], metrics, mode="scale", value=1.01)
    down = patcher.evaluate([None], metrics, mode="scale", value=0.99)
    base = patcher.baseline(metrics)
    for name in metrics:  # a central difference cancels the second-order term (KL is near its minimum)
        predicted = attributions[name].features.sum().item()
        measured = (up.values[name][0].item() - down.values[name][0].item()) / 2
        assert predicted == pytest.approx(measured, rel=0.05, abs=1e-7)
        assert attributions[name].metric_value == pytest.approx(base[name], rel=1e-4, abs=1e-6)


def test_attribution_ranks_single_feature_patches(random_sae, llama_run):
    patcher = FeaturePatcher(llama_run, random_sae())
    metrics = metrics_for(llama_run)
    scores = patcher.attribution(metrics)["logit_diff"].features
    top = torch.argsort(scores.abs(), descending=True)[:12]
    exact = patcher.exact_effects(top.tolist(), metrics)["logit_diff"]
    assert spearman(scores[top], exact) > 0.7


def test_metrics():
    logits = torch.randn(4, 10)
    rows = torch.arange(4)
    assert KLTo(logits)(logits, rows).abs().max() < 1e-6
    assert (KLTo(logits)(torch.randn(4, 10), rows) > 0).all()
    diff = LogitDifference(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0]))(logits, rows)
    torch.testing.assert_close(diff, logits[rows, rows + 1] - logits[:, 0])
    probability = TokenProbability(torch.tensor([1, 1, 1, 1]))(logits, rows)
    torch.testing.assert_close(probability, torch.softmax(logits, -1)[:, 1])
    batched = KLTo(logits)(torch.randn(3, 2, 10), torch.tensor([1, 3]))  # [sets, rows, vocab]
    assert batched.shape == (3, 2)


def test_width_mismatch_is_rejected(random_sae, llama_run):
    with pytest.raises(ValueError, match="d_in=16"):
        FeaturePatcher(llama_run, random_sae(d_in=16, d_sae=32))
