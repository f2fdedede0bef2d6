"""How well a probe predicts a label on held-out tokens: F1 of the positive class and ROC AUC, each with a
bootstrap over held-out sentences.

Every score takes token weights [n, B] (a column per resample, laid out so that picking tokens picks
rows): one column of ones is the plain score; `resample_weights` gives B columns of a sentence
bootstrap (a token weighs as often as its sentence was drawn), so all labels, bases
and k share the same resamples and means over labels, or differences between bases, get paired
intervals from the same columns. Weights are whole counts, so float32 sums of them are exact.
"""

from __future__ import annotations

import math

import torch


def resample_weights(sentences: torch.Tensor, resamples: int, seed: int = 0) -> torch.Tensor:
    """[n, resamples] float32 token weights: how often each token's sentence was drawn (sentences [n] ids)."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    unique, inverse = torch.unique(sentences, return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(unique), (resamples, len(unique)), generator=generator)
    counts = torch.zeros(resamples, len(unique)).scatter_add_(1, draws, torch.ones(resamples, len(unique)))
    return counts.T[inverse].contiguous()


def plain_weights(n: int) -> torch.Tensor:
    """[n, 1] ones: the score on the sample itself."""
    return torch.ones(n, 1)


def f1_scores(weights: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """[B] F1 of the positive class, 2 TP / (2 TP + FP + FN), under each column of token weights [n, B]
    (0 when there is no positive prediction and no positive token)."""
    predicted, actual = predicted.bool(), actual.bool()
    weights = weights.float()
    true_positive = ((predicted & actual).float() @ weights).double()
    false_positive = ((predicted & ~actual).float() @ weights).double()
    false_negative = ((~predicted & actual).float() @ weights).double()
    denominator = 2 * true_positive + false_positive + false_negative
    f1 = 2 * true_positive / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, f1, torch.zeros_like(denominator))


def precision_recall(predicted: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of the positive class on the sample itself (NaN where undefined)."""
    predicted, actual = predicted.bool(), actual.bool()
    true_positive = int((predicted & actual).sum())
    precision = true_positive / int(predicted.sum()) if predicted.any() else math.nan
    recall = true_positive / int(actual.sum()) if actual.any() else math.nan
    return precision, recall


def roc_auc(weights: torch.Tensor, scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """[B] ROC AUC of `scores` [n] for `actual` [n] under each column of token weights [n, B]: the chance a
    positive outscores a negative, ties counting a half (NaN when a column lacks positives or negatives)."""
    order = scores.argsort()
    ranked, labels = scores[order], actual.bool()[order]
    if ranked.numel() == 0:
        return torch.full((weights.shape[1],), math.nan, dtype=torch.float64)
    weights = weights.float()[order]  # [n, B] in score order
    negatives = torch.nn.functional.pad((weights * ~labels[:, None]).cumsum(dim=0), (0, 0, 1, 0))  # [n + 1, B]
    index = torch.arange(len(ranked))
    starts = torch.ones(len(ranked), dtype=torch.bool)
    starts[1:] = ranked[1:] > ranked[:-1]  # a new score begins here
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values  # start of its tie group
    ends = torch.roll(starts, -1)
    ends[-1] = True
    last = torch.where(ends, index, torch.full_like(index, len(ranked))).flip(0).cummin(dim=0).values.flip(0)
    positive = labels.nonzero().flatten()
    below = negatives[first[positive]]  # [n_pos, B] negatives scored strictly lower than each positive
    tied = negatives[last[positive] + 1] - below  # negatives tied with it
    positive_weights = weights[positive]
    won = (positive_weights.double() * (below.double() + 0.5 * tied.double())).sum(dim=0)
    pairs = positive_weights.sum(dim=0).double() * negatives[-1].double()
    return torch.where(pairs > 0, won / pairs.clamp_min(1e-300), torch.full_like(pairs, math.nan))


def interval(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples [B] (NaNs left out; NaN, NaN when none is finite)."""
    finite = samples[torch.isfinite(samples)].double()
    if finite.numel() == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high
