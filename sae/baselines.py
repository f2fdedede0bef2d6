"""The decompositions Cunningham et al. compare sparse autoencoders against, as `ReluSAE`s.

Each baseline is a basis P [m, d_in] of directions with an encoder E [d_in, m] that reads the
coordinates z = (x - b_dec) @ E. To fit the non-negative `Dictionary` interface it is "signed":

    W_dec = [P; -P]  [2m, d_in]     W_enc = [E, -E]  [d_in, 2m]     b_enc = 0     b_dec = data mean

so the codes are relu(z) (features 0..m-1) and relu(-z) (features m..2m-1), and since
relu(z) - relu(-z) = z, decode(encode(x)) = z @ P + b_dec = x exactly when the basis is complete.
Directions are unit vectors for every method (codes are coordinates in activation units).
cfg.extra["method"] names the method ("pca", "ica", "identity", "random"); the architecture is
"standard", so save/load and every experiment treat baselines like any SAE.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from sae.config import DictionaryConfig
from sae.relu import ReluSAE

_CHUNK_ROWS = 65536  # rows per chunk when accumulating statistics in float64


def _as_rows(activations: torch.Tensor) -> torch.Tensor:
    """[..., d_in] -> [n, d_in], checked to be finite and to have at least two rows."""
    if not isinstance(activations, torch.Tensor) or activations.ndim < 2:
        raise ValueError(f"activations must be a tensor [n, d_in] (or [..., d_in]), got "
                         f"{getattr(activations, 'shape', type(activations).__name__)}")
    rows = activations.detach().reshape(-1, activations.shape[-1])
    if rows.shape[0] < 2:
        raise ValueError(f"need at least 2 activation vectors to fit a baseline, got {rows.shape[0]}")
    if not torch.isfinite(rows).all():
        raise ValueError("activations contain NaN or inf; fix the harvested activations before fitting")
    return rows


def _n_components(n_components: int | None, d_in: int, limit: int | None = None) -> int:
    """Default: the complete basis (d_in directions)."""
    limit = d_in if limit is None else min(d_in, limit)
    m = limit if n_components is None else n_components
    if not 0 < m <= limit:
        raise ValueError(f"n_components must be between 1 and {limit} (d_in={d_in}), got {n_components}")
    return m


def _mean(rows: torch.Tensor) -> torch.Tensor:
    """[d_in] mean in float64, a chunk of rows at a time."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        total += rows[start : start + _CHUNK_ROWS].to("cpu", torch.float64).sum(dim=0)
    return total / rows.shape[0]


