"""ReLU and TopK SAEs, the registry, scale folding and activation metrics."""

from __future__ import annotations

import pytest
import torch

from sae.config import DictionaryConfig
from sae.dictionary import Dictionary, SparseAutoencoder, TrainingLoss
from sae.metrics import FeatureFrequency, ReconstructionTotals, activation_metrics, fvu, l0
from sae.registry import ARCHITECTURES, build_dictionary, register_architecture
from sae.relu import ReluSAE
from sae.topk import TopKSAE

D_IN, D_SAE = 16, 48


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def config(**overrides) -> DictionaryConfig:
    values = dict(architecture="standard", d_in=D_IN, d_sae=D_SAE, hook_name="blocks.1.hook_resid_post", seed=3)
    values.update(overrides)
    return DictionaryConfig(**values)


def randomise(sae: ReluSAE, seed: int = 0) -> ReluSAE:
    """Give every parameter random values, so formulas are tested away from the zero-bias init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return sae


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_relu_sae_matches_the_formula(apply_b_dec):
    sae = randomise(ReluSAE(config(apply_b_dec_to_input=apply_b_dec)))
    x = torch.randn(10, D_IN)
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    shifted = x - b_dec if apply_b_dec else x
    expected_codes = torch.clamp(shifted @ W_enc + b_enc, min=0)
    reconstruction, codes = sae(x)
    torch.testing.assert_close(codes, expected_codes)
    torch.testing.assert_close(reconstruction, expected_codes @ W_dec + b_dec)
    assert (codes == 0).any() and (codes > 0).any()
    assert sae.feature_directions is sae.W_dec


def test_initialisation_is_seeded_with_unit_decoder_rows():
    first, again, other = ReluSAE(config()), ReluSAE(config()), ReluSAE(config(seed=4))
    assert torch.equal(first.W_dec, again.W_dec) and not torch.equal(first.W_dec, other.W_dec)
    torch.testing.assert_close(first.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert torch.equal(first.W_enc, first.W_dec.T)
    assert first.W_enc.data_ptr() != first.W_dec.data_ptr()  # untied: a copy, not a view
    assert torch.equal(first.b_enc, torch.zeros(D_SAE)) and torch.equal(first.b_dec, torch.zeros(D_IN))
    assert tuple(first.W_enc.shape) == (D_IN, D_SAE) and tuple(first.W_dec.shape) == (D_SAE, D_IN)


def test_tied_weights_are_one_parameter_and_receive_encoder_gradients():
    sae = ReluSAE(config(tied=True))
    assert sorted(name for name, _ in sae.named_parameters()) == ["W_dec", "b_dec", "b_enc"]
    assert sae.W_enc.data_ptr() == sae.W_dec.data_ptr() and tuple(sae.W_enc.shape) == (D_IN, D_SAE)
    sae.encode(torch.randn(8, D_IN) + 1.0).sum().backward()  # the encoder path only
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_topk_keeps_the_k_largest_activations():
    sae = randomise(TopKSAE(config(architecture="topk", k=5)))
    x = torch.randn(12, D_IN)
    pre = sae.pre_activations(x).detach()
    codes = sae.encode(x).detach()
    for row_pre, row_codes in zip(pre, codes):
        top = row_pre.topk(5).indices
        expected = torch.zeros(D_SAE)
        expected[top] = torch.clamp(row_pre[top], min=0)
        assert torch.equal(row_codes, expected)
    assert ((codes != 0).sum(dim=1) <= 5).all()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive: exactly k survive
    assert ((sae.encode(x) != 0).sum(dim=1) == 5).all()


def test_topk_needs_a_valid_k():
    with pytest.raises(ValueError, match="k"):
        TopKSAE(config(architecture="topk", k=None))
    with pytest.raises(ValueError, match="k"):
        TopKSAE(config(architecture="topk", k=D_SAE + 1))


def test_registry_builds_by_name():
    assert type(build_dictionary(config(architecture="relu"))) is ReluSAE
    assert type(build_dictionary(config(architecture="standard"))) is ReluSAE
    assert type(build_dictionary(config(architecture="topk", k=4))) is TopKSAE
    with pytest.raises(ValueError, match="unknown dictionary architecture 'gated'"):
        build_dictionary(config(architecture="gated"))

    @register_architecture("test_double_relu")
    class DoubleRelu(ReluSAE):
        def activation(self, pre):
            return 2 * torch.relu(pre)

    try:
        assert type(build_dictionary(config(architecture="test_double_relu"))) is DoubleRelu
    finally:
        ARCHITECTURES.pop("test_double_relu")


@pytest.mark.parametrize("architecture,tied", [("standard", False), ("standard", True), ("topk", False)])
def test_folding_the_scale_is_exact(architecture, tied):
    """Trained on x/s, folded: reconstruction of raw x == s * reconstruction of x/s, codes scale by s."""
    normalised = randomise(build_dictionary(config(architecture=architecture, tied=tied, k=6)))
    x = torch.randn(20, D_IN) * 8.0
    for scale in (4.0, 2.7):
        folded = build_dictionary(config(architecture=architecture, tied=tied, k=6))
        folded.load_state_dict(normalised.state_dict())
        folded.fold_input_scale_(scale)
        assert folded.cfg.activation_scale == scale
        reconstruction, codes = folded(x)
        expected_reconstruction, expected_codes = normalised(x / scale)
        if scale == 4.0:  # a power of two: every rounding is the same, so equal bit for bit
            assert torch.equal(reconstruction, expected_reconstruction * scale)
            assert torch.equal(codes, expected_codes * scale)
        tolerance = 1e-6 * reconstruction.abs().max().item()  # float rounding of sums of large terms
        torch.testing.assert_close(reconstruction, expected_reconstruction * scale, rtol=1e-5, atol=tolerance)
        torch.testing.assert_close(codes, expected_codes * scale, rtol=1e-5, atol=tolerance)
        assert torch.equal(folded.W_dec, normalised.W_dec) and torch.equal(folded.W_enc, normalised.W_enc)
        if tied:
            assert folded.W_enc.data_ptr() == folded.W_dec.data_ptr()


def test_l0_and_fvu_by_hand():
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert l0(codes).item() == 1.5
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): total squared deviation 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared error 1
    assert fvu(x, x_hat).item() == pytest.approx(0.25)
    assert fvu(x, x).item() == 0.0


def test_feature_frequency_counts_dead_and_dense():
    frequency = FeatureFrequency(4, dense_threshold=0.5)
    frequency.update(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]]))
    frequency.update(torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]))  # [batch, pos, n]
    assert frequency.n_tokens == 4
    assert frequency.frequencies.tolist() == [1.0, 0.25, 0.0, 0.0]
    assert frequency.dead_fraction == 0.5 and frequency.dense_fraction == 0.25


def test_activation_metrics_are_exact_over_uneven_batches():
    sae = randomise(ReluSAE(config()))
    x = torch.randn(100, D_IN) * 2 + 1
    batches = [x[:7], x[7:60], {"blocks.1.hook_resid_post": x[60:]}]
    metrics = activation_metrics(sae, batches)
    with torch.no_grad():
        reconstruction, codes = sae(x)
    assert metrics["l0"] == pytest.approx(l0(codes).item(), rel=1e-6)
    assert metrics["fvu"] == pytest.approx(fvu(x, reconstruction).item(), rel=1e-5)
    assert metrics["mse"] == pytest.approx((x - reconstruction).pow(2).mean().item(), rel=1e-5)
    fired = (codes != 0).any(dim=0).float()
    assert metrics["dead_fraction"] == pytest.approx(1 - fired.mean().item())
    dense = ((codes != 0).float().mean(dim=0) > 0.1).float().mean().item()
    assert metrics["dense_fraction"] == pytest.approx(dense)
    with pytest.raises(ValueError, match="width 3"):
        activation_metrics(sae, [torch.randn(4, 3)])


def test_reconstruction_totals_leave_massive_activations_out_of_fvu_and_l0():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(40, D_IN, generator=generator), torch.randn(30, D_IN, generator=generator) + 1.0
    second[3] *= 500.0  # a massive activation: norm far above 10x the median of its batch
    error = [torch.randn(40, D_IN, generator=generator) * 0.1, torch.randn(30, D_IN, generator=generator) * 0.1]
    error[1][3] += 50.0  # badly reconstructed, as massive activations are
    codes = [torch.zeros(40, 6), torch.zeros(30, 6)]
    codes[0][:, 0], codes[1][:, 1], codes[1][3, 2:] = 1.0, 2.0, 1.0  # feature 5 fires only on the outlier
    totals = ReconstructionTotals(D_IN, 6, dense_threshold=0.5)
    for x, e, c in zip((first, second), error, codes):
        totals.update(x, x + e, c)
    summary = totals.summary()
    typical = torch.ones(70, dtype=torch.bool)
    typical[43] = False
    x_all, e_all, c_all = torch.cat([first, second]), torch.cat(error), torch.cat(codes)
    assert summary["fvu"] == pytest.approx(fvu(x_all[typical], (x_all + e_all)[typical]).item(), rel=1e-5)
    assert summary["fvu_all_tokens"] == pytest.approx(fvu(x_all, x_all + e_all).item(), rel=1e-5)
    assert summary["fvu_all_tokens"] != pytest.approx(summary["fvu"], rel=0.05)  # the outlier counts there
    assert summary["l0"] == pytest.approx((c_all[typical] != 0).sum(-1).float().mean().item())
    assert summary["l0"] == pytest.approx(1.0) and summary["outlier_fraction"] == pytest.approx(1 / 70)
    assert summary["mse"] == pytest.approx(e_all[typical].pow(2).mean().item(), rel=1e-5)
    assert summary["dead_fraction"] == 0.0  # counted over every token: feature 5 fired on the outlier
    assert summary["dense_fraction"] == pytest.approx(1 / 6)  # feature 0: 40 of 70 tokens


def test_dictionary_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Dictionary(config())
    with pytest.raises(TypeError, match="abstract"):
        SparseAutoencoder(config())


def test_a_registered_architecture_trains_with_no_change_to_the_loop(tmp_path):
    """The loop asks the SAE for its loss: a new architecture is its file and its registration."""
    from sae.batches import TensorBatchSource
    from sae.io import load_dictionary
    from sae.training import TrainingConfig, train_dictionaries

    @register_architecture("test_squared_relu")
    class SquaredRelu(SparseAutoencoder):
        def activation(self, pre):
            return torch.relu(pre).pow(2)

        def training_loss(self, x, state):
            codes = self.activation(self.pre_activations(x))
            residual, mse = self.reconstruction_terms(x, codes)
            return TrainingLoss(mse + 1e-3 * state.sparsity_ramp * codes.sum(dim=-1).mean(), mse, codes, residual)

    try:
        x = torch.randn(2048, D_IN) @ torch.randn(D_IN, D_IN)
        training = TrainingConfig(total_tokens=100 * 128, batch_size=128, lr=3e-3, log_every=50, checkpoint_every=None)
        cfg = config(architecture="test_squared_relu", hook_name="blocks.1.hook_resid_post")
        result = train_dictionaries(TensorBatchSource({cfg.hook_name: x}), [cfg], training, tmp_path, progress=False)[0]
        assert result.metrics["fvu"] < 0.5 and type(load_dictionary(result.folder)) is SquaredRelu
    finally:
        ARCHITECTURES.pop("test_squared_relu")


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "batchtopk"])
def test_encode_features_equals_the_slice_of_encode(architecture):
    from sae.config import DictionaryConfig
    from sae.registry import build_dictionary

    cfg = DictionaryConfig(architecture, d_in=12, d_sae=40, k=5, seed=3)
    sae = build_dictionary(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(2))
    indices = [0, 17, 39, 5]
    torch.testing.assert_close(sae.encode_features(x, indices), sae.encode(x)[..., indices], rtol=1e-5, atol=1e-6)
