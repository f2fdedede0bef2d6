"""Training SAEs on synthetic sparse data: quality, one pass for many SAEs, resampling, checkpoints,
exact resume and safety against interruption or a failing disk."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import sparse_data

import sae.io
from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.io import load_dictionary
from sae.metrics import activation_metrics
from sae.relu import ReluSAE
from sae.training import (LOG_COLUMNS, CheckpointWriteError, TrainingConfig, default_names,
                          resample_dead_features, train_dictionaries)

HOOK_A, HOOK_B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


class CountingSource(TensorBatchSource):
    """A TensorBatchSource that counts the batches drawn and can raise KeyboardInterrupt at one."""

    def __init__(self, activations, interrupt_at: int | None = None):
        super().__init__(activations)
        self.drawn = 0
        self.interrupt_at = interrupt_at

    def batches(self, hooks, batch_size, seed, start_batch=0):
        index = start_batch
        for batch in super().batches(hooks, batch_size, seed, start_batch):
            if index == self.interrupt_at:
                raise KeyboardInterrupt
            self.drawn += 1
            index += 1
            yield batch


# --- quality ------------------------------------------------------------------------------------

D_IN, N_TRUE = 32, 64


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    x, directions = sparse_data(16384, D_IN, N_TRUE, active=3)
    configs = [DictionaryConfig("standard", D_IN, 64, hook_name=HOOK_A, l1_coefficient=0.01),
               DictionaryConfig("standard", D_IN, 64, hook_name=HOOK_A, l1_coefficient=0.01, tied=True),
               DictionaryConfig("topk", D_IN, 64, hook_name=HOOK_A, k=3)]
    training = TrainingConfig(total_tokens=400 * 512, batch_size=512, lr=3e-3, log_every=50, checkpoint_every=None,
                              dead_window_tokens=100 * 512)
    out_dir = tmp_path_factory.mktemp("quality")
    results = train_dictionaries(TensorBatchSource({HOOK_A: x}), configs, training, out_dir, progress=False)
    return x, directions, results, training


def recovered_fraction(directions: torch.Tensor, decoder: torch.Tensor) -> float:
    """Fraction of true directions with a decoder row at cosine > 0.9."""
    best = (directions @ decoder.T).max(dim=1).values
    return (best > 0.9).float().mean().item()


def test_relu_sae_learns_the_true_sparse_dictionary(quality_run):
    x, directions, results, _ = quality_run
    # tied weights cannot undo the interference of 64 directions in 32 dimensions: fewer are recovered
    for result, recovered in zip(results[:2], (0.8, 0.5)):  # untied and tied
        dictionary = load_dictionary(result.folder, expected_d_in=D_IN)
        metrics = activation_metrics(dictionary, [x])  # raw activations: the scale is folded in
        assert metrics["fvu"] < 0.1, result.name
        assert metrics["l0"] < 64 / 3, result.name
        assert recovered_fraction(directions, dictionary.W_dec.detach()) > recovered, result.name
        torch.testing.assert_close(dictionary.W_dec.norm(dim=1), torch.ones(64))
    assert results[1].dictionary.cfg.tied and results[1].dictionary.W_enc.data_ptr() == results[1].dictionary.W_dec.data_ptr()


def test_topk_sae_learns_with_exactly_k_active(quality_run):
    x, directions, results, _ = quality_run
    metrics = activation_metrics(load_dictionary(results[2].folder), [x])
    assert metrics["l0"] == 3.0 and metrics["fvu"] < 0.1
    assert recovered_fraction(directions, results[2].dictionary.W_dec.detach()) > 0.8


def test_outputs_scale_and_log(quality_run):
    x, _, results, training = quality_run
    assert [result.name for result in results] == [f"{HOOK_A}__l1_0.01__untied", f"{HOOK_A}__l1_0.01__tied",
                                                   f"{HOOK_A}__k_3"]
    first_batch = next(TensorBatchSource({HOOK_A: x}).batches([HOOK_A], training.batch_size, training.seed))[HOOK_A]
    scale = math.sqrt(first_batch.pow(2).sum(dim=1).mean().item() / D_IN)
    for result in results:
        assert result.dictionary.cfg.activation_scale == pytest.approx(scale, rel=1e-6)
        assert result.metrics["activation_scale"] == result.dictionary.cfg.activation_scale
        log = pd.read_csv(result.folder / "training_log.csv")
        assert list(log.columns) == LOG_COLUMNS and log["step"].tolist() == list(range(50, 401, 50))
        assert log["tokens"].iloc[-1] == 400 * 512 and log["fvu"].iloc[-1] < log["fvu"].iloc[0]
        assert result.metrics["step"] == 400
    final = pd.read_csv(results[0].folder / "training_log.csv").iloc[-1]
    assert final["loss"] == pytest.approx(final["mse"] + 0.01 * final["l1"], rel=1e-5)


def test_schedules():
    training = TrainingConfig(total_tokens=1000, batch_size=10, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert training.total_steps == 100 and training.l1_warmup == 5
    assert [training.learning_rate(step) for step in (0, 9, 50, 80, 99)] == pytest.approx([0.1, 1, 1, 1, 0.05])
    assert [training.l1_coefficient(2.0, step) for step in (0, 4, 50)] == pytest.approx([0.4, 2.0, 2.0])


def test_training_config_is_checked():
    with pytest.raises(ValueError, match="must be positive"):
        TrainingConfig(total_tokens=640, batch_size=0)
    with pytest.raises(ValueError, match="lr_decay_fraction"):
        TrainingConfig(total_tokens=640, batch_size=64, lr_decay_fraction=1.5)


def test_first_batch_sets_the_scale_and_b_dec(tmp_path):
    activations = small_activations()
    training = TrainingConfig(total_tokens=64, batch_size=64, lr=0.0, checkpoint_every=None)  # lr 0: init is kept
    config = DictionaryConfig("standard", 16, 32, hook_name=HOOK_A, seed=7)
    result = train_dictionaries(TensorBatchSource(activations), [config], training, tmp_path, progress=False)[0]
    first = next(TensorBatchSource(activations).batches([HOOK_A], 64, training.seed))[HOOK_A]
    torch.testing.assert_close(result.dictionary.b_dec.detach(), first.mean(dim=0))  # folded back to raw units
    torch.testing.assert_close(result.dictionary.W_dec, ReluSAE(config).W_dec)  # renormalised: equal to rounding
    assert not result.dictionary.b_enc.any()


def test_default_names_say_what_differs():
    configs = [DictionaryConfig("standard", 8, 16, hook_name=HOOK_A, l1_coefficient=0.001),
               DictionaryConfig("standard", 8, 16, hook_name=HOOK_A, l1_coefficient=0.003),
               DictionaryConfig("topk", 8, 16, hook_name=HOOK_A, k=32 // 4),
               DictionaryConfig("standard", 8, 16, hook_name=HOOK_B)]
    assert default_names(configs) == [f"{HOOK_A}__l1_0.001", f"{HOOK_A}__l1_0.003", f"{HOOK_A}__k_8", HOOK_B]


# --- one pass over the activations, and early failures --------------------------------------------


def small_activations(n_tokens: int = 2048, d_in: int = 16):
    x, _ = sparse_data(n_tokens, d_in, 32, active=3, seed=1)
    y, _ = sparse_data(n_tokens, d_in, 32, active=2, seed=2)
    return {HOOK_A: x, HOOK_B: y}


def test_many_saes_read_the_activations_once(tmp_path):
    source = CountingSource(small_activations())
    configs = [DictionaryConfig("standard", 16, 32, hook_name=HOOK_A, l1_coefficient=l1) for l1 in (0.01, 0.03)]
    configs.append(DictionaryConfig("topk", 16, 32, hook_name=HOOK_B, k=4))
    training = TrainingConfig(total_tokens=12 * 64, batch_size=64, log_every=4, checkpoint_every=None)
    results = train_dictionaries(source, configs, training, tmp_path, progress=False)
    assert source.drawn == 12
    assert [result.name for result in results] == [f"{HOOK_A}__l1_0.01", f"{HOOK_A}__l1_0.03", HOOK_B]
    for result in results:
        assert sorted(path.name for path in result.folder.iterdir()) == [
            "cfg.json", "sae_weights.safetensors", "training_log.csv"]
    assert not (tmp_path / "checkpoints").exists()
    # one Adam per SAE: the two ReLU SAEs start equal (same seed) and part ways by their L1 coefficient
    assert not torch.equal(results[0].dictionary.W_dec, results[1].dictionary.W_dec)


def test_width_mismatch_fails_before_any_compute(tmp_path):
    source = CountingSource(small_activations())
    configs = [DictionaryConfig("standard", 20, 32, hook_name=HOOK_A)]
    with pytest.raises(ValueError, match=f"'{HOOK_A}' has d_in=20, but the activations there have width 16"):
        train_dictionaries(source, configs, TrainingConfig(total_tokens=640, batch_size=64), tmp_path / "out")
    with pytest.raises(ValueError, match="not in the activation source"):
        train_dictionaries(source, [DictionaryConfig("standard", 16, 32, hook_name="blocks.9.hook_resid_post")],
                           TrainingConfig(total_tokens=640, batch_size=64), tmp_path / "out")
    assert source.drawn == 0 and not (tmp_path / "out").exists()


# --- resampling -----------------------------------------------------------------------------------


def test_resampling_revives_dead_features(tmp_path):
    x, _ = sparse_data(8192, 32, n_true=8, active=2)  # far fewer true features than the SAE has: many die
    configs = [DictionaryConfig("standard", 32, 128, hook_name=HOOK_A, l1_coefficient=0.05)]
    dead_after = {}
    for resample in (False, True):
        training = TrainingConfig(total_tokens=400 * 256, batch_size=256, lr=3e-3, log_every=50,
                                  checkpoint_every=None, dead_window_tokens=50 * 256, resample_dead=resample,
                                  resample_every=100, unit_norm_decoder=True)  # the paper's recipe: many die
        results = train_dictionaries(TensorBatchSource({HOOK_A: x}), configs, training, tmp_path / str(resample),
                                     progress=False, stop_after_steps=200)  # right after the resampling at 200
        dead_after[resample] = activation_metrics(results[0].dictionary, [x])["dead_fraction"]
    assert dead_after[False] > 0.25
    # revived: only features that died within the last window (not yet counted as dead) stay silent
    assert dead_after[True] < min(0.15, dead_after[False] / 4)


def test_resampled_features_point_at_residuals_and_restart_adam():
    sae = ReluSAE(DictionaryConfig("standard", 16, 32, seed=1))
    optimizer = torch.optim.Adam(sae.parameters())
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    (sae(x).reconstruction - x).pow(2).mean().backward()
    optimizer.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 20]] = True
    with torch.no_grad():
        residual = x - sae(x).reconstruction
        alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    assert resample_dead_features(sae, optimizer, dead, residual, torch.Generator().manual_seed(0)) == 3
    with torch.no_grad():
        normalised = residual / residual.norm(dim=1, keepdim=True)
        for feature in (3, 7, 20):  # each new direction is one of the batch residuals
            assert (normalised - sae.W_dec[feature]).abs().max(dim=1).values.min() < 1e-6
        torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0), torch.full((3,), 0.2 * alive_norm.item()))
        assert (sae.b_enc[dead] == 0).all()
    for name in ("W_dec", "b_enc"):
        state = optimizer.state[getattr(sae, name)]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
        assert (state["exp_avg"][~dead] != 0).any()
    assert (optimizer.state[sae.W_enc]["exp_avg"][:, dead] == 0).all()


# --- checkpoints and resume ------------------------------------------------------------------------


RESUME_CONFIGS = [DictionaryConfig("standard", 16, 64, hook_name=HOOK_A, l1_coefficient=0.1),
                  DictionaryConfig("topk", 16, 64, hook_name=HOOK_A, k=4),
                  DictionaryConfig("standard", 16, 64, hook_name=HOOK_B, l1_coefficient=0.1, tied=True, seed=5)]
RESUME_TRAINING = TrainingConfig(total_tokens=40 * 64, batch_size=64, log_every=5, checkpoint_every=10,
                                 dead_window_tokens=3 * 64, resample_dead=True, resample_every=10)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """40 uninterrupted steps, with resampling and AuxK active."""
    out_dir = tmp_path_factory.mktemp("reference")
    results = train_dictionaries(TensorBatchSource(small_activations()), RESUME_CONFIGS, RESUME_TRAINING, out_dir,
                                 progress=False)
    return out_dir, results


def assert_same_results(out_dir: Path, reference_dir: Path) -> None:
    for name in default_names(RESUME_CONFIGS):
        ours, theirs = load_dictionary(out_dir / name), load_dictionary(reference_dir / name)
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), (name, key)
        assert ours.cfg == theirs.cfg
        log_file = f"{name}/training_log.csv"
        assert (out_dir / log_file).read_text() == (reference_dir / log_file).read_text()


def checkpoint_names(out_dir: Path) -> list[str]:
    return sorted(path.name for path in (out_dir / "checkpoints").iterdir())


def test_reference_run_keeps_the_last_two_checkpoints(reference_run):
    out_dir, results = reference_run
    assert checkpoint_names(out_dir) == ["step_00000030", "step_00000040"]
    # the TopK SAE has dead latents, so AuxK and resampling both shape the run that resume must reproduce
    assert (pd.read_csv(results[1].folder / "training_log.csv")["dead_fraction"] > 0).any()


def test_resume_is_exact(tmp_path, reference_run):
    source = CountingSource(small_activations())
    # stop between checkpoints, where the TopK SAE has a dead latent (AuxK on, counters matter)
    train_dictionaries(source, RESUME_CONFIGS, RESUME_TRAINING, tmp_path, progress=False, stop_after_steps=25)
    assert source.drawn == 25 and checkpoint_names(tmp_path) == ["step_00000020", "step_00000025"]
    source.drawn = 0
    train_dictionaries(source, RESUME_CONFIGS, RESUME_TRAINING, tmp_path, progress=False)
    assert source.drawn == 15  # resumed at batch 25
    assert_same_results(tmp_path, reference_run[0])


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, reference_run):
    other = [DictionaryConfig("standard", 16, 64, hook_name=HOOK_A, l1_coefficient=0.5), *RESUME_CONFIGS[1:]]
    with pytest.raises(ValueError, match="different run"):
        train_dictionaries(TensorBatchSource(small_activations()), other, RESUME_TRAINING, reference_run[0],
                           names=default_names(RESUME_CONFIGS), progress=False)


def test_keyboard_interrupt_keeps_the_last_good_checkpoint(tmp_path, reference_run):
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(CountingSource(small_activations(), interrupt_at=25), RESUME_CONFIGS, RESUME_TRAINING,
                           tmp_path, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints"]  # no half-done dictionary folders
    assert checkpoint_names(tmp_path) == ["step_00000010", "step_00000020"]
    train_dictionaries(TensorBatchSource(small_activations()), RESUME_CONFIGS, RESUME_TRAINING, tmp_path,
                       progress=False)
    assert_same_results(tmp_path, reference_run[0])


@pytest.mark.parametrize("failure", ["disk full", "interrupt"])
def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, reference_run, failure):
    real_write = sae.io.atomic_write_bytes

    def failing_write(path, data):
        if path.parent.name.startswith(".step_00000020"):
            if failure == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(sae.io, "atomic_write_bytes", failing_write)
    expected = KeyboardInterrupt if failure == "interrupt" else CheckpointWriteError
    with pytest.raises(expected) as caught:
        train_dictionaries(TensorBatchSource(small_activations()), RESUME_CONFIGS, RESUME_TRAINING, tmp_path,
                           progress=False)
    if failure == "disk full":
        assert isinstance(caught.value, OSError)
        message = str(caught.value)
        assert "step 20" in message and "No space left" in message and "step_00000010 is intact" in message
    assert checkpoint_names(tmp_path) == ["step_00000010"]  # and no temporary folder left behind
    monkeypatch.undo()
    train_dictionaries(TensorBatchSource(small_activations()), RESUME_CONFIGS, RESUME_TRAINING, tmp_path,
                       progress=False)
    assert_same_results(tmp_path, reference_run[0])


def test_activation_scale_ignores_massive_activation_outliers():
    from sae.training import activation_scale

    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0))
    with_outlier = x.clone()
    with_outlier[5] *= 5000.0
    assert activation_scale(with_outlier) == pytest.approx(activation_scale(x), rel=0.01)
    assert activation_scale(x) == pytest.approx(1.0, rel=0.05)


def test_massive_activation_rows_are_left_out_of_training(tmp_path):
    """A few rows 1000x larger than the rest (attention sinks) would dominate the loss; by default each
    batch drops them, which gives a better SAE on the typical rows than training on them does."""
    x, _ = sparse_data(6144, 16, 32, 3)
    generator = torch.Generator().manual_seed(1)
    massive = torch.randperm(x.shape[0], generator=generator)[:12]
    with_outliers = x.clone()
    with_outliers[massive] = torch.randn(12, 16, generator=generator) * 3000.0
    typical = torch.ones(x.shape[0], dtype=torch.bool)
    typical[massive] = False
    cfg = DictionaryConfig("standard", d_in=16, d_sae=64, hook_name=HOOK_A, l1_coefficient=1e-3)
    results = {}
    for exclude in (True, False):
        training = TrainingConfig(total_tokens=6144 * 6, batch_size=512, lr=3e-3, checkpoint_every=None,
                                  exclude_outliers=exclude)
        result = train_dictionaries(TensorBatchSource({HOOK_A: with_outliers}), [cfg], training,
                                    tmp_path / str(exclude), progress=False)[0]
        results[exclude] = activation_metrics(result.dictionary, [x[typical]])["fvu"]
    assert results[True] < 0.6 * results[False]
