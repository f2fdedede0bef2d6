"""JumpReLU and BatchTopK: encode formulas, scale folding, training behaviour, exact resume and the
SAELens file layout (BatchTopK saved as JumpReLU with its global threshold)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import sparse_data

from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.io import load_dictionary, save_dictionary
from sae.metrics import activation_metrics
from sae.registry import build_dictionary
from sae.training import TrainingConfig, train_dictionaries

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE = 16, 48


def sparse_activations(n_tokens: int = 8192, d_in: int = D_IN, n_true: int = 48, active: int = 3, seed: int = 0):
    """Sparse nonnegative combinations of `active` of `n_true` unit directions, plus an offset."""
    return sparse_data(n_tokens, d_in, n_true, active, seed)[0]


def config(architecture: str, **overrides) -> DictionaryConfig:
    values = dict(architecture=architecture, d_in=D_IN, d_sae=D_SAE, hook_name=HOOK, seed=2)
    values.update(overrides)
    return DictionaryConfig(**values)


def randomise(sae, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.5
            parameter.copy_(values.abs() if name == "threshold" else values)
    return sae


# --- JumpReLU ------------------------------------------------------------------------------------


def test_jumprelu_matches_the_formula_and_folds_the_scale_into_its_threshold():
    sae = randomise(build_dictionary(config("jumprelu")))
    x = torch.randn(30, D_IN) * 2
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        expected = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp_min(0)
        torch.testing.assert_close(sae.encode(x), expected)
        assert (expected == 0).any() and (expected > 0).any() and ((pre > 0) & (expected == 0)).any()
        folded = randomise(build_dictionary(config("jumprelu")))
        folded.fold_input_scale_(4.0)
        torch.testing.assert_close(folded.threshold, sae.threshold * 4.0)
        reconstruction, codes = folded(x * 4.0)
        assert torch.equal(codes, sae.encode(x) * 4.0)
        torch.testing.assert_close(reconstruction, sae(x)[0] * 4.0)


def train(tmp_path, configs, total_steps: int = 300, **training_overrides):
    values = dict(total_tokens=total_steps * 256, batch_size=256, lr=3e-3, log_every=50, checkpoint_every=None,
                  dead_window_tokens=50 * 256)
    values.update(training_overrides)
    training = TrainingConfig(**values)
    x = sparse_activations()
    results = train_dictionaries(TensorBatchSource({HOOK: x}), configs, training, tmp_path, progress=False)
    return x, results


def test_jumprelu_trains_and_its_l0_follows_the_coefficient(tmp_path):
    coefficients = (1e-4, 3e-2)
    x, results = train(tmp_path, [config("jumprelu", l1_coefficient=c) for c in coefficients], log_every=25)
    l0s = []
    for result in results:
        log = pd.read_csv(result.folder / "training_log.csv")
        assert log["loss"].iloc[-1] < 0.6 * log["loss"].iloc[0], result.name
        dictionary = load_dictionary(result.folder)
        assert type(dictionary).__name__ == "JumpReLUSAE" and (dictionary.threshold > 0).all()
        metrics = activation_metrics(dictionary, [x])
        assert metrics["fvu"] < 0.2, (result.name, metrics)
        l0s.append(metrics["l0"])
    assert l0s[1] < 0.5 * l0s[0], l0s  # the L0 penalty works: 300x the coefficient, under half the L0


def assert_resume_is_exact(tmp_path, configs):
    training = dict(total_steps=30, checkpoint_every=10, dead_window_tokens=3 * 256, resample_dead=True,
                    resample_every=10, log_every=5)
    _, reference = train(tmp_path / "reference", configs, **training)
    x = sparse_activations()
    values = dict(total_tokens=30 * 256, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=10,
                  dead_window_tokens=3 * 256, resample_dead=True, resample_every=10)
    source = TensorBatchSource({HOOK: x})
    train_dictionaries(source, configs, TrainingConfig(**values), tmp_path / "resumed", progress=False,
                       stop_after_steps=15)
    resumed = train_dictionaries(source, configs, TrainingConfig(**values), tmp_path / "resumed", progress=False)
    for ours, theirs in zip(resumed, reference):
        for key, value in theirs.dictionary.state_dict().items():
            assert torch.equal(ours.dictionary.state_dict()[key], value), (ours.name, key)
        assert (ours.folder / "training_log.csv").read_text() == (theirs.folder / "training_log.csv").read_text()


def test_jumprelu_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, [config("jumprelu", l1_coefficient=1e-2)])


def test_jumprelu_round_trip_in_saelens_layout(tmp_path):
    sae = randomise(build_dictionary(config("jumprelu")))
    folder = save_dictionary(sae, tmp_path / "jumprelu")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["sae_lens_version"] >= "6"
    loaded = load_dictionary(folder)
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x)[0], sae(x)[0])


# --- BatchTopK -----------------------------------------------------------------------------------


def test_batchtopk_keeps_k_per_token_on_average_over_the_batch():
    from sae.batchtopk import batch_topk

    pre = torch.randn(10, D_SAE)
    codes = batch_topk(pre, 3)
    assert int((codes != 0).sum()) == 30 and len(set((codes != 0).sum(dim=1).tolist())) > 1  # uneven per token
    kept = codes[codes != 0]
    assert kept.min() >= torch.relu(pre).flatten().topk(30).values.min()
    assert torch.equal(codes[codes != 0], pre[codes != 0])


def test_batchtopk_encodes_with_its_threshold_and_folds_the_scale():
    sae = randomise(build_dictionary(config("batchtopk", k=4)))
    sae.threshold.fill_(0.3)
    x = torch.randn(30, D_IN) * 2
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.encode(x), torch.where(pre > 0.3, pre, torch.zeros_like(pre)))
        folded = randomise(build_dictionary(config("batchtopk", k=4)))
        folded.threshold.fill_(0.3)
        folded.fold_input_scale_(4.0)
        assert folded.threshold.item() == pytest.approx(1.2)
        assert torch.equal(folded.encode(x * 4.0), sae.encode(x) * 4.0)


def test_batchtopk_trains_to_mean_l0_k_and_saves_as_jumprelu(tmp_path):
    x, results = train(tmp_path, [config("batchtopk", k=4)], log_every=25)
    result = results[0]
    log = pd.read_csv(result.folder / "training_log.csv")
    assert log["loss"].iloc[-1] < 0.5 * log["loss"].iloc[0]
    assert (log["l0"] == 4.0).all()  # training: exactly k x batch codes per batch
    assert result.dictionary.threshold.item() > 0
    cfg = json.loads((result.folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "batchtopk"
    loaded = load_dictionary(result.folder)
    assert type(loaded).__name__ == "JumpReLUSAE"
    assert torch.equal(loaded.threshold, torch.full((D_SAE,), result.dictionary.threshold.item()))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), result.dictionary.encode(x))
        assert torch.equal(loaded(x)[0], result.dictionary(x)[0])
    metrics = activation_metrics(loaded, [x])  # inference with the learned threshold: L0 close to k
    assert 3.0 < metrics["l0"] < 5.0 and metrics["fvu"] < 0.3, metrics  # untrained: fvu ~1


def test_batchtopk_resume_is_exact(tmp_path):
    assert_resume_is_exact(tmp_path, [config("batchtopk", k=4), config("topk", k=4)])
