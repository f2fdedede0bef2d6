"""The intervention engine on tiny models: the pass-through rule, edits, leaves, and the attribution function."""

from __future__ import annotations

import pytest
import torch

from circuits.attribution import attribution_scores
from circuits.engine import (ActivationDelta, ActivationMap, FeatureAblation, encode_codes, passthrough_positions,
                             run_with_edits)

HOOK = "blocks.1.hook_resid_post"


def activations_with_a_sink(seed: int = 0) -> torch.Tensor:
    """[2, 6, 8] ordinary activations with one massive position (row 0, position 3)."""
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed))
    x[0, 3] *= 200.0
    return x


def test_passthrough_is_bos_and_massive_positions_only():
    x = activations_with_a_sink()
    mask = passthrough_positions(x)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[:, 0] = True
    expected[0, 3] = True
    assert torch.equal(mask, expected)
    assert not passthrough_positions(x, exclude_bos=False, pass_massive=False).any()
    assert torch.equal(passthrough_positions(x, exclude_bos=False)[0], expected[0] & (torch.arange(6) > 0))


def test_codes_are_zero_exactly_where_passed_through(random_sae):
    sae = random_sae(d_in=8, d_sae=24)
    x = activations_with_a_sink()
    codes = encode_codes(sae, x, passthrough_positions(x))
    assert codes[:, 0].abs().sum() == 0 and codes[0, 3].abs().sum() == 0
    assert torch.allclose(codes[1, 1:], sae.encode(x[1, 1:]))


def test_feature_ablation_removes_code_times_direction_at_editable_positions_only(random_sae):
    sae = random_sae(d_in=8, d_sae=24)
    x = activations_with_a_sink()
    feature = int(sae.encode(x[1, 1:]).sum(0).argmax())
    weights = torch.zeros(24)
    weights[feature] = 1.0
    edited = FeatureAblation(sae, weights)(x)
    removed = sae.encode(x)[..., feature, None] * sae.W_dec[feature]
    assert torch.allclose(edited[1, 1:], x[1, 1:] - removed[1, 1:], atol=1e-6)
    assert torch.equal(edited[:, 0], x[:, 0]) and torch.equal(edited[0, 3], x[0, 3])
    assert not torch.allclose(edited[1, 1:], x[1, 1:])


def test_activation_map_and_delta_leave_passed_through_positions_alone():
    x = activations_with_a_sink()
    zeroed = ActivationMap(torch.zeros_like)(x)
    assert torch.equal(zeroed[:, 0], x[:, 0]) and torch.equal(zeroed[0, 3], x[0, 3])
    assert zeroed[1, 1:].abs().sum() == 0
    delta = torch.ones_like(x)
    moved = ActivationDelta(delta, positions=torch.tensor([[0, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool))(x)
    assert torch.equal(moved[1, 1:4], x[1, 1:4] + 1) and torch.equal(moved[1, 4:], x[1, 4:])
    assert torch.equal(moved[0, 3], x[0, 3])


def test_a_shared_prefix_is_expanded_into_one_row_per_edit(tiny_llama, random_sae):
    sae = random_sae()
    tokens = torch.tensor([[1, 5, 9, 12, 7, 30, 31]])
    edit = FeatureAblation.nothing(sae, torch.ones(3, tokens.shape[1], dtype=torch.bool))
    edit.features[1, :] = 1.0
    edit.error[2] = True
    with torch.no_grad():
        run = run_with_edits(tiny_llama, tokens, {HOOK: edit}, record=[HOOK])
        clean = run_with_edits(tiny_llama, tokens, record=[HOOK])
    assert run.output.shape[0] == 3
    torch.testing.assert_close(run.output[0], clean.output[0])
    x = clean.recorded[HOOK][0]
    reconstruction = sae(x[1:])[0]
    torch.testing.assert_close(run.recorded[HOOK][2, 1:], reconstruction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.recorded[HOOK][1, 1:], x[1:] - (reconstruction - sae.b_dec), atol=1e-5, rtol=1e-5)


def test_leaf_gradient_predicts_a_small_edit(tiny_gpt2):
    tokens = torch.tensor([[1, 5, 9, 12, 7, 30]])
    run = run_with_edits(tiny_gpt2, tokens, leaves=[HOOK])
    metric = run.output[0, -1, 7] - run.output[0, -1, 9]
    (grad,) = torch.autograd.grad(metric, [run.leaves[HOOK]])
    direction = torch.randn(grad.shape[-1], generator=torch.Generator().manual_seed(1))
    delta = torch.zeros_like(grad)
    delta[0, 2] = 1e-3 * direction
    with torch.no_grad():  # a central difference: the first-order change the gradient predicts
        up = run_with_edits(tiny_gpt2, tokens, {HOOK: ActivationDelta(delta)}).output
        down = run_with_edits(tiny_gpt2, tokens, {HOOK: ActivationDelta(-delta)}).output
    change = ((up[0, -1, 7] - up[0, -1, 9]) - (down[0, -1, 7] - down[0, -1, 9])) / 2
    predicted = (grad * delta).sum()
    assert abs(predicted) > 1e-5
    assert abs(change - predicted) < 0.01 * abs(predicted)


def test_attribution_sparse_and_dense_paths_agree_and_rows_sum():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, 8, generator=generator) for _ in range(2)]
    directions = torch.randn(20, 8, generator=generator)
    dense_delta = torch.randn(3, 5, 20, generator=generator)
    sparse_delta = dense_delta * (torch.rand(3, 5, 20, generator=generator) < 0.05)
    for delta in (dense_delta, sparse_delta):
        expected = sum((delta * (grad @ directions.T)).sum(1) for grad in grads) / 2
        per_row = attribution_scores(grads, delta, directions, per_row=True).features
        torch.testing.assert_close(per_row, expected.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attribution_scores(grads, delta, directions).features, expected.sum(0).double(),
                                   rtol=1e-5, atol=1e-5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    error = torch.randn(3, 5, 8, generator=generator)
    result = attribution_scores(grads[0], dense_delta, directions, delta_error=error, mask=mask)
    assert result.features.abs().sum() == 0 and result.error == 0.0
    with pytest.raises(ValueError, match="must match"):
        attribution_scores(grads[0], dense_delta[:, :4], directions)
