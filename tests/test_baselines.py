"""PCA, ICA, neuron and random-direction baselines as signed ReLU dictionaries."""

from __future__ import annotations

import pytest
import torch

from sae.baselines import BASELINES, fit_baseline, fit_ica, fit_pca, identity_basis, random_basis
from sae.io import load_dictionary, save_dictionary

D_IN = 16
METHODS = {"pca": "pca", "ica": "ica", "neurons": "identity", "random": "random"}


@pytest.fixture(scope="module")
def mixing() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(D_IN, D_IN, generator=generator)  # [d_in, sources]


@pytest.fixture(scope="module")
def activations(mixing) -> torch.Tensor:
    """[n, d_in] independent Laplace sources mixed linearly, plus an offset (so centring matters)."""
    generator = torch.Generator().manual_seed(1)
    uniform = torch.rand(3000, D_IN, generator=generator) - 0.5
    sources = -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())  # Laplace(0, 1)
    return sources @ mixing.T + 3.0


def relative_error(dictionary, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((dictionary(x).reconstruction - x).abs().max() / x.abs().max()).item()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_complete_baselines_reconstruct_exactly(name, activations):
    dictionary = fit_baseline(name, activations, seed=0, hook_name="blocks.1.hook_resid_post", model_name="m")
    assert relative_error(dictionary, activations) < 1e-4
    assert dictionary.cfg.extra["method"] == METHODS[name]
    assert dictionary.cfg.architecture == "standard" and dictionary.cfg.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad():
        codes = dictionary.encode(activations)
    assert codes.shape == (len(activations), 2 * D_IN)
    assert (codes >= 0).all()
    assert ((codes[:, :D_IN] > 0) & (codes[:, D_IN:] > 0)).sum() == 0  # one side of each sign pair
    directions = dictionary.feature_directions
    assert directions.shape == (2 * D_IN, D_IN)
    assert torch.allclose(directions[D_IN:], -directions[:D_IN])
    assert torch.allclose(directions.norm(dim=1), torch.ones(2 * D_IN), atol=1e-5)


def test_pca_directions_match_svd(activations):
    dictionary = fit_pca(activations, n_components=4)
    centred = activations.double() - activations.double().mean(dim=0)
    _, singular_values, right = torch.linalg.svd(centred, full_matrices=False)
    cosines = (dictionary.feature_directions[:4].double() @ right[:4].T).abs()
    assert torch.allclose(cosines, torch.eye(4, dtype=torch.float64), atol=1e-4)
    explained = (singular_values[:4] ** 2).sum() / (singular_values ** 2).sum()
    assert dictionary.cfg.extra["variance_explained"] == pytest.approx(explained.item(), rel=1e-6)
    # incomplete PCA reconstructs the projection onto the top components
    with torch.no_grad():
        reconstruction = dictionary(activations).reconstruction.double()
    projection = centred @ right[:4].T @ right[:4] + activations.double().mean(dim=0)
    assert torch.allclose(reconstruction, projection, atol=1e-3)


def test_ica_recovers_the_mixing_directions(activations, mixing):
    dictionary = fit_ica(activations, seed=0)
    true_directions = mixing.T / mixing.norm(dim=0)[:, None]  # [sources, d_in]
    cosines = (dictionary.feature_directions[:D_IN] @ true_directions.T).abs()
    assert (cosines.max(dim=1).values > 0.95).all()


def test_random_and_identity_bases_are_orthonormal_and_seeded(activations):
    first, again, other = random_basis(D_IN, seed=5), random_basis(D_IN, seed=5), random_basis(D_IN, seed=6)
    directions = first.feature_directions[:D_IN]
    assert torch.allclose(directions @ directions.T, torch.eye(D_IN), atol=1e-5)
    assert torch.equal(first.W_dec, again.W_dec) and not torch.allclose(first.W_dec, other.W_dec)
    neurons = identity_basis(D_IN)
    x = activations[:5]
    with torch.no_grad():
        codes = neurons.encode(x)
    assert torch.equal(codes[:, :D_IN] - codes[:, D_IN:], x)  # uncentred: codes are the neurons themselves


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_fitting_is_deterministic_given_the_seed(name, activations):
    first = fit_baseline(name, activations, seed=2)
    second = fit_baseline(name, activations, seed=2)
    for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(first, weight), getattr(second, weight))


@pytest.mark.parametrize("name", ["pca", "ica"])
def test_save_and_load_round_trip(name, activations, tmp_path):
    dictionary = fit_baseline(name, activations, seed=0, n_components=8)
    loaded = load_dictionary(save_dictionary(dictionary, tmp_path / name))
    assert loaded.cfg.extra["method"] == name and loaded.n_features == 16
    with torch.no_grad():
        assert torch.equal(loaded.encode(activations[:10]), dictionary.encode(activations[:10]))


def test_bad_requests_are_explained(activations):
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        fit_baseline("svd", activations)
    with pytest.raises(ValueError, match="n_components must be between 1 and 16"):
        fit_pca(activations, n_components=17)
    with pytest.raises(ValueError, match="NaN"):
        fit_pca(torch.full((4, D_IN), float("nan")))
    with pytest.raises(ValueError, match="always has d_in=16"):
        fit_baseline("neurons", activations, n_components=3)
