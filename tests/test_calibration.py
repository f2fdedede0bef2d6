"""Sparsity by a target L0 (sae.training.calibration, `train --target-l0`): the pilots' choice lands the L0."""

import dataclasses
import json
import math

import torch

import pytest

from conftest import sparse_data
from sae.batches import TensorBatchSource
from sae.config import DictionaryConfig
from sae.training import TrainingConfig, train_dictionaries
from sae.training.calibration import (calibrate_sparsity, default_pilot_tokens, interpolate_setting, measured_l0,
                                      pilot_training)
from sparse_circuits.cli.main import main

HOOK = "blocks.0.hook_resid_post"


def test_interpolation_recovers_a_power_law():
    # L0 = 50 * (alpha / 1e-3) ** -0.7: the log-log interpolation is exact for it
    def law(alpha):
        return 50 * (alpha / 1e-3) ** -0.7

    trials = [(alpha, law(alpha)) for alpha in (1e-4, 5e-4, 2e-3, 8e-3)]
    estimate = interpolate_setting(trials, 20.0)
    assert law(estimate) == pytest.approx(20.0, rel=1e-9)
    assert interpolate_setting(trials, 1e6) is None  # nothing brackets it
    assert interpolate_setting(trials, 0.1) is None


def test_pilot_schedule_keeps_the_shape_of_the_run():
    run = TrainingConfig(total_tokens=4_000_000, batch_size=4096, lr_warmup_steps=100, checkpoint_every=200,
                         resample_dead=True)
    pilot = pilot_training(run, 1_000_000)
    assert pilot.total_steps == 1_000_000 // 4096
    assert pilot.lr_warmup_steps == round(100 * pilot.total_steps / run.total_steps)
    assert pilot.checkpoint_every is None and not pilot.resample_dead
    assert pilot.lr_decay_fraction == run.lr_decay_fraction and pilot.lr == run.lr
    assert default_pilot_tokens(4_000_000) == 1_000_000
    assert default_pilot_tokens(100_000) == 100_000 and default_pilot_tokens(600_000) == 1 << 18


def synthetic_source(n_tokens=24_000, d_in=32):
    data, _ = sparse_data(n_tokens, d_in, n_true=96, active=6, seed=3)
    return TensorBatchSource({HOOK: data})


