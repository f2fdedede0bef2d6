"""Sparse probes: the k directions of a basis that best separate a label on the train split, and a
logistic regression on them.

Selection (as SAEBench's sparse probing, which ranks latents by the difference of class means) ranks
each direction by the difference of its mean on positive and negative train tokens; `normalised`
(the default) divides by the pooled standard deviation, so a direction's scale (a PCA coordinate in
activation units, an SAE feature's own units) does not decide. The probe is a class-balanced L2
logistic regression on the standardised k codes; its decision threshold is the one that maximises
F1 on the train split, so F1 on held-out tokens measures the probe, not an arbitrary cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTIONS = ("normalised", "mean_difference")
CHUNK_ROWS = 4096


def separation_scores(codes: torch.Tensor, labels: torch.Tensor, selection: str = "normalised") -> torch.Tensor:
    """[L, F] |mean on positives - mean on negatives| of each direction (codes [n, F]) for each label
    (labels [n, L] bool), divided by the pooled standard deviation when `selection` is 'normalised'."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    y = labels.double()
    positives = y.sum(dim=0)[:, None].clamp_min(1)
    negatives = (1 - y).sum(dim=0)[:, None].clamp_min(1)
    sums = torch.zeros(labels.shape[1], codes.shape[1], dtype=torch.float64)  # [L, F] over positives
    squares = torch.zeros_like(sums)
    total = torch.zeros(1, codes.shape[1], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    for start in range(0, codes.shape[0], CHUNK_ROWS):  # float64 a chunk at a time: [n, F] codes can be large
        x, part = codes[start:start + CHUNK_ROWS].double(), y[start:start + CHUNK_ROWS]
        sums += part.T @ x
        squares += part.T @ x.square()
        total += x.sum(dim=0)
        total_squares += x.square().sum(dim=0)
    mean_positive, mean_negative = sums / positives, (total - sums) / negatives
    difference = (mean_positive - mean_negative).abs()
    if selection == "mean_difference":
        return difference.float()
    var_positive = (squares / positives - mean_positive.square()).clamp_min(0)
    var_negative = ((total_squares - squares) / negatives - mean_negative.square()).clamp_min(0)
    pooled = ((var_positive + var_negative) / 2).sqrt()
    return torch.where(pooled > 1e-12, difference / pooled.clamp_min(1e-12), torch.zeros_like(difference)).float()


def top_directions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[L, k] indices of the k best-scoring directions per label, best first (ties: lower index first)."""
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k must be between 1 and the {scores.shape[-1]} directions of the basis, got {k}")
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def best_f1_threshold(scores: torch.Tensor, actual: torch.Tensor) -> float:
    """The cut on `scores` [n] (predict positive above it) with the highest F1 for `actual` [n] bool; between
    two distinct scores, so every token on one side of it is predicted alike."""
    order = scores.double().argsort(descending=True)
    ranked, hits = scores.double()[order], actual.bool()[order].double()
    true_positive = hits.cumsum(0)
    predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    f1 = 2 * true_positive / (predicted + hits.sum())
    boundary = torch.ones(len(ranked), dtype=torch.bool)
    boundary[:-1] = ranked[:-1] > ranked[1:]  # cut only where the next score is lower
    f1 = torch.where(boundary, f1, torch.full_like(f1, -1.0))
    best = int(f1.argmax())
    if best == len(ranked) - 1:
        return float(ranked[-1]) - 1.0
    return float((ranked[best] + ranked[best + 1]) / 2)


@dataclass
class Probe:
    """A logistic regression on k directions: score = ((codes - mean) / scale) @ weight + bias."""

    directions: torch.Tensor  # [k] indices into the basis
    mean: torch.Tensor  # [k]
    scale: torch.Tensor  # [k]
    weight: torch.Tensor  # [k]
    bias: float
    threshold: float  # predict positive where score > threshold

    def scores(self, codes: torch.Tensor) -> torch.Tensor:
        """[n] decision scores from the basis's codes [n, F] (all directions; the probe reads its k)."""
        x = (codes[:, self.directions].double() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, codes: torch.Tensor) -> torch.Tensor:
        return self.scores(codes) > self.threshold


def fit_probe(codes: torch.Tensor, actual: torch.Tensor, directions: torch.Tensor, *, seed: int = 0,
              regularisation: float = 1.0) -> Probe:
    """A class-balanced logistic regression (sklearn, L2 with inverse strength `regularisation`) on the
    standardised `directions` of codes [n, F]; threshold at the best train F1."""
    from sklearn.linear_model import LogisticRegression

    x = codes[:, directions].double()
    mean, scale = x.mean(dim=0), x.std(dim=0)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    standard = ((x - mean) / scale).numpy()
    model = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=1000, random_state=seed)
    model.fit(standard, actual.bool().numpy())
    weight = torch.from_numpy(model.coef_[0]).double()
    bias = float(model.intercept_[0])
    train_scores = torch.from_numpy(standard) @ weight + bias
    return Probe(directions.clone(), mean, scale, weight, bias, best_f1_threshold(train_scores, actual))
