"""Scores: simulation correlation (Bills et al. 2023, as in Cunningham et al.: Pearson correlation over every token
of the scored excerpts, top-activating and random together), detection accuracy and AUC (delphi), and the mean
over features with a bootstrap confidence interval."""

from __future__ import annotations

import math
import random


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant (no variance to correlate)."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return math.nan
    mean_x, mean_y = sum(x) / n, sum(y) / n
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread_x = math.sqrt(sum((a - mean_x) ** 2 for a in x))
    spread_y = math.sqrt(sum((b - mean_y) ** 2 for b in y))
    if spread_x == 0 or spread_y == 0:
        return math.nan
    return max(-1.0, min(1.0, covariance / (spread_x * spread_y)))


def simulation_score(true: list[list[float]], simulated: list[list[float]]) -> float:
    """Correlation over all tokens of all excerpts (per excerpt lists concatenated); a constant simulation
    scores 0 (it predicts nothing), not NaN."""
    flat_true = [value for excerpt in true for value in excerpt]
    flat_simulated = [value for excerpt in simulated for value in excerpt]
    score = pearson(flat_true, flat_simulated)
    return 0.0 if math.isnan(score) else score


def auc(positive: list[float], negative: list[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half; NaN if a side is empty."""
    if not positive or not negative:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def accuracy(positive: list[float], negative: list[float], threshold: float = 0.5) -> float:
    """Balanced accuracy of thresholding the scores: mean of the hit rate and the correct-rejection rate."""
    if not positive or not negative:
        return math.nan
    hits = sum(score >= threshold for score in positive) / len(positive)
    rejections = sum(score < threshold for score in negative) / len(negative)
    return (hits + rejections) / 2


def mean_with_interval(values: list[float], n_resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite values and a percentile bootstrap interval over them."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan, math.nan
    generator = random.Random(seed)
    means = sorted(sum(generator.choices(values, k=len(values))) / len(values) for _ in range(n_resamples))
    tail = (1 - level) / 2
    return (sum(values) / len(values), means[int(tail * (n_resamples - 1))],
            means[int(round((1 - tail) * (n_resamples - 1)))])
