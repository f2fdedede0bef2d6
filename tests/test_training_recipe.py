"""The training recipe's options (issue 14): decoder-bias initialisation, free decoder rows with a
norm-weighted penalty (folded away on save), the initial row norm, gradient clipping, and the sparse
decode the training losses use on CPU (equal to the dense one)."""

from __future__ import annotations

import pytest
import torch
from conftest import sparse_data

from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.dictionary import TrainingState
from sae.metrics import activation_metrics
from sae.relu import ReluSAE
from sae.topk import TopKSAE
from sae.training import TrainingConfig, train_dictionaries
from sae.training.initialisation import geometric_median, scale_initial_rows_

HOOK = "blocks.0.hook_resid_post"


def state(norms=None, d_sae=32):
    return TrainingState(step=0, sparsity_ramp=1.0, dead=torch.zeros(d_sae, dtype=torch.bool), aux_k_coefficient=0.0,
                         decoder_norms=norms)


def test_geometric_median_resists_a_far_row_and_zeroes_the_distance_gradient():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 8, generator=generator)
    rows[0] = 1000.0
    median = geometric_median(rows, iterations=200, tolerance=0.0)
    assert median.norm() < 0.5 < rows.mean(dim=0).norm()  # the mean is dragged ~40 out by one row
    directions = (median - rows.double()) / (median - rows.double()).norm(dim=1, keepdim=True)
    assert directions.sum(dim=0).norm() < 1e-3  # the subgradient of sum ||m - row|| vanishes at the median


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_free_rows_train_the_same_function_that_is_saved_with_unit_rows(architecture):
    cfg = DictionaryConfig(architecture, 16, 32, hook_name=HOOK, l1_coefficient=0.1, k=4, seed=3)
    sae = (TopKSAE if architecture == "topk" else ReluSAE)(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1, generator=generator) * 2 + 0.1)  # uneven row norms
        sae.b_enc.copy_(torch.randn(32, generator=generator) * 0.1)
    x = torch.randn(64, 16, generator=generator)
    norms = sae.W_dec.norm(dim=1)
    out = sae.training_loss(x, state(norms.detach()))
    sae.scale_features_(norms.detach())  # what the loop does before saving
    with torch.no_grad():
        reconstruction, codes = sae(x)
    torch.testing.assert_close(x - out.residual, reconstruction, atol=1e-5, rtol=1e-5)
    # TopK trains on the codes of unit-norm rows already; ReLU's codes become those when the norms are folded in
    trained_codes = out.codes if architecture == "topk" else out.codes * norms.detach()
    torch.testing.assert_close(trained_codes, codes, atol=1e-5, rtol=1e-5)
    if architecture == "standard":  # the penalty is on the codes of the unit-norm rows
        assert out.l1.item() == pytest.approx(codes.sum(dim=1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("shift", [0.0, 4.5])  # dense codes / under 5% active (the embedding_bag path on CPU)
def test_relu_training_loss_is_the_same_on_both_decode_paths(shift):
    cfg = DictionaryConfig("standard", 16, 256, hook_name=HOOK, l1_coefficient=0.1, seed=0)
    sae = ReluSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-shift)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(2)) * 2
    out = sae.training_loss(x, state(d_sae=256))
    out.loss.backward()
    density = (out.codes > 0).float().mean().item()
    assert (density < 0.05) == (shift > 0) and density > 0
    reconstruction = torch.relu(sae.pre_activations(x)) @ sae.W_dec + sae.b_dec
    dense_loss = (x - reconstruction).pow(2).mean() + 0.1 * torch.relu(sae.pre_activations(x)).sum(dim=1).mean()
    gradients = torch.autograd.grad(dense_loss, [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec])
    torch.testing.assert_close(out.loss, dense_loss.detach(), atol=1e-5, rtol=1e-5)
    for parameter, expected in zip([sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec], gradients):
        torch.testing.assert_close(parameter.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def data():
    x, _ = sparse_data(8192, 16, 32, active=3, seed=4)
    return x


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_the_saelens_recipe_learns_and_saves_unit_rows(tmp_path, data, architecture):
    cfg = DictionaryConfig(architecture, 16, 32, hook_name=HOOK, l1_coefficient=0.01, k=3)
    training = TrainingConfig(total_tokens=200 * 256, batch_size=256, lr=3e-3, checkpoint_every=None,
                              unit_norm_decoder=False, decoder_init_norm=0.1, grad_clip_norm=1.0, b_dec_init="zero")
    [result] = train_dictionaries(TensorBatchSource({HOOK: data}), [cfg], training, tmp_path, progress=False)
    torch.testing.assert_close(result.dictionary.W_dec.norm(dim=1), torch.ones(32))
    metrics = activation_metrics(result.dictionary, [data])
    assert metrics["fvu"] < 0.3 and metrics["l0"] < 24  # of 32 features (our default recipe: FVU 0.24 for TopK here)


def test_b_dec_init_and_initial_norm(tmp_path, data):
    rows = data[:256]  # batch 0 is a permutation: compare with the mean and median of that batch
    first = next(TensorBatchSource({HOOK: data}).batches([HOOK], 256, 0))[HOOK]
    for how, expected in (("zero", torch.zeros(16)), ("geometric_median", geometric_median(first))):
        training = TrainingConfig(total_tokens=256, batch_size=256, lr=0.0, checkpoint_every=None, b_dec_init=how)
        cfg = DictionaryConfig("standard", 16, 32, hook_name=HOOK)
        [result] = train_dictionaries(TensorBatchSource({HOOK: data}), [cfg], training, tmp_path / how, progress=False)
        torch.testing.assert_close(result.dictionary.b_dec.detach(), expected, atol=1e-4, rtol=1e-4)
    assert rows.shape == (256, 16)
    sae = ReluSAE(DictionaryConfig("standard", 16, 32, hook_name=HOOK))
    scale_initial_rows_(sae, 0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_gradient_clipping_is_applied(tmp_path, data):
    """A clip far below the gradient's norm leaves Adam steps of ~g / eps: the weights barely move."""
    cfg = DictionaryConfig("standard", 16, 32, hook_name=HOOK, l1_coefficient=0.01)
    moved = {}
    for clip in (None, 1e-12):
        training = TrainingConfig(total_tokens=4 * 256, batch_size=256, lr=1e-2, checkpoint_every=None,
                                  grad_clip_norm=clip, lr_decay_fraction=0.0, unit_norm_decoder=True)
        [result] = train_dictionaries(TensorBatchSource({HOOK: data}), [cfg], training, tmp_path / str(clip),
                                      progress=False)
        moved[clip] = (result.dictionary.W_enc - ReluSAE(cfg).W_enc).abs().max().item()
    assert moved[None] > 1e-2 and moved[1e-12] < 1e-4


def test_auto_gradient_clip_is_saelens_clip_in_our_units(tmp_path, data):
    """'auto' clips at 1/d_in (SAELens' 1.0 on a loss d_in times ours): the same weights as that explicit clip,
    other weights than no clip."""
    assert TrainingConfig(total_tokens=64, batch_size=64).clip_norm(576, free_rows=True) == 1 / 576
    assert TrainingConfig(total_tokens=64, batch_size=64).clip_norm(576, free_rows=False) is None  # the paper's
    assert TrainingConfig(total_tokens=64, batch_size=64, grad_clip_norm=None).clip_norm(576, True) is None
    cfg = DictionaryConfig("standard", 16, 32, hook_name=HOOK, l1_coefficient=0.01)
    weights = {}
    for clip in ("auto", 1 / 16, None):
        training = TrainingConfig(total_tokens=4 * 256, batch_size=256, lr=1e-2, checkpoint_every=None,
                                  grad_clip_norm=clip, lr_decay_fraction=0.0)
        [result] = train_dictionaries(TensorBatchSource({HOOK: data}), [cfg], training, tmp_path / str(clip),
                                      progress=False)
        weights[clip] = result.dictionary.W_enc.detach()
    assert torch.equal(weights["auto"], weights[1 / 16])
    assert not torch.allclose(weights["auto"], weights[None], atol=1e-4)


def test_recipe_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="b_dec_init"):
        TrainingConfig(total_tokens=64, batch_size=64, b_dec_init="median")
    with pytest.raises(ValueError, match="grad_clip_norm"):
        TrainingConfig(total_tokens=64, batch_size=64, grad_clip_norm=0.0)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        TrainingConfig(total_tokens=64, batch_size=64, grad_clip_norm="max")
    x = torch.randn(64, 16)
    for cfg in (DictionaryConfig("standard", 16, 32, hook_name=HOOK, tied=True),
                DictionaryConfig("jumprelu", 16, 32, hook_name=HOOK)):
        with pytest.raises(ValueError, match="unit_norm_decoder"):
            train_dictionaries(TensorBatchSource({HOOK: x}), [cfg], TrainingConfig(
                total_tokens=64, batch_size=64, unit_norm_decoder=False, checkpoint_every=None), tmp_path,
                progress=False)


def test_the_default_recipe_depends_on_tying_and_architecture():
    """Untied ReLU and TopK train with free rows from norm 0.1 (SAELens' recipe, better at equal L0: see
    results/saelens/ablation.md); tied SAEs keep the paper's unit-norm rows, as do architectures without support."""
    training = TrainingConfig(total_tokens=64, batch_size=64)
    assert training.free_decoder_rows(tied=False, supported=True)
    assert not training.free_decoder_rows(tied=True, supported=True)
    assert not training.free_decoder_rows(tied=False, supported=False)
    assert training.initial_row_norm(True) == 0.1 and training.initial_row_norm(False) is None
    explicit = TrainingConfig(total_tokens=64, batch_size=64, unit_norm_decoder=True, decoder_init_norm=None)
    assert not explicit.free_decoder_rows(tied=False, supported=True) and explicit.initial_row_norm(False) is None


def test_the_cli_constant_matches_the_library():
    from sae.training.config import AUTO_DECODER_INIT_NORM
    from sparse_circuits import defaults

    assert defaults.TRAIN_DECODER_INIT_NORM == AUTO_DECODER_INIT_NORM


def test_train_command_passes_its_gradient_clip_to_the_schedule():
    import argparse

    from sparse_circuits.cli.train import clip_norm
    from sparse_circuits.pipelines.train import TrainRequest, training_schedule

    assert clip_norm("auto") == "auto" and clip_norm("off") == "off" and clip_norm("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError):
        clip_norm("0")
    for given, expected in (("auto", "auto"), (None, None), (0.5, 0.5)):
        request = TrainRequest(hooks=[HOOK], tokens=4096, batch_size=256, grad_clip_norm=given)
        assert training_schedule(request, 4096).grad_clip_norm == expected
