"""Integration: a small SAE trained on the real default model and real text beats trivial baselines."""

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry_corpus():
    from sae.corpus import load_corpus

    return load_corpus("registry")


def test_real_model_default_assets(real_model):
    """The fetched model is the one ASSETS describes and answers a simple IOI prompt correctly."""
    assert (real_model.cfg.n_layers, real_model.cfg.d_model) == (30, 576)
    logits = real_model(real_model.to_tokens("When Mary and John went to the store, John gave a drink to"))
    mary, john = real_model.to_single_token(" Mary"), real_model.to_single_token(" John")
    assert logits[0, -1].argmax().item() == mary
    assert logits[0, -1, mary] - logits[0, -1, john] > 3


def test_small_sae_on_real_activations_beats_trivial_baselines(real_model, registry_corpus, tmp_path):
    from sparse_circuits.pipelines.evaluate import evaluate_folders
    from sparse_circuits.pipelines.train import TrainRequest, train_on_model

    hook = "blocks.6.hook_resid_post"
    request = TrainRequest(hooks=[hook], tokens=24_000, epochs=10, batch_size=1024, l1_coefficients=[1e-3],
                           checkpoint_every=1000, lr=2e-3)
    [result] = train_on_model(real_model, registry_corpus, request, tmp_path, progress=False)
    [evaluation] = evaluate_folders(real_model, [result.folder], registry_corpus, tokens=1500, progress=False)
    # Trivial baselines: predicting the mean has FVU 1; zero-ablation is the CE floor it must beat.
    assert evaluation["fvu"] < 0.5
    assert evaluation["ce_loss_spliced"] < evaluation["ce_loss_zero_ablated"]
    assert evaluation["ce_loss_recovered"] > 0.5
    # Sparse: far fewer active features than the 2304 available, and than d_model.
    assert 1 < evaluation["l0"] < 300
    # The saved SAE takes raw activations (the scale was folded in): its reconstruction matches there too.
    from sae.io import load_dictionary

    sae = load_dictionary(result.folder, expected_d_in=576)
    tokens = real_model.to_tokens("The quick brown fox jumps over the lazy dog near the river bank.")
    _, cache = real_model.run_with_cache(tokens, names_filter=[hook])
    x = cache[hook][0, 1:]
    reconstruction = sae(x).reconstruction
    fvu = ((reconstruction - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.6