def test_calibrated_coefficient_gives_the_target_l0_in_the_full_run(tmp_path):
    source = synthetic_source()
    config = DictionaryConfig(architecture="standard", d_in=32, d_sae=128, hook_name=HOOK, l1_coefficient=1e-3)
    training = TrainingConfig(total_tokens=4 * 24_000, batch_size=256, lr=3e-3, lr_warmup_steps=10,
                              checkpoint_every=None)
    for target in (6.0, 20.0):
        calibration = calibrate_sparsity(source, config, training, target, tmp_path / f"pilots_{target}",
                                         pilot_tokens=training.total_tokens // 2, progress=False)
        assert not (tmp_path / f"pilots_{target}").exists()  # the scratch pilots are removed
        assert calibration.setting == "l1_coefficient" and len(calibration.trials) >= 7
        assert len(calibration.full_trials) >= 3  # the pilot is shorter than the run: pilots as long as the run follow
        lows = [value for value, measured in calibration.full_trials if measured > target]
        highs = [value for value, measured in calibration.full_trials if measured < target]
        assert max(lows) <= calibration.chosen <= min(highs)  # between the full-length trials that bracket the target
        chosen = DictionaryConfig(architecture="standard", d_in=32, d_sae=128, hook_name=HOOK,
                                  l1_coefficient=calibration.chosen)
        [result] = train_dictionaries(source, [chosen], training, tmp_path / f"run_{target}", progress=False)
        rows = next(source.batches([HOOK], 4096, 99))[HOOK]
        assert measured_l0(result.dictionary, rows) == pytest.approx(target, rel=0.2)


def test_the_l0_controller_corrects_a_wrong_coefficient_and_resumes_exactly(tmp_path):
    # a coefficient far too small gives L0 far above the target without control; the controller brings it
    # to within 20%, and a run killed half-way and resumed ends bit for bit where an uninterrupted one does
    source = synthetic_source()
    config = DictionaryConfig(architecture="standard", d_in=32, d_sae=128, hook_name=HOOK, l1_coefficient=0.01)
    training = TrainingConfig(total_tokens=8 * 24_000, batch_size=256, lr=3e-3, lr_warmup_steps=10,
                              checkpoint_every=100)
    rows = next(source.batches([HOOK], 4096, 99))[HOOK]
    [fixed] = train_dictionaries(source, [config], training, tmp_path / "fixed", progress=False)
    steered = dataclasses.replace(training, target_l0=8.0)
    [whole] = train_dictionaries(source, [config], steered, tmp_path / "whole", progress=False)
    assert measured_l0(fixed.dictionary, rows) > 1.5 * 8.0
    assert measured_l0(whole.dictionary, rows) == pytest.approx(8.0, rel=0.2)
    train_dictionaries(source, [config], steered, tmp_path / "resumed", progress=False, stop_after_steps=300)
    [resumed] = train_dictionaries(source, [config], steered, tmp_path / "resumed", progress=False)
    assert resumed.dictionary.cfg.l1_coefficient == whole.dictionary.cfg.l1_coefficient
    for name, tensor in whole.dictionary.state_dict().items():
        assert torch.equal(tensor, resumed.dictionary.state_dict()[name]), name


def test_k_architectures_take_the_target_as_k(tmp_path):
    config = DictionaryConfig(architecture="topk", d_in=32, d_sae=128, hook_name=HOOK, k=4)
    training = TrainingConfig(total_tokens=10_000, batch_size=256)
    calibration = calibrate_sparsity(synthetic_source(), config, training, 12.4, tmp_path / "pilots", progress=False)
    assert (calibration.setting, calibration.chosen, calibration.trials) == ("k", 12.0, [])
    with pytest.raises(ValueError, match="below the dictionary width 128"):
        calibrate_sparsity(synthetic_source(), config, training, 128, tmp_path / "pilots", progress=False)


def test_train_target_l0_on_a_model_records_and_reuses_the_choice(tiny_llama_folder, text_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_llama_folder), "--corpus", str(text_corpus), "--hook", "blocks.1.hook_resid_post",
            "--tokens", "3000", "--context-size", "16", "--batch-size", "128", "--epochs", "6", "--lr", "3e-3",
            "--target-l0", "30", "--pilot-tokens", "9000", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibrated blocks.1.hook_resid_post: l1_coefficient" in printed and "for target L0 30" in printed
    cfg = json.loads((out / "blocks.1.hook_resid_post" / "cfg.json").read_text())
    record = cfg["extra"]["calibration"]
    assert cfg["l1_coefficient"] == pytest.approx(record["chosen"]) and record["target_l0"] == 30
    assert "l0_control" not in cfg["extra"]  # the CLI does not steer during the run
    assert record["pilot_tokens"] == 9000 and len(record["trials"]) >= 7 and len(record["full_length_trials"]) >= 3
    assert cfg["extra"]["request"]["target_l0"] == 30
    kept = json.loads((out / "calibration.json").read_text())
    assert [entry["chosen"] for entry in kept.values()] == [record["chosen"]]
    assert not (out / "calibration_pilots").exists()
    before = (out / "blocks.1.hook_resid_post" / "sae_weights.safetensors").read_bytes()
    assert main(argv) == 0  # the rerun reuses the kept choice (no pilots) and the finished dictionary
    assert "kept in" in capsys.readouterr().out
    assert (out / "blocks.1.hook_resid_post" / "sae_weights.safetensors").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--l1", "1e-3"], "give --target-l0 or --l1, not both"),
    (["--k", "8"], "give --target-l0 or --k, not both"),
    (["--target-l0", "nan"], "--target-l0"),
])
def test_target_l0_bad_input(extra, message, tmp_path, capsys):
    argv = ["train", "--hook", "blocks.1.hook_resid_post", "--out", str(tmp_path / "o"), *extra]
    if "--target-l0" not in extra:
        argv += ["--target-l0", "40"]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
