"""NaN and infinity stop a run with an error naming the step and the hook; the last good checkpoint is kept
and no dictionary is written from NaN state (issue 15)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae.activation_store import ActivationStore, StoreWriter, store_settings
from sae.batches import TensorBatchSource, epoch_permutation
from sae.config import DictionaryConfig
from sae.finite import NonFiniteError
from sae.io import read_tensor_file
from sae.metrics import typical_token_mask
from sae.training import TrainingConfig, latest_checkpoint, train_dictionaries

HOOK = "blocks.1.hook_resid_post"
TOKENS_PER_SHARD, D_IN, N_SHARDS = 256, 8, 4


def _store(folder, nan_shard: int | None = None, nan_rows: int = 3):
    """A store of N_SHARDS random shards; `nan_rows` rows of shard `nan_shard` are NaN."""
    generator = torch.Generator().manual_seed(0)
    writer = StoreWriter(folder, store_settings("tiny", [HOOK], "float32", 9, True), N_SHARDS * 32)
    writer.start()
    for index in range(N_SHARDS):
        shard = torch.randn(TOKENS_PER_SHARD, D_IN, generator=generator)
        if index == nan_shard:
            shard[5 : 5 + nan_rows] = float("nan")
        writer.write({HOOK: shard}, index * 32, 32)
    return ActivationStore(writer.finish().folder, memory_budget_bytes=TOKENS_PER_SHARD * D_IN * 4)  # a shard a block


CONFIG = DictionaryConfig("standard", D_IN, 32, hook_name=HOOK, l1_coefficient=1e-3)


def _training(**overrides) -> TrainingConfig:
    settings = dict(total_tokens=N_SHARDS * TOKENS_PER_SHARD, batch_size=32, checkpoint_every=5, log_every=5)
    return TrainingConfig(**{**settings, **overrides})


def _assert_checkpoint_intact(out_dir, before_step: int) -> None:
    checkpoint = latest_checkpoint(out_dir)
    assert checkpoint is not None
    state = json.loads((checkpoint / "state.json").read_text())
    assert 0 < state["step"] < before_step
    for tensor in read_tensor_file(checkpoint / "blocks.1.hook_resid_post.safetensors").values():
        assert torch.isfinite(tensor.double()).all()
    assert not list((out_dir / "checkpoints").glob(".*"))  # no temporary folder left


def test_nan_rows_in_a_shard_stop_training_naming_the_step_shard_and_hook(tmp_path):
    last_read = int(epoch_permutation(N_SHARDS, 0, 0)[-1])  # the shard read last: checkpoints come before it
    store = _store(tmp_path / "store", nan_shard=last_read)
    out_dir = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        train_dictionaries(store, [CONFIG], _training(), out_dir, progress=False)
    message = str(caught.value)
    step = 3 * TOKENS_PER_SHARD // 32 + 1  # the first batch of the fourth block
    assert f"training step {step}:" in message and f"shard_{last_read:05d}" in message and HOOK in message
    assert "3 of 256 activation rows hold NaN" in message and "no dictionary was written" in message
    assert f"step_{(step - 1) // 5 * 5:08d} is kept" in message
    _assert_checkpoint_intact(out_dir, step)
    assert not (out_dir / HOOK).exists()
    # once the shard is harvested again, the rerun resumes from that checkpoint and finishes
    repaired = _store(tmp_path / "store2")
    train_dictionaries(repaired, [CONFIG], _training(), out_dir, progress=False)
    assert (out_dir / HOOK / "sae_weights.safetensors").exists()


def test_a_nan_learning_rate_stops_training_at_that_step(tmp_path, monkeypatch):
    training = _training()
    real = TrainingConfig.learning_rate
    monkeypatch.setattr(TrainingConfig, "learning_rate",
                        lambda self, step: float("nan") if step >= 13 else real(self, step))  # 0-based: step 14
    out_dir = tmp_path / "out"
    with pytest.raises(NonFiniteError) as caught:
        train_dictionaries(TensorBatchSource({HOOK: torch.randn(1024, D_IN)}), [CONFIG], training, out_dir,
                           progress=False)
    message = str(caught.value)
    assert f"training step 14 of '{HOOK}' (hook '{HOOK}', learning rate nan)" in message
    assert "hold NaN or infinite values after the optimizer step" in message
    assert "step_00000010 is kept" in message
    _assert_checkpoint_intact(out_dir, 14)
    assert sorted(path.name for path in out_dir.iterdir()) == ["checkpoints"]


def test_a_nan_loss_names_the_step(tmp_path):
    config = DictionaryConfig("standard", D_IN, 32, hook_name=HOOK, l1_coefficient=1e-3)
    x = torch.randn(1024, D_IN)
    x[100] = 1e30  # squared, it overflows float32: the loss is inf, though every activation is finite
    with pytest.raises(NonFiniteError, match=r"training step \d+ .*the loss is inf"):
        train_dictionaries(TensorBatchSource({HOOK: x}), [config], _training(exclude_outliers=False),
                           tmp_path, progress=False)


@pytest.mark.parametrize("field", ["lr", "aux_k_coefficient", "total_tokens"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_training_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        _training(**{field: value})


@pytest.mark.parametrize("field", ["l1_coefficient", "activation_scale"])
def test_dictionary_config_refuses_non_finite_numbers(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        DictionaryConfig("standard", D_IN, 32, hook_name=HOOK, **{field: math.nan})


def test_typical_token_mask_refuses_nan_rows_instead_of_dropping_every_row():
    x = torch.randn(100, D_IN)
    x[7] = math.nan
    with pytest.raises(NonFiniteError, match="1 of 100 activation rows"):
        typical_token_mask(x)


def test_nan_activations_stop_a_harvest_naming_the_hook_and_contexts(tiny_llama, tmp_path, monkeypatch):
    import circuits.harvest
    from circuits.harvest import harvest_activations

    real = circuits.harvest.collect_activations
    calls = []

    def poisoned(model, tokens, hooks, **options):
        calls.append(1)
        values = real(model, tokens, hooks, **options)
        if len(calls) == 3:
            values[hooks[0]][0, 2] = math.inf
        return values

    monkeypatch.setattr(circuits.harvest, "collect_activations", poisoned)
    contexts = torch.randint(3, 40, (12, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=rf"contexts 8-11 of 12, hook '{HOOK}'.*1 of 28 activation rows"):
        harvest_activations(tiny_llama, contexts, [HOOK], tmp_path, batch_size=4, contexts_per_shard=4,
                            progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]  # the good shards are kept


def test_a_saved_dictionary_holding_nan_is_refused_on_load(tmp_path, random_sae):
    from sae.io import DictionaryFileError, load_dictionary, save_dictionary

    sae = random_sae()
    with torch.no_grad():
        sae.b_enc[3] = math.nan
    folder = save_dictionary(sae, tmp_path / HOOK)
    with pytest.raises(DictionaryFileError, match=r"\['b_enc'\] hold NaN or infinite values"):
        load_dictionary(folder)


def test_an_engine_run_whose_output_is_nan_stops_before_anything_is_measured(tiny_llama):
    from circuits.engine import run_with_edits

    tokens = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"

    def poison(activation):
        activation = activation.clone()
        activation[1, 2] = math.nan
        return activation

    with pytest.raises(NonFiniteError, match=rf"edits at \['{hook}'\] holds NaN or infinite values in 1 of 2 rows"):
        run_with_edits(tiny_llama, tokens, edits={hook: poison})
    assert torch.isfinite(run_with_edits(tiny_llama, tokens).output).all()


def test_patched_logits_holding_nan_stop_the_ioi_patcher(tiny_llama):
    from circuits.engine import CachedRun

    tokens = torch.randint(3, 40, (3, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    run = CachedRun(tiny_llama, HOOK, tokens, torch.full((3,), 7))
    bucket = run.buckets[0]
    activations = torch.zeros(bucket.rows.numel(), bucket.tokens.shape[1], tiny_llama.cfg.d_model)
    assert torch.isfinite(run.run(bucket, activations)).all()
    activations[1, 3] = math.nan
    with pytest.raises(NonFiniteError, match=rf"patched model output at hook '{HOOK}': 1 of 3 prompts' logits"):
        run.run(bucket, activations)