def _mean_and_covariance(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d_in] and covariance [d_in, d_in] in float64, a chunk of rows at a time."""
    mean = _mean(rows)
    covariance = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        centred = rows[start : start + _CHUNK_ROWS].to("cpu", torch.float64) - mean
        covariance += centred.T @ centred
    return mean, covariance / rows.shape[0]


def signed_dictionary(directions: torch.Tensor, encoder: torch.Tensor, mean: torch.Tensor, method: str, *,
                      hook_name: str = "", model_name: str = "", seed: int = 0, **extra) -> ReluSAE:
    """The signed ReluSAE of a basis: directions P [m, d_in], encoder E [d_in, m], offset mean [d_in]."""
    m, d_in = directions.shape
    cfg = DictionaryConfig(architecture="standard", d_in=d_in, d_sae=2 * m, hook_name=hook_name,
                           model_name=model_name, seed=seed,
                           extra={"method": method, "n_components": m, "signed": True, **extra})
    dictionary = ReluSAE(cfg)
    with torch.no_grad():
        dictionary.W_dec.copy_(torch.cat([directions, -directions]).float())
        dictionary.W_enc.copy_(torch.cat([encoder, -encoder], dim=1).float())
        dictionary.b_enc.zero_()
        dictionary.b_dec.copy_(mean.float())
    return dictionary.eval()


def _orthonormal(directions: torch.Tensor, mean: torch.Tensor, method: str, **kwargs) -> ReluSAE:
    """Orthonormal rows: the encoder is the transpose of the decoder."""
    return signed_dictionary(directions, directions.T, mean, method, **kwargs)


def _fixed_signs(directions: torch.Tensor) -> torch.Tensor:
    """Flip each row so its largest-magnitude entry is positive (a basis's signs are otherwise arbitrary)."""
    largest = directions.abs().argmax(dim=1)
    signs = torch.sign(directions[torch.arange(directions.shape[0]), largest])
    return directions * signs[:, None]


def fit_pca(activations: torch.Tensor, n_components: int | None = None, *, seed: int = 0,
            hook_name: str = "", model_name: str = "") -> ReluSAE:
    """Signed PCA: the top principal directions of the centred activations, largest variance first."""
    rows = _as_rows(activations)
    m = _n_components(n_components, rows.shape[1])
    mean, covariance = _mean_and_covariance(rows)
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    order = variances.argsort(descending=True)[:m]
    directions = _fixed_signs(vectors[:, order].T)  # [m, d_in]
    explained = (variances[order].sum() / variances.sum().clamp_min(1e-30)).item()
    return _orthonormal(directions, mean, "pca", hook_name=hook_name, model_name=model_name, seed=seed,
                        variance_explained=explained)


def fit_ica(activations: torch.Tensor, n_components: int | None = None, *, seed: int = 0,
            hook_name: str = "", model_name: str = "", max_iter: int = 1000) -> ReluSAE:
    """Signed ICA (sklearn FastICA): directions are the mixing matrix's columns, scaled to unit norm.

    FastICA gives sources s = W (x - mean) and x = mean + A s. With a_i the columns of A, the decoder
    rows are a_i / |a_i| and the codes are s_i |a_i| (the encoder rows of W scaled by |a_i|), so
    decode(encode(x)) = mean + A s = x exactly for a complete basis.
    """
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    rows = _as_rows(activations)
    m = _n_components(n_components, rows.shape[1], limit=rows.shape[0] - 1)
    ica = FastICA(n_components=m, whiten="unit-variance", random_state=seed, max_iter=max_iter, tol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(rows.to("cpu", torch.float64).numpy())
    converged = not any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
    for warning in caught:
        if not issubclass(warning.category, ConvergenceWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not converged:
        warnings.warn(f"FastICA did not converge in {max_iter} iterations; the directions are still a valid "
                      "basis (reconstruction stays exact) but may not be independent", stacklevel=2)
    mixing = torch.from_numpy(ica.mixing_)  # [d_in, m]
    unmixing = torch.from_numpy(ica.components_)  # [m, d_in]
    norms = mixing.norm(dim=0).clamp_min(1e-30)  # [m]
    directions = (mixing / norms).T  # [m, d_in]
    encoder = (unmixing * norms[:, None]).T  # [d_in, m]
    mean = torch.from_numpy(ica.mean_)
    return signed_dictionary(directions, encoder, mean, "ica", hook_name=hook_name, model_name=model_name,
                             seed=seed, converged=converged)


def identity_basis(d_in: int, mean: torch.Tensor | None = None, *, hook_name: str = "",
                   model_name: str = "") -> ReluSAE:
    """The neuron basis, signed: feature i is +neuron i, feature d_in + i is -neuron i (around `mean`)."""
    mean = torch.zeros(d_in) if mean is None else mean
    return _orthonormal(torch.eye(d_in, dtype=torch.float64), mean, "identity", hook_name=hook_name,
                        model_name=model_name)


def random_orthonormal(d_in: int, n_components: int | None = None, seed: int = 0) -> torch.Tensor:
    """[m, d_in] uniformly random orthonormal rows (QR of a seeded Gaussian, signs fixed by R)."""
    m = _n_components(n_components, d_in)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(d_in, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).T


def random_basis(d_in: int, seed: int = 0, mean: torch.Tensor | None = None, *, n_components: int | None = None,
                 hook_name: str = "", model_name: str = "") -> ReluSAE:
    """Random orthonormal directions, signed; a pure function of the seed."""
    mean = torch.zeros(d_in) if mean is None else mean
    return _orthonormal(random_orthonormal(d_in, n_components, seed), mean, "random", hook_name=hook_name,
                        model_name=model_name, seed=seed)


def _fit_neurons(activations: torch.Tensor, n_components: int | None = None, *, seed: int = 0,
                 hook_name: str = "", model_name: str = "") -> ReluSAE:
    rows = _as_rows(activations)
    if n_components not in (None, rows.shape[1]):
        raise ValueError(f"the neuron basis always has d_in={rows.shape[1]} directions, "
                         f"got n_components={n_components}")
    return identity_basis(rows.shape[1], _mean(rows), hook_name=hook_name, model_name=model_name)


def _fit_random(activations: torch.Tensor, n_components: int | None = None, *, seed: int = 0,
                hook_name: str = "", model_name: str = "") -> ReluSAE:
    rows = _as_rows(activations)
    return random_basis(rows.shape[1], seed, _mean(rows), n_components=n_components, hook_name=hook_name,
                        model_name=model_name)


# name -> fit(activations, n_components=None, *, seed, hook_name, model_name). All centre on the data mean.
BASELINES: dict[str, Callable[..., ReluSAE]] = {
    "pca": fit_pca,
    "ica": fit_ica,
    "neurons": _fit_neurons,
    "random": _fit_random,
}


def fit_baseline(name: str, activations: torch.Tensor, seed: int = 0, *, hook_name: str = "", model_name: str = "",
                 n_components: int | None = None) -> ReluSAE:
    """Fit the baseline `name` ("pca", "ica", "neurons", "random") to activations [n, d_in]."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline '{name}'; choose one of {sorted(BASELINES)}")
    return BASELINES[name](activations, n_components, seed=seed, hook_name=hook_name, model_name=model_name)
